"""`make mutants`: the emulated CUDA tests must catch broken kernels. Builds the emulated backend (tripletloss_emu)
from deliberately broken copies of csrc/cuda/*.cu, one mutant at a time, runs the `emulated_cuda` tests of
tests/emulated/test_emulated_epilogue.py and test_emulated.py on each (stopping at the first failure) and reports
each mutant caught or not, and by which test. Not in CI (a rebuild per mutant).

    python tools/mutants.py [NAME ...]     # all mutants, or the named ones; exit status 1 if one is not caught
    python tools/mutants.py --sanitize scalar_tail_off_by_one vectorize_misaligned

It works in build/mutants/ (build/mutants-san/ with --sanitize): a copy of what the tests read (csrc,
tripletloss_cuda with this checkout's _C for the CPU ops, tests, tools, setup.py, pyproject.toml), brought up to date
on every run by content: a file that differs from the checkout's is written anew with a fresh modification time
(never the checkout's old one) and files the checkout no longer has are removed, so that no object built from an
earlier run's (or an interrupted run's) mutant looks newer than its restored source; ninja recompiles what changed.
Each run first builds and tests the unmutated copy (the control): every test must pass there, else the run stops (a
test failing without a mutant, as one reading a file the copy lacks, would "catch" every mutant). Then, for each
mutant, its file is written and the other restored (each write a new mtime), the module rebuilt, the tests run; at
the end the sources are restored (and so rebuilt by the next run).

Verdicts (a pytest plugin written into the copy records which test started, finished and failed):
  caught         pytest exited 1 with a test FAILED in its call (not in its setup), the failure not a missing file
                 or module (FileNotFoundError, ImportError); or the process died from a signal (or exit status 128
                 and more), or ran past 3 x the control's test time + 300 s, while a test was running: since the
                 control passed, the crash or hang is the mutant's, and that test caught it. Printed with the
                 catching test and its first error line.
  NOT CAUGHT     every test passed.
  error ...      anything else: a collection or fixture error, a missing file, a crash outside a test, pytest's
                 own exit statuses 2-5. Not counted as caught.
  BUILD FAILED   the mutant does not compile.
--sanitize builds under AddressSanitizer and UBSan (tripletloss_emu_san, as `make sanitize`) and counts a mutant
caught only when a sanitizer reports it (a read past an allocation, a misaligned access; the sanitizers end the
process with status 1), in the test that was running.

MUTANTS_PYTEST_ARGS adds pytest arguments (the control's too), e.g. MUTANTS_PYTEST_ARGS='-k "not NAME"' to see
whether another test catches a mutant. Each mutant's log is build/mutants[-san]/NAME.log (the control's: control.log)."""

import json
import os
import shlex
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
EPILOGUE = "csrc/cuda/epilogue_kernel.cu"
MATH = "csrc/triplet_math.h"  # shared with the CPU kernels: a mutant here breaks only the emulated build's copy
# The distance epilogue's tests first (seconds): its mutants are caught there without running the rest first.
TESTS = ("tests/emulated/test_emulated_epilogue.py", "tests/emulated/test_emulated.py")
# What the tests read: copied into WORK on every run.
COPIED_DIRS = ("csrc", "tripletloss_cuda", "tests", "tools")
COPIED_FILES = ("setup.py", "pyproject.toml")
# Failures that are the copy's, not the mutant's.
MISSING = ("FileNotFoundError", "ModuleNotFoundError", "ImportError")

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
    "cosine_norm_sum_skipped": (
        TRIPLET,
        "      nn = group_sum(nn, group, smem);\n",
        "",
        "cosine forward: the squared norm of the negative not summed over the row's threads",
    ),
    "cosine_dist_width": (
        TRIPLET,
        "row_grad_of<NORM, SWAP>(dist + dist_width(NORM) * row",
        "row_grad_of<NORM, SWAP>(dist + 3 * row",
        "cosine backward: the saved distances read 3, not 6, to a row (another row's norms)",
    ),
    "cosine_clamp_convention": (
        MATH,
        "return distance == kCosine || n > eps ||",
        "return n > eps ||",
        "cosine backward: F.cosine_similarity's gradient below eps taken as F.normalize's (none through the norm)",
    ),
    "cosine_swap_combination": (
        MATH,
        "if constexpr (SWAP) gp += r.pn * neg, gn += r.pn * pos;",
        "if constexpr (SWAP) gp += r.pn * neg, gn += r.pn * neg;",
        "cosine backward with swap: d(p,n)'s gradient of n formed from n, not p",
    ),
    "epilogue_row_carry_dropped": (
        EPILOGUE,
        "if (j >= m) j -= m, ++i;",
        "if (j >= m) j -= m;",
        "distance epilogue: a grid-stride step that wraps past the end of a row stays in the same row",
    ),
    "epilogue_keys_ignored": (
        EPILOGUE,
        "keys_x[i] == keys_y[j], Distance);",
        "false, Distance);",
        "distance epilogue: identical rows (equal keys) not set to 0 apart",
    ),
    "final_reduction_stride": (
        TRIPLET,
        "for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x)",
        "for (int b = threadIdx.x; b < gridDim.x; b += gridDim.x)",
        "mean/sum: the last block strides over the partials by the grid, not the block (a grid of over 256 loses some)",
    ),
}


# A pytest plugin (written into the copy, loaded with -p): one JSON line per test start and finish and per failed
# report, to $MUTANTS_EVENTS, so that the verdict names the test that failed or was running when the process died.
PLUGIN = '''"""Written by tools/mutants.py: which test started, finished, failed (and where), one JSON line each."""

import json
import os


def _record(**event):
    with open(os.environ["MUTANTS_EVENTS"], "a") as f:
        f.write(json.dumps(event) + "\\n")


def pytest_runtest_logstart(nodeid, location):
    _record(event="start", test=nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _record(event="finish", test=nodeid)


def pytest_runtest_logreport(report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash else str(report.longrepr)
        _record(event="failed", test=report.nodeid, when=report.when, message=message.strip()[:2000])


def pytest_collectreport(report):
    if report.failed:
        _record(event="collect_error", test=report.nodeid, message=str(report.longrepr).strip()[-2000:])
'''
PLUGIN_NAME = "mutants_pytest_plugin"


def sh(cmd, env=None, log=None, timeout=None):
    """The exit status (negative: killed by that signal; None: timed out, killed)."""
    with open(log, "w") if log else open(os.devnull, "w") as out:
        try:
            return subprocess.run(
                cmd, check=False, cwd=WORK, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return None


def read(path):
    with open(path) as f:
        return f.read()


def write_if_changed(path, text):
    """Writes text unless the file already holds it; a written file gets a new mtime (ninja rebuilds what includes
    it): returns whether it wrote."""
    if os.path.exists(path) and read(path) == text:
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return True


def copied_files():
    """The paths (relative to ROOT) that prepare() copies."""
    paths = list(COPIED_FILES)
    for top in COPIED_DIRS:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.endswith(".egg-info"))
            for name in sorted(files):
                if name.endswith((".pyc", ".o")) or name.startswith("_C_emu"):
                    continue
                paths.append(os.path.relpath(os.path.join(folder, name), ROOT))
    return paths


def prepare():
    """The tree copy in WORK: what the tests read, with this checkout's _C. A file whose text differs from the
    checkout's (or is missing) is written anew (shutil.copyfile: a fresh mtime, not the checkout's, so ninja takes
    no object built from an earlier run's mutant, or from an interrupted run's, for up to date); files the checkout
    no longer has (tests moved away, __pycache__) and the old logs go. The build folder stays: ninja recompiles
    what a written file changed."""
    wanted = set(copied_files())
    for top in COPIED_DIRS:
        for folder, dirs, files in os.walk(os.path.join(WORK, top), topdown=False):
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), WORK)
                if rel not in wanted:
                    os.remove(os.path.join(WORK, rel))
            for name in dirs:
                if not os.listdir(os.path.join(folder, name)):
                    os.rmdir(os.path.join(folder, name))
    for name in os.listdir(WORK):
        if name.endswith((".log", ".log.tests", ".events")):
            os.remove(os.path.join(WORK, name))
    for rel in sorted(wanted):
        src, dst = os.path.join(ROOT, rel), os.path.join(WORK, rel)
        if not os.path.exists(dst) or not same_bytes(src, dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
    write_if_changed(os.path.join(WORK, PLUGIN_NAME + ".py"), PLUGIN)


def same_bytes(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


def events_of(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def verdict(rc, events, log):
    """(verdict, the catching test and what it reported, or why the mutant counts as not caught)."""
    started = [e["test"] for e in events if e["event"] == "start"]
    finished = {e["test"] for e in events if e["event"] == "finish"}
    running = started[-1] if started and started[-1] not in finished else None
    failed = [e for e in events if e["event"] == "failed"]
    collect = [e for e in events if e["event"] == "collect_error"]
    if collect:
        return "error: collection", f"{collect[0]['test']}: {collect[0]['message'].splitlines()[-1][:200]}"
    if SANITIZE:
        text = read(log)
        hits = [i for i in (text.find(r) for r in SANITIZER_REPORTS) if i >= 0]
        if hits:
            where = running or (failed[0]["test"] if failed else "no test running")
            return "caught", f"{where}: {text[min(hits) :].splitlines()[0][:200]}"
        if rc == 0:
            return "NOT CAUGHT", "every test passed"
        return "NOT CAUGHT by a sanitizer", f"pytest exit status {rc}, no sanitizer report"
    if rc is None:
        if running:
            return "caught", f"{running}: timed out (the control passed in time)"
        return "error: timeout", "no test running"
    if rc < 0 or rc >= 128:
        signal = -rc if rc < 0 else rc - 128
        if running:
            return "caught", f"{running}: the process died (signal {signal})"
        return "error: crash", f"signal {signal} with no test running"
    if rc == 0 and not failed:
        return "NOT CAUGHT", "every test passed"
    if rc == 1 and failed:
        first = failed[0]
        message = first["message"].splitlines()[0][:200] if first["message"] else ""
        if first["when"] != "call":
            return f"error: {first['when']}", f"{first['test']}: {message}"
        if message.startswith(MISSING):
            return "error: missing file", f"{first['test']}: {message}"
        return "caught", f"{first['test']}: {message}"
    return f"error: pytest {rc}", f"{len(failed)} failed reports"


def main(names):
    for name in names:
        if name not in MUTANTS:
            sys.exit(f"no mutant {name}; mutants: {', '.join(MUTANTS)}")
    begin = time.time()
    os.makedirs(WORK, exist_ok=True)
    prepare()
    pristine = {f: read(os.path.join(ROOT, f)) for f in (TRIPLET, MINING, MATH, EPILOGUE)}
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
    # --force: torch's BuildExtension sets it with ninja; without ninja setuptools would skip the build when the
    # module is newer than the .cpp files it lists (a mutated .cu file is included, not listed).
    build = [sys.executable, "setup.py", "-q", "build_ext", "--force", "--build-lib", emu_lib]
    test = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", "-p", PLUGIN_NAME]
    test += ["-m", "emulated_cuda", "-s", *TESTS]  # -s: a sanitizer's report is not lost in pytest's capture
    test += shlex.split(os.environ.get("MUTANTS_PYTEST_ARGS", ""))  # e.g. -k "not some_test": what else catches it

    def build_and_test(name, timeout=None):
        log = os.path.join(WORK, f"{name}.log")
        events = os.path.join(WORK, f"{name}.events")
        start = time.time()
        if sh(build, env, log) != 0:
            return "BUILD FAILED", f"see {log}", time.time() - start, None
        built = time.time()
        rc = sh(test, dict(test_env, MUTANTS_EVENTS=events), log + ".tests", timeout)
        with open(log, "a") as f:
            f.write(read(log + ".tests"))
        os.remove(log + ".tests")
        return (*verdict(rc, events_of(events), log), time.time() - start, time.time() - built)

    # The control: the unmutated copy must build and pass every test, else a failure would "catch" every mutant.
    print(f"control (the unmutated copy) in {WORK} ...", flush=True)
    result, detail, seconds, test_seconds = build_and_test("control")
    if result != "NOT CAUGHT":
        sys.exit(
            f"control FAILED ({result}: {detail}) after {seconds:.0f} s: the unmutated copy does not pass the "
            f"emulated tests, so no mutant can be judged; see {os.path.join(WORK, 'control.log')}"
        )
    print(f"control passed: {seconds:.0f} s (tests {test_seconds:.0f} s)", flush=True)
    timeout = 3 * test_seconds + 300  # a mutant that makes a test hang: caught by that test (see verdict)
    results = []
    for name in names:
        path, old, new, what = MUTANTS[name]
        assert pristine[path].count(old) == 1, f"mutant {name}: the original text is not in {path} exactly once"
        for f, text in pristine.items():
            write_if_changed(os.path.join(WORK, f), text.replace(old, new) if f == path else text)
        result, detail, seconds, _ = build_and_test(name, timeout)
        results.append((name, result))
        print(f"{name:34s} {result:12s} {seconds:6.0f} s  {what}", flush=True)
        print(f"{'':34s} {'by' if result == 'caught' else '  '} {detail}", flush=True)
    for f, text in pristine.items():  # restored with a new mtime: the next build recompiles them
        write_if_changed(os.path.join(WORK, f), text)
    survivors = [name for name, result in results if result != "caught"]
    print(f"{len(results) - len(survivors)} of {len(results)} mutants caught in {time.time() - begin:.0f} s")
    if survivors:
        print(f"not caught: {', '.join(survivors)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sanitize"]
    sys.exit(main(args or list(MUTANTS)))
