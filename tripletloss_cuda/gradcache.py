"""Mined batches larger than the model fits: cached embedding gradients (GradCache, Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

    loss = tl.cached_loss_backward(model, inputs, labels, tl.batch_hard_triplet_loss, chunk_size=64)
    optimizer.step()

A mining loss couples every embedding of the batch to every other, so the batch cannot simply be split into
micro-batches with gradient accumulation: the triplets mined from a part are not those of the whole. The
loss, though, only needs the embeddings, and the model's gradient is
dL/dθ = Σ_chunks (dL/d emb_chunk) · d emb_chunk/dθ. So:

1. embed the batch chunk by chunk under ``torch.no_grad()`` (no activations kept), saving each chunk's RNG
   state first (CPU and, for the CUDA devices of the inputs and parameters, CUDA);
2. compute the loss on the whole batch of embeddings, detached and requiring grad, and backpropagate it to
   get dL/d(embeddings) (N x D) — the loss function's own parameters, if any, get their gradients here;
3. run each chunk again with grad, with its RNG state restored (so dropout draws the same masks), and
   backpropagate its slice of the cached gradient: ``emb_chunk.backward(grad_chunk)``.

Peak activation memory is the larger of one chunk's and the loss's (for the mining losses O(N^2): the
distance matrix), plus the N x D caches (the embeddings, then their gradient); the price is a second
forward pass of the model.
"""

import contextlib
import operator

import torch

__all__ = ["SavedTensorMemory", "cached_loss_backward"]


def _batch_size(inputs):
    """N, the common size of dim 0 of the tensors in ``inputs`` (a tensor, or a dict/tuple/list of them)."""
    if isinstance(inputs, torch.Tensor):
        items = [("inputs", inputs)]
    elif isinstance(inputs, dict):
        items = [(f"inputs[{k!r}]", v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    elif isinstance(inputs, (tuple, list)):
        items = [(f"inputs[{i}]", v) for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
    else:
        raise TypeError(f"inputs should be a tensor or a dict, tuple or list of tensors, got {type(inputs).__name__}")
    if not items:
        raise TypeError("inputs should hold at least one tensor (the batch, split along dim 0), got none")
    sizes = {}
    for name, t in items:
        if t.dim() == 0:
            raise ValueError(f"{name} should have a batch dimension (dim 0), got a 0-d tensor")
        sizes[name] = t.shape[0]
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        got = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"the tensors in inputs should have the same size along dim 0, got {got}")
    return n


def _chunk(inputs, start, stop):
    """Rows start:stop of every tensor in ``inputs`` (views); other dict/tuple values are passed unchanged."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict):
        return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return type(inputs)(v[start:stop] if isinstance(v, torch.Tensor) else v for v in inputs)


def _call(model, chunk, rows):
    out = model(*chunk) if isinstance(chunk, (tuple, list)) else model(chunk)
    if not isinstance(out, torch.Tensor):
        hint = ' (for a sentence-transformers model pass lambda f: model(f)["sentence_embedding"])'
        raise TypeError(
            f"model should return a tensor of embeddings, got {type(out).__name__}"
            + (hint if isinstance(out, dict) else "")
        )
    if out.dim() == 0 or out.shape[0] != rows or not out.dtype.is_floating_point:
        raise ValueError(
            f"model should return floating embeddings with one row per input ({rows} rows in this chunk), "
            f"got a {out.dtype} tensor of shape {tuple(out.shape)}"
        )
    return out


def _cuda_devices(inputs, model):
    """The CUDA devices whose RNG the model may draw from: those of the input tensors and parameters."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if isinstance(model, torch.nn.Module):
        tensors += list(model.parameters()) + list(model.buffers())
    return sorted({t.device.index for t in tensors if t.device.type == "cuda"})


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


@contextlib.contextmanager
def _restored_rng(state, devices):
    """Run with the RNG state of the first pass; the caller's state is back afterwards (as in checkpoint)."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda, strict=True):
            torch.cuda.set_rng_state(s, d)
        yield


def cached_loss_backward(model, inputs, labels, loss_fn, chunk_size):
    """One training step's backward over a batch embedded ``chunk_size`` rows at a time: the parameters'
    gradients of ``loss_fn(model(inputs), labels)`` for the whole batch, with the activations of one chunk in
    memory at a time. Call ``optimizer.zero_grad()`` before and ``optimizer.step()`` after, as for
    ``loss.backward()``.

    model: a callable returning (rows, D) floating embeddings, usually an ``nn.Module`` (in train or eval
        mode: the mode is not changed). A tensor input is passed as ``model(chunk)``, a dict as
        ``model(dict_chunk)`` (sentence-transformers' features), a tuple or list as ``model(*chunk)``.
    inputs: a tensor or a dict/tuple/list of tensors with the same size N along dim 0, split along it;
        non-tensor values of a dict/tuple/list go unchanged to every chunk.
    labels: a tensor with N rows, passed whole to ``loss_fn``.
    loss_fn: ``loss_fn(embeddings (N, D), labels)`` returning a scalar loss tensor, or a tuple whose first
        element is one (``return_stats=True``): any of the mining losses or modules, or a user callable.
    chunk_size: a positive int; chunk_size >= N embeds the batch in one chunk, a last chunk may be smaller.

    Returns the loss, detached, or a tuple (loss detached, what else loss_fn returned) when it returned a tuple.

    Guarantees: the parameters' gradients equal those of the full-batch ``loss_fn(model(inputs),
    labels).backward()`` up to floating-point rounding (the batch is embedded by chunks), and are
    *accumulated* into ``.grad`` exactly as that backward would. Dropout and other random ops draw the same
    numbers in both passes of a chunk: its CPU RNG state and the RNG states of the CUDA devices of the inputs
    and parameters are saved before the first pass and restored for the second (as
    ``torch.utils.checkpoint`` does); afterwards the global RNG is where the first pass left it. The loss
    function runs once. The parameters' gradients are those of the loss even when it does not depend on the
    embeddings (zeros then, where the plain backward would leave ``.grad`` untouched).

    Not equivalent: layers that mix rows of a batch (BatchNorm in train mode sees chunk statistics, not the
    batch's, and updates its running statistics twice per chunk); non-deterministic model kernels (the second
    pass then differs from the first by their noise).

    torch.distributed: a model with a ``no_sync()`` context manager (``DistributedDataParallel``) runs every
    chunk's second pass but the last inside it, so the gradients are all-reduced once, at the last chunk, as
    in gradient accumulation; every rank must then call this with the same number of chunks (DDP needs the
    same forwards and backwards on every rank). ``loss_fn`` may mine across ranks (``distributed=True``): it
    runs once per rank on the detached embeddings, and its backward (through the gather) gives each rank's
    gradient of its own embeddings.
    """
    if not callable(model) or not callable(loss_fn):
        raise TypeError(
            f"model and loss_fn should be callable, got {type(model).__name__} and {type(loss_fn).__name__}"
        )
    if isinstance(chunk_size, bool):
        raise TypeError("chunk_size should be a positive int, got bool")
    try:
        chunk_size = operator.index(chunk_size)
    except TypeError:
        raise TypeError(f"chunk_size should be a positive int, got {type(chunk_size).__name__}") from None
    if chunk_size <= 0:
        raise ValueError(f"chunk_size should be a positive int, got {chunk_size}")
    n = _batch_size(inputs)
    if n == 0:
        raise ValueError("inputs should hold at least one row, got an empty batch")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels should be a tensor, got {type(labels).__name__}")
    if labels.dim() == 0 or labels.shape[0] != n:
        raise ValueError(f"labels should have {n} rows (one per input), got shape {tuple(labels.shape)}")

    bounds = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    devices = _cuda_devices(inputs, model)
    states, parts = [], []
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(devices))
            parts.append(_call(model, _chunk(inputs, start, stop), stop - start))
    embeddings = torch.cat(parts).requires_grad_()
    del parts

    with torch.enable_grad():
        result = loss_fn(embeddings, labels)
        loss = result[0] if isinstance(result, tuple) else result
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn should return a scalar loss tensor (or a tuple starting with one), got "
                + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__)
            )
        if not loss.requires_grad:
            raise RuntimeError("the loss does not require grad: loss_fn should compute it from the embeddings")
        loss.backward()
        grad = embeddings.grad if embeddings.grad is not None else torch.zeros_like(embeddings)
        # Free the embeddings (the loss's graph holds them) before the second pass; keep the gradient.
        returned = (loss.detach(), *result[1:]) if isinstance(result, tuple) else loss.detach()
        del embeddings, result, loss

        no_sync = getattr(model, "no_sync", None)
        for i, ((start, stop), state) in enumerate(zip(bounds, states, strict=True)):
            last = i == len(bounds) - 1
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync, _restored_rng(state, devices):
                out = _call(model, _chunk(inputs, start, stop), stop - start)
                out.backward(grad[start:stop].to(out.dtype))
    return returned


class SavedTensorMemory:
    """Measures activation memory: the bytes of the tensors autograd saves for backward, live at once.

        with tl.gradcache.SavedTensorMemory(exclude=model.parameters()) as mem:
            loss_fn(model(x), labels).backward()
        mem.peak_bytes

    A ``torch.autograd.graph.saved_tensors_hooks`` pair counts each saved tensor's storage once while any
    graph node holds it (several nodes saving one tensor, or views of one storage, count once), and uncounts
    it when autograd releases it (after its backward, or when the graph is freed). Storages of ``exclude``
    (the parameters: they are not activations) are not counted. Tensors computed under no_grad and kept by
    the caller (the embedding cache of :func:`cached_loss_backward`) are not saved tensors and not counted.
    """

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._live = {}  # storage pointer -> [number of holders, bytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._exclude or tensor.device.type == "meta":
            return tensor
        entry = self._live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current_bytes += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        entry[0] += 1
        # Detached: holding the tensor itself would keep its grad_fn, which holds this holder (a cycle through
        # C++ that the garbage collector cannot see), and an unused graph would never be freed.
        return _Holder(tensor.detach(), self, key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Holder) else packed

    def _release(self, key):
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current_bytes -= entry[1]
            del self._live[key]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Holder:
    """A saved tensor as autograd keeps it; dropping it (autograd releases the tensor) uncounts its storage."""

    __slots__ = ("key", "memory", "tensor")

    def __init__(self, tensor, memory, key):
        self.tensor, self.memory, self.key = tensor, memory, key

    def __del__(self):
        self.memory._release(self.key)
