"""The triplet margin loss over given index triplets: the loss a miner's (anchors, positives, negatives)
tuple needs, without gathering (T, D) copies of the rows.

    loss = tl.triplet_margin_loss_from_indices(embeddings, anchors, positives, negatives, margin=0.2)
    loss = tl.triplet_margin_loss_from_indices(queries, a, p, n, ref_embeddings=memory_bank, swap=True)
"""

import torch

from .. import distances
from .._checks import check_ref_embeddings, tensor_argument
from .._library import REDUCTIONS
from . import ops

DISTANCES = distances.NAMES


def _index(name, idx, t, device):
    if idx.dtype not in (torch.int64, torch.int32):
        raise IndexError(f"{name} should be an int64 or int32 tensor of indices, got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] != t:
        raise ValueError(f"{name} should be a 1D tensor of {t} indices (one per triplet), got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} should be on the device of embeddings {device}, got {idx.device}")
    return idx.to(torch.int64)


def _check(embeddings, anchors, positives, negatives, ref_embeddings, distance, reduction):
    fn = "triplet_margin_loss_from_indices"
    for position, (name, value) in enumerate(
        (("embeddings", embeddings), ("anchors", anchors), ("positives", positives), ("negatives", negatives)), 1
    ):
        tensor_argument(fn, name, position, value)
    if ref_embeddings is not None:
        tensor_argument(fn, "ref_embeddings", 5, ref_embeddings)
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings should be a 2D tensor (N, D), got {embeddings.dim()}D")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings should be a floating tensor, got {embeddings.dtype}")
    if ref_embeddings is not None:
        check_ref_embeddings(embeddings, ref_embeddings)
    distances.check_name(distance)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction should be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if anchors.dim() != 1:
        raise ValueError(
            f"anchors should be a 1D tensor of indices (one per triplet), got shape {tuple(anchors.shape)}"
        )
    t = anchors.shape[0]
    return tuple(
        _index(name, idx, t, embeddings.device)
        for name, idx in (("anchors", anchors), ("positives", positives), ("negatives", negatives))
    )


def triplet_margin_loss_from_indices(
    embeddings,
    anchors,
    positives,
    negatives,
    ref_embeddings=None,
    margin=1.0,
    distance="euclidean",
    normalize=False,
    swap=False,
    soft=False,
    reduction="mean",
):
    """Triplet margin loss over the triplets (anchors[t], positives[t], negatives[t]), t < T.

    Anchors index the rows of ``embeddings`` (N, D); positives and negatives index ``ref_embeddings`` (M, D)
    when given (a memory bank, a gallery), else ``embeddings``. Per triplet, with the mining losses'
    distances d (``"euclidean"`` ||x - y||, gradient 0 at distance 0; ``"squared_euclidean"``; ``"cosine"``
    1 - cos(x, y)) on rows L2-normalized first with ``normalize=True``:

        h_t = margin + d(a, p) - d_neg,  d_neg = min(d(a, n), d(p, n)) with ``swap`` (p and n both
              reference rows), else d(a, n)
        loss_t = max(h_t, 0), or softplus(h_t) = log(1 + exp(h_t)) with ``soft=True`` (pass margin=0 for
              the soft-margin loss of Hermans et al.; pytorch-metric-learning's smooth_loss keeps the margin)

    ``reduction``: ``"none"`` (T,), ``"mean"``, ``"sum"``, or ``"mean_nonzero"`` (the mean over triplets with
    a positive loss, pytorch-metric-learning's AvgNonZeroReducer). Over no triplet (T = 0) every reduction
    gives 0 with zero gradients (as the mining losses and pytorch-metric-learning do; torch.nn.functional's
    mean of nothing would be NaN). The gradient passes where h_t > 0; a tie of the swap's minimum splits it.

    Indices: int64 or int32 tensors of one length T, on the embeddings' device; the same row may appear in any
    number of triplets. An out-of-range (or negative) index raises IndexError on the CPU. On CUDA it is checked
    on the device without a host synchronization: that triplet reads nothing and its loss is NaN, so a
    reduced loss is NaN (never a silent wrong number, never an illegal memory access).

    Memory: the forward reads rows by index (no (T, D) gathered copies) and saves 4 values per triplet; the
    backward groups the 3T contributions by destination row (an integer sort) and each row adds its own in a
    fixed order, so gradients are deterministic without atomics. Gradients flow to ``embeddings`` and
    ``ref_embeddings``. 16-bit embeddings accumulate in float32; the loss has the embeddings' dtype.
    """
    anchors, positives, negatives = _check(
        embeddings, anchors, positives, negatives, ref_embeddings, distance, reduction
    )
    x, ref = embeddings, ref_embeddings
    if normalize or distance == "cosine":  # else the kernels read 16-bit rows as they are
        x = distances.rows(x, distance, normalize=True)
        ref = None if ref is None else distances.rows(ref, distance, normalize=True)
    op = distances.op_name(distance)
    loss = ops.loss_from_indices(
        x, ref, anchors, positives, negatives, op, float(margin), bool(swap), bool(soft), REDUCTIONS[reduction]
    )
    return loss.to(embeddings.dtype)
