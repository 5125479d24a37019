"""Pure-PyTorch loss over index triplets: gather the rows, then the per-triplet loss with torch ops (so its
gradients are PyTorch's own). The fallback where no compiled kernel fits, and the oracle of csrc/indexed*.

Rows have been normalized by the caller where the distance needs it (see api.py); ``distance`` is the op's
"euclidean", "squared_euclidean" or "dot" (1 - <x, y>).
"""

import torch
import torch.nn.functional as F

from ..mining.reference import safe_sqrt

OP_DISTANCES = ("euclidean", "squared_euclidean", "dot")


def pair_distance(x, y, distance):
    if distance == "dot":
        return 1 - (x * y).sum(-1)
    d2 = (x - y).pow(2).sum(-1)
    return d2 if distance == "squared_euclidean" else safe_sqrt(d2)


def triplet_losses(x, r, anchors, positives, negatives, distance, margin, swap, soft):
    """(T,) per-triplet losses in the dtype of x (rows gathered: a (T, D) copy of each role)."""
    a, p, n = x[anchors], r[positives], r[negatives]
    d_neg = pair_distance(a, n, distance)
    if swap:
        d_neg = torch.minimum(d_neg, pair_distance(p, n, distance))
    h = margin + pair_distance(a, p, distance) - d_neg
    return F.softplus(h) if soft else torch.relu(h)


def reduce(losses, reduction, dtype=None):
    """none, or the mean / sum / mean over positive losses (in float64); 0 over no triplet (every reduction).
    The result has ``dtype`` (default: the losses' own)."""
    dtype = losses.dtype if dtype is None else dtype
    if reduction == 0:
        return losses.to(dtype)
    total = losses.to(torch.float64).sum()
    if reduction == 1:
        total = total / max(losses.shape[0], 1)
    elif reduction == 3:
        total = total / (losses > 0).sum().clamp_min(1)
    return total.to(dtype)


def loss_from_indices(x, r, anchors, positives, negatives, distance, margin, swap, soft, reduction):
    """The op's result (reduction 0/1/2/3 = none/mean/sum/mean_nonzero) with r = x without a reference set."""
    r = x if r is None else r
    return reduce(triplet_losses(x, r, anchors, positives, negatives, distance, margin, swap, soft), reduction)
