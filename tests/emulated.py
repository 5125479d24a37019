"""The emulated CUDA backend (tripletloss_cuda._C_emu, csrc/emu): the CUDA kernel source run on the CPU, its
ops as torch.ops.tripletloss_cuda_emu.* on CPU tensors. Fake devices and the Python model of the launch
configuration the tests check the launch log against.

TRIPLETLOSS_EMU=sanitize selects the build under AddressSanitizer/UBSan (_C_emu_san, `make sanitize`)."""

import importlib
import os

import pytest
import torch

MODULE = "_C_emu_san" if os.environ.get("TRIPLETLOSS_EMU") == "sanitize" else "_C_emu"
try:
    emu = importlib.import_module(f"tripletloss_cuda.{MODULE}")
    EMU_ERROR = None
except ImportError as e:
    emu, EMU_ERROR = None, e

THREADS = 256  # kThreads of csrc/cuda/triplet_kernel.cu
WARP = 32

# Resident blocks per SM on an H200 (sm_90: 64K registers, 2048 threads, 32 blocks per SM) from the register
# counts ptxas reports for each kernel (cuobjdump --dump-resource-usage of the nvcc 13.0 build), at 256
# threads (triplet kernels) and 128 threads (mining kernels). Substrings of the emulator's kernel names: the
# first match wins, in the emulator's (sorted) order.
H200_OCCUPANCY = {}

# name: (SMs, occupancy table). 1 SM with 1 block per SM: a single block grid-strides over every row and
# the mean/sum has one partial; 4 SMs at 8 blocks: a few dozen blocks; the H200: 132 SMs.
DEVICES = {
    "1sm": (1, {"forward_kernel": 1, "backward_kernel": 1}),
    "4sm": (4, {}),
    "h200": (132, H200_OCCUPANCY),
}


def require():
    """Fails (does not skip) the test when the emulated build is missing."""
    if emu is None:
        pytest.fail(f"tripletloss_cuda.{MODULE} is not built ({EMU_ERROR}); build it with `make build-emu`")
    return torch.ops.tripletloss_cuda_emu


def set_device(name):
    sms, occupancy = DEVICES[name]
    emu.set_device(sms, occupancy)


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
