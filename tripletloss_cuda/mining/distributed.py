"""Mining over the global batch of a torch.distributed job: every rank gathers every rank's embeddings and labels.

    emb, lab = tripletloss_cuda.mining.distributed.gather(embeddings, labels)   # what distributed=True does
    loss = tl.batch_hard_triplet_loss(embeddings, labels, distributed=True)

How the gradient comes out exact without a second collective: in the gathered batch this rank's slice IS its
local tensor (``torch.cat`` of the local tensor with the other ranks' detached copies), so autograd carries
dL/d(local embeddings) back to it; the other ranks' rows are constants here. Every rank computes the same full
loss L on the same global batch, and L depends on this rank's embeddings only through its own slice, so the
gradient each rank gets for its own embeddings is exactly the single-process dL/dx of those rows.

Under DistributedDataParallel: the model parameters' gradient on rank r is the part of dL/dθ that flows through
rank r's embeddings; DDP *averages* parameter gradients over the W ranks, so the update is
(1/W) · Σ_r (part_r) = (1/W) · dL/dθ: gradients are scaled by 1/world_size relative to the single-process loss
on the concatenated batch. Multiply the loss by ``torch.distributed.get_world_size()`` before ``backward()``
to get the single-process gradient (pytorch-metric-learning's DistributedLossWrapper does the same), or keep the
scale and adjust the learning rate. The loss value itself is the single-process one on every rank.

Ranks may hold different batch sizes (the last batch of an epoch): the sizes are gathered first and the
tensors are padded to the largest one for ``all_gather``, then cut back. Embedding width, dtype and label
dtype must agree across ranks (checked: a mismatch raises on every rank instead of hanging or mixing bytes).
"""

import torch
import torch.distributed as dist

# dtypes as numbers in the header that ranks exchange, to check that all ranks agree before the big all_gather
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16)
_DTYPES += (torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)
_DTYPE_CODES = {t: i for i, t in enumerate(_DTYPES)}


def _name(code):
    return str(_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(_DTYPES) else "other"


def _check(embeddings, labels):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "tripletloss_cuda.mining.distributed.gather needs an initialized torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"embeddings and labels should be tensors, got {type(embeddings).__name__} and {type(labels).__name__}"
        )
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings should be a 2D tensor (N, D), got {embeddings.dim()}D")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels should be a 1D tensor of {embeddings.shape[0]} elements (one per embedding), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.device != embeddings.device:
        raise ValueError(f"labels should be on the device of embeddings {embeddings.device}, got {labels.device}")


def _all_gather_padded(tensor, sizes, rank):
    """all_gather of tensors whose first dimension differs per rank (``sizes``): pad to the largest, gather,
    cut back. This rank's entry is ``tensor`` itself (autograd keeps flowing to it); the others are detached."""
    largest = max(sizes)
    padded = tensor.detach()
    if tensor.shape[0] < largest:
        padded = torch.cat([padded, padded.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))])
    # Sent as bytes: every backend takes uint8 (gloo lacks some 16-bit and unsigned types), and it is bit-exact.
    raw = padded.contiguous().view(torch.uint8)
    parts = [torch.empty_like(raw) for _ in sizes]
    dist.all_gather(parts, raw)
    parts = [part.view(tensor.dtype)[:n] for part, n in zip(parts, sizes)]
    return torch.cat([tensor if r == rank else part for r, part in enumerate(parts)])


def gather(embeddings, labels, return_sizes=False):
    """All ranks' ``embeddings`` (N_r, D) and ``labels`` (N_r,) concatenated in rank order, on every rank.

    This rank's slice of the result is its local tensor (gradients flow to it); the other slices are constants.
    With a world size of 1 the inputs are returned as they are. Raises RuntimeError when torch.distributed is
    not initialized or when ranks disagree on the embedding width or dtypes. See the module docstring for the
    gradient scale under DistributedDataParallel.
    """
    _check(embeddings, labels)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return (embeddings, labels, [embeddings.shape[0]]) if return_sizes else (embeddings, labels)
    # One small all_gather of (N, D, dtype codes) first: sizes for the padding, and agreement on the rest. NCCL
    # needs the header on the GPU; gloo takes CPU (or CUDA) tensors, so the embeddings' device works for both.
    codes = [_DTYPE_CODES.get(t, -1) for t in (embeddings.dtype, labels.dtype)]
    header = torch.tensor([embeddings.shape[0], embeddings.shape[1], *codes], device=embeddings.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header)
    headers = torch.stack(headers).tolist()
    if any(h[1:] != headers[0][1:] for h in headers):
        raise RuntimeError(
            "tripletloss_cuda.mining.distributed.gather: ranks disagree on the embedding width or dtypes, got "
            + ", ".join(
                f"rank {r}: D={h[1]} {_name(h[2])} embeddings, {_name(h[3])} labels" for r, h in enumerate(headers)
            )
        )
    sizes = [h[0] for h in headers]
    out = _all_gather_padded(embeddings, sizes, rank), _all_gather_padded(labels, sizes, rank)
    return (*out, sizes) if return_sizes else out


def gather_sets(embeddings, labels, ref_embeddings=None, ref_labels=None, ref_self_index=None):
    """What distributed=True mines: (embeddings, labels, ref_embeddings, ref_labels, ref_self_index) of all
    ranks, each set concatenated in rank order; ``ref_self_index`` (rows of this rank's references, or -1)
    shifted to rows of the gathered references. Without reference sets the last three stay None."""
    embeddings, labels, sizes = gather(embeddings, labels, return_sizes=True)
    if ref_embeddings is None:
        return embeddings, labels, None, None, None
    ref_embeddings, ref_labels, ref_sizes = gather(ref_embeddings, ref_labels, return_sizes=True)
    if ref_self_index is not None:
        rank = dist.get_rank()
        shifted = torch.where(ref_self_index >= 0, ref_self_index + sum(ref_sizes[:rank]), -1)
        ref_self_index = _all_gather_padded(shifted, sizes, rank)
    return embeddings, labels, ref_embeddings, ref_labels, ref_self_index
