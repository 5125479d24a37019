"""nn.Module wrappers with the constructor signatures of their torch.nn counterparts."""

from torch import nn
from torch.nn.modules.loss import _Loss

from . import functional
from .functional import CosineDistance

__all__ = ["CosineDistance", "TripletMarginLoss", "TripletMarginWithDistanceLoss"]


class TripletMarginLoss(_Loss):
    """Drop-in for torch.nn.TripletMarginLoss, computed by the fused kernels
    (see :func:`tripletloss_cuda.triplet_margin_loss`)."""

    __constants__ = ("margin", "p", "eps", "swap", "reduction")

    def __init__(self, margin=1.0, p=2.0, eps=1e-6, swap=False, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        if margin <= 0:
            raise ValueError(f"TripletMarginLoss: expected margin to be greater than 0, got {margin} instead")
        self.margin = margin
        self.p = p
        self.eps = eps
        self.swap = swap

    def forward(self, anchor, positive, negative):
        return functional.triplet_margin_loss(
            anchor,
            positive,
            negative,
            margin=self.margin,
            p=self.p,
            eps=self.eps,
            swap=self.swap,
            reduction=self.reduction,
        )


class TripletMarginWithDistanceLoss(_Loss):
    """Drop-in for torch.nn.TripletMarginWithDistanceLoss, fused for the distance functions
    :func:`tripletloss_cuda.triplet_margin_with_distance_loss` recognizes (the default nn.PairwiseDistance() among
    them); any other runs PyTorch's loss."""

    def __init__(self, *, distance_function=None, margin=1.0, swap=False, reduction="mean"):
        super().__init__(size_average=None, reduce=None, reduction=reduction)
        if margin <= 0:
            raise ValueError(
                f"TripletMarginWithDistanceLoss: expected margin to be greater than 0, got {margin} instead"
            )
        self.distance_function = distance_function if distance_function is not None else nn.PairwiseDistance()
        self.margin = margin
        self.swap = swap

    def forward(self, anchor, positive, negative):
        return functional.triplet_margin_with_distance_loss(
            anchor,
            positive,
            negative,
            distance_function=self.distance_function,
            margin=self.margin,
            swap=self.swap,
            reduction=self.reduction,
        )
