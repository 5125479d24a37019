"""Pure-PyTorch triplet margin loss: the fallback when no compiled kernel fits, and the test oracle.

Written from PyTorch's definition (aten/src/ATen/native/Loss.cpp `triplet_margin_loss` and
Distance.cpp `pairwise_distance`), independently of the kernels in csrc/:

    d(x, y) = || x - y + eps ||_p      over the last dimension (eps added to every component)
    d_neg   = min(d(a, n), d(p, n))    with swap, else d(a, n)
    loss_i  = max(d(a, p) - d_neg + margin, 0)

Built from differentiable torch ops, so its gradients (of any order) are PyTorch's own.
"""

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def pairwise_distance(x1, x2, p=2.0, eps=1e-6):
    """|| x1 - x2 + eps ||_p over the last dimension, as torch.pairwise_distance computes it."""
    return torch.linalg.vector_norm(x1 - x2 + eps, ord=p, dim=-1)


def _check_dims(anchor, positive, negative):
    a, p, n = anchor.dim(), positive.dim(), negative.dim()
    if not (a == p == n):
        raise RuntimeError(
            "The anchor, positive, and negative tensors are expected to have the same number of "
            f"dimensions, but got: anchor {a}D, positive {p}D, and negative {n}D inputs"
        )


def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction=1):
    """Triplet margin loss with ATen's semantics; reduction is 0/1/2 (none/mean/sum) or its name.

    Accepts any margin (like the raw ``torch.triplet_margin_loss``); the public API checks it.
    """
    if isinstance(reduction, str):
        reduction = REDUCTIONS[reduction]
    _check_dims(anchor, positive, negative)
    d_pos = pairwise_distance(anchor, positive, p, eps)
    d_neg = pairwise_distance(anchor, negative, p, eps)
    if swap:
        d_neg = torch.minimum(d_neg, pairwise_distance(positive, negative, p, eps))
    loss = torch.clamp_min(margin + d_pos - d_neg, 0)
    if reduction == 1:
        return loss.mean()
    if reduction == 2:
        return loss.sum()
    return loss
