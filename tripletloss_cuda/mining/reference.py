"""Pure-PyTorch online triplet mining on a distance matrix: the fallback where no compiled mining kernel
fits, and the oracle of the kernels in csrc/mining*.

``dist`` is (N, M): N anchors against M references. Without ``ref_labels`` the batch mines against itself
(M = N, references = anchors, each anchor's own column excluded); with them, the positives of anchor i are
the references j with ref_labels[j] == labels[i] and the negatives those with another label, except the
column ``self_index[i]`` (the anchor itself in the references, or -1: none), which is neither.

Everything here is O(N M) memory (nothing of size N x M x M, no list of triplets) and built from
differentiable torch ops, so its gradients are PyTorch's own. Each loss returns ``(loss, stats)`` with
``loss`` a 0-d tensor in the dtype of ``dist`` and ``stats`` an int64 tensor of STATS_FIELDS:

    valid_triplets  triplets (i, j, k) with j a positive and k a negative of anchor i
    active_triplets mined triplets whose loss is positive (batch-all: all valid ones)
    mined_triplets  triplets the loss averages over: batch-hard one per valid anchor, semi-hard one per
                    positive pair whose anchor has a negative, batch-all every valid triplet
    valid_anchors   anchors with at least one positive and one negative
    active_anchors  anchors with at least one active triplet

Ties are broken towards the lowest index (argmax/argmin and stable sorts keep the first).
"""

import torch
import torch.nn.functional as F

from .. import distances
from .._library import REDUCTIONS, acc_dtype
from ..distances import safe_sqrt

DISTANCES = distances.NAMES
# batch-all's reductions and their codes (the package's shared REDUCTIONS).
BATCH_ALL_REDUCTIONS = {name: REDUCTIONS[name] for name in ("mean_nonzero", "mean", "sum")}
STATS_FIELDS = ("valid_triplets", "active_triplets", "mined_triplets", "valid_anchors", "active_anchors")


def distance_matrix(embeddings, distance="euclidean", normalize=False, ref_embeddings=None):
    """The oracle of tripletloss_cuda.distances (written apart from it, in plain autograd ops): (N, M)
    distances between the rows of ``embeddings`` and those of ``ref_embeddings`` (default: the embeddings
    themselves, M = N) from one matrix product, in float32 (float64 for float64 embeddings):
    euclidean ||x_i - y_j|| (gradient 0 at distance 0), squared_euclidean, or cosine
    1 - <x_i, y_j> / (||x_i|| ||y_j||). ``normalize`` L2-normalizes the rows first."""
    x = embeddings.to(acc_dtype(embeddings.dtype))
    y = x if ref_embeddings is None else ref_embeddings.to(x.dtype)
    if normalize or distance == "cosine":
        x = F.normalize(x, dim=1)
        y = x if ref_embeddings is None else F.normalize(y, dim=1)
    gram = x @ y.T
    if distance == "cosine":
        return 1 - gram
    if ref_embeddings is None:
        # The squared norms are the Gram matrix's own diagonal, so that duplicate rows give exactly 0.
        sq_x = sq_y = gram.diagonal()
    else:
        sq_x, sq_y = (x * x).sum(1), (y * y).sum(1)
    d2 = (sq_x[:, None] + sq_y[None, :] - 2 * gram).clamp_min(0)
    return d2 if distance == "squared_euclidean" else safe_sqrt(d2)


def self_references(labels, ref_labels=None, self_index=None):
    """(ref_labels, self_index) for mining: the batch against itself (each anchor's own column excluded)
    without ``ref_labels``; with them, ``self_index`` or -1 (no column excluded)."""
    if ref_labels is None:
        return labels, torch.arange(labels.shape[0], device=labels.device)
    if self_index is None:
        self_index = torch.full(labels.shape, -1, dtype=torch.int64, device=labels.device)
    return ref_labels, self_index


def masks(labels, ref_labels=None, self_index=None):
    """(not_negative, positive, negative) boolean (N, M) masks (see the module docstring)."""
    ref_labels, self_index = self_references(labels, ref_labels, self_index)
    same = labels[:, None] == ref_labels[None, :]
    excluded = torch.arange(ref_labels.shape[0], device=labels.device)[None, :] == self_index[:, None]
    return same | excluded, same & ~excluded, ~same & ~excluded


def _stats(valid_triplets, active, mined, valid_anchor):
    """The int64 stats vector from per-anchor counts (N,) and the per-anchor validity (N,) bool."""
    counts = [valid_triplets, active, mined, valid_anchor, active > 0]
    return torch.stack([c.to(torch.int64).sum() for c in counts])


def _mean(total, count):
    """total / count, 0 when count is 0 (then total is 0 too): no NaN and no host synchronization."""
    return total / count.clamp_min(1).to(total.dtype)


def batch_hard_sum(dist, labels, margin=1.0, soft=False, ref_labels=None, self_index=None):
    """(loss sum over anchors, stats) of the batch-hard loss: the loss is the sum over the mined_triplets."""
    _, pos, neg = masks(labels, ref_labels, self_index)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    if dist.numel() == 0:  # argmax has no empty reduction
        return dist.sum(), _stats(n_pos, n_pos, n_pos, valid)
    hardest_pos = dist.masked_fill(~pos, -torch.inf).argmax(1, keepdim=True)  # first index among ties
    hardest_neg = dist.masked_fill(~neg, torch.inf).argmin(1, keepdim=True)
    x = dist.gather(1, hardest_pos).squeeze(1) - dist.gather(1, hardest_neg).squeeze(1)
    per_anchor = F.softplus(x) if soft else torch.relu(margin + x)
    per_anchor = torch.where(valid, per_anchor, 0)
    active = valid & (per_anchor > 0)
    return per_anchor.sum(), _stats(n_pos * n_neg, active, valid, valid)


def batch_hard(dist, labels, margin=1.0, soft=False, ref_labels=None, self_index=None):
    """Batch-hard loss (Hermans et al. 2017) on an (N, M) distance matrix: for each anchor i with a positive
    and a negative, [margin + max_pos d_ij - min_neg d_ik]_+ (softplus(max_pos - min_neg) with ``soft``),
    averaged over those anchors. Returns (loss, stats)."""
    total, stats = batch_hard_sum(dist, labels, margin, soft, ref_labels, self_index)
    return _mean(total, stats[2]), stats


def batch_all_sum(dist, labels, margin=1.0, ref_labels=None, self_index=None):
    """(loss sum over valid triplets, stats) of the batch-all loss.

    Per anchor, the negatives' distances are sorted once; for a positive j the c_ij negatives with
    d_ik < margin + d_ij are a prefix, so the sum over k is c_ij (margin + d_ij) - prefix_sum[c_ij]."""
    not_neg, pos, neg = masks(labels, ref_labels, self_index)
    n, m = dist.shape
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    threshold = margin + dist  # for the positive pairs (i, j)
    sorted_neg = torch.sort(dist.masked_fill(not_neg, torch.inf), dim=1, stable=True).values
    # count of negatives with d_ik < margin + d_ij; the +inf padding (not negatives) is never counted
    count = torch.searchsorted(sorted_neg.detach(), threshold.detach(), side="left")
    count = torch.where(pos, count, 0)
    padding = torch.arange(m, device=dist.device)[None, :] >= n_neg[:, None]
    values = torch.where(padding, 0, sorted_neg).to(torch.float64)
    prefix = torch.cat([values.new_zeros(n, 1), values.cumsum(1)], dim=1)
    per_pair = count * threshold.to(torch.float64) - prefix.gather(1, count)
    total = torch.where(pos, per_pair, 0).sum().to(dist.dtype)
    active, valid_triplets = count.sum(1), n_pos * n_neg
    return total, _stats(valid_triplets, active, valid_triplets, (n_pos > 0) & (n_neg > 0))


def batch_all(dist, labels, margin=1.0, reduction="mean_nonzero", ref_labels=None, self_index=None):
    """Batch-all loss: [margin + d_ij - d_ik]_+ over every valid triplet, reduced by ``reduction``:
    mean_nonzero (over triplets with a positive loss), mean (over valid triplets) or sum (or their codes,
    BATCH_ALL_REDUCTIONS)."""
    if isinstance(reduction, int):
        reduction = {v: k for k, v in BATCH_ALL_REDUCTIONS.items()}[reduction]
    total, stats = batch_all_sum(dist, labels, margin, ref_labels, self_index)
    if reduction == "sum":
        return total, stats
    return _mean(total, stats[1] if reduction == "mean_nonzero" else stats[0]), stats


def semi_hard_sum(dist, labels, margin=1.0, ref_labels=None, self_index=None):
    """(loss sum over the mined positive pairs, stats) of the semi-hard loss."""
    not_neg, pos, neg = masks(labels, ref_labels, self_index)
    if dist.numel() == 0:
        zeros = pos.sum(1)
        return dist.sum(), _stats(zeros, zeros, zeros, zeros > 0)
    n_neg = neg.sum(1, keepdim=True)
    sorted_neg, order = torch.sort(dist.masked_fill(not_neg, torch.inf), dim=1, stable=True)
    outside = torch.searchsorted(sorted_neg.detach(), dist.detach(), side="right")  # first d_ik > d_ij
    largest = sorted_neg.detach().gather(1, (n_neg - 1).clamp_min(0))
    first_largest = torch.searchsorted(sorted_neg.detach(), largest, side="left")  # lowest index among ties
    chosen = torch.where(outside < n_neg, outside, first_largest).clamp_max(dist.shape[1] - 1)
    d_neg = dist.gather(1, order.gather(1, chosen))
    mined = pos & (n_neg > 0)
    per_pair = torch.where(mined, torch.relu(margin + dist - d_neg), 0)
    n_pos = pos.sum(1)
    valid = (n_pos > 0) & (n_neg.squeeze(1) > 0)
    return per_pair.sum(), _stats(n_pos * n_neg.squeeze(1), (per_pair > 0).sum(1), mined.sum(1), valid)


def semi_hard(dist, labels, margin=1.0, ref_labels=None, self_index=None):
    """Semi-hard loss (FaceNet, as TensorFlow Addons' TripletSemiHardLoss): for each positive pair (i, j)
    whose anchor has a negative, the negative with the smallest d_ik > d_ij, else the one with the largest
    d_ik; [margin + d_ij - d_ik]_+ averaged over those pairs."""
    total, stats = semi_hard_sum(dist, labels, margin, ref_labels, self_index)
    return _mean(total, stats[2]), stats
