"""Pure-PyTorch online triplet mining on a distance matrix: the fallback where no compiled mining kernel
fits, and the oracle of the kernels in csrc/mining*.

Everything here is O(N^2) memory (nothing of size N x N x N, no list of triplets) and built from
differentiable torch ops, so its gradients are PyTorch's own. Each loss returns ``(loss, stats)`` with
``loss`` a 0-d tensor in the dtype of ``dist`` and ``stats`` an int64 tensor of STATS_FIELDS:

    valid_triplets  triplets (i, j, k) with y_i == y_j, i != j, y_k != y_i in the batch
    active_triplets mined triplets whose loss is positive (batch-all: all valid ones)
    mined_triplets  triplets the loss averages over: batch-hard one per valid anchor, semi-hard one per
                    positive pair whose anchor has a negative, batch-all every valid triplet
    valid_anchors   anchors with at least one positive and one negative
    active_anchors  anchors with at least one active triplet

Ties are broken towards the lowest index (argmax/argmin and stable sorts keep the first).
"""

import torch
import torch.nn.functional as F

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
BATCH_ALL_REDUCTIONS = {"mean_nonzero": 0, "mean": 1, "sum": 2}
STATS_FIELDS = ("valid_triplets", "active_triplets", "mined_triplets", "valid_anchors", "active_anchors")


def acc_dtype(dtype):
    """The dtype distances and losses are computed in: float64 for float64 embeddings, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_sqrt(x):
    """sqrt(x) for x >= 0 whose gradient at x == 0 is 0 (sqrt's own is inf, and 0 * inf = NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1)), 0)


def distance_matrix(embeddings, distance="euclidean", normalize=False):
    """(N, N) distances between the rows of ``embeddings`` from one matrix product, in float32 (float64 for
    float64 embeddings): euclidean ||x_i - x_j|| (gradient 0 at distance 0), squared_euclidean, or cosine
    1 - <x_i, x_j> / (||x_i|| ||x_j||). ``normalize`` L2-normalizes the rows first."""
    x = embeddings.to(acc_dtype(embeddings.dtype))
    if normalize or distance == "cosine":
        x = F.normalize(x, dim=1)
    gram = x @ x.T
    if distance == "cosine":
        return 1 - gram
    # The squared norms are the Gram matrix's own diagonal, so that duplicate rows give exactly 0.
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    return d2 if distance == "squared_euclidean" else safe_sqrt(d2)


def masks(labels):
    """(same, positive, negative) boolean (N, N) masks: same label; same label and another index; other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same, same & ~eye, ~same


def _stats(valid_triplets, active, mined, valid_anchor):
    """The int64 stats vector from per-anchor counts (N,) and the per-anchor validity (N,) bool."""
    counts = [valid_triplets, active, mined, valid_anchor, active > 0]
    return torch.stack([c.to(torch.int64).sum() for c in counts])


def _mean(total, count):
    """total / count, 0 when count is 0 (then total is 0 too): no NaN and no host synchronization."""
    return total / count.clamp_min(1).to(total.dtype)


def batch_hard(dist, labels, margin=1.0, soft=False):
    """Batch-hard loss (Hermans et al. 2017) on an (N, N) distance matrix: for each anchor i with a positive
    and a negative, [margin + max_pos d_ij - min_neg d_ik]_+ (softplus(max_pos - min_neg) with ``soft``),
    averaged over those anchors. Returns (loss, stats)."""
    _, pos, neg = masks(labels)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    if dist.shape[0] == 0:  # argmax has no empty reduction
        return dist.sum(), _stats(n_pos, n_pos, n_pos, valid)
    hardest_pos = dist.masked_fill(~pos, -torch.inf).argmax(1, keepdim=True)  # first index among ties
    hardest_neg = dist.masked_fill(~neg, torch.inf).argmin(1, keepdim=True)
    x = dist.gather(1, hardest_pos).squeeze(1) - dist.gather(1, hardest_neg).squeeze(1)
    per_anchor = F.softplus(x) if soft else torch.relu(margin + x)
    per_anchor = torch.where(valid, per_anchor, 0)
    active = valid & (per_anchor > 0)
    loss = _mean(per_anchor.sum(), valid.sum())
    return loss, _stats(n_pos * n_neg, active, valid, valid)


def batch_all(dist, labels, margin=1.0, reduction="mean_nonzero"):
    """Batch-all loss: [margin + d_ij - d_ik]_+ over every valid triplet, reduced by ``reduction``:
    mean_nonzero (over triplets with a positive loss), mean (over valid triplets) or sum.

    Per anchor, the negatives' distances are sorted once; for a positive j the c_ij negatives with
    d_ik < margin + d_ij are a prefix, so the sum over k is c_ij (margin + d_ij) - prefix_sum[c_ij]."""
    if isinstance(reduction, int):
        reduction = {v: k for k, v in BATCH_ALL_REDUCTIONS.items()}[reduction]
    same, pos, neg = masks(labels)
    n = dist.shape[0]
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    threshold = margin + dist  # for the positive pairs (i, j)
    sorted_neg = torch.sort(dist.masked_fill(same, torch.inf), dim=1, stable=True).values
    # count of negatives with d_ik < margin + d_ij; the +inf padding (not negatives) is never counted
    count = torch.searchsorted(sorted_neg.detach(), threshold.detach(), side="left")
    count = torch.where(pos, count, 0)
    padding = torch.arange(n, device=dist.device)[None, :] >= n_neg[:, None]
    values = torch.where(padding, 0, sorted_neg).to(torch.float64)
    prefix = torch.cat([values.new_zeros(n, 1), values.cumsum(1)], dim=1)
    per_pair = count * threshold.to(torch.float64) - prefix.gather(1, count)
    total = torch.where(pos, per_pair, 0).sum().to(dist.dtype)
    active, valid_triplets = count.sum(1), n_pos * n_neg
    stats = _stats(valid_triplets, active, valid_triplets, (n_pos > 0) & (n_neg > 0))
    if reduction == "sum":
        return total, stats
    return _mean(total, stats[1] if reduction == "mean_nonzero" else stats[0]), stats


def semi_hard(dist, labels, margin=1.0):
    """Semi-hard loss (FaceNet, as TensorFlow Addons' TripletSemiHardLoss): for each positive pair (i, j)
    whose anchor has a negative, the negative with the smallest d_ik > d_ij, else the one with the largest
    d_ik; [margin + d_ij - d_ik]_+ averaged over those pairs."""
    same, pos, neg = masks(labels)
    n_neg = neg.sum(1, keepdim=True)
    sorted_neg, order = torch.sort(dist.masked_fill(same, torch.inf), dim=1, stable=True)
    outside = torch.searchsorted(sorted_neg.detach(), dist.detach(), side="right")  # first d_ik > d_ij
    largest = sorted_neg.detach().gather(1, (n_neg - 1).clamp_min(0))
    first_largest = torch.searchsorted(sorted_neg.detach(), largest, side="left")  # lowest index among ties
    chosen = torch.where(outside < n_neg, outside, first_largest).clamp_max(dist.shape[0] - 1)
    d_neg = dist.gather(1, order.gather(1, chosen))
    mined = pos & (n_neg > 0)
    per_pair = torch.where(mined, torch.relu(margin + dist - d_neg), 0)
    n_pos = pos.sum(1)
    valid = (n_pos > 0) & (n_neg.squeeze(1) > 0)
    stats = _stats(n_pos * n_neg.squeeze(1), (per_pair > 0).sum(1), mined.sum(1), valid)
    return _mean(per_pair.sum(), stats[2]), stats
