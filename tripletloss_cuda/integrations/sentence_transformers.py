"""sentence-transformers drop-in: the batch triplet losses of sentence-transformers 6 (6.2) on tripletloss_cuda's
mining ops, and its TripletLoss on the fused triplet op, with the same constructors, forward(sentence_features,
labels), values and gradients.

    from tripletloss_cuda.integrations.sentence_transformers import BatchHardTripletLoss   # was: ...st.losses
    loss = BatchHardTripletLoss(model, distance_metric=BatchHardTripletLossDistanceFunction.cosine_distance, margin=1)

Each class subclasses sentence-transformers' own (so its constructor, config, model card and trainer integration
are unchanged) and replaces only the computation on the distance matrix: ``distance_metric`` (any callable
embeddings -> (B, B) distances; sentence-transformers' own by default) builds the matrix exactly as there, and
the matrix goes to tl.mining.ops (batch_hard / batch_all / semi_hard), which mine it in O(B^2) memory with
their own backward. sentence-transformers' semi-hard loss sorts and searches each row; its batch-all builds a
(B(K-1), B) tensor for K samples per label; its batch-hard several (B, B) masks.

Its conventions, kept here where they differ from tripletloss_cuda's mining losses:
- BatchHardTripletLoss / BatchHardSoftMarginTripletLoss average over *every* anchor (ours: over anchors with a
  positive and a negative). An anchor without a positive gets hardest-positive 0; one without a negative gets
  the row's max plus its min as hardest negative (the masked max/min of its code). Those anchors' terms are
  computed here with its formula from row maxima and minima; on the CPU only when the batch has such an
  anchor, on CUDA always (no host synchronization). The default margin is 5; BatchHardSoftMarginTripletLoss is
  softplus(hardest positive - hardest negative), no margin.
- BatchAllTripletLoss divides by (the number of triplets with loss > 1e-16) + 1e-16; ours by the number with
  loss > 0 (at least 1). The same unless a triplet's loss lies in (0, 1e-16].
- BatchSemiHardTripletLoss divides by every positive pair; ours by positive pairs whose anchor has a negative.
  They differ only for a batch of one label, where its loss is the mean of [d_ij - min_k d_ik + margin]_+ over
  positive pairs (the row minimum includes d_ii): computed here with its formula in that case (same CPU/CUDA rule).
- A hinge exactly at 0 passes the gradient there (it zeroes only negative values) and ours does not; its
  semi-hard hinge torch.max(x, 0) halves it; its hardest-positive max(mask * d) clips negative distances to 0:
  these differ only on exact ties or on distance matrices with negative entries (none of its distance_metrics).
- Its soft margin is torch's softplus, the identity above 20; ours is exact there (values within 2e-9).
- A 16-bit distance matrix is mined in float32 (the loss is returned in the matrix's dtype); its built-in
  euclidean distance computes in float32 for 16-bit embeddings anyway.

TripletLoss (anchor, positive, negative columns): F.relu(d(a, p) - d(a, n) + triplet_margin).mean() with its three
TripletDistanceMetric functions fused: EUCLIDEAN = ||a - b||_2 and MANHATTAN = ||a - b||_1 (no eps), COSINE =
1 - <F.normalize(a), F.normalize(b)> (eps 1e-12 on each norm); the hinge is relu's (gradient 0 at exactly 0). Its
metrics upcast 16-bit embeddings to float32 (_convert_to_float_tensor): the fused op reads them as they are,
accumulates in float32 and returns a float32 loss, gradients in the embeddings' dtype. Any other distance_metric,
and embeddings the fused op does not take (sparse, integer, not three tensors, ...), run its own code.
"""

import torch
from sentence_transformers.sentence_transformer import losses as st_losses
from torch.overrides import has_torch_function

from .. import distances, ops
from .._checks import tensor_argument
from .._library import REDUCTIONS
from ..functional import fused_inputs
from ..mining import ops as mining_ops

BatchHardTripletLossDistanceFunction = st_losses.BatchHardTripletLossDistanceFunction
TripletDistanceMetric = st_losses.TripletDistanceMetric


def _check_labels(loss, labels, embeddings):
    tensor_argument(f"{type(loss).__name__}.forward", "labels", 2, labels)
    batch_size = embeddings.shape[0]
    if labels.numel() != batch_size:
        raise ValueError(
            f"{loss.__class__.__name__} expects {batch_size} labels (one per example), "
            f"but got {labels.numel()} labels with shape {tuple(labels.shape)}."
        )
    labels = labels.view(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        labels = torch.unique(labels, return_inverse=True)[1]  # the same equalities, as int64 class ids
    return labels.to(torch.int64)


def _matrix(dist, n):
    if dist.shape != (n, n):
        raise ValueError(f"distance_metric should return a ({n}, {n}) matrix, got shape {tuple(dist.shape)}")
    return (dist if dist.dtype in (torch.float32, torch.float64) else dist.float()).contiguous()


def _when(condition, compute, otherwise):
    """compute() where the 0-d bool ``condition`` holds, else ``otherwise``: a Python branch on the CPU (free
    there), a select of both on other devices (no host synchronization)."""
    if condition.device.type == "cpu":
        return compute() if bool(condition) else otherwise
    return torch.where(condition, compute(), otherwise)


def batch_hard_loss(dist, labels, margin, soft):
    """sentence-transformers' batch-hard loss (soft: its soft-margin loss) on the (B, B) matrix ``dist``."""
    n = dist.shape[0]
    d = _matrix(dist, n)
    loss, stats = mining_ops.batch_hard(d, labels, float(margin), bool(soft))
    total = loss * stats[2].to(d.dtype)  # the sum over anchors with a positive and a negative
    count = (labels[:, None] == labels[None, :]).sum(1)
    has_pos, has_neg = count > 1, count < n
    invalid = ~(has_pos & has_neg)
    total = total + _when(invalid.any(), lambda: _invalid_anchor_terms(d, has_pos, has_neg, invalid, margin, soft), 0)
    return (total / max(n, 1)).to(dist.dtype)


def _invalid_anchor_terms(d, has_pos, has_neg, invalid, margin, soft):
    """The summed terms of anchors without a positive or a negative, as sentence-transformers forms them."""
    eye = torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
    row_max, row_min = d.max(1).values, d.min(1).values
    off_max = d.masked_fill(eye, -torch.inf).max(1).values
    off_min = d.masked_fill(eye, torch.inf).min(1).values
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    # hardest positive: max over the row of mask * d (0 on the diagonal, and everywhere without a positive)
    hardest_pos = torch.where(has_pos, torch.maximum(off_max, zero), zero)
    # hardest negative: min over the row of d + row_max * (1 - negative mask)
    hardest_neg = torch.where(has_neg, torch.minimum(off_min, d.diagonal() + row_max), row_max + row_min)
    x = hardest_pos - hardest_neg
    term = torch.nn.functional.softplus(x) if soft else torch.where(x + margin < 0, zero, x + margin)
    return torch.where(invalid, term, zero).sum()


def batch_all_loss(dist, labels, margin):
    """sentence-transformers' batch-all loss on the (B, B) matrix ``dist`` (mean over positive losses)."""
    d = _matrix(dist, dist.shape[0])
    loss, _ = mining_ops.batch_all(d, labels, float(margin), REDUCTIONS["mean_nonzero"])
    return loss.to(dist.dtype)


def semi_hard_loss(dist, labels, margin):
    """sentence-transformers' semi-hard loss on the (B, B) matrix ``dist``."""
    n = dist.shape[0]
    d = _matrix(dist, n)
    loss, _ = mining_ops.semi_hard(d, labels, float(margin))
    one_label = (labels == labels[:1]).all() if n > 1 else torch.zeros((), dtype=torch.bool, device=d.device)
    return _when(one_label, lambda: _one_label_semi_hard(d, margin), loss).to(dist.dtype)


def _one_label_semi_hard(d, margin):
    n = d.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    h = d - d.min(1, keepdim=True).values + margin
    return torch.where(off, torch.clamp_min(h, 0), 0).sum() / (n * (n - 1))


class BatchHardTripletLoss(st_losses.BatchHardTripletLoss):
    """sentence_transformers.losses.BatchHardTripletLoss on tripletloss_cuda's batch-hard op (module docstring)."""

    def batch_hard_triplet_loss(self, labels, embeddings):
        labels = _check_labels(self, labels, embeddings)
        return batch_hard_loss(self.distance_metric(embeddings), labels, self.triplet_margin, soft=False)


class BatchHardSoftMarginTripletLoss(st_losses.BatchHardSoftMarginTripletLoss):
    """sentence_transformers.losses.BatchHardSoftMarginTripletLoss on tripletloss_cuda's batch-hard op."""

    def batch_hard_triplet_soft_margin_loss(self, labels, embeddings):
        labels = _check_labels(self, labels, embeddings)
        return batch_hard_loss(self.distance_metric(embeddings), labels, 0.0, soft=True)


class BatchAllTripletLoss(st_losses.BatchAllTripletLoss):
    """sentence_transformers.losses.BatchAllTripletLoss on tripletloss_cuda's batch-all op."""

    def batch_all_triplet_loss(self, labels, embeddings):
        labels = _check_labels(self, labels, embeddings)
        return batch_all_loss(self.distance_metric(embeddings), labels, self.triplet_margin)


class BatchSemiHardTripletLoss(st_losses.BatchSemiHardTripletLoss):
    """sentence_transformers.losses.BatchSemiHardTripletLoss on tripletloss_cuda's semi-hard op."""

    def batch_semi_hard_triplet_loss(self, labels, embeddings):
        labels = _check_labels(self, labels, embeddings)
        return semi_hard_loss(self.distance_metric(embeddings), labels, self.margin)


def _triplet_metric(metric):
    """(distance code, p, eps) of sentence-transformers' TripletDistanceMetric functions (plain functions on the
    class, compared by identity), None for any other callable."""
    if metric is TripletDistanceMetric.EUCLIDEAN:
        return distances.TRIPLET_CODES["pairwise"], 2.0, 0.0
    if metric is TripletDistanceMetric.MANHATTAN:
        return distances.TRIPLET_CODES["pairwise"], 1.0, 0.0
    if metric is TripletDistanceMetric.COSINE:
        return distances.TRIPLET_CODES["normalized"], 2.0, 1e-12  # F.normalize's eps
    return None


def triplet_loss(embeddings, metric, margin):
    """sentence-transformers' TripletLoss on the three embedding columns, fused; None where the fused op does not
    take them (the caller then runs sentence-transformers' own code)."""
    spec = _triplet_metric(metric)
    if spec is None or not isinstance(embeddings, (list, tuple)) or len(embeddings) != 3:
        return None
    if not (type(margin) is float or type(margin) is int):
        return None
    if not all(isinstance(x, torch.Tensor) and x.layout == torch.strided for x in embeddings):
        return None
    if has_torch_function(embeddings):
        return None
    distance, p, eps = spec
    fused = fused_inputs(*embeddings, p)
    if fused is None:
        return None
    (a, pos, neg), _, rows_p, _ = fused
    if distance == distances.TRIPLET_CODES["pairwise"]:
        p = rows_p
    # Its metrics compute 16-bit embeddings in float32: a float32 loss.
    float32_loss = a.dtype in (torch.float16, torch.bfloat16)
    return ops.fused_triplet_margin_loss(
        a, pos, neg, float(margin), p, eps, False, 1, float32_loss, distance=distance, grad_at_zero_hinge=False
    )


class TripletLoss(st_losses.TripletLoss):
    """sentence_transformers.losses.TripletLoss on the fused triplet op for its three TripletDistanceMetric
    functions (module docstring); any other distance_metric runs its own code."""

    def compute_loss_from_embeddings(self, embeddings, labels):
        loss = triplet_loss(embeddings, self.distance_metric, self.triplet_margin)
        return super().compute_loss_from_embeddings(embeddings, labels) if loss is None else loss
