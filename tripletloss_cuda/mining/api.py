"""Online triplet mining losses: batch-hard, batch-all and semi-hard, on a batch of embeddings with labels.

    loss = tl.batch_hard_triplet_loss(embeddings, labels, margin=1.0)
    loss, stats = tl.batch_all_triplet_loss(embeddings, labels, reduction="mean_nonzero", return_stats=True)
    criterion = tl.BatchSemiHardTripletLoss(margin=0.2, distance="cosine"); criterion(embeddings, labels)

Shared semantics (embeddings (N, D) float16/bfloat16/float32/float64, labels (N,) of any integer dtype):

- Distances d_ij form an (N, N) matrix computed from one matrix product in float32 (float64 for float64
  embeddings): ``"euclidean"`` ||x_i - x_j|| (not squared; its gradient at distance 0 is 0, never NaN),
  ``"squared_euclidean"``, or ``"cosine"`` 1 - cos(x_i, x_j). ``normalize=True`` L2-normalizes the rows first.
- A valid triplet (i, j, k) has y_i == y_j, i != j (j is a positive of anchor i) and y_k != y_i (a negative).
- Memory is O(N^2): nothing of size N x N x N and no list of triplets is built, forward or backward.
- A batch without a valid triplet gives a loss of 0 with zero gradients. Ties between equal distances go
  to the lowest index, so results are deterministic. A NaN or infinite embedding gives a NaN loss.
- The loss has the embeddings' dtype. ``return_stats=True`` also returns a :class:`MiningStats` of 0-d
  tensors (no host synchronization).
- ``distributed=True`` with an initialized torch.distributed process group of more than one process mines
  over the global batch (all ranks' embeddings gathered); gradients flow to each rank's own embeddings
  and the loss equals the single-process loss on the concatenated batch.

The mining runs in compiled CPU/CUDA kernels on the distance matrix (tripletloss_cuda::batch_*_forward/
backward, see tripletloss_cuda/ops.py) where they are built, else in the pure-PyTorch
tripletloss_cuda/mining/reference.py.
"""

from typing import NamedTuple

import torch
from torch.nn import Module

from . import ops, reference

DISTANCES = reference.DISTANCES
BATCH_ALL_REDUCTIONS = reference.BATCH_ALL_REDUCTIONS


class MiningStats(NamedTuple):
    """What a mining loss saw in its batch, as 0-d tensors on the embeddings' device.

    valid_triplets: int64, the number of valid triplets (i, j, k) in the batch (the same for every loss).
    active_triplets: int64, the number of mined triplets with a positive loss: batch-hard, anchors whose
        hardest triplet has a positive loss; batch-all, valid triplets with a positive loss; semi-hard,
        positive pairs whose mined triplet has a positive loss (soft batch-hard: every valid anchor).
    active_anchor_fraction: float32, the fraction of anchors with a valid triplet (a positive and a
        negative) that have at least one active triplet; 0 when no anchor has a valid triplet.
    """

    valid_triplets: torch.Tensor
    active_triplets: torch.Tensor
    active_anchor_fraction: torch.Tensor


def _stats_tuple(stats):
    """MiningStats from the int64 vector of reference.STATS_FIELDS."""
    fraction = stats[4].to(torch.float32) / stats[3].clamp_min(1).to(torch.float32)
    return MiningStats(stats[0], stats[1], fraction)


def _check(embeddings, labels, margin, distance):
    if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"embeddings and labels should be tensors, got {type(embeddings).__name__} and {type(labels).__name__}"
        )
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings should be a 2D tensor (N, D), got {embeddings.dim()}D")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings should be a floating tensor, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels should be a 1D tensor of {embeddings.shape[0]} elements (one per embedding), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels should be an integer tensor, got {labels.dtype}")
    if labels.device != embeddings.device:
        raise ValueError(f"labels should be on the device of embeddings {embeddings.device}, got {labels.device}")
    if distance not in DISTANCES:
        raise ValueError(f"distance should be one of {', '.join(map(repr, DISTANCES))}, got {distance!r}")
    if not margin >= 0:
        raise ValueError(f"margin should be non-negative, got {margin}")


def _global_batch(embeddings, labels, distributed):
    """The batch to mine: the local one, or with ``distributed`` every rank's (see distributed.gather)."""
    if not distributed:
        return embeddings, labels
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    if dist.get_world_size() == 1:
        return embeddings, labels
    from . import distributed as tl_distributed  # imported here: only distributed runs need it

    return tl_distributed.gather(embeddings, labels)


class _DistanceMatrix(torch.autograd.Function):
    """The (N, N) distance matrix of float32/float64 rows from one matrix product, built in place in the
    product's buffer, with a hand-written backward: one matrix product and a few passes over (N, N).

    It computes what reference.distance_matrix computes (that one stays plain autograd, as the
    oracle), but autograd through those PyTorch ops allocates and touches about ten fresh N×N buffers each
    way (page faults on every one: 64 MiB each at N = 4096), which cost several times the matrix product
    (measured at N = 4096, D = 128 on the 2-core CI machine: 454 ms forward+backward, against ~45 ms for
    x @ x.T). The backward is written in differentiable ops, so double backward works too."""

    @staticmethod
    def forward(ctx, x, distance):
        gram = x @ x.T
        ctx.distance = distance
        # In place in eager mode (no fresh N×N buffers); out of place under torch.compile, which fuses these
        # passes anyway, and where torch 2.11 drops the gradient of a Function output that the forward
        # mutated in place (the compiled backward gave all-zero parameter gradients).
        inplace = not torch.compiler.is_compiling()
        if distance == "cosine":
            ctx.save_for_backward(x)
            return gram.neg_().add_(1) if inplace else 1 - gram
        # d2_ij = g_ii + g_jj - 2 g_ij: the squared norms are the product's own diagonal, so that the
        # diagonal (and duplicate rows) come out exactly 0. Both forms round alike: (-2 g_ij + g_ii) + g_jj.
        sq = gram.diagonal().clone()
        if inplace:
            out = gram.mul_(-2).add_(sq[:, None]).add_(sq[None, :]).clamp_min_(0)
        else:
            out = (gram * -2 + sq[:, None] + sq[None, :]).clamp_min(0)
        if distance == "euclidean":
            out = out.sqrt_() if inplace else out.sqrt()
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.distance == "cosine":
            (x,) = ctx.saved_tensors
            return -((grad + grad.T) @ x), None
        x, out = ctx.saved_tensors
        if ctx.distance == "euclidean":
            # dL/d(d2) = G / (2 d), and 0 at d = 0 (an infinite denominator there, rather than a where()
            # after the division, keeps double backward free of 0/0): the gradient at distance 0 is 0.
            s = grad / (2 * out).masked_fill_(out == 0, torch.inf)
        else:
            s = grad  # at d2 = 0 (the diagonal, duplicate rows) x_i - x_j = 0: any coefficient gives 0
        # d(d2_ij)/dx_i = 2 (x_i - x_j): dx = 2 (rowsum(T) x - T x) with T = S + S^T.
        t = s + s.T
        return 2 * (t.sum(1, keepdim=True) * x - t @ x), None


def _distance_matrix(embeddings, distance, normalize):
    x = embeddings.to(reference.acc_dtype(embeddings.dtype))
    if normalize or distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return _DistanceMatrix.apply(x, distance)


def _prepare(embeddings, labels, margin, distance, normalize, distributed):
    """Checks the arguments; returns the (N, N) distance matrix and int64 labels of the batch to mine, and
    whether all its embeddings are finite (a 0-d tensor: no host synchronization)."""
    _check(embeddings, labels, margin, distance)
    embeddings, labels = _global_batch(embeddings, labels, distributed)
    finite = torch.isfinite(embeddings).all()
    return _distance_matrix(embeddings, distance, normalize), labels.to(torch.int64), finite


def _finish(loss, stats, finite, dtype, return_stats):
    # A NaN or infinite embedding makes the loss NaN, as it would in PyTorch: mining would otherwise skip
    # its NaN distances (every comparison with NaN is false) and return a plausible number.
    loss = torch.where(finite, loss, torch.nan).to(dtype)
    return (loss, _stats_tuple(stats)) if return_stats else loss


def batch_hard_triplet_loss(
    embeddings,
    labels,
    margin=1.0,
    distance="euclidean",
    soft=False,
    normalize=False,
    distributed=False,
    return_stats=False,
):
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    For each anchor i with at least one positive and one negative in the batch:
    [margin + max_j d_ij - min_k d_ik]_+ over its positives j and negatives k, or, with ``soft=True``,
    softplus(max_j d_ij - min_k d_ik) = log(1 + exp(.)) (margin unused). The loss is the mean over those
    anchors (0 if there is none). The hardest positive and negative are the lowest index among ties; the
    gradient flows through them only. See the module docstring for distances, dtypes and ``return_stats``.
    """
    dist, labels, finite = _prepare(embeddings, labels, margin, distance, normalize, distributed)
    loss, stats = ops.batch_hard(dist, labels, float(margin), bool(soft))
    return _finish(loss, stats, finite, embeddings.dtype, return_stats)


def batch_all_triplet_loss(
    embeddings,
    labels,
    margin=1.0,
    distance="euclidean",
    normalize=False,
    reduction="mean_nonzero",
    distributed=False,
    return_stats=False,
):
    """Batch-all triplet loss: [margin + d_ij - d_ik]_+ over every valid triplet (i, j, k) of the batch
    (y_i == y_j, i != j, y_k != y_i), reduced by ``reduction``:

    - ``"mean_nonzero"``: the mean over triplets with a positive loss (Hermans et al.'s BA!=0,
      pytorch-metric-learning's AvgNonZeroReducer); 0 if there is none;
    - ``"mean"``: the mean over all valid triplets (0 if there is none);
    - ``"sum"``.

    Computed per anchor by sorting its positives' distances, placing every negative among them by binary
    search and taking prefix sums (O(N^2 log(N/C)) time for C classes, O(N^2) memory), never by enumerating
    triplets. See the module docstring for the rest.
    """
    if reduction not in BATCH_ALL_REDUCTIONS:
        raise ValueError(f"reduction should be one of {', '.join(map(repr, BATCH_ALL_REDUCTIONS))}, got {reduction!r}")
    dist, labels, finite = _prepare(embeddings, labels, margin, distance, normalize, distributed)
    loss, stats = ops.batch_all(dist, labels, float(margin), BATCH_ALL_REDUCTIONS[reduction])
    return _finish(loss, stats, finite, embeddings.dtype, return_stats)


def semi_hard_triplet_loss(
    embeddings,
    labels,
    margin=1.0,
    distance="euclidean",
    normalize=False,
    distributed=False,
    return_stats=False,
):
    """Semi-hard triplet loss (Schroff et al. 2015, FaceNet), as TensorFlow Addons' TripletSemiHardLoss
    computes it: for every positive pair (i, j) whose anchor has a negative, the negative k with the
    smallest d_ik greater than d_ij, or when there is none the negative with the largest d_ik (lowest
    index among ties); [margin + d_ij - d_ik]_+, averaged over those positive pairs (0 if there is none;
    TensorFlow Addons gives NaN there). See the module docstring for the rest.
    """
    dist, labels, finite = _prepare(embeddings, labels, margin, distance, normalize, distributed)
    loss, stats = ops.semi_hard(dist, labels, float(margin))
    return _finish(loss, stats, finite, embeddings.dtype, return_stats)


class _MiningLoss(Module):
    """Holds the keyword arguments of a mining loss; ``last_stats`` is the MiningStats of the last call."""

    _function = None

    def __init__(self, **kwargs):
        super().__init__()
        margin, distance = kwargs.get("margin", 1.0), kwargs.get("distance", "euclidean")
        if not margin >= 0:
            raise ValueError(f"{type(self).__name__}: margin should be non-negative, got {margin}")
        if distance not in DISTANCES:
            raise ValueError(f"{type(self).__name__}: distance should be one of {DISTANCES}, got {distance!r}")
        self.kwargs = kwargs
        self.last_stats = None
        for name, value in kwargs.items():
            setattr(self, name, value)

    def forward(self, embeddings, labels):
        kwargs = {name: getattr(self, name) for name in self.kwargs}
        loss, self.last_stats = type(self)._function(embeddings, labels, return_stats=True, **kwargs)
        return loss

    def extra_repr(self):
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.kwargs)


class BatchHardTripletLoss(_MiningLoss):
    """Module form of :func:`batch_hard_triplet_loss`; ``last_stats`` keeps the MiningStats of the last call."""

    _function = staticmethod(batch_hard_triplet_loss)

    def __init__(self, margin=1.0, distance="euclidean", soft=False, normalize=False, distributed=False):
        super().__init__(margin=margin, distance=distance, soft=soft, normalize=normalize, distributed=distributed)


class BatchAllTripletLoss(_MiningLoss):
    """Module form of :func:`batch_all_triplet_loss`; ``last_stats`` keeps the MiningStats of the last call."""

    _function = staticmethod(batch_all_triplet_loss)

    def __init__(self, margin=1.0, distance="euclidean", normalize=False, reduction="mean_nonzero", distributed=False):
        if reduction not in BATCH_ALL_REDUCTIONS:
            raise ValueError(
                f"BatchAllTripletLoss: reduction should be one of {tuple(BATCH_ALL_REDUCTIONS)}, got {reduction!r}"
            )
        super().__init__(
            margin=margin, distance=distance, normalize=normalize, reduction=reduction, distributed=distributed
        )


class BatchSemiHardTripletLoss(_MiningLoss):
    """Module form of :func:`semi_hard_triplet_loss`; ``last_stats`` keeps the MiningStats of the last call."""

    _function = staticmethod(semi_hard_triplet_loss)

    def __init__(self, margin=1.0, distance="euclidean", normalize=False, distributed=False):
        super().__init__(margin=margin, distance=distance, normalize=normalize, distributed=distributed)
