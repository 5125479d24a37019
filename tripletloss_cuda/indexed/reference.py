"""Pure-PyTorch loss over index triplets: gather the rows, then the per-triplet loss with torch ops (so its
gradients are PyTorch's own). The fallback where no compiled kernel fits, and the oracle of csrc/indexed*.

Rows have been normalized by the caller where the distance needs it (see api.py); ``distance`` is the op's
"euclidean", "squared_euclidean" or "dot" (1 - <x, y>).
"""

import torch
import torch.nn.functional as F

from .. import distances
from .._library import REDUCTIONS


def triplet_losses(x, r, anchors, positives, negatives, distance, margin, swap, soft):
    """(T,) per-triplet losses in the dtype of x (rows gathered: a (T, D) copy of each role)."""
    a, p, n = x[anchors], r[positives], r[negatives]
    d_neg = distances.pair(a, n, distance)
    if swap:
        d_neg = torch.minimum(d_neg, distances.pair(p, n, distance))
    h = margin + distances.pair(a, p, distance) - d_neg
    return F.softplus(h) if soft else torch.relu(h)


def reduce(losses, reduction, dtype=None):
    """``reduction`` (a code of REDUCTIONS): none, or the mean / sum / mean over positive losses (in float64);
    0 over no triplet (every reduction). The result has ``dtype`` (default: the losses' own)."""
    dtype = losses.dtype if dtype is None else dtype
    if reduction == REDUCTIONS["none"]:
        return losses.to(dtype)
    total = losses.to(torch.float64).sum()
    if reduction == REDUCTIONS["mean"]:
        total = total / max(losses.shape[0], 1)
    elif reduction == REDUCTIONS["mean_nonzero"]:
        total = total / (losses > 0).sum().clamp_min(1)
    return total.to(dtype)


def loss_from_indices(x, r, anchors, positives, negatives, distance, margin, swap, soft, reduction):
    """The loss (``reduction`` a code of REDUCTIONS) with r = x without a reference set."""
    r = x if r is None else r
    return reduce(triplet_losses(x, r, anchors, positives, negatives, distance, margin, swap, soft), reduction)
