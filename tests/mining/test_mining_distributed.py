"""distributed=True mining against the single-process loss on the concatenated batch, with 2 CPU processes (gloo).

The test launches this file as a script twice (ranks 0 and 1, shards of different sizes so the padding is used);
each rank writes its loss, stats and gradient to a file, and the test compares them with one process computing
the same loss on the whole batch. The processes share a FileStore (no port to race for) and are killed after
TIMEOUT_S, so the test never hangs.
"""

import subprocess
import sys

import pytest
import torch
from helpers import child_env

import tripletloss_cuda as tl
from tripletloss_cuda.mining import distributed as tl_distributed

WORLD = 2
SHARDS = (9, 14)  # rows per rank: unequal on purpose
TIMEOUT_S = 60
LOSSES = {
    "batch_hard": lambda e, y, **kw: tl.batch_hard_triplet_loss(e, y, margin=0.5, **kw),
    "batch_hard_soft": lambda e, y, **kw: tl.batch_hard_triplet_loss(e, y, soft=True, distance="cosine", **kw),
    "batch_all": lambda e, y, **kw: tl.batch_all_triplet_loss(e, y, margin=0.5, normalize=True, **kw),
    "batch_all_sum": lambda e, y, **kw: tl.batch_all_triplet_loss(e, y, margin=0.5, reduction="sum", **kw),
    "semi_hard": lambda e, y, **kw: tl.semi_hard_triplet_loss(e, y, margin=0.5, **kw),
}


def _batch():
    """The global batch (float64 for exact comparisons) with 5 classes, the same in every process."""
    g = torch.Generator().manual_seed(0)
    n = sum(SHARDS)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def _shard(tensor, rank, shards=SHARDS):
    start = sum(shards[:rank])
    return tensor[start : start + shards[rank]]


REF_SHARDS = (6, 11)  # reference rows per rank


def _references():
    """The global reference set, and each rank's ref_self_index (rows of its own references, or -1)."""
    g = torch.Generator().manual_seed(1)
    m = sum(REF_SHARDS)
    refs, ref_labels = torch.randn(m, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (m,), generator=g)
    self_index = [torch.randint(-1, REF_SHARDS[r], (SHARDS[r],), generator=g) for r in range(WORLD)]
    return refs, ref_labels, self_index


def _global_self_index(self_index):
    return torch.cat([torch.where(s >= 0, s + sum(REF_SHARDS[:r]), -1) for r, s in enumerate(self_index)])


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4, dtype=torch.float64)


def _worker(rank, store_path, out_path):
    """One rank: every loss with distributed=True on its shard; saves losses, stats and gradients."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        embeddings, labels = _batch()
        local_labels = _shard(labels, rank)
        results = {}
        for name, loss_fn in LOSSES.items():
            local = _shard(embeddings, rank).clone().requires_grad_()
            loss, stats = loss_fn(local, local_labels, distributed=True, return_stats=True)
            loss.backward()
            results[name] = (loss.detach(), tuple(stats), local.grad)
        # reference sets: both gathered, ref_self_index shifted to the gathered rows; mined in chunks
        refs, ref_labels, self_index = _references()
        for name, loss_fn in LOSSES.items():
            local = _shard(embeddings, rank).clone().requires_grad_()
            local_refs = _shard(refs, rank, REF_SHARDS).clone().requires_grad_()
            kwargs = {"ref_labels": _shard(ref_labels, rank, REF_SHARDS), "ref_self_index": self_index[rank]}
            loss, stats = loss_fn(
                local,
                local_labels,
                ref_embeddings=local_refs,
                distributed=True,
                return_stats=True,
                chunk_size=4,
                **kwargs,
            )
            loss.backward()
            results[f"{name}+refs"] = (loss.detach(), tuple(stats), local.grad, local_refs.grad)
        # CrossBatchMemory under distributed=True: every rank enqueues the global batch in rank order
        memory = tl.CrossBatchMemory(tl.BatchHardTripletLoss(margin=0.5, distributed=True), 6, memory_size=30)
        steps = []
        for step in range(3):
            local = (_shard(embeddings, rank) + 0.1 * step).requires_grad_()
            loss = memory(local, local_labels)
            loss.backward()
            steps.append((loss.detach(), local.grad))
        results["memory"] = (steps, memory.embedding_memory.clone(), memory.label_memory.clone(), memory.queue_idx)
        # gather itself: this rank's slice is the local tensor, the rest the other rank's rows
        local = _shard(embeddings, rank).clone().requires_grad_()
        gathered, gathered_labels = tl_distributed.gather(local, local_labels)
        (gathered * torch.arange(gathered.shape[0], dtype=gathered.dtype)[:, None]).sum().backward()
        results["gather"] = (gathered.detach(), gathered_labels, local.grad)
        # dtypes gloo cannot all_gather itself (bfloat16, uint16 labels) travel as bytes
        local16 = _shard(embeddings, rank).to(torch.bfloat16)
        results["gather16"] = tl_distributed.gather(local16, local_labels.to(torch.uint16))
        # a rank with no rows (the padding's extreme case)
        empty = embeddings[:0] if rank == 0 else _shard(embeddings, rank)
        results["gather_empty"] = tl_distributed.gather(empty, labels[: empty.shape[0]])
        # under DDP (which averages parameter gradients over ranks) loss * world size gives the single-process
        # parameter gradients, as tripletloss_cuda/mining/distributed.py documents
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        loss = tl.batch_hard_triplet_loss(ddp(_shard(embeddings, rank)), local_labels, margin=0.5, distributed=True)
        (loss * dist.get_world_size()).backward()
        results["ddp"] = [p.grad for p in ddp.module.parameters()]
        # ranks that disagree on the width: an error on every rank, not a hang
        try:
            tl_distributed.gather(_shard(embeddings, rank)[:, : 6 - rank], local_labels)
        except RuntimeError as err:
            results["mismatch"] = str(err)
        torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(store), str(tmp_path / f"rank{rank}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out}"

    embeddings, labels = _batch()
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name, loss_fn in LOSSES.items():
        whole = embeddings.clone().requires_grad_()
        loss, stats = loss_fn(whole, labels, return_stats=True)
        loss.backward()
        assert loss.item() != 0, f"{name}: pick data with a nonzero loss"
        for rank, result in enumerate(results):
            rank_loss, rank_stats, rank_grad = result[name]
            torch.testing.assert_close(rank_loss, loss.detach(), msg=f"{name} loss on rank {rank}")
            for field, a, b in zip(tl.MiningStats._fields, rank_stats, stats):
                torch.testing.assert_close(a, b, msg=f"{name} {field} on rank {rank}")
            torch.testing.assert_close(rank_grad, _shard(whole.grad, rank), msg=f"{name} gradient on rank {rank}")

    refs, ref_labels, self_index = _references()
    for name, loss_fn in LOSSES.items():
        whole, whole_refs = embeddings.clone().requires_grad_(), refs.clone().requires_grad_()
        loss, stats = loss_fn(
            whole, labels, ref_embeddings=whole_refs, ref_labels=ref_labels,
            ref_self_index=_global_self_index(self_index), return_stats=True,
        )  # fmt: skip
        loss.backward()
        assert loss.item() != 0, f"{name}: pick data with a nonzero loss"
        for rank, result in enumerate(results):
            rank_loss, rank_stats, rank_grad, rank_ref_grad = result[f"{name}+refs"]
            torch.testing.assert_close(rank_loss, loss.detach(), msg=f"{name}+refs loss on rank {rank}")
            assert [a.item() for a in rank_stats] == [b.item() for b in stats], f"{name}+refs stats on rank {rank}"
            torch.testing.assert_close(rank_grad, _shard(whole.grad, rank), msg=f"{name}+refs gradient on rank {rank}")
            expected = _shard(whole_refs.grad, rank, REF_SHARDS)
            torch.testing.assert_close(rank_ref_grad, expected, msg=f"{name}+refs reference gradient on rank {rank}")

    memory = tl.CrossBatchMemory(tl.BatchHardTripletLoss(margin=0.5), 6, memory_size=30)
    expected = []
    for step in range(3):
        whole = (embeddings + 0.1 * step).requires_grad_()
        loss = memory(whole, labels)
        loss.backward()
        expected.append((loss.detach(), whole.grad))
    for rank, result in enumerate(results):
        steps, embedding_memory, label_memory, queue_idx = result["memory"]
        for step, ((rank_loss, rank_grad), (loss, grad)) in enumerate(zip(steps, expected)):
            torch.testing.assert_close(rank_loss, loss, msg=f"memory loss, step {step}, rank {rank}")
            torch.testing.assert_close(rank_grad, _shard(grad, rank), msg=f"memory gradient, step {step}, rank {rank}")
        torch.testing.assert_close(embedding_memory, memory.embedding_memory, rtol=0, atol=0)
        assert torch.equal(label_memory, memory.label_memory) and queue_idx == memory.queue_idx == 69 % 30

    model = _model()
    tl.batch_hard_triplet_loss(model(embeddings), labels, margin=0.5).backward()
    for rank, result in enumerate(results):
        for param, grad in zip(model.parameters(), result["ddp"]):
            torch.testing.assert_close(grad, param.grad, msg=f"DDP parameter gradient on rank {rank}")

    weights = torch.arange(embeddings.shape[0], dtype=embeddings.dtype)[:, None].expand_as(embeddings)
    for rank, result in enumerate(results):
        gathered, gathered_labels, grad = result["gather"]
        torch.testing.assert_close(gathered, embeddings, rtol=0, atol=0)
        torch.testing.assert_close(gathered_labels, labels, rtol=0, atol=0)
        torch.testing.assert_close(grad, _shard(weights, rank), rtol=0, atol=0)  # only its own rows' gradient
        gathered16, labels16 = result["gather16"]
        torch.testing.assert_close(gathered16, embeddings.to(torch.bfloat16), rtol=0, atol=0)
        assert labels16.dtype == torch.uint16 and labels16.tolist() == labels.tolist()
        assert "rank 0: D=6 float64 embeddings, int64 labels, rank 1: D=5" in result.get("mismatch", "")
        gathered_empty, labels_empty = result["gather_empty"]
        torch.testing.assert_close(gathered_empty, _shard(embeddings, 1), rtol=0, atol=0)
        assert labels_empty.tolist() == labels[: SHARDS[1]].tolist()


def test_gather_needs_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        tl_distributed.gather(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="init_process_group"):
        tl.batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), distributed=True)


@pytest.fixture
def single_process_group(tmp_path):
    """A gloo group of one process (this one), destroyed afterwards so that no other test sees it."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gather_world_size_one_and_shape_errors(single_process_group):
    embeddings, labels = torch.randn(5, 3, requires_grad=True), torch.arange(5) % 2
    gathered, gathered_labels = tl_distributed.gather(embeddings, labels)
    assert gathered is embeddings and gathered_labels is labels
    loss = tl.batch_all_triplet_loss(embeddings, labels, distributed=True)
    torch.testing.assert_close(loss, tl.batch_all_triplet_loss(embeddings, labels))
    with pytest.raises(ValueError, match=r"labels should be a 1D tensor of 5 elements .* got shape \(4,\)"):
        tl_distributed.gather(embeddings, labels[:4])
    with pytest.raises(ValueError, match="embeddings should be a 2D tensor"):
        tl_distributed.gather(embeddings[0], labels)
    with pytest.raises(TypeError, match="should be tensors"):
        tl_distributed.gather(embeddings, [0, 1, 0, 1, 0])


if __name__ == "__main__":  # a worker process of test_distributed_equals_single_process
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
