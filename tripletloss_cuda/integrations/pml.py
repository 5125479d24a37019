"""pytorch-metric-learning drop-in: ``TripletMarginLoss`` with the constructor and call of
``pytorch_metric_learning.losses.TripletMarginLoss`` (2.9), the same values and gradients, computed by the
fused ops of tripletloss_cuda.

    from tripletloss_cuda.integrations.pml import TripletMarginLoss   # was: from pytorch_metric_learning.losses
    loss_fn = TripletMarginLoss(margin=0.1, distance=CosineSimilarity(), reducer=MeanReducer())
    loss = loss_fn(embeddings, labels)                                 # every triplet of the batch
    loss = loss_fn(embeddings, labels, miner(embeddings, labels))     # a miner's triplets or pairs
    loss = loss_fn(queries, labels, indices, ref_emb=bank, ref_labels=bank_labels)

Reproduced: ``distance`` LpDistance(p=2, power=1 or 2, normalize_embeddings True or False) and
CosineSimilarity(); ``reducer`` AvgNonZeroReducer (the default), MeanReducer, SumReducer; ``margin`` (any sign),
``swap``, ``smooth_loss``; ``indices_tuple`` of triplets (anchors, positives, negatives) or of pairs (a1, p, a2, n,
turned into triplets as PML does: every (a1, p) with every (a2, n) of the same anchor), from any miner
(BatchHardMiner, TripletMarginMiner of every type, BatchEasyHardMiner, ...); ``ref_emb``/``ref_labels``.

How each call runs:
- no ``indices_tuple`` (PML: every valid triplet of the batch, or of the queries against ``ref_emb``): the fused
  batch-all loss (tl.batch_all_triplet_loss, with ``ref_embeddings``/``ref_labels`` for a reference set: sort and
  prefix sums, O(N M) memory where PML builds the N M^2 triplet list), unless ``swap``, ``smooth_loss`` or a
  negative margin asks for what batch-all does not do: those list every triplet as PML does and run the indexed
  loss, up to MAX_ALL_TRIPLETS_CUBE = N*M*M (else NotImplementedError naming the option);
- an ``indices_tuple``: tl.triplet_margin_loss_from_indices, which reads the rows by index instead of building the
  full (N, M) distance matrix as PML does; except, without ``ref_emb``, for more than N^2 / 2 triplets (a
  TripletMarginMiner over a whole batch mines ~15 N^2 at N = 1024), where the distances are gathered from one
  (N, N) matrix built in place (the mining losses' distance matrix) as PML does: cheaper than reading rows then.

Differences from PML 2.9:
- ``swap`` with ``ref_emb``: PML indexes its (N, M) query-by-reference matrix with [positive, negative], reference
  indices used as query rows (wrong distances, or an index error: its issue #748). Here d(p, n) is the distance
  between the two reference rows, as swap means.
- Floating-point rounding: PML computes LpDistance with torch.cdist (a matrix product for large batches) and
  CosineSimilarity as an - ap on similarities; here distances come from the rows directly (indexed) or from
  one matrix product (batch-all), and the cosine margin is d(a,p) - d(a,n) on 1 - similarity: equal up to rounding.
- A triplet whose hinge is exactly 0 gets no gradient in either (ReLU); smooth_loss's softplus here is exact where
  torch's switches to the identity above 20 (a difference below 2e-9).
- Not reproduced, raising an error that names the option: other distances (p != 2, DotProductSimilarity, ...) and
  reducers (ThresholdReducer bounds other than AvgNonZeroReducer's, DoNothingReducer, ...), ``triplets_per_anchor``
  other than "all" without an ``indices_tuple`` (PML samples random triplets), ``embedding_regularizer``,
  ``collect_stats=True``; ``ref_emb`` without ``ref_labels`` and without an ``indices_tuple``.
- As in PML, ``ref_emb`` with ``ref_labels`` is a separate reference set (every reference of the anchor's label a
  positive), except when ``ref_labels`` is the very ``labels`` object: then reference i is anchor i and not its
  own positive (PML's fill_diagonal_ on the label matrix; ref_self_index for the batch-all op).
- In tl.CrossBatchMemory (PML's CrossBatchMemory without a miner) the memory is the reference set and each anchor's
  own slot is excluded (PML's remove_self_comparisons), passed as ref_self_index through the private ``_forward``;
  there ``swap`` takes d(p, n) between memory rows (PML: its issue #748, as above).
"""

import torch
from torch.nn import Module

from .. import distances, indexed, mining
from .._checks import tensor_argument
from .._library import REDUCTIONS

# Above this N*M*M, listing every triplet (what PML does) is refused: its (N, M, M) mask alone is 64 MiB.
MAX_ALL_TRIPLETS_CUBE = 1 << 26


def _distance(distance):
    """(tripletloss_cuda distance name, normalize) of a PML distance object."""
    if distance is None:
        return "euclidean", True  # PML's default LpDistance(p=2): normalized embeddings, power 1
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

    name = type(distance).__name__
    if type(distance) is LpDistance:
        if distance.p != 2:
            raise NotImplementedError(
                f"TripletMarginLoss: distance=LpDistance(p={distance.p}) (only p=2 is reproduced)"
            )
        if distance.power not in (1, 2):
            raise NotImplementedError(
                f"TripletMarginLoss: distance=LpDistance(power={distance.power}) (only power 1 and 2 are reproduced)"
            )
        return ("euclidean" if distance.power == 1 else "squared_euclidean"), bool(distance.normalize_embeddings)
    if type(distance) is CosineSimilarity:
        if distance.power != 1 or distance.p != 2:
            raise NotImplementedError(
                f"TripletMarginLoss: distance=CosineSimilarity(p={distance.p}, power={distance.power}) "
                "(only p=2, power=1 is reproduced)"
            )
        return "cosine", True
    raise NotImplementedError(
        f"TripletMarginLoss: distance={name} is not reproduced (LpDistance with p=2 and CosineSimilarity are)"
    )


def _reduction(reducer):
    if reducer is None:
        return "mean_nonzero"  # PML's default AvgNonZeroReducer
    from pytorch_metric_learning.reducers import AvgNonZeroReducer, MeanReducer, SumReducer

    if type(reducer) is AvgNonZeroReducer and reducer.low == 0 and reducer.high is None:
        return "mean_nonzero"
    if type(reducer) is MeanReducer:
        return "mean"
    if type(reducer) is SumReducer:
        return "sum"
    raise NotImplementedError(
        f"TripletMarginLoss: reducer={type(reducer).__name__} is not reproduced "
        "(AvgNonZeroReducer, MeanReducer and SumReducer are)"
    )


def _check_labels(embeddings, labels, what="embeddings"):
    if labels is None:
        return None
    tensor_argument("TripletMarginLoss.forward", "labels" if what == "embeddings" else "ref_labels", 2, labels)
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError("Number of embeddings must equal number of labels")
    if labels.ndim != 1:
        raise ValueError("labels must be a 1D tensor of shape (batch_size,)")
    return labels.to(embeddings.device)


def _class_ids(labels, ref_labels):
    """int64 class ids with the same equalities (PML compares labels of any dtype with ==)."""
    if ref_labels is None and not (labels.dtype.is_floating_point or labels.dtype.is_complex):
        return labels, None
    both = labels if ref_labels is None else torch.cat([labels, ref_labels.to(labels.dtype)])
    ids = torch.unique(both, return_inverse=True)[1]
    return ids[: labels.shape[0]], None if ref_labels is None else ids[labels.shape[0] :]


def all_triplets(labels, ref_labels=None, self_index=None):
    """Every valid triplet as PML's get_all_triplets_indices lists them: (a, p, n) with y_a == y_p, y_a != y_n,
    p != self_index[a] (N,) (-1: none; default: p != a when the batch is its own reference set)."""
    if self_index is None and ref_labels is None:
        self_index = torch.arange(labels.shape[0], device=labels.device)
    ref_labels = labels if ref_labels is None else ref_labels
    matches = labels[:, None] == ref_labels[None, :]
    diffs = ~matches
    if self_index is not None:
        matches &= torch.arange(ref_labels.shape[0], device=labels.device) != self_index[:, None]
    return torch.where(matches[:, :, None] & diffs[:, None, :])


def pairs_to_triplets(a1, p, a2, n):
    """PML's convert_to_triplets for pairs: every positive pair (a1, p) with every negative pair of its anchor."""
    p_idx, n_idx = torch.where(a1.unsqueeze(1) == a2)
    return a1[p_idx], p[p_idx], n[n_idx]


class TripletMarginLoss(Module):
    """pytorch_metric_learning.losses.TripletMarginLoss (2.9) on tripletloss_cuda's fused ops; see the module
    docstring for what is reproduced and how."""

    def __init__(
        self,
        margin=0.05,
        swap=False,
        smooth_loss=False,
        triplets_per_anchor="all",
        distance=None,
        reducer=None,
        embedding_regularizer=None,
        embedding_reg_weight=1,
        collect_stats=False,
    ):
        super().__init__()
        if embedding_regularizer is not None:
            raise NotImplementedError("TripletMarginLoss: embedding_regularizer is not reproduced")
        if collect_stats:
            raise NotImplementedError("TripletMarginLoss: collect_stats=True is not reproduced")
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor
        self.distance = distance
        self.reducer = reducer
        self._distance, self._normalize = _distance(distance)
        self._reduction = _reduction(reducer)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return self._forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, ref_self_index=None):
        """forward; ``ref_self_index`` (N,) int64 (private: CrossBatchMemory's slots), without an indices_tuple:
        the reference that is anchor i itself (or -1), not among its positives (PML's remove_self_comparisons)."""
        tensor_argument("TripletMarginLoss.forward", "embeddings", 1, embeddings)
        # PML drops the pairs (i, i) from the triplets it lists when ref_labels is the labels object itself.
        if ref_self_index is None and ref_emb is not None and ref_labels is not None and ref_labels is labels:
            i = torch.arange(embeddings.shape[0], device=embeddings.device)
            ref_self_index = torch.where(i < ref_emb.shape[0], i, -1)
        labels = _check_labels(embeddings, labels)
        if labels is None and indices_tuple is None:
            raise ValueError("labels and indices_tuple cannot both be None")
        if ref_emb is not None:
            tensor_argument("TripletMarginLoss.forward", "ref_emb", 4, ref_emb)
            ref_labels = _check_labels(ref_emb, ref_labels, "ref_emb")
        kwargs = {"margin": float(self.margin), "distance": self._distance, "normalize": self._normalize}
        if indices_tuple is None:
            if self.triplets_per_anchor != "all":
                raise NotImplementedError(
                    f"TripletMarginLoss: triplets_per_anchor={self.triplets_per_anchor!r} without an indices_tuple "
                    "(PML samples random triplets) is not reproduced; use 'all' or pass a miner's indices_tuple"
                )
            if (
                not self.swap
                and not self.smooth_loss
                and self.margin >= 0
                and (ref_emb is None or ref_labels is not None)
            ):
                # With a reference set, PML's all triplets are every reference of the anchor's label as a
                # positive (no self exclusion): the reference-set batch-all's semantics without ref_self_index.
                labels, ref_labels = _class_ids(labels, ref_labels)
                refs = {} if ref_emb is None else {"ref_embeddings": ref_emb, "ref_labels": ref_labels}
                if ref_self_index is not None:
                    refs["ref_self_index"] = ref_self_index
                return mining.batch_all_triplet_loss(embeddings, labels, reduction=self._reduction, **refs, **kwargs)
            indices_tuple = self._all_triplets(embeddings, labels, ref_emb, ref_labels, ref_self_index)
        elif len(indices_tuple) == 4:
            indices_tuple = pairs_to_triplets(*indices_tuple)
        elif len(indices_tuple) != 3:
            raise ValueError(
                "indices_tuple should be a tuple of 3 (anchors, positives, negatives) or 4 (a1, p, a2, n) tensors, "
                f"got {len(indices_tuple)}"
            )
        anchors, positives, negatives = (torch.as_tensor(i, device=embeddings.device) for i in indices_tuple)
        if ref_emb is None and anchors.shape[0] > embeddings.shape[0] ** 2 // 2:
            return self._dense_triplets(embeddings, anchors, positives, negatives, kwargs)
        return indexed.triplet_margin_loss_from_indices(
            embeddings,
            anchors,
            positives,
            negatives,
            ref_embeddings=ref_emb,
            swap=bool(self.swap),
            soft=bool(self.smooth_loss),
            reduction=self._reduction,
            **kwargs,
        )

    # The cross-batch memory's protocol (tripletloss_cuda/mining/memory.py): PML 2.9's CrossBatchMemory without a
    # miner, each anchor's own slot excluded.
    def cross_batch_check(self, embeddings, labels):
        tensor_argument("CrossBatchMemory.forward", "embeddings", 1, embeddings)
        tensor_argument("CrossBatchMemory.forward", "labels", 2, labels)
        if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                "CrossBatchMemory: embeddings should be (N, D) and labels (N,), "
                f"got shapes {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        return labels.to(embeddings.device)

    def cross_batch_label_dtype(self, labels):
        return labels.dtype  # PML's label memory takes the labels' dtype

    def cross_batch_loss(self, embeddings, labels, memory_embeddings, memory_labels, self_index):
        return self._forward(
            embeddings, labels, None, memory_embeddings, memory_labels, ref_self_index=self_index
        ), None

    def _dense_triplets(self, embeddings, anchors, positives, negatives, kwargs):
        """More triplets than N^2 / 2 (e.g. TripletMarginMiner's on a whole batch): reading rows per triplet would
        cost more than one (N, N) distance matrix (two matrix products each way), so the triplets' distances are
        gathered from that matrix, as PML does, but built in place (distances.matrix)."""
        dist = distances.matrix(
            distances.rows(embeddings, kwargs["distance"], kwargs["normalize"]), None, kwargs["distance"]
        )
        d_an = dist[anchors, negatives]
        if self.swap:
            d_an = torch.minimum(d_an, dist[positives, negatives])
        h = kwargs["margin"] + dist[anchors, positives] - d_an
        losses = torch.nn.functional.softplus(h) if self.smooth_loss else torch.relu(h)
        return indexed.reference.reduce(losses, REDUCTIONS[self._reduction], embeddings.dtype)

    def _all_triplets(self, embeddings, labels, ref_emb, ref_labels, ref_self_index):
        n = embeddings.shape[0]
        m = n if ref_emb is None else ref_emb.shape[0]
        options = [o for o, on in (("swap=True", self.swap), ("smooth_loss=True", self.smooth_loss)) if on]
        options += ["margin < 0"] if self.margin < 0 else []
        if ref_emb is not None and ref_labels is None:
            raise ValueError("TripletMarginLoss: ref_emb without an indices_tuple needs ref_labels")
        if n * m * m > MAX_ALL_TRIPLETS_CUBE:
            raise NotImplementedError(
                f"TripletMarginLoss: {', '.join(options)} without an indices_tuple lists every triplet as PML does, "
                f"refused for N*M*M = {n * m * m} > {MAX_ALL_TRIPLETS_CUBE}; pass a miner's indices_tuple"
            )
        return all_triplets(labels, ref_labels, ref_self_index)

    def extra_repr(self):
        return (
            f"margin={self.margin}, swap={self.swap}, smooth_loss={self.smooth_loss}, "
            f"distance={self._distance!r}, normalize={self._normalize}, reduction={self._reduction!r}"
        )
