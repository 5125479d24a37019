"""pytest configuration: the ``cuda`` marker (CUDA cases; skipped without a GPU) and the fixtures that
require the compiled kernels.

    pytest tests             # everything; CUDA cases are skipped where torch.cuda.is_available() is False
    pytest -m cuda tests     # only the CUDA cases (the GPU machine)
    pytest -m emulated_cuda tests   # the CUDA kernels on the CPU emulator (`make build-emu`; tests/emulated.py)

``sanitizer`` cases run only under `make sanitize` (TRIPLETLOSS_EMU=sanitize). The ``path`` fixture runs a
mining test through the compiled kernels and through the pure-PyTorch reference.
"""

import os
import pathlib
import sys
from unittest import mock

import pytest
import torch

import tripletloss_cuda as tl
from tripletloss_cuda.mining import ops as mining_ops

# The checkout's own modules (benchmarks.leak_check, ...) for the tests: appended to sys.path, so that an
# installed tripletloss_cuda (make test WHEEL=...) still comes before the checkout's.
ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where none is available)")
    # `make test WHEEL=...`: the suite must test the installed wheel, with its kernels loaded, and nothing else.
    if os.environ.get("TRIPLETLOSS_EXPECT_INSTALLED") == "1":
        where = pathlib.Path(tl.__file__).resolve()
        if where.is_relative_to(ROOT / "tripletloss_cuda"):
            raise pytest.UsageError(
                f"TRIPLETLOSS_EXPECT_INSTALLED=1 but tripletloss_cuda comes from the checkout {where}"
            )
        if tl.info()["extension_status"] != "loaded":
            raise pytest.UsageError(
                f"the installed tripletloss_cuda has no loaded _C: {tl.info()['extension_problem']}"
            )


def pytest_collection_modifyitems(config, items):
    sanitized = os.environ.get("TRIPLETLOSS_EMU") == "sanitize"
    skip_sanitizer = pytest.mark.skip(reason="needs the sanitized emulated build: make sanitize")
    # Queried here, not at import: collection works on machines without a GPU or a CUDA driver.
    skip_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if "cuda" in item.keywords and skip_cuda:
            item.add_marker(skip_cuda)
        if "sanitizer" in item.keywords and not sanitized:
            item.add_marker(skip_sanitizer)


@pytest.fixture
def device():
    """The device of a test; tests parametrized with helpers.cpu_and_cuda() override it."""
    return "cpu"


@pytest.fixture
def kernel(device):
    """Requires the compiled kernel for ``device``: the test fails (it does not skip) when the extension
    is missing, since it would otherwise silently test the reference fallback."""
    device_type = torch.device(device).type
    if device_type not in tl.ops.KERNEL_DEVICES:
        pytest.fail(
            f"no compiled {device_type} kernel (compiled: {sorted(tl.ops.KERNEL_DEVICES)}; "
            f"extension error: {tl.ops.EXTENSION_ERROR}); build it with `make build`"
        )
    return device


@pytest.fixture(params=["kernel", "reference"])
def path(request, device):
    """Runs a mining test through the compiled kernels (failing if they are missing) and through the reference."""
    if request.param == "kernel":
        if torch.device(device).type not in mining_ops.KERNEL_DEVICES:
            pytest.fail(f"no compiled mining kernel for {device}: {tl.ops.EXTENSION_ERROR}")
        yield "kernel"
    else:
        with mock.patch.object(mining_ops, "KERNEL_DEVICES", frozenset()):
            yield "reference"
