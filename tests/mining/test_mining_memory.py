"""CrossBatchMemory: the ring buffer (enqueue order, wrap-around, filling), the loss against the memory with each
anchor's own slot excluded (= the mining loss with ref_embeddings/ref_labels/ref_self_index), pytorch-metric-
learning 2.9's CrossBatchMemory (TripletMarginLoss, no miner) against ours with BatchAllTripletLoss and with the
PML drop-in, state_dict, errors. (Distributed: the 2-process test in tests/mining/test_mining_distributed.py.)"""

import pytest
import torch

import tripletloss_cuda as tl


def _batches(sizes, dim=6, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def _manual(loss_fn, batches, memory_size, **kw):
    """The losses and gradients of the sequence by hand: a list as the ring, the reference-set loss."""
    results, slot = [], 0
    ring_x = torch.zeros(memory_size, batches[0][0].shape[1], dtype=batches[0][0].dtype)
    ring_y = torch.zeros(memory_size, dtype=torch.int64)
    filled = 0
    for x, y in batches:
        slots = torch.tensor([(slot + i) % memory_size for i in range(x.shape[0])], dtype=torch.int64)
        ring_x[slots], ring_y[slots] = x, y
        slot = (slot + x.shape[0]) % memory_size
        filled = min(memory_size, filled + x.shape[0])
        leaf = x.clone().requires_grad_()
        refs = {"ref_embeddings": ring_x[:filled].clone(), "ref_labels": ring_y[:filled].clone()}
        loss = loss_fn(leaf, y, ref_self_index=slots, **refs, **kw)
        results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
    return results, ring_x, ring_y


MODULES = [
    (tl.BatchHardTripletLoss, tl.batch_hard_triplet_loss, {"margin": 0.5}),
    (tl.BatchHardTripletLoss, tl.batch_hard_triplet_loss, {"soft": True, "chunk_size": 3}),
    (tl.BatchAllTripletLoss, tl.batch_all_triplet_loss, {"margin": 0.5, "reduction": "mean"}),
    (tl.BatchSemiHardTripletLoss, tl.semi_hard_triplet_loss, {"margin": 0.5, "distance": "cosine"}),
]


@pytest.mark.parametrize(("module", "fn", "kw"), MODULES, ids=("hard", "hard-soft-chunked", "all-mean", "semi-cosine"))
def test_equals_the_reference_set_loss(module, fn, kw):
    """Batches of 5, 7, 6, 9 rows into a memory of 16: filling, wrapping in a call, then full."""
    batches = _batches((5, 7, 6, 9))
    expected, ring_x, ring_y = _manual(fn, batches, 16, **kw)
    criterion = tl.CrossBatchMemory(module(**kw), embedding_size=6, memory_size=16)
    for step, ((x, y), (e_loss, e_grad)) in enumerate(zip(batches, expected)):
        leaf = x.clone().requires_grad_()
        loss = criterion(leaf, y)
        (grad,) = torch.autograd.grad(loss, leaf)
        torch.testing.assert_close(loss.detach(), e_loss, rtol=1e-12, atol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(grad, e_grad, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        assert isinstance(criterion.last_stats, tl.MiningStats)
    assert criterion.queue_idx == (5 + 7 + 6 + 9) % 16 and criterion.filled
    torch.testing.assert_close(criterion.embedding_memory, ring_x, rtol=0, atol=0)
    assert torch.equal(criterion.label_memory, ring_y)


def _same_steps(pml, ours, sizes):
    """pml's CrossBatchMemory and ours over batches of these sizes: the same losses, embedding gradients,
    memory, label memory, queue position and filled flag after every step."""
    for step, (x, y) in enumerate(_batches(sizes, seed=3)):
        results = []
        for criterion in (pml, ours):
            leaf = x.clone().requires_grad_()
            loss = criterion(leaf, y)
            results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
        torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-10, msg=f"step {step}")
        torch.testing.assert_close(ours.embedding_memory, pml.embedding_memory, rtol=0, atol=0)
        assert torch.equal(ours.label_memory, pml.label_memory)
        assert ours.queue_idx == pml.queue_idx and ours.filled == pml.has_been_filled


def test_matches_pml_cross_batch_memory():
    """pml's CrossBatchMemory(TripletMarginLoss()) (no miner: all triplets, own slot removed, AvgNonZeroReducer,
    normalized LpDistance) is ours with BatchAllTripletLoss(normalize=True)."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.3), embedding_size=6, memory_size=20)
    ours = tl.CrossBatchMemory(tl.BatchAllTripletLoss(margin=0.3, normalize=True), embedding_size=6, memory_size=20)
    _same_steps(pml, ours, (8, 8, 8, 8, 3))


def _pml_distance(name):
    from pytorch_metric_learning import distances

    return {
        "default": None,
        "lp-unnormalized": distances.LpDistance(normalize_embeddings=False),
        "lp-squared": distances.LpDistance(power=2),
        "cosine": distances.CosineSimilarity(),
    }[name]


DISTANCES, REDUCERS = ("default", "lp-unnormalized", "lp-squared", "cosine"), ("default", "MeanReducer", "SumReducer")
LISTED = ({"margin": 0.2, "smooth_loss": True}, {"margin": -0.05})  # the drop-in's listed-triplets path
# Margins at the scale of the distances, so that the own slot (d(a, p) = 0) would give active triplets.
PML_CASES = [(d, r, {"margin": 3.0 if d == "lp-unnormalized" else 1.0}) for d in DISTANCES for r in REDUCERS]
PML_CASES += [(d, r, o) for d, r in (("default", "default"), ("cosine", "MeanReducer")) for o in LISTED]


@pytest.mark.parametrize(
    ("distance", "reducer", "options"),
    PML_CASES,
    ids=lambda v: "-".join(map(str, v.values())) if isinstance(v, dict) else v,
)
def test_pml_drop_in_matches_pml_cross_batch_memory(distance, reducer, options):
    """The PML drop-in in our CrossBatchMemory is PML 2.9's CrossBatchMemory(TripletMarginLoss(...)) (no miner):
    losses, embedding gradients and the memory, over batches that fill the ring, wrap around within a call and
    after it (8, 8, 8, 8, 3 rows into 20 slots, then 5, 7). smooth_loss and a negative margin take the drop-in's
    listed-triplets path, the others the fused batch-all, both with each anchor's own slot excluded."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning import reducers

    from tripletloss_cuda.integrations import pml as drop_in

    kw = dict(options, distance=_pml_distance(distance))
    make_reducer = None if reducer == "default" else getattr(reducers, reducer)
    pml = pml_losses.CrossBatchMemory(
        pml_losses.TripletMarginLoss(**kw, reducer=make_reducer and make_reducer()), embedding_size=6, memory_size=20
    )
    ours = tl.CrossBatchMemory(
        drop_in.TripletMarginLoss(**kw, reducer=make_reducer and make_reducer()), embedding_size=6, memory_size=20
    )
    _same_steps(pml, ours, (8, 8, 8, 8, 3, 5, 7))
    assert ours.last_stats is None


def test_pml_drop_in_swap_against_brute_force():
    """swap=True in the memory (PML 2.9 indexes its (N, M) matrix with memory rows there, its issue #748): every
    triplet (a, p, n) of the batch against the memory, p not a's own slot, listed by loops, with
    [margin + d(a, p) - min(d(a, n), d(p, n))]+ on normalized rows, averaged over the nonzero ones."""
    from tripletloss_cuda.integrations import pml as drop_in

    ours = tl.CrossBatchMemory(drop_in.TripletMarginLoss(margin=1.0, swap=True), embedding_size=6, memory_size=10)
    ring_x, ring_y, slot, size = torch.zeros(10, 6, dtype=torch.float64), torch.zeros(10, dtype=torch.int64), 0, 0
    for step, (x, y) in enumerate(_batches((4, 5, 4, 6), seed=7)):
        leaf = x.clone().requires_grad_()
        loss = ours(leaf, y)
        slots = [(slot + i) % 10 for i in range(x.shape[0])]
        ring_x[slots], ring_y[slots] = x, y
        slot, size = (slot + x.shape[0]) % 10, min(10, size + x.shape[0])
        oracle_leaf = x.clone().requires_grad_()
        a_rows = torch.nn.functional.normalize(oracle_leaf, dim=1)
        mem = torch.nn.functional.normalize(ring_x[:size], dim=1)
        losses = [
            torch.relu(
                1.0 + (a_rows[a] - mem[p]).norm() - torch.minimum((a_rows[a] - mem[n]).norm(), (mem[p] - mem[n]).norm())
            )
            for a in range(x.shape[0])
            for p in range(size)
            for n in range(size)
            if ring_y[p] == y[a] and p != slots[a] and ring_y[n] != y[a]
        ]
        losses = torch.stack(losses)
        expected = losses.sum() / (losses > 0).sum()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(
            torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(expected, oracle_leaf)[0], rtol=1e-9, atol=1e-12
        )


def test_pml_drop_in_float_labels_and_errors():
    """Float labels are kept as floats in the label memory (as PML does); PML's options we do not reproduce raise."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from tripletloss_cuda.integrations import pml as drop_in

    pml = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.3), embedding_size=6, memory_size=12)
    ours = tl.CrossBatchMemory(drop_in.TripletMarginLoss(margin=0.3), embedding_size=6, memory_size=12)
    for x, y in _batches((7, 7, 7), seed=5):
        y = y.double() / 2
        torch.testing.assert_close(ours(x, y), pml(x, y), rtol=1e-9, atol=1e-10)
    assert ours.label_memory.dtype == torch.float64
    with pytest.raises(NotImplementedError, match="miner is not reproduced"):
        tl.CrossBatchMemory(drop_in.TripletMarginLoss(), 6, miner=object())
    for name in ("indices_tuple", "enqueue_mask"):
        with pytest.raises(NotImplementedError, match=f"{name} is not reproduced"):
            ours(x, y, **{name: torch.zeros(7, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"argument 'labels' \(position 2\) must be Tensor, not list"):
        ours(x, [0] * 7)
    with pytest.raises(ValueError, match="labels \\(N,\\)"):
        ours(x, y[:3])
    with pytest.raises(ValueError, match="embeddings should have 6 columns"):
        ours(x[:, :5], y)


def test_state_dict_and_reset():
    criterion = tl.CrossBatchMemory(tl.BatchHardTripletLoss(), embedding_size=6, memory_size=10)
    for x, y in _batches((4, 4, 4), dtype=torch.float32):
        criterion(x, y)
    restored = tl.CrossBatchMemory(tl.BatchHardTripletLoss(), embedding_size=6, memory_size=10)
    restored.load_state_dict(criterion.state_dict())
    assert (restored.queue_idx, restored.filled) == (2, True)
    torch.testing.assert_close(restored.embedding_memory, criterion.embedding_memory, rtol=0, atol=0)
    x, y = _batches((5,), seed=9, dtype=torch.float32)[0]
    torch.testing.assert_close(restored(x, y), criterion(x, y), rtol=0, atol=0)
    criterion.reset_queue()
    assert criterion.queue_idx == 0 and not criterion.filled and not criterion.embedding_memory.any()
    assert "memory_size=10" in repr(criterion)


def test_first_batch_alone_is_the_batch_against_itself():
    """An empty memory plus one batch holds exactly the batch: the default (self) mining."""
    ((x, y),) = _batches((12,))
    criterion = tl.CrossBatchMemory(tl.BatchSemiHardTripletLoss(), embedding_size=6, memory_size=32)
    torch.testing.assert_close(criterion(x, y), tl.semi_hard_triplet_loss(x, y), rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(TypeError, match="loss should be a tripletloss_cuda mining loss module"):
        tl.CrossBatchMemory(torch.nn.MSELoss(), 6)
    with pytest.raises(ValueError, match="memory_size should be a positive int"):
        tl.CrossBatchMemory(tl.BatchHardTripletLoss(), 6, memory_size=0)
    criterion = tl.CrossBatchMemory(tl.BatchHardTripletLoss(), 6, memory_size=4)
    ((x, y),) = _batches((5,))
    with pytest.raises(ValueError, match="a batch of 5 rows does not fit a memory of 4"):
        criterion(x, y)
    with pytest.raises(ValueError, match="embeddings should have 6 columns"):
        criterion(x[:3, :5], y[:3])
    with pytest.raises(ValueError, match="labels should be a 1D tensor of 3"):
        criterion(x[:3], y[:2])
    with pytest.raises(NotImplementedError, match="enqueue_mask is not reproduced"):
        criterion(x[:3], y[:3], enqueue_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="miner is not reproduced"):
        tl.CrossBatchMemory(tl.BatchHardTripletLoss(), 6, miner=object())
