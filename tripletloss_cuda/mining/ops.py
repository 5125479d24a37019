"""The compiled mining ops: fake (meta) kernels for torch.compile, the autograd.Function, and the fallback
to the pure-PyTorch reference where no kernel is compiled for the device.

Ops (schemas in csrc/mining.cpp), on an (N, N) float32/float64 distance matrix ``dist`` and (N,) int64
``labels``; ``stats`` is the int64 (5,) vector of reference.STATS_FIELDS:
    batch_hard_forward(dist, labels, margin, soft) -> (loss, stats, mined)
        mined: (N, 2) int64, the hardest positive and negative of each anchor (-1 where the anchor has none)
    batch_hard_backward(grad, dist, labels, stats, mined, margin, soft) -> grad_dist
    batch_all_forward(dist, labels, margin, reduction) -> (loss, stats)      reduction 0/1/2 =
    batch_all_backward(grad, dist, labels, stats, margin, reduction) -> grad_dist   mean_nonzero/mean/sum
    semi_hard_forward(dist, labels, margin) -> (loss, stats, mined)
        mined: (N, N) int32, the negative mined for each positive pair (i, j) (-1 elsewhere)
    semi_hard_backward(grad, dist, labels, stats, mined, margin) -> grad_dist
loss is 0-d in the dtype of dist; grad_dist is (N, N). The backward ops turn the mined coefficients into
dL/d dist in one pass; autograd through the distance matrix (a matrix product) carries it to the embeddings.
"""

import torch

from ..ops import _C
from . import reference

NAMESPACE = "tripletloss_cuda"
KINDS = ("batch_hard", "batch_all", "semi_hard")


def _op(name):
    """torch.ops.tripletloss_cuda.<name>, or None where the compiled library lacks it."""
    if _C is None:
        return None
    try:
        return getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return None


def _has_kernel(key):
    if any(_op(f"{kind}_{way}") is None for kind in KINDS for way in ("forward", "backward")):
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{kind}_{way}", key)
        for kind in KINDS
        for way in ("forward", "backward")
    )


# Device types with compiled mining kernels, fixed at import so that torch.compile sees a constant.
KERNEL_DEVICES = frozenset(t for t, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(key))


def _check_op_inputs(dist, labels):
    # The same messages as csrc/mining.h `check_mining_inputs`.
    torch._check(
        dist.dim() == 2 and dist.shape[0] == dist.shape[1],
        lambda: f"dist should be a square 2D tensor, got shape {tuple(dist.shape)}",
    )
    torch._check(
        dist.dtype in (torch.float32, torch.float64), lambda: f"dist should be float32 or float64, got {dist.dtype}"
    )
    torch._check(
        labels.dim() == 1 and labels.shape[0] == dist.shape[0],
        lambda: f"labels should have shape ({dist.shape[0]},), got {tuple(labels.shape)}",
    )
    torch._check(labels.dtype == torch.int64, lambda: f"labels should be int64, got {labels.dtype}")


if "cpu" in KERNEL_DEVICES or "cuda" in KERNEL_DEVICES:

    def _stats_like(dist):
        return dist.new_empty((len(reference.STATS_FIELDS),), dtype=torch.int64)

    @torch.library.register_fake(f"{NAMESPACE}::batch_hard_forward")
    def _batch_hard_forward_fake(dist, labels, margin, soft):
        _check_op_inputs(dist, labels)
        return dist.new_empty(()), _stats_like(dist), dist.new_empty((dist.shape[0], 2), dtype=torch.int64)

    @torch.library.register_fake(f"{NAMESPACE}::batch_all_forward")
    def _batch_all_forward_fake(dist, labels, margin, reduction):
        _check_op_inputs(dist, labels)
        return dist.new_empty(()), _stats_like(dist)

    @torch.library.register_fake(f"{NAMESPACE}::semi_hard_forward")
    def _semi_hard_forward_fake(dist, labels, margin):
        _check_op_inputs(dist, labels)
        return dist.new_empty(()), _stats_like(dist), dist.new_empty(dist.shape, dtype=torch.int32)

    @torch.library.register_fake(f"{NAMESPACE}::batch_hard_backward")
    def _batch_hard_backward_fake(grad, dist, labels, stats, mined, margin, soft):
        _check_op_inputs(dist, labels)
        return dist.new_empty(dist.shape)

    @torch.library.register_fake(f"{NAMESPACE}::batch_all_backward")
    def _batch_all_backward_fake(grad, dist, labels, stats, margin, reduction):
        _check_op_inputs(dist, labels)
        return dist.new_empty(dist.shape)

    @torch.library.register_fake(f"{NAMESPACE}::semi_hard_backward")
    def _semi_hard_backward_fake(grad, dist, labels, stats, mined, margin):
        _check_op_inputs(dist, labels)
        return dist.new_empty(dist.shape)


REFERENCE = {"batch_hard": reference.batch_hard, "batch_all": reference.batch_all, "semi_hard": reference.semi_hard}


class MiningFunction(torch.autograd.Function):
    """loss, stats = MiningFunction.apply(kind, dist, labels, *args) with the compiled forward and backward
    ops of ``kind``; args are (margin, soft), (margin, reduction) or (margin,). Saves dist, labels, stats
    and the mined indices (O(N^2))."""

    @staticmethod
    def forward(ctx, kind, dist, labels, *args):
        out = getattr(torch.ops.tripletloss_cuda, f"{kind}_forward")(dist, labels, *args)
        loss, stats = out[0], out[1]
        ctx.save_for_backward(dist, labels, *out[1:])
        ctx.kind, ctx.args = kind, args
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        dist, labels, *saved = ctx.saved_tensors
        kind, args = ctx.kind, ctx.args
        if not ctx.needs_input_grad[1]:
            return (None,) * (3 + len(args))
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference instead, so that higher orders work.
            loss, _ = REFERENCE[kind](dist, labels, *args)
            (grad_dist,) = torch.autograd.grad(loss, dist, grad, create_graph=True)
        else:
            backward = getattr(torch.ops.tripletloss_cuda, f"{kind}_backward")
            grad_dist = backward(grad.to(dist.dtype), dist, labels, *saved, *args)
        return (None, grad_dist, None) + (None,) * len(args)


def _run(kind, dist, labels, *args):
    if dist.device.type in KERNEL_DEVICES:
        return MiningFunction.apply(kind, dist.contiguous(), labels.contiguous(), *args)
    return REFERENCE[kind](dist, labels, *args)


def batch_hard(dist, labels, margin, soft):
    """(loss, stats) of the batch-hard loss on a distance matrix (see reference.batch_hard)."""
    return _run("batch_hard", dist, labels, margin, soft)


def batch_all(dist, labels, margin, reduction):
    """(loss, stats) of the batch-all loss; reduction 0/1/2 = mean_nonzero/mean/sum."""
    return _run("batch_all", dist, labels, margin, reduction)


def semi_hard(dist, labels, margin):
    """(loss, stats) of the semi-hard loss on a distance matrix (see reference.semi_hard)."""
    return _run("semi_hard", dist, labels, margin)
