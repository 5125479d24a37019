"""Cross-batch memory (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning"; pytorch-metric-learning's
CrossBatchMemory): a ring buffer of past embeddings that every batch is mined against.

    criterion = tl.CrossBatchMemory(tl.BatchHardTripletLoss(margin=0.2), embedding_size=128, memory_size=4096)
    loss = criterion(embeddings, labels)

Each call enqueues the batch (detached copies of its embeddings, and its labels) into the next ``N`` slots of
the ring, oldest first overwritten, then mines the batch's anchors against the whole memory (the slots
filled so far until it is full) with the loss's reference sets, each anchor's own slot excluded
(``ref_self_index``): pytorch-metric-learning's semantics. Gradients flow to the batch only (the memory
holds constants). The queue position is host state (Python ints, in ``state_dict`` through extra state): no
host synchronization per call.

Under torch.distributed, a loss built with ``distributed=True`` makes every rank gather the global batch (rank
order, as the mining losses do), enqueue all of it in that same order, and mine the global batch against the
memory, so that all ranks hold identical memories and compute the same loss (gradients flow to each rank's own
rows; see tripletloss_cuda/mining/distributed.py for the scale under DistributedDataParallel).

The loss may also be the pytorch-metric-learning drop-in (tripletloss_cuda.integrations.pml.TripletMarginLoss):
then this is PML 2.9's ``CrossBatchMemory(TripletMarginLoss(...), embedding_size, memory_size)`` without a miner
(every triplet of the batch against the whole memory, each anchor's own slot removed), through the drop-in's
reference-set path with ``ref_self_index`` = the batch's slots; the label memory takes the labels' dtype, as in
PML. PML's ``miner``, ``indices_tuple`` and ``enqueue_mask`` are not reproduced (NotImplementedError).

The memory drives its loss through a small protocol (PROTOCOL), which the mining loss modules and the PML drop-in
implement, so that this module needs to know neither:
    loss.cross_batch_check(embeddings, labels) -> labels     checks the batch (the loss's own errors)
    loss.cross_batch_label_dtype(labels) -> dtype            of the label memory
    loss.cross_batch_loss(embeddings, labels, memory_embeddings, memory_labels, self_index) -> (loss, stats)
                                                             the batch against the memory (stats may be None)
    loss.distributed (optional)                              gather the global batch first (distributed=True)
"""

import torch
from torch.nn import Module

from . import api

PROTOCOL = ("cross_batch_check", "cross_batch_label_dtype", "cross_batch_loss")


class CrossBatchMemory(Module):
    """``CrossBatchMemory(loss, embedding_size, memory_size=1024)`` around one of the mining loss modules
    (BatchHardTripletLoss, BatchAllTripletLoss, BatchSemiHardTripletLoss) or the PML drop-in TripletMarginLoss.
    ``forward(embeddings, labels)`` returns the loss; ``last_stats`` (also set on the wrapped loss) the MiningStats
    of the last call (None with the PML drop-in). PML's ``miner`` (constructor), ``indices_tuple`` and
    ``enqueue_mask`` (forward) are accepted by name only to raise NotImplementedError.
    Buffers: ``embedding_memory`` (memory_size, embedding_size), in the dtype and on the device of the last
    batch, and ``label_memory`` (memory_size,) int64 (the labels' dtype with the PML drop-in). A batch may hold at most memory_size rows (the global
    batch, under distributed=True)."""

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None):
        super().__init__()
        if not all(callable(getattr(loss, method, None)) for method in PROTOCOL):
            raise TypeError(
                "CrossBatchMemory: loss should be a tripletloss_cuda mining loss module (BatchHardTripletLoss, "
                "BatchAllTripletLoss or BatchSemiHardTripletLoss) or tripletloss_cuda.integrations.pml."
                f"TripletMarginLoss (or implement {', '.join(PROTOCOL)}), got {type(loss).__name__}"
            )
        if miner is not None:
            raise NotImplementedError(
                "CrossBatchMemory: miner is not reproduced (every triplet of the batch against the memory is mined)"
            )
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CrossBatchMemory: {name} should be a positive int, got {value!r}")
        self.loss = loss
        self.embedding_size, self.memory_size = embedding_size, memory_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.int64))
        self.queue_idx, self.filled = 0, False
        self.last_stats = None

    def reset_queue(self):
        """Empties the memory (the buffers keep their dtype and device)."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx, self.filled = 0, False

    def get_extra_state(self):
        return {"queue_idx": self.queue_idx, "filled": self.filled}

    def set_extra_state(self, state):
        self.queue_idx, self.filled = int(state["queue_idx"]), bool(state["filled"])

    def _enqueue(self, embeddings, labels):
        """Writes the batch into the ring; returns its slots (N,) int64 on the device."""
        n = embeddings.shape[0]
        label_dtype = self.loss.cross_batch_label_dtype(labels)
        if self.embedding_memory.dtype != embeddings.dtype or self.embedding_memory.device != embeddings.device:
            self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
        if self.label_memory.dtype != label_dtype or self.label_memory.device != embeddings.device:
            self.label_memory = self.label_memory.to(embeddings.device, label_dtype)
        slots = torch.arange(self.queue_idx, self.queue_idx + n, device=embeddings.device) % self.memory_size
        with torch.no_grad():
            self.embedding_memory[slots] = embeddings.detach()
            self.label_memory[slots] = labels.to(label_dtype)
        previous, self.queue_idx = self.queue_idx, (self.queue_idx + n) % self.memory_size
        self.filled = self.filled or (n > 0 and self.queue_idx <= previous)
        return slots

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        for name, value in (("indices_tuple", indices_tuple), ("enqueue_mask", enqueue_mask)):
            if value is not None:
                raise NotImplementedError(f"CrossBatchMemory: {name} is not reproduced")
        labels = self.loss.cross_batch_check(embeddings, labels)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"CrossBatchMemory: embeddings should have {self.embedding_size} columns (embedding_size), "
                f"got shape {tuple(embeddings.shape)}"
            )
        if getattr(self.loss, "distributed", False):  # gather here, once: the memory is the same on every rank
            embeddings, labels, *_ = api.global_batch(embeddings, labels, None, None, None, True)
        if embeddings.shape[0] > self.memory_size:
            raise ValueError(
                f"CrossBatchMemory: a batch of {embeddings.shape[0]} rows does not fit a memory of "
                f"{self.memory_size} (memory_size)"
            )
        slots = self._enqueue(embeddings, labels)
        size = self.memory_size if self.filled else self.queue_idx
        memory = (self.embedding_memory[:size], self.label_memory[:size])
        loss, self.last_stats = self.loss.cross_batch_loss(embeddings, labels, *memory, slots)
        return loss

    def extra_repr(self):
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"
