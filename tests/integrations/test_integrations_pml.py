"""tripletloss_cuda.integrations.pml.TripletMarginLoss against the real pytorch-metric-learning 2.9 on random
batches: values and gradients for every reproduced distance, reducer and option, with no miner, with each
miner's triplets or pairs, and with reference sets; swap with a reference set against a correct gather oracle
(PML's own is wrong there, its issue #748); and an error for every option not reproduced."""

import itertools

import pytest
import torch
import torch.nn.functional as F

pml = pytest.importorskip("pytorch_metric_learning")
from helpers import seed_of
from pytorch_metric_learning import distances, losses, miners, reducers

from tripletloss_cuda.integrations import pml as drop_in

DISTANCES = {
    "lp": lambda: distances.LpDistance(),
    "lp_raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "lp_sq": lambda: distances.LpDistance(power=2),
    "lp_raw_sq": lambda: distances.LpDistance(normalize_embeddings=False, power=2),
    "cos": lambda: distances.CosineSimilarity(),
    "default": lambda: None,
}
REDUCERS = {
    "default": lambda: None,
    "avg_nonzero": reducers.AvgNonZeroReducer,
    "mean": reducers.MeanReducer,
    "sum": reducers.SumReducer,
}
MINERS = {
    "none": lambda d: None,
    "batch_hard": lambda d: miners.BatchHardMiner(distance=d),
    "tm_all": lambda d: miners.TripletMarginMiner(margin=0.2, type_of_triplets="all", distance=d),
    "tm_hard": lambda d: miners.TripletMarginMiner(margin=0.2, type_of_triplets="hard", distance=d),
    "tm_semihard": lambda d: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=d),
    "tm_easy": lambda d: miners.TripletMarginMiner(margin=0.2, type_of_triplets="easy", distance=d),
    "easy_hard": lambda d: miners.BatchEasyHardMiner(distance=d),
}


def batch(n=24, d=6, classes=4, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    if m is None:
        return x, y
    return x, y, torch.randn(m, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (m,), generator=g)


def value_and_grads(loss_fn, x, y, indices=None, ref=None, ref_y=None):
    x = x.detach().requires_grad_()
    inputs = [x]
    if ref is not None:
        ref = ref.detach().requires_grad_()
        inputs.append(ref)
    loss = loss_fn(x, y, indices, ref, ref_y)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def assert_same(got, want):
    torch.testing.assert_close(got[0].to(want[0].dtype), want[0], rtol=1e-9, atol=1e-9)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


CASES = [(d, r, m, False, False) for d, r, m in itertools.product(DISTANCES, REDUCERS, MINERS)] + [
    (d, "default", m, swap, not swap) for d, m, swap in itertools.product(DISTANCES, MINERS, (False, True))
]


def compare(distance, reducer, miner, swap, smooth):
    """Our loss and gradients against PML's on one random batch; returns PML's loss."""
    x, y = batch(seed=seed_of(distance, reducer, miner) % 1000)
    kwargs = {"margin": 0.1, "swap": swap, "smooth_loss": smooth}
    ours = drop_in.TripletMarginLoss(distance=DISTANCES[distance](), reducer=REDUCERS[reducer](), **kwargs)
    theirs = losses.TripletMarginLoss(distance=DISTANCES[distance](), reducer=REDUCERS[reducer](), **kwargs)
    mine = MINERS[miner](DISTANCES[distance]())
    indices = None if mine is None else mine(x, y)
    want = value_and_grads(theirs, x, y, indices)
    assert_same(value_and_grads(ours, x, y, indices), want)
    return want[0]


@pytest.mark.parametrize("distance,reducer,miner,swap,smooth", CASES)
def test_matches_pml(distance, reducer, miner, swap, smooth):
    compare(distance, reducer, miner, swap, smooth)


def test_cases_are_not_trivial():
    """Most cases above have a positive loss (the comparisons are not all 0 == 0)."""
    values = [compare(*case) for case in CASES[::7]]
    assert sum(v > 0 for v in values) >= 0.8 * len(values)


@pytest.mark.parametrize("miner", ["none", "batch_hard", "tm_semihard", "easy_hard"])
@pytest.mark.parametrize("distance", ["lp", "lp_raw_sq", "cos"])
@pytest.mark.parametrize("reducer", ["default", "mean", "sum"])
def test_reference_set_matches_pml(distance, reducer, miner):
    x, y, ref, ref_y = batch(n=10, m=14, seed=4)
    ours = drop_in.TripletMarginLoss(margin=0.2, distance=DISTANCES[distance](), reducer=REDUCERS[reducer]())
    theirs = losses.TripletMarginLoss(margin=0.2, distance=DISTANCES[distance](), reducer=REDUCERS[reducer]())
    mine = MINERS[miner](DISTANCES[distance]())
    indices = None if mine is None else mine(x, y, ref, ref_y)
    assert_same(value_and_grads(ours, x, y, indices, ref, ref_y), value_and_grads(theirs, x, y, indices, ref, ref_y))


@pytest.mark.parametrize("same_tensor", [False, True])
@pytest.mark.parametrize("m", [12, 7])
def test_ref_labels_is_labels(m, same_tensor):
    """ref_labels passed as the labels object itself: PML drops (i, i) pairs (its fill_diagonal_)."""
    x, y = batch(n=12, seed=6)
    ref = x if same_tensor and m == 12 else batch(n=m, seed=7)[0]
    ref_y = y if m == 12 else y[:m]
    if m != 12:  # a different object: both libraries treat it as a separate set
        assert ref_y is not y
    for kwargs in ({}, {"swap": False, "smooth_loss": True}):
        ours, theirs = drop_in.TripletMarginLoss(margin=0.3, **kwargs), losses.TripletMarginLoss(margin=0.3, **kwargs)
        if same_tensor and m == 12:
            got = value_and_grads(lambda x, y, i, r, ry, f=ours: f(x, y, i, x, y), x, y)
            want = value_and_grads(lambda x, y, i, r, ry, f=theirs: f(x, y, i, x, y), x, y)
        else:
            got = value_and_grads(ours, x, y, None, ref, ref_y)
            want = value_and_grads(theirs, x, y, None, ref, ref_y)
        assert_same(got, want)


def correct_swap_oracle(x, y, indices, ref, ref_y, margin, distance):
    """Gathered rows, swap's d(p, n) between the two reference rows (what PML's issue #748 asks for)."""
    a, p, n = indices
    xn, rn = F.normalize(x, dim=1), F.normalize(ref, dim=1)

    def d(u, v):
        return 1 - (u * v).sum(1) if distance == "cos" else (u - v).norm(dim=1)

    d_an = torch.minimum(d(xn[a], rn[n]), d(rn[p], rn[n]))
    losses_ = F.relu(margin + d(xn[a], rn[p]) - d_an)
    return losses_.sum() / (losses_ > 0).sum().clamp_min(1)


@pytest.mark.parametrize("distance", ["lp", "cos"])
def test_swap_with_reference_set_is_correct(distance):
    x, y, ref, ref_y = batch(n=8, m=20, seed=9)
    indices = miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")(x, y, ref, ref_y)
    assert (indices[1] >= x.shape[0]).any()  # PML would index its (8, 20) matrix's rows with these
    ours = drop_in.TripletMarginLoss(margin=0.3, swap=True, distance=DISTANCES[distance]())

    def oracle(x, y, indices, ref, ref_y):
        return correct_swap_oracle(x, y, indices, ref, ref_y, 0.3, distance)

    assert_same(value_and_grads(ours, x, y, indices, ref, ref_y), value_and_grads(oracle, x, y, indices, ref, ref_y))
    with pytest.raises(IndexError):  # PML's own swap with a reference set (its issue #748)
        losses.TripletMarginLoss(margin=0.3, swap=True)(x, y, indices, ref, ref_y)


def test_edge_batches():
    """No valid triplet (one class, all singletons) and empty mined tuples: 0 with zero gradients, as PML."""
    for y in (torch.zeros(6, dtype=torch.int64), torch.arange(6)):
        x = torch.randn(6, 4, dtype=torch.float64)
        for make_reducer in REDUCERS.values():
            assert_same(
                value_and_grads(drop_in.TripletMarginLoss(reducer=make_reducer()), x, y),
                value_and_grads(losses.TripletMarginLoss(reducer=make_reducer()), x, y),
            )
        empty = miners.BatchHardMiner()(x, y)
        assert_same(
            value_and_grads(drop_in.TripletMarginLoss(swap=True), x, y, empty),
            value_and_grads(losses.TripletMarginLoss(swap=True), x, y, empty),
        )


def test_float_labels():
    x, y = batch(n=16, seed=5)
    for reducer in ("default", "sum"):
        ours, theirs = (
            drop_in.TripletMarginLoss(reducer=REDUCERS[reducer]()),
            losses.TripletMarginLoss(reducer=REDUCERS[reducer]()),
        )
        assert_same(value_and_grads(ours, x, y.double() / 3), value_and_grads(theirs, x, y.double() / 3))


def test_float32_close_to_pml():
    x, y = batch(n=64, d=16, seed=2)
    x = x.float()
    for distance, swap in itertools.product(["lp", "lp_sq", "cos"], [False, True]):
        ours = drop_in.TripletMarginLoss(margin=0.2, swap=swap, distance=DISTANCES[distance]())
        theirs = losses.TripletMarginLoss(margin=0.2, swap=swap, distance=DISTANCES[distance]())
        for indices in (None, miners.BatchHardMiner()(x, y)):
            got, want = value_and_grads(ours, x, y, indices), value_and_grads(theirs, x, y, indices)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1][0], want[1][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"distance": distances.LpDistance(p=1)}, r"distance=LpDistance\(p=1\)"),
        ({"distance": distances.LpDistance(power=3)}, r"distance=LpDistance\(power=3\)"),
        ({"distance": distances.DotProductSimilarity()}, "distance=DotProductSimilarity"),
        ({"distance": distances.SNRDistance()}, "distance=SNRDistance"),
        ({"reducer": reducers.ThresholdReducer(low=0.1)}, "reducer=ThresholdReducer"),
        ({"reducer": reducers.DoNothingReducer()}, "reducer=DoNothingReducer"),
        ({"embedding_regularizer": object()}, "embedding_regularizer"),
        ({"collect_stats": True}, "collect_stats"),
    ],
)
def test_unreproduced_options_raise(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        drop_in.TripletMarginLoss(**kwargs)


def test_call_errors():
    x, y = batch(n=8)
    with pytest.raises(NotImplementedError, match="triplets_per_anchor=10"):
        drop_in.TripletMarginLoss(triplets_per_anchor=10)(x, y)
    drop_in.TripletMarginLoss(triplets_per_anchor=10)(x, y, miners.BatchHardMiner()(x, y))  # fine with a miner
    with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
        drop_in.TripletMarginLoss()(x)
    with pytest.raises(ValueError, match="Number of embeddings must equal number of labels"):
        drop_in.TripletMarginLoss()(x, y[:-1])
    with pytest.raises(TypeError, match=r"argument 'embeddings' \(position 1\) must be Tensor, not list"):
        drop_in.TripletMarginLoss()(x.tolist(), y)
    with pytest.raises(ValueError, match="needs ref_labels"):
        drop_in.TripletMarginLoss()(x, y, ref_emb=x)
    with pytest.raises(ValueError, match="indices_tuple should be a tuple of 3"):
        drop_in.TripletMarginLoss()(x, y, (y, y))
    with pytest.raises(NotImplementedError, match="swap=True without an indices_tuple lists every triplet"):
        big = torch.randn(500, 4)
        drop_in.TripletMarginLoss(swap=True)(big, torch.randint(0, 5, (500,)))
