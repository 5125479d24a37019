"""Loading the compiled library (tripletloss_cuda/_library.py): a _C that exists but cannot be loaded warns once
at the first call that falls back (RuntimeWarning), shows in tl.info() and fails `tripletloss-cuda check`;
TRIPLETLOSS_CUDA_REQUIRE=1 makes it an ImportError; a package that was never built stays quiet.

Each case runs in a child Python on a copy of the package's Python files, next to a stand-in _C: a shared
library with an undefined symbol (what a build for another torch is to the loader) and the build marker."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import child_env

import tripletloss_cuda as tl
from tripletloss_cuda import _library

PACKAGE = pathlib.Path(tl.__file__).resolve().parent
FAKE_C = """
static const char marker[] __attribute__((used)) = "tripletloss_cuda build: torch=2.99.0; stable_abi=2.99;";
extern void tl_symbol_of_another_torch(void);
void* PyInit__C(void) { tl_symbol_of_another_torch(); return (void*)marker; }
"""
CALL = """
import json, warnings, torch, tripletloss_cuda as tl
x = torch.randn(4, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss = tl.triplet_margin_loss(x, x.flip(0), x + 1)
    tl.triplet_margin_loss(x, x, x)  # a second fallback: no second warning
    tl.batch_hard_triplet_loss(x, torch.tensor([0, 0, 1, 1]))
torch.testing.assert_close(loss, torch.nn.functional.triplet_margin_loss(x, x.flip(0), x + 1))
ours = [(w.category.__name__, str(w.message)) for w in caught if "tripletloss_cuda" in str(w.message)]
print(json.dumps({"warnings": ours, "status": tl.info()["extension_status"]}))
"""


def package_copy(tmp_path, c_library):
    """A copy of the package (Python files only) in tmp_path, with `c_library` ("fake", None) as its _C."""
    dst = tmp_path / "tripletloss_cuda"
    shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if c_library == "fake":
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler for the stand-in _C")
        (tmp_path / "fake.c").write_text(FAKE_C)
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(dst / "_C.abi3.so"), str(tmp_path / "fake.c")], check=True)
    return tmp_path


def child(root, *args, **env):
    """`python *args` importing the package copy in root (TRIPLETLOSS_CUDA_REQUIRE only where given)."""
    environment = {k: v for k, v in os.environ.items() if k != "TRIPLETLOSS_CUDA_REQUIRE"}
    environment.update(PYTHONPATH=str(root), **env)
    return subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True, timeout=300, env=environment, cwd=root
    )


def test_unloadable_library_warns_once_and_falls_back(tmp_path):
    root = package_copy(tmp_path, "fake")
    out = child(root, "-c", CALL)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "failed to load" and len(result["warnings"]) == 1, result
    category, message = result["warnings"][0]
    assert category == "RuntimeWarning"
    for part in (
        str(root / "tripletloss_cuda" / "_C.abi3.so"),
        "undefined symbol: tl_symbol_of_another_torch",
        "built with torch 2.99.0 for torch >= 2.99",
        f"this is torch {torch.__version__}",
        "pure-PyTorch reference",
        "pip install --no-build-isolation",  # not a checkout: reinstall
        "TRIPLETLOSS_CUDA_REQUIRE=1",
    ):
        assert part in message, (part, message)


def test_unloadable_library_in_info_and_check(tmp_path):
    root = package_copy(tmp_path, "fake")
    out = child(root, "-c", "import json, tripletloss_cuda as tl; print(json.dumps(tl.info()))")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["extension_status"] == "failed to load" and not info["extension_loaded"]
    assert info["built_with_torch"] == "2.99.0" and info["stable_abi"] == "2.99"
    assert "tl_symbol_of_another_torch" in info["extension_error"] and info["kernels"] == []
    check = child(root, "-m", "tripletloss_cuda", "check", "--quick", "--device", "cpu", "--dtypes", "float32")
    assert check.returncode == 1
    assert "extension: failed to load" in check.stdout and "cannot be loaded" in check.stderr


@pytest.mark.parametrize("value", ["1", "cuda"], ids=["kernels", "cuda-kernels"])
def test_require_makes_it_an_import_error(tmp_path, value):
    root = package_copy(tmp_path, "fake")
    out = child(root, "-c", "import tripletloss_cuda", TRIPLETLOSS_CUDA_REQUIRE=value)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and f"TRIPLETLOSS_CUDA_REQUIRE={value}" in out.stderr
    assert "cannot be loaded" in out.stderr and "tl_symbol_of_another_torch" in out.stderr


def test_never_built_is_quiet_unless_required(tmp_path):
    root = package_copy(tmp_path, None)
    out = child(root, "-c", CALL)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"warnings": [], "status": "not built"}
    required = child(root, "-c", "import tripletloss_cuda", TRIPLETLOSS_CUDA_REQUIRE="1")
    assert required.returncode != 0 and "were never built here" in required.stderr
    bad = child(root, "-c", "import tripletloss_cuda", TRIPLETLOSS_CUDA_REQUIRE="always")
    assert bad.returncode != 0 and "should be 1 (the compiled kernels) or cuda" in bad.stderr


def test_require_with_the_real_library():
    """The library under test satisfies TRIPLETLOSS_CUDA_REQUIRE=1, and =cuda exactly when it has CUDA kernels."""
    code = "import tripletloss_cuda as tl; print(tl.info()['extension_status'])"
    runs = {}
    for value in ("1", "cuda"):
        env = child_env(TRIPLETLOSS_CUDA_REQUIRE=value)
        runs[value] = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, env=env
        )
    assert runs["1"].returncode == 0 and runs["1"].stdout.strip() == "loaded", runs["1"].stderr
    if "cuda" in tl.ops.KERNEL_DEVICES:
        assert runs["cuda"].returncode == 0, runs["cuda"].stderr
    else:
        assert runs["cuda"].returncode != 0 and "has no CUDA kernels" in runs["cuda"].stderr


def test_build_marker_matches_build_info():
    """The marker the loader reads from a file it cannot load is what the loaded library reports."""
    assert _library.STATUS == "loaded"
    marker = _library._build_marker(_library.FILE)
    assert marker == {"torch": _library.BUILD["torch"], "stable_abi": _library.BUILD["stable_abi"]}
    assert tuple(int(v) for v in marker["stable_abi"].split(".")) <= tuple(
        int(v) for v in torch.__version__.split("+")[0].split(".")[:2]
    )


def test_rebuild_command_in_a_checkout():
    if (PACKAGE.parent / "setup.py").exists():
        assert _library.rebuild_command().startswith(f"cd {PACKAGE.parent} && make build")
    else:
        assert _library.rebuild_command().startswith("pip install")
