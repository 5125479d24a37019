"""The sparse backward of batch-hard and semi-hard (issue 18: gradients from the mined triplets straight to the
rows) pinned to the dense path (mining_ops.SPARSE = False: the dense dL/dD through matrix products): the same
stats bitwise, the same loss and gradients up to accumulation order, across distances, normalization, soft
margin, dtypes, reference sets (with and without self indices), chunk sizes, ties and edge cases; and its
determinism."""

from unittest import mock

import pytest
import torch

import tripletloss_cuda as tl
from tripletloss_cuda.mining import ops as mining_ops

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
SPARSE_CASES = [
    ("batch_hard", tl.batch_hard_triplet_loss, {"soft": False}),
    ("batch_hard", tl.batch_hard_triplet_loss, {"soft": True}),
    ("semi_hard", tl.semi_hard_triplet_loss, {}),
]
IDS = ["batch_hard", "batch_hard-soft", "semi_hard"]


def _batch(n, classes, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def _run(fn, x, labels, sparse, refs=None, **kw):
    """(loss, stats, gradients of x and the references) on the sparse (True) or dense (False) path."""
    x = x.detach().clone().requires_grad_()
    inputs = [x]
    extra = {}
    if refs is not None:
        r, ry, self_index = refs
        r = r.detach().clone().requires_grad_()
        inputs.append(r)
        extra = {"ref_embeddings": r, "ref_labels": ry, "ref_self_index": self_index}
    with mock.patch.object(mining_ops, "SPARSE", sparse):
        loss, stats = fn(x, labels, return_stats=True, **extra, **kw)
        grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), stats, grads


def _assert_same(sparse, dense, rtol, atol):
    torch.testing.assert_close(sparse[0], dense[0], rtol=rtol, atol=atol)
    for a, b in zip(sparse[1], dense[1]):
        assert torch.equal(a, b)
    for a, b in zip(sparse[2], dense[2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_sparse_path_is_taken():
    x, labels = _batch(20, 4)
    with mock.patch.object(mining_ops, "SparseMiningFunction", wraps=mining_ops.SparseMiningFunction) as f:
        tl.semi_hard_triplet_loss(x.requires_grad_(), labels)
        tl.batch_all_triplet_loss(x, labels)
    assert f.apply.call_count == 1  # semi-hard, not batch-all
    assert mining_ops.use_sparse("batch_hard", x) and not mining_ops.use_sparse("batch_all", x)


@pytest.mark.parametrize(("kind", "fn", "kw"), SPARSE_CASES, ids=IDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalized"))
@pytest.mark.parametrize("chunk", (None, 1, 7), ids=("whole", "chunk1", "chunk7"))
def test_sparse_equals_dense(kind, fn, kw, distance, normalize, chunk):
    x, labels = _batch(37, 5, seed=hash((kind, distance, normalize)) % 1000)
    args = dict(margin=0.6, distance=distance, normalize=normalize, chunk_size=chunk, **kw)
    sparse, dense = (_run(fn, x, labels, s, **args) for s in (True, False))
    _assert_same(sparse, dense, 1e-10, 1e-12)


@pytest.mark.parametrize(("kind", "fn", "kw"), SPARSE_CASES, ids=IDS)
@pytest.mark.parametrize("self_index", ("none", "some"))
@pytest.mark.parametrize("chunk", (None, 5), ids=("whole", "chunk5"))
def test_sparse_equals_dense_with_references(kind, fn, kw, self_index, chunk):
    x, labels = _batch(23, 4, seed=3)
    r, ry = _batch(31, 4, seed=4)
    index = (
        torch.full((23,), -1)
        if self_index == "none"
        else torch.randint(-1, 31, (23,), generator=torch.Generator().manual_seed(5))
    )
    refs = (r, ry, index)
    sparse, dense = (_run(fn, x, labels, s, refs, margin=0.8, chunk_size=chunk, **kw) for s in (True, False))
    _assert_same(sparse, dense, 1e-10, 1e-12)


@pytest.mark.parametrize(("kind", "fn", "kw"), SPARSE_CASES, ids=IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_sparse_equals_dense_low_precision(kind, fn, kw, dtype):
    x, labels = _batch(64, 6, dim=16, dtype=dtype, seed=8)
    sparse, dense = (_run(fn, x, labels, s, margin=0.5, **kw) for s in (True, False))
    assert sparse[0].dtype == dtype and sparse[2][0].dtype == dtype
    _assert_same(sparse, dense, 1e-5 if dtype == torch.float32 else 1e-2, 1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize(("kind", "fn", "kw"), SPARSE_CASES, ids=IDS)
def test_sparse_equals_dense_ties_and_edges(kind, fn, kw):
    """Duplicated rows (distance exactly 0: the euclidean gradient there is 0), ties, singleton classes, a class
    without negatives, and a batch without a valid triplet."""
    x, _ = _batch(12, 3, dim=4, seed=11)
    x[3], x[7], x[8] = x[0], x[0], x[1]
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 3, 1, 1, 0, 4, 2])
    for distance in DISTANCES:
        sparse, dense = (_run(fn, x, labels, s, margin=1.0, distance=distance, **kw) for s in (True, False))
        _assert_same(sparse, dense, 1e-10, 1e-12)
    for labels in (torch.zeros(12, dtype=torch.int64), torch.arange(12)):
        sparse, dense = (_run(fn, x, labels, s, **kw) for s in (True, False))
        _assert_same(sparse, dense, 0, 0)
        assert sparse[0] == 0 and not sparse[2][0].any()


@pytest.mark.parametrize(("kind", "fn", "kw"), SPARSE_CASES, ids=IDS)
def test_sparse_deterministic_across_threads(kind, fn, kw):
    x, labels = _batch(300, 7, dtype=torch.float32, seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append(_run(fn, x, labels, True, margin=0.5, **kw))
    finally:
        torch.set_num_threads(threads)
    _assert_same(results[0], results[1], 0, 0)


@pytest.mark.parametrize(("kind", "fn", "kw"), SPARSE_CASES, ids=IDS)
def test_sparse_gradcheck_and_double_backward(kind, fn, kw):
    x, labels = _batch(9, 3, dim=4, seed=13)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: fn(e, labels, margin=0.7, **kw), (x,))
    assert torch.autograd.gradgradcheck(lambda e: fn(e, labels, margin=0.7, **kw), (x,))


def test_semi_hard_triplets_op_matches_forward():
    """semi_hard_forward_triplets: the loss and stats of semi_hard_forward, and exactly its active triplets."""
    x, labels = _batch(50, 6, seed=21)
    d = torch.cdist(x, x)
    self_index = torch.arange(50)
    ops = torch.ops.tripletloss_cuda
    loss, stats = ops.semi_hard_forward(d, labels, labels, self_index, 0.5)
    loss2, stats2, triplets = ops.semi_hard_forward_triplets(d, labels, labels, self_index, 0.5)
    assert torch.equal(loss, loss2) and torch.equal(stats, stats2)
    assert triplets.shape == (int(stats[1]), 3)
    a, p, n = triplets.unbind(1)
    assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all() and (a != p).all()
    hinge = 0.5 + d[a, p] - d[a, n]
    assert (hinge > 0).all()
    torch.testing.assert_close(hinge.sum(), loss, rtol=1e-12, atol=0)
    assert (a.diff() >= 0).all()  # by anchor
