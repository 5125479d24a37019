"""Online triplet mining: batch-hard, batch-all and semi-hard losses on a batch of embeddings with labels.

api.py          the functional API and the modules (semantics in its docstring)
ops.py          the compiled ops' autograd Function and fake kernels, with the fallback to the reference
reference.py    the pure-PyTorch version: the fallback and the tests' oracle
distributed.py  gathering the global batch for distributed=True
"""

from . import ops, reference  # distributed is imported where distributed=True needs it
from .api import (
    BATCH_ALL_REDUCTIONS,
    DISTANCES,
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    BatchSemiHardTripletLoss,
    MiningStats,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    semi_hard_triplet_loss,
)
from .memory import CrossBatchMemory

__all__ = [
    "BATCH_ALL_REDUCTIONS",
    "DISTANCES",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "BatchSemiHardTripletLoss",
    "CrossBatchMemory",
    "MiningStats",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "ops",
    "reference",
    "semi_hard_triplet_loss",
]
