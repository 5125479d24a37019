"""The compiled ops of the loss over index triplets: fake (meta) kernels for torch.compile, the
autograd.Function, and the fallback to the pure-PyTorch reference where no kernel is compiled for the device.

Ops (schemas in csrc/indexed.cpp); distance 0/1/2 = euclidean / squared euclidean / dot (1 - <x, y>),
reduction 0/1/2/3 = none / mean / sum / mean_nonzero:
    indexed_triplet_forward(embeddings, ref_embeddings?, anchors, positives, negatives, distance, margin, swap,
                            soft, reduction) -> (loss, saved)
        loss: (T,) or 0-d in the embeddings' dtype; saved: (T, 4) d(a,p), d(a,n), d(p,n), loss per triplet in
        float32 (float64 for float64 embeddings)
    indexed_triplet_backward(grad, embeddings, ref_embeddings?, anchors, positives, negatives, saved, distance,
                             margin, swap, soft, reduction) -> (grad_embeddings, grad_ref_embeddings)
        grad_ref_embeddings is (0, D) without a reference set.
Indices are (T,) int64; anchors index embeddings, positives and negatives ref_embeddings (else embeddings).
"""

import torch

from ..ops import _C
from . import reference

NAMESPACE = "tripletloss_cuda"
DISTANCE_CODES = {"euclidean": 0, "squared_euclidean": 1, "dot": 2}
SAVED = 4


def _has_kernel(key):
    if _C is None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::indexed_triplet_{way}", key)
        for way in ("forward", "backward")
    )


# Device types with compiled kernels, fixed at import so that torch.compile sees a constant.
KERNEL_DEVICES = frozenset(t for t, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(key))


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_op_inputs(x, ref, anchors, positives, negatives):
    # The same messages as csrc/indexed.cpp `check_inputs`.
    torch._check(x.dim() == 2, lambda: f"embeddings should be a 2D tensor (N, D), got {x.dim()}D")
    torch._check(x.dtype.is_floating_point, lambda: f"embeddings should be a floating tensor, got {x.dtype}")
    if ref is not None:
        torch._check(
            ref.dim() == 2 and ref.shape[1] == x.shape[1],
            lambda: f"ref_embeddings should be a 2D tensor (M, {x.shape[1]}), got shape {tuple(ref.shape)}",
        )
        torch._check(
            ref.dtype == x.dtype,
            lambda: f"ref_embeddings should have the dtype of embeddings {x.dtype}, got {ref.dtype}",
        )
    for name, idx in (("anchors", anchors), ("positives", positives), ("negatives", negatives)):
        _check_indices(name, idx, anchors.shape[0])


def _check_indices(name, idx, t):
    torch._check_index(idx.dtype == torch.int64, lambda: f"{name} should be an int64 tensor, got {idx.dtype}")
    torch._check_value(
        idx.dim() == 1 and idx.shape[0] == t,
        lambda: f"{name} should be a 1D tensor of {t} indices (one per triplet), got shape {tuple(idx.shape)}",
    )


if KERNEL_DEVICES:

    @torch.library.register_fake(f"{NAMESPACE}::indexed_triplet_forward")
    def _forward_fake(x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction):
        check_op_inputs(x, ref, anchors, positives, negatives)
        t = anchors.shape[0]
        loss = x.new_empty((t,) if reduction == 0 else ())
        return loss, x.new_empty((t, SAVED), dtype=acc_dtype(x.dtype))

    @torch.library.register_fake(f"{NAMESPACE}::indexed_triplet_backward")
    def _backward_fake(grad, x, ref, anchors, positives, negatives, saved, distance, margin, swap, soft, reduction):
        check_op_inputs(x, ref, anchors, positives, negatives)
        return x.new_empty(x.shape), x.new_empty((0 if ref is None else ref.shape[0], x.shape[1]))


class IndexedTripletFunction(torch.autograd.Function):
    """loss = IndexedTripletFunction.apply(x, ref, anchors, positives, negatives, distance, margin, swap, soft,
    reduction) with the compiled ops (distance and reduction as op codes); saves the inputs and (T, 4) values."""

    @staticmethod
    def forward(ctx, x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction):
        loss, saved = torch.ops.tripletloss_cuda.indexed_triplet_forward(
            x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction
        )
        ctx.save_for_backward(x, ref, anchors, positives, negatives, saved)
        ctx.args = (distance, margin, swap, soft, reduction)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, ref, anchors, positives, negatives, saved = ctx.saved_tensors
        distance, margin, swap, soft, reduction = ctx.args
        need_x, need_ref = ctx.needs_input_grad[:2]
        if not (need_x or need_ref):
            return (None,) * 10
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference instead, so that higher orders work.
            name = next(k for k, v in DISTANCE_CODES.items() if v == distance)
            inputs = [t for t, n in ((x, need_x), (ref, need_ref)) if n]
            loss = reference.loss_from_indices(
                x, ref, anchors, positives, negatives, name, margin, swap, soft, reduction
            )
            grads = iter(torch.autograd.grad(loss, inputs, grad, create_graph=True))
            gx, gr = (next(grads) if need_x else None), (next(grads) if need_ref else None)
        else:
            gx, gr = torch.ops.tripletloss_cuda.indexed_triplet_backward(
                grad.to(x.dtype), x, ref, anchors, positives, negatives, saved, *ctx.args
            )
        return (gx if need_x else None, gr if need_ref else None) + (None,) * 8


def loss_from_indices(x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction):
    """The loss with autograd; ``distance`` a name of reference.OP_DISTANCES, reduction 0/1/2/3."""
    if x.device.type in KERNEL_DEVICES:
        code = DISTANCE_CODES[distance]
        return IndexedTripletFunction.apply(x, ref, anchors, positives, negatives, code, margin, swap, soft, reduction)
    return reference.loss_from_indices(x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction)
