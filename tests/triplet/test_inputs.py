"""Inputs at and beyond the edges of the fused path: PyTorch's errors (type and message), warnings, dtypes,
empty and degenerate shapes, broadcasting, and the values of p that go through the reference."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import REDUCTIONS, assert_same_error, cpu_and_cuda, make_triplet

import tripletloss_cuda as tl


def _both(fn):
    """fn(module) for PyTorch's functional and ours."""
    return fn(F), fn(tl)


def _values_and_grads(mod, inputs, **kwargs):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    loss = mod.triplet_margin_loss(*leaves, **kwargs)
    if not loss.requires_grad:
        return loss, None
    grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss), allow_unused=True)
    return loss.detach(), grads


def _assert_same_values_and_grads(inputs, rtol=1e-12, atol=1e-12, **kwargs):
    expected = _values_and_grads(F, inputs, **kwargs)
    actual = _values_and_grads(tl, inputs, **kwargs)
    assert actual[0].shape == expected[0].shape and actual[0].dtype == expected[0].dtype
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    return actual


# --- errors: the same exception type and message as PyTorch ------------------------------------------------


def test_mismatched_ndim():
    a, pos, neg = make_triplet((3, 5))
    error = assert_same_error(
        lambda: tl.triplet_margin_loss(a, pos[0], neg), lambda: F.triplet_margin_loss(a, pos[0], neg)
    )
    assert isinstance(error, RuntimeError) and "anchor 2D, positive 1D, and negative 2D" in str(error)


def test_mismatched_sizes():
    a, pos, neg = make_triplet((3, 5))
    error = assert_same_error(
        lambda: tl.triplet_margin_loss(a, pos[:, :4], neg), lambda: F.triplet_margin_loss(a, pos[:, :4], neg)
    )
    assert isinstance(error, RuntimeError) and "size of tensor a (5) must match the size of tensor b (4)" in str(error)


@pytest.mark.parametrize(
    "devices",
    [
        ("cpu", "meta", "cpu"),
        ("meta", "cpu", "cpu"),
        ("cpu", "cpu", "meta"),
        pytest.param(("cuda", "cpu", "cuda"), marks=pytest.mark.cuda),
    ],
    ids="-".join,
)
def test_inputs_on_different_devices(devices):
    a, pos, neg = (x.to(d) for x, d in zip(make_triplet((3, 5)), devices))
    error = assert_same_error(lambda: tl.triplet_margin_loss(a, pos, neg), lambda: F.triplet_margin_loss(a, pos, neg))
    assert isinstance(error, RuntimeError)


def test_bool_inputs():
    """Bool inputs raise what the installed PyTorch raises (NotImplementedError on 2.14, RuntimeError on 2.11):
    assert_same_error compares type and message with it."""
    a, pos, neg = (x > 0 for x in make_triplet((3, 5)))
    assert_same_error(lambda: tl.triplet_margin_loss(a, pos, neg), lambda: F.triplet_margin_loss(a, pos, neg))


@pytest.mark.parametrize("margin", (0, 0.0, -1.0))
def test_margin_not_positive(margin):
    a, pos, neg = make_triplet((3, 5))
    with pytest.raises(ValueError, match=f"^margin must be greater than 0, got {margin}$"):
        tl.triplet_margin_loss(a, pos, neg, margin=margin)
    assert_same_error(
        lambda: tl.triplet_margin_loss(a, pos, neg, margin=margin),
        lambda: F.triplet_margin_loss(a, pos, neg, margin=margin),
    )


@pytest.mark.parametrize("margin", (0, -0.5))
def test_module_margin_not_positive(margin):
    with pytest.raises(
        ValueError, match=f"^TripletMarginLoss: expected margin to be greater than 0, got {margin} instead$"
    ):
        tl.TripletMarginLoss(margin=margin)
    assert_same_error(lambda: tl.TripletMarginLoss(margin=margin), lambda: torch.nn.TripletMarginLoss(margin=margin))


def test_unknown_reduction():
    a, pos, neg = make_triplet((3, 5))
    with pytest.raises(ValueError, match="^abc is not a valid value for reduction$"):
        tl.triplet_margin_loss(a, pos, neg, reduction="abc")
    assert_same_error(
        lambda: tl.triplet_margin_loss(a, pos, neg, reduction="abc"),
        lambda: F.triplet_margin_loss(a, pos, neg, reduction="abc"),
    )


def test_module_unknown_reduction():
    a, pos, neg = make_triplet((3, 5))
    assert_same_error(
        lambda: tl.TripletMarginLoss(reduction="abc")(a, pos, neg),
        lambda: torch.nn.TripletMarginLoss(reduction="abc")(a, pos, neg),
    )


# --- legacy arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size_average", "reduce"), [(False, None), (True, None), (None, False), (None, True), (False, True), (True, False)]
)
def test_legacy_size_average_and_reduce(size_average, reduce):
    """size_average/reduce map to a reduction with the same warning (type and message) as PyTorch."""
    a, pos, neg = make_triplet((6, 5), torch.float64)
    results, caught = [], []
    for mod in (F, tl):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            results.append(mod.triplet_margin_loss(a, pos, neg, size_average=size_average, reduce=reduce))
        caught.append([(w.category, str(w.message)) for w in record])
    assert caught[1] == caught[0] and caught[0], caught
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("size_average", "reduce"), [(False, None), (None, False)])
def test_module_legacy_size_average_and_reduce(size_average, reduce):
    a, pos, neg = make_triplet((6, 5), torch.float64)
    with pytest.warns(UserWarning) as record_tl:
        ours = tl.TripletMarginLoss(size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning) as record_torch:
        theirs = torch.nn.TripletMarginLoss(size_average=size_average, reduce=reduce)
    assert [str(w.message) for w in record_tl] == [str(w.message) for w in record_torch]
    assert ours.reduction == theirs.reduction
    torch.testing.assert_close(ours(a, pos, neg), theirs(a, pos, neg), rtol=1e-12, atol=1e-12)


# --- dtypes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.int16, torch.int8), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_integer_inputs(device, dtype, reduction):
    """Integer inputs work (through the reference) and give float32 (the `+ eps` promotes), with PyTorch's
    value."""
    a, pos, neg = ((x * 5).to(dtype).to(device) for x in make_triplet((6, 5)))
    ours, theirs = _both(lambda mod: mod.triplet_margin_loss(a, pos, neg, swap=True, reduction=reduction))
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "rows"),
    [
        (torch.uint8, ([1, 2, 3], [3, 0, 5], [0, 0, 0])),  # 1 - 3 = 254 in uint8
        (torch.int8, ([100, 2, 3], [-100, 0, 5], [0, 0, 5])),  # 100 - (-100) = -56 in int8
    ],
    ids=("uint8", "int8"),
)
def test_integer_subtraction_wraps_around_like_pytorch(dtype, rows):
    """PyTorch subtracts integer inputs in their own dtype (wrapping around on overflow) before the `+ eps`
    promotes to float32: the same value, not the exact difference. Integer inputs therefore take the
    reference path (device-independent Python code: CPU only.)"""
    a, pos, neg = (torch.tensor([row], dtype=dtype) for row in rows)
    ours, theirs = _both(lambda mod: mod.triplet_margin_loss(a, pos, neg, reduction="none"))
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mixed_dtypes_promote(device):
    """float16 + float32 + bfloat16 promote to float32 (values and gradients as in PyTorch)."""
    a, pos, neg = make_triplet((6, 5), device=device)
    inputs = (a.half(), pos, neg.bfloat16())
    (loss, grads), (expected_loss, expected_grads) = (_values_and_grads(mod, inputs, swap=True) for mod in (tl, F))
    assert loss.dtype == expected_loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    # Each gradient is computed in float32 and rounded to its input's dtype: one rounding step apart at most.
    for g, expected, tol in zip(grads, expected_grads, (1e-3, 1e-5, 1e-2)):
        assert g.dtype == expected.dtype
        torch.testing.assert_close(g, expected, rtol=tol, atol=tol * expected.abs().max().item())


# --- degenerate shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, reduction):
    """N = 0: mean is nan, sum is 0, none is empty; the gradients are empty."""
    inputs = make_triplet((0, 5), torch.float32, device)
    loss, grads = _assert_same_values_and_grads(inputs, reduction=reduction)
    expected = {"none": torch.empty(0), "mean": torch.tensor(float("nan")), "sum": torch.tensor(0.0)}[reduction]
    torch.testing.assert_close(loss.cpu(), expected, equal_nan=True)
    assert all(g.shape == (0, 5) for g in grads)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_rows(device, reduction):
    """D = 0: every distance is 0, so the loss of each row is the margin."""
    inputs = make_triplet((3, 0), torch.float32, device)
    loss, grads = _assert_same_values_and_grads(inputs, margin=0.25, reduction=reduction)
    expected = {"none": torch.full((3,), 0.25), "mean": torch.tensor(0.25), "sum": torch.tensor(0.75)}[reduction]
    torch.testing.assert_close(loss.cpu(), expected)
    assert all(g.shape == (3, 0) for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_dim_inputs(reduction):
    inputs = make_triplet((), torch.float64)
    loss, _ = _assert_same_values_and_grads(inputs, reduction=reduction, swap=True)
    assert loss.shape == ()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_broadcasting(device, reduction, dtype):
    """(2, 3, 4) vs (1, 3, 4) vs (2, 1, 4): values, gradients (summed over the broadcast dimensions) and the
    (2, 3) shape of reduction='none'."""
    a = make_triplet((2, 3, 4), dtype, device, seed=1)[0]
    pos = make_triplet((1, 3, 4), dtype, device, seed=2)[0]
    neg = make_triplet((2, 1, 4), dtype, device, seed=3)[0]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for swap in (False, True):
        loss, grads = _assert_same_values_and_grads((a, pos, neg), rtol=tol, atol=tol, swap=swap, reduction=reduction)
        assert loss.shape == ((2, 3) if reduction == "none" else ())
        assert [g.shape for g in grads] == [(2, 3, 4), (1, 3, 4), (2, 1, 4)]


# --- p outside the fused kernels: through the reference, PyTorch's results --------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("p", (0.0, -1.0, -0.5, float("inf")), ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_p_outside_fused_range(device, p, swap, reduction):
    """p = 0 (counts nonzeros, no gradient), negative p and p = inf: PyTorch's values and gradients."""
    inputs = make_triplet((7, 5), torch.float64, device, seed=4)
    _assert_same_values_and_grads(inputs, p=p, swap=swap, reduction=reduction)


def test_large_p_overflows_like_pytorch():
    """No max-scaling: |s|^p overflows float32 for large p, as in PyTorch on the CPU (pytorch#184036)."""
    inputs = make_triplet((4, 8), torch.float32, seed=5, scale=10.0)
    ours, theirs = _both(lambda mod: mod.triplet_margin_loss(*inputs, p=40.0, reduction="none"))
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("position,name", [(1, "anchor"), (2, "positive"), (3, "negative")])
def test_non_tensor_input_raises_pytorch_type_error(position, name):
    """A list (or any non-tensor) gives PyTorch's TypeError (not an AttributeError); a bad margin is checked first,
    as torch.nn.functional does."""
    args = [torch.ones(2, 3)] * 3
    args[position - 1] = [[1.0, 2.0, 3.0]] * 2
    message = rf"triplet_margin_loss\(\): argument '{name}' \(position {position}\) must be Tensor, not list"
    for fn in (torch.nn.functional.triplet_margin_loss, tl.triplet_margin_loss):
        with pytest.raises(TypeError, match=message):
            fn(*args)
        with pytest.raises(ValueError, match="margin must be greater than 0"):
            fn(*args, margin=-1.0)
    with pytest.raises(TypeError, match=message):
        tl.TripletMarginLoss()(*args)


@pytest.mark.parametrize("shapes", [((4, 1), (4, 1), (4, 3)), ((4, 1), (4, 3), (4, 1)), ((1, 3), (4, 1), (1, 1))])
def test_broadcast_of_the_last_dimension_pair_by_pair(shapes):
    """PyTorch broadcasts (a, p), (a, n) and (p, n) each on its own: with two inputs 1 wide, d of that pair is over
    one column, not over the third input's width (the fused rows would be; such calls run the reference)."""
    g = torch.Generator().manual_seed(5)
    a, pos, neg = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    for swap in (False, True):
        expected = F.triplet_margin_loss(a, pos, neg, swap=swap, reduction="none")
        torch.testing.assert_close(tl.triplet_margin_loss(a, pos, neg, swap=swap, reduction="none"), expected)
