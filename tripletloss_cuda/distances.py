"""Distances between rows, written once for every part of the package: their names and op codes, the rows they
are computed on, the (N, M) distance matrix from one matrix product and its gradient (whole, or a block of
anchor rows at a time), and the distance of row pairs.

Names (the mining losses, the loss over index triplets, the integrations):
    "euclidean"          ||x - y||, not squared; its gradient at distance 0 is 0, never NaN
    "squared_euclidean"  ||x - y||^2
    "cosine"             1 - cos(x, y): computed as "dot", 1 - <x, y>, on rows L2-normalized first
Op codes (csrc/indexed_math.h `Distance`): OP_CODES.

The distances of (anchor, positive, negative) rows in the triplet ops (csrc/triplet_math.h), TRIPLET_CODES:
    "pairwise"           ||x - y + eps||_p, torch.pairwise_distance
    "cosine"             1 - x.y / (max(|x|, eps) max(|y|, eps)), F.cosine_similarity: its gradient treats the
                         clamped norm as the norm itself (ATen clamps it under no_grad)
    "normalized"         the same value from F.normalize'd rows (sentence-transformers' COSINE): the gradient of
                         clamp_min, none through a norm below eps; "normalized_at_eps" also passes it at a norm of
                         exactly eps, as clamp_min did before mid-2026 (the installed torch picks, ops.py)

Rows are float32 (float64 for float64 embeddings): ``rows``. The matrix is d2_ij = |x_i|^2 + |y_j|^2 -
2 <x_i, y_j> (clamped at 0; its square root for "euclidean"), or 1 - <x_i, y_j>, with the squared norms of
``squared_norms`` in every path, so that a whole matrix and its blocks agree up to the matrix product's
accumulation order. Identical rows are exactly 0 apart in every path (the batch against itself or a
reference set, whole or in blocks of any size): a matrix product rounds each entry in its own order, so a
row's squared norm and its product with an identical row may differ in the last bits; each row's bits are
hashed (``row_keys``) and the entries of rows with equal keys are 0.

``block`` turns its matrix product into distances with the compiled op ``gram_distances_`` (one pass, in place:
csrc/epilogue.cpp, csrc/mining_math.h gram_distance) on CUDA devices where it is compiled, outside torch.compile,
and with six in-place torch passes (``epilogue``) elsewhere: the same entries bitwise on CUDA (``EPILOGUE_DEVICES``
says why the CPU keeps the passes).
    gram_distances_(gram, sq_x?, sq_y?, keys_x, keys_y, distance) -> ()
        gram (B, M) contiguous float32/float64 = x_b @ y.T, overwritten; sq_x (B,), sq_y (M,) the squared norms in
        gram's dtype (None for "dot"); keys_x (B,), keys_y (M,) int64 row_keys; distance: an OP_CODES code.
"""

import torch
import torch.nn.functional as F

from . import _library
from ._library import acc_dtype

NAMES = ("euclidean", "squared_euclidean", "cosine")
OP_CODES = {"euclidean": 0, "squared_euclidean": 1, "dot": 2}
TRIPLET_CODES = {"pairwise": 0, "cosine": 1, "normalized": 2, "normalized_at_eps": 3}


def op_name(distance):
    """The op's distance for a name: "cosine" runs as "dot" on normalized rows."""
    return "dot" if distance == "cosine" else distance


def check_name(distance):
    if distance not in NAMES:
        raise ValueError(f"distance should be one of {', '.join(map(repr, NAMES))}, got {distance!r}")


def rows(embeddings, distance, normalize=False):
    """The rows distances are computed on: float32 (float64 for float64 embeddings), L2-normalized for
    "cosine" or with ``normalize``."""
    x = embeddings.to(acc_dtype(embeddings.dtype))
    return F.normalize(x, dim=1) if normalize or distance == "cosine" else x


def squared_norms(x, distance):
    """|x_i|^2 (None for "cosine", which needs none)."""
    return None if distance == "cosine" else (x * x).sum(1)


# Odd 64-bit multipliers of the row hash, one per column (a Weyl sequence: arithmetic wraps modulo 2^64).
_KEY_STEP, _KEY_START = -7046029254386353131, 0x632BE59BD9B4E019


def row_keys(x):
    """(N,) int64 hash of each float32/float64 row's bits: identical rows have equal keys; distinct rows
    collide with probability about 2^-64. Integer ops only, on x's device, no host synchronization."""
    bits = x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int64).to(torch.int64)
    weights = torch.arange(x.shape[1], device=x.device, dtype=torch.int64) * _KEY_STEP + _KEY_START
    return (bits * (weights | 1)).sum(1)


EPILOGUE_OP = "gram_distances_"
# Device types with the compiled epilogue, fixed at import so that torch.compile sees a constant.
EPILOGUE_KERNELS = _library.kernel_devices((EPILOGUE_OP,))
# Where block() uses it: CUDA only. The op's square root is the correctly rounded one (sqrtf/sqrt). Torch's CUDA
# sqrt_ is ::sqrt compiled without fast math, the same (test_cuda_block_is_the_torch_passes in
# tests/mining/test_epilogue.py checks it on a GPU; not run yet). Torch's CPU sqrt_ is not: in torch 2.14.1 about 15 %
# of float32 and 1 % of float64 results are 1 ulp off the correctly rounded value. So on the CPU the torch passes stay,
# bitwise as before (the CPU op serves the tests and opcheck).
EPILOGUE_DEVICES = EPILOGUE_KERNELS & {"cuda"}


def block(xb, y, sq_xb, sq_y, keys_xb, keys_y, distance):
    """(B, M) distances between the rows of xb and y (rows of ``rows``; squared norms and keys of those rows),
    without gradient: one matrix product, the rest in place in its buffer (one pass of the compiled epilogue
    where there is one for the device, else ``epilogue``'s torch passes)."""
    d = xb @ y.T
    if (
        d.device.type in EPILOGUE_DEVICES
        and d.is_contiguous()
        and not d.requires_grad
        and not torch.compiler.is_compiling()
    ):
        code = OP_CODES[op_name(distance)]
        getattr(torch.ops, _library.NAMESPACE).gram_distances_(d, sq_xb, sq_y, keys_xb, keys_y, code)
        return d
    return epilogue(d, sq_xb, sq_y, keys_xb, keys_y, distance)


def epilogue(d, sq_xb, sq_y, keys_xb, keys_y, distance):
    """block()'s distances from its matrix product d = xb @ y.T by six in-place torch passes (the fallback of the
    compiled gram_distances_, and its oracle in the tests): (d * -2 + |x|^2 + |y|^2) clamped at 0, its square root
    for "euclidean"; -d + 1 for "cosine"; 0 between rows with equal keys."""
    if distance == "cosine":
        d = d.neg_().add_(1)
    else:
        d = d.mul_(-2).add_(sq_xb[:, None]).add_(sq_y[None, :]).clamp_min_(0)
        if distance == "euclidean":
            d = d.sqrt_()
    return d.masked_fill_(keys_xb[:, None] == keys_y[None, :], 0)


def check_epilogue_inputs(gram, sq_x, sq_y, keys_x, keys_y, distance):
    """The checks of csrc/epilogue.cpp `check_inputs`, with its messages (the fake kernel's)."""
    torch._check(gram.dim() == 2, lambda: f"gram should be a 2D tensor (B, M), got shape {list(gram.shape)}")
    torch._check(
        gram.dtype in (torch.float32, torch.float64), lambda: f"gram should be float32 or float64, got {gram.dtype}"
    )
    torch._check(
        gram.is_contiguous(),
        lambda: f"gram should be contiguous (it is overwritten in place), got strides {list(gram.stride())}",
    )
    torch._check(
        distance in (0, 1, 2),
        lambda: f"distance should be 0 (euclidean), 1 (squared euclidean) or 2 (dot), got {distance}",
    )
    dot = distance == OP_CODES["dot"]
    given = "sq_x and sq_y should be given for distance"
    torch._check(
        (sq_x is not None) != dot and (sq_y is not None) != dot,
        lambda: (
            "sq_x and sq_y should be None for distance 2 (dot)"
            if dot
            else f"{given} {distance} ({('euclidean', 'squared euclidean')[distance]})"
        ),
    )
    b, m = gram.shape
    if not dot:
        _check_vector(sq_x, "sq_x", b, "rows", gram.dtype, gram)
        _check_vector(sq_y, "sq_y", m, "columns", gram.dtype, gram)
    _check_vector(keys_x, "keys_x", b, "rows", torch.int64, gram)
    _check_vector(keys_y, "keys_y", m, "columns", torch.int64, gram)


def _check_vector(t, name, n, dim, dtype, gram):
    torch._check(
        t.dim() == 1 and t.shape[0] == n, lambda: f"{name} should have shape ({n},) (gram's {dim}), got {list(t.shape)}"
    )
    torch._check(t.dtype == dtype, lambda: f"{name} should be {_dtype_name(dtype)}, got {_dtype_name(t.dtype)}")
    torch._check(t.device == gram.device, lambda: f"{name} should be on gram's device {gram.device}, got {t.device}")


def _dtype_name(dtype):
    # As the C++ checks print a dtype: Float, Double, Long.
    return {torch.float32: "Float", torch.float64: "Double", torch.int64: "Long"}.get(dtype, str(dtype))


if EPILOGUE_KERNELS:

    @torch.library.register_fake(f"{_library.NAMESPACE}::{EPILOGUE_OP}")
    def _gram_distances_fake(gram, sq_x, sq_y, keys_x, keys_y, distance):
        check_epilogue_inputs(gram, sq_x, sq_y, keys_x, keys_y, distance)


def block_grad(grad, d, xb, y, distance, need_y=True):
    """(dL/dxb, dL/dy) from dL/dd = grad for d = block(xb, y): matrix products, in differentiable ops (double
    backward works through them). The euclidean gradient at distance 0 is 0 (never NaN)."""
    if distance == "cosine":
        return -(grad @ y), (-(grad.T @ xb) if need_y else None)
    # dL/d(d2) = G / (2 d) for euclidean, and 0 at d = 0 (an infinite denominator there, rather than a where()
    # after the division, keeps double backward free of 0/0). At d2 = 0 otherwise x_i = y_j: any coefficient
    # gives 0.
    s = grad / (2 * d).masked_fill_(d == 0, torch.inf) if distance == "euclidean" else grad
    # d(d2_ij)/dx_i = 2 (x_i - y_j), d(d2_ij)/dy_j = 2 (y_j - x_i)
    gx = 2 * (s.sum(1, keepdim=True) * xb - s @ y)
    gy = 2 * (s.sum(0)[:, None] * y - s.T @ xb) if need_y else None
    return gx, gy


def self_grad(grad, d, x, distance):
    """dL/dx for d = block(x, x) (the batch against itself): both sides of every entry with one matrix product,
    dx = 2 (rowsum(T) x - T x) with T = S + S^T (euclidean, squared), -(G + G^T) x (cosine)."""
    if distance == "cosine":
        return -((grad + grad.T) @ x)
    s = grad / (2 * d).masked_fill_(d == 0, torch.inf) if distance == "euclidean" else grad
    t = s + s.T
    return 2 * (t.sum(1, keepdim=True) * x - t @ x)


class _Matrix(torch.autograd.Function):
    """block() of all of x against y (y None: x against itself) with autograd: a hand-written backward of one
    matrix product per input (autograd through the in-place passes would allocate and touch about ten fresh
    (N, M) buffers each way: page faults costing several times the product), itself differentiable."""

    @staticmethod
    def forward(ctx, x, y, distance):
        refs = x if y is None else y
        sq_x, sq_y = squared_norms(x, distance), squared_norms(refs, distance)
        keys_x = row_keys(x)
        keys_y = keys_x if y is None else row_keys(refs)
        if torch.compiler.is_compiling():
            # Out of place under torch.compile (which fuses these passes anyway): torch 2.11 drops the gradient
            # of a Function output that the forward mutated in place (all-zero parameter gradients).
            out = differentiable(x, refs, distance, sq_x, sq_y, keys_x, keys_y)
        else:
            out = block(x, refs, sq_x, sq_y, keys_x, keys_y, distance)
        ctx.distance = distance
        ctx.save_for_backward(x, y, None if distance == "cosine" else out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, out = ctx.saved_tensors
        if y is None:
            return self_grad(grad, out, x, ctx.distance), None, None
        gx, gy = block_grad(grad, out, x, y, ctx.distance)
        return gx, gy, None


def matrix(x, y, distance):
    """The (N, M) distances between rows x and y (of ``rows``; y None: x against itself) with autograd."""
    return _Matrix.apply(x, y, distance)


def differentiable(x, y, distance, sq_x=None, sq_y=None, keys_x=None, keys_y=None):
    """block(x, y) in plain autograd ops (for double backward, and under torch.compile): the same formula."""
    sq_x = squared_norms(x, distance) if sq_x is None else sq_x
    sq_y = squared_norms(y, distance) if sq_y is None else sq_y
    g = x @ y.T
    if distance == "cosine":
        d = 1 - g
    else:
        d2 = (g * -2 + sq_x[:, None] + sq_y[None, :]).clamp_min(0)
        d = d2 if distance == "squared_euclidean" else safe_sqrt(d2)
    keys_x = row_keys(x) if keys_x is None else keys_x
    keys_y = row_keys(y) if keys_y is None else keys_y
    return d.masked_fill(keys_x[:, None] == keys_y[None, :], 0)


def safe_sqrt(x):
    """sqrt(x) for x >= 0 whose gradient at x == 0 is 0 (sqrt's own is inf, and 0 * inf = NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1)), 0)


def pair(x, y, distance):
    """(T,) distances between the rows x[t] and y[t] (op names: "dot" is 1 - <x, y>), from the differences
    (exact: identical rows are 0 apart)."""
    if distance == "dot":
        return 1 - (x * y).sum(-1)
    d2 = (x - y).pow(2).sum(-1)
    return d2 if distance == "squared_euclidean" else safe_sqrt(d2)
