"""Mining losses against pytorch-metric-learning (pml), values and gradients.

Making the two the same function (read off pml 2.9 sources):
- pml's TripletMarginLoss defaults to LpDistance(normalize_embeddings=True, p=2, power=1): Euclidean distance of
  L2-normalized rows (F.normalize, then torch.cdist; no eps added) -> ours with distance="euclidean",
  normalize=True. Its default margin is 0.05: both get the same margin here.
- pml's default reducer is AvgNonZeroReducer: the mean over the losses > 0 (0 when none). For batch-all with no
  miner (every triplet y_a == y_p, a != p, y_n != y_a) that is our reduction="mean_nonzero".
- Batch-hard: BatchHardMiner keeps the anchors with a positive and a negative and mines per anchor the largest
  positive and the smallest negative distance (torch.max/min per row of the masked matrix, computed without
  gradient; the loss recomputes the distances). Our batch-hard averages over all those anchors, zero losses
  included (Hermans et al.), so pml gets MeanReducer; with its default AvgNonZeroReducer the two differ whenever
  some anchor's hardest triplet is already satisfied (checked below as well, with our stats).
- Ties between equal distances may pick different indices in pml; random Gaussian embeddings have none.
- Semi-hard has no pml counterpart (its TripletMarginMiner "semihard" keeps every triplet with 0 < d_an - d_ap
  <= margin, not one negative per positive pair as FaceNet/TF Addons), so it is not compared.
"""

import pytest
import torch

import tripletloss_cuda as tl

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

MARGIN = 0.05  # pml's default
SEEDS = (0, 1, 2)
TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def _batch(seed, dtype, n=48, d=16, classes=6, spread=0.0):
    """Gaussian embeddings, around a center per class `spread` apart (0: no structure), random labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centers = spread * torch.randn(classes, d, generator=g, dtype=torch.float64)
    embeddings = centers[labels] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return embeddings.to(dtype), labels


def _value_and_grad(loss_fn, embeddings, labels):
    x = embeddings.clone().requires_grad_()
    loss = loss_fn(x, labels)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _compare(ours, theirs, dtype):
    torch.testing.assert_close(ours[0], theirs[0], **TOL[dtype])
    torch.testing.assert_close(ours[1], theirs[1], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_batch_hard_matches_pml(seed, dtype, spread):
    embeddings, labels = _batch(seed, dtype, spread=spread)
    pml = pml_losses.TripletMarginLoss(margin=MARGIN, reducer=pml_reducers.MeanReducer())
    miner = pml_miners.BatchHardMiner()
    theirs = _value_and_grad(lambda x, y: pml(x, y, miner(x, y)), embeddings, labels)
    ours = _value_and_grad(
        lambda x, y: tl.batch_hard_triplet_loss(x, y, margin=MARGIN, normalize=True), embeddings, labels
    )
    assert theirs[0] > 0
    _compare(ours, theirs, dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_hard_with_pml_default_reducer(seed):
    """pml's default AvgNonZeroReducer averages over the active anchors only: ours times valid / active anchors."""
    embeddings, labels = _batch(seed, torch.float64, spread=1.0)  # clusters: some anchors already satisfied
    pml = pml_losses.TripletMarginLoss(margin=MARGIN)
    miner = pml_miners.BatchHardMiner()
    theirs = pml(embeddings, labels, miner(embeddings, labels))
    ours, stats = tl.batch_hard_triplet_loss(embeddings, labels, margin=MARGIN, normalize=True, return_stats=True)
    assert 0 < stats.active_anchor_fraction < 1, "pick data where the reducers differ"
    # active_anchor_fraction is float32 (see tl.MiningStats): hence the float32 tolerance
    torch.testing.assert_close(ours / stats.active_anchor_fraction.double(), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("margin", [MARGIN, 0.5])
def test_batch_all_matches_pml(seed, dtype, margin):
    embeddings, labels = _batch(seed, dtype, spread=1.0)
    pml = pml_losses.TripletMarginLoss(margin=margin)  # no miner: all triplets; AvgNonZeroReducer
    theirs = _value_and_grad(lambda x, y: pml(x, y), embeddings, labels)
    ours = _value_and_grad(
        lambda x, y: tl.batch_all_triplet_loss(x, y, margin=margin, normalize=True, reduction="mean_nonzero"),
        embeddings,
        labels,
    )
    assert theirs[0] > 0
    _compare(ours, theirs, dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_all_mean_matches_pml_mean_reducer(seed):
    embeddings, labels = _batch(seed, torch.float64)
    pml = pml_losses.TripletMarginLoss(margin=0.5, reducer=pml_reducers.MeanReducer())
    theirs = _value_and_grad(lambda x, y: pml(x, y), embeddings, labels)
    ours = _value_and_grad(
        lambda x, y: tl.batch_all_triplet_loss(x, y, margin=0.5, normalize=True, reduction="mean"), embeddings, labels
    )
    _compare(ours, theirs, torch.float64)


# --- reference sets: pml's ref_emb / ref_labels (queries mined against another set) -------------------------------
# pml (get_matches_and_diffs) drops the diagonal only when ref_labels IS labels: with a reference set every
# reference of the anchor's label is a positive, which is ours without ref_self_index.


def _value_and_grads(loss_fn, embeddings, labels, ref_emb, ref_labels):
    x, r = embeddings.clone().requires_grad_(), ref_emb.clone().requires_grad_()
    loss = loss_fn(x, labels, r, ref_labels)
    return (loss.detach(), *torch.autograd.grad(loss, (x, r)))


def _compare_all(ours, theirs, dtype):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_batch_all_with_reference_set_matches_pml(seed, dtype, chunk_size):
    embeddings, labels = _batch(seed, dtype, n=30, spread=1.0)
    ref_emb, ref_labels = _batch(seed + 10, dtype, n=50, spread=1.0)
    pml = pml_losses.TripletMarginLoss(margin=0.3)  # no miner: all triplets; AvgNonZeroReducer
    theirs = _value_and_grads(
        lambda x, y, r, ry: pml(x, y, ref_emb=r, ref_labels=ry), embeddings, labels, ref_emb, ref_labels
    )

    def fn(x, y, r, ry):
        return tl.batch_all_triplet_loss(
            x, y, margin=0.3, normalize=True, ref_embeddings=r, ref_labels=ry, chunk_size=chunk_size
        )

    ours = _value_and_grads(fn, embeddings, labels, ref_emb, ref_labels)
    assert theirs[0] > 0
    _compare_all(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_batch_hard_with_reference_set_matches_pml(seed, dtype, chunk_size):
    """BatchHardMiner on ref_emb + TripletMarginLoss with MeanReducer (ours averages over all valid anchors)."""
    embeddings, labels = _batch(seed, dtype, n=30)
    ref_emb, ref_labels = _batch(seed + 10, dtype, n=50)
    pml = pml_losses.TripletMarginLoss(margin=MARGIN, reducer=pml_reducers.MeanReducer())
    miner = pml_miners.BatchHardMiner()

    def theirs_fn(x, y, r, ry):
        return pml(x, y, miner(x, y, r, ry), ref_emb=r, ref_labels=ry)

    def fn(x, y, r, ry):
        return tl.batch_hard_triplet_loss(
            x, y, margin=MARGIN, normalize=True, ref_embeddings=r, ref_labels=ry, chunk_size=chunk_size
        )

    theirs = _value_and_grads(theirs_fn, embeddings, labels, ref_emb, ref_labels)
    ours = _value_and_grads(fn, embeddings, labels, ref_emb, ref_labels)
    assert theirs[0] > 0
    _compare_all(ours, theirs, dtype)


def test_no_triplet_gives_zero_like_pml():
    """One class only: pml's zero loss and ours, both with zero gradients."""
    embeddings, labels = torch.randn(8, 4, dtype=torch.float64), torch.zeros(8, dtype=torch.int64)
    theirs = _value_and_grad(lambda x, y: pml_losses.TripletMarginLoss()(x, y) + 0 * x.sum(), embeddings, labels)
    for fn in (tl.batch_all_triplet_loss, tl.batch_hard_triplet_loss):
        ours = _value_and_grad(lambda x, y, fn=fn: fn(x, y, margin=MARGIN, normalize=True), embeddings, labels)
        _compare(ours, theirs, torch.float64)
