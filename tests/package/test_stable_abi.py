"""_C is one build for every torch from 2.11 on: it takes from libtorch and libc10 only the stable C shim
(aoti_torch_*, torch_*), never a C++ symbol of theirs, is an abi3 module that does not link libtorch_python, and
its build flags (setup.py's TORCH_TARGET_VERSION) make any header outside the 2.11 stable surface fail to
compile. Checked on the library under test (the in-place build, or the installed wheel's)."""

import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from tripletloss_cuda import _library

ROOT = pathlib.Path(__file__).resolve().parents[2]
TORCH_LIB = pathlib.Path(torch.__file__).parent / "lib"
TORCH_LIBRARIES = ("libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so")
STABLE_SHIM = re.compile(r"^(aoti_torch_|torch_)")

pytestmark = pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")


def symbols(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_only_the_stable_c_shim_comes_from_libtorch():
    assert _library.STATUS == "loaded", _library.problem()
    undefined = symbols(_library.FILE, "--undefined-only")
    provided = set()
    for name in TORCH_LIBRARIES:
        if (TORCH_LIB / name).exists():
            provided |= symbols(TORCH_LIB / name, "--defined-only")
    from_torch = sorted(undefined & provided)
    assert from_torch, "no symbol of libtorch at all: is this the library under test?"
    # libtorch also exports instantiations of the C++ standard library (std::basic_stringstream): those are not
    # torch's API. Everything else must be the stable C shim, and no name may be a C++ one of torch's.
    names = subprocess.run(["c++filt"], input="\n".join(from_torch), capture_output=True, text=True, check=True)
    torch_own = [(s, d) for s, d in zip(from_torch, names.stdout.splitlines()) if not d.startswith("std::")]
    assert torch_own, "no symbol of libtorch's own: is this the library under test?"
    assert not [s for s, _ in torch_own if not STABLE_SHIM.match(s)], "libtorch symbols outside the stable C shim"
    every = subprocess.run(["c++filt"], input="\n".join(sorted(undefined)), capture_output=True, text=True, check=True)
    assert not [d for d in every.stdout.splitlines() if re.match(r"^(c10|at|torch|caffe2)::", d)]


def test_abi3_module_without_libtorch_python():
    assert _library.FILE.endswith(".abi3.so"), _library.FILE
    needed = subprocess.run(["readelf", "-d", _library.FILE], capture_output=True, text=True, check=False).stdout
    if needed:
        assert "libtorch_python" not in needed and "libpython" not in needed


def stable_abi():
    """setup.py's STABLE_ABI: (major, minor) of the oldest torch the build targets."""
    found = re.search(r"^STABLE_ABI = \((\d+), (\d+)\)", (ROOT / "setup.py").read_text(), re.MULTILINE)
    return int(found[1]), int(found[2])


def test_build_info_names_the_target():
    major, minor = stable_abi()
    assert _library.BUILD["stable_abi"] == f"{major}.{minor}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", _library.BUILD["torch"])


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_target_version_rejects_unstable_headers(tmp_path):
    """What setup.py compiles with: a stable header compiles, an ATen or c10 header outside the stable surface
    does not."""
    major, minor = stable_abi()
    flag = f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000"
    include = pathlib.Path(torch.__file__).parent / "include"

    def compiles(header):
        (tmp_path / "probe.cpp").write_text(f"#include <{header}>\n")
        cmd = ["c++", "-std=c++20", "-fsyntax-only", flag, f"-I{include}", str(tmp_path / "probe.cpp")]
        return subprocess.run(cmd, capture_output=True, text=True, check=False).returncode == 0

    assert compiles("torch/csrc/stable/library.h")
    for header in ("ATen/ATen.h", "torch/library.h", "c10/util/Exception.h"):
        assert not compiles(header), header
