"""The emulated CUDA backend (the test-only module tripletloss_emu, csrc/emu): the CUDA kernel source run on the
CPU, its ops as torch.ops.tripletloss_cuda_emu.* on CPU tensors. Fake devices and the Python model of the launch
configuration the tests check the launch log against.

The module is built apart from the package (`make build-emu`: a top-level module in build/<venv>-emu, never
installed), so that the tests find it next to an in-place build and next to an installed wheel alike: from the
folder TRIPLETLOSS_EMU_LIB names (the Makefile sets it), else the default venv's. TRIPLETLOSS_EMU=sanitize
selects the build under AddressSanitizer/UBSan (tripletloss_emu_san, `make sanitize`)."""

import importlib
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULE = "tripletloss_emu_san" if os.environ.get("TRIPLETLOSS_EMU") == "sanitize" else "tripletloss_emu"
EMU_LIB = os.environ.get("TRIPLETLOSS_EMU_LIB") or str(ROOT / "build" / ".venv-emu")
if EMU_LIB not in sys.path:
    sys.path.append(EMU_LIB)
try:
    emu = importlib.import_module(MODULE)
    EMU_ERROR = None
except ImportError as e:
    emu, EMU_ERROR = None, e


THREADS = 256  # kThreads of csrc/cuda/triplet_kernel.cu
WARP = 32


# Registers per thread of each triplet kernel (norm/swap/vector width: registers), as ptxas allocated them in
# the nvcc 13.0 sm_90 build (tools/sass_gate.py; no local memory or stack anywhere). test_emulated's
# test_h200_register_table_matches_the_build fails when the build no longer matches.
REGISTERS = {
    ("forward", "float"): "L1/noswap/1:80 L1/noswap/4:64 L1/swap/1:64 L1/swap/4:64 L2/noswap/1:80 L2/noswap/4:64 "
    "L2/swap/1:64 L2/swap/4:72 Lp/noswap/1:42 Lp/noswap/4:54 Lp/swap/1:48 Lp/swap/4:56 "
    "Cos/noswap/1:96 Cos/noswap/4:117 Cos/swap/1:86 Cos/swap/4:110",
    ("forward", "double"): "L1/noswap/1:80 L1/noswap/2:58 L1/swap/1:68 L1/swap/2:60 L2/noswap/1:80 L2/noswap/2:58 "
    "L2/swap/1:66 L2/swap/2:63 Lp/noswap/1:77 Lp/noswap/2:84 Lp/swap/1:82 Lp/swap/2:109 "
    "Cos/noswap/1:114 Cos/noswap/2:124 Cos/swap/1:96 Cos/swap/2:112",
    ("forward", "c10::Half"): "L1/noswap/1:38 L1/noswap/8:48 L1/swap/1:40 L1/swap/8:62 L2/noswap/1:38 L2/noswap/8:48 "
    "L2/swap/1:40 L2/swap/8:62 Lp/noswap/1:40 Lp/noswap/8:55 Lp/swap/1:40 Lp/swap/8:59 "
    "Cos/noswap/1:40 Cos/noswap/8:61 Cos/swap/1:40 Cos/swap/8:69",
    (
        "forward",
        "c10::BFloat16",
    ): "L1/noswap/1:38 L1/noswap/8:48 L1/swap/1:40 L1/swap/8:60 L2/noswap/1:38 L2/noswap/8:48 "
    "L2/swap/1:40 L2/swap/8:60 Lp/noswap/1:40 Lp/noswap/8:58 Lp/swap/1:40 Lp/swap/8:63 "
    "Cos/noswap/1:40 Cos/noswap/8:56 Cos/swap/1:40 Cos/swap/8:67",
    ("backward", "float"): "L1/noswap/1:48 L1/noswap/4:62 L1/swap/1:48 L1/swap/4:64 L2/noswap/1:48 L2/noswap/4:61 "
    "L2/swap/1:48 L2/swap/4:62 Lp/noswap/1:48 Lp/noswap/4:69 Lp/swap/1:56 Lp/swap/4:72 "
    "Cos/noswap/1:64 Cos/noswap/4:80 Cos/swap/1:56 Cos/swap/4:83",
    ("backward", "double"): "L1/noswap/1:56 L1/noswap/2:60 L1/swap/1:57 L1/swap/2:63 L2/noswap/1:56 L2/noswap/2:60 "
    "L2/swap/1:58 L2/swap/2:60 Lp/noswap/1:70 Lp/noswap/2:68 Lp/swap/1:70 Lp/swap/2:72 "
    "Cos/noswap/1:77 Cos/noswap/2:90 Cos/swap/1:72 Cos/swap/2:90",
    ("backward", "c10::Half"): "L1/noswap/1:32 L1/noswap/8:48 L1/swap/1:32 L1/swap/8:56 L2/noswap/1:38 L2/noswap/8:48 "
    "L2/swap/1:32 L2/swap/8:48 Lp/noswap/1:44 Lp/noswap/8:59 Lp/swap/1:48 Lp/swap/8:64 "
    "Cos/noswap/1:44 Cos/noswap/8:79 Cos/swap/1:40 Cos/swap/8:83",
    (
        "backward",
        "c10::BFloat16",
    ): "L1/noswap/1:32 L1/noswap/8:48 L1/swap/1:32 L1/swap/8:56 L2/noswap/1:38 L2/noswap/8:60 "
    "L2/swap/1:32 L2/swap/8:48 Lp/noswap/1:44 Lp/noswap/8:63 Lp/swap/1:48 Lp/swap/8:64 "
    "Cos/noswap/1:44 Cos/noswap/8:72 Cos/swap/1:40 Cos/swap/8:79",
}


# Registers per thread and static shared memory (bytes) of each mining kernel in the same build (the gate's
# REG and SHARED); the fake H200's occupancy of a mining kernel at a block size comes from them.
MINING_RESOURCES = {
    "batch_hard_kernel<float>": (40, 1120),
    "batch_hard_kernel<double>": (40, 1152),
    "batch_hard_grad_kernel<float>": (24, 0),
    "batch_hard_grad_kernel<double>": (24, 0),
    "batch_all_kernel<float>": (46, 19528),
    "batch_all_kernel<double>": (46, 23624),
    "batch_all_grad_kernel<float>": (48, 14408),
    "batch_all_grad_kernel<double>": (46, 18504),
    "semi_hard_kernel<float>": (40, 29872),
    "semi_hard_kernel<double>": (46, 34000),
    "semi_hard_grad_kernel<float>": (32, 29808),
    "semi_hard_grad_kernel<double>": (40, 33936),
}


# Registers per thread of the distance epilogue's kernel gram_distances_kernel<T, distance code> (csrc/cuda/
# epilogue_kernel.cu, 256 threads) in the same build; test_emulated_epilogue.py checks them against the build.
EPILOGUE_REGISTERS = {
    ("float", 0): 26,
    ("float", 1): 32,
    ("float", 2): 28,
    ("double", 0): 32,
    ("double", 1): 30,
    ("double", 2): 28,
}
EPILOGUE_THREADS = 256


def mining_threads(m):
    """threads_for in csrc/cuda/mining_kernel.cu: about 8 columns per thread, from a warp to 256 threads."""
    threads = WARP
    while threads < 256 and threads * 8 < m:
        threads *= 2
    return threads


def sm90_blocks_per_sm(registers, threads=THREADS):
    """Theoretical resident blocks per SM on sm_90: 2048 threads, 32 blocks, and 64K registers in four
    partitions of 16K, allocated to warps in units of 256."""
    per_warp = -(-registers * WARP // 256) * 256
    warps = 4 * (16384 // per_warp)
    return min(32, 2048 // threads, warps // (threads // WARP))


# The H200 (132 SMs): blocks per SM of every triplet kernel, keyed by its name as the emulator gives it.
H200_OCCUPANCY = {
    f"{kernel}_kernel<{dtype}, tripletloss::Norm::{norm}, {'true' if swap == 'swap' else 'false'}, {vec}>": (
        sm90_blocks_per_sm(int(regs))
    )
    for (kernel, dtype), table in REGISTERS.items()
    for norm, swap, vec, regs in (entry.replace(":", "/").split("/") for entry in table.split())
} | {
    f"gram_distances_kernel<{dtype}, {code}>": sm90_blocks_per_sm(regs)
    for (dtype, code), regs in EPILOGUE_REGISTERS.items()
}


def sm90_mining_blocks_per_sm(registers, shared, threads):
    """As sm90_blocks_per_sm, also bounded by 228 KiB of shared memory per SM (1 KiB of it reserved per block)."""
    return min(sm90_blocks_per_sm(registers, threads), (228 * 1024) // (shared + 1024))


# name: (SMs, occupancy table). 1 SM with 1 block per SM (the mining kernels too): a single block grid-strides over every row and
# the mean/sum has one partial (the epilogue: one block strides over every entry); 4 SMs at 8 blocks: a few dozen
# blocks; the H200: 132 SMs.
DEVICES = {
    "1sm": (1, {"forward_kernel": 1, "backward_kernel": 1, "::mining::": 1, "gram_distances_kernel": 1}),
    "4sm": (4, {}),
    "h200": (132, H200_OCCUPANCY),
}


def require():
    """Fails (does not skip) the test when the emulated build is missing."""
    if emu is None:
        pytest.fail(f"{MODULE} is not built in {EMU_LIB} ({EMU_ERROR}); build it with `make build-emu`")
    return torch.ops.tripletloss_cuda_emu


def set_device(name):
    sms, occupancy = DEVICES[name]
    emu.set_device(sms, occupancy)


def mining_blocks_per_sm(device, kernel, threads):
    """Resident blocks per SM of the mining kernel `kernel` (its name in the launch log) at `threads`: the
    H200's from MINING_RESOURCES, else the device table's or the emulator's default min(32, 2048 / threads)."""
    if device == "h200":
        return next(sm90_mining_blocks_per_sm(*res, threads) for k, res in MINING_RESOURCES.items() if k in kernel)
    return next((v for k, v in sorted(DEVICES[device][1].items()) if k in kernel), min(32, 2048 // threads))


def set_mining_occupancy(device, m):
    """The fake device `device`, and on the H200 the occupancy of every mining kernel at the block size of rows
    of m columns (the emulator's table has one value per kernel: set again for another block size)."""
    set_device(device)
    if device == "h200":
        threads = mining_threads(m)
        mining = {kernel: sm90_mining_blocks_per_sm(*res, threads) for kernel, res in MINING_RESOURCES.items()}
        sms, occupancy = DEVICES[device]
        emu.set_device(sms, {**occupancy, **mining})


def blocks_per_sm(device, kernel):
    occupancy = DEVICES[device][1]
    for key in sorted(occupancy):
        if key in kernel:
            return occupancy[key]
    return 2048 // THREADS


def expected_launch(rows, cols, vec, resident_blocks):
    """(group, blocks) as launch_config in csrc/cuda/triplet_kernel.cu chooses them."""
    nvec = -(-cols // vec)
    group = 1
    while group < WARP and group < nvec:
        group *= 2
    if group == WARP and nvec >= 8 * WARP and rows < resident_blocks * 2:
        group = THREADS
    rows_per_block = THREADS // group
    return group, max(1, min(-(-rows // rows_per_block), resident_blocks))


def launch_group(record):
    """The threads per row of a forward launch with reduction none, read from what it did: the shuffle
    masks (a group of g < 32 threads shuffles with masks of g bits) and the barriers (only a block per row
    has them)."""
    if record["barriers"]:
        return THREADS
    if not record["masks"]:
        return 1
    sizes = {m.bit_count() for m in record["masks"]}
    assert len(sizes) == 1, record
    return sizes.pop()


@pytest.fixture
def fresh_emulator():
    """A fake device of 4 SMs, seed 0 and an empty launch log (the emulated test modules use it for every test)."""
    require()
    emu.set_device(*DEVICES["4sm"])
    emu.set_seed(0)
    emu.clear_launches()
