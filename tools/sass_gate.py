"""Machine-code gate for the CUDA kernels, read from the built extension with cuobjdump (no GPU needed).

    python tools/sass_gate.py [EXTENSION.so] [--markdown]

For every kernel of ours in the extension's sm_90 cubin it checks:
- no local memory and no stack frame (no register spills);
- the vectorized instantiations of the triplet kernels (VEC = 16 / sizeof(T)) issue 128-bit global loads
  (LDG.E.128), and the backward's also 128-bit stores (STG.E.128); so do the mining kernels that read rows
  through for_columns (MINING_VECTORIZED);
- the distance epilogue (csrc/cuda/epilogue_kernel.cu) issues no fused multiply-add (FFMA/DFMA) in its squared
  euclidean and dot instantiations: g * -2 + sq rounded twice, bitwise as torch's separate passes (the euclidean
  one has the FMAs of the correctly rounded square root, and the same d2 code);
and prints registers per thread and the theoretical occupancy at the kernel's block size on sm_90
(64 warps, 32 blocks and 228 KiB of shared memory per SM; 64K registers in four partitions of 16K,
allocated per warp in units of 256). --markdown prints the table of docs/machine-code.md (one row per kernel,
dtype and vector width, the cosine kernels in rows of their own; the register and occupancy ranges cover the
norm and swap variants). Exits 1 when a
check fails or when there is no cubin to read (a build without the CUDA kernels), 2 when cuobjdump is not found.

cuobjdump comes from the CUDA toolkit, or from the Triton that ships with torch
(triton/backends/nvidia/bin/cuobjdump).
"""

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "sm_90"  # the cubin the gate reads (H100/H200; what the register tables are for)
# Block size of each family's kernels (threads), as its launchers use it (kThreads in csrc/cuda/*.cu).
# Mining: 32 to 256 threads by row length (threads_for); the table gives the largest, that of long rows.
BLOCK_SIZE = {"triplet": 256, "mining": 256, "indexed": 128, "epilogue": 256}
# The mining kernels that read rows through for_columns (16-byte vector loads of aligned rows).
MINING_VECTORIZED = (
    "batch_hard_kernel",
    "batch_all_kernel",
    "batch_all_grad_kernel",
    "semi_hard_kernel",
    "semi_hard_grad_kernel",
)
DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}
SIZEOF = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}
NORMS = {"0": "L1", "1": "L2", "2": "Lp", "3": "Cos"}
EPILOGUE_DISTANCES = {"0": "euclidean", "1": "squared", "2": "dot"}  # distances.OP_CODES


def find_cuobjdump():
    for candidate in (
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import triton

        candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(candidate):
            return candidate
    except ImportError:
        pass
    return None


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


class Kernel:
    """One kernel instantiation: its names, resources and the global memory instructions it issues."""

    def __init__(self, mangled, pretty, regs, stack, local, shared):
        self.mangled, self.pretty = mangled, pretty
        self.regs, self.stack, self.local, self.shared = regs, stack, local, shared
        # "void tripletloss::(anonymous namespace)::forward_kernel<float, (tripletloss::Norm)1, false, 4>(...)"
        name = pretty.removeprefix("void ").replace("(anonymous namespace)", "anon")
        head, _, rest = name.partition("<")
        self.base = head.split("(")[0].split("::")[-1]
        self.family = next((f for f in ("mining", "indexed", "epilogue") if f"::{f}::" in head), "triplet")
        self.args = [a.strip() for a in rest.split(">(")[0].split(",")] if rest else []
        self.sass = ""

    @property
    def block(self):
        return BLOCK_SIZE[self.family]

    @property
    def triplet(self):
        return self.family == "triplet"  # forward/backward kernels: <T, Norm, swap, VEC>

    @property
    def vec(self):
        if self.family == "mining" and self.base in MINING_VECTORIZED:
            return 16 // SIZEOF[self.args[0]]
        return int(self.args[3]) if self.triplet else 1

    @property
    def vectorized(self):
        return self.family not in ("indexed", "epilogue") and self.vec * SIZEOF[self.args[0]] == 16

    def occupancy(self):
        """Theoretical occupancy on sm_90 at this kernel's block size: (blocks per SM, fraction of 64 warps)."""
        warps = (self.block + 31) // 32
        regs_per_warp = -(-self.regs * 32 // 256) * 256
        # 64K registers in four partitions of 16K, each holding whole warps
        by_regs = 4 * (16384 // regs_per_warp) // warps if self.regs else 32
        by_threads = 2048 // self.block
        by_smem = (228 * 1024) // (self.shared + 1024)
        blocks = min(by_regs, by_threads, by_smem, 32)
        return blocks, blocks * warps / 64

    def problems(self):
        found = []
        if self.local or self.stack:
            found.append(f"local memory {self.local} B, stack {self.stack} B (register spills)")
        if self.vectorized:
            if "LDG.E.128" not in self.sass:
                found.append("no 128-bit global load (LDG.E.128) in a vectorized instantiation")
            if self.base == "backward_kernel" and "STG.E.128" not in self.sass:
                found.append("no 128-bit global store (STG.E.128) in the vectorized backward")
        if self.family == "epilogue" and self.args[1] != "0" and re.search(r"\b[FD]FMA\b", self.sass):
            found.append("a fused multiply-add (FFMA/DFMA): not bitwise torch's separate mul_ and add_ passes")
        return found

    def label(self):
        if self.family == "epilogue":  # <T, distance code>
            return f"epilogue::{self.base}<{DTYPES[self.args[0]]}, {EPILOGUE_DISTANCES[self.args[1]]}>"
        if not self.triplet:
            return f"{self.family}::{self.base}<{DTYPES.get(self.args[0], self.args[0]) if self.args else ''}>"
        dtype, norm, swap, vec = self.args
        return f"{self.base}<{DTYPES[dtype]}, {NORMS.get(norm[-1], norm)}, swap={swap}, vec={vec}>"


def read_kernels(cuobjdump, path, arch=ARCH):
    """Our kernels in the `arch` cubin of the library at `path` (a wheel holds several architectures)."""
    res = subprocess.run([cuobjdump, "-arch", arch, "-res-usage", path], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"sass_gate: cuobjdump -res-usage failed on {path}: {res.stderr.strip()}")
    found = re.findall(
        r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout, flags=re.MULTILINE
    )
    names = demangle([f[0] for f in found])
    kernels = {
        m: Kernel(m, names[m], int(regs), int(stack), int(local), int(shared))
        for m, regs, stack, shared, local in found
        if names[m].removeprefix("void ").startswith("tripletloss::")
    }
    sass = subprocess.run([cuobjdump, "-arch", arch, "-sass", path], capture_output=True, text=True, check=True).stdout
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if name in kernels:
            kernels[name].sass = chunk
    return list(kernels.values())


def markdown(kernels):
    rows = collections.OrderedDict()
    for k in sorted(
        kernels, key=lambda k: (k.family != "triplet", k.family, k.base, k.args[: 1 if k.triplet else 2], -k.vec)
    ):
        dtype = DTYPES.get(k.args[0], k.args[0]) if k.args else ""
        name = (k.base + (" (cosine)" if k.args[1][-1] == "3" else "")) if k.triplet else f"{k.family}::{k.base}"
        if k.family == "epilogue":
            name += f" ({EPILOGUE_DISTANCES[k.args[1]]})"
        rows.setdefault((name, dtype, k.vec, k.block), []).append(k)
    lines = [
        "| kernel | dtype | vector width | block | registers | occupancy (sm_90) | spills |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for (base, dtype, vec, block), group in rows.items():
        regs = sorted({k.regs for k in group})
        occ = sorted({round(100 * k.occupancy()[1]) for k in group})
        span = lambda v, unit="": f"{v[0]}{unit}" if len(v) == 1 else f"{v[0]}–{v[-1]}{unit}"
        width = f"{vec} ({vec * (SIZEOF.get(group[0].args[0], 0) if group[0].args else 0) * 8} bit)"
        spills = "none" if all(not k.local and not k.stack for k in group) else "**yes**"
        lines.append(f"| `{base}` | {dtype} | {width} | {block} | {span(regs)} | {span(occ, ' %')} | {spills} |")
    return "\n".join(lines)


def built_extension():
    """The checkout's in-place _C (tripletloss_cuda/_C*.so), or None."""
    return next(iter(sorted(glob.glob(os.path.join(ROOT, "tripletloss_cuda", "_C.*.so")))), None)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sass_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("extension", nargs="?", help="the built _C*.so (default: tripletloss_cuda/_C*.so)")
    parser.add_argument("--markdown", action="store_true", help="print the table of docs/machine-code.md")
    args = parser.parse_args(argv)
    path = args.extension or built_extension()
    if not path or not os.path.exists(path):
        print("sass_gate: no built extension (tripletloss_cuda/_C*.so); build it first", file=sys.stderr)
        return 1
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("sass_gate: cuobjdump not found (CUDA toolkit, or torch's bundled Triton)", file=sys.stderr)
        return 2
    kernels = read_kernels(cuobjdump, path)
    if not kernels:
        print(f"sass_gate: no CUDA kernel of ours in {path} (built without TRIPLETLOSS_CUDA?)", file=sys.stderr)
        return 1
    if args.markdown:
        print(markdown(kernels))
        return 0
    failed = 0
    for k in sorted(kernels, key=lambda k: k.label()):
        blocks, occ = k.occupancy()
        problems = k.problems()
        failed += bool(problems)
        status = "FAIL " + "; ".join(problems) if problems else "ok"
        print(f"{k.label():60} regs {k.regs:3}  block {k.block:3}  {blocks:2} blocks/SM  {occ:4.0%}  {status}")
    vectorized = sum(k.vectorized for k in kernels)
    print(f"sass_gate: {len(kernels)} kernels ({vectorized} vectorized), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
