"""The compiled ops: loading, fake (meta) kernels for torch.compile, and the autograd.Function.

Ops (schemas in csrc/tripletloss.cpp), reduction 0/1/2 = none/mean/sum:
    tripletloss_cuda::triplet_margin_forward(anchor, positive, negative, margin, p, eps, swap, reduction)
        -> (loss, dist)      loss: (N,) or (); dist: (N, 3) distances d(a,p), d(a,n), d(p,n) in float32
                             (float64 for float64 inputs)
    tripletloss_cuda::triplet_margin_backward(grad, anchor, positive, negative, dist, margin, p, eps,
                                              swap, reduction, grad_at_zero_hinge)
        -> (grad_anchor, grad_positive, grad_negative)
Inputs are (N, D) tensors of one floating dtype on one device; rows may be strided (any row stride,
0 included), columns must be unit-stride or they are copied.
"""

import torch

from . import reference

try:
    from . import _C

    EXTENSION_ERROR = None
except ImportError as e:  # not built: everything runs through the reference
    _C = None
    EXTENSION_ERROR = e

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _has_kernel(key):
    name = "tripletloss_cuda::triplet_margin_forward"
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


# Device types with a compiled kernel, fixed at import so that torch.compile sees a constant.
KERNEL_DEVICES = frozenset(t for t, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(key))


def _clamp_min_grad_at_zero():
    """Whether the installed torch passes the gradient of clamp_min(x, 0) at x == 0 (it changed from
    `>=` to `>` in 2026): the fused backward follows the installed PyTorch at an exactly-zero hinge."""
    x = torch.zeros(1, requires_grad=True)
    (g,) = torch.autograd.grad(torch.clamp_min(x, 0).sum(), x)
    return bool(g.item() != 0)


GRAD_AT_ZERO_HINGE = _clamp_min_grad_at_zero()


def _dist_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_like_anchor(name, x, anchor):
    shape, dtype, device = tuple(anchor.shape), anchor.dtype, anchor.device
    torch._check(x.shape == shape, lambda: f"{name} should have the shape of anchor {shape}, got {tuple(x.shape)}")
    torch._check(x.dtype == dtype, lambda: f"{name} should have the dtype of anchor {dtype}, got {x.dtype}")
    torch._check(x.device == device, lambda: f"{name} should be on the device of anchor {device}, got {x.device}")


def _check_op_inputs(anchor, positive, negative):
    # The same messages as csrc/tripletloss.cpp `check_inputs`.
    torch._check(anchor.dim() == 2, lambda: f"anchor should be a 2D tensor, got {anchor.dim()}D")
    for name, x in (("positive", positive), ("negative", negative)):
        _check_like_anchor(name, x, anchor)
    torch._check(anchor.dtype in FLOAT_DTYPES, lambda: f"anchor should be a floating tensor, got {anchor.dtype}")


if _C is not None:

    @torch.library.register_fake("tripletloss_cuda::triplet_margin_forward")
    def _forward_fake(anchor, positive, negative, margin, p, eps, swap, reduction):
        _check_op_inputs(anchor, positive, negative)
        n = anchor.shape[0]
        loss = anchor.new_empty((n,) if reduction == 0 else ())
        dist = anchor.new_empty((n, 3), dtype=_dist_dtype(anchor.dtype))
        return loss, dist

    @torch.library.register_fake("tripletloss_cuda::triplet_margin_backward")
    def _backward_fake(grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, grad_at_zero):
        _check_op_inputs(anchor, positive, negative)
        shape = anchor.shape
        return anchor.new_empty(shape), anchor.new_empty(shape), anchor.new_empty(shape)


class TripletMarginLossFunction(torch.autograd.Function):
    """Fused forward and backward on (N, D) inputs; saves the inputs and the (N, 3) distances only.

    forward(ctx, ...) rather than setup_context: the latter binds the arguments with inspect.signature
    on every call, about 8 us, more than the whole op at small sizes."""

    @staticmethod
    def forward(ctx, anchor, positive, negative, margin, p, eps, swap, reduction):
        loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(
            anchor, positive, negative, margin, p, eps, swap, reduction
        )
        ctx.save_for_backward(anchor, positive, negative, dist)
        ctx.args = (margin, p, eps, swap, reduction)
        return loss

    @staticmethod
    def backward(ctx, grad):
        anchor, positive, negative, dist = ctx.saved_tensors
        margin, p, eps, swap, reduction = ctx.args
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference instead, so that higher orders work.
            inputs = [x for x, need in zip((anchor, positive, negative), ctx.needs_input_grad) if need]
            loss = reference.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, reduction)
            grads = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]),) + (None,) * 5
        ga, gp, gn = torch.ops.tripletloss_cuda.triplet_margin_backward(
            grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, GRAD_AT_ZERO_HINGE
        )
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gp if need[1] else None, gn if need[2] else None) + (None,) * 5


def fused_triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, reduction):
    """The fused op with autograd on (N, D) inputs of one dtype and device (see module docstring)."""
    return TripletMarginLossFunction.apply(anchor, positive, negative, margin, p, eps, swap, reduction)
