"""The compiled mining ops: fake (meta) kernels for torch.compile, the autograd Functions (on a distance matrix,
and on embeddings mined in blocks of anchors), and the fallback to the pure-PyTorch reference where no kernel
is compiled for the device.

Ops (schemas in csrc/mining.cpp), on an (N, M) float32/float64 distance matrix ``dist`` between N anchors and M
references, with (N,) int64 ``labels``, (M,) int64 ``ref_labels`` and (N,) int64 ``self_index`` (the reference
column excluded for each anchor, or -1); ``stats`` is the int64 (5,) vector of reference.STATS_FIELDS and
``loss`` the 0-d float64 loss SUM (the caller divides by its denominator, a stat):
    batch_hard_forward(dist, labels, ref_labels, self_index, margin, soft) -> (loss, stats, mined)
        mined: (N, 2) int64, the hardest positive and negative of each anchor (-1 where the anchor has none)
    batch_hard_backward(grad, dist, mined, margin, soft) -> grad_dist
    batch_all_forward(dist, labels, ref_labels, self_index, margin) -> (loss, stats)
    batch_all_backward(grad, dist, labels, ref_labels, self_index, margin) -> grad_dist
    semi_hard_forward(dist, labels, ref_labels, self_index, margin) -> (loss, stats)
    semi_hard_backward(grad, dist, labels, ref_labels, self_index, margin) -> grad_dist
        (mines again: the (N, M) choice of negatives is never stored)
grad is the 0-d gradient of the loss sum; grad_dist is (N, M).

Memory-bounded mining (ChunkedMiningFunction): blocks of ``chunk`` anchors at a time, each block's (chunk, M)
distance rows from one matrix product, mined and dropped; the backward recomputes each block's rows and turns
its dL/dD block into gradients of both sets with matrix products. Block sums and counts are reduced in block
order, then divided by the global denominator (a device tensor: no host synchronization).
"""

import torch

from .. import _library, distances
from .._library import REDUCTIONS
from ..indexed import ops as indexed_ops
from . import reference

NAMESPACE = _library.NAMESPACE
KINDS = ("batch_hard", "batch_all", "semi_hard")
OPS = tuple(f"{kind}_{way}" for kind in KINDS for way in ("forward", "backward"))

# Working-set budget of the default chunk size: the distance rows of a block with their gradient, the mined
# indices and the per-anchor scratch of the kernels, counted as 8 elements of the distance dtype per entry.
MEMORY_BUDGET_BYTES = 1 << 30
BYTES_PER_ENTRY = 8


def default_chunk(m, dtype):
    """Anchors per block so that a block's (chunk, m) working set stays under MEMORY_BUDGET_BYTES."""
    entry = BYTES_PER_ENTRY * dtype.itemsize
    return max(1, MEMORY_BUDGET_BYTES // (max(m, 1) * entry))


# Device types with compiled mining kernels, fixed at import so that torch.compile sees a constant.
KERNEL_DEVICES = _library.kernel_devices(OPS)


def _check_dist(dist):
    # The same messages as csrc/mining.cpp `check_dist` / `check_inputs`.
    torch._check(dist.dim() == 2, lambda: f"dist should be a 2D tensor (N, M), got shape {tuple(dist.shape)}")
    torch._check(
        dist.dtype in (torch.float32, torch.float64), lambda: f"dist should be float32 or float64, got {dist.dtype}"
    )


def _check_vector(t, name, n, dim):
    torch._check(
        t.dim() == 1 and t.shape[0] == n,
        lambda: f"{name} should have shape ({n},) (dist's {dim}), got {tuple(t.shape)}",
    )
    torch._check(t.dtype == torch.int64, lambda: f"{name} should be int64, got {t.dtype}")


def _check_op_inputs(dist, labels, ref_labels, self_index):
    _check_dist(dist)
    _check_vector(labels, "labels", dist.shape[0], "rows")
    _check_vector(ref_labels, "ref_labels", dist.shape[1], "columns")
    _check_vector(self_index, "self_index", dist.shape[0], "rows")


if "cpu" in KERNEL_DEVICES or "cuda" in KERNEL_DEVICES:

    def _sum_and_stats(dist):
        stats = dist.new_empty((len(reference.STATS_FIELDS),), dtype=torch.int64)
        return dist.new_empty((), dtype=torch.float64), stats

    @torch.library.register_fake(f"{NAMESPACE}::batch_hard_forward")
    def _batch_hard_forward_fake(dist, labels, ref_labels, self_index, margin, soft):
        _check_op_inputs(dist, labels, ref_labels, self_index)
        return *_sum_and_stats(dist), dist.new_empty((dist.shape[0], 2), dtype=torch.int64)

    @torch.library.register_fake(f"{NAMESPACE}::batch_all_forward")
    def _batch_all_forward_fake(dist, labels, ref_labels, self_index, margin):
        _check_op_inputs(dist, labels, ref_labels, self_index)
        return _sum_and_stats(dist)

    @torch.library.register_fake(f"{NAMESPACE}::semi_hard_forward")
    def _semi_hard_forward_fake(dist, labels, ref_labels, self_index, margin):
        _check_op_inputs(dist, labels, ref_labels, self_index)
        return _sum_and_stats(dist)

    @torch.library.register_fake(f"{NAMESPACE}::batch_hard_backward")
    def _batch_hard_backward_fake(grad, dist, mined, margin, soft):
        _check_dist(dist)
        return dist.new_empty(dist.shape)

    @torch.library.register_fake(f"{NAMESPACE}::batch_all_backward")
    def _batch_all_backward_fake(grad, dist, labels, ref_labels, self_index, margin):
        _check_op_inputs(dist, labels, ref_labels, self_index)
        return dist.new_empty(dist.shape)

    @torch.library.register_fake(f"{NAMESPACE}::semi_hard_backward")
    def _semi_hard_backward_fake(grad, dist, labels, ref_labels, self_index, margin):
        _check_op_inputs(dist, labels, ref_labels, self_index)
        return dist.new_empty(dist.shape)


def _check_gram_inputs(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance):
    # The checks of csrc/mining_gram.cpp `prepare` that need no data.
    torch._check(gram.dim() == 2, lambda: f"gram should be a 2D tensor (N, M), got shape {tuple(gram.shape)}")
    torch._check(
        gram.dtype in (torch.float32, torch.float64), lambda: f"gram should be float32 or float64, got {gram.dtype}"
    )
    torch._check(distance in (0, 1, 2), lambda: f"distance should be 0, 1 or 2, got {distance}")
    n, m = gram.shape
    for t, name, size, dtype in (
        (keys_x, "keys_x", n, torch.int32),
        (keys_y, "keys_y", m, torch.int32),
        (self_index, "self_index", n, torch.int64),
        (pos_cols, "pos_cols", m, torch.int64),
        (pos_start, "pos_start", n, torch.int64),
        (pos_end, "pos_end", n, torch.int64),
    ):
        shape_message = f"{name} should have shape ({size},), got {tuple(t.shape)}"
        dtype_message = f"{name} should be {dtype}, got {t.dtype}"
        torch._check(t.dim() == 1 and t.shape[0] == size, lambda m=shape_message: m)
        torch._check(t.dtype == dtype, lambda m=dtype_message: m)


if "cpu" in _library.kernel_devices(("batch_hard_gram",)):

    def _mined_fake(gram, *args):
        _check_gram_inputs(gram, *args[:9])
        p = torch.library.get_ctx().new_dynamic_size()
        loss, stats = gram.new_empty((), dtype=torch.float64), gram.new_empty((5,), dtype=torch.int64)
        return loss, stats, gram.new_empty((p, 2), dtype=torch.int64), gram.new_empty(p)

    @torch.library.register_fake(f"{NAMESPACE}::batch_hard_gram")
    def _batch_hard_gram_fake(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance,
                              margin, soft):  # fmt: skip
        return _mined_fake(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance)

    @torch.library.register_fake(f"{NAMESPACE}::semi_hard_gram")
    def _semi_hard_gram_fake(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance,
                             margin):  # fmt: skip
        return _mined_fake(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance)

    @torch.library.register_fake(f"{NAMESPACE}::batch_all_gram_")
    def _batch_all_gram_fake(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance,
                             margin):  # fmt: skip
        _check_gram_inputs(gram, sq_x, sq_y, keys_x, keys_y, self_index, pos_cols, pos_start, pos_end, distance)
        scalar = gram.new_empty((), dtype=torch.int64)
        return gram.new_empty((), dtype=torch.float64), gram.new_empty((5,), dtype=torch.int64), scalar

    @torch.library.register_fake(f"{NAMESPACE}::symmetrize_")
    def _symmetrize_fake(w):
        torch._check(w.dim() == 2 and w.shape[0] == w.shape[1], lambda: "w should be a square 2D tensor")

    @torch.library.register_fake(f"{NAMESPACE}::mined_gram_backward")
    def _mined_gram_backward_fake(coef, pairs, x, y, distance):
        torch._check(x.dim() == 2, lambda: f"x should be a 2D tensor (N, D), got shape {tuple(x.shape)}")
        grad_y = x.new_empty((0, x.shape[1])) if y is None else y.new_empty(y.shape)
        return x.new_empty(x.shape), grad_y


# ---------------------------------------------------------------- per kind: sums, denominators, block mining

SUMS = {
    "batch_hard": reference.batch_hard_sum,
    "batch_all": reference.batch_all_sum,
    "semi_hard": reference.semi_hard_sum,
}
_MINED = 2  # the stat batch-hard and semi-hard average over
# batch-all's reduction code -> the stat it divides by (active, valid triplets; -1: none, the sum)
_BATCH_ALL_DENOMINATOR = {REDUCTIONS["mean_nonzero"]: 1, REDUCTIONS["mean"]: 0, REDUCTIONS["sum"]: -1}


def denominator(kind, reduction=None):
    """The index of the stat the loss sum is divided by, or -1 (batch-all's "sum")."""
    return _BATCH_ALL_DENOMINATOR[reduction] if kind == "batch_all" else _MINED


def divide(total, stats, den):
    """total / stats[den] (clamped to 1: no valid triplet gives 0, not NaN), or total for den = -1."""
    return total if den < 0 else total / stats[den].clamp_min(1).to(total.dtype)


def _mine(kind, kernel, dist, labels, ref_labels, self_index, args):
    """(loss sum as float64, stats, what the backward needs) of one block of anchor rows, without gradient."""
    if kernel:
        out = getattr(torch.ops.tripletloss_cuda, f"{kind}_forward")(dist, labels, ref_labels, self_index, *args)
        return out[0], out[1], out[2:]
    with torch.no_grad():
        total, stats = SUMS[kind](dist, labels, *args, ref_labels, self_index)
    return total.to(torch.float64), stats, ()


def _mine_grad(kind, kernel, scale, dist, labels, ref_labels, self_index, saved, args):
    """dL/d dist of one block, for the gradient ``scale`` (0-d float64) of the loss sum."""
    if kernel:
        op = getattr(torch.ops.tripletloss_cuda, f"{kind}_backward")
        if kind != "batch_hard":  # batch-all and semi-hard mine again from the labels
            return op(scale, dist, labels, ref_labels, self_index, *args)
        return op(scale, dist, *saved, *args)
    with torch.enable_grad():
        d = dist.detach().requires_grad_()
        total, _ = SUMS[kind](d, labels, *args, ref_labels, self_index)
        (grad,) = torch.autograd.grad(total, d, scale.to(d.dtype))
    return grad


class MiningFunction(torch.autograd.Function):
    """loss, stats = MiningFunction.apply(kind, dist, labels, ref_labels, self_index, den, *args) with the
    compiled forward and backward ops of ``kind`` on a whole (N, M) distance matrix; ref_labels and
    self_index as reference.self_references (None: the batch against itself); args are (margin, soft) or
    (margin,); den the stat the sum is divided by. Saves dist, the labels, stats and the mined indices."""

    @staticmethod
    def forward(ctx, kind, dist, labels, ref_labels, self_index, den, *args):
        refs = reference.self_references(labels, ref_labels, self_index)
        total, stats, saved = _mine(kind, True, dist, labels, *refs, args)
        ctx.save_for_backward(dist, labels, *refs, stats, *saved)
        ctx.kind, ctx.den, ctx.args = kind, den, args
        ctx.mark_non_differentiable(stats)
        return divide(total, stats, den).to(dist.dtype), stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        dist, labels, ref_labels, self_index, stats, *saved = ctx.saved_tensors
        kind, den, args = ctx.kind, ctx.den, ctx.args
        nones = (None,) * (4 + len(args))
        if not ctx.needs_input_grad[1]:
            return (None, None, *nones)
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference instead, so that higher orders work.
            total, ref_stats = SUMS[kind](dist, labels, *args, ref_labels, self_index)
            (grad_dist,) = torch.autograd.grad(divide(total, ref_stats, den), dist, grad, create_graph=True)
        else:
            scale = divide(grad.to(torch.float64), stats, den)
            grad_dist = _mine_grad(kind, True, scale, dist, labels, ref_labels, self_index, saved, args)
        return None, grad_dist, *nones


# ---------------------------------------------------------------- blocks of anchors


def _blocks(n, chunk):
    return [(i0, min(i0 + chunk, n)) for i0 in range(0, n, chunk)]


class _Rows:
    """The anchors x and references y of a chunked loss, with their squared norms and keys computed once:
    block(i0, i1) is the (i1 - i0, M) distance block of anchors [i0, i1), exactly distances.matrix's rows."""

    def __init__(self, x, y, distance):
        self.x, self.y, self.distance = x, y, distance
        self.sq_x, self.sq_y = distances.squared_norms(x, distance), distances.squared_norms(y, distance)
        self.keys_x = distances.row_keys(x)
        self.keys_y = self.keys_x if y is x else distances.row_keys(y)

    def block(self, i0, i1):
        sq_xb = None if self.sq_x is None else self.sq_x[i0:i1]
        d = self.distance
        return distances.block(self.x[i0:i1], self.y, sq_xb, self.sq_y, self.keys_x[i0:i1], self.keys_y, d)


def reference_grad(kind, x, y, labels, ref_labels, self_index, distance, den, args, grad):
    """(dL/dx, dL/dy) of a mining loss with create_graph=True, for the Functions whose own backward is not
    differentiable: the reference differentiated on the whole recomputed matrix, so that higher orders work (y None:
    the batch against itself, dL/dy None)."""
    d = distances.differentiable(x, x if y is None else y, distance)
    total, ref_stats = SUMS[kind](d, labels, *args, ref_labels, self_index)
    loss = divide(total, ref_stats, den)
    if y is None:
        return torch.autograd.grad(loss, x, grad, create_graph=True)[0], None
    return torch.autograd.grad(loss, (x, y), grad, create_graph=True, allow_unused=True)


class ChunkedMiningFunction(torch.autograd.Function):
    """loss, stats = ChunkedMiningFunction.apply(kind, x, y, labels, ref_labels, self_index, distance, chunk,
    kernel, den, *args): the mining loss of anchors x (N, D) against references y (M, D) (y None: x against
    itself, with ref_labels and self_index None; rows already L2-normalized where the distance needs it),
    ``chunk`` anchors at a time. Nothing of size N x M is kept: the forward keeps the loss sum and stats (and
    batch-hard's (N, 2) mined indices); the backward recomputes each block's distances (and the semi-hard
    backward op its mined negatives)."""

    @staticmethod
    def forward(ctx, kind, x, y, labels, ref_labels, self_index, distance, chunk, kernel, den, *args):
        ref_labels, self_index = reference.self_references(labels, ref_labels, self_index)
        refs = x if y is None else y
        rows = _Rows(x, refs, distance)
        totals, stats, mined = [], [], []
        for i0, i1 in _blocks(x.shape[0], chunk):
            d = rows.block(i0, i1)
            total, block_stats, saved = _mine(kind, kernel, d, labels[i0:i1], ref_labels, self_index[i0:i1], args)
            totals.append(total)
            stats.append(block_stats)
            if kind == "batch_hard" and kernel:
                mined.append(saved[0])
        # Fixed block order: deterministic.
        total = torch.stack(totals).sum() if totals else x.new_zeros((), dtype=torch.float64)
        stats = torch.stack(stats).sum(0) if stats else labels.new_zeros((len(reference.STATS_FIELDS),))
        saved = [torch.cat(mined)] if mined else []
        ctx.save_for_backward(x, y, labels, ref_labels, self_index, stats, *saved)
        ctx.kind, ctx.distance, ctx.chunk, ctx.kernel, ctx.den, ctx.args = kind, distance, chunk, kernel, den, args
        ctx.mark_non_differentiable(stats)
        return divide(total, stats, den).to(x.dtype), stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        x, y, labels, ref_labels, self_index, stats, *saved = ctx.saved_tensors
        kind, distance, chunk, kernel, den, args = ctx.kind, ctx.distance, ctx.chunk, ctx.kernel, ctx.den, ctx.args
        nones = (None,) * (7 + len(args))
        same = y is None  # the batch against itself: x's gradient is that of the anchors plus the references'
        need_x, need_y = ctx.needs_input_grad[1], ctx.needs_input_grad[2] or (same and ctx.needs_input_grad[1])
        if not (need_x or need_y):
            return (None, None, None, *nones)
        refs = x if same else y
        if torch.is_grad_enabled():
            gx, gy = reference_grad(kind, x, y, labels, ref_labels, self_index, distance, den, args, grad)
            return None, gx, gy, *nones
        scale = divide(grad.to(torch.float64), stats, den)
        rows = _Rows(x, refs, distance)
        gx = torch.zeros_like(x)
        gy = torch.zeros_like(refs) if need_y else None
        for i0, i1 in _blocks(x.shape[0], chunk):
            xb, lb, sb = x[i0:i1], labels[i0:i1], self_index[i0:i1]
            d = rows.block(i0, i1)
            block_saved = (saved[0][i0:i1],) if kernel and kind == "batch_hard" else ()
            grad_d = _mine_grad(kind, kernel, scale, d, lb, ref_labels, sb, block_saved, args)
            gxb, gyb = distances.block_grad(grad_d, d, xb, refs, distance, need_y)
            gx[i0:i1] = gxb
            if need_y:
                gy += gyb  # blocks in a fixed order: deterministic
        if same:
            return None, gx + gy, None, *nones
        return None, gx if need_x else None, gy, *nones


# ---------------------------------------------------------------- the fused CPU mining (issue 18)

# The ops of the fused mining: each block of the matrix product is read once (distances, mining and batch-all's
# gradient in one pass, csrc/mining_gram.cpp); batch-hard and semi-hard send their gradients from the mined triplets
# straight to the rows (mined_gram_backward), batch-all through matrix products of its gradient with respect to the
# block (or mined_gram_backward on its few nonzero entries).
FUSED_OPS = ("batch_hard_gram", "semi_hard_gram", "batch_all_gram_", "symmetrize_", "mined_gram_backward")
FUSED_DEVICES = _library.kernel_devices(FUSED_OPS) & {"cpu"}
GRAM_OPS = {"batch_hard": "batch_hard_gram", "semi_hard": "semi_hard_gram", "batch_all": "batch_all_gram_"}
# False: every loss takes the dense path (tests pin the fused path to it).
FUSED = True
# Batch-hard's and semi-hard's blocks of anchors by default: a block of the matrix product of at most this many
# bytes (written by the product, then read by the mining while much of it is still in the caches; nothing is
# recomputed, so small blocks cost only their calls).
FUSED_BLOCK_BYTES = 32 << 20
# Batch-all's backward goes through its nonzero entries of dL/dgram (as batch-hard's and semi-hard's) rather than a
# matrix product with the whole (N, M) dL/dgram when at most this fraction of the entries is nonzero (few active
# triplets: late in training, large margins passed). Measured crossover: docs/mining.md.
BATCH_ALL_SPARSE_FRACTION = 1 / 128


def fused_chunk(kind, n, m, dtype, chunk_size):
    """(anchors per block, whether batch-all keeps its dL/dgram) of a fused loss for the user's chunk_size: batch-all
    keeps the whole (N, M) dL/dgram (the dense path keeps its distances so) when one block covers every anchor, and by
    default when it fits MEMORY_BUDGET_BYTES; else it recomputes its blocks in the backward."""
    if kind != "batch_all":
        return (chunk_size or max(1, FUSED_BLOCK_BYTES // (max(m, 1) * dtype.itemsize))), False
    if chunk_size is None:
        whole = n * m * dtype.itemsize <= MEMORY_BUDGET_BYTES
        chunk_size = max(n, 1) if whole else default_chunk(m, dtype)
    return chunk_size, chunk_size >= n


def use_fused(kind, x):
    """Whether a loss on rows x takes the fused mining: on the CPU kernels, outside torch.compile (whose graphs take
    the dense path: the mined set has a data-dependent size, and batch-all's op works in place)."""
    device = x.device.type
    return FUSED and device in KERNEL_DEVICES and device in FUSED_DEVICES and not torch.compiler.is_compiling()


def positives(labels, ref_labels):
    """(pos_cols, pos_start, pos_end) of the gram ops: the reference columns sorted by label (a stable sort: ascending
    within a label), and each anchor's run of its label in them."""
    sorted_labels, cols = torch.sort(ref_labels, stable=True)
    return cols, torch.searchsorted(sorted_labels, labels), torch.searchsorted(sorted_labels, labels, right=True)


def key_numbers(x, y):
    """distances.row_keys of x and y numbered densely as int32 (equal numbers: identical rows), for the gram ops."""
    keys = distances.row_keys(x)
    if y is x:
        ids = torch.unique(keys, return_inverse=True)[1].to(torch.int32)
        return ids, ids
    ids = torch.unique(torch.cat((keys, distances.row_keys(y))), return_inverse=True)[1].to(torch.int32)
    return ids[: x.shape[0]], ids[x.shape[0] :]


class Gram:
    """The op arguments of a fused mining loss but for its Gram block: block(i0, i1) -> the arguments of anchors
    [i0, i1), with the block x[i0:i1] @ y.T first (batch-all's op overwrites it)."""

    def __init__(self, x, y, labels, ref_labels, self_index, distance):
        self.x, self.y = x, y
        self.sq_x, self.sq_y = distances.squared_norms(x, distance), distances.squared_norms(y, distance)
        self.keys_x, self.keys_y = key_numbers(x, y)
        self.cols, self.start, self.end = positives(labels, ref_labels)
        self.self_index, self.code = self_index, distances.OP_CODES[distances.op_name(distance)]

    def block(self, i0, i1, out=None):
        """out: a buffer of at least i1 - i0 rows to write the product into (blocks of one call reuse one buffer:
        fresh pages of a new tensor each block would cost a page fault every 4 KiB)."""
        sq_x = None if self.sq_x is None else self.sq_x[i0:i1]
        xb = self.x[i0:i1]
        product = xb @ self.y.T if out is None else torch.mm(xb, self.y.T, out=out[: i1 - i0])
        return (
            product, sq_x, self.sq_y, self.keys_x[i0:i1], self.keys_y, self.self_index[i0:i1],
            self.cols, self.start[i0:i1], self.end[i0:i1], self.code,
        )  # fmt: skip

    def buffer(self, blocks):
        """One product buffer for these blocks (None for one block: its product is the block itself)."""
        if len(blocks) < 2:
            return None
        return self.x.new_empty((max(i1 - i0 for i0, i1 in blocks), self.y.shape[0]))


def gram_grad(w, xb, y, dot, need_y=True):
    """(dL/dxb, dL/dy) of a block from w = dL/dgram (the batch-all op's output; mining_math.h gram_grad): xb's rows
    sum_j w_ij y_j - [not dot] (sum_j w_ij) xb_i, y's alike with w's columns."""
    gx = w @ y
    gy = w.T @ xb if need_y else None
    if not dot:
        gx -= w.sum(1, keepdim=True) * xb
        if need_y:
            gy -= w.sum(0)[:, None] * y
    return gx, gy


class FusedMiningFunction(torch.autograd.Function):
    """loss, stats = FusedMiningFunction.apply(kind, x, y, labels, ref_labels, self_index, distance, chunk, den,
    *args): a mining loss of anchors x (N, D) against references y (M, D) (None: x against itself; rows of
    distances.rows) on the fused CPU ops, ``chunk`` anchors at a time (chunk >= N: one block). Each block of
    x @ y.T is read once. Batch-hard and semi-hard keep only the entries of dL/dgram their mined triplets make (two a
    triplet); the backward sends them to the rows with mined_gram_backward (entries grouped by row and by column with
    a stable counting sort, each row summing its own in a fixed order; no float atomics). Batch-all keeps its
    gradient with respect to the whole block, dL/dgram (N, M), when one block covers every anchor (_batch_all_saved:
    its nonzero entries when few, else the matrix, symmetrized for the batch against itself), else recomputes it a
    block at a time in the backward, so that nothing of size N x M is held. Values and gradients equal the dense
    path's up to accumulation order (and the last bit of each euclidean distance: mining_math.h gram_distance), the
    stats the same."""

    @staticmethod
    def forward(ctx, kind, x, y, labels, ref_labels, self_index, distance, chunk, den, *args):
        ref_labels, self_index = reference.self_references(labels, ref_labels, self_index)
        gram = Gram(x, x if y is None else y, labels, ref_labels, self_index, distance)
        op = getattr(torch.ops.tripletloss_cuda, GRAM_OPS[kind])
        blocks = _blocks(x.shape[0], chunk)
        totals, stats, pairs, coefs = [], [], [], []
        buffer = gram.buffer(blocks)
        for i0, i1 in blocks:
            block = gram.block(i0, i1, buffer)
            out = op(*block, *args)
            totals.append(out[0])
            stats.append(out[1])
            if kind != "batch_all":
                out[2][:, 0] += i0
                pairs.append(out[2])
                coefs.append(out[3])
        total = torch.stack(totals).sum() if totals else x.new_zeros((), dtype=torch.float64)
        stats = torch.stack(stats).sum(0) if stats else labels.new_zeros((len(reference.STATS_FIELDS),))
        if kind != "batch_all":
            saved = [torch.cat(pairs), torch.cat(coefs)] if pairs else [labels.new_zeros((0, 2)), x.new_zeros(0)]
        elif len(blocks) == 1:  # the CPU op's count of nonzero entries (no device to synchronize with)
            saved = _batch_all_saved(block[0], int(out[2]), y is None)
        else:
            saved = []
        ctx.save_for_backward(x, y, labels, ref_labels, self_index, stats, *saved)
        ctx.kind, ctx.distance, ctx.chunk, ctx.den, ctx.args = kind, distance, chunk, den, args
        ctx.mark_non_differentiable(stats)
        return divide(total, stats, den).to(x.dtype), stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        x, y, labels, ref_labels, self_index, stats, *saved = ctx.saved_tensors
        kind, distance, den, args = ctx.kind, ctx.distance, ctx.den, ctx.args
        nones = (None,) * (6 + len(args))
        need_x, need_y = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_x or need_y):
            return (None, None, None, *nones)
        if torch.is_grad_enabled():
            gx, gy = reference_grad(kind, x, y, labels, ref_labels, self_index, distance, den, args, grad)
            return None, gx, gy, *nones
        scale = divide(grad.to(torch.float64), stats, den).to(x.dtype)
        if len(saved) == 2:  # entries of dL/dgram: the mined triplets', or batch-all's few nonzero ones
            pairs, coef = saved
            code = distances.OP_CODES[distances.op_name(distance)]
            gx, gy = torch.ops.tripletloss_cuda.mined_gram_backward(coef * scale, pairs, x, y, code)
        else:
            gx, gy = _batch_all_grad(x, y, labels, ref_labels, self_index, distance, ctx.chunk, saved, args, need_y)
            gx = gx * scale
            gy = None if gy is None else gy * scale
        return None, gx if need_x else None, gy if need_y else None, *nones


def _batch_all_saved(w, nonzero, same):
    """What batch-all keeps of its whole dL/dgram w for the backward: its nonzero entries (pairs, coef) when few
    (BATCH_ALL_SPARSE_FRACTION), else w itself, for the batch against itself symmetrized (w + w^T: both sides of
    every entry in one matrix product)."""
    if nonzero <= BATCH_ALL_SPARSE_FRACTION * w.numel():
        pairs = torch.nonzero(w)  # row-major: a fixed order
        return [pairs, w[pairs[:, 0], pairs[:, 1]]]
    if same:
        torch.ops.tripletloss_cuda.symmetrize_(w)
    return [w]


def _batch_all_grad(x, y, labels, ref_labels, self_index, distance, chunk, saved, args, need_y):
    """Batch-all's (dL/dx, dL/dy) for a unit gradient of the loss sum: from the kept dL/dgram, or a block at a time."""
    dot = distances.op_name(distance) == "dot"
    refs = x if y is None else y
    if saved:
        if y is None:  # w + w^T (symmetrized): both sides of every entry in one product
            return gram_grad(saved[0], x, x, dot, need_y=False)[0], None
        return gram_grad(saved[0], x, y, dot, need_y)
    gram = Gram(x, refs, labels, ref_labels, self_index, distance)
    gx = torch.empty_like(x)
    gy = torch.zeros_like(refs) if (need_y or y is None) else None
    blocks = _blocks(x.shape[0], chunk)
    buffer = gram.buffer(blocks)
    for i0, i1 in blocks:
        block = gram.block(i0, i1, buffer)
        torch.ops.tripletloss_cuda.batch_all_gram_(*block, *args)
        gxb, gyb = gram_grad(block[0], x[i0:i1], refs, dot, gy is not None)
        gx[i0:i1] = gxb
        if gy is not None:
            gy += gyb  # blocks in a fixed order: deterministic
    if y is None:
        return gx + gy, None
    return gx, gy


def run_fused(kind, x, y, labels, margin, extra, ref_labels, self_index, distance, chunk_size):
    """(loss, stats) of a mining loss on the fused CPU ops (see use_fused): as run_chunked, for the user's chunk_size
    (None: fused_chunk's default)."""
    args, den = _kind_args(kind, margin, extra)
    chunk, _ = fused_chunk(kind, x.shape[0], (x if y is None else y).shape[0], x.dtype, chunk_size)
    y = None if y is None or y is x else y.contiguous()
    inputs = _contiguous(labels, ref_labels, self_index)
    return FusedMiningFunction.apply(kind, x.contiguous(), y, *inputs, distance, chunk, den, *args)


# ---------------------------------------------------------------- batch-hard's sparse backward elsewhere (CUDA)

# Where the fused CPU ops are not compiled (CUDA), batch-hard still sends its gradients from the mined triplets to the
# rows rather than through a dense (N, M) dL/dD and matrix products: one triplet per anchor (an anchor without one
# has weight 0), so that nothing has a data-dependent size: no host synchronization (CUDA-graph capturable).
SPARSE_HARD_OPS = ("batch_hard_forward", "indexed_triplet_backward")
SPARSE_HARD_DEVICES = _library.kernel_devices(SPARSE_HARD_OPS)


def use_sparse_hard(kind, x):
    """Whether batch-hard on rows x takes SparseHardFunction: a device with kernels but not the fused CPU ops."""
    device = x.device.type
    return (
        FUSED
        and kind == "batch_hard"
        and device in SPARSE_HARD_DEVICES
        and device not in FUSED_DEVICES
        and not torch.compiler.is_compiling()
    )


def hard_weight(x, margin, soft):
    """mining_math.h hard_weight, the same float expressions: sigmoid(x) (soft), else 1 where margin + x > 0."""
    if soft:
        return 1 / (1 + torch.exp(-x))
    return (margin + x > 0).to(x.dtype)


class SparseHardFunction(torch.autograd.Function):
    """loss, stats = SparseHardFunction.apply(x, y, labels, ref_labels, self_index, distance, chunk, den, margin,
    soft): batch-hard of anchors x against references y (None: x itself) on the distance ops (batch_hard_forward on
    blocks of distances.block), keeping each anchor's mined triplet and its two distances (N of them; -1 indices
    become 0 with weight 0); the backward sends their gradients to the rows with the loss over index triplets'
    backward op (margin = inf: every triplet passes its hinge, the weight is the mining's hard_weight)."""

    @staticmethod
    def forward(ctx, x, y, labels, ref_labels, self_index, distance, chunk, den, margin, soft):
        ref_labels, self_index = reference.self_references(labels, ref_labels, self_index)
        rows = _Rows(x, x if y is None else y, distance)
        totals, stats, mined, pairs = [], [], [], []
        for i0, i1 in _blocks(x.shape[0], chunk):
            d = rows.block(i0, i1)
            out = torch.ops.tripletloss_cuda.batch_hard_forward(
                d, labels[i0:i1], ref_labels, self_index[i0:i1], margin, soft
            )
            totals.append(out[0])
            stats.append(out[1])
            mined.append(out[2])
            # (B, 2) d(a, p), d(a, n), kept while the block is dropped
            pairs.append(d.gather(1, out[2].clamp_min(0)) if d.shape[1] else d.new_zeros((d.shape[0], 2)))
        total = torch.stack(totals).sum() if totals else x.new_zeros((), dtype=torch.float64)
        stats = torch.stack(stats).sum(0) if stats else labels.new_zeros((len(reference.STATS_FIELDS),))
        mined = torch.cat(mined) if mined else labels.new_zeros((0, 2))
        pairs = torch.cat(pairs) if pairs else x.new_zeros((0, 2))
        ctx.save_for_backward(x, y, labels, ref_labels, self_index, stats, mined, pairs)
        ctx.distance, ctx.den, ctx.margin, ctx.soft = distance, den, margin, soft
        ctx.mark_non_differentiable(stats)
        return divide(total, stats, den).to(x.dtype), stats

    @staticmethod
    def backward(ctx, grad, _grad_stats):
        x, y, labels, ref_labels, self_index, stats, mined, pairs = ctx.saved_tensors
        nones = (None,) * 8
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_y):
            return (None, None, *nones)
        if torch.is_grad_enabled():
            args, refs = (ctx.margin, ctx.soft), (labels, ref_labels, self_index)
            return *reference_grad("batch_hard", x, y, *refs, ctx.distance, ctx.den, args, grad), *nones
        scale = divide(grad.to(torch.float64), stats, ctx.den).to(pairs.dtype)
        valid = mined[:, 0] >= 0
        w = torch.where(valid, hard_weight(pairs[:, 0] - pairs[:, 1], ctx.margin, ctx.soft), 0) * scale
        a = torch.arange(x.shape[0], device=x.device)
        p, n = mined[:, 0].clamp_min(0), mined[:, 1].clamp_min(0)
        m = 0 if y is None else y.shape[0]
        entries, offsets = indexed_ops.destinations(a, p, n, x.shape[0], m)
        saved = torch.cat((pairs, pairs.new_zeros((pairs.shape[0], 2))), 1)
        code = distances.OP_CODES[distances.op_name(ctx.distance)]
        gx, gy = torch.ops.tripletloss_cuda.indexed_triplet_backward(
            w.contiguous(), x, y, a, p, n, saved, entries, offsets, code, float("inf"), False, False
        )
        return gx if need_x else None, gy if need_y else None, *nones


def run_sparse_hard(x, y, labels, margin, soft, ref_labels, self_index, distance, chunk):
    """(loss, stats) of batch-hard through SparseHardFunction (see use_sparse_hard): as run_chunked."""
    args, den = _kind_args("batch_hard", margin, soft)
    y = None if y is None or y is x else y.contiguous()
    inputs = _contiguous(labels, ref_labels, self_index)
    return SparseHardFunction.apply(x.contiguous(), y, *inputs, distance, chunk, den, *args)


# ---------------------------------------------------------------- entry points


def _kind_args(kind, margin, extra):
    """(kernel args, denominator) of a loss: extra is soft (batch-hard), the reduction (batch-all) or None."""
    if kind == "batch_hard":
        return (margin, extra), _MINED
    if kind == "batch_all":
        return (margin,), denominator(kind, extra)
    return (margin,), _MINED


def _contiguous(labels, ref_labels, self_index):
    # torch.compile traces no Function given one tensor twice: ref_labels may be the labels themselves.
    ref_labels = ref_labels.clone() if ref_labels is labels else ref_labels
    return [None if t is None else t.contiguous() for t in (labels, ref_labels, self_index)]


def run(kind, dist, labels, margin, extra=None, ref_labels=None, self_index=None):
    """(loss, stats) of a mining loss on a whole (N, M) distance matrix (gradients flow to dist); ref_labels
    None: dist is the batch against itself."""
    args, den = _kind_args(kind, margin, extra)
    if dist.device.type in KERNEL_DEVICES:
        inputs = _contiguous(labels, ref_labels, self_index)
        return MiningFunction.apply(kind, dist.contiguous(), *inputs, den, *args)
    _library.warn_fallback()
    total, stats = SUMS[kind](dist, labels, *args, ref_labels, self_index)
    return divide(total, stats, den), stats


def run_chunked(kind, x, y, labels, margin, extra, ref_labels, self_index, distance, chunk):
    """(loss, stats) of a mining loss of the anchors x against the references y (None: x against itself;
    rows normalized where the distance needs it), ``chunk`` anchors at a time."""
    args, den = _kind_args(kind, margin, extra)
    kernel = x.device.type in KERNEL_DEVICES
    if not kernel:
        _library.warn_fallback()
    y = None if y is None or y is x else y.contiguous()
    inputs = _contiguous(labels, ref_labels, self_index)
    return ChunkedMiningFunction.apply(kind, x.contiguous(), y, *inputs, distance, chunk, kernel, den, *args)


def batch_hard(dist, labels, margin, soft, ref_labels=None, self_index=None):
    """(loss, stats) of the batch-hard loss on a distance matrix (see reference.batch_hard)."""
    return run("batch_hard", dist, labels, margin, soft, ref_labels, self_index)


def batch_all(dist, labels, margin, reduction, ref_labels=None, self_index=None):
    """(loss, stats) of the batch-all loss; reduction 0/1/2 = mean_nonzero/mean/sum."""
    return run("batch_all", dist, labels, margin, reduction, ref_labels, self_index)


def semi_hard(dist, labels, margin, ref_labels=None, self_index=None):
    """(loss, stats) of the semi-hard loss on a distance matrix (see reference.semi_hard)."""
    return run("semi_hard", dist, labels, margin, None, ref_labels, self_index)
