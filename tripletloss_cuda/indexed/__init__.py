"""The triplet margin loss over index triplets (anchors, positives, negatives), e.g. from a miner.

api.py        triplet_margin_loss_from_indices (semantics in its docstring)
ops.py        the compiled ops' autograd Function and fake kernels, with the fallback to the reference
reference.py  the pure-PyTorch version (gather + elementwise): the fallback and the tests' oracle
"""

from . import ops, reference
from .api import DISTANCES, REDUCTIONS, triplet_margin_loss_from_indices

__all__ = ["DISTANCES", "REDUCTIONS", "ops", "reference", "triplet_margin_loss_from_indices"]
