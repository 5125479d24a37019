"""nn.Module wrappers with the constructor signatures of their torch.nn counterparts."""

from torch.nn.modules.loss import _Loss

from . import functional


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
