"""Functional API with the exact signatures of torch.nn.functional.triplet_margin_loss and
triplet_margin_with_distance_loss, and the cosine distance function the latter fuses."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import _reduction as _Reduction
from torch.nn.modules import module as _module
from torch.overrides import has_torch_function_variadic

from . import _library, distances, ops, reference
from ._checks import tensor_argument

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def fused_inputs(anchor, positive, negative, p):
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
    fused = fused_inputs(anchor, positive, negative, float(p))
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


def cosine_distance(x1, x2, eps=1e-8):
    """1 - F.cosine_similarity(x1, x2, dim=-1, eps=eps): the cosine distance of the rows (last dimension) of x1
    and x2, broadcast as cosine_similarity broadcasts them. As the ``distance_function`` of
    :func:`triplet_margin_with_distance_loss` it is recognized and fused (so is :class:`CosineDistance`)."""
    return 1 - F.cosine_similarity(x1, x2, dim=-1, eps=eps)


class CosineDistance(nn.CosineSimilarity):
    """1 - nn.CosineSimilarity(dim, eps): the cosine distance, over the last dimension by default (dim=-1; PyTorch's
    CosineSimilarity defaults to dim=1). As a ``distance_function`` over the last dimension it is fused. (Defined
    here, next to the dispatch that recognizes it; tl.CosineDistance and tl.modules.CosineDistance are this class.)"""

    def __init__(self, dim=-1, eps=1e-8):
        super().__init__(dim, eps)

    def forward(self, x1, x2):
        return 1 - super().forward(x1, x2)


_WITH_DISTANCE_REDUCTIONS = ("none", "mean", "sum")  # codes 0, 1, 2


def _is_number(x):
    return type(x) is float or type(x) is int


def _plain_call(module):
    """Whether calling ``module`` runs its class's forward and nothing else: no hooks of its own or global ones
    (nn.Module._call_impl's test) and no forward set on the instance."""
    return not (
        module._backward_hooks
        or module._backward_pre_hooks
        or module._forward_hooks
        or module._forward_pre_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or "forward" in module.__dict__
    )


def _fused_distance(distance_function, ndim):
    """(distance code, p, eps) of a distance function the fused op computes, None for any other: None and
    torch.pairwise_distance (F.pairwise_distance is the same function), an nn.PairwiseDistance with keepdim=False,
    tl.cosine_distance and a tl.CosineDistance over the last dimension (exactly these types, called plainly)."""
    if distance_function is None or distance_function is torch.pairwise_distance:
        return distances.TRIPLET_CODES["pairwise"], 2.0, 1e-6
    if distance_function is cosine_distance:
        return distances.TRIPLET_CODES["cosine"], 2.0, 1e-8
    kind = type(distance_function)
    if kind is nn.PairwiseDistance:
        norm, eps = distance_function.norm, distance_function.eps
        if distance_function.keepdim is not False or not (_is_number(norm) and _is_number(eps)):
            return None
        if not _plain_call(distance_function):
            return None
        return distances.TRIPLET_CODES["pairwise"], float(norm), float(eps)
    if kind is CosineDistance:
        dim, eps = distance_function.dim, distance_function.eps
        if type(dim) is not int or dim not in (-1, ndim - 1) or not _is_number(eps):
            return None
        if not _plain_call(distance_function):
            return None
        return distances.TRIPLET_CODES["cosine"], 2.0, float(eps)
    return None


def triplet_margin_with_distance_loss(
    anchor, positive, negative, *, distance_function=None, margin=1.0, swap=False, reduction="mean"
):
    """Drop-in for torch.nn.functional.triplet_margin_with_distance_loss, fused into one kernel each way for the
    distance functions it recognizes.

    loss_i = max(margin + d(a_i, p_i) - d(a_i, n_i), 0), with ``swap`` d(a_i, n_i) replaced by
    min(d(a_i, n_i), d(p_i, n_i)); ``reduction`` 'none', 'mean' or 'sum'; ``distance_function`` d (default
    torch.pairwise_distance, p = 2, eps = 1e-6).

    Fused: distance_function None, F.pairwise_distance / torch.pairwise_distance, an nn.PairwiseDistance
    (keepdim=False, 0 < p < inf), :func:`cosine_distance` and a :class:`CosineDistance` over the last dimension, on
    float32/float64/float16/bfloat16 inputs (16-bit accumulated in float32) on a device with compiled kernels.
    Everything else (any other callable, other inputs, every error) runs PyTorch's own
    F.triplet_margin_with_distance_loss: the same result or error.
    """
    fused = None
    if (
        reduction in _WITH_DISTANCE_REDUCTIONS
        and _is_number(margin)
        and margin > 0
        and isinstance(anchor, torch.Tensor)
        and isinstance(positive, torch.Tensor)
        and isinstance(negative, torch.Tensor)
        and not has_torch_function_variadic(anchor, positive, negative)
        and anchor.dim() == positive.dim() == negative.dim()
        and not isinstance(swap, torch.Tensor)
    ):
        spec = _fused_distance(distance_function, anchor.dim())
        if spec is not None:
            inputs = fused_inputs(anchor, positive, negative, spec[1])
            if inputs is not None:
                fused = spec, inputs
    if fused is None:
        # PyTorch's checks (reduction, margin, dimensions), in its order, its __torch_function__ handling, its
        # result for any other distance function or input.
        return F.triplet_margin_with_distance_loss(
            anchor,
            positive,
            negative,
            distance_function=distance_function,
            margin=margin,
            swap=swap,
            reduction=reduction,
        )
    (distance, p, eps), ((a, pos, neg), batch, rows_p, _) = fused
    reduction_enum = _WITH_DISTANCE_REDUCTIONS.index(reduction)
    # Autocast: PyTorch's loss is built from the distance function's output, so its dtype is that output's. On
    # CUDA both fused distances come out float32 for 16-bit inputs: cosine_similarity is on autocast's fp32 list
    # and pairwise_distance is at::norm(x1 - x2 + eps, p, dim), whose norm.ScalarOpt_dim overload autocast
    # redispatches with dtype=float32 (fp32_append_dtype; ATen autocast_mode.h AT_FORALL_FP32 and
    # AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE). On the CPU neither is on a list: the loss keeps the 16-bit dtype.
    float32_loss = a.dtype in _LOW_PRECISION and a.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    loss = ops.fused_triplet_margin_loss(
        a,
        pos,
        neg,
        float(margin),
        rows_p if distance == distances.TRIPLET_CODES["pairwise"] else p,
        eps,
        bool(swap),
        reduction_enum,
        float32_loss,
        distance=distance,
    )
    return loss.reshape(batch) if reduction_enum == 0 and batch is not None else loss
