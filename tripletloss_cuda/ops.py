"""The compiled ops: loading, fake (meta) kernels for torch.compile, and the autograd.Function.

Ops (schemas in csrc/schemas.h), reduction 0/1/2 = none/mean/sum, distance a code of
distances.TRIPLET_CODES (0 pairwise ||x - y + eps||_p; 1 cosine; 2, 3 normalized cosine; p unused by the cosine):
    tripletloss_cuda::triplet_margin_forward(anchor, positive, negative, margin, p, eps, swap, reduction,
                                             distance=0)
        -> (loss, dist)      loss: (N,) or (); dist: (N, 3) distances d(a,p), d(a,n), d(p,n) in float32
                             (float64 for float64 inputs); the cosine's (N, 6) adds |a|, |p|, |n|
    tripletloss_cuda::triplet_margin_backward(grad, anchor, positive, negative, dist, margin, p, eps,
                                              swap, reduction, grad_at_zero_hinge, distance=0)
        -> (grad_anchor, grad_positive, grad_negative)
Inputs are (N, D) tensors of one floating dtype on one device; rows may be strided (any row stride,
0 included), columns must be unit-stride or they are copied.

Both ops have vmap rules (torch.library.register_vmap: the vmapped dimension becomes more rows), used by the
torch.func path (TransformableTripletMarginLossFunction); plain eager calls use TripletMarginLossFunction.
"""

import torch

from . import _library, distances, reference
from ._library import _C

EXTENSION_ERROR = _library.ERROR  # why a built _C did not load (None: loaded, or never built)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OPS = ("triplet_margin_forward", "triplet_margin_backward")

# Device types with a compiled kernel, fixed at import so that torch.compile sees a constant.
KERNEL_DEVICES = _library.kernel_devices(OPS)


def _clamp_min_grad_at_zero():
    """Whether the installed torch passes the gradient of clamp_min(x, 0) at x == 0 (it changed from
    `>=` to `>` in 2026): the fused backward follows the installed PyTorch at an exactly-zero hinge."""
    x = torch.zeros(1, requires_grad=True)
    (g,) = torch.autograd.grad(torch.clamp_min(x, 0).sum(), x)
    return bool(g.item() != 0)


GRAD_AT_ZERO_HINGE = _clamp_min_grad_at_zero()


def _dist_width(distance):
    return 3 if distance == distances.TRIPLET_CODES["pairwise"] else 6


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
    def _forward_fake(anchor, positive, negative, margin, p, eps, swap, reduction, distance=0):
        _check_op_inputs(anchor, positive, negative)
        n = anchor.shape[0]
        loss = anchor.new_empty((n,) if reduction == 0 else ())
        dist = anchor.new_empty((n, _dist_width(distance)), dtype=_dist_dtype(anchor.dtype))
        return loss, dist

    @torch.library.register_fake("tripletloss_cuda::triplet_margin_backward")
    def _backward_fake(
        grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, grad_at_zero, distance=0
    ):
        _check_op_inputs(anchor, positive, negative)
        shape = anchor.shape
        return anchor.new_empty(shape), anchor.new_empty(shape), anchor.new_empty(shape)


def loss_from_dist(dist, margin, swap, reduction):
    """The loss in the dtype of ``dist`` (float32 for 16-bit inputs) from the (..., 3 or 6) distances, as the kernels
    form it: max(d(a,p) - d_neg + margin, 0), d_neg = min(d(a,n), d(p,n)) with swap, NaN propagated; reduced
    over the last batch dimension (mean of no rows is nan, sum 0, as PyTorch gives them)."""
    d_neg = torch.minimum(dist[..., 1], dist[..., 2]) if swap else dist[..., 1]
    loss = torch.clamp_min(margin + dist[..., 0] - d_neg, 0)
    if reduction == 1:
        return loss.mean(-1)
    if reduction == 2:
        return loss.sum(-1)
    return loss


def _backward(ctx, grad, anchor, positive, negative, dist, *args):
    """The gradients of the three inputs (None where not needed), shared by both autograd.Functions; args: the
    backward op's (margin, p, eps, swap, reduction, grad_at_zero_hinge, distance)."""
    need = ctx.needs_input_grad[:3]
    transformed = torch._C._are_functorch_transforms_active()
    if torch.is_grad_enabled() and not transformed:
        # create_graph=True: differentiate the reference instead, so that higher orders work.
        inputs = [x for x, n in zip((anchor, positive, negative), need) if n]
        loss = _reference_loss(*args)(anchor, positive, negative)
        grads = iter(torch.autograd.grad(loss, inputs, grad.to(loss.dtype), create_graph=True))
        return tuple(next(grads) if n else None for n in need)
    if transformed:
        # torch.func.grad always differentiates with create_graph=True: the fused backward, made differentiable.
        ga, gp, gn = TransformableBackwardFunction.apply(grad, anchor, positive, negative, dist, *args)
    else:
        ga, gp, gn = torch.ops.tripletloss_cuda.triplet_margin_backward(grad, anchor, positive, negative, dist, *args)
    return (ga if need[0] else None, gp if need[1] else None, gn if need[2] else None)


class TripletMarginLossFunction(torch.autograd.Function):
    """Fused forward and backward on (N, D) inputs; saves the inputs and the (N, 3) distances only ((N, 6) cosine).

    The op arguments after the inputs: margin, p, eps, swap, reduction, float32_loss, then grad_at_zero_hinge
    (clamp_min's, or False for a relu hinge) and distance (a TRIPLET_CODES code).

    forward(ctx, ...) rather than setup_context: the latter binds the arguments with inspect.signature
    on every call, about 8 us, more than the whole op at small sizes. Under torch.func transforms, which
    require setup_context, TransformableTripletMarginLossFunction runs instead.

    float32_loss (autocast): 16-bit inputs are read as they are, and the loss is formed in float32 from the
    float32 distances, as PyTorch's autocast (which casts the inputs to float32 first) returns it."""

    @staticmethod
    def forward(ctx, anchor, positive, negative, margin, p, eps, swap, reduction, float32_loss, grad_at_zero, distance):
        loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(
            anchor, positive, negative, margin, p, eps, swap, reduction, distance
        )
        ctx.save_for_backward(anchor, positive, negative, dist)
        ctx.args = (margin, p, eps, swap, reduction, grad_at_zero, distance)
        return loss_from_dist(dist, margin, swap, reduction) if float32_loss else loss

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True (or a transform): the general path
            return _backward(ctx, grad, *ctx.saved_tensors, *ctx.args) + (None,) * 8
        # The common case inline: every Python call counts at small sizes.
        ga, gp, gn = torch.ops.tripletloss_cuda.triplet_margin_backward(grad, *ctx.saved_tensors, *ctx.args)
        need = ctx.needs_input_grad
        return (ga if need[0] else None, gp if need[1] else None, gn if need[2] else None) + (None,) * 8


class TransformableTripletMarginLossFunction(torch.autograd.Function):
    """The same op for torch.func transforms (grad, vjp, vmap, jacrev): setup_context (which the transforms
    require), and vmap through the ops' own vmap rules (registered below), so that vmap over the backward
    (jacrev) runs the fused backward too. Forward-mode AD (jvp, jacfwd, hessian) and orders above the first
    differentiate the reference."""

    generate_vmap_rule = True

    @staticmethod
    def forward(anchor, positive, negative, margin, p, eps, swap, reduction, float32_loss, grad_at_zero, distance):
        loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(
            anchor, positive, negative, margin, p, eps, swap, reduction, distance
        )
        return (loss_from_dist(dist, margin, swap, reduction) if float32_loss else loss), dist

    @staticmethod
    def setup_context(ctx, inputs, output):
        anchor, positive, negative, margin, p, eps, swap, reduction, float32_loss, grad_at_zero, distance = inputs
        ctx.save_for_backward(anchor, positive, negative, output[1])
        ctx.save_for_forward(anchor, positive, negative, output[1])
        ctx.args = (margin, p, eps, swap, reduction, grad_at_zero, distance)
        ctx.float32_loss = float32_loss

    @staticmethod
    def backward(ctx, grad, _grad_dist):
        return _backward(ctx, grad, *ctx.saved_tensors, *ctx.args) + (None,) * 8

    @staticmethod
    def jvp(ctx, *tangents):
        # Forward-mode AD (jvp, jacfwd, hessian) through the reference: PyTorch's tangents.
        tangent = _reference_jvp(_reference_loss(*ctx.args), ctx.saved_tensors[:3], tangents[:3])
        # dist (only used by the backward) gets a zero tangent, not None: the vmap rule generated for this jvp
        # needs a tensor, and a tensor tangent needs dist to be a differentiable output (its gradient is ignored).
        return (tangent.float() if ctx.float32_loss else tangent), torch.zeros_like(ctx.saved_tensors[3])


class TransformableBackwardFunction(torch.autograd.Function):
    """The fused backward as a differentiable function for torch.func (grad of grad, jacrev of jacrev): its own
    backward is the vector-Jacobian product of the reference's first-order gradients (and its jvp the reference's
    too), so every higher order is PyTorch's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, grad_at_zero, distance):
        return torch.ops.tripletloss_cuda.triplet_margin_backward(
            grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, grad_at_zero, distance
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.save_for_forward(*inputs[:4])
        ctx.args = inputs[5:]

    @staticmethod
    def backward(ctx, grad_ga, grad_gp, grad_gn):
        first_order = _reference_first_order(*ctx.args)
        _, vjp_fn = torch.func.vjp(first_order, *ctx.saved_tensors)
        return (*vjp_fn((grad_ga, grad_gp, grad_gn)),) + (None,) * 8

    @staticmethod
    def jvp(ctx, *tangents):
        return _reference_jvp(_reference_first_order(*ctx.args), ctx.saved_tensors, tangents[:4])


def _reference_first_order(*args):
    """(grad, anchor, positive, negative) -> the reference's gradients of the three inputs, differentiable."""

    def first_order(grad, anchor, positive, negative):
        loss, vjp_fn = torch.func.vjp(_reference_loss(*args), anchor, positive, negative)
        return vjp_fn(grad.to(loss.dtype))

    return first_order


def _reference_loss(margin, p, eps, swap, reduction, grad_at_zero, distance):
    """The reference of the ops with these arguments: a relu hinge where the backward passes no gradient at an
    exactly-zero hinge (clamp_min in torch since mid-2026 does the same), else clamp_min's (older releases)."""
    relu = not grad_at_zero
    return lambda a, pos, neg: reference.triplet_margin_loss(
        a, pos, neg, margin, p, eps, swap, reduction, distance, relu
    )


def _reference_jvp(fn, primals, tangents):
    """Forward-mode AD through the reference (None tangents are zeros). Dual tensors cannot be made from
    expanded (self-overlapping) tensors, which jacrev's basis vectors and vmap's unbatched operands can be."""
    tangents = tuple(torch.zeros_like(x) if t is None else t.contiguous() for x, t in zip(primals, tangents))
    return torch.func.jvp(fn, tuple(x.contiguous() for x in primals), tangents)[1]


def _batch_first(x, bdim, size):
    """A vmapped operand with the vmapped dimension first: (size, *the example's shape)."""
    return x.movedim(bdim, 0) if bdim is not None else x.expand(size, *x.shape)


def _fold(x):
    """(size, N, ...) as (size * N, ...): the examples' rows one after the other (a copy unless viewable)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


if _C is not None:

    @torch.library.register_vmap("tripletloss_cuda::triplet_margin_forward")
    def _forward_vmap(info, in_dims, anchor, positive, negative, margin, p, eps, swap, reduction, distance=0):
        # The vmapped dimension becomes more rows: one call with reduction 'none', then the loss is formed
        # and reduced per example from the distances in their own (float32 or float64) precision.
        size = info.batch_size
        a, pos, neg = (_batch_first(x, d, size) for x, d in zip((anchor, positive, negative), in_dims))
        n = a.shape[1]
        a, pos, neg = _fold(a), _fold(pos), _fold(neg)
        loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(a, pos, neg, margin, p, eps, swap, 0, distance)
        dist = dist.view(size, n, -1)
        loss = loss.view(size, n) if reduction == 0 else loss_from_dist(dist, margin, swap, reduction).to(a.dtype)
        return (loss, dist), (0, 0)

    @torch.library.register_vmap("tripletloss_cuda::triplet_margin_backward")
    def _backward_vmap(
        info, in_dims, grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, gz, distance=0
    ):
        size = info.batch_size
        tensors = (grad, anchor, positive, negative, dist)
        g, a, pos, neg, dst = (_batch_first(x, d, size) for x, d in zip(tensors, in_dims))
        n = dst.shape[1]
        if reduction != 0:  # one upstream gradient per example: spread it over the example's rows
            g = g.reshape(size, 1).expand(size, n)
            g = g.to(_dist_dtype(g.dtype)) / n if reduction == 1 else g
        g, a, pos, neg, dst = (_fold(x) for x in (g, a, pos, neg, dst))
        args = (margin, p, eps, swap, 0, gz, distance)
        grads = torch.ops.tripletloss_cuda.triplet_margin_backward(g, a, pos, neg, dst, *args)
        return tuple(x.view(size, n, *x.shape[1:]) for x in grads), (0, 0, 0)


_NORMALIZED = distances.TRIPLET_CODES["normalized"]


def fused_triplet_margin_loss(
    anchor,
    positive,
    negative,
    margin,
    p,
    eps,
    swap,
    reduction,
    float32_loss=False,
    distance=0,
    grad_at_zero_hinge=None,
):
    """The fused op with autograd on (N, D) inputs of one dtype and device (see module docstring); with
    ``float32_loss`` (autocast, 16-bit inputs) the loss is float32 and the gradients stay in the inputs' dtype.
    ``distance``: a distances.TRIPLET_CODES code ("normalized" follows the installed torch's clamp_min at a norm
    of exactly eps); ``grad_at_zero_hinge``: None for clamp_min's gradient at an exactly-zero hinge (the
    installed torch's), False for relu's (none)."""
    if grad_at_zero_hinge is None:
        grad_at_zero_hinge = GRAD_AT_ZERO_HINGE
    if distance == _NORMALIZED and GRAD_AT_ZERO_HINGE:
        distance = distances.TRIPLET_CODES["normalized_at_eps"]
    args = (anchor, positive, negative, margin, p, eps, swap, reduction, float32_loss, grad_at_zero_hinge, distance)
    if torch._C._are_functorch_transforms_active():
        return TransformableTripletMarginLossFunction.apply(*args)[0]
    return TripletMarginLossFunction.apply(*args)
