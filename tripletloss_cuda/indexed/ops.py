"""The compiled ops of the loss over index triplets: fake (meta) kernels for torch.compile, the
autograd.Function, and the fallback to the pure-PyTorch reference where no kernel is compiled for the device.

Ops (schemas in csrc/schemas.h); distance: distances.OP_CODES (euclidean, squared euclidean, dot = 1 - <x, y>):
    indexed_triplet_forward(embeddings, ref_embeddings?, anchors, positives, negatives, distance, margin, swap,
                            soft) -> saved
        saved: (T, 4) d(a,p), d(a,n), d(p,n), loss per triplet in float32 (float64 for float64 embeddings)
    indexed_triplet_backward(w, embeddings, ref_embeddings?, anchors, positives, negatives, saved, entries,
                             offsets, distance, margin, swap, soft) -> (grad_embeddings, grad_ref_embeddings)
        w: (T,) the gradient of each triplet's loss; entries, offsets: the destination rows' CSR (destinations);
        grad_ref_embeddings is (0, D) without a reference set.
Indices are (T,) int64; anchors index embeddings, positives and negatives ref_embeddings (else embeddings).
The reduction of the per-triplet losses (reference.reduce) and the CSR are computed here, around the ops:
the torch 2.11 stable ABI the C++ is written against has no division, sort or searchsorted.
"""

import torch

from .. import _library, distances
from .._library import acc_dtype
from . import reference

NAMESPACE = _library.NAMESPACE
DISTANCE_CODES = distances.OP_CODES
SAVED = 4
OPS = ("indexed_triplet_forward", "indexed_triplet_backward")

# Device types with compiled kernels, fixed at import so that torch.compile sees a constant.
KERNEL_DEVICES = _library.kernel_devices(OPS)


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
    def _forward_fake(x, ref, anchors, positives, negatives, distance, margin, swap, soft):
        check_op_inputs(x, ref, anchors, positives, negatives)
        return x.new_empty((anchors.shape[0], SAVED), dtype=acc_dtype(x.dtype))

    @torch.library.register_fake(f"{NAMESPACE}::indexed_triplet_backward")
    def _backward_fake(w, x, ref, anchors, positives, negatives, saved, entries, offsets, distance, margin, swap, soft):
        check_op_inputs(x, ref, anchors, positives, negatives)
        return x.new_empty(x.shape), x.new_empty((0 if ref is None else ref.shape[0], x.shape[1]))


def destinations(anchors, positives, negatives, n, m):
    """The backward's CSR: the 3T contributions (role * T + t, roles anchor / positive / negative) grouped by
    destination row (entries, a stable sort: each row's in that fixed order) and the (rows + 1,) offsets of
    each row's run. Rows [0, n) are the embeddings'; the m reference rows follow them (m = 0 without a reference
    set: the positives and negatives are rows of the embeddings). The three contributions of a triplet with an
    out-of-range index go to a dropped key past the last row. Integer ops only; no host synchronization."""
    off, rows = (n, n + m) if m else (0, n)
    r_rows = m if m else n
    valid = (anchors >= 0) & (anchors < n) & (positives >= 0) & (positives < r_rows)
    valid &= (negatives >= 0) & (negatives < r_rows)
    keys = torch.cat((anchors, positives + off, negatives + off))
    keys = torch.where(valid.repeat(3), keys, rows)
    sorted_keys, entries = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(rows + 1, device=keys.device))
    return entries, offsets


class IndexedTripletFunction(torch.autograd.Function):
    """losses = IndexedTripletFunction.apply(x, ref, anchors, positives, negatives, distance, margin, swap, soft):
    the (T,) per-triplet losses in the accumulation dtype, with the compiled ops (distance as an op code); saves
    the inputs and the (T, 4) values."""

    @staticmethod
    def forward(ctx, x, ref, anchors, positives, negatives, distance, margin, swap, soft):
        saved = torch.ops.tripletloss_cuda.indexed_triplet_forward(
            x, ref, anchors, positives, negatives, distance, margin, swap, soft
        )
        ctx.save_for_backward(x, ref, anchors, positives, negatives, saved)
        ctx.args = (distance, margin, swap, soft)
        return saved[:, SAVED - 1].clone()

    @staticmethod
    def backward(ctx, w):
        x, ref, anchors, positives, negatives, saved = ctx.saved_tensors
        distance, margin, swap, soft = ctx.args
        need_x, need_ref = ctx.needs_input_grad[:2]
        if not (need_x or need_ref):
            return (None,) * 9
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference instead, so that higher orders work.
            name = next(k for k, v in DISTANCE_CODES.items() if v == distance)
            inputs = [t for t, n in ((x, need_x), (ref, need_ref)) if n]
            r = x if ref is None else ref
            losses = reference.triplet_losses(x, r, anchors, positives, negatives, name, margin, swap, soft)
            grads = iter(torch.autograd.grad(losses, inputs, w.to(losses.dtype), create_graph=True))
            gx, gr = (next(grads) if need_x else None), (next(grads) if need_ref else None)
        else:
            m = 0 if ref is None else ref.shape[0]
            entries, offsets = destinations(anchors, positives, negatives, x.shape[0], m)
            gx, gr = torch.ops.tripletloss_cuda.indexed_triplet_backward(
                w, x, ref, anchors, positives, negatives, saved, entries, offsets, *ctx.args
            )
        return (gx if need_x else None, gr if need_ref else None) + (None,) * 7


def loss_from_indices(x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction):
    """The loss with autograd, in x's dtype; ``distance`` a name of distances.OP_CODES, ``reduction`` a code of REDUCTIONS."""
    if x.device.type in KERNEL_DEVICES:
        code = DISTANCE_CODES[distance]
        losses = IndexedTripletFunction.apply(x, ref, anchors, positives, negatives, code, margin, swap, soft)
        return reference.reduce(losses, reduction, x.dtype)
    _library.warn_fallback()
    return reference.loss_from_indices(x, ref, anchors, positives, negatives, distance, margin, swap, soft, reduction)
