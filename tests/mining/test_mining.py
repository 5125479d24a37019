"""Online triplet mining (batch-hard, batch-all, semi-hard): values, gradients and stats against an
independent brute-force oracle over all N^3 triplets (small N, float64), the pure-PyTorch reference path
against the compiled kernels, gradcheck, opcheck, torch.compile, edge cases and errors."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda, ids, seed_of

import tripletloss_cuda as tl
from tripletloss_cuda.mining import ops as mining_ops

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
# (loss function, its keyword variants): soft for batch-hard, the reductions for batch-all
LOSSES = {
    "batch_hard": (tl.batch_hard_triplet_loss, [{"soft": False}, {"soft": True}]),
    "batch_all": (tl.batch_all_triplet_loss, [{"reduction": r} for r in ("mean_nonzero", "mean", "sum")]),
    "semi_hard": (tl.semi_hard_triplet_loss, [{}]),
}
CASES = [(kind, kw) for kind, (_, variants) in LOSSES.items() for kw in variants]


def case_id(case):
    kind, kw = case
    return "-".join([kind, *(f"{k}={v}" for k, v in kw.items())])


# --- the brute-force oracle: every triplet, N^3 memory, float64, distances row by row -----------------------


def brute_distances(x, distance, normalize):
    x = x.double()
    if normalize:
        x = F.normalize(x, dim=1)
    if distance == "cosine":
        return 1 - F.cosine_similarity(x[:, None, :], x[None, :, :], dim=-1)
    d = torch.linalg.vector_norm(x[:, None, :] - x[None, :, :], dim=-1)  # gradient 0 at 0
    return d * d if distance == "squared_euclidean" else d


def brute_loss(x, labels, kind, margin=1.0, distance="euclidean", normalize=False, soft=False, reduction=None):
    """(loss, valid_triplets, active_triplets, active_anchor_fraction) by enumerating all triplets."""
    d = brute_distances(x, distance, normalize)
    n = d.shape[0]
    if n == 0:
        return x.sum() * 0, 0, 0, 0.0
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    neg = ~same
    valid = pos[:, :, None] & neg[:, None, :]  # (i, j, k)
    valid_anchor = valid.flatten(1).any(1)
    hinge = margin + d[:, :, None] - d[:, None, :]
    if kind == "batch_all":
        losses = torch.relu(hinge)[valid]
        active = losses > 0
        active_anchor = ((torch.relu(hinge) > 0) & valid).flatten(1).any(1)
        total = losses.sum()
        denominator = {"mean_nonzero": active.sum(), "mean": valid.sum(), "sum": 1}[reduction]
        loss = total / max(int(denominator), 1)
        n_active = int(active.sum())
    elif kind == "batch_hard":
        hardest_pos = torch.where(pos, d, -torch.inf).max(1).values
        hardest_neg = torch.where(neg, d, torch.inf).min(1).values
        x = (hardest_pos - hardest_neg)[valid_anchor]
        per_anchor = F.softplus(x) if soft else torch.relu(margin + x)
        loss = per_anchor.sum() / max(int(valid_anchor.sum()), 1)
        active_anchor = torch.zeros(n, dtype=torch.bool)
        active_anchor[valid_anchor] = per_anchor > 0
        n_active = int((per_anchor > 0).sum())
    else:  # semi-hard, as TensorFlow Addons: smallest d_ik > d_ij, else the largest d_ik
        outside = valid & (d[:, None, :] > d[:, :, None])
        smallest_outside = torch.where(outside, d[:, None, :], torch.inf).min(2).values
        largest = torch.where(neg, d, -torch.inf).max(1).values[:, None].expand(n, n)
        chosen = torch.where(outside.any(2), smallest_outside, largest)
        pairs = pos & neg.any(1)[:, None]
        per_pair = torch.relu(margin + d - torch.where(pairs, chosen, 0))[pairs]
        loss = per_pair.sum() / max(int(pairs.sum()), 1)
        active_anchor = (torch.relu(margin + d - torch.where(pairs, chosen, 0)) > 0) & pairs
        active_anchor = active_anchor.any(1)
        n_active = int((per_pair > 0).sum())
    fraction = float(active_anchor.sum()) / max(int(valid_anchor.sum()), 1)
    return loss, int(valid.sum()), n_active, fraction


def make_batch(n, classes, dim=8, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), labels.to(device)


def call(kind, x, labels, **kwargs):
    return LOSSES[kind][0](x, labels, **kwargs)


def loss_and_grad(kind, x, labels, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss, stats = call(kind, x, labels, return_stats=True, **kwargs)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, stats


def brute_loss_and_grad(kind, x, labels, **kwargs):
    x = x.detach().double().requires_grad_()
    loss, *counts = brute_loss(x, labels.cpu(), kind, **kwargs)
    (grad,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
    return loss.detach(), grad, counts


# --- values, gradients and stats against the oracle ---------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalized"))
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_against_brute_force(path, device, case, distance, normalize):
    kind, kw = case
    margin = 0.3 if distance == "cosine" or normalize else 1.0
    x, labels = make_batch(20, 4, seed=seed_of(kind, distance, normalize), device=device)
    for dtype in (torch.float64, torch.float32):
        loss, grad, stats = loss_and_grad(
            kind, x.to(dtype), labels, margin=margin, distance=distance, normalize=normalize, **kw
        )
        expected, expected_grad, counts = brute_loss_and_grad(
            kind, x, labels, margin=margin, distance=distance, normalize=normalize, **kw
        )
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert loss.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=tol, atol=tol)
        scale = max(expected_grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=tol * 10, atol=tol * 10 * scale)
        assert [stats.valid_triplets.item(), stats.active_triplets.item()] == counts[:2]
        assert stats.active_anchor_fraction.item() == pytest.approx(counts[2])
        assert stats.valid_triplets.dtype == torch.int64 and stats.active_anchor_fraction.dtype == torch.float32


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=ids)
def test_low_precision(path, case, dtype):
    """16-bit embeddings are accumulated in float32: the loss and gradients are those of the float64 oracle
    on the same rounded inputs, up to the rounding of the 16-bit outputs."""
    kind, kw = case
    x, labels = make_batch(24, 3, seed=7)
    x = x.to(dtype)
    loss, grad, _ = loss_and_grad(kind, x, labels, **kw)
    expected, expected_grad, _ = brute_loss_and_grad(kind, x, labels, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=rtol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=rtol * expected_grad.abs().max().item())


def test_kernel_equals_reference():
    """The compiled kernels and the reference agree on a larger batch with many ties (duplicated rows)."""
    x, labels = make_batch(200, 10, dim=16, seed=3)
    x[100:150] = x[:50]  # exact duplicates: zero distances and ties
    for kind, kw in CASES:
        ours = loss_and_grad(kind, x, labels, **kw)
        with mock.patch.object(mining_ops, "KERNEL_DEVICES", frozenset()):
            ref = loss_and_grad(kind, x, labels, **kw)
        # float32 sums in another order (batch-all's "sum" has gradients in the thousands): atol scaled to them.
        torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6 * max(1.0, ref[1].abs().max().item()))
        assert [s.item() for s in ours[2]] == [s.item() for s in ref[2]]


@pytest.mark.parametrize("label_dtype", (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64), ids=ids)
def test_label_dtypes(label_dtype):
    x, labels = make_batch(16, 3, seed=1)
    for kind, kw in CASES:
        expected = call(kind, x, labels, **kw)
        torch.testing.assert_close(call(kind, x, labels.to(label_dtype), **kw), expected, rtol=0, atol=0)


# --- edge cases ---------------------------------------------------------------------------------------------


def edge_batches():
    x, _ = make_batch(6, 1, seed=5)
    yield "N=1", x[:1], torch.tensor([0])
    yield "N=0", x[:0], torch.zeros(0, dtype=torch.int64)
    yield "one class", x, torch.zeros(6, dtype=torch.int64)
    yield "all own class", x, torch.arange(6)
    yield "all duplicates", x[:1].expand(6, -1).clone(), torch.tensor([0, 0, 0, 1, 1, 1])
    yield "zero embeddings", torch.zeros(6, 8), torch.tensor([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("distance", DISTANCES)
def test_edge_cases_are_finite(path, case, distance):
    """No valid triplet: loss 0 with zero gradients; zero distances: finite gradients (no NaN from sqrt(0)),
    equal to the oracle's."""
    kind, kw = case
    for name, x, labels in edge_batches():
        loss, grad, stats = loss_and_grad(kind, x, labels, distance=distance, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        if stats.valid_triplets == 0:
            assert loss.item() == 0 and not grad.any(), name
        if distance != "cosine" or x.any():  # cosine of zero vectors is defined by the normalization eps
            expected, expected_grad, counts = brute_loss_and_grad(kind, x, labels, distance=distance, **kw)
            torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5, msg=name)
            assert stats.valid_triplets.item() == counts[0], name


@pytest.mark.parametrize("bad", (torch.nan, torch.inf), ids=("nan", "inf"))
def test_non_finite_embeddings_give_nan(path, bad):
    """A NaN would otherwise be skipped by the mining (comparisons with NaN are false): the loss says NaN."""
    x, labels = make_batch(12, 3, seed=14)
    x[5, 2] = bad
    for kind, kw in CASES:
        loss = call(kind, x.requires_grad_(), labels, **kw)
        assert loss.isnan(), (kind, kw)
        loss.backward()  # no error


def test_anchors_without_positive():
    """Singleton classes are anchors of no triplet but are still negatives of the others."""
    x, _ = make_batch(10, 1, seed=2)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 6])
    for kind, kw in CASES:
        loss, grad, stats = loss_and_grad(kind, x, labels, **kw)
        expected, expected_grad, counts = brute_loss_and_grad(kind, x, labels, **kw)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
        assert stats.valid_triplets.item() == counts[0] == 2 * 3 * 7 + 2 * 8


def test_ties_go_to_the_lowest_index():
    """Equal distances: batch-hard and semi-hard pick the lowest index, so only that sample gets a gradient."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1])
    # anchor 0: positives 1 and 2 at distance 1, negatives 3 and 4 at distance 2
    d = torch.zeros(5, 5, requires_grad=True)
    with torch.no_grad():
        d += tl.mining.reference.distance_matrix(x)
    loss, _ = mining_ops.batch_hard(d, labels, 2.0, False)
    (g,) = torch.autograd.grad(loss, d)
    assert g[0, 1] > 0 and g[0, 2] == 0 and g[0, 3] < 0 and g[0, 4] == 0
    loss, _ = mining_ops.semi_hard(d, labels, 2.0)  # both positive pairs of anchor 0 mine negative 3
    (g,) = torch.autograd.grad(loss, d)
    assert g[0, 1] > 0 and g[0, 2] > 0 and g[0, 3] == -2 * g[0, 1] and g[0, 4] == 0


def test_batch_all_reductions_relation():
    x, labels = make_batch(30, 4, seed=11)
    s, stats = tl.batch_all_triplet_loss(x, labels, reduction="sum", return_stats=True)
    mean = tl.batch_all_triplet_loss(x, labels, reduction="mean")
    nonzero = tl.batch_all_triplet_loss(x, labels, reduction="mean_nonzero")
    torch.testing.assert_close(mean, s / stats.valid_triplets)
    torch.testing.assert_close(nonzero, s / stats.active_triplets)


def test_large_batch_memory_is_quadratic():
    """N = 3000: an N^3 intermediate would be 27e9 elements; the losses run in O(N^2) memory."""
    x, labels = make_batch(3000, 100, dim=32, seed=4)
    x.requires_grad_()
    total = sum(call(kind, x, labels, **kw) for kind, kw in CASES)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(x.grad).all()


def test_deterministic_across_threads():
    x, labels = make_batch(300, 7, seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append([loss_and_grad(kind, x, labels, **kw)[:2] for kind, kw in CASES])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# --- gradcheck, opcheck, torch.compile ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(
    ("distance", "normalize"),
    [("euclidean", False), ("squared_euclidean", False), ("cosine", False), ("euclidean", True)],
    ids=("euclidean", "squared_euclidean", "cosine", "normalized"),
)
def test_gradcheck(case, distance, normalize):
    kind, kw = case
    x, labels = make_batch(9, 3, dim=4, dtype=torch.float64, seed=13)
    fn = LOSSES[kind][0]
    margin = 0.3 if normalize else 0.7
    assert torch.autograd.gradcheck(
        lambda e: fn(e, labels, margin=margin, distance=distance, normalize=normalize, **kw), x.requires_grad_()
    )


def test_random_batches_against_brute_force():
    """Many small random batches (N from 2 to 16, 1 to 6 classes) in float64: the kernels' values, gradients
    and stats are the oracle's. (Exact ties, as duplicated rows make, are compared with the reference on the
    same distance matrix in test_kernel_equals_reference: distances computed another way round differently.)"""
    g = torch.Generator().manual_seed(2026)
    for trial in range(30):
        n = int(torch.randint(2, 17, (), generator=g))
        classes = int(torch.randint(1, 7, (), generator=g))
        x, labels = make_batch(n, classes, dim=3, dtype=torch.float64, seed=trial)
        for kind, kw in CASES:
            loss, grad, stats = loss_and_grad(kind, x, labels, margin=0.8, **kw)
            expected, expected_grad, counts = brute_loss_and_grad(kind, x, labels, margin=0.8, **kw)
            msg = f"trial {trial}, {kind} {kw}"
            torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9, msg=msg)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-7, msg=msg)
            assert [stats.valid_triplets.item(), stats.active_triplets.item()] == counts[:2], msg


def test_double_backward_through_the_reference():
    x, labels = make_batch(8, 2, dim=3, dtype=torch.float64, seed=6)
    fn = lambda e: tl.batch_hard_triplet_loss(e, labels, soft=True)
    assert torch.autograd.gradgradcheck(fn, x.requires_grad_())


def op_samples(device):
    """Each op on a square batch (itself, own column excluded) and on queries x references (N != M, some
    anchors with an excluded column, others with -1)."""
    x, labels = make_batch(12, 3, device=device, seed=8)
    r, ref_labels = make_batch(9, 3, device=device, seed=18)
    square = (tl.mining.reference.distance_matrix(x), labels, labels, torch.arange(12, device=device))
    self_index = torch.tensor([3, -1, 0, 8, -1, -1, 2, 5, -1, 1, -1, 7], device=device)
    rect = (tl.mining.reference.distance_matrix(x, ref_embeddings=r), labels, ref_labels, self_index)
    ops = torch.ops.tripletloss_cuda
    for dist, lab, ref_lab, self_idx in (square, rect):
        for dtype in (torch.float32, torch.float64):
            d = dist.to(dtype)
            g = torch.tensor(0.7, device=device, dtype=torch.float64)
            inputs = (d, lab, ref_lab, self_idx)
            for soft in (False, True):
                _, _, mined = ops.batch_hard_forward(*inputs, 0.5, soft)
                yield ops.batch_hard_forward, (*inputs, 0.5, soft)
                yield ops.batch_hard_backward, (g, d, mined, 0.5, soft)
            yield ops.batch_all_forward, (*inputs, 0.5)
            yield ops.batch_all_backward, (g, *inputs, 0.5)
            yield ops.semi_hard_forward, (*inputs, 0.5)
            yield ops.semi_hard_backward, (g, *inputs, 0.5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    if torch.device(device).type not in mining_ops.KERNEL_DEVICES:
        pytest.fail(f"no compiled mining kernel for {device}")
    for op, args in op_samples(device):
        torch.library.opcheck(op, args)


def test_op_errors():
    ops = torch.ops.tripletloss_cuda
    labels, ref_labels, self_index = (
        torch.zeros(4, dtype=torch.int64),
        torch.zeros(3, dtype=torch.int64),
        -torch.ones(4, dtype=torch.int64),
    )
    with pytest.raises(RuntimeError, match="dist should be a 2D tensor"):
        ops.batch_all_forward(torch.zeros(4), labels, ref_labels, self_index, 1.0)
    with pytest.raises(RuntimeError, match=r"ref_labels should have shape \(3,\)"):
        ops.batch_all_forward(torch.zeros(4, 3), labels, labels, self_index, 1.0)
    with pytest.raises(RuntimeError, match="dist should be float32 or float64"):
        ops.batch_hard_forward(torch.zeros(4, 3, dtype=torch.float16), labels, ref_labels, self_index, 1.0, False)
    with pytest.raises(RuntimeError, match="labels should be int64"):
        ops.semi_hard_forward(torch.zeros(4, 3), labels.int(), ref_labels, self_index, 1.0)
    with pytest.raises(RuntimeError, match=r"self_index should have shape \(4,\)"):
        ops.semi_hard_forward(torch.zeros(4, 3), labels, ref_labels, self_index[:3], 1.0)
    with pytest.raises(RuntimeError, match=r"self_index should hold column numbers in \[0, 3\) or -1"):
        ops.batch_hard_forward(torch.zeros(4, 3), labels, ref_labels, self_index + 4, 1.0, False)
    with pytest.raises(RuntimeError, match="mined should be the Long"):
        ops.batch_hard_backward(torch.tensor(1.0), torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int64), 1.0, False)


class _EmbedAndMine(torch.nn.Module):
    """A linear embedding and one mining loss under each distance, weighted 1, 2, 3 so that a term whose
    gradient went missing changes the total."""

    def __init__(self, kind):
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)
        self.kind = kind

    def forward(self, x, labels):
        e = self.linear(x)
        fn = getattr(tl, f"{self.kind}_triplet_loss")
        total = 0
        for weight, (distance, normalize) in enumerate(
            [("euclidean", False), ("cosine", True), ("squared_euclidean", False)], start=1
        ):
            loss, stats = fn(e, labels, margin=0.5, distance=distance, normalize=normalize, return_stats=True)
            total = total + weight * loss + 0 * stats.active_anchor_fraction
        return total


@pytest.mark.parametrize("kind", ["batch_hard", "batch_all", "semi_hard"])
def test_torch_compile_fullgraph(kind):
    """torch.compile(fullgraph=True) of a model using a mining loss: the eager loss and parameter gradients,
    with the mining ops in the graph (a graph break would be an error). On torch 2.11 an in-place distance
    matrix once compiled to the right loss with all-zero gradients: the gradients are compared, and must
    not be zero."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _EmbedAndMine(kind)
    x, labels = torch.randn(32, 16), torch.randint(0, 4, (32,))

    def step(fn):
        model.zero_grad()
        loss = fn(x, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    assert all(g.abs().sum() > 0 for g in eager[1])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# --- API: modules, stats, errors ----------------------------------------------------------------------------


def test_modules_keep_last_stats():
    x, labels = make_batch(16, 3, seed=12)
    modules = [
        (tl.BatchHardTripletLoss(margin=0.5, soft=True), "batch_hard", {"margin": 0.5, "soft": True}),
        (
            tl.BatchAllTripletLoss(reduction="sum", distance="cosine"),
            "batch_all",
            {"reduction": "sum", "distance": "cosine"},
        ),
        (tl.BatchSemiHardTripletLoss(normalize=True), "semi_hard", {"normalize": True}),
    ]
    for module, kind, kw in modules:
        assert module.last_stats is None
        loss = module(x, labels)
        expected, stats = call(kind, x, labels, return_stats=True, **kw)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        assert isinstance(module.last_stats, tl.MiningStats)
        assert [s.item() for s in module.last_stats] == [s.item() for s in stats]
        assert "margin=" in repr(module)


def test_stats_without_sync_are_tensors():
    x, labels = make_batch(10, 2)
    loss, stats = tl.batch_all_triplet_loss(x, labels, return_stats=True)
    assert stats._fields == ("valid_triplets", "active_triplets", "active_anchor_fraction")
    assert all(isinstance(s, torch.Tensor) and s.dim() == 0 for s in stats)
    assert loss.dim() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"distance": "manhattan"}, ValueError, "distance should be one of"),
        ({"margin": -1.0}, ValueError, "margin should be non-negative"),
        ({"reduction": "none"}, ValueError, "reduction should be one of"),
    ],
)
def test_argument_errors(kwargs, error, match):
    x, labels = make_batch(6, 2)
    with pytest.raises(error, match=match):
        tl.batch_all_triplet_loss(x, labels, **kwargs)
    with pytest.raises(error, match=match):
        tl.BatchAllTripletLoss(**kwargs)


def test_input_errors():
    x, labels = make_batch(6, 2)
    for kind, _ in CASES:
        with pytest.raises(ValueError, match="embeddings should be a 2D tensor"):
            call(kind, x[0], labels)
        with pytest.raises(TypeError, match="embeddings should be a floating tensor"):
            call(kind, x.long(), labels)
        with pytest.raises(ValueError, match="labels should be a 1D tensor of 6 elements"):
            call(kind, x, labels[:5])
        with pytest.raises(TypeError, match="labels should be an integer tensor"):
            call(kind, x, labels.float())


def test_distributed_needs_a_process_group():
    x, labels = make_batch(6, 2)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized")
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        tl.batch_hard_triplet_loss(x, labels, distributed=True)


def test_semi_hard_by_hand():
    """Semi-hard on a 1-D batch worked out by hand, for the oracle and the loss."""
    x = torch.tensor([[0.0], [1.0], [3.0], [0.5], [10.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # (d_ij, mined d_ik) per positive pair: the smallest negative distance > d_ij, else the largest
    pairs = [(1, 3), (1, 2), (2.5, 3), (7, 3), (2.5, 0.5), (9.5, 0.5), (7, 9), (9.5, 10)]
    expected = sum(max(1 + dp - dn, 0) for dp, dn in pairs) / len(pairs)
    assert brute_loss(x.double(), labels, "semi_hard")[0].item() == pytest.approx(expected)
    assert tl.semi_hard_triplet_loss(x, labels).item() == pytest.approx(expected)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_equals_cpu(case):
    kind, kw = case
    x, labels = make_batch(300, 12, dim=32, seed=21)
    x[150:200] = x[:50]
    cpu = loss_and_grad(kind, x, labels, **kw)
    cuda = loss_and_grad(kind, x.cuda(), labels.cuda(), **kw)
    torch.testing.assert_close((cuda[0].cpu(), cuda[1].cpu()), cpu[:2], rtol=1e-4, atol=1e-5)
    assert [s.item() for s in cuda[2]] == [s.item() for s in cpu[2]]
    again = loss_and_grad(kind, x.cuda(), labels.cuda(), **kw)
    torch.testing.assert_close(again[:2], cuda[:2], rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_graph_capture():
    """Forward and backward of the three losses captured in one CUDA graph (no host synchronization) and
    replayed on new data give the eager results."""
    x, labels = make_batch(256, 8, dim=32, seed=22, device="cuda")
    static = x.clone().requires_grad_()

    def step():
        total = sum(call(kind, static, labels, **kw) for kind, kw in CASES)
        return total, torch.autograd.grad(total, static)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    new, _ = make_batch(256, 8, dim=32, seed=23, device="cuda")
    with torch.no_grad():
        static.copy_(new)
    graph.replay()
    eager = sum(call(kind, new, labels, **kw) for kind, kw in CASES)
    torch.testing.assert_close(static_loss, eager, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(static_grad).all()


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_fused_distance_matrix_matches_the_reference(distance):
    """distances.matrix (in place, hand-written backward) gives mining_reference.distance_matrix's values
    and gradients, with duplicate rows (exactly 0 apart; gradient 0, not NaN); gradcheck and gradgradcheck."""
    from tripletloss_cuda import distances
    from tripletloss_cuda.mining import reference as mining_reference

    def fused(e, distance, normalize):
        return distances.matrix(distances.rows(e, distance, normalize), None, distance)

    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[7] = x[3]
    g = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for normalize in (False, True):
        results = []
        for fn in (fused, mining_reference.distance_matrix):
            leaf = x.clone().requires_grad_()
            d = fn(leaf, distance, normalize)
            results.append((d, *torch.autograd.grad(d, leaf, g)))
        (ours, ours_grad), (ref, ref_grad) = results
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-10)
        assert not ours_grad.isnan().any()
        assert ours[3, 7] == 0 and ours[7, 3] == 0 and (ours.diagonal() == 0).all()  # exactly
    small = x[:6].clone().requires_grad_()  # distinct rows: the euclidean distance has a kink at 0

    def fn(e):
        return fused(e, distance, False)

    assert torch.autograd.gradcheck(fn, small)
    assert torch.autograd.gradgradcheck(fn, small)
