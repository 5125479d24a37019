"""Values and gradients of the fused kernels against PyTorch and the reference: the correctness matrix
(dtype x p x swap x reduction x shape x layout, pruned), the kinks, gradcheck and gradgradcheck.

Every case here must run the fused kernels (helpers.fused_only): a fallback to the reference fails.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLOAT_DTYPES,
    LAYOUTS,
    LOW_PRECISION,
    REDUCTIONS,
    check_against_pytorch,
    cpu_and_cuda,
    data_scale,
    fused_only,
    ids,
    make_triplet,
    seed_of,
)

import tripletloss_cuda as tl

P_VALUES = (1.0, 2.0, 3.0, 0.5)  # L1 and L2 fast paths, and the general pow path above and below 1
ROW_SHAPES = [(d,) for d in (1, 130)] + [(1, d) for d in (3, 1000)]
BATCH_SHAPES = [(n, d) for n in (1, 7, 128, 1000) for d in (1, 3, 64, 130, 1000) if (n, d) != (1000, 1000)]
SHAPES = ROW_SHAPES + BATCH_SHAPES + [(4, 5, 64)]
# (p, swap, reduction) for the shape axis: each reduction once, both swaps, each fast path and pow.
SHAPE_CONFIGS = [(2.0, False, "none"), (1.0, True, "mean"), (3.0, True, "sum")]


# --- the matrix -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
@pytest.mark.parametrize("p", P_VALUES, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 3), (128, 64)], ids=ids)
def test_dtype_p_swap_reduction(kernel, device, dtype, p, swap, reduction, shape):
    """The full product of the semantic axes at a small and a medium shape."""
    inputs = make_triplet(shape, dtype, device, seed=seed_of(shape, p, swap, reduction), scale=data_scale(dtype, p))
    check_against_pytorch(inputs, dtype, p=p, swap=swap, reduction=reduction)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize(("p", "swap", "reduction"), SHAPE_CONFIGS, ids=lambda v: None)
def test_shapes(kernel, device, dtype, shape, p, swap, reduction):
    """(D,), (1, D), (N, D) for N in {1, 7, 128, 1000} x D in {1, 3, 64, 130, 1000}, and a 3-D input."""
    inputs = make_triplet(shape, dtype, device, seed=len(shape) * 100 + shape[-1])
    check_against_pytorch(inputs, dtype, p=p, swap=swap, reduction=reduction)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize(
    ("dtype", "p", "swap", "reduction"),
    [
        (torch.float32, 2.0, False, "mean"),
        (torch.float32, 1.0, True, "sum"),
        (torch.float32, 3.0, True, "none"),
        (torch.float64, 0.5, True, "none"),
        (torch.float64, 2.0, True, "sum"),
        (torch.float16, 2.0, True, "none"),
        (torch.float16, 1.0, False, "mean"),
        (torch.bfloat16, 2.0, False, "mean"),
        (torch.bfloat16, 0.5, False, "sum"),
    ],
    ids=lambda v: ids(v) if isinstance(v, torch.dtype) else None,
)
def test_large_shape(kernel, device, dtype, p, swap, reduction):
    """N = 1000 x D = 1000: a representative subset (every dtype, p, swap and reduction at least once)."""
    inputs = make_triplet((1000, 1000), dtype, device, seed=7, scale=data_scale(dtype, p))
    check_against_pytorch(inputs, dtype, p=p, swap=swap, reduction=reduction)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
@pytest.mark.parametrize("shape", [(16, 4099), (3, 8192)], ids=ids)
@pytest.mark.parametrize(("p", "swap", "reduction"), SHAPE_CONFIGS, ids=lambda v: None)
def test_long_rows(kernel, device, dtype, shape, p, swap, reduction):
    """Few long rows (on CUDA a whole block per row; an odd D is read element by element, 8192 with 16-byte
    loads)."""
    inputs = make_triplet(shape, dtype, device, seed=shape[-1])
    check_against_pytorch(inputs, dtype, p=p, swap=swap, reduction=reduction)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "contiguous"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
@pytest.mark.parametrize("p", P_VALUES, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize(
    ("shape", "reduction"), [((128, 64), "none"), ((7, 130), "sum"), ((4, 5, 3), "mean")], ids=lambda v: ids(v)
)
def test_layouts(kernel, device, layout, dtype, p, swap, shape, reduction):
    """Strided rows (views of one (N, 3, D) tensor), non-unit-stride columns and a misaligned start (storage
    offset of one element) give the contiguous results."""
    inputs = make_triplet(shape, dtype, device, layout=layout, seed=shape[-1], scale=data_scale(dtype, p))
    if layout == "rows":
        assert inputs[1].data_ptr() - inputs[0].data_ptr() == shape[-1] * inputs[0].element_size()
    elif layout == "transposed":
        assert inputs[0].stride(-1) != 1
    elif layout == "offset":
        assert inputs[0].storage_offset() == 1
    check_against_pytorch(inputs, dtype, p=p, swap=swap, reduction=reduction)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
@pytest.mark.parametrize(("margin", "eps"), [(0.5, 0.0), (2.0, 1e-3), (1e-3, 1e-6)])
def test_margin_and_eps(kernel, device, dtype, margin, eps):
    inputs = make_triplet((64, 17), dtype, device, seed=3)
    for p in (1.0, 2.0, 1.5):
        check_against_pytorch(inputs, dtype, margin=margin, p=p, eps=eps, swap=True, reduction="none")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
def test_broadcast_rows(kernel, device, reduction, dtype):
    """A (1, D) positive against (N, D) anchors and negatives (stride-0 rows after expand)."""
    a, _, n = make_triplet((33, 20), dtype, device, seed=4)
    pos = make_triplet((1, 20), dtype, device, seed=5)[0]
    for swap in (False, True):
        check_against_pytorch((a, pos, n), dtype, swap=swap, reduction=reduction)


def test_reference_matches_pytorch():
    """The oracle itself: tl.reference.triplet_margin_loss is PyTorch's loss (float64, values and grads)."""
    inputs = make_triplet((50, 9), torch.float64, seed=11)
    for p in (*P_VALUES, 1.5, 0.0, -1.0, float("inf")):
        for swap in (False, True):
            for reduction in REDUCTIONS:
                args = (1.0, p, 1e-6, swap, reduction)
                leaves = [x.clone().requires_grad_() for x in inputs]
                expected = F.triplet_margin_loss(*leaves, margin=1.0, p=p, swap=swap, reduction=reduction)
                ref = tl.reference.triplet_margin_loss(*leaves, *args)
                torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)
                if p > 0:
                    g1 = torch.autograd.grad(expected.sum(), leaves)
                    g2 = torch.autograd.grad(ref.sum(), leaves)
                    torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-12)


# --- kinks: PyTorch's conventions where the loss is not differentiable ------------------------------------


def _grads(fn, inputs, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, leaves, torch.ones_like(loss))


def _check_kink(inputs, **kwargs):
    """Values and gradients equal PyTorch's (rtol 1e-12 in float64, 1e-5 in float32); returns ours."""
    expected = _grads(F.triplet_margin_loss, inputs, **kwargs)
    with fused_only():
        actual = _grads(tl.triplet_margin_loss, inputs, **kwargs)
    tol = 1e-12 if inputs[0].dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    for g in actual[1]:
        assert not g.isnan().any()
    return actual


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
@pytest.mark.parametrize("p", (1.0, 1.5, 2.0, 3.0, 0.5), ids=lambda p: f"p{p:g}")
def test_anchor_equals_positive(kernel, device, dtype, p):
    """eps keeps d(a, p) nonzero (eps * D^(1/p)), so d(a, p) still has a gradient."""
    a, _, n = make_triplet((3, 4), dtype, device, seed=12)
    n = a + 0.01 * n  # close: the hinge is active
    _, (_, gp, _) = _check_kink((a, a.clone(), n), p=p, reduction="sum")
    if p == 2.0:  # s = eps * ones(4): ds/dp = -s / ||s|| = -0.5 per component
        torch.testing.assert_close(gp, torch.full_like(gp, -0.5))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
@pytest.mark.parametrize("p", (1.0, 1.5, 2.0, 3.0, 0.5), ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
def test_zero_distance_has_zero_gradient(kernel, device, dtype, p, swap):
    """eps = 0 and anchor == positive: d(a, p) = 0, whose gradient is 0 (no NaN), as in PyTorch."""
    a, _, n = make_triplet((3, 4), dtype, device, seed=13)
    n = a + 0.01 * n  # close: the hinge is active
    _, (_, gp, _) = _check_kink((a, a.clone(), n), p=p, eps=0.0, swap=swap, reduction="sum")
    if not swap:
        assert (gp == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
@pytest.mark.parametrize("p", (1.0, 1.5, 2.0, 3.0), ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_swap_tie_splits_gradient(kernel, device, dtype, p, reduction):
    """swap with d(a, n) == d(p, n) exactly (anchor == positive): minimum() sends half to each branch."""
    a, _, n = make_triplet((5, 6), dtype, device, seed=14)
    n = a + 0.01 * n  # close: the hinge is active
    pos = a.clone()
    assert torch.equal(tl.reference.pairwise_distance(a, n, p, 1e-6), tl.reference.pairwise_distance(pos, n, p, 1e-6))
    _check_kink((a, pos, n), p=p, swap=True, reduction=reduction)


def _zero_hinge_inputs(dtype, device, d):
    """Rows with margin + d(a, p) - d(a, n) == 0 exactly (margin 1, eps 0, distances 1 and 2) and rows with a
    positive and a negative hinge around them."""
    a = torch.zeros(3, d, dtype=dtype, device=device)
    pos = torch.zeros(3, d, dtype=dtype, device=device)
    neg = torch.zeros(3, d, dtype=dtype, device=device)
    pos[:, 0] = 1.0  # d(a, p) = 1
    # d(a, n) = 2, 1.5, 3 (hinge 0, 0.5, -1), and d(p, n) = d(a, n) + 1 does not change that with swap
    neg[:, 0] = torch.tensor([-2.0, -1.5, -3.0], dtype=dtype, device=device)
    return a, pos, neg


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
@pytest.mark.parametrize("p", (1.0, 2.0), ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
def test_zero_hinge_follows_installed_pytorch(kernel, device, dtype, p, swap):
    """At a hinge of exactly 0 the gradient is whatever the installed torch's clamp_min gives (0 since
    mid-2026, the full gradient before); tl.ops.GRAD_AT_ZERO_HINGE records which."""
    inputs = _zero_hinge_inputs(dtype, device, d=4)
    loss = tl.reference.triplet_margin_loss(*inputs, 1.0, p, 0.0, swap, 0)
    assert loss[0].item() == 0.0 and loss[1].item() > 0 and loss[2].item() == 0.0
    _, (ga, _, _) = _check_kink(inputs, p=p, eps=0.0, swap=swap, reduction="none")
    assert bool(ga[0].ne(0).any()) == tl.ops.GRAD_AT_ZERO_HINGE
    assert ga[1].ne(0).any() and not ga[2].ne(0).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("grad_at_zero_hinge", (False, True), ids=("strict", "inclusive"))
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
def test_backward_op_zero_hinge_flag(kernel, device, grad_at_zero_hinge, swap):
    """The backward op's grad_at_zero_hinge selects clamp_min's convention at a hinge of exactly 0: the
    gradient passes where hinge > 0 (torch >= mid-2026) or hinge >= 0 (older releases)."""
    a, pos, neg = _zero_hinge_inputs(torch.float64, device, d=4)
    _, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(a, pos, neg, 1.0, 2.0, 0.0, swap, 0)
    grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=device)
    grads = torch.ops.tripletloss_cuda.triplet_margin_backward(
        grad, a, pos, neg, dist, 1.0, 2.0, 0.0, swap, 0, grad_at_zero_hinge
    )
    leaves = [x.clone().requires_grad_() for x in (a, pos, neg)]
    d_neg = tl.reference.pairwise_distance(leaves[0], leaves[2], 2.0, 0.0)
    if swap:
        d_neg = torch.minimum(d_neg, tl.reference.pairwise_distance(leaves[1], leaves[2], 2.0, 0.0))
    hinge = 1.0 + tl.reference.pairwise_distance(leaves[0], leaves[1], 2.0, 0.0) - d_neg
    active = hinge >= 0 if grad_at_zero_hinge else hinge > 0
    expected = torch.autograd.grad(torch.where(active, hinge, 0.0), leaves, grad)
    torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-12)
    assert bool(grads[0][0].ne(0).any()) == grad_at_zero_hinge


def test_grad_at_zero_hinge_flag_matches_clamp_min():
    x = torch.zeros(2, requires_grad=True)
    (g,) = torch.autograd.grad(torch.clamp_min(x, 0).sum(), x)
    assert tl.ops.GRAD_AT_ZERO_HINGE == bool(g.ne(0).all())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=ids)
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_propagates(kernel, device, dtype, swap, reduction):
    """A NaN in a row makes that row's loss and gradients NaN, as in PyTorch (clamp_min and minimum
    propagate NaN); the other rows are untouched."""
    a, pos, neg = make_triplet((4, 5), dtype, device, seed=15)
    a[1, 2] = float("nan")
    neg[2, 0] = float("nan")
    kwargs = {"swap": swap, "reduction": reduction}
    expected = _grads(F.triplet_margin_loss, (a, pos, neg), **kwargs)
    with fused_only():
        actual = _grads(tl.triplet_margin_loss, (a, pos, neg), **kwargs)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)
    assert actual[0].isnan().any()


# --- gradcheck -------------------------------------------------------------------------------------------


def _gradcheck_inputs(seed):
    return [x.requires_grad_() for x in make_triplet((4, 5), torch.float64, seed=seed)]


@pytest.mark.parametrize("p", (1.0, 1.5, 2.0, 3.0), ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(kernel, p, swap, reduction):
    """First-order gradients of the compiled CPU kernels by finite differences (the reference must not run)."""
    inputs = _gradcheck_inputs(seed=16)

    def fn(a, pos, neg):
        return tl.triplet_margin_loss(a, pos, neg, p=p, swap=swap, reduction=reduction)

    with fused_only():
        assert type(fn(*inputs).grad_fn).__name__ == "TripletMarginLossFunctionBackward"
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("p", (1.0, 1.5, 2.0, 3.0), ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck(kernel, p, swap, reduction):
    """Second-order gradients (the backward differentiates the reference when create_graph=True)."""
    inputs = _gradcheck_inputs(seed=17)

    def fn(a, pos, neg):
        return tl.triplet_margin_loss(a, pos, neg, p=p, swap=swap, reduction=reduction)

    assert type(fn(*inputs).grad_fn).__name__ == "TripletMarginLossFunctionBackward"
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=ids)
def test_low_precision_accumulates_in_float32(kernel, device, dtype):
    """16-bit inputs are accumulated in float32: long rows are far more accurate than PyTorch's 16-bit
    result, which rounds every difference to 16 bits (so the criterion above is not vacuous)."""
    inputs = make_triplet((64, 4096), dtype, device, seed=18)
    ref = tl.reference.triplet_margin_loss(*(x.double() for x in inputs), reduction=0)
    with fused_only():
        ours = tl.triplet_margin_loss(*inputs, reduction="none")
    rel = ((ours.double() - ref).abs() / ref.abs().clamp_min(1)).max().item()
    assert rel <= 2 * torch.finfo(dtype).eps
