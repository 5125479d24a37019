"""tl.triplet_margin_loss_from_indices: the compiled ops against an independent gather + elementwise oracle in
float64 (written here from the definition, not the package's reference), gradcheck, opcheck, torch.compile,
duplicate indices, empty T, reference sets, and every error path."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda, seed_of

import tripletloss_cuda as tl
from tripletloss_cuda.indexed import ops as indexed_ops

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
REDUCTIONS = ("none", "mean", "sum", "mean_nonzero")


def oracle(
    x, a, p, n, ref=None, margin=1.0, distance="euclidean", normalize=False, swap=False, soft=False, reduction="mean"
):
    """Gather the rows, then F-style elementwise math in float64."""
    dtype = x.dtype
    x = x.double()
    r = x if ref is None else ref.double()
    if normalize or distance == "cosine":
        x, r = F.normalize(x, dim=1), F.normalize(r, dim=1)

    def d(u, v):
        if distance == "cosine":
            return 1 - (u * v).sum(1)
        d2 = ((u - v) ** 2).sum(1)
        if distance == "squared_euclidean":
            return d2
        return torch.where(d2 > 0, torch.where(d2 > 0, d2, 1).sqrt(), 0)

    A, P, N = x[a], r[p], r[n]
    d_neg = torch.minimum(d(A, N), d(P, N)) if swap else d(A, N)
    h = margin + d(A, P) - d_neg
    losses = F.softplus(h, threshold=1e9) if soft else F.relu(h)
    if reduction == "none":
        out = losses
    elif reduction == "sum":
        out = losses.sum()
    elif reduction == "mean":
        out = losses.sum() / max(len(losses), 1)
    else:
        out = losses.sum() / (losses > 0).sum().clamp_min(1)
    return out.to(dtype)


def make(n=12, m=None, d=5, t=40, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    ref = None if m is None else torch.randn(m, d, generator=g, dtype=dtype)
    rows = n if m is None else m
    a = torch.randint(0, n, (t,), generator=g)
    p = torch.randint(0, rows, (t,), generator=g)
    q = torch.randint(0, rows, (t,), generator=g)
    move = lambda v: None if v is None else v.to(device)
    return move(x), move(ref), move(a), move(p), move(q)


def grads(fn, x, ref):
    x = x.detach().requires_grad_()
    ref = None if ref is None else ref.detach().requires_grad_()
    loss = fn(x, ref)
    inputs = [x] if ref is None else [x, ref]
    out = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
    return loss.detach(), out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize(
    "distance,normalize,swap,soft,reduction,with_ref",
    [
        c
        for c in itertools.product(DISTANCES, (False, True), (False, True), (False, True), REDUCTIONS, (False, True))
        if not (c[0] == "cosine" and c[1])
    ],
)
def test_matches_oracle(device, distance, normalize, swap, soft, reduction, with_ref):
    x, ref, a, p, n = make(
        m=9 if with_ref else None, seed=seed_of(distance, normalize, swap, soft, reduction), device=device
    )
    kwargs = {
        "margin": 0.7,
        "distance": distance,
        "normalize": normalize,
        "swap": swap,
        "soft": soft,
        "reduction": reduction,
    }
    got = grads(lambda x, r: tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=r, **kwargs), x, ref)
    want = grads(lambda x, r: oracle(x, a, p, n, ref=r, **kwargs), x, ref)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_low_precision_close_to_float64(dtype):
    x, ref, a, p, n = make(m=10, seed=3, dtype=dtype)
    got = grads(lambda x, r: tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=r, swap=True), x, ref)
    want = grads(lambda x, r: oracle(x.double(), a, p, n, ref=r.double(), swap=True), x, ref)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=tol, atol=tol)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol)


def test_duplicate_indices_accumulate_deterministically():
    """One row in many triplets (every role): the gradient is the sum of its contributions, bitwise the same
    across runs and thread counts."""
    x, _, _, _, _ = make(n=6, d=7, seed=5)
    a = torch.tensor([0, 0, 0, 1, 2, 0, 3, 0] * 25)
    p = torch.tensor([1, 1, 2, 0, 0, 3, 0, 4] * 25)
    n = torch.tensor([2, 5, 5, 2, 1, 0, 5, 0] * 25)
    fn = lambda x, r: tl.triplet_margin_loss_from_indices(x, a, p, n, margin=2.0, swap=True, reduction="sum")
    got = grads(fn, x, None)
    torch.testing.assert_close(
        got,
        grads(lambda x, r: oracle(x, a, p, n, margin=2.0, swap=True, reduction="sum"), x, None),
        rtol=1e-10,
        atol=1e-10,
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = grads(fn, x, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[1][0], single[1][0]) and torch.equal(got[0], single[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_triplets(reduction):
    x, ref, _, _, _ = make(m=4)
    e = torch.empty(0, dtype=torch.int64)
    loss, (gx, gr) = grads(
        lambda x, r: tl.triplet_margin_loss_from_indices(x, e, e, e, ref_embeddings=r, reduction=reduction), x, ref
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gr) == 0


def test_int32_indices_and_no_grad_to_ref():
    x, ref, a, p, n = make(m=8)
    want = tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=ref)
    got = tl.triplet_margin_loss_from_indices(x, a.int(), p.int(), n.int(), ref_embeddings=ref)
    assert torch.equal(got, want)
    xg = x.clone().requires_grad_()
    tl.triplet_margin_loss_from_indices(xg, a, p, n, ref_embeddings=ref).backward()  # ref without grad
    assert xg.grad is not None


def test_gradcheck():
    x, ref, a, p, n = make(n=6, m=5, d=3, t=12, seed=7)
    for distance, swap, soft in itertools.product(DISTANCES, (False, True), (False, True)):
        kwargs = {"distance": distance, "swap": swap, "soft": soft, "reduction": "mean_nonzero"}

        def fn(x, r, kwargs=kwargs):
            return tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=r, margin=0.5, **kwargs)

        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), ref.requires_grad_()))
        assert torch.autograd.gradgradcheck(fn, (x, ref))


def op_samples(device):
    x, ref, a, p, n = make(n=7, m=6, d=4, t=15, device=device)
    for r, distance, swap, soft in itertools.product((None, ref), (0, 1, 2), (False, True), (False, True)):
        saved = torch.ops.tripletloss_cuda.indexed_triplet_forward(x, r, a, p, n, distance, 0.5, swap, soft)
        yield torch.ops.tripletloss_cuda.indexed_triplet_forward, (x, r, a, p, n, distance, 0.5, swap, soft)
        w = torch.linspace(-1, 2, a.shape[0], dtype=saved.dtype, device=device)
        csr = indexed_ops.destinations(a, p, n, x.shape[0], 0 if r is None else r.shape[0])
        yield (
            torch.ops.tripletloss_cuda.indexed_triplet_backward,
            (w, x, r, a, p, n, saved, *csr, distance, 0.5, swap, soft),
        )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    if torch.device(device).type not in indexed_ops.KERNEL_DEVICES:
        pytest.fail(f"no compiled indexed kernel for {device}")
    for op, args in op_samples(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(10, 6)
    a, p, n = torch.randint(0, 10, (3, 30))

    def step(fn):
        lin.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [q.grad.clone() for q in lin.parameters()]

    def model(x):
        e = lin(x)
        plain = tl.triplet_margin_loss_from_indices(e, a, p, n, swap=True)
        ref = e[:8] * 2
        return plain + tl.triplet_margin_loss_from_indices(
            e, a, p % 8, n % 8, ref_embeddings=ref, distance="cosine", reduction="mean_nonzero"
        )

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# --- errors ------------------------------------------------------------------------------------------------


def test_non_tensor_arguments():
    x, _, a, p, n = make()
    with pytest.raises(TypeError, match=r"argument 'embeddings' \(position 1\) must be Tensor, not list"):
        tl.triplet_margin_loss_from_indices([[1.0]], a, p, n)
    with pytest.raises(TypeError, match=r"argument 'negatives' \(position 4\) must be Tensor, not list"):
        tl.triplet_margin_loss_from_indices(x, a, p, [0])
    with pytest.raises(TypeError, match=r"argument 'ref_embeddings' \(position 5\) must be Tensor, not int"):
        tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=3)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"a": lambda a: a.float()}, IndexError, "anchors should be an int64 or int32 tensor"),
        ({"p": lambda p: p.bool()}, IndexError, "positives should be an int64 or int32 tensor"),
        ({"n": lambda n: n[:-1]}, ValueError, "negatives should be a 1D tensor of 40 indices"),
        (
            {"a": lambda a: a[None]},
            ValueError,
            r"anchors should be a 1D tensor of indices \(one per triplet\), got shape \(1, 40\)",
        ),
        ({"a": lambda a: torch.where(a == a[3], 12, a)}, IndexError, r"anchors\[\d+\] = 12 is out of range"),
        ({"p": lambda p: p - 20}, IndexError, r"positives\[0\] = -\d+ is out of range for embeddings with 12 rows"),
        ({"n": lambda n: n + 100}, IndexError, "is out of range for embeddings"),
    ],
)
def test_bad_indices(change, error, match):
    x, _, a, p, n = make()
    a, p, n = (change.get(k, lambda v: v)(v) for k, v in zip("apn", (a, p, n)))
    with pytest.raises(error, match=match):
        tl.triplet_margin_loss_from_indices(x, a, p, n)


def test_bad_indices_with_ref_and_ops():
    x, ref, a, p, n = make(m=5)
    p = p.clamp(max=4)
    with pytest.raises(IndexError, match="negatives.* is out of range for ref_embeddings with 5 rows"):
        tl.triplet_margin_loss_from_indices(x, a, p, n + 5, ref_embeddings=ref)
    # The raw op: its C++ checks throw std::out_of_range (IndexError under every torch release) and
    # std::invalid_argument, which torch 2.11-2.14 raise as ValueError and 2.15 as RuntimeError (the stable
    # ABI has no ValueError of its own); the API above checks in Python first, so users get ValueError.
    forward = torch.ops.tripletloss_cuda.indexed_triplet_forward
    with pytest.raises(IndexError, match="anchors should be an int64 tensor"):
        forward(x, ref, a.int(), p, n, 0, 1.0, False, False)
    with pytest.raises((ValueError, RuntimeError), match="positives should be a 1D tensor of 40 indices"):
        forward(x, ref, a, p[:3], n, 0, 1.0, False, False)
    with pytest.raises(IndexError, match=r"negatives\[\d+\] = \d+ is out of range for ref_embeddings with 5 rows"):
        forward(x, ref, a, p, n + 5, 0, 1.0, False, False)
    with pytest.raises(RuntimeError, match="distance should be"):
        forward(x, ref, a, p, n.clamp(max=4), 4, 1.0, False, False)


def test_bad_arguments():
    x, ref, a, p, n = make(m=5)
    with pytest.raises(ValueError, match="distance should be one of"):
        tl.triplet_margin_loss_from_indices(x, a, p, n, distance="l1")
    with pytest.raises(ValueError, match="reduction should be one of"):
        tl.triplet_margin_loss_from_indices(x, a, p, n, reduction="batchmean")
    with pytest.raises(ValueError, match=r"ref_embeddings should be a 2D tensor \(M, 5\)"):
        tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=ref[:, :3])
    with pytest.raises(TypeError, match="ref_embeddings should have the dtype of embeddings"):
        tl.triplet_margin_loss_from_indices(x, a, p, n, ref_embeddings=ref.float())
    with pytest.raises(TypeError, match="embeddings should be a floating tensor"):
        tl.triplet_margin_loss_from_indices(a[:, None], a, p, n)
    with pytest.raises(ValueError, match="embeddings should be a 2D tensor"):
        tl.triplet_margin_loss_from_indices(x[0], a, p, n)


@pytest.mark.cuda
def test_cuda_out_of_range_gives_nan_without_sync():
    """On CUDA an out-of-range triplet reads nothing, gives NaN, and sends no gradient (no host sync)."""
    x, _, a, p, n = make(device="cuda")
    x.requires_grad_()
    bad = n.clone()
    bad[0] = 1000
    losses = tl.triplet_margin_loss_from_indices(x, a, p, bad, reduction="none")
    assert torch.isnan(losses[0]) and torch.isfinite(losses[1:]).all()
    assert torch.isnan(tl.triplet_margin_loss_from_indices(x, a, p, bad))
