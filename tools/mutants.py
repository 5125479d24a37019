"""`make mutants`: the emulated CUDA tests must catch broken kernels. Builds the emulated backend (tripletloss_emu)
from deliberately broken copies of csrc/cuda/*.cu, one mutant at a time, runs the `emulated_cuda` tests on
each (stopping at the first failure) and reports each mutant caught or not. Not in CI (a rebuild per mutant).

    python tools/mutants.py [NAME ...]     # all mutants, or the named ones; exit status 1 if one survives
    python tools/mutants.py --sanitize scalar_tail_off_by_one vectorize_misaligned

--sanitize builds the mutants under AddressSanitizer and UBSan (tripletloss_emu_san, as `make sanitize`) and counts a
mutant caught only when a sanitizer reports it (a read past an allocation, a misaligned access). Works in
build/mutants/ or build/mutants-san/ (a copy of the tree, with the _C extension of this checkout for the
CPU ops)."""

import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZE = "--sanitize" in sys.argv
WORK = os.path.join(ROOT, "build", "mutants-san" if SANITIZE else "mutants")
SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "runtime error:")
LIBS = ("libasan.so", "libstdc++.so")  # preloaded, as `make sanitize` does
TRIPLET, MINING = "csrc/cuda/triplet_kernel.cu", "csrc/cuda/mining_kernel.cu"

# name: (file, original text, broken text, what it breaks)
MUTANTS = {
    "shuffle_mask_first_group": (
        TRIPLET,
        "((1u << group) - 1u) << (lane & ~(group - 1))",
        "((1u << group) - 1u)",
        "group_sum: every sub-warp group shuffles with the mask of the warp's first group",
    ),
    "partial_dropped": (
        TRIPLET,
        "for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x)",
        "for (int b = threadIdx.x; b < gridDim.x - 1; b += blockDim.x)",
        "mean/sum: the last block's partial left out of the final reduction",
    ),
    "scalar_tail_off_by_one": (
        TRIPLET,
        "for (int64_t j = nvec * VEC + lane; j < in.cols; j += group) {\n      accumulate",
        "for (int64_t j = nvec * VEC + lane; j <= in.cols; j += group) {\n      accumulate",
        "forward: the scalar loop reads one element past each row",
    ),
    "missing_syncthreads_before_write": (
        TRIPLET,
        "    __syncthreads();  // smem may still be read from the previous call\n",
        "",
        "group_sum: shared memory overwritten while other warps may still read the previous sum",
    ),
    "missing_syncthreads_after_write": (
        TRIPLET,
        "    if (lane == 0) smem[threadIdx.x / kWarp] = v;\n    __syncthreads();\n",
        "    if (lane == 0) smem[threadIdx.x / kWarp] = v;\n",
        "group_sum: the warps' partials read before every warp has written its own",
    ),
    "first_block_sums": (
        TRIPLET,
        "last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;",
        "last_block = atomicAdd(ticket, 1u) == 0;",
        "mean/sum: the first block to finish, not the last, adds the partials (depends on block order)",
    ),
    "vectorize_misaligned": (
        TRIPLET,
        "return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride % vec == 0;",
        "return stride % vec == 0;",
        "can_vectorize: 16-byte loads of rows that are not 16-byte aligned",
    ),
    "mining_tile_skipped": (
        MINING,
        "for (int64_t t0 = 0; c.n_neg > 0 && t0 < c.n_pos; t0 += kTile) {",
        "for (int64_t t0 = 0; c.n_neg > 0 && t0 < c.n_pos; t0 += 2 * kTile) {",
        "for_each_tile: every second tile of positives skipped (anchors with over 1024 positives)",
    ),
    "mining_bitonic_last_stage": (
        MINING,
        "for (int s = k / 2; s > 0; s /= 2) {",
        "for (int s = k / 2; s > 1; s /= 2) {",
        "load_sorted_tile: the bitonic sort's last compare-exchange stage skipped",
    ),
    "mining_tile_barrier_missing": (
        MINING,
        "__syncthreads();  // the next tile overwrites the tile and what f kept in shared memory",
        "// the next tile overwrites the tile and what f kept in shared memory",
        "for_each_tile: the next tile loaded while other warps still read this one",
    ),
    "mining_gap_racing_column": (
        MINING,
        "if (g.key == ordered_bits(v)) atomicMin(&g.k, int32_t(k));",
        "if (g.key == ordered_bits(v)) g.k = int32_t(k);",
        "semi_hard_kernel: a gap's nearest negative among ties is the last to write, not the lowest column",
    ),
    "mining_anchor_stride": (
        MINING,
        "for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {\n    const T* d = dist + i * m;\n    const Anchor a(lab, i);\n    int64_t n_pos",
        "for (int64_t i = blockIdx.x; i < n; i += gridDim.x + 1) {\n    const T* d = dist + i * m;\n    const Anchor a(lab, i);\n    int64_t n_pos",
        "batch_hard_kernel: the grid-stride over anchors skips anchors",
    ),
    "shuffle_mask_half_warp": (
        TRIPLET,
        "group >= kWarp ? 0xffffffffu",
        "group >= kWarp ? 0x0000ffffu",
        "group_sum: a warp-wide reduction with the mask of half a warp",
    ),
    "shuffle_level_skipped": (
        TRIPLET,
        "for (int offset = min(group, kWarp) / 2; offset > 0; offset /= 2)",
        "for (int offset = min(group, kWarp) / 4; offset > 0; offset /= 2)",
        "group_sum: the first level of the butterfly dropped",
    ),
    "warp_partial_dropped": (
        TRIPLET,
        "for (int w = 0; w < blockDim.x / kWarp; ++w) v += smem[w];",
        "for (int w = 1; w < blockDim.x / kWarp; ++w) v += smem[w];",
        "group_sum: the first warp's partial left out of the block reduction",
    ),
    "backward_last_vector_skipped": (
        TRIPLET,
        "for (int64_t j = lane; j < nvec; j += group) {\n      P va, vp, vn;",
        "for (int64_t j = lane; j + 1 < nvec; j += group) {\n      P va, vp, vn;",
        "backward: the last vector (or element) of each row gets no gradient",
    ),
    "missing_syncthreads_ticket": (
        TRIPLET,
        "  __syncthreads();\n  if (!last_block) return;",
        "  if (!last_block) return;",
        "mean/sum: last_block read before thread 0 has set it",
    ),
    "grid_stride_step": (
        TRIPLET,
        "row += int64_t(gridDim.x) * rows_per_block) {\n    const T* a",
        "row += int64_t(gridDim.x) * rows_per_block + 1) {\n    const T* a",
        "forward: the grid-stride loop skips a row per step",
    ),
}


def sh(cmd, env=None, log=None):
    with open(log, "w") if log else open(os.devnull, "w") as out:
        return subprocess.run(cmd, check=False, cwd=WORK, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def prepare():
    """The tree copy (sources, package, tests) with this checkout's _C extension."""
    for name in ("csrc", "tripletloss_cuda", "tests"):
        src, dst = os.path.join(ROOT, name), os.path.join(WORK, name)
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("_C_emu*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), os.path.join(WORK, name))


def read(path):
    with open(path) as f:
        return f.read()


def write_if_changed(path, text):
    """Only a changed file gets a new mtime (ninja rebuilds what includes it)."""
    if read(path) == text:
        return
    with open(path, "w") as f:
        f.write(text)


def main(names):
    for name in names:
        if name not in MUTANTS:
            sys.exit(f"no mutant {name}; mutants: {', '.join(MUTANTS)}")
    os.makedirs(WORK, exist_ok=True)
    prepare()
    pristine = {f: read(os.path.join(ROOT, f)) for f in (TRIPLET, MINING)}
    emu_lib = os.path.join(WORK, "emu-lib")  # where the emulated module is built and the tests look for it
    env = dict(
        os.environ, TRIPLETLOSS_EMULATED="1", TRIPLETLOSS_EMU_OPT="-O1", PYTHONPATH=WORK, TRIPLETLOSS_EMU_LIB=emu_lib
    )
    env.setdefault("MAX_JOBS", "2")
    env.pop("TRIPLETLOSS_EMU", None)
    test_env = env
    if SANITIZE:
        env["TRIPLETLOSS_EMULATED"] = "sanitize"
        cxx = os.environ.get("CXX", "c++")
        libs = [subprocess.check_output([cxx, f"-print-file-name={lib}"], text=True).strip() for lib in LIBS]
        test_env = dict(env, TRIPLETLOSS_EMU="sanitize", LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0")
    build = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", emu_lib]
    test = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "emulated_cuda"]
    test += ["-s", "tests/emulated/test_emulated.py"]  # -s: a sanitizer's report is not lost in pytest's capture
    results = []
    for name in names:
        path, old, new, what = MUTANTS[name]
        assert pristine[path].count(old) == 1, f"mutant {name}: the original text is not in {path} exactly once"
        for f, text in pristine.items():
            write_if_changed(os.path.join(WORK, f), text.replace(old, new) if f == path else text)
        start = time.time()
        log = os.path.join(WORK, f"{name}.log")
        if sh(build, env, log) != 0:
            results.append((name, "BUILD FAILED", what, time.time() - start))
        else:
            rc = sh(test, test_env, log)
            # 1: a test failed; a crash (killed by a signal) also counts; 0: all passed; 2-5: pytest's own errors
            verdict = "caught" if rc == 1 or rc < 0 or rc >= 128 else "NOT CAUGHT" if rc == 0 else f"pytest error {rc}"
            if SANITIZE and verdict == "caught" and not any(r in read(log) for r in SANITIZER_REPORTS):
                verdict = "NOT CAUGHT by a sanitizer"
            results.append((name, verdict, what, time.time() - start))
        print(f"{name:34s} {results[-1][1]:12s} {results[-1][3]:6.0f} s  {what}", flush=True)
        if results[-1][1] == "caught" and SANITIZE:
            text = read(log)
            start = min(i for i in (text.find(r) for r in SANITIZER_REPORTS) if i >= 0)
            print(f"{'':34s} {text[start:].splitlines()[0][:160]}")
        elif results[-1][1] == "caught":
            failed = [line for line in read(log).splitlines() if line.startswith("FAILED")]
            print(f"{'':34s} first failure: {failed[0].strip()[:150] if failed else 'the test process died'}")
    for f, text in pristine.items():
        write_if_changed(os.path.join(WORK, f), text)
    survivors = [r for r in results if r[1] != "caught"]
    print(f"{len(results) - len(survivors)} of {len(results)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sanitize"]
    sys.exit(main(args or list(MUTANTS)))
