"""Argument checks shared by the parts of the package, with PyTorch's error types and messages."""

import torch


def tensor_argument(function, name, position, value):
    """PyTorch's TypeError for a non-tensor argument (as its argument parser words it)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{function}(): argument '{name}' (position {position}) must be Tensor, not {type(value).__name__}"
        )


def check_ref_embeddings(embeddings, ref_embeddings):
    """A reference set (M, D) for embeddings (N, D): their width, dtype and device."""
    if ref_embeddings.dim() != 2 or ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings should be a 2D tensor (M, {embeddings.shape[1]}) (the width of embeddings), "
            f"got shape {tuple(ref_embeddings.shape)}"
        )
    if ref_embeddings.dtype != embeddings.dtype:
        raise TypeError(
            f"ref_embeddings should have the dtype of embeddings {embeddings.dtype}, got {ref_embeddings.dtype}"
        )
    if ref_embeddings.device != embeddings.device:
        raise ValueError(
            f"ref_embeddings should be on the device of embeddings {embeddings.device}, got {ref_embeddings.device}"
        )
