"""The fused CPU mining (issue 18: each block of the matrix product read once; batch-hard and semi-hard send gradients
from their mined triplets straight to the rows, batch-all through its dL/dgram) pinned to the dense path
(mining_ops.FUSED = False: the distance matrix, the mining ops on it, the dense dL/dD through matrix products): the
same stats bitwise, the same loss and gradients up to accumulation order, across distances, normalization, soft
margin, batch-all's reductions, dtypes, reference sets (with and without self indices), chunk sizes, ties, special
values and edge cases; the ops themselves (opcheck, against the dense ops on the same distances, errors); and
determinism. The brute force over all triplets (tests/mining/test_mining.py) runs through the fused path too."""

from unittest import mock

import pytest
import torch

import tripletloss_cuda as tl
from tripletloss_cuda import distances
from tripletloss_cuda.mining import ops as mining_ops

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
CASES = [
    ("batch_hard", tl.batch_hard_triplet_loss, {"soft": False}),
    ("batch_hard", tl.batch_hard_triplet_loss, {"soft": True}),
    ("semi_hard", tl.semi_hard_triplet_loss, {}),
    ("batch_all", tl.batch_all_triplet_loss, {"reduction": "mean_nonzero"}),
    ("batch_all", tl.batch_all_triplet_loss, {"reduction": "mean"}),
    ("batch_all", tl.batch_all_triplet_loss, {"reduction": "sum"}),
]
IDS = ["batch_hard", "batch_hard-soft", "semi_hard", "batch_all", "batch_all-mean", "batch_all-sum"]
OPS = torch.ops.tripletloss_cuda


def _batch(n, classes, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def _run(fn, x, labels, fused, refs=None, **kw):
    """(loss, stats, gradients of x and the references) on the fused (True) or dense (False) path."""
    x = x.detach().clone().requires_grad_()
    inputs = [x]
    extra = {}
    if refs is not None:
        r, ry, self_index = refs
        r = r.detach().clone().requires_grad_()
        inputs.append(r)
        extra = {"ref_embeddings": r, "ref_labels": ry, "ref_self_index": self_index}
    with mock.patch.object(mining_ops, "FUSED", fused):
        loss, stats = fn(x, labels, return_stats=True, **extra, **kw)
        grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), stats, grads


def _assert_same(fused, dense, rtol, atol):
    torch.testing.assert_close(fused[0], dense[0], rtol=rtol, atol=atol, equal_nan=True)
    for a, b in zip(fused[1], dense[1]):
        assert torch.equal(a, b)
    for a, b in zip(fused[2], dense[2]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def test_fused_path_is_taken():
    x, labels = _batch(20, 4)
    x.requires_grad_()
    with mock.patch.object(mining_ops, "FusedMiningFunction", wraps=mining_ops.FusedMiningFunction) as f:
        tl.semi_hard_triplet_loss(x, labels)
        tl.batch_all_triplet_loss(x, labels)
        tl.batch_hard_triplet_loss(x, labels, chunk_size=3)
        with mock.patch.object(mining_ops, "FUSED", False):
            tl.batch_all_triplet_loss(x, labels)
    assert f.apply.call_count == 3
    assert all(mining_ops.use_fused(kind, x) for kind in mining_ops.KINDS)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", (False, True), ids=("raw", "normalized"))
@pytest.mark.parametrize("chunk", (None, 1, 7), ids=("whole", "chunk1", "chunk7"))
def test_fused_equals_dense(kind, fn, kw, distance, normalize, chunk):
    x, labels = _batch(37, 5, seed=hash((kind, distance, normalize)) % 1000)
    args = dict(margin=0.6, distance=distance, normalize=normalize, chunk_size=chunk, **kw)
    fused, dense = (_run(fn, x, labels, f, **args) for f in (True, False))
    _assert_same(fused, dense, 1e-10, 1e-12)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("self_index", ("none", "some"))
@pytest.mark.parametrize("chunk", (None, 5), ids=("whole", "chunk5"))
def test_fused_equals_dense_with_references(kind, fn, kw, self_index, chunk):
    x, labels = _batch(23, 4, seed=3)
    r, ry = _batch(31, 4, seed=4)
    index = (
        torch.full((23,), -1)
        if self_index == "none"
        else torch.randint(-1, 31, (23,), generator=torch.Generator().manual_seed(5))
    )
    refs = (r, ry, index)
    fused, dense = (_run(fn, x, labels, f, refs, margin=0.8, chunk_size=chunk, **kw) for f in (True, False))
    _assert_same(fused, dense, 1e-10, 1e-12)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_fused_equals_dense_low_precision(kind, fn, kw, dtype):
    x, labels = _batch(64, 6, dim=16, dtype=dtype, seed=8)
    fused, dense = (_run(fn, x, labels, f, margin=0.5, **kw) for f in (True, False))
    assert fused[0].dtype == dtype and fused[2][0].dtype == dtype
    # float32: batch-all's gradients sum hundreds of terms per entry, in another order than the dense path's.
    _assert_same(fused, dense, 1e-4 if dtype == torch.float32 else 1e-2, 1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
def test_fused_equals_dense_ties_and_edges(kind, fn, kw):
    """Duplicated rows (distance exactly 0: the euclidean gradient there is 0), ties, singleton classes, a class
    without negatives, and batches without a valid triplet."""
    x, _ = _batch(12, 3, dim=4, seed=11)
    x[3], x[7], x[8] = x[0], x[0], x[1]
    labels = torch.tensor([0, 0, 1, 1, 0, 2, 3, 1, 1, 0, 4, 2])
    for distance in DISTANCES:
        fused, dense = (_run(fn, x, labels, f, margin=1.0, distance=distance, **kw) for f in (True, False))
        _assert_same(fused, dense, 1e-10, 1e-12)
    for labels in (torch.zeros(12, dtype=torch.int64), torch.arange(12)):
        fused, dense = (_run(fn, x, labels, f, **kw) for f in (True, False))
        _assert_same(fused, dense, 0, 0)
        assert fused[0] == 0 and not fused[2][0].any()


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
def test_fused_equals_dense_large_classes_and_equal_positives(kind, fn, kw):
    """Rows whose positives need the table's widest setting (over 64 positives), rows with one positive, and rows
    whose positives are all at one distance (the table's degenerate scale); ties everywhere (integer rows)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 3, (150, 3), generator=g).to(torch.float64)
    labels = torch.cat((torch.zeros(90, dtype=torch.int64), torch.arange(1, 61) % 30 + 1))
    fused, dense = (_run(fn, x, labels, f, margin=0.5, **kw) for f in (True, False))
    _assert_same(fused, dense, 1e-10, 1e-12)
    y = torch.zeros(10, 3, dtype=torch.float64)
    y[5:] = 1.0  # every anchor's positives at one distance
    ly = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
    fused, dense = (_run(fn, y, ly, f, margin=0.5, **kw) for f in (True, False))
    _assert_same(fused, dense, 1e-10, 1e-12)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
@pytest.mark.parametrize("value", (float("nan"), float("inf"), 1e30), ids=("nan", "inf", "overflow"))
def test_fused_equals_dense_special_values(kind, fn, kw, value):
    """A NaN, an infinite or an overflowing row (the fused rows' exact fallbacks): NaN loss for non-finite rows (as
    the dense path), the same stats; finite overflowing rows give the dense path's values and gradients."""
    x, labels = _batch(16, 3, dim=4, dtype=torch.float32, seed=14)
    x[5, 1] = value
    fused, dense = (_run(fn, x, labels, f, margin=0.5, **kw) for f in (True, False))
    torch.testing.assert_close(fused[0], dense[0], equal_nan=True)
    for a, b in zip(fused[1], dense[1]):
        assert torch.equal(a, b)
    if value == 1e30:
        torch.testing.assert_close(fused[2][0], dense[2][0], equal_nan=True)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
def test_fused_deterministic_across_threads(kind, fn, kw):
    x, labels = _batch(300, 7, dtype=torch.float32, seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append(_run(fn, x, labels, True, margin=0.5, **kw))
    finally:
        torch.set_num_threads(threads)
    # The matrix product itself may round differently with the thread count: stats bitwise, values to rounding.
    _assert_same(results[0], results[1], 1e-6, 1e-7)
    again = _run(fn, x, labels, True, margin=0.5, **kw)
    _assert_same(again, results[1], 0, 0)


@pytest.mark.parametrize(("kind", "fn", "kw"), CASES, ids=IDS)
def test_fused_gradcheck_and_double_backward(kind, fn, kw):
    x, labels = _batch(9, 3, dim=4, seed=13)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: fn(e, labels, margin=0.7, **kw), (x,))
    assert torch.autograd.gradgradcheck(lambda e: fn(e, labels, margin=0.7, **kw), (x,))


def test_batch_all_keeps_or_recomputes():
    """Batch-all keeps its whole dL/dgram when it fits the budget (the default) and recomputes blocks otherwise: the
    same results either way."""
    x, labels = _batch(40, 5, seed=15)
    assert mining_ops.fused_chunk("batch_all", 40, 40, torch.float64, None) == (40, True)
    assert mining_ops.fused_chunk("batch_all", 40, 40, torch.float64, 8) == (8, False)
    assert mining_ops.fused_chunk("batch_hard", 40, 40, torch.float64, None)[1] is False
    kept = _run(tl.batch_all_triplet_loss, x, labels, True, margin=0.6)
    with mock.patch.object(mining_ops, "MEMORY_BUDGET_BYTES", 40 * 40 * 8 - 1):
        assert mining_ops.fused_chunk("batch_all", 40, 40, torch.float64, None)[1] is False
        recomputed = _run(tl.batch_all_triplet_loss, x, labels, True, margin=0.6)
    _assert_same(kept, recomputed, 1e-10, 1e-12)


# --- the ops -----------------------------------------------------------------------------------------------------


def _gram_args(x, y, labels, ref_labels, self_index, distance):
    gram = mining_ops.Gram(x, y, labels, ref_labels, self_index, distance)
    return gram.block(0, x.shape[0])


def op_samples():
    """Each fused op on a square batch (its own rows excluded) and on queries x references with some self indices,
    for every distance and both dtypes."""
    x, labels = _batch(12, 3, seed=8)
    r, ref_labels = _batch(9, 3, seed=18)
    x[4] = x[1]  # identical rows
    self_index = torch.tensor([3, -1, 0, 8, -1, -1, 2, 5, -1, 1, -1, 7])
    for distance in DISTANCES:
        for dtype in (torch.float32, torch.float64):
            xs, rs = distances.rows(x.to(dtype), distance), distances.rows(r.to(dtype), distance)
            for y, ry, si in ((xs, labels, torch.arange(12)), (rs, ref_labels, self_index)):
                args = _gram_args(xs, y, labels, ry, si, distance)
                yield "batch_hard_gram", (*args, 0.5, False)
                yield "batch_hard_gram", (*args, 0.5, True)
                yield "semi_hard_gram", (*args, 0.5)
                yield "batch_all_gram_", (*args, 0.5)
                _, _, pairs, coef = OPS.semi_hard_gram(*args, 0.5)
                yield "mined_gram_backward", (coef, pairs, xs, None if y is xs else y, args[-1])
            yield "symmetrize_", (torch.randn(7, 7, dtype=dtype),)


@pytest.mark.parametrize("sample", list(range(66)))
def test_opcheck(sample):
    name, args = list(op_samples())[sample]
    torch.library.opcheck(getattr(OPS, name), args)


def test_op_samples_cover_every_op():
    names = {"batch_hard_gram", "semi_hard_gram", "batch_all_gram_", "symmetrize_", "mined_gram_backward"}
    assert {name for name, _ in op_samples()} == names
    assert len(list(op_samples())) == 66


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("refs", (False, True), ids=("square", "references"))
def test_ops_against_the_dense_ops(distance, refs):
    """On the same rows, the gram ops give the dense ops' loss sums and stats on distances.block's matrix; batch-hard's
    triplets are batch_hard_forward's active anchors, semi-hard's the active ones, and their coefficients and
    batch-all's dL/dgram turn into the dense backward's gradients."""
    x, labels = _batch(30, 4, seed=19)
    x = distances.rows(x, distance)
    if refs:
        y, ry = _batch(25, 4, seed=20)
        y = distances.rows(y, distance)
        self_index = torch.randint(-1, 25, (30,), generator=torch.Generator().manual_seed(21))
    else:
        y, ry, self_index = x, labels, torch.arange(30)
    xl = x.clone().requires_grad_()
    yl = y.clone().requires_grad_() if refs else xl
    leaves = (xl, yl) if refs else (xl,)
    d = distances.differentiable(xl, yl, distance)
    dense = d.detach()
    code = distances.OP_CODES[distances.op_name(distance)]
    args = _gram_args(x, y, labels, ry, self_index, distance)
    for kind, extra in (("batch_hard", (0.3, False)), ("semi_hard", (0.3,)), ("batch_all", (0.3,))):
        out = getattr(OPS, f"{kind}_forward")(dense, labels, ry, self_index, *extra)
        if kind == "batch_all":
            gram = args[0].clone()
            got = OPS.batch_all_gram_(gram, *args[1:], *extra)
            assert got[2] == torch.count_nonzero(gram)
        else:
            got = getattr(OPS, f"{kind}_gram")(*args, *extra)
        torch.testing.assert_close(got[0], out[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(got[1], out[1])
        # The gradients of the loss sum with respect to the rows, both ways.
        one = torch.ones((), dtype=torch.float64)
        if kind == "batch_hard":
            grad_d = OPS.batch_hard_backward(one, dense, out[2], *extra)
            active = torch.nonzero(grad_d.abs().sum(1) > 0).squeeze(1)
            a, p, n = got[2][0::2, 0], got[2][0::2, 1], got[2][1::2, 1]
            assert torch.equal(a, active) and torch.equal(got[2][1::2, 0], active)
            assert torch.equal(torch.stack((p, n), 1), out[2][active])
        elif kind == "semi_hard":
            grad_d = OPS.semi_hard_backward(one, dense, labels, ry, self_index, *extra)
            a, p, n = got[2][0::2, 0], got[2][0::2, 1], got[2][1::2, 1]
            assert (0.3 + dense[a, p] - dense[a, n] > 0).all() and (grad_d[a, p] > 0).all()
        else:
            grad_d = OPS.batch_all_backward(one, dense, labels, ry, self_index, *extra)
        expected = torch.autograd.grad(d, leaves, grad_d, retain_graph=True)
        if kind == "batch_all" and refs:
            grads = mining_ops.gram_grad(gram, x, y, code == 2)
        elif kind == "batch_all":  # both sides of every entry: w + w^T
            grads = (mining_ops.gram_grad(gram + gram.T, x, x, code == 2, need_y=False)[0],)
        else:
            gx, gy = OPS.mined_gram_backward(got[3], got[2], x, y if refs else None, code)
            grads = (gx, gy) if refs else (gx,)
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n", (1, 5, 32, 33, 100))
def test_symmetrize(n):
    w = torch.randn(n, n)
    out = w.clone()
    OPS.symmetrize_(out)
    assert torch.equal(out, out.T) and torch.equal(out, w + w.T)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("refs", (False, True), ids=("square", "references"))
def test_batch_all_sparse_backward(distance, refs):
    """Batch-all through its nonzero entries of dL/dgram equals its dense backward (forced both ways), and is what a
    batch with few active triplets takes by default."""
    x, labels = _batch(40, 5, seed=25)
    extra = {}
    if refs:
        r, ry = _batch(30, 5, seed=26)
        extra = {"refs": (r, ry, torch.full((40,), -1))}
    kw = dict(margin=0.6, distance=distance, **extra)
    with mock.patch.object(mining_ops, "BATCH_ALL_SPARSE_FRACTION", 1.0):
        sparse = _run(tl.batch_all_triplet_loss, x, labels, True, **kw)
    with mock.patch.object(mining_ops, "BATCH_ALL_SPARSE_FRACTION", -1.0):
        dense = _run(tl.batch_all_triplet_loss, x, labels, True, **kw)
    _assert_same(sparse, dense, 1e-10, 1e-12)
    # The default: the sparse backward for a batch with few active triplets (well-separated classes and a small
    # margin, one row moved nearly halfway to another class), the dense one for a random
    # batch (nearly all active).
    g = torch.Generator().manual_seed(27)
    classes = torch.arange(200) % 20
    centers = torch.randn(20, 8, dtype=torch.float64, generator=g) * 10
    y = centers[classes] + 0.1 * torch.randn(200, 8, dtype=torch.float64, generator=g)
    y[0] = 0.501 * centers[0] + 0.499 * centers[1]  # class 0, halfway to class 1: a few active triplets
    keep = mining_ops._batch_all_saved
    for rows, lab, few in ((y, classes, True), (x, labels, False)):
        kept = []

        def spy(*args, kept=kept):
            kept.append(keep(*args))
            return kept[-1]

        with mock.patch.object(mining_ops, "_batch_all_saved", spy):
            fused = _run(tl.batch_all_triplet_loss, rows, lab, True, margin=0.1)
        assert (len(kept[0]) == 2) == few
        if few:
            assert 0 < kept[0][1].numel() <= rows.shape[0] ** 2 * mining_ops.BATCH_ALL_SPARSE_FRACTION
        _assert_same(fused, _run(tl.batch_all_triplet_loss, rows, lab, False, margin=0.1), 1e-10, 1e-12)


def test_op_errors():
    x, labels = _batch(6, 2, seed=23)
    args = list(_gram_args(x, x, labels, labels, torch.arange(6), "euclidean"))
    with pytest.raises(RuntimeError, match="gram should be a 2D tensor"):
        OPS.batch_hard_gram(args[0][0], *args[1:], 0.5, False)
    with pytest.raises(RuntimeError, match="gram should be float32 or float64"):
        OPS.semi_hard_gram(args[0].half(), *args[1:], 0.5)
    with pytest.raises(RuntimeError, match="keys_x should be Int"):
        OPS.semi_hard_gram(args[0], args[1], args[2], args[3].long(), *args[4:], 0.5)
    with pytest.raises(RuntimeError, match="sq_x and sq_y should be given"):
        OPS.semi_hard_gram(args[0], None, None, *args[3:], 0.5)
    with pytest.raises(RuntimeError, match="distance should be 0, 1 or 2"):
        OPS.semi_hard_gram(*args[:-1], 5, 0.5)
    bad = args.copy()
    bad[6] = bad[6] + 100  # pos_cols out of range
    with pytest.raises(IndexError, match="pos_cols should hold values in"):
        OPS.batch_all_gram_(*bad, 0.5)
    bad = args.copy()
    bad[6] = torch.zeros(6, dtype=torch.int64)  # a column twice
    with pytest.raises(IndexError, match="pos_cols should hold each column once"):
        OPS.semi_hard_gram(*bad, 0.5)
    bad = args.copy()
    bad[7] = torch.full((6,), 4)  # start > end
    bad[8] = torch.full((6,), 2)
    with pytest.raises(IndexError, match="pos_start should not exceed pos_end"):
        OPS.batch_hard_gram(*bad, 0.5, False)
    with pytest.raises(RuntimeError, match="w should be a square 2D tensor"):
        OPS.symmetrize_(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="w should be contiguous"):
        OPS.symmetrize_(torch.zeros(4, 4).T)
    pairs = torch.tensor([[0, 9]])
    with pytest.raises(IndexError, match="pairs should hold anchor rows"):
        OPS.mined_gram_backward(torch.zeros(1, dtype=torch.float64), pairs, x, None, 0)
    with pytest.raises(RuntimeError, match="coef should be"):
        OPS.mined_gram_backward(torch.zeros(2, dtype=torch.float64), pairs, x, None, 0)
    with pytest.raises(RuntimeError, match="pairs should be an int64"):
        OPS.mined_gram_backward(torch.zeros(1, dtype=torch.float64), pairs.int(), x, None, 0)


# --- batch-hard's sparse backward where the fused ops are not compiled (CUDA), run here on the CPU ops -------------


def _sparse_hard(x, labels, refs=None, **kw):
    """_run on SparseHardFunction: the CPU taken for a device without the fused ops."""
    with mock.patch.object(mining_ops, "FUSED_DEVICES", frozenset()):
        assert mining_ops.use_sparse_hard("batch_hard", x)
        with mock.patch.object(mining_ops, "SparseHardFunction", wraps=mining_ops.SparseHardFunction) as f:
            out = _run(tl.batch_hard_triplet_loss, x, labels, True, refs, **kw)
        assert f.apply.call_count == 1
    return out


@pytest.mark.parametrize("soft", (False, True), ids=("hard", "soft"))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk", (None, 4), ids=("whole", "chunk4"))
@pytest.mark.parametrize("refs", (False, True), ids=("square", "references"))
def test_sparse_hard_equals_dense(soft, distance, chunk, refs):
    x, labels = _batch(30, 4, seed=31)
    x[5] = x[2]  # identical rows
    ref = None
    if refs:
        r, ry = _batch(25, 4, seed=32)
        ref = (r, ry, torch.randint(-1, 25, (30,), generator=torch.Generator().manual_seed(33)))
    kw = {"margin": 0.7, "soft": soft, "distance": distance, "chunk_size": chunk}
    sparse = _sparse_hard(x, labels, ref, **kw)
    dense = _run(tl.batch_hard_triplet_loss, x, labels, False, ref, **kw)
    _assert_same(sparse, dense, 1e-10, 1e-12)


def test_sparse_hard_edges_and_double_backward():
    x, labels = _batch(9, 3, dim=4, seed=34)
    for lab in (labels, torch.zeros(9, dtype=torch.int64), torch.arange(9)):
        _assert_same(_sparse_hard(x, lab), _run(tl.batch_hard_triplet_loss, x, lab, False), 1e-10, 1e-12)
    with mock.patch.object(mining_ops, "FUSED_DEVICES", frozenset()):
        x.requires_grad_()
        fn = lambda e: tl.batch_hard_triplet_loss(e, labels, margin=0.7, soft=True)
        assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))
