"""Shared test helpers: device parametrization, input makers, tolerances and the 16-bit error criterion.

The oracle is PyTorch itself (``torch.nn.functional.triplet_margin_loss``) and the pure-PyTorch
``tl.reference.triplet_margin_loss``; 16-bit results are judged against a float64 reference computed on
the same (16-bit-rounded) inputs, with PyTorch's own error in the 16-bit dtype as the yardstick (the
flash-attention criterion).
"""

import contextlib
import os
import pathlib
import re
import zlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import tripletloss_cuda as tl

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Whether the package under test is an installed one (`make test WHEEL=...`), not this checkout's.
INSTALLED = not pathlib.Path(tl.__file__).resolve().is_relative_to(ROOT / "tripletloss_cuda")


def child_env(**extra):
    """os.environ for a child Python that imports the same tripletloss_cuda as the tests, wherever it runs:
    this checkout on PYTHONPATH for an in-place build, nothing added for an installed package; and tests/, for a
    test file that runs itself as a script (tests/<family>/test_*.py importing these helpers)."""
    path = [str(ROOT / "tests")] + ([] if INSTALLED else [str(ROOT)])
    pythonpath = os.pathsep.join(filter(None, [*path, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}), **extra)


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")
# Row layouts of the three inputs: how the kernels see their strides and data pointers.
#   contiguous  three separate contiguous tensors
#   rows        row views of one (..., 3, D) tensor: a, p, n = x[..., 0, :], x[..., 1, :], x[..., 2, :]
#   transposed  columns not unit-stride (x.t() of a (D, N) tensor; a step-2 slice for 1-D inputs)
#   offset      a storage offset of one element: every row start is misaligned (the scalar path)
LAYOUTS = ("contiguous", "rows", "transposed", "offset")

# float32/float64: rtol, and atol relative to the conditioning of the computation (see value_scale) or to
# the largest gradient element.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}
# 16-bit: the slack added to 2 x PyTorch's own error, relative to the magnitude of the float64 reference
# (PyTorch can be exact by luck, and the fused kernels round only their outputs).
LOW_PRECISION_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def cpu_and_cuda():
    """Device parametrization as in torchvision's tests: CUDA cases carry the ``cuda`` mark (run them with
    ``pytest -m cuda``) and are skipped where CUDA is not available (tests/conftest.py)."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def ids(value):
    """Short test ids for dtypes (float32) and shapes (7x3); other values get pytest's default ids."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value)) or "scalar"
    return None


def seed_of(*values):
    """A fixed seed derived from a test's parameters (str hashes are salted per process; crc32 is not)."""
    return zlib.crc32(repr(values).encode())


def data_scale(dtype, p):
    """The scale of test data: 1, except 0.01 for p < 1 in float16, where the gradient sgn(s)|s|^(p-1) d^(1-p)
    of unit-scale rows overflows float16 (|s| can be as small as eps when two inputs round alike)."""
    return 0.01 if dtype == torch.float16 and p < 1 else 1.0


def make_triplet(shape, dtype=torch.float32, device="cpu", layout="contiguous", seed=0, scale=1.0):
    """anchor, positive, negative of ``shape`` (batch..., D): standard normal values (times ``scale``)
    drawn in float32 with a fixed seed and rounded to ``dtype``, laid out in memory as ``layout`` says."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return (torch.randn(size, generator=gen) * scale).to(dtype).to(device)

    if layout == "contiguous":
        return tuple(randn(*shape) for _ in range(3))
    *batch, d = shape
    if layout == "rows":
        base = randn(*batch, 3, d)
        return tuple(base.select(-2, i) for i in range(3))
    if layout == "transposed":
        if batch:
            return tuple(randn(*batch[:-1], d, batch[-1]).transpose(-1, -2) for _ in range(3))
        return tuple(randn(2 * d)[::2] for _ in range(3))
    if layout == "offset":
        numel = torch.Size(shape).numel()
        return tuple(randn(numel + 1)[1:].view(shape) for _ in range(3))
    raise ValueError(f"unknown layout {layout}")


def upstream_grad(shape, dtype, device, seed=1234):
    """A fixed random upstream gradient of the loss (shape () for mean/sum), rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def loss_and_grads(fn, inputs, *args, grad_dtype=None, **kwargs):
    """fn(*inputs, ...) and its gradients w.r.t. the three inputs for a fixed upstream gradient. The inputs
    become fresh leaves that share the originals' storage, strides and offsets (so the function sees the
    same layout); ``grad_dtype`` is the dtype the upstream gradient is rounded to (default: the loss's)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    loss = fn(*leaves, *args, **kwargs)
    grad = upstream_grad(loss.shape, grad_dtype or loss.dtype, loss.device).to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, grad)
    return loss.detach(), grads


@contextlib.contextmanager
def fused_only():
    """Fails the test if the call falls back to the reference (the fused kernels must run)."""
    message = "the fused kernels were expected to run, but the call fell back to the reference"
    with mock.patch.object(tl.reference, "triplet_margin_loss", side_effect=AssertionError(message)):
        yield


def value_scale(inputs, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean", distance=0):
    """The conditioning of the loss: margin + d(a,p) + d(a,n) per row (with swap, the larger of d(a,n) and
    d(p,n)), reduced like the loss, in float64; the cosine distance (``distance`` a TRIPLET_CODES code) counts
    as 1 + d, its rounding being relative to the cosine's 1.

    The loss is a difference of distances, so its rounding error is relative to the distances, not to
    the loss: atol = tol * value_scale."""
    a, pos, neg = (x.detach().double() for x in inputs)
    shift = 0.0 if distance == 0 else 1.0
    d_ap = tl.reference.row_distance(a, pos, p, eps, distance) + shift
    d_an = tl.reference.row_distance(a, neg, p, eps, distance) + shift
    if swap:
        d_an = torch.maximum(d_an, tl.reference.row_distance(pos, neg, p, eps, distance) + shift)
    scale = margin + d_ap + d_an
    return {"none": scale, "mean": scale.mean(), "sum": scale.sum()}[reduction]


def assert_close(actual, expected, dtype, scale=None, what="value"):
    """float32/float64 comparison: rtol = tol, atol = tol * scale (default: the largest |expected|)."""
    tol = TOLERANCES[dtype]
    if scale is None:
        scale = expected.detach().abs().max() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=tol,
        atol=tol * float(torch.as_tensor(scale).max().clamp_min(1e-30)),
        msg=lambda m: f"{what}: {m}",
    )


def max_error(x, ref64, finite_only=False):
    """max |x - ref64|; with ``finite_only``, over the elements where x is finite (0 if there are none)."""
    err = (x.detach().double().cpu() - ref64.detach().cpu()).abs()
    if finite_only:
        err = err[torch.isfinite(x.detach().cpu())]
    return err.max().item() if err.numel() else 0.0


def assert_low_precision_close(ours, torch_lowp, ref64, dtype, what="value"):
    """The flash-attention criterion: err(ours vs float64 ref) <= 2 err(PyTorch in ``dtype`` vs float64 ref)
    + atol, with atol relative to the magnitude of the reference. Where PyTorch's 16-bit result is not
    finite (e.g. n^(p-1) underflowing to 0 in its p > 2 backward) its error is taken over the finite
    elements, while ours must be accurate everywhere."""
    assert ours.dtype == torch_lowp.dtype == dtype, (ours.dtype, torch_lowp.dtype, dtype)
    assert ours.shape == ref64.shape, (ours.shape, ref64.shape)
    magnitude = ref64.abs().max().item() if ref64.numel() else 0.0
    assert magnitude < torch.finfo(dtype).max / 2, f"{what}: the test case overflows {dtype} (|ref| = {magnitude})"
    assert torch.isfinite(ref64).all(), f"{what}: the float64 reference is not finite"
    err, err_torch = max_error(ours, ref64), max_error(torch_lowp, ref64, finite_only=True)
    bound = 2 * err_torch + LOW_PRECISION_ATOL[dtype] * max(magnitude, 1e-6)
    assert err <= bound, (
        f"{what}: error {err:.3g} vs the float64 reference exceeds 2 x PyTorch's {dtype} error "
        f"({err_torch:.3g}) + atol (bound {bound:.3g}; |ref| max {magnitude:.3g})"
    )


# Rows whose hinge (or, with swap, whose d(a,n) - d(p,n)) is within KINK_GUARD * value_scale of 0 in float64
# are near a kink: rounding (1e-7 relative in float32 accumulation) decides on which side they fall, so
# their gradients may legitimately differ between implementations. The kinks are tested on their own.
KINK_GUARD = 1e-5


def rows_away_from_kinks(inputs, margin=1.0, p=2.0, eps=1e-6, swap=False):
    """A mask over the rows (the loss shape for reduction 'none'): True where the row is not near a kink."""
    a, pos, neg = (x.detach().double() for x in inputs)
    d_ap = tl.reference.pairwise_distance(a, pos, p, eps)
    d_an = tl.reference.pairwise_distance(a, neg, p, eps)
    cond = value_scale(inputs, margin, p, eps, swap, "none")
    if swap:
        d_pn = tl.reference.pairwise_distance(pos, neg, p, eps)
        away = (d_an - d_pn).abs() >= KINK_GUARD * cond
        d_an = torch.minimum(d_an, d_pn)
    else:
        away = torch.ones_like(d_an, dtype=torch.bool)
    return away & ((margin + d_ap - d_an).abs() >= KINK_GUARD * cond)


def _mask_rows(grads, inputs, away):
    """The gradients with the rows near a kink zeroed (broadcast inputs must have none)."""
    if bool(away.all()):
        return grads
    assert all(x.shape[:-1] == away.shape for x in inputs), "a broadcast input with rows near a kink"
    return [g * away[..., None].to(g.device) for g in grads]


def check_against_pytorch(inputs, dtype, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean"):
    """Values and gradients of tl.triplet_margin_loss (which must take the fused path) against
    F.triplet_margin_loss and tl.reference.triplet_margin_loss; 16-bit dtypes by the flash-attention
    criterion against a float64 reference on the same inputs. Gradients of rows near a kink (see
    KINK_GUARD) are not compared."""
    kwargs = {"margin": margin, "p": p, "eps": eps, "swap": swap, "reduction": reduction}
    torch_loss, torch_grads = loss_and_grads(F.triplet_margin_loss, inputs, **kwargs)
    if dtype in LOW_PRECISION:
        inputs_ref, grad_dtype = [x.double() for x in inputs], dtype  # float64 on the same rounded values
    else:
        inputs_ref, grad_dtype = inputs, None
    args = (margin, p, eps, swap, reduction)
    ref_loss, ref_grads = loss_and_grads(tl.reference.triplet_margin_loss, inputs_ref, *args, grad_dtype=grad_dtype)
    with fused_only():
        loss, grads = loss_and_grads(tl.triplet_margin_loss, inputs, **kwargs)

    assert loss.dtype == torch_loss.dtype and loss.shape == torch_loss.shape, (loss, torch_loss)
    assert all(g.shape == x.shape and g.dtype == x.dtype for g, x in zip(grads, inputs))
    names = ("grad anchor", "grad positive", "grad negative")
    away = rows_away_from_kinks(inputs, margin, p, eps, swap)
    grads, torch_grads, ref_grads = (_mask_rows(g, inputs, away) for g in (grads, torch_grads, ref_grads))
    if dtype in LOW_PRECISION:
        assert_low_precision_close(loss, torch_loss, ref_loss, dtype, "loss")
        for g, g_torch, g_ref, name in zip(grads, torch_grads, ref_grads, names):
            assert_low_precision_close(g, g_torch, g_ref, dtype, name)
        return
    scale = value_scale(inputs, margin, p, eps, swap, reduction)
    for expected, grads_expected, who in ((torch_loss, torch_grads, "PyTorch"), (ref_loss, ref_grads, "reference")):
        assert_close(loss, expected, dtype, scale, f"loss vs {who}")
        # The gradient of the anchor is a difference of two terms as large as the other two gradients.
        grad_scale = max(g.abs().max().item() if g.numel() else 0.0 for g in grads_expected)
        for g, g_expected, name in zip(grads, grads_expected, names):
            assert_close(g, g_expected, dtype, grad_scale, what=f"{name} vs {who}")


def assert_same_error(ours, theirs):
    """``ours()`` raises what ``theirs()`` (PyTorch) raises: the same exception type and message."""
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(expected.type, match=f"^{re.escape(str(expected.value))}$"):
        ours()
    return expected.value
