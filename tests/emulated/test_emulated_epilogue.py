"""The distance epilogue of distances.block (csrc/cuda/epilogue_kernel.cu: gram_distances_ turns the matrix product
x_b y^T into distances in one pass, in place) on the CUDA emulator, against the CPU op and the torch passes it
replaces (distances.epilogue): bitwise, for float32/float64, the three distances, identical rows (exactly 0), blocks
from 0 to a few thousand rows and columns, row views, NaN and infinite inputs, on fake devices of 1, 4 and 132 SMs in
shuffled block orders; the launch (a grid of one wave at most, 256 threads); the argument checks; the register table
of the fake H200 against the build.

The torch passes' square root on the CPU is not the correctly rounded one in torch 2.14.1 (CUDA's sqrt is, and so
is the op's on every device): for "euclidean" the oracle is the torch passes of "squared_euclidean" and numpy's
(correctly rounded) square root."""

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from emulated import DEVICES, EPILOGUE_REGISTERS, EPILOGUE_THREADS, emu, fresh_emulator, require, set_device  # noqa: F401
from helpers import ids, seed_of

import tripletloss_cuda as tl
from tripletloss_cuda import distances

pytestmark = [pytest.mark.emulated_cuda, pytest.mark.usefixtures("fresh_emulator")]

DTYPES = (torch.float32, torch.float64)


def case(b, m, distance, dtype, seed, d=6, copies=True):
    """(gram, sq_x, sq_y, keys_x, keys_y) of b anchor rows against m reference rows (rows of distances.rows), some
    references copies of anchors (identical rows: distance exactly 0) and duplicated anchors."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    if copies and b and m:
        k = min(b, m) // 3 + 1
        y[torch.randperm(m, generator=gen)[:k]] = x[torch.randperm(b, generator=gen)[:k]]
        if b > 1:
            x[-1] = x[0]
    return inputs_of(x, y, distance)


def inputs_of(x, y, distance):
    rx, ry = distances.rows(x, distance), distances.rows(y, distance)
    sq_x, sq_y = distances.squared_norms(rx, distance), distances.squared_norms(ry, distance)
    return rx @ ry.T, sq_x, sq_y, distances.row_keys(rx), distances.row_keys(ry)


def code(distance):
    return distances.OP_CODES[distances.op_name(distance)]


def emulated(inputs, distance):
    gram = inputs[0].clone()
    torch.ops.tripletloss_cuda_emu.gram_distances_(gram, *inputs[1:], code(distance))
    return gram


def cpu_op(inputs, distance):
    gram = inputs[0].clone()
    torch.ops.tripletloss_cuda.gram_distances_(gram, *inputs[1:], code(distance))
    return gram


def passes(inputs, distance):
    """distances.epilogue's torch passes, with a correctly rounded square root (numpy's) for "euclidean"."""
    if distance != "euclidean":
        return distances.epilogue(inputs[0].clone(), *inputs[1:], distance)
    d2 = distances.epilogue(inputs[0].clone(), *inputs[1:], "squared_euclidean")
    return torch.from_numpy(np.sqrt(d2.numpy()))


def assert_same_bits(actual, expected, what=""):
    """Bitwise equal (the sign of 0 included), NaN where the other is NaN (any payload)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan()), what
    ints = torch.int32 if actual.dtype == torch.float32 else torch.int64
    same = actual.masked_fill(nan, 0).view(ints) == expected.masked_fill(nan, 0).view(ints)
    assert same.all(), f"{what}: {(~same).sum().item()} entries differ, first at {(~same).nonzero()[0].tolist()}"


def check(inputs, distance, what=""):
    """The emulated op equals the CPU op and the torch passes bitwise; identical rows are exactly 0 apart."""
    ours = emulated(inputs, distance)
    assert_same_bits(ours, cpu_op(inputs, distance), f"{what} vs the CPU op")
    assert_same_bits(ours, passes(inputs, distance), f"{what} vs the torch passes")
    same = inputs[3][:, None] == inputs[4][None, :]
    assert (ours[same] == 0).all() and not ours[same].signbit().any()
    return ours


# (B, M): empty blocks, one entry, a row or a column of a few thousand, rows shorter than a warp, rows of a block
# and more, and a few thousand of both (more entries than the 4-SM grid has threads: every thread strides).
SHAPES = [(0, 0), (0, 7), (7, 0), (1, 1), (1, 3000), (3000, 1), (5, 3), (33, 31), (64, 256), (129, 257), (300, 700)]
SHAPES += [(2000, 1500)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_values(dtype, distance, shape):
    inputs = case(*shape, distance, dtype, seed=seed_of(shape, distance))
    check(inputs, distance, f"{shape}")
    launches = emu.launches()
    if shape[0] * shape[1] == 0:
        assert not launches  # nothing to do: no launch
        return
    (launch,) = launches
    assert launch["block"] == EPILOGUE_THREADS and "gram_distances_kernel" in launch["kernel"]
    assert launch["grid"] == min(-(-shape[0] * shape[1] // EPILOGUE_THREADS), 4 * 8), launch


@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_the_batch_against_itself(dtype, distance):
    """x against itself (block() of the whole batch): the diagonal and the duplicated rows are exactly 0."""
    gen = torch.Generator().manual_seed(seed_of(dtype, distance))
    x = torch.randn(90, 5, generator=gen, dtype=dtype)
    x[10:20] = x[:10]
    ours = check(inputs_of(x, x, distance), distance)
    assert (ours.diagonal() == 0).all() and (ours[10:20, :10].diagonal() == 0).all()


@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_row_views(dtype, distance):
    """gram a block of rows of a larger buffer (at an offset), sq and keys row views and strided
    vectors (made contiguous by the host code), as the chunked mining passes them."""
    gram, sq_x, sq_y, keys_x, keys_y = case(60, 45, distance, dtype, seed=seed_of("views", distance))
    buffer = torch.full((61 * 45 + 1,), 7.0, dtype=dtype)
    rows = buffer[1 + 45 : 1 + 45 + 20 * 45].view(20, 45)
    rows.copy_(gram[10:30])
    wide_sq = None if sq_y is None else torch.stack([sq_y, -sq_y], 1)[:, 0]  # stride 2
    wide_keys = torch.stack([keys_y, keys_y + 1], 1)[:, 0]
    inputs = (rows, None if sq_x is None else sq_x[10:30], wide_sq, keys_x[10:30], wide_keys)
    assert rows.is_contiguous() and rows.storage_offset() == 46 and not wide_keys.is_contiguous()
    expected = passes((gram[10:30].clone(), *inputs[1:]), distance)
    torch.ops.tripletloss_cuda_emu.gram_distances_(*inputs, code(distance))
    assert_same_bits(rows, expected, "row view")
    assert (buffer[: 1 + 45] == 7).all() and (buffer[1 + 45 + 20 * 45 :] == 7).all()  # nothing written around it


@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_non_finite_inputs(dtype, distance):
    """NaN and infinite rows (NaN entries stay NaN, except between identical rows: 0), infinite and NaN entries of
    gram and of the squared norms, and matrix products whose g * -2 overflows while the sum would not (the two
    roundings of torch's separate passes: inf, clamped to 0)."""
    gen = torch.Generator().manual_seed(seed_of("nonfinite", dtype, distance))
    x, y = torch.randn(12, 4, generator=gen, dtype=dtype), torch.randn(9, 4, generator=gen, dtype=dtype)
    x[1, 2], x[2, 0], x[3] = torch.nan, torch.inf, -torch.inf
    y[4], y[5, 1] = x[1], torch.inf  # a NaN row identical to an anchor row: 0
    inputs = inputs_of(x, y, distance)
    check(inputs, distance, "non-finite rows")
    gram, sq_x, sq_y, keys_x, keys_y = (t.clone() if t is not None else None for t in inputs)
    gram[0, :4] = torch.tensor([torch.nan, torch.inf, -torch.inf, -0.0])
    if sq_x is not None:
        sq_x[6], sq_y[7] = torch.inf, torch.nan
    check((gram, sq_x, sq_y, keys_x, keys_y), distance, "non-finite entries")
    big = 1.5e19 if dtype == torch.float32 else 1.0e154  # |x|^2 near the largest finite value
    xs = torch.tensor([[big], [big * 0.9]], dtype=dtype)
    check(inputs_of(xs, xs.flip(0), distance), distance, "overflowing products")


@pytest.mark.parametrize("distance", distances.NAMES)
def test_devices_and_block_orders(distance):
    """On 1 SM (one block strides over every entry), 4 SMs and the H200, in shuffled block orders: bitwise the same
    entries, from a grid of one wave of resident blocks."""
    inputs = case(150, 333, distance, torch.float32, seed=seed_of("orders", distance))
    first = None
    for device in ("1sm", "4sm", "h200"):
        for seed in (0, 1, 2):
            set_device(device)
            emu.set_seed(seed)
            emu.clear_launches()
            ours = emulated(inputs, distance)
            (launch,) = emu.launches()
            sms, occupancy = DEVICES[device]
            per_sm = next((v for k, v in sorted(occupancy.items()) if k in launch["kernel"]), 2048 // 256)
            assert launch["grid"] == min(-(-150 * 333 // EPILOGUE_THREADS), sms * per_sm), (device, launch)
            first = ours if first is None else first
            assert_same_bits(ours, first, f"{device} seed {seed}")
    set_device("1sm")
    emu.clear_launches()
    emulated(inputs, distance)
    assert emu.launches()[0]["grid"] == 1


# --- the argument checks ---------------------------------------------------------------------------------


def bad_arguments():
    """(arguments, message) of gram_distances_ calls that the host code rejects."""
    gram, sq_x, sq_y, keys_x, keys_y = case(4, 3, "euclidean", torch.float32, seed=1)
    ok = (gram, sq_x, sq_y, keys_x, keys_y, 0)
    return [
        ((gram[0], *ok[1:]), r"gram should be a 2D tensor \(B, M\), got shape \[3\]"),
        ((gram.half(), *ok[1:]), r"gram should be float32 or float64, got Half"),
        (
            (gram.t(), sq_y, sq_x, keys_y, keys_x, 0),
            r"gram should be contiguous \(it is overwritten in place\), got strides \[1, 3\]",
        ),
        ((*ok[:5], 3), r"distance should be 0 \(euclidean\), 1 \(squared euclidean\) or 2 \(dot\), got 3"),
        ((gram, None, None, keys_x, keys_y, 1), r"sq_x and sq_y should be given for distance 1 \(squared euclidean\)"),
        ((gram, sq_x, sq_y, keys_x, keys_y, 2), r"sq_x and sq_y should be None for distance 2 \(dot\)"),
        ((gram, sq_x[:3], sq_y, keys_x, keys_y, 0), r"sq_x should have shape \(4,\) \(gram's rows\), got \[3\]"),
        ((gram, sq_x, sq_y.double(), keys_x, keys_y, 0), r"sq_y should be Float, got Double"),
        ((gram, sq_x, sq_y, keys_x.int(), keys_y, 0), r"keys_x should be Long, got Int"),
        (
            (gram, sq_x, sq_y, keys_x, keys_y[:, None], 0),
            r"keys_y should have shape \(3,\) \(gram's columns\), got \[3, 1\]",
        ),
    ]


@pytest.mark.parametrize("index", range(10))
def test_errors_are_the_cpu_ops(index):
    """The emulated build runs the same host checks as the CPU op, with the same messages, and leaves gram as it was."""
    args, message = bad_arguments()[index]
    before = args[0].clone()
    for ns in (torch.ops.tripletloss_cuda, torch.ops.tripletloss_cuda_emu):
        with pytest.raises(RuntimeError, match=message):
            ns.gram_distances_(*args)
    assert torch.equal(args[0], before)


def test_h200_register_table_matches_the_build():
    """The fake H200's occupancy of the epilogue kernel comes from emulated.EPILOGUE_REGISTERS: they must be the
    registers of the CUDA build in this tree (read with tools/sass_gate.py)."""
    path = pathlib.Path(__file__).parents[2] / "tools/sass_gate.py"
    spec = importlib.util.spec_from_file_location("sass_gate", path)
    sass_gate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass_gate)
    cuobjdump = sass_gate.find_cuobjdump()
    built = tl._library.FILE
    kernels = sass_gate.read_kernels(cuobjdump, built) if cuobjdump and built else []
    epilogue = {(k.args[0], int(k.args[1])): k.regs for k in kernels if k.family == "epilogue"}
    if not epilogue:
        pytest.skip("no CUDA build of _C here (CI always has one)")
    assert epilogue == EPILOGUE_REGISTERS, "update EPILOGUE_REGISTERS in tests/emulated.py from the gate's kernels"
    assert not any(k.problems() for k in kernels if k.family == "epilogue")
