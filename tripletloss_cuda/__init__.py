"""Fused triplet margin loss for PyTorch: one kernel launch forward, one backward.

import tripletloss_cuda as tl
loss = tl.triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False)
criterion = tl.TripletMarginLoss(margin=1.0)

With a distance function, as torch.nn.functional.triplet_margin_with_distance_loss (fused for pairwise_distance,
nn.PairwiseDistance, tl.cosine_distance and tl.CosineDistance; any other callable runs PyTorch's loss):
loss = tl.triplet_margin_with_distance_loss(anchor, positive, negative, distance_function=tl.cosine_distance)
criterion = tl.TripletMarginWithDistanceLoss(distance_function=tl.CosineDistance(), margin=0.5)

Online mining on a batch of embeddings with labels (see tripletloss_cuda.mining):
loss = tl.batch_hard_triplet_loss(embeddings, labels, margin=1.0)   # also batch_all_, semi_hard_
loss = tl.batch_all_triplet_loss(queries, labels, ref_embeddings=bank, ref_labels=bank_labels, chunk_size=1024)
criterion = tl.CrossBatchMemory(tl.BatchHardTripletLoss(), embedding_size=128, memory_size=4096)

A mined batch larger than the model fits, embedded in chunks with cached embedding gradients (GradCache):
loss = tl.cached_loss_backward(model, inputs, labels, tl.batch_hard_triplet_loss, chunk_size=64)

Over index triplets (e.g. a miner's): tl.triplet_margin_loss_from_indices(embeddings, anchors, positives, negatives).
Drop-in losses for pytorch-metric-learning and sentence-transformers: tripletloss_cuda.integrations.
"""

import torch

from . import _library, gradcache, indexed, mining, naive, ops, reference
from .functional import cosine_distance, triplet_margin_loss, triplet_margin_with_distance_loss
from .gradcache import cached_loss_backward
from .indexed import triplet_margin_loss_from_indices
from .mining import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    CrossBatchMemory,
    MiningStats,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    semi_hard_triplet_loss,
)
from .modules import CosineDistance, TripletMarginLoss, TripletMarginWithDistanceLoss

_library.check_required(ops.OPS + mining.ops.OPS + indexed.ops.OPS)  # TRIPLETLOSS_CUDA_REQUIRE

__version__ = "0.1.0"
__all__ = [
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
    "CosineDistance",
    "CrossBatchMemory",
    "MiningStats",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "cached_loss_backward",
    "cosine_distance",
    "gradcache",
    "indexed",
    "info",
    "mining",
    "naive",
    "ops",
    "reference",
    "semi_hard_triplet_loss",
    "triplet_margin_loss",
    "triplet_margin_loss_from_indices",
    "triplet_margin_with_distance_loss",
]


def info():
    """What is compiled and what will run: a dict of versions, kernels and devices. ``extension_status`` is
    "loaded", "not built" (pure Python, the reference everywhere) or "failed to load" (``extension_error`` and
    ``extension_problem`` say why; the reference runs instead)."""
    cuda_ok = torch.cuda.is_available()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "built_with_torch": _library.BUILD.get("torch"),
        "stable_abi": _library.BUILD.get("stable_abi"),
        "extension_status": _library.STATUS,
        "extension_file": _library.FILE,
        "extension_loaded": _library.STATUS == "loaded",
        "extension_error": None if _library.ERROR is None else str(_library.ERROR),
        "extension_problem": _library.problem(),
        "kernels": sorted(ops.KERNEL_DEVICES),
        "mining_kernels": sorted(mining.ops.KERNEL_DEVICES),
        "indexed_kernels": sorted(indexed.ops.KERNEL_DEVICES),
        "cuda_architectures": _library.BUILD.get("cuda_archs", ""),
        "cuda_available": cuda_ok,
        "cuda_device": torch.cuda.get_device_name() if cuda_ok else None,
        "default_device": "cuda" if cuda_ok and "cuda" in ops.KERNEL_DEVICES else "cpu",
    }
