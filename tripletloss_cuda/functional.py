"""Functional API with the exact signature of torch.nn.functional.triplet_margin_loss."""

import math

import torch
from torch.nn import _reduction as _Reduction

from . import _library, ops, reference
from ._checks import tensor_argument

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _fused_inputs(anchor, positive, negative, p):
    """(rows, batch, p, float32_loss) for the fused op: the three inputs as (N, D) tensors of one floating
    dtype, the batch shape of the per-row loss (None: (N,)), the p to compute with (1 for D = 1, see below) and
    whether the loss is float32 for 16-bit inputs (autocast, see below); None when the inputs are outside the
    fused path (the reference then gives PyTorch's result or raises PyTorch's error).

    Autocast lists triplet_margin_loss as float32 (ATen autocast_mode.h AT_FORALL_FP32, CPU and CUDA alike): it
    casts 16-bit inputs to float32 and returns a float32 loss. The fused kernels read 16-bit inputs as they are
    and accumulate in float32; only the loss is float32 (the gradients come back in the inputs' dtype, as the
    cast's backward gives them).

    D = 1: PyTorch's norm over a dimension of size 1 is |s| for every p (no power, so no overflow of |s|^p), and
    every p's gradient formula reduces to sgn(s); p = 1 computes exactly that."""
    if not (0 < p < math.inf):
        return None
    # The common case first, in as few Python steps as possible: it is most of a small call's cost.
    dtype = getattr(anchor, "dtype", None)
    if (
        dtype in ops.FLOAT_DTYPES
        and anchor.dim() == 2
        and getattr(positive, "dtype", None) is dtype
        and getattr(negative, "dtype", None) is dtype
        and (shape := anchor.shape) == positive.shape == negative.shape
        and shape[1] != 1
        and anchor.device == positive.device == negative.device
        and anchor.device.type in ops.KERNEL_DEVICES
    ):
        float32_loss = dtype in _LOW_PRECISION and torch.is_autocast_enabled(anchor.device.type)
        return (anchor, positive, negative), None, p, float32_loss
    tensors = (anchor, positive, negative)
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return None
    if anchor.dim() == 0 or not (anchor.dim() == positive.dim() == negative.dim()):
        return None
    device = anchor.device
    if device.type not in ops.KERNEL_DEVICES or positive.device != device or negative.device != device:
        return None
    # PyTorch computes x1 - x2 in the inputs' own dtype before adding eps: two integer inputs subtract
    # with wraparound (uint8 and int8 differ), which the float kernels cannot reproduce. Any non-floating
    # input (integer, bool, complex) therefore goes to the reference, which gives PyTorch's result or error.
    if not all(x.dtype.is_floating_point for x in tensors):
        return None
    dtype = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negative.dtype)
    if dtype not in ops.FLOAT_DTYPES:
        return None
    shapes = [x.shape for x in tensors]
    if not shapes[0] == shapes[1] == shapes[2]:
        try:
            shape = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            return None
        # PyTorch broadcasts each pair on its own (pairwise_distance(a, p), (a, n), (p, n)): a pair whose last
        # dimensions are both 1 is 1 wide there, not as wide as the third input. The fused rows are all as wide
        # as the broadcast shape, which is each pair's width only when at most one input is narrower.
        if sum(s[-1] != shape[-1] for s in shapes) > 1:
            return None
        tensors = [x.expand(shape) for x in tensors]  # a view: stride-0 rows need no copy
    d = tensors[0].shape[-1]
    batch = tensors[0].shape[:-1]
    rows = [x.to(dtype).reshape(-1, d) if x.dim() != 2 else x.to(dtype) for x in tensors]
    float32_loss = dtype in _LOW_PRECISION and torch.is_autocast_enabled(device.type)
    return rows, batch, 1.0 if d == 1 else p, float32_loss


def _check_tensor_arguments(anchor, positive, negative):
    """PyTorch's TypeError for a non-tensor input (raised by torch.triplet_margin_loss's argument parser, after
    torch.nn.functional's margin check)."""
    for position, (name, x) in enumerate((("anchor", anchor), ("positive", positive), ("negative", negative)), 1):
        tensor_argument("triplet_margin_loss", name, position, x)


def _autocast_inputs(*tensors):
    """The inputs as autocast's float32 policy passes them to PyTorch's triplet_margin_loss: 16-bit floating
    tensors cast to float32 where autocast is enabled for their device, everything else as it is."""
    return tuple(
        x.float()
        if isinstance(x, torch.Tensor)
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.is_autocast_enabled(x.device.type)
        else x
        for x in tensors
    )


def triplet_margin_loss(
    anchor,
    positive,
    negative,
    margin=1.0,
    p=2,
    eps=1e-6,
    swap=False,
    size_average=None,
    reduce=None,
    reduction="mean",
):
    """Drop-in for torch.nn.functional.triplet_margin_loss, fused into one kernel each way.

    loss_i = max(d(a_i, p_i) - d(a_i, n_i) + margin, 0) with d(x, y) = ||x - y + eps||_p over the last
    dimension; with ``swap``, d(a_i, n_i) is replaced by min(d(a_i, n_i), d(p_i, n_i)). ``reduction`` is
    'none' (loss per row, shape of the inputs without the last dimension), 'mean' or 'sum'.

    Float32/float64/float16/bfloat16 inputs (mixed floating dtypes promoted as PyTorch does; 16-bit
    accumulated in float32) with 0 < p < inf, on CPU or on CUDA where the CUDA kernels are compiled, run
    the fused kernels; everything else (integer inputs, p = 0, negative or infinite p, unsupported
    devices, errors) runs through the PyTorch reference.
    """
    if size_average is not None or reduce is not None:
        reduction_enum = _Reduction.legacy_get_enum(size_average, reduce)
    else:
        reduction_enum = _Reduction.get_enum(reduction)
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")
    fused = _fused_inputs(anchor, positive, negative, float(p))
    if fused is None:
        _library.warn_fallback()
        _check_tensor_arguments(anchor, positive, negative)
        anchor, positive, negative = _autocast_inputs(anchor, positive, negative)
        return reference.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, reduction_enum)
    (a, pos, neg), batch, p, float32_loss = fused
    loss = ops.fused_triplet_margin_loss(
        a, pos, neg, float(margin), p, float(eps), bool(swap), reduction_enum, float32_loss
    )
    return loss.reshape(batch) if reduction_enum == 0 and batch is not None else loss
