"""The CUDA kernels and launchers of csrc/cuda/*.cu, executed on the CPU by the CUDA emulator (csrc/emu,
tests/emulated.py), against the CPU ops (torch.ops.tripletloss_cuda.*) and the pure-PyTorch reference:
every dtype, p and swap, the three reductions, the launch mappings (several rows per warp, a warp per row,
a block per row, grid-stride loops, mean/sum over one block, many, and more blocks than a block has threads)
on fake devices of 1, 4 and 132 SMs, the vector and scalar paths, bitwise equality across block orders, and the
six mining ops.

Run with `pytest -m emulated_cuda tests` (needs `make build-emu`); hardware-only properties (CUDA graphs,
streams, device memory) stay in test_cuda.py (`-m cuda`)."""

import importlib.util
import pathlib
import re

import pytest
import torch
from emulated import (  # fresh_emulator: the fixture every test uses (pytestmark)
    DEVICES,
    MINING_RESOURCES,
    REGISTERS,
    THREADS,
    blocks_per_sm,
    emu,
    expected_launch,
    fresh_emulator,  # noqa: F401
    launch_group,
    mining_blocks_per_sm,
    mining_threads,
    set_device,
    set_mining_occupancy,
)
from helpers import FLOAT_DTYPES, KINK_GUARD, ids, make_triplet, seed_of, upstream_grad, value_scale

import tripletloss_cuda as tl

pytestmark = [pytest.mark.emulated_cuda, pytest.mark.usefixtures("fresh_emulator")]

# |emulated - CPU op| and |emulated - float64 reference| bounds, relative to the conditioning (value_scale)
# for values and to the largest gradient element for gradients: both round once from float32 (float64)
# accumulators, which add in different orders.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
P_SWAP = [(2.0, False), (2.0, True), (1.0, False), (1.0, True), (3.0, True), (0.5, False)]
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def run(ns, inputs, p=2.0, swap=False, reduction="mean", margin=1.0, eps=1e-6, distance=0):
    """loss, dist and the three gradients (for a fixed upstream gradient) from the forward and backward ops
    of namespace ns (``distance``: a TRIPLET_CODES code)."""
    red = REDUCTIONS[reduction]
    loss, dist = ns.triplet_margin_forward(*inputs, margin, p, eps, swap, red, distance)
    grad = upstream_grad(loss.shape, inputs[0].dtype, "cpu")
    gz = tl.ops.GRAD_AT_ZERO_HINGE
    grads = ns.triplet_margin_backward(grad, *inputs, dist, margin, p, eps, swap, red, gz, distance)
    return loss, dist, grads


def away_from_kinks(inputs, p, swap, margin=1.0, eps=1e-6, distance=0):
    """(N,) bool: the rows whose hinge (and, with swap, d(a,n) - d(p,n)) is not within rounding of 0."""
    a, pos, neg = (x.double() for x in inputs)
    d = [tl.reference.row_distance(x, y, p, eps, distance) for x, y in ((a, pos), (a, neg), (pos, neg))]
    cond = value_scale(inputs, margin, p, eps, swap, "none", distance)
    away = torch.ones_like(d[0], dtype=torch.bool)
    if swap:
        away = (d[1] - d[2]).abs() >= KINK_GUARD * cond
        d[1] = torch.minimum(d[1], d[2])
    return away & ((margin + d[0] - d[1]).abs() >= KINK_GUARD * cond)


def close(actual, expected, tol, scale, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol * max(float(scale), 1e-30), equal_nan=True, msg=what
    )


def check(inputs, p=2.0, swap=False, reduction="mean", distance=0, eps=None):
    """The emulated CUDA ops against the CPU ops (loss, dist, gradients) and the float64 reference (loss);
    returns the emulated results. ``distance``: a TRIPLET_CODES code (eps 1e-6 for pairwise, 1e-8 cosine)."""
    dtype = inputs[0].dtype
    tol = TOL[dtype]
    eps = (1e-6 if distance == 0 else 1e-8) if eps is None else eps
    ours = run(torch.ops.tripletloss_cuda_emu, inputs, p, swap, reduction, eps=eps, distance=distance)
    cpu = run(torch.ops.tripletloss_cuda, inputs, p, swap, reduction, eps=eps, distance=distance)
    loss, dist, grads = ours
    assert loss.dtype == dtype and loss.shape == cpu[0].shape and dist.dtype == cpu[1].dtype
    if inputs[0].shape[0] == 0:
        torch.testing.assert_close(loss, cpu[0], equal_nan=True)
        assert all(g.shape == x.shape for g, x in zip(grads, inputs))
        return ours
    scale = value_scale(inputs, p=p, eps=eps, swap=swap, reduction=reduction, distance=distance)
    ref = tl.reference.triplet_margin_loss(
        *(x.double() for x in inputs), p=p, eps=eps, swap=swap, reduction=reduction, distance=distance
    )
    close(loss, cpu[0], tol, scale.max(), "loss vs the CPU op")
    close(loss, ref, tol, scale.max(), "loss vs the float64 reference")
    close(dist, cpu[1], TOL[dist.dtype], dist.abs().max(), "dist vs the CPU op")
    away = away_from_kinks(inputs, p, swap, eps=eps, distance=distance)[:, None]
    grad_scale = max(g.abs().max().item() for g in cpu[2]) if inputs[0].numel() else 1.0
    for g, g_cpu, name in zip(grads, cpu[2], ("anchor", "positive", "negative")):
        assert g.dtype == dtype and g.shape == inputs[0].shape and g.is_contiguous()
        close(g * away, g_cpu * away, tol, grad_scale, f"grad {name} vs the CPU op")
    return ours


def kernel_vec(record):
    """The vector width of a triplet launch: the last template argument of its kernel name."""
    return int(record["kernel"].rsplit(",", 1)[1].strip(" >"))


# --- values and gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 3), (64, 16), (33, 130), (5, 1000)], ids=ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("p", "swap"), P_SWAP, ids=lambda v: None)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
def test_matrix(dtype, p, swap, reduction, shape):
    """Every dtype, p (1, 2 and the pow path above and below 1), swap and reduction, at shapes that take
    sub-warp groups, a warp and a block per row, both the vector and the scalar loop."""
    scale = 0.01 if dtype == torch.float16 and p < 1 else 1.0
    check(make_triplet(shape, dtype, seed=seed_of(shape, p, swap), scale=scale), p, swap, reduction)


# (N, D): one row of one element; several rows per warp (groups of 2, 4, 8, 16); a warp per row; a block
# per row (D >= 8 * 32 vectors, few rows) or a warp per row where the device has too few blocks for that;
# grid-stride loops (more rows than resident threads on the small devices).
MAPPING_SHAPES = [(1, 1), (300, 1), (40, 3), (100, 8), (50, 32), (30, 64), (20, 130), (9, 257), (6, 1000), (3, 4096)]
MAPPING_SHAPES += [(2, 8192), (3000, 4), (2500, 16), (1100, 40)]


@pytest.mark.parametrize("shape", MAPPING_SHAPES, ids=ids)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
def test_launch_mappings(dtype, device, shape):
    """The launch the launcher chose (grid; threads per row, read from the shuffle masks and barriers) is
    launch_config's, for reduction none; values and gradients are right for none and mean."""
    set_device(device)
    inputs = make_triplet(shape, dtype, seed=seed_of(shape))
    emu.clear_launches()
    check(inputs, 2.0, True, "none")
    forward, backward = emu.launches()
    vec = kernel_vec(forward)
    assert vec == (16 // inputs[0].element_size() if shape[1] % (16 // inputs[0].element_size()) == 0 else 1)
    sms = DEVICES[device][0]
    for record in (forward, backward):
        assert record["block"] == THREADS
        resident = sms * blocks_per_sm(device, record["kernel"])
        group, blocks = expected_launch(shape[0], shape[1], vec, resident)
        assert record["grid"] == blocks, (record, group, blocks)
    resident = sms * blocks_per_sm(device, forward["kernel"])
    assert launch_group(forward) == expected_launch(shape[0], shape[1], vec, resident)[0]
    check(inputs, 2.0, True, "mean")


def test_every_mapping_is_reached():
    """MAPPING_SHAPES x DEVICES reach every group size, the block per row, grid-stride loops and a mean over
    a single block and over many blocks (the model of launch_config in tests/emulated.py)."""
    groups, grid_stride, grids = set(), False, set()
    for device in DEVICES:
        resident = DEVICES[device][0] * blocks_per_sm(device, "forward_kernel")
        for n, d in MAPPING_SHAPES:
            group, blocks = expected_launch(n, d, 4, resident)
            groups.add(group)
            grids.add(min(blocks, 2))
            grid_stride |= n > blocks * (THREADS // group)
    assert groups == {1, 2, 4, 8, 16, 32, THREADS} and grid_stride and grids == {1, 2}


LAYOUTS = ("contiguous", "rows", "transposed", "offset", "broadcast", "broadcast_offset")


def make_layout(shape, dtype, layout, seed):
    if layout.startswith("broadcast"):  # the anchor and the negative: one row of stride 0
        a, pos, neg = make_triplet(
            shape, dtype, layout="offset" if layout.endswith("offset") else "contiguous", seed=seed
        )
        return a[:1].expand(shape), pos, neg[1:2].expand(shape)
    return make_triplet(shape, dtype, layout=layout, seed=seed)


def vectorizable(inputs):
    vec = 16 // inputs[0].element_size()
    cols = inputs[0].shape[1]
    xs = [x if x.stride(1) == 1 or cols <= 1 else x.contiguous() for x in inputs]  # unit_stride_columns
    return cols % vec == 0 and all(x.data_ptr() % 16 == 0 and x.stride(0) % vec == 0 for x in xs)


@pytest.mark.parametrize("shape", [(37, 64), (5, 1024)], ids=ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
def test_layouts(dtype, layout, reduction, shape):
    """Row views, transposed (copied) inputs, misaligned rows and broadcast (stride-0) rows: the vector path
    where every row start is 16-byte aligned, else the scalar path, with the same results."""
    inputs = make_layout(shape, dtype, layout, seed_of(shape, layout))
    check(inputs, 2.0, True, reduction)
    expected = 16 // inputs[0].element_size() if vectorizable(inputs) else 1
    assert {kernel_vec(r) for r in emu.launches()} == {expected}
    if layout == "offset" or layout == "broadcast_offset":
        assert expected == 1


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (4, 0), (1, 1)], ids=ids)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
def test_edge_shapes(dtype, shape, reduction):
    """No rows (no launch: mean NaN, sum 0), rows of no elements, a single element."""
    check(make_triplet(shape, dtype, seed=3), 2.0, True, reduction)


@pytest.mark.parametrize("shape", [(400, 64), (3, 4096), (3000, 3), (300, 130)], ids=ids)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
def test_block_order_does_not_change_the_result(dtype, reduction, device, shape):
    """Three runs with different block and warp orders give bitwise equal losses, distances and gradients
    (per-block partials added in a fixed order by the last block)."""
    set_device(device)
    inputs = make_triplet(shape, dtype, seed=seed_of(shape, "order"))
    results = []
    for seed in (1, 2, 3):
        emu.set_seed(seed)
        results.append(run(torch.ops.tripletloss_cuda_emu, inputs, 2.0, True, reduction))
    first = results[0]
    for other in results[1:]:
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
        assert all(torch.equal(g, h) for g, h in zip(first[2], other[2]))
    check(inputs, 2.0, True, reduction)


# More blocks than a block has threads, as an H200 launches at production sizes: a block per row (300 rows of
# 1024 floats: 300 blocks) and a warp per row (2100 rows of 64 doubles: 8 rows a block, 263 blocks).
MANY_BLOCKS = [(torch.float32, (300, 1024)), (torch.float64, (2100, 64))]


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize(("dtype", "shape"), MANY_BLOCKS, ids=ids)
def test_final_reduction_over_more_blocks_than_threads(dtype, shape, reduction):
    """The last block's sum of the per-block partials strides over them (b += blockDim.x) more than once when the
    grid has more blocks than a block has threads: the fake H200's grid at these sizes (launch_config's, one wave
    of resident blocks), and the loss of the CPU op and the reference, in every block order."""
    set_device("h200")
    inputs = make_triplet(shape, dtype, seed=seed_of(shape, "many blocks"))
    emu.clear_launches()
    ours = check(inputs, 2.0, True, reduction)
    forward = emu.launches()[0]
    resident = DEVICES["h200"][0] * blocks_per_sm("h200", forward["kernel"])
    assert forward["grid"] == expected_launch(*shape, kernel_vec(forward), resident)[1] > THREADS == forward["block"]
    emu.set_seed(7)
    assert torch.equal(run(torch.ops.tripletloss_cuda_emu, inputs, 2.0, True, reduction)[0], ours[0])


@pytest.mark.parametrize("p", (2.0, 1.5))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=ids)
def test_non_finite_inputs(dtype, p):
    """NaN and inf in some rows propagate as in the CPU kernels (NaN loss and gradients on those rows)."""
    a, pos, neg = make_triplet((70, 40), dtype, seed=5)
    a[3, 7], pos[10, 0], neg[50, 39] = float("nan"), float("inf"), float("-inf")
    for reduction in REDUCTIONS:
        ours = run(torch.ops.tripletloss_cuda_emu, (a, pos, neg), p, True, reduction)
        cpu = run(torch.ops.tripletloss_cuda, (a, pos, neg), p, True, reduction)
        for x, y in zip((ours[0], ours[1], *ours[2]), (cpu[0], cpu[1], *cpu[2])):
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf(), y.isinf())


# --- the cosine distance ------------------------------------------------------------------------------------

COSINE = {"cosine": 1, "normalized": 2, "normalized_at_eps": 3}


@pytest.mark.parametrize("shape", [(7, 3), (50, 32), (33, 130), (9, 257), (5, 1000), (3000, 4)], ids=ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("swap", (False, True))
@pytest.mark.parametrize("distance", COSINE.values(), ids=COSINE.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=ids)
def test_cosine(dtype, distance, swap, reduction, shape):
    """The cosine kernels (six row sums forward, the rows' linear combination backward) against the CPU ops and
    the float64 reference, over group sizes from 1 thread to a warp and grid-stride loops."""
    check(make_triplet(shape, dtype, seed=seed_of(shape, "cosine")), swap=swap, reduction=reduction, distance=distance)


@pytest.mark.parametrize("shape", [(40, 3), (20, 130), (3, 4096), (2, 8192)], ids=ids)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=ids)
def test_cosine_launch_mappings(dtype, device, shape):
    """The cosine launches map rows as the p-norm ones do (launch_config: a block per long row included)."""
    set_device(device)
    inputs = make_triplet(shape, dtype, seed=seed_of(shape, "cosine map"))
    emu.clear_launches()
    check(inputs, swap=True, reduction="none", distance=1)
    forward, backward = emu.launches()
    vec = kernel_vec(forward)
    for record in (forward, backward):
        resident = DEVICES[device][0] * blocks_per_sm(device, record["kernel"])
        assert record["grid"] == expected_launch(shape[0], shape[1], vec, resident)[1], record
    resident = DEVICES[device][0] * blocks_per_sm(device, forward["kernel"])
    assert launch_group(forward) == expected_launch(shape[0], shape[1], vec, resident)[0]
    check(inputs, swap=True, reduction="mean", distance=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=ids)
def test_cosine_layouts(dtype, layout):
    """Strided, misaligned and broadcast rows: the cosine's vector and scalar paths give the same results."""
    inputs = make_layout((37, 64), dtype, layout, seed_of(layout, "cosine"))
    check(inputs, swap=True, reduction="sum", distance=1)
    expected = 16 // inputs[0].element_size() if vectorizable(inputs) else 1
    assert {kernel_vec(r) for r in emu.launches()} == {expected}


@pytest.mark.parametrize("distance", COSINE.values(), ids=COSINE.keys())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=ids)
def test_cosine_norms_at_the_clamp(dtype, distance):
    """Zero rows, norms below eps (where each convention's gradient differs), at exactly eps, and equal rows."""
    a, pos, neg = make_triplet((24, 16), dtype, seed=11)
    pos[0] = 0
    a[1] *= 1e-10
    neg[2] *= 3e-11
    a[3] = pos[3]
    neg[4] = pos[4] * 1e-10
    unit = torch.zeros(16, dtype=dtype)
    unit[5] = 1e-8 if dtype == torch.float64 else float(torch.tensor(1e-8, dtype=dtype))
    a[5] = unit
    for reduction in REDUCTIONS:
        check((a, pos, neg), swap=True, reduction=reduction, distance=distance)


@pytest.mark.parametrize("shape", [(400, 64), (3, 4096), (300, 130)], ids=ids)
@pytest.mark.parametrize("device", ("4sm", "h200"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=ids)
def test_cosine_block_order_does_not_change_the_result(dtype, device, shape):
    """Bitwise equal cosine losses, distances and gradients in three block and warp orders."""
    set_device(device)
    inputs = make_triplet(shape, dtype, seed=seed_of(shape, "cosine order"))
    results = []
    for seed in (1, 2, 3):
        emu.set_seed(seed)
        results.append(run(torch.ops.tripletloss_cuda_emu, inputs, swap=True, reduction="mean", eps=1e-8, distance=1))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        assert all(torch.equal(g, h) for g, h in zip(results[0][2], other[2]))


def test_cosine_non_finite_inputs():
    """NaN and inf propagate in the cosine kernels as in the CPU ones."""
    a, pos, neg = make_triplet((70, 40), torch.float32, seed=6)
    a[3, 7], pos[10, 0], neg[50, 39] = float("nan"), float("inf"), float("-inf")
    for reduction in REDUCTIONS:
        ours = run(torch.ops.tripletloss_cuda_emu, (a, pos, neg), swap=True, reduction=reduction, eps=1e-8, distance=1)
        cpu = run(torch.ops.tripletloss_cuda, (a, pos, neg), swap=True, reduction=reduction, eps=1e-8, distance=1)
        for x, y in zip((ours[0], ours[1], *ours[2]), (cpu[0], cpu[1], *cpu[2])):
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf(), y.isinf())


def test_errors_are_the_cpu_ops():
    """The launchers' argument checks (shared host code) raise as the CPU ops do."""
    a, pos, neg = make_triplet((4, 3), torch.float32)
    for args in ((a, pos, neg, 1.0, 0.0, 1e-6, False, 1), (a, pos, neg, 1.0, 2.0, 1e-6, False, 3)):
        with pytest.raises(RuntimeError) as expected:
            torch.ops.tripletloss_cuda.triplet_margin_forward(*args)
        with pytest.raises(RuntimeError, match=re.escape(str(expected.value).splitlines()[0])):
            torch.ops.tripletloss_cuda_emu.triplet_margin_forward(*args)


# --- the emulator's own rules ---------------------------------------------------------------------------

RULES = {
    "barrier_after_exit": r"barrier_after_exit.*__syncthreads\(\) is reached by 16 of 64 threads",
    "shfl_without_own_lane": r"shfl_without_own_lane.*lane 1 calls __shfl_xor_sync with mask 0x00000001, which lacks",
    "shfl_outside_mask": r"shfl_outside_mask.*reads lane 2 in __shfl_xor_sync, outside the mask 0x00000003",
    "shfl_with_exited_lane": r"shfl_with_exited_lane.*for lane 1, which has exited: a deadlock",
    "shfl_with_lane_at_barrier": r"shfl_with_lane_at_barrier.*for lane 1, which waits at __syncthreads\(\)",
    "throws": r"throws.*thread 5: thread 5 throws",
    "invalid_configuration": r"invalid configuration argument",
}


@pytest.mark.parametrize("rule", RULES)
def test_emulator_rules(rule):
    """A kernel that breaks a rule raises a RuntimeError naming the kernel and the rule (never a hang), and
    the emulator runs the next kernel (a block-wide sum of the thread indices) correctly."""
    with pytest.raises(RuntimeError, match=RULES[rule]):
        emu.selftest(rule)
    assert emu.selftest("block_sum") == 3 * sum(range(64))
    check(make_triplet((20, 300), torch.float32, seed=1), 2.0, True, "mean")


# --- mining ---------------------------------------------------------------------------------------------

MINING = [
    ("batch_hard", {"soft": False}),
    ("batch_hard", {"soft": True}),
    ("batch_all", {}),
    ("semi_hard", {}),
]


def mining_run(ns, kind, dist, labels, ref_labels, self_index, kw, margin=0.2):
    """The forward outputs and the gradient of dist of a mining op of namespace ns (the ops return and take
    the gradient of the loss sum)."""
    forward, backward = getattr(ns, f"{kind}_forward"), getattr(ns, f"{kind}_backward")
    grad = torch.tensor(1.5, dtype=torch.float64)
    if kind == "batch_hard":
        loss, stats, mined = forward(dist, labels, ref_labels, self_index, margin, kw["soft"])
        return (loss, stats, mined), backward(grad, dist, mined, margin, kw["soft"])
    loss, stats = forward(dist, labels, ref_labels, self_index, margin)
    return (loss, stats), backward(grad, dist, labels, ref_labels, self_index, margin)


@pytest.mark.parametrize("refs", ("self", "reference_set"))
@pytest.mark.parametrize("classes", ("two", "many"))
@pytest.mark.parametrize("n", (1, 6, 40, 129, 300))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=ids)
@pytest.mark.parametrize(("kind", "kw"), MINING, ids=lambda v: None if isinstance(v, dict) else v)
def test_mining(kind, kw, dtype, n, classes, refs):
    """The six mining ops through the CUDA kernels (a block per anchor) equal the CPU ops: stats, mined
    indices and gradients exactly (the same per-anchor math), loss sums to rounding (another order). With
    the batch against itself (an (N, N) matrix, anchor i excluded as its own positive) and against a
    reference set ((N, M), some anchors with a self row, others with -1)."""
    gen = torch.Generator().manual_seed(seed_of(kind, n, classes, refs))
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    label_count = 2 if classes == "two" else max(n // 3, 1)
    labels = torch.randint(0, label_count, (n,), generator=gen)
    if refs == "self":
        y, ref_labels, self_index = x, labels, torch.arange(n)
    else:
        m = n // 2 + 3
        y = torch.randn(m, 8, generator=gen, dtype=torch.float64)
        ref_labels = torch.randint(0, label_count, (m,), generator=gen)
        self_index = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randint(0, m, (n,), generator=gen), -1)
    dist = torch.cdist(x, y).to(dtype)
    ours = mining_run(torch.ops.tripletloss_cuda_emu, kind, dist, labels, ref_labels, self_index, kw)
    cpu = mining_run(torch.ops.tripletloss_cuda, kind, dist, labels, ref_labels, self_index, kw)
    tol = TOL[dtype]
    close(ours[0][0], cpu[0][0], tol, cpu[0][0].abs().clamp_min(1), "loss")
    for x, y in zip(ours[0][1:], cpu[0][1:]):
        assert torch.equal(x, y)
    assert torch.equal(ours[1], cpu[1])
    check_mining_launches(dist.shape, "4sm")


def check_mining_launches(shape, device, launches=None):
    """The two launches of a mining op pair: a block of mining_threads(M) per anchor, as many blocks as the
    device holds at once (emulated.mining_blocks_per_sm), at most N."""
    n, m = shape
    launches = emu.launches() if launches is None else launches
    assert len(launches) == 2, launches
    for r in launches:
        threads = mining_threads(m)
        per_sm = mining_blocks_per_sm(device, r["kernel"], threads)
        assert r["block"] == threads and r["grid"] == max(1, min(n, DEVICES[device][0] * per_sm)), (r, shape, device)


def mining_case(n, m, label_count, dtype, seed, majority=0.0, ties=False, misaligned=False):
    """dist (N, M), labels, ref_labels and self_index: the batch against itself (m None) or against a reference
    set of m rows, some anchors with a self row. majority: the share of rows in class 0 (one class holding
    most of the batch); ties: distances rounded to quarters (ties and duplicates everywhere); misaligned: dist
    one element past a 16-byte boundary (the kernels' scalar path on every row)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(k):
        other = torch.randint(1, label_count + 1, (k,), generator=gen)
        return torch.where(torch.rand(k, generator=gen) < majority, 0, other)

    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    labels = draw(n)
    if m is None:
        y, ref_labels, self_index = x, labels, torch.arange(n)
    else:
        y, ref_labels = torch.randn(m, 8, generator=gen, dtype=torch.float64), draw(m)
        self_index = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randint(0, m, (n,), generator=gen), -1)
    dist = torch.cdist(x, y)
    if ties:
        dist = (dist * 4).round() / 4
    dist = dist.to(dtype)
    if misaligned:
        flat = torch.empty(dist.numel() + 1, dtype=dtype)[1:]
        dist = flat.copy_(dist.flatten()).view(dist.shape)
        assert dist.data_ptr() % 16 and dist.is_contiguous()
    return dist, labels, ref_labels, self_index


def check_mining(kind, kw, case):
    """The emulated op pair equals the CPU's: stats, mined indices and gradients exactly, the loss sum to
    rounding. Returns the emulated outputs."""
    ours = mining_run(torch.ops.tripletloss_cuda_emu, kind, *case, kw)
    cpu = mining_run(torch.ops.tripletloss_cuda, kind, *case, kw)
    close(ours[0][0], cpu[0][0], TOL[case[0].dtype], cpu[0][0].abs().clamp_min(1), "loss")
    for x, y in zip(ours[0][1:], cpu[0][1:]):
        assert torch.equal(x, y)
    assert torch.equal(ours[1], cpu[1])
    return ours


def most_positives(labels, ref_labels, self_index):
    """The largest number of positives of an anchor."""
    same = labels[:, None] == ref_labels[None, :]
    same[torch.arange(len(labels)), self_index.clamp_min(0)] &= self_index < 0
    return int(same.sum(1).max())


@pytest.mark.parametrize("refs", ("self", "reference_set"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=ids)
@pytest.mark.parametrize(("kind", "kw"), MINING, ids=lambda v: None if isinstance(v, dict) else v)
def test_mining_one_class_holds_most_of_the_batch(kind, kw, dtype, refs):
    """Anchors with more positives than a shared-memory tile (1024): batch-all and semi-hard take their
    positives a tile at a time, re-reading the row from global memory (2 and 3 tiles here)."""
    n, m = (1300, None) if refs == "self" else (160, 2600)
    case = mining_case(n, m, 3, dtype, seed=seed_of(kind, dtype, refs), majority=0.9)
    assert most_positives(*case[1:]) > (1024 if refs == "self" else 2048)
    check_mining(kind, kw, case)
    check_mining_launches(case[0].shape, "4sm")


@pytest.mark.parametrize("layout", ("aligned", "misaligned"))
@pytest.mark.parametrize("shape", ((5, 1), (33, 37), (64, 300), (40, 1030), (12, 2100)), ids=str)
@pytest.mark.parametrize(("kind", "kw"), MINING, ids=lambda v: None if isinstance(v, dict) else v)
def test_mining_ties_sizes_and_layouts(kind, kw, shape, layout):
    """Rows from 1 to 2100 columns (blocks of 32 to 256 threads, vector and scalar columns), distances with
    ties and duplicates everywhere (the lowest column wins, as on the CPU), rows aligned or not."""
    for dtype in (torch.float32, torch.float64):
        case = mining_case(
            shape[0], shape[1], 4, dtype, seed_of(kind, shape), ties=True, misaligned=layout != "aligned"
        )
        emu.clear_launches()
        check_mining(kind, kw, case)
        check_mining_launches(case[0].shape, "4sm", emu.launches()[:2])


@pytest.mark.parametrize(("kind", "kw"), MINING, ids=lambda v: None if isinstance(v, dict) else v)
def test_mining_few_thousand_on_the_h200(kind, kw):
    """N = 3000 anchors of 100 classes against themselves on the fake H200 (its occupancy at 256 threads from
    the build's registers and shared memory: fewer blocks than anchors, so blocks grid-stride)."""
    case = mining_case(3000, None, 100, torch.float32, seed=seed_of(kind, 3000))
    set_mining_occupancy("h200", 3000)
    emu.clear_launches()
    check_mining(kind, kw, case)
    check_mining_launches(case[0].shape, "h200")
    assert emu.launches()[0]["grid"] < 3000


@pytest.mark.parametrize(("kind", "kw"), MINING, ids=lambda v: None if isinstance(v, dict) else v)
def test_mining_devices_and_block_orders(kind, kw):
    """On 1 SM (one block grid-striding over every anchor), 4 SMs and the H200, with shuffled block orders:
    bitwise the same results (each anchor's work does not depend on which block or when)."""
    case = mining_case(150, 210, 5, torch.float32, seed=seed_of(kind), ties=True)
    first = None
    for device in ("1sm", "4sm", "h200"):
        for seed in (0, 1, 2):
            set_mining_occupancy(device, case[0].shape[1])
            emu.set_seed(seed)
            emu.clear_launches()
            ours = mining_run(torch.ops.tripletloss_cuda_emu, kind, *case, kw)
            check_mining_launches(case[0].shape, device)
            flat = [*ours[0], ours[1]]
            first = first or flat
            assert all(torch.equal(x, y) for x, y in zip(flat, first)), (device, seed)
    assert emu.launches()[0]["grid"] > 1
    set_device("1sm")
    emu.clear_launches()
    mining_run(torch.ops.tripletloss_cuda_emu, kind, *case, kw)
    assert all(r["grid"] == 1 for r in emu.launches())


# --- the loss over index triplets -------------------------------------------------------------------------

INDEXED_DTYPES = (torch.float32, torch.float64, torch.float16)


def indexed_run(ns, x, r, a, p, n, distance, swap, soft, reduction, margin=0.3):
    """The reduced loss, the saved values and both gradients through the indexed ops of namespace ns, with the
    reduction and the backward's CSR computed as tripletloss_cuda.indexed.ops does around the ops."""
    saved = ns.indexed_triplet_forward(x, r, a, p, n, distance, margin, swap, soft)
    losses = saved[:, 3].clone().requires_grad_()
    loss = tl.indexed.reference.reduce(losses, reduction, x.dtype)
    (w,) = torch.autograd.grad(loss, losses, torch.full_like(loss, 1.25))  # each triplet's upstream gradient
    m = 0 if r is None else r.shape[0]
    entries, offsets = tl.indexed.ops.destinations(a, p, n, x.shape[0], m)
    grads = ns.indexed_triplet_backward(w, x, r, a, p, n, saved, entries, offsets, distance, margin, swap, soft)
    return loss.detach(), saved, grads


@pytest.mark.parametrize("reduction", (0, 1, 3))
@pytest.mark.parametrize(("swap", "soft"), ((False, False), (True, False), (False, True)))
@pytest.mark.parametrize("distance", (0, 1, 2))
@pytest.mark.parametrize("refs", (False, True))
@pytest.mark.parametrize("dtype", INDEXED_DTYPES, ids=ids)
def test_indexed(dtype, refs, distance, swap, soft, reduction):
    """The loss over index triplets through the CUDA launchers (a thread per triplet forward, a thread per
    destination row backward, contributions added in the CSR order) equals the CPU op, with duplicated rows
    (a row in many triplets and in several roles), and bitwise across block orders."""
    gen = torch.Generator().manual_seed(seed_of(dtype, refs, distance, swap, soft, reduction))
    n_rows, m_rows, t = 37, 29 if refs else 37, 300
    x = torch.randn(n_rows, 24, generator=gen).to(dtype)
    r = torch.randn(m_rows, 24, generator=gen).to(dtype) if refs else None
    a = torch.randint(0, n_rows, (t,), generator=gen)
    p, n = (torch.randint(0, m_rows, (t,), generator=gen) for _ in range(2))
    emu.set_seed(1)
    ours = indexed_run(torch.ops.tripletloss_cuda_emu, x, r, a, p, n, distance, swap, soft, reduction)
    cpu = indexed_run(torch.ops.tripletloss_cuda, x, r, a, p, n, distance, swap, soft, reduction)
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    for name, o, c in (("loss", ours[0], cpu[0]), ("saved", ours[1], cpu[1])):
        close(o, c, tol, c.double().abs().nan_to_num().max().clamp_min(1), name)
    for o, c in zip(ours[2], cpu[2]):
        assert o.shape == c.shape
        if not c.numel():  # no reference set: an empty grad_ref_embeddings
            continue
        scale = c.double().abs().max().clamp_min(1e-30)
        close(o, c, 4e-3 if dtype == torch.float16 else tol, scale, "grad")
    emu.set_seed(2)
    again = indexed_run(torch.ops.tripletloss_cuda_emu, x, r, a, p, n, distance, swap, soft, reduction)
    assert all(torch.equal(u, v) for u, v in zip((ours[0], ours[1], *ours[2]), (again[0], again[1], *again[2])))


@pytest.mark.parametrize("t", (0, 1, 129))
def test_indexed_sizes_and_launches(t):
    """T = 0 launches nothing forward; grids cover every triplet (forward) and every row (backward)."""
    x = torch.randn(40, 8, dtype=torch.float64)
    a, p, n = (torch.randint(0, 40, (t,)) for _ in range(3))
    ours = indexed_run(torch.ops.tripletloss_cuda_emu, x, None, a, p, n, 0, False, False, 2)
    cpu = indexed_run(torch.ops.tripletloss_cuda, x, None, a, p, n, 0, False, False, 2)
    close(ours[0], cpu[0], TOL[torch.float64], 1, "loss")
    close(ours[2][0], cpu[2][0], TOL[torch.float64], 1, "grad")
    grids = [(r["grid"], r["block"]) for r in emu.launches()]
    assert all(block == 128 for _, block in grids)


def test_indexed_out_of_range_reads_nothing():
    """On the CUDA path the range is checked per triplet in the kernel (no host synchronization): a bad
    triplet reads no row, its loss is NaN and it sends no gradient; the valid ones are unaffected."""
    x = torch.randn(10, 8, dtype=torch.float64)
    a, p, n = torch.tensor([0, 1, 2]), torch.tensor([3, 10, 4]), torch.tensor([5, 6, -1])
    loss, _, (gx, _) = indexed_run(torch.ops.tripletloss_cuda_emu, x, None, a, p, n, 0, False, False, 0)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    ref, _, (gref, _) = indexed_run(torch.ops.tripletloss_cuda, x, None, a[:1], p[:1], n[:1], 0, False, False, 0)
    torch.testing.assert_close(loss[:1], ref)
    torch.testing.assert_close(gx, gref)


def test_h200_register_table_matches_the_build():
    """The fake H200's occupancy comes from emulated.REGISTERS (triplet kernels) and MINING_RESOURCES (registers
    and shared memory of the mining kernels): they must be those of the CUDA build in this tree (read with
    tools/sass_gate.py), so that a kernel change cannot leave them stale."""
    spec = importlib.util.spec_from_file_location("sass_gate", pathlib.Path(__file__).parents[2] / "tools/sass_gate.py")
    sass_gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass_gate)
    cuobjdump = sass_gate.find_cuobjdump()
    built = tl._library.FILE  # the _C under test: the in-place build, or the installed wheel's
    kernels = sass_gate.read_kernels(cuobjdump, built) if cuobjdump and built else []
    triplet = [k for k in kernels if k.triplet]
    if not triplet:
        pytest.skip("no CUDA build of _C here (CI always has one)")
    table = {
        (kernel, dtype, norm, swap, vec): int(regs)
        for (kernel, dtype), entries in REGISTERS.items()
        for norm, swap, vec, regs in (entry.replace(":", "/").split("/") for entry in entries.split())
    }
    norms = {"0": "L1", "1": "L2", "2": "Lp", "3": "Cos"}
    built_table = {
        (
            k.base.removesuffix("_kernel"),
            k.args[0],
            norms[k.args[1][-1]],
            "swap" if k.args[2] == "true" else "noswap",
            k.args[3],
        ): k.regs
        for k in triplet
    }
    assert built_table == table, "update REGISTERS in tests/emulated.py from `python tools/sass_gate.py`"
    built_mining = {f"{k.base}<{k.args[0]}>": (k.regs, k.shared) for k in kernels if k.family == "mining"}
    assert built_mining == MINING_RESOURCES, "update MINING_RESOURCES in tests/emulated.py from the gate's kernels"
