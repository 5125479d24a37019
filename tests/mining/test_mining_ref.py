"""Mining against reference sets (ref_embeddings, ref_labels, ref_self_index) and memory-bounded mining
(chunk_size): values, gradients to both sets and stats against an independent brute-force oracle over all
N x M x M triplets (float64, distances row by row), the pure-PyTorch reference, chunked against unchunked,
gradcheck, torch.compile, edge cases and errors. (The changed ops' opcheck: tests/mining/test_mining.py op_samples,
square and rectangular.)"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda, seed_of

import tripletloss_cuda as tl
from tripletloss_cuda import distances
from tripletloss_cuda.mining import ops as mining_ops
from tripletloss_cuda.mining import reference

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
FUNCTIONS = {
    "batch_hard": tl.batch_hard_triplet_loss,
    "batch_all": tl.batch_all_triplet_loss,
    "semi_hard": tl.semi_hard_triplet_loss,
}
CASES = [
    ("batch_hard", {"soft": False}),
    ("batch_hard", {"soft": True}),
    *[("batch_all", {"reduction": r}) for r in ("mean_nonzero", "mean", "sum")],
    ("semi_hard", {}),
]
MODES = ("self", "refs", "refs+self_index")  # the batch against itself; queries x references; with exclusions


def case_id(case):
    kind, kw = case
    return "-".join([kind, *(f"{k}={v}" for k, v in kw.items())])


# --- the brute-force oracle: every triplet (i, j, k) of anchors x references x references, float64 ------------


def brute_distances(x, r, distance, normalize):
    if normalize or distance == "cosine":
        x, r = F.normalize(x, dim=1), F.normalize(r, dim=1)
    if distance == "cosine":
        return 1 - (x[:, None, :] * r[None, :, :]).sum(-1)
    d = torch.linalg.vector_norm(x[:, None, :] - r[None, :, :], dim=-1)
    return d * d if distance == "squared_euclidean" else d


def brute_loss(kind, x, labels, r, ref_labels, excluded, margin=1.0, distance="euclidean", normalize=False, **kw):
    """(loss, valid_triplets, active_triplets, active_anchor_fraction); excluded: (N, M) bool."""
    d = brute_distances(x, r, distance, normalize)
    n, m = d.shape
    same = labels[:, None] == ref_labels[None, :]
    pos, neg = same & ~excluded, ~same & ~excluded
    valid = pos[:, :, None] & neg[:, None, :]
    valid_anchor = valid.flatten(1).any(1) if n and m else torch.zeros(n, dtype=torch.bool)
    hinge = margin + d[:, :, None] - d[:, None, :]
    if kind == "batch_all":
        losses = torch.relu(hinge)[valid]
        active = losses > 0
        active_anchor = ((torch.relu(hinge) > 0) & valid).flatten(1).any(1) if m else valid_anchor
        den = {"mean_nonzero": active.sum(), "mean": valid.sum(), "sum": 1}[kw["reduction"]]
        loss, n_active = losses.sum() / max(int(den), 1), int(active.sum())
    elif kind == "batch_hard":
        hp = torch.where(pos, d, -torch.inf).amax(1) if m else d.new_zeros(n)
        hn = torch.where(neg, d, torch.inf).amin(1) if m else d.new_zeros(n)
        t = (hp - hn)[valid_anchor]
        per = F.softplus(t) if kw["soft"] else torch.relu(margin + t)
        loss = per.sum() / max(int(valid_anchor.sum()), 1)
        active_anchor = torch.zeros(n, dtype=torch.bool)
        active_anchor[valid_anchor] = per > 0
        n_active = int((per > 0).sum())
    else:
        outside = valid & (d[:, None, :] > d[:, :, None])
        smallest = torch.where(outside, d[:, None, :], torch.inf).amin(2) if m else d
        largest = (torch.where(neg, d, -torch.inf).amax(1) if m else d.new_zeros(n))[:, None].expand(n, m)
        chosen = torch.where(outside.any(2), smallest, largest) if m else d
        pairs = pos & neg.any(1, keepdim=True)
        per = torch.relu(margin + d - torch.where(pairs, chosen, 0))
        loss = per[pairs].sum() / max(int(pairs.sum()), 1)
        active_anchor = ((per > 0) & pairs).any(1) if m else valid_anchor
        n_active = int((per[pairs] > 0).sum())
    fraction = float(active_anchor.sum()) / max(int(valid_anchor.sum()), 1)
    return loss, int(valid.sum()), n_active, fraction


def make_sets(n, m, classes, dim=6, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    r = torch.randn(m, dim, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (m,), generator=g)
    return x.to(device, dtype), labels.to(device), r.to(device, dtype), ref_labels.to(device)


def mode_inputs(mode, x, labels, r, ref_labels, seed=0):
    """(keyword arguments of the loss, the oracle's (r, ref_labels, excluded) builder) of a mode."""
    n, m = x.shape[0], r.shape[0]
    if mode == "self":
        return {}, None
    kwargs = {"ref_embeddings": r, "ref_labels": ref_labels}
    if mode == "refs+self_index":
        g = torch.Generator().manual_seed(seed + 1)
        self_index = torch.randint(-1, m, (n,), generator=g).to(x.device)
        kwargs["ref_self_index"] = self_index
    return kwargs, None


def excluded_of(mode, n, m, kwargs):
    if mode == "self":
        return torch.eye(n, dtype=torch.bool)
    if mode == "refs":
        return torch.zeros(n, m, dtype=torch.bool)
    return torch.arange(m)[None, :] == kwargs["ref_self_index"].cpu()[:, None]


def ours(kind, x, labels, kw, **refs):
    """(loss, grad of x, grad of the references or None, stats)."""
    x = x.detach().clone().requires_grad_()
    leaves = [x]
    if "ref_embeddings" in refs:
        refs = dict(refs, ref_embeddings=refs["ref_embeddings"].detach().clone().requires_grad_())
        leaves.append(refs["ref_embeddings"])
    loss, stats = FUNCTIONS[kind](x, labels, return_stats=True, **kw, **refs)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads[0], (grads[1] if len(grads) > 1 else None), stats


def oracle(kind, mode, x, labels, kw, **refs):
    x = x.detach().cpu().double().requires_grad_()
    if mode == "self":
        r, ref_labels = x, labels.cpu()
    else:
        r = refs["ref_embeddings"].detach().cpu().double().requires_grad_()
        ref_labels = refs["ref_labels"].cpu()
    excluded = excluded_of(mode, x.shape[0], r.shape[0], refs)
    loss, *counts = brute_loss(kind, x, labels.cpu(), r, ref_labels, excluded, **kw)
    leaves = [x] if mode == "self" else [x, r]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)]
    else:
        grads = [torch.zeros_like(v) for v in leaves]
    return loss.detach(), grads[0], (grads[1] if len(grads) > 1 else None), counts


def assert_matches(got, expected, rtol, atol, msg):
    loss, gx, gr, stats = got
    e_loss, e_gx, e_gr, counts = expected
    torch.testing.assert_close(loss.double().cpu(), e_loss, rtol=rtol, atol=atol, msg=msg)
    torch.testing.assert_close(gx.double().cpu(), e_gx, rtol=rtol, atol=atol, msg=msg)
    if e_gr is not None:
        torch.testing.assert_close(gr.double().cpu(), e_gr, rtol=rtol, atol=atol, msg=msg)
    assert [stats.valid_triplets.item(), stats.active_triplets.item()] == counts[:2], msg
    assert stats.active_anchor_fraction.item() == pytest.approx(counts[2], abs=1e-6), msg


def assert_close_scaled(got, expected, rel, msg=None):
    """Each tensor within rel of the largest magnitude of its expected value (float summation order)."""
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
            continue
        atol = rel * max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
        torch.testing.assert_close(a, b, rtol=rel, atol=atol, msg=msg)


# --- values, gradients and stats against the oracle -----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize(
    ("distance", "normalize"),
    [("euclidean", False), ("squared_euclidean", False), ("cosine", False), ("euclidean", True)],
    ids=("euclidean", "squared_euclidean", "cosine", "normalized"),
)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", (None, 4), ids=("whole", "chunk4"))
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_against_brute_force(path, device, case, distance, normalize, mode, chunk_size):
    kind, kw = case
    margin = 0.3 if distance == "cosine" or normalize else 1.0
    x, labels, r, ref_labels = make_sets(14, 11, 3, seed=seed_of(kind, distance, mode), device=device)
    refs, _ = mode_inputs(mode, x, labels, r, ref_labels, seed=seed_of(mode))
    kw = dict(kw, margin=margin, distance=distance, normalize=normalize)
    expected = oracle(kind, mode, x, labels, kw, **refs)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in refs.items()}
        got = ours(kind, x.to(dtype), labels, dict(kw, chunk_size=chunk_size), **cast)
        assert_matches(got, expected, tol, tol, f"{dtype} {mode}")


def test_random_sets_against_brute_force():
    """Many small random sets (N, M from 0 to 12, 1 to 5 classes, random exclusions, random chunk sizes)."""
    g = torch.Generator().manual_seed(2027)
    for trial in range(40):
        n, m = (int(v) for v in torch.randint(0, 13, (2,), generator=g))
        classes = int(torch.randint(1, 6, (), generator=g))
        chunk = int(torch.randint(1, 14, (), generator=g))
        x, labels, r, ref_labels = make_sets(n, m, classes, dim=3, seed=trial)
        refs = {"ref_embeddings": r, "ref_labels": ref_labels}
        if trial % 2 and m:
            refs["ref_self_index"] = torch.randint(-1, m, (n,), generator=g)
        mode = "refs+self_index" if "ref_self_index" in refs else "refs"
        for kind, kw in CASES:
            kw = dict(kw, margin=0.8)
            expected = oracle(kind, mode, x, labels, kw, **refs)
            got = ours(kind, x, labels, dict(kw, chunk_size=chunk), **refs)
            assert_matches(got, expected, 1e-8, 1e-8, f"trial {trial} n={n} m={m} chunk={chunk} {kind} {kw}")


# --- chunked against unchunked, and against the pure-PyTorch reference ---------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
def test_chunked_equals_unchunked(case, mode):
    """Every chunk size gives the whole-matrix result up to float summation order, the same stats, and
    bitwise the same result when repeated."""
    kind, kw = case
    x, labels, r, ref_labels = make_sets(90, 70, 8, dim=16, seed=seed_of(kind, mode), dtype=torch.float32)
    refs, _ = mode_inputs(mode, x, labels, r, ref_labels, seed=3)
    whole = ours(kind, x, labels, dict(kw, margin=0.5, chunk_size=10**9), **refs)
    for chunk in (1, 7, 32, 89, None):
        got = ours(kind, x, labels, dict(kw, margin=0.5, chunk_size=chunk), **refs)
        assert_close_scaled(got[:3], whole[:3], 1e-5, msg=f"chunk {chunk}")
        assert [s.item() for s in got[3]] == [s.item() for s in whole[3]], chunk
        again = ours(kind, x, labels, dict(kw, margin=0.5, chunk_size=chunk), **refs)
        torch.testing.assert_close(again[:3], got[:3], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("distance", DISTANCES)
def test_kernels_equal_the_reference(case, distance):
    """The compiled ops on (N, M) matrices against reference.py on the same matrix (exact ties included:
    duplicated rows), through the public function with refs and chunking."""
    kind, kw = case
    x, labels, r, ref_labels = make_sets(40, 30, 5, seed=seed_of(kind, distance), dtype=torch.float32)
    r[5:10] = x[:5]  # duplicates: distance 0 ties
    self_index = torch.full((40,), -1)
    self_index[:5] = torch.arange(5, 10)
    ref_labels[5:10] = labels[:5]
    refs = {"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": self_index}
    d = reference.distance_matrix(x, distance, ref_embeddings=r).requires_grad_()
    extra = {"batch_hard": kw.get("soft"), "batch_all": tl.mining.BATCH_ALL_REDUCTIONS.get(kw.get("reduction"))}.get(
        kind
    )
    args = (d, labels, 0.5) + (() if kind == "semi_hard" else (extra,))
    kernel = getattr(mining_ops, kind)(*args, ref_labels=ref_labels, self_index=self_index)
    expected = getattr(reference, kind)(*args, ref_labels=ref_labels, self_index=self_index)
    torch.testing.assert_close(kernel[0], expected[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(kernel[1], expected[1])
    g_kernel, g_expected = (torch.autograd.grad(v[0], d)[0] for v in (kernel, expected))
    torch.testing.assert_close(g_kernel, g_expected, rtol=1e-5, atol=1e-6)
    # the public function through the kernels and through the reference, whole and chunked
    results = [ours(kind, x, labels, dict(kw, margin=0.5, distance=distance, chunk_size=c), **refs) for c in (None, 6)]
    with mock.patch.object(mining_ops, "KERNEL_DEVICES", frozenset()):
        results += [
            ours(kind, x, labels, dict(kw, margin=0.5, distance=distance, chunk_size=c), **refs) for c in (None, 6)
        ]
    for got in results[1:]:
        assert_close_scaled(got[:3], results[0][:3], 1e-5)
        assert [s.item() for s in got[3]] == [s.item() for s in results[0][3]]


def test_self_index_of_the_batch_itself_equals_no_references():
    """The batch passed as its own reference set with ref_self_index = arange(N) is the default mining."""
    x, labels, _, _ = make_sets(30, 1, 4, seed=5)
    for kind, kw in CASES:
        for chunk in (None, 8):
            leaf = x.clone().requires_grad_()
            default = FUNCTIONS[kind](leaf, labels, chunk_size=chunk, **kw)
            (expected_grad,) = torch.autograd.grad(default, leaf)
            refs = {"ref_embeddings": leaf, "ref_labels": labels, "ref_self_index": torch.arange(30)}
            loss = FUNCTIONS[kind](leaf, labels, chunk_size=chunk, **kw, **refs)
            (grad,) = torch.autograd.grad(loss, leaf)
            torch.testing.assert_close(loss, default, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
            # without ref_self_index every reference of the label is a positive, the anchor itself included
            _, with_self = FUNCTIONS[kind](
                leaf, labels, chunk_size=chunk, ref_embeddings=leaf, ref_labels=labels, return_stats=True, **kw
            )
            _, stats = FUNCTIONS[kind](leaf, labels, chunk_size=chunk, return_stats=True, **kw)
            n_neg = (labels[:, None] != labels[None, :]).sum(1)
            assert with_self.valid_triplets == stats.valid_triplets + n_neg.sum()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
@pytest.mark.parametrize("chunk_size", (None, 5), ids=("whole", "chunk5"))
def test_low_precision(path, dtype, chunk_size):
    """16-bit sets are mined in float32: the float32 result of the rounded inputs; gradients in the dtype."""
    x, labels, r, ref_labels = make_sets(24, 20, 4, seed=7, dtype=dtype)
    refs = {"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": torch.randint(-1, 20, (24,))}
    refs32 = dict(refs, ref_embeddings=r.float())
    for kind, kw in CASES:
        got = ours(kind, x, labels, dict(kw, margin=0.5, chunk_size=chunk_size), **refs)
        expected = ours(kind, x.float(), labels, dict(kw, margin=0.5), **refs32)
        assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
        tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got[0].float(), expected[0], rtol=tol, atol=tol)
        torch.testing.assert_close(got[1].float(), expected[1], rtol=tol, atol=tol)
        torch.testing.assert_close(got[2].float(), expected[2], rtol=tol, atol=tol)


# --- gradcheck, torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk_size", (None, 3), ids=("whole", "chunk3"))
def test_gradcheck(case, distance, chunk_size):
    kind, kw = case
    x, labels, r, ref_labels = make_sets(7, 8, 3, dim=4, seed=seed_of(kind, distance))
    self_index = torch.tensor([2, -1, 0, -1, 7, 5, -1])
    fn = FUNCTIONS[kind]

    def loss(e, ref):
        return fn(e, labels, margin=0.7, distance=distance, chunk_size=chunk_size, ref_embeddings=ref,
                  ref_labels=ref_labels, ref_self_index=self_index, **kw)  # fmt: skip

    assert torch.autograd.gradcheck(loss, (x.requires_grad_(), r.requires_grad_()))
    assert torch.autograd.gradcheck(
        lambda e: fn(e, labels, margin=0.7, distance=distance, chunk_size=chunk_size, **kw), x
    )


def test_double_backward_chunked():
    x, labels, r, ref_labels = make_sets(6, 7, 2, dim=3, seed=6)
    fn = lambda e, ref: tl.batch_hard_triplet_loss(
        e, labels, soft=True, chunk_size=2, ref_embeddings=ref, ref_labels=ref_labels
    )
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), r.requires_grad_()))
    assert torch.autograd.gradgradcheck(lambda e: tl.batch_all_triplet_loss(e, labels, margin=3.0, chunk_size=2), x)


class _QueriesAndBank(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, x, labels, bank, bank_labels, self_index):
        e = self.linear(x)
        refs = {"ref_embeddings": bank, "ref_labels": bank_labels}
        hard = tl.batch_hard_triplet_loss(e, labels, margin=0.5, chunk_size=5, ref_self_index=self_index, **refs)
        every = tl.batch_all_triplet_loss(e, labels, margin=0.5, distance="cosine", **refs)
        semi = tl.semi_hard_triplet_loss(e, labels, margin=0.5, chunk_size=7)
        own = tl.batch_all_triplet_loss(e, labels, margin=0.5, ref_embeddings=e, ref_labels=labels, chunk_size=6)
        return hard + every + semi + own


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _QueriesAndBank()
    x, labels = torch.randn(24, 16), torch.randint(0, 4, (24,))
    bank, bank_labels = torch.randn(40, 8, requires_grad=True), torch.randint(0, 4, (40,))
    self_index = torch.randint(-1, 40, (24,))

    def step(fn):
        model.zero_grad()
        bank.grad = None
        loss = fn(x, labels, bank, bank_labels, self_index)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], bank.grad.clone()

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# --- memory: what chunking holds ----------------------------------------------------------------------------


def test_chunks_never_hold_n_by_m():
    """With a chunk size every distance block is (chunk, M), and the default chunk keeps a block's working
    set under the documented budget (the whole matrix when it fits)."""
    x, labels, r, ref_labels = make_sets(50, 40, 4, seed=9, dtype=torch.float32)
    shapes = []
    block = distances.block

    def spy(xb, y, *args):
        shapes.append((xb.shape[0], y.shape[0]))
        return block(xb, y, *args)

    gram_block = mining_ops.Gram.block

    def gram_spy(self, i0, i1, buffer=None):  # the fused CPU mining's blocks of the matrix product
        out = gram_block(self, i0, i1, buffer)
        shapes.append(tuple(out[0].shape))
        return out

    with mock.patch.object(distances, "block", spy), mock.patch.object(mining_ops.Gram, "block", gram_spy):
        for kind, kw in CASES:
            ours(kind, x, labels, dict(kw, chunk_size=8), ref_embeddings=r, ref_labels=ref_labels)
    assert shapes and all(rows <= 8 and m == 40 for rows, m in shapes)
    entry = mining_ops.BYTES_PER_ENTRY * 4
    for m in (1, 1000, 8192, 65536, 10**6):
        chunk = mining_ops.default_chunk(m, torch.float32)
        assert chunk >= 1 and (chunk == 1 or chunk * m * entry <= mining_ops.MEMORY_BUDGET_BYTES)
    assert mining_ops.default_chunk(8192, torch.float32) == 4096
    with mock.patch.object(mining_ops, "MEMORY_BUDGET_BYTES", 40 * 32 * 10):  # 10 rows of 40: chunked by default
        shapes.clear()
        with mock.patch.object(distances, "block", spy), mock.patch.object(mining_ops, "FUSED", False):
            default = ours("batch_all", x, labels, {}, ref_embeddings=r, ref_labels=ref_labels)
        assert shapes and max(rows for rows, _ in shapes) == 10
    # The fused batch-all keeps its whole (N, M) dL/dgram while 4 bytes an entry fit the budget, else mines in the
    # default blocks (recomputed in the backward).
    with mock.patch.object(mining_ops, "MEMORY_BUDGET_BYTES", 50 * 40 * 4 - 1):
        shapes.clear()
        with mock.patch.object(mining_ops.Gram, "block", gram_spy):
            fused = ours("batch_all", x, labels, {}, ref_embeddings=r, ref_labels=ref_labels)
        assert shapes and max(rows for rows, _ in shapes) == mining_ops.default_chunk(40, torch.float32) < 50
        assert_close_scaled(default[:3], fused[:3], 1e-5)
    whole = ours("batch_all", x, labels, {"chunk_size": 50}, ref_embeddings=r, ref_labels=ref_labels)
    assert_close_scaled(default[:3], whole[:3], 1e-5)


def test_large_queries_against_references():
    """N = 300 queries against M = 3000 references in blocks of 64: finite, and equal to the whole matrix."""
    x, labels, r, ref_labels = make_sets(300, 3000, 50, dim=16, seed=10, dtype=torch.float32)
    for kind, kw in CASES[::2]:
        chunked = ours(kind, x, labels, dict(kw, chunk_size=64), ref_embeddings=r, ref_labels=ref_labels)
        whole = ours(kind, x, labels, kw, ref_embeddings=r, ref_labels=ref_labels)
        assert_close_scaled(chunked[:3], whole[:3], 1e-5)


# --- edge cases ---------------------------------------------------------------------------------------------


def edge_sets():
    x, labels, r, ref_labels = make_sets(6, 5, 2, seed=11)
    yield "no negative", x, torch.zeros(6, dtype=torch.int64), r, torch.zeros(5, dtype=torch.int64), None
    yield "no positive", x, torch.zeros(6, dtype=torch.int64), r, torch.ones(5, dtype=torch.int64), None
    yield (
        "one class, self excluded",
        x,
        torch.zeros(6, dtype=torch.int64),
        x,
        torch.zeros(6, dtype=torch.int64),
        torch.arange(6),
    )
    yield "M=1", x, labels, r[:1], ref_labels[:1], None
    yield "M=1 excluded", x, labels, r[:1], ref_labels[:1], torch.zeros(6, dtype=torch.int64)
    yield "M=0", x, labels, r[:0], ref_labels[:0], None
    yield "N=0", x[:0], labels[:0], r, ref_labels, torch.zeros(0, dtype=torch.int64)
    yield (
        "duplicates",
        x,
        torch.tensor([0, 0, 0, 1, 1, 1]),
        x[[0, 0, 3, 3, 5]].clone(),
        torch.tensor([0, 0, 1, 1, 1]),
        None,
    )
    yield "zero refs", x, labels, torch.zeros(5, 6, dtype=torch.float64), ref_labels, None


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk_size", (None, 2), ids=("whole", "chunk2"))
def test_edge_cases(path, case, distance, chunk_size):
    """No valid triplet: 0 with zero gradients; empty sets; duplicates (distance 0): finite gradients equal
    to the oracle's."""
    kind, kw = case
    for name, x, labels, r, ref_labels, self_index in edge_sets():
        refs = {"ref_embeddings": r, "ref_labels": ref_labels}
        if self_index is not None:
            refs["ref_self_index"] = self_index
        got = ours(kind, x, labels, dict(kw, distance=distance, chunk_size=chunk_size), **refs)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all(), name
        if got[3].valid_triplets == 0:
            assert got[0].item() == 0 and not got[1].any() and not got[2].any(), name
        if distance != "cosine" or r.any():  # cosine of zero vectors is defined by the normalization eps
            mode = "refs+self_index" if self_index is not None else "refs"
            expected = oracle(kind, mode, x, labels, dict(kw, distance=distance), **refs)
            if name in (
                "duplicates",
                "zero refs",
            ):  # tied references: the oracle's amax/amin split the gradient among them
                got, expected = (*got[:2], None, got[3]), (*expected[:2], None, expected[3])
            assert_matches(got, expected, 1e-6, 1e-6, name)


@pytest.mark.parametrize("where", ("embeddings", "references"))
def test_non_finite_gives_nan(path, where):
    x, labels, r, ref_labels = make_sets(10, 12, 3, seed=12)
    (x if where == "embeddings" else r)[3, 1] = torch.nan
    for kind, kw in CASES:
        for chunk in (None, 3):
            loss = FUNCTIONS[kind](x.requires_grad_(), labels, chunk_size=chunk, ref_embeddings=r.requires_grad_(),
                                   ref_labels=ref_labels, **kw)  # fmt: skip
            assert loss.isnan(), (kind, kw, chunk)
            loss.backward()  # no error


def test_ties_go_to_the_lowest_index():
    """Equal distances (exact on this integer grid, whole or chunked): batch-hard and semi-hard mine the
    lowest reference index, so only that reference gets a gradient."""
    x = torch.tensor([[0.0, 0.0]])
    r = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    labels, ref_labels = torch.tensor([0]), torch.tensor([0, 0, 1, 1])
    for chunk in (None, 1):
        for fn in (tl.batch_hard_triplet_loss, tl.semi_hard_triplet_loss):
            leaf = r.clone().requires_grad_()
            loss = fn(x, labels, margin=2.0, ref_embeddings=leaf, ref_labels=ref_labels, chunk_size=chunk)
            (g,) = torch.autograd.grad(loss, leaf)
            assert g[3].abs().sum() == 0 and g[2].abs().sum() > 0, (fn, chunk)
            if fn is tl.batch_hard_triplet_loss:
                assert g[1].abs().sum() == 0 and g[0].abs().sum() > 0


def test_modules_take_references_and_chunk_size():
    x, labels, r, ref_labels = make_sets(16, 12, 3, seed=13, dtype=torch.float32)
    refs = {"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": torch.randint(-1, 12, (16,))}
    for module, kind, kw in (
        (tl.BatchHardTripletLoss(margin=0.5, chunk_size=4), "batch_hard", {"margin": 0.5}),
        (tl.BatchAllTripletLoss(reduction="sum", chunk_size=5), "batch_all", {"reduction": "sum"}),
        (tl.BatchSemiHardTripletLoss(), "semi_hard", {}),
    ):
        loss = module(x, labels, **refs)
        expected, stats = FUNCTIONS[kind](x, labels, return_stats=True, **kw, **refs)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        assert [s.item() for s in module.last_stats] == [s.item() for s in stats]
        assert "chunk_size=" in repr(module)
    with pytest.raises(ValueError, match="chunk_size should be at least 1"):
        tl.BatchAllTripletLoss(chunk_size=0)


# --- errors -------------------------------------------------------------------------------------------------


def test_reference_errors():
    x, labels, r, ref_labels = make_sets(6, 5, 2, seed=14)
    idx = torch.zeros(6, dtype=torch.int64)
    cases = [
        ({"ref_labels": ref_labels}, ValueError, "ref_labels needs ref_embeddings"),
        ({"ref_self_index": idx}, ValueError, "ref_self_index needs ref_embeddings"),
        ({"ref_embeddings": r}, TypeError, "ref_embeddings needs ref_labels"),
        ({"ref_embeddings": r[:, :3], "ref_labels": ref_labels}, ValueError, r"ref_embeddings should be a 2D tensor \(M, 6\)"),
        ({"ref_embeddings": r[0], "ref_labels": ref_labels}, ValueError, "ref_embeddings should be a 2D tensor"),
        ({"ref_embeddings": r.float(), "ref_labels": ref_labels}, TypeError, "ref_embeddings should have the dtype"),
        ({"ref_embeddings": r, "ref_labels": ref_labels[:4]}, ValueError, "ref_labels should be a 1D tensor of 5"),
        ({"ref_embeddings": r, "ref_labels": ref_labels.float()}, TypeError, "ref_labels should be an integer tensor"),
        ({"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": idx.int()}, TypeError, "ref_self_index should be int64"),
        ({"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": idx[:5]}, ValueError, "ref_self_index should be a 1D tensor of 6"),
        ({"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": idx + 5}, ValueError, r"in \[0, 5\) or -1, got values in \[5, 5\]"),
        ({"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": idx - 2}, ValueError, r"or -1, got values in \[-2, -2\]"),
        ({"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": [0] * 6}, TypeError, "ref_self_index should be a tensor"),
        ({"chunk_size": 0}, ValueError, "chunk_size should be at least 1"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size should be None or an int"),
        ({"chunk_size": True}, TypeError, "chunk_size should be None or an int"),
    ]  # fmt: skip
    for kwargs, error, match in cases:
        for fn in FUNCTIONS.values():
            with pytest.raises(error, match=match):
                fn(x, labels, **kwargs)


@pytest.mark.cuda
def test_cuda_equals_cpu_with_references():
    x, labels, r, ref_labels = make_sets(200, 300, 10, dim=32, seed=21, dtype=torch.float32)
    refs = {"ref_embeddings": r, "ref_labels": ref_labels, "ref_self_index": torch.randint(-1, 300, (200,))}
    cuda_refs = {k: v.cuda() for k, v in refs.items()}
    for kind, kw in CASES:
        for chunk in (None, 33):
            cpu = ours(kind, x, labels, dict(kw, chunk_size=chunk), **refs)
            cuda = ours(kind, x.cuda(), labels.cuda(), dict(kw, chunk_size=chunk), **cuda_refs)
            torch.testing.assert_close([t.cpu() for t in cuda[:3]], list(cpu[:3]), rtol=1e-4, atol=1e-5)
            assert [s.item() for s in cuda[3]] == [s.item() for s in cpu[3]]


@pytest.mark.parametrize("distance", DISTANCES)
def test_distances_between_two_sets(distance):
    """The whole-matrix distances (distances.matrix, hand-written backward) and a block of them
    (distances.block / block_grad) against reference.distance_matrix with ref_embeddings, values and gradients
    to both sets, a reference row equal to a query (exactly 0 apart; gradient 0, not NaN); gradcheck and
    gradgradcheck of the whole-matrix one."""
    x, _, r, _ = make_sets(12, 9, 1, dim=5, seed=15)
    r[4] = x[2]
    g = torch.randn(12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    leaves = [x.clone().requires_grad_(), r.clone().requires_grad_()]
    expected = reference.distance_matrix(leaves[0], distance, ref_embeddings=leaves[1])
    expected_grads = torch.autograd.grad(expected, leaves, g, retain_graph=True)

    def whole(a, b):
        return distances.matrix(distances.rows(a, distance), distances.rows(b, distance), distance)

    d = whole(*leaves)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    assert d[2, 4] == 0
    grads = torch.autograd.grad(d, leaves, g)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-10, atol=1e-10)
    xn, rn = (distances.rows(t, distance) for t in (x, r))
    sq = [distances.squared_norms(t, distance) for t in (xn, rn)]
    keys = [distances.row_keys(t) for t in (xn, rn)]
    sq_b = None if sq[0] is None else sq[0][3:8]
    block = distances.block(xn[3:8], rn, sq_b, sq[1], keys[0][3:8], keys[1], distance)
    torch.testing.assert_close(block, expected[3:8].detach(), rtol=1e-12, atol=1e-12)
    if distance != "cosine":  # (cosine's block gradients are of the normalized rows)
        gx, gy = distances.block_grad(g[3:8], block, xn[3:8], rn, distance)
        (ex, ey) = torch.autograd.grad(expected[3:8], leaves, g[3:8], retain_graph=True)
        torch.testing.assert_close(gx, ex[3:8], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gy, ey, rtol=1e-10, atol=1e-10)
        assert not gx.isnan().any() and not gy.isnan().any()
    small = (x[:4].clone().requires_grad_(), r[5:8].clone().requires_grad_())  # distinct rows
    assert torch.autograd.gradcheck(whole, small)
    assert torch.autograd.gradgradcheck(whole, small)
