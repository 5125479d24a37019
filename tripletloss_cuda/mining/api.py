"""Online triplet mining losses: batch-hard, batch-all and semi-hard, on a batch of embeddings with labels.

    loss = tl.batch_hard_triplet_loss(embeddings, labels, margin=1.0)
    loss, stats = tl.batch_all_triplet_loss(embeddings, labels, reduction="mean_nonzero", return_stats=True)
    criterion = tl.BatchSemiHardTripletLoss(margin=0.2, distance="cosine"); criterion(embeddings, labels)

Shared semantics (embeddings (N, D) float16/bfloat16/float32/float64, labels (N,) of any integer dtype):

- Distances d_ij form an (N, M) matrix between the N anchors and the M references (by default the batch
  itself, M = N), computed from one matrix product in float32 (float64 for float64 embeddings):
  ``"euclidean"`` ||x_i - x_j|| (not squared; its gradient at distance 0 is 0, never NaN),
  ``"squared_euclidean"``, or ``"cosine"`` 1 - cos(x_i, x_j). ``normalize=True`` L2-normalizes the rows first.
  Identical rows are exactly 0 apart, whole or in chunks, against the batch or a reference set
  (tripletloss_cuda/distances.py: one formula for every path).
- A valid triplet (i, j, k) has y_i == y_j, i != j (j is a positive of anchor i) and y_k != y_i (a negative).
- Reference sets (as pytorch-metric-learning's ``ref_emb``/``ref_labels``): with ``ref_embeddings`` (M, D)
  (the embeddings' dtype and device) and ``ref_labels`` (M,), anchors come from ``embeddings``, positives and
  negatives from the references: every reference with the anchor's label is a positive, every other one a
  negative, except for ``ref_self_index`` (N,) int64: the reference row that IS anchor i (neither positive
  nor negative), or -1. Its range is checked (on the CPU a ValueError; on a GPU a device-side assert, no
  host synchronization). Gradients flow to both ``embeddings`` and ``ref_embeddings``.
- Memory: nothing of size N x M x M and no list of triplets is built. ``chunk_size`` bounds the rest: the
  anchors are mined in blocks of ``chunk_size`` rows, each block's (chunk_size, M) distances computed,
  mined and dropped, and recomputed in the backward, so nothing of size N x M is held. The default
  (None) picks the largest block whose working set stays under ops.MEMORY_BUDGET_BYTES (1 GiB, counted as
  8 distance-dtype elements per matrix entry: 4096 rows at M = 8192 in float32) and mines the whole matrix
  at once, keeping it for the backward, when that covers all anchors. Results equal the unchunked ones up
  to float summation order, and are deterministic for a given chunk size.
- A batch without a valid triplet gives a loss of 0 with zero gradients. Ties between equal distances go
  to the lowest index, so results are deterministic. A NaN or infinite embedding gives a NaN loss.
- The loss has the embeddings' dtype. ``return_stats=True`` also returns a :class:`MiningStats` of 0-d
  tensors (no host synchronization).
- ``distributed=True`` with an initialized torch.distributed process group of more than one process mines
  over the global batch (all ranks' embeddings gathered, and the reference sets too, in rank order, with
  ``ref_self_index`` shifted to the gathered rows); gradients flow to each rank's own embeddings and
  the loss equals the single-process loss on the concatenated sets.

The mining runs in compiled CPU/CUDA kernels on the distance matrix (tripletloss_cuda::batch_*_forward/
backward, see tripletloss_cuda/mining/ops.py) where they are built, else in the pure-PyTorch
tripletloss_cuda/mining/reference.py.
"""

from typing import NamedTuple

import torch
from torch.nn import Module

from .. import distances
from .._checks import check_ref_embeddings
from . import ops, reference

DISTANCES = distances.NAMES
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
    distances.check_name(distance)
    if not margin >= 0:
        raise ValueError(f"margin should be non-negative, got {margin}")


def _check_references(embeddings, ref_embeddings, ref_labels, ref_self_index, check_range=True):
    if ref_embeddings is None:
        if ref_labels is not None or ref_self_index is not None:
            name = "ref_labels" if ref_labels is not None else "ref_self_index"
            raise ValueError(f"{name} needs ref_embeddings (without them the batch mines against itself)")
        return
    if not isinstance(ref_embeddings, torch.Tensor) or not isinstance(ref_labels, torch.Tensor):
        raise TypeError(
            "ref_embeddings and ref_labels should be tensors (ref_embeddings needs ref_labels), got "
            f"{type(ref_embeddings).__name__} and {type(ref_labels).__name__}"
        )
    check_ref_embeddings(embeddings, ref_embeddings)
    m = ref_embeddings.shape[0]
    if ref_labels.dim() != 1 or ref_labels.shape[0] != m:
        raise ValueError(
            f"ref_labels should be a 1D tensor of {m} elements (one per reference), got shape {tuple(ref_labels.shape)}"
        )
    if ref_labels.dtype.is_floating_point or ref_labels.dtype.is_complex or ref_labels.dtype == torch.bool:
        raise TypeError(f"ref_labels should be an integer tensor, got {ref_labels.dtype}")
    for name, t in (("ref_labels", ref_labels), ("ref_self_index", ref_self_index)):
        if t is not None and isinstance(t, torch.Tensor) and t.device != embeddings.device:
            raise ValueError(f"{name} should be on the device of embeddings {embeddings.device}, got {t.device}")
    if ref_self_index is None:
        return
    if not isinstance(ref_self_index, torch.Tensor):
        raise TypeError(f"ref_self_index should be a tensor, got {type(ref_self_index).__name__}")
    if ref_self_index.dtype != torch.int64:
        raise TypeError(f"ref_self_index should be int64, got {ref_self_index.dtype}")
    if ref_self_index.dim() != 1 or ref_self_index.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"ref_self_index should be a 1D tensor of {embeddings.shape[0]} elements (one per embedding), "
            f"got shape {tuple(ref_self_index.shape)}"
        )
    if not check_range or not ref_self_index.numel() or torch.compiler.is_compiling():
        return
    message = f"ref_self_index should hold row numbers of ref_embeddings in [0, {m}) or -1"
    if ref_self_index.device.type != "cpu":
        # No host synchronization on an accelerator: a device-side assert (the kernels only compare the
        # index, they never read memory with it).
        torch._assert_async(((ref_self_index >= -1) & (ref_self_index < m)).all(), message)
        return
    lo, hi = (int(v) for v in torch.aminmax(ref_self_index))
    if lo < -1 or hi >= m:
        raise ValueError(f"{message}, got values in [{lo}, {hi}]")


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size should be None or an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size should be at least 1, got {chunk_size}")


def global_batch(embeddings, labels, ref_embeddings, ref_labels, ref_self_index, distributed):
    """The sets to mine: the local ones, or with ``distributed`` every rank's (see distributed.gather)."""
    local = embeddings, labels, ref_embeddings, ref_labels, ref_self_index
    if not distributed:
        return local
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs an initialized torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    if dist.get_world_size() == 1:
        return local
    from . import distributed as tl_distributed  # imported here: only distributed runs need it

    return tl_distributed.gather_sets(*local)


def _mining_loss(
    kind, extra, embeddings, labels, margin, distance, normalize, distributed, refs, chunk_size, check_self_index=True
):
    """Checks the arguments, mines (whole or in blocks of anchors), returns (loss as float32/64, stats, finite:
    whether all embeddings are finite, a 0-d tensor: no host synchronization). check_self_index=False skips
    the range check of ref_self_index for callers that built it."""
    _check(embeddings, labels, margin, distance)
    _check_references(embeddings, *refs, check_range=check_self_index)
    _check_chunk_size(chunk_size)
    embeddings, labels, ref_embeddings, ref_labels, self_index = global_batch(embeddings, labels, *refs, distributed)
    finite = torch.isfinite(embeddings).all()
    labels = labels.to(torch.int64)
    if ref_embeddings is not None:
        finite = finite & torch.isfinite(ref_embeddings).all()
        ref_labels = ref_labels.to(torch.int64)
    x = distances.rows(embeddings, distance, normalize)
    # The batch as its own reference set is one tensor (torch.compile traces no Function given one tensor twice).
    same = ref_embeddings is None or ref_embeddings is embeddings
    y = None if same else distances.rows(ref_embeddings, distance, normalize)
    n, m = x.shape[0], (x if y is None else y).shape[0]
    chunk = chunk_size if chunk_size is not None else ops.default_chunk(m, x.dtype)
    if ops.use_fused(kind, x):  # whole or in blocks, each block of the matrix product read once
        args = (kind, x, y, labels, float(margin), extra, ref_labels, self_index, distance, chunk_size)
        loss, stats = ops.run_fused(*args)
    elif ops.use_sparse_hard(kind, x):  # batch-hard on CUDA: the backward from the mined triplets, no host sync
        args = (x, y, labels, float(margin), extra, ref_labels, self_index, distance, chunk)
        loss, stats = ops.run_sparse_hard(*args)
    elif chunk >= n:  # one block: the whole matrix, kept for the backward
        dist = distances.matrix(x, y, distance)
        loss, stats = ops.run(kind, dist, labels, float(margin), extra, ref_labels, self_index)
    else:
        loss, stats = ops.run_chunked(kind, x, y, labels, float(margin), extra, ref_labels, self_index, distance, chunk)
    return loss, stats, finite


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
    ref_embeddings=None,
    ref_labels=None,
    ref_self_index=None,
    chunk_size=None,
):
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss").

    For each anchor i with at least one positive and one negative in the batch:
    [margin + max_j d_ij - min_k d_ik]_+ over its positives j and negatives k, or, with ``soft=True``,
    softplus(max_j d_ij - min_k d_ik) = log(1 + exp(.)) (margin unused). The loss is the mean over those
    anchors (0 if there is none). The hardest positive and negative are the lowest index among ties; the
    gradient flows through them only. See the module docstring for distances, dtypes, ``return_stats``, the
    reference sets (``ref_embeddings``, ``ref_labels``, ``ref_self_index``) and ``chunk_size``.
    """
    refs = (ref_embeddings, ref_labels, ref_self_index)
    loss, stats, finite = _mining_loss(
        "batch_hard", bool(soft), embeddings, labels, margin, distance, normalize, distributed, refs, chunk_size
    )
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
    ref_embeddings=None,
    ref_labels=None,
    ref_self_index=None,
    chunk_size=None,
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
    refs = (ref_embeddings, ref_labels, ref_self_index)
    extra = BATCH_ALL_REDUCTIONS[reduction]
    loss, stats, finite = _mining_loss(
        "batch_all", extra, embeddings, labels, margin, distance, normalize, distributed, refs, chunk_size
    )
    return _finish(loss, stats, finite, embeddings.dtype, return_stats)


def semi_hard_triplet_loss(
    embeddings,
    labels,
    margin=1.0,
    distance="euclidean",
    normalize=False,
    distributed=False,
    return_stats=False,
    ref_embeddings=None,
    ref_labels=None,
    ref_self_index=None,
    chunk_size=None,
):
    """Semi-hard triplet loss (Schroff et al. 2015, FaceNet), as TensorFlow Addons' TripletSemiHardLoss
    computes it: for every positive pair (i, j) whose anchor has a negative, the negative k with the
    smallest d_ik greater than d_ij, or when there is none the negative with the largest d_ik (lowest
    index among ties); [margin + d_ij - d_ik]_+, averaged over those positive pairs (0 if there is none;
    TensorFlow Addons gives NaN there). See the module docstring for the rest.
    """
    refs = (ref_embeddings, ref_labels, ref_self_index)
    loss, stats, finite = _mining_loss(
        "semi_hard", None, embeddings, labels, margin, distance, normalize, distributed, refs, chunk_size
    )
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
        _check_chunk_size(kwargs.get("chunk_size"))
        self.kwargs = kwargs
        self.last_stats = None
        for name, value in kwargs.items():
            setattr(self, name, value)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, ref_self_index=None):
        kwargs = {name: getattr(self, name) for name in self.kwargs}
        refs = {"ref_embeddings": ref_embeddings, "ref_labels": ref_labels, "ref_self_index": ref_self_index}
        loss, self.last_stats = type(self)._function(embeddings, labels, return_stats=True, **refs, **kwargs)
        return loss

    def extra_repr(self):
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.kwargs)

    # The cross-batch memory's protocol (mining/memory.py).
    def cross_batch_check(self, embeddings, labels):
        _check(embeddings, labels, self.margin, self.distance)
        return labels

    def cross_batch_label_dtype(self, labels):
        return torch.int64

    def cross_batch_loss(self, embeddings, labels, memory_embeddings, memory_labels, self_index):
        """The batch mined against the memory (the memory gathers a distributed batch itself)."""
        kwargs = {name: getattr(self, name) for name in self.kwargs if name != "distributed"}
        refs = (memory_embeddings, memory_labels, self_index)
        loss, self.last_stats = self._compute(embeddings, labels, refs, check_self_index=False, **kwargs)
        return loss, self.last_stats

    def _compute(self, embeddings, labels, refs, check_self_index=True, **kwargs):
        """(loss, MiningStats) of the loss with these keyword arguments against refs = (ref_embeddings,
        ref_labels, ref_self_index)."""
        kind = type(self)._function.__name__.removesuffix("_triplet_loss")
        extra = {
            "batch_hard": lambda: bool(kwargs.pop("soft")),
            "batch_all": lambda: BATCH_ALL_REDUCTIONS[kwargs.pop("reduction")],
        }
        extra = extra[kind]() if kind in extra else None
        loss, stats, finite = _mining_loss(
            kind, extra, embeddings, labels, kwargs["margin"], kwargs["distance"], kwargs["normalize"],
            kwargs.get("distributed", False), refs, kwargs.get("chunk_size"), check_self_index,
        )  # fmt: skip
        return _finish(loss, stats, finite, embeddings.dtype, True)


class BatchHardTripletLoss(_MiningLoss):
    """Module form of :func:`batch_hard_triplet_loss`; ``last_stats`` keeps the MiningStats of the last call."""

    _function = staticmethod(batch_hard_triplet_loss)

    def __init__(
        self, margin=1.0, distance="euclidean", soft=False, normalize=False, distributed=False, chunk_size=None
    ):
        super().__init__(
            margin=margin,
            distance=distance,
            soft=soft,
            normalize=normalize,
            distributed=distributed,
            chunk_size=chunk_size,
        )


class BatchAllTripletLoss(_MiningLoss):
    """Module form of :func:`batch_all_triplet_loss`; ``last_stats`` keeps the MiningStats of the last call."""

    _function = staticmethod(batch_all_triplet_loss)

    def __init__(
        self,
        margin=1.0,
        distance="euclidean",
        normalize=False,
        reduction="mean_nonzero",
        distributed=False,
        chunk_size=None,
    ):
        if reduction not in BATCH_ALL_REDUCTIONS:
            raise ValueError(
                f"BatchAllTripletLoss: reduction should be one of {tuple(BATCH_ALL_REDUCTIONS)}, got {reduction!r}"
            )
        super().__init__(
            margin=margin,
            distance=distance,
            normalize=normalize,
            reduction=reduction,
            distributed=distributed,
            chunk_size=chunk_size,
        )


class BatchSemiHardTripletLoss(_MiningLoss):
    """Module form of :func:`semi_hard_triplet_loss`; ``last_stats`` keeps the MiningStats of the last call."""

    _function = staticmethod(semi_hard_triplet_loss)

    def __init__(self, margin=1.0, distance="euclidean", normalize=False, distributed=False, chunk_size=None):
        super().__init__(
            margin=margin, distance=distance, normalize=normalize, distributed=distributed, chunk_size=chunk_size
        )
