"""The compiled library (_C), loaded once for the whole package: its namespace, which devices have kernels for
which ops, and the accumulation dtype of those kernels.

_C is built on the LibTorch stable ABI for torch 2.11 and later, and as an abi3 module for CPython 3.10 and
later (setup.py), so one build loads under every such release. Three states:

- loaded: the fused kernels run (``kernel_devices`` says where);
- never built (a checkout used as pure Python): everything runs on the pure-PyTorch reference, quietly;
- present but not loadable (a torch older than the build supports, a build for another platform, a broken
  file): everything runs on the reference too, 5-15x slower and with no fused CUDA kernel, so the first call
  that falls back warns once (a RuntimeWarning naming the file, the loader's error, the torch it was built
  for and the one running, and how to rebuild); ``tl.info()`` and ``tripletloss-cuda check`` report it.

``TRIPLETLOSS_CUDA_REQUIRE=1`` turns a missing or unloadable _C into an ImportError at ``import
tripletloss_cuda`` (for jobs that must never run the slow path); ``TRIPLETLOSS_CUDA_REQUIRE=cuda`` also
requires the CUDA kernels to be compiled in.
"""

import importlib
import importlib.util
import os
import re
import warnings

import torch

NAMESPACE = "tripletloss_cuda"
# The reduction codes of the ops and the losses (PyTorch's none/mean/sum, and the mean over positive losses,
# pytorch-metric-learning's AvgNonZeroReducer).
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, "mean_nonzero": 3}
REQUIRE_ENV = "TRIPLETLOSS_CUDA_REQUIRE"
# The build marker csrc/tripletloss.cpp leaves in the library file, readable when the library cannot be loaded.
_MARKER = re.compile(rb"tripletloss_cuda build: torch=([0-9.]+); stable_abi=([0-9.]+);")
_DISPATCH_KEYS = (("cpu", "CPU"), ("cuda", "CUDA"))


def _build_marker(path):
    """{"torch": the torch the file was compiled with, "stable_abi": the oldest torch it supports} or {}."""
    try:
        with open(path, "rb") as f:
            found = _MARKER.search(f.read())
    except OSError:
        return {}
    return {"torch": found[1].decode(), "stable_abi": found[2].decode()} if found else {}


def _load():
    """(module, file, error): the loaded _C; its file (None: never built); the loader's error, if any."""
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, None, None
    try:
        return importlib.import_module(f"{__package__}._C"), spec.origin, None
    except (ImportError, OSError) as e:  # OSError: a file the dynamic loader cannot read at all
        return None, spec.origin, e


_C, FILE, ERROR = _load()
BUILD = dict(_C.build_info()) if _C is not None else (_build_marker(FILE) if FILE else {})
STATUS = "loaded" if _C is not None else ("failed to load" if FILE else "not built")


def acc_dtype(dtype):
    """The dtype the kernels accumulate and keep distances in: float64 for float64 inputs, else float32 (16-bit
    inputs included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_kernels(ops, key):
    """Whether every op of `ops` (names in NAMESPACE) has a kernel for the dispatch key (e.g. "CPU")."""
    if _C is None:
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key) for op in ops)
    except RuntimeError:  # an op this build does not define
        return False


def kernel_devices(ops):
    """The device types ("cpu", "cuda") with compiled kernels for all of `ops`: fixed at import, so that
    torch.compile sees a constant."""
    return frozenset(device for device, key in _DISPATCH_KEYS if has_kernels(ops, key))


def rebuild_command():
    """The command that rebuilds _C where it lies: a checkout's `make build`, else a reinstall."""
    package = os.path.dirname(os.path.abspath(FILE or __file__))
    root = os.path.dirname(package)
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.exists(os.path.join(root, "csrc")):
        return f"cd {root} && make build   (or: python setup.py build_ext --inplace)"
    return "pip install --no-build-isolation --no-deps --force-reinstall <the tripletloss_cuda wheel or source tree>"


def problem():
    """Why the compiled kernels are not running, in words (None when _C is loaded or was never built)."""
    if STATUS != "failed to load":
        return None
    built = BUILD.get("torch", "an unknown torch")
    supports = f"torch >= {BUILD['stable_abi']}" if "stable_abi" in BUILD else "that exact torch release"
    return (
        f"tripletloss_cuda: the compiled kernels in {FILE} cannot be loaded ({ERROR}). That file was built with "
        f"torch {built} for {supports}; this is torch {torch.__version__}. Everything runs on the pure-PyTorch "
        f"reference instead (5-15x slower, no fused CUDA kernels). Rebuild: {rebuild_command()}. "
        f"Set {REQUIRE_ENV}=1 to make this an ImportError."
    )


_warned = False


def warn_fallback():
    """Called where an op falls back to the reference: warns once if a _C exists but could not be loaded."""
    global _warned
    if STATUS == "failed to load" and not _warned:
        _warned = True
        warnings.warn(problem(), RuntimeWarning, stacklevel=3)


def check_required(cuda_ops):
    """Raises ImportError when REQUIRE_ENV asks for kernels that are not there (`cuda_ops`: the ops whose
    CUDA kernels TRIPLETLOSS_CUDA_REQUIRE=cuda requires)."""
    want = os.environ.get(REQUIRE_ENV, "").strip().lower()
    if want in ("", "0", "false", "no", "off"):
        return
    if want not in ("1", "true", "yes", "on", "cuda"):
        raise ImportError(f"{REQUIRE_ENV} should be 1 (the compiled kernels) or cuda (their CUDA build), got {want!r}")
    if STATUS == "not built":
        raise ImportError(
            f"{REQUIRE_ENV}={want}: tripletloss_cuda's compiled kernels were never built here (no _C next to "
            f"{os.path.dirname(os.path.abspath(__file__))}). Build them: {rebuild_command()}"
        )
    if STATUS == "failed to load":
        raise ImportError(f"{REQUIRE_ENV}={want}: {problem()}") from ERROR
    if want == "cuda" and not has_kernels(cuda_ops, "CUDA"):
        raise ImportError(
            f"{REQUIRE_ENV}=cuda: {FILE} has no CUDA kernels (built without nvcc or without a CUDA build of torch; "
            f"cuda_archs={BUILD.get('cuda_archs')!r}). Rebuild with nvcc and a CUDA build of torch: "
            f"{rebuild_command()}"
        )
