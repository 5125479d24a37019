"""tl.cached_loss_backward (GradCache): the parameters' gradients of a full-batch step, one chunk's activations.

Oracles: the plain step (one forward of the whole batch, one backward) where the model is deterministic; with
dropout, the plain step that embeds the same chunks with grad from the same seed (the same dropout masks: a
mask of N rows drawn at once is not the chunks' masks drawn one after the other) and backpropagates once.
Activation memory is counted by tl.gradcache.SavedTensorMemory, itself checked on a model whose saved bytes
are known. The DistributedDataParallel case runs 2 gloo processes (this file as a script).
"""

import subprocess
import sys

import pytest
import torch
from helpers import child_env
from torch import nn

import tripletloss_cuda as tl
from tripletloss_cuda import gradcache

N, D_IN, D_OUT = 12, 6, 4
LOSSES = {
    "batch_hard": lambda e, y: tl.batch_hard_triplet_loss(e, y, margin=0.5),
    "batch_all": lambda e, y: tl.batch_all_triplet_loss(e, y, margin=0.5, normalize=True),
    "semi_hard": lambda e, y: tl.semi_hard_triplet_loss(e, y, margin=0.5),
}
CHUNKS = [1, 5, N, 100]  # one row, N not divisible, exactly N, more than N (one chunk)


def _model(dropout=0.3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, D_OUT), nn.Dropout(dropout)
    ).double()


def _batch(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.arange(n) % 3


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _reference(model, x, labels, loss_fn, chunk_size):
    """The plain step on the chunks embedded with grad (one graph, one backward): (loss, gradients)."""
    model.zero_grad(set_to_none=True)
    emb = torch.cat([model(x[i : i + chunk_size]) for i in range(0, len(x), chunk_size)])
    loss = loss_fn(emb, labels)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_equal_the_full_batch_step(loss, chunk_size, train):
    model, (x, labels), loss_fn = _model(), _batch(), LOSSES[loss]
    model.train(train)
    torch.manual_seed(123)
    ref_loss, ref_grads = _reference(model, x, labels, loss_fn, chunk_size)
    ref_rng = torch.get_rng_state()
    assert ref_loss.item() > 0 and any(g.abs().sum() > 0 for g in ref_grads)
    if not train:  # deterministic: also the truly single forward of the whole batch
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), labels).backward()
        for a, b in zip(_grads(model), ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = tl.cached_loss_backward(model, x, labels, loss_fn, chunk_size)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, ref_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(model), ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert model.training == train  # the mode is left as it was
    # the RNG ends where the first pass (the chunks' forwards, in order) left it, as after the plain step
    assert torch.equal(torch.get_rng_state(), ref_rng)


@pytest.mark.cuda
def test_cuda_dropout_rng_restored():
    """On CUDA the CUDA generator's state is the one restored (the masks are drawn there)."""
    model, (x, labels), loss_fn = _model().cuda(), _batch(), LOSSES["batch_all"]
    x, labels = x.cuda(), labels.cuda()
    torch.manual_seed(123)
    ref_loss, ref_grads = _reference(model, x, labels, loss_fn, 5)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    torch.testing.assert_close(tl.cached_loss_backward(model, x, labels, loss_fn, 5), ref_loss)
    for a, b in zip(_grads(model), ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_without_the_rng_restored_dropout_differs(monkeypatch):
    """The oracle is sensitive: the second pass with fresh dropout masks gives other gradients."""
    model, (x, labels), loss_fn = _model(), _batch(), LOSSES["batch_hard"]
    torch.manual_seed(123)
    _, ref_grads = _reference(model, x, labels, loss_fn, 5)
    monkeypatch.setattr(gradcache, "_restored_rng", lambda state, devices: torch.random.fork_rng(devices=[]))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    tl.cached_loss_backward(model, x, labels, loss_fn, 5)
    assert not all(torch.allclose(a, b) for a, b in zip(_grads(model), ref_grads, strict=True))


def test_gradients_accumulate_into_grad():
    model, (x, labels), loss_fn = _model(0.0), _batch(), LOSSES["batch_all"]
    _, ref_grads = _reference(model, x, labels, loss_fn, N)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    tl.cached_loss_backward(model, x, labels, loss_fn, 5)
    for p, ref in zip(model.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, ref + 1, rtol=1e-12, atol=1e-12)


def test_returns_what_the_loss_returned_beyond_the_loss():
    model, (x, labels) = _model(0.0), _batch()
    criterion = tl.BatchAllTripletLoss(margin=0.5)  # a module, as a loss_fn
    ref_loss, ref_stats = tl.batch_all_triplet_loss(model(x), labels, margin=0.5, return_stats=True)
    loss, stats = tl.cached_loss_backward(
        model, x, labels, lambda e, y: tl.batch_all_triplet_loss(e, y, margin=0.5, return_stats=True), 5
    )
    torch.testing.assert_close(loss, ref_loss.detach())
    assert isinstance(stats, tl.MiningStats) and [int(s) for s in stats[:2]] == [int(s) for s in ref_stats[:2]]
    torch.testing.assert_close(tl.cached_loss_backward(model, x, labels, criterion, 7), ref_loss.detach())
    assert int(criterion.last_stats.valid_triplets) == int(ref_stats.valid_triplets)


def test_loss_function_parameters_get_their_gradient():
    """A learnable parameter of the loss (here a scale) gets the gradient of the plain backward."""
    model, (x, labels) = _model(0.0), _batch()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda e, y: tl.batch_hard_triplet_loss(e * scale, y)
    loss_fn(model(x), labels).backward()
    ref = scale.grad.clone()
    scale.grad = None
    tl.cached_loss_backward(model, x, labels, loss_fn, 5)
    torch.testing.assert_close(scale.grad, ref)


class DictModel(nn.Module):
    """sentence-transformers style: a dict of features in, embeddings out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(20, D_OUT, mode="sum", dtype=torch.float64)

    def forward(self, features):
        assert features["name"] == "tokens"  # a non-tensor value reaches every chunk unchanged
        return self.embed(features["input_ids"], per_sample_weights=features["attention_mask"])


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D_IN, D_OUT).double(), nn.Linear(2, D_OUT).double()

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_dict_and_tuple_inputs():
    torch.manual_seed(0)
    labels = torch.arange(N) % 3
    features = {
        "input_ids": torch.randint(0, 20, (N, 7)),
        "attention_mask": (torch.rand(N, 7) > 0.3).double(),
        "name": "tokens",
    }
    for model, inputs, call in [
        (DictModel(), features, lambda m, i: m(i)),
        (TupleModel(), (torch.randn(N, D_IN).double(), torch.randn(N, 2).double()), lambda m, i: m(*i)),
    ]:
        tl.batch_hard_triplet_loss(call(model, inputs), labels).backward()
        ref = _grads(model)
        model.zero_grad(set_to_none=True)
        tl.cached_loss_backward(model, inputs, labels, tl.batch_hard_triplet_loss, 5)
        for a, b in zip(_grads(model), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_saved_tensor_memory_counts_known_bytes():
    """Linear(16, 256) -> ReLU -> Linear(256, 8) on N rows saves the input (N x 16) and the ReLU output
    (N x 256, saved by ReLU and by the second Linear: counted once), float32; the weights are excluded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 8))
    x = torch.randn(50, 16)
    with gradcache.SavedTensorMemory(exclude=model.parameters()) as mem:
        out = model(x).sum()
        assert mem.current_bytes == 50 * (16 + 256) * 4
        out.backward()
        assert mem.current_bytes == 0  # released by the backward
    assert mem.peak_bytes == 50 * (16 + 256) * 4
    with gradcache.SavedTensorMemory() as mem:  # weights included: the second Linear's (for the gradient of
        model(x).sum().backward()  # its input); not the first's, as x does not require grad
    assert mem.peak_bytes == 50 * (16 + 256) * 4 + 8 * 256 * 4


def test_peak_activation_memory_is_one_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Dropout(0.1), nn.Linear(1024, 8))
    n, chunk = 256, 32
    x, labels = torch.randn(n, 16), torch.arange(n) % 8
    loss_fn = LOSSES["batch_hard"]

    def peak(step):
        with gradcache.SavedTensorMemory(exclude=model.parameters()) as mem:
            step()
        assert mem.current_bytes == 0
        return mem.peak_bytes

    one_chunk = peak(lambda: model(x[:chunk]).sum().backward())
    with torch.no_grad():
        emb = model(x)
    loss_only = peak(lambda: loss_fn(emb.requires_grad_(), labels).backward())
    plain = peak(lambda: loss_fn(model(x), labels).backward())
    cached = peak(lambda: tl.cached_loss_backward(model, x, labels, loss_fn, chunk))
    # Every chunk's activations at once, and the loss's (a chunk of its own, not a view into x, whose storage the
    # first layer would save whole: the sparse mining backward saves so little that the difference shows).
    all_chunks = peak(lambda: model(x).sum().backward())
    assert plain >= all_chunks >= n // chunk * peak(lambda: model(x[:chunk].clone()).sum().backward())
    assert cached == max(one_chunk, loss_only)  # one chunk's at a time, or the loss's
    assert plain > 4 * cached


def test_a_callable_without_parameters():
    """model may be any callable (no parameters): the gradient reaches inputs that require grad."""
    x, labels = _batch()
    x.requires_grad_()
    tl.batch_hard_triplet_loss(torch.tanh(x), labels).backward()
    ref, x.grad = x.grad.clone(), None
    tl.cached_loss_backward(torch.tanh, x, labels, tl.batch_hard_triplet_loss, 5)
    torch.testing.assert_close(x.grad, ref)


ERRORS = [
    ({"chunk_size": 0}, ValueError, "chunk_size should be a positive int, got 0"),
    ({"chunk_size": -3}, ValueError, "chunk_size should be a positive int, got -3"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size should be a positive int, got float"),
    ({"chunk_size": "4"}, TypeError, "chunk_size should be a positive int, got str"),
    ({"chunk_size": True}, TypeError, "chunk_size should be a positive int, got bool"),
    ({"labels": torch.zeros(N - 1)}, ValueError, r"labels should have 12 rows \(one per input\), got shape \(11,\)"),
    ({"labels": [0] * N}, TypeError, "labels should be a tensor, got list"),
    (
        {"inputs": (torch.zeros(N, D_IN), torch.zeros(N - 2, 2))},
        ValueError,
        r"same size along dim 0, got inputs\[0\]: 12",
    ),
    ({"inputs": {"a": torch.zeros(N, 2), "b": torch.zeros(3)}}, ValueError, r"inputs\['a'\]: 12, inputs\['b'\]: 3"),
    ({"inputs": torch.zeros(0, D_IN), "labels": torch.zeros(0)}, ValueError, "an empty batch"),
    ({"inputs": torch.tensor(1.0)}, ValueError, r"inputs should have a batch dimension \(dim 0\), got a 0-d"),
    ({"inputs": [1, 2]}, TypeError, "inputs should hold at least one tensor"),
    ({"inputs": 3}, TypeError, "inputs should be a tensor or a dict, tuple or list of tensors, got int"),
    ({"model": lambda x: {"sentence_embedding": x}}, TypeError, r"got dict \(for a sentence-transformers model"),
    ({"model": lambda x: x[:2]}, ValueError, r"one row per input \(5 rows in this chunk\), got a torch.float64 te"),
    ({"model": "net"}, TypeError, "model and loss_fn should be callable, got str and function"),
    ({"loss_fn": lambda e, y: e.sum(1)}, ValueError, r"scalar loss tensor .*got shape \(12,\)"),
    ({"loss_fn": lambda e, y: 1.0}, ValueError, "scalar loss tensor .*got float"),
    ({"loss_fn": lambda e, y: e.detach().sum()}, RuntimeError, "the loss does not require grad"),
]


@pytest.mark.parametrize(("override", "error", "match"), ERRORS, ids=[m[:30] for _, _, m in ERRORS])
def test_errors(override, error, match):
    x, labels = _batch()
    kwargs = {"model": lambda t: t * 2, "inputs": x, "labels": labels, "loss_fn": LOSSES["batch_hard"]}
    kwargs["chunk_size"] = 5
    kwargs.update(override)
    with pytest.raises(error, match=match):
        tl.cached_loss_backward(**kwargs)


# DistributedDataParallel: 2 gloo processes, each with its own shard of the global batch.
SHARD, DDP_CHUNK, TIMEOUT_S = 12, 5, 60


def _ddp_worker(rank, store_path, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        x, labels = _batch(2 * SHARD)
        x, labels = x[rank * SHARD : (rank + 1) * SHARD], labels[rank * SHARD : (rank + 1) * SHARD]
        ddp = nn.parallel.DistributedDataParallel(_model(0.0))
        # mining over the global batch; * world size because DDP averages (see mining/distributed.py)
        loss_fn = lambda e, y: tl.batch_hard_triplet_loss(e, y, margin=0.5, distributed=True) * 2
        loss_fn(ddp(x), labels).backward()
        plain = _grads(ddp.module)
        ddp.zero_grad(set_to_none=True)
        no_sync, entered = ddp.no_sync, []
        ddp.no_sync = lambda: entered.append(1) or no_sync()
        tl.cached_loss_backward(ddp, x, labels, loss_fn, DDP_CHUNK)
        torch.save({"plain": plain, "cached": _grads(ddp.module), "no_sync": len(entered)}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_distributed_data_parallel(tmp_path):
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, __file__, str(tmp_path / "store")]
    procs = [
        subprocess.Popen(
            [*argv, str(r), str(tmp_path / f"r{r}.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0].decode() for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outputs
    model, (x, labels) = _model(0.0), _batch(2 * SHARD)
    tl.batch_hard_triplet_loss(model(x), labels, margin=0.5).backward()  # one process, the global batch
    for r in range(2):
        result = torch.load(tmp_path / f"r{r}.pt")
        assert result["no_sync"] == -(-SHARD // DDP_CHUNK) - 1  # all chunks but the last: one all-reduce
        for cached, plain, single in zip(result["cached"], result["plain"], _grads(model), strict=True):
            torch.testing.assert_close(cached, plain, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cached, single, rtol=1e-12, atol=1e-12)


if __name__ == "__main__":  # a worker of test_distributed_data_parallel: store, rank, output
    _ddp_worker(int(sys.argv[2]), sys.argv[1], sys.argv[3])
