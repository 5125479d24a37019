"""Builds tripletloss_cuda._C: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA build of
torch are present.

_C is written against the LibTorch stable ABI (csrc/stable.h), targeting torch 2.11 (TORCH_TARGET_VERSION:
anything outside the 2.11 stable surface fails to compile), and against the CPython limited API (an abi3
wheel): one build serves every CPython from 3.10 and every torch from 2.11 on. `make wheel` builds it.

TRIPLETLOSS_CUDA=1 forces the CUDA kernels (the build fails if they cannot be built), =0 leaves them out;
unset, they are built when possible. DEBUG=1 builds with -O0 -g. TORCH_CUDA_ARCH_LIST picks the GPU
architectures: by default the visible GPU's, or, with none visible, DEFAULT_CUDA_ARCHS (the data-centre GPUs
users train on, and PTX for newer ones); `make test` builds 9.0 alone, which is faster.

TRIPLETLOSS_EMULATED=1 builds instead only the test extension tripletloss_emu: the CUDA sources compiled by
the host compiler against the CPU emulator of csrc/emu (docs: "The CUDA emulator"); =sanitize builds it as
tripletloss_emu_san under AddressSanitizer and UndefinedBehaviorSanitizer. They are top-level modules that
the Makefile builds into a folder of its own (build/<venv>-emu), never into the package and never installed
(`pip install .` leaves TRIPLETLOSS_EMULATED unset).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME at import, and may guess a folder without the toolkit.
# A wrapper script on PATH (as /usr/local/bin/nvcc) makes it guess /usr/local: look for the toolkit itself.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    nvcc = shutil.which("nvcc")
    guesses = ["/usr/local/cuda"] + ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else [])
    for home in guesses:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(os.path.join(home, "include")):
            os.environ["CUDA_HOME"] = home
            break

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def use_cuda():
    want = os.environ.get("TRIPLETLOSS_CUDA", "auto").lower()
    if want in ("0", "false", "no", "off"):
        return False
    nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    possible = nvcc and torch.version.cuda is not None
    if want in ("1", "true", "yes", "on") and not possible:
        raise RuntimeError(
            f"TRIPLETLOSS_CUDA={want} but the CUDA kernels cannot be built: "
            f"nvcc {'found' if nvcc else 'not found'} (CUDA_HOME={CUDA_HOME}), torch CUDA {torch.version.cuda}"
        )
    return possible


# The oldest torch whose stable ABI _C targets; tests/package/test_stable_abi.py and tripletloss_cuda/_library.py read it.
STABLE_ABI = (2, 11)
# GPU architectures of a build with no GPU visible and TORCH_CUDA_ARCH_LIST unset (a wheel): A100 (8.0), H100
# and H200 (9.0), B200 (10.0) as machine code, and PTX of 10.0 that newer GPUs compile when they load it.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0+PTX"


def stable_abi_flags():
    major, minor = STABLE_ABI
    return [
        f"-DTORCH_TARGET_VERSION=0x{major:02x}{minor:02x}000000000000",
        f"-DTL_TARGET_MAJOR={major}",
        f"-DTL_TARGET_MINOR={minor}",
    ]


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # C++20 whatever torch's default is (torch 2.11's cpp_extension passes -std=c++17, 2.14's -std=c++20): the
    # sources use std::bit_cast and lambdas capturing structured bindings. The last -std flag wins.
    common = opt + ["-std=c++20"] + stable_abi_flags()
    # -fopenmp: `omp simd` in the CPU kernels; -fno-math-errno: sqrt need not set errno, so its loops vectorize.
    args = {"cxx": common + ["-fopenmp", "-fno-math-errno"]}
    # py_limited_api: an abi3 module (PyInit__C is plain CPython; nothing links libtorch_python).
    kwargs = {"extra_compile_args": args, "extra_link_args": ["-fopenmp"], "py_limited_api": True}
    if not use_cuda():
        return CppExtension("tripletloss_cuda._C", sources, **kwargs)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    # USE_CUDA: the stable shim's CUDA declarations (current stream, error messages) sit behind it.
    cuda = ["-DTRIPLETLOSS_WITH_CUDA", "-DUSE_CUDA"]
    args["cxx"] += cuda
    args["nvcc"] = common + cuda + ["-lineinfo"]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension("tripletloss_cuda._C", sources, **kwargs)


def emulated_extension(mode):
    """tripletloss_emu (mode "1") or tripletloss_emu_san (mode "sanitize"): csrc/emu/*.cpp include the .cu files
    themselves."""
    san = mode == "sanitize"
    name = "tripletloss_emu_san" if san else "tripletloss_emu"
    # -Wno-*: `#pragma unroll` and the unsigned built-in index variables are what nvcc reads.
    flags = [
        "-std=c++20",
        *stable_abi_flags(),
        "-DTRIPLETLOSS_EMULATED",
        f"-DTL_EMU_MODULE={name}",
        "-Wno-unknown-pragmas",
        "-Wno-sign-compare",
    ]
    link = []
    if san:
        sanitize = ["-fsanitize=address,undefined,alignment", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        flags += ["-O1", "-g"] + sanitize
        link += sanitize
    else:
        flags += [os.environ.get("TRIPLETLOSS_EMU_OPT", "-O2")]  # tools/mutants.py: -O1 (compiles faster)
    sources = sorted(glob.glob("csrc/emu/*.cpp")) + ["csrc/mining.cpp", "csrc/indexed.cpp", "csrc/epilogue.cpp"]
    return CppExtension(name, sources, extra_compile_args={"cxx": flags}, extra_link_args=link)


class EmulatedBuild(BuildExtension):
    """Its own build folder: the objects of csrc/mining.cpp differ from _C's."""

    def initialize_options(self):
        super().initialize_options()
        self.build_temp = os.path.join("build", "emu-" + os.environ["TRIPLETLOSS_EMULATED"])


EMULATED = os.environ.get("TRIPLETLOSS_EMULATED", "")
if EMULATED not in ("", "1", "sanitize"):
    raise RuntimeError(f"TRIPLETLOSS_EMULATED should be 1 or sanitize, got {EMULATED!r}")

setup(
    name="tripletloss_cuda",
    version="0.1.0",
    python_requires=">=3.10",
    install_requires=[f"torch>={STABLE_ABI[0]}.{STABLE_ABI[1]}"],
    packages=find_packages(include=["tripletloss_cuda", "tripletloss_cuda.*"]),
    ext_modules=[emulated_extension(EMULATED) if EMULATED else extension()],
    cmdclass={"build_ext": EmulatedBuild if EMULATED else BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # the abi3 tag: one wheel for CPython 3.10 and later
    entry_points={"console_scripts": ["tripletloss-cuda = tripletloss_cuda.cli:main"]},
    # `tripletloss-cuda demo` and `bench --plot` need these; the package itself does not.
    extras_require={"demo": ["matplotlib", "tqdm", "scikit-learn"]},
)
