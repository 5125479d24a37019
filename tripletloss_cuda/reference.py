"""Pure-PyTorch triplet margin loss: the fallback when no compiled kernel fits, and the test oracle.

Written from PyTorch's definition (aten/src/ATen/native/Loss.cpp `triplet_margin_loss` and
Distance.cpp `pairwise_distance`), independently of the kernels in csrc/:

    d(x, y) = || x - y + eps ||_p      over the last dimension (eps added to every component); or, by
                                       the distance code (tripletloss_cuda/distances.py TRIPLET_CODES):
              1 - F.cosine_similarity(x, y, dim=-1, eps=eps)                        (cosine), or
              1 - <F.normalize(x, dim=-1, eps=eps), F.normalize(y, dim=-1, eps=eps)> (normalized cosine,
                                       sentence-transformers' COSINE)
    d_neg   = min(d(a, n), d(p, n))    with swap, else d(a, n)
    loss_i  = max(d(a, p) - d_neg + margin, 0)

Built from differentiable torch ops, so its gradients (of any order) are PyTorch's own.
"""

import torch
import torch.nn.functional as F

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def pairwise_distance(x1, x2, p=2.0, eps=1e-6):
    """|| x1 - x2 + eps ||_p over the last dimension, as torch.pairwise_distance computes it."""
    return torch.linalg.vector_norm(x1 - x2 + eps, ord=p, dim=-1)


def row_distance(x1, x2, p=2.0, eps=1e-6, distance=0):
    """The distance of row pairs by its code: 0 pairwise_distance, 1 the cosine distance of
    F.cosine_similarity, 2 and 3 that of F.normalized rows (3 differs only in the kernels' gradient at a norm of
    exactly eps; here the installed torch's F.normalize decides)."""
    if distance == 0:
        return pairwise_distance(x1, x2, p, eps)
    if distance == 1:
        return 1 - F.cosine_similarity(x1, x2, dim=-1, eps=eps)
    return 1 - (F.normalize(x1, dim=-1, eps=eps) * F.normalize(x2, dim=-1, eps=eps)).sum(-1)


def _check_dims(anchor, positive, negative):
    a, p, n = anchor.dim(), positive.dim(), negative.dim()
    if not (a == p == n):
        raise RuntimeError(
            "The anchor, positive, and negative tensors are expected to have the same number of "
            f"dimensions, but got: anchor {a}D, positive {p}D, and negative {n}D inputs"
        )


def triplet_margin_loss(
    anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction=1, distance=0, relu=False
):
    """Triplet margin loss with ATen's semantics; reduction is 0/1/2 (none/mean/sum) or its name; distance a code
    of ``row_distance``; ``relu``: the hinge is F.relu (sentence-transformers), whose gradient at exactly 0 is
    0 in every release, rather than clamp_min (PyTorch's losses).

    Accepts any margin (like the raw ``torch.triplet_margin_loss``); the public API checks it.
    """
    if isinstance(reduction, str):
        reduction = REDUCTIONS[reduction]
    _check_dims(anchor, positive, negative)
    d_pos = row_distance(anchor, positive, p, eps, distance)
    d_neg = row_distance(anchor, negative, p, eps, distance)
    if swap:
        d_neg = torch.minimum(d_neg, row_distance(positive, negative, p, eps, distance))
    loss = torch.relu(margin + d_pos - d_neg) if relu else torch.clamp_min(margin + d_pos - d_neg, 0)
    if reduction == 1:
        return loss.mean()
    if reduction == 2:
        return loss.sum()
    return loss
