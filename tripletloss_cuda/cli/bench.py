"""Benchmark tripletloss_cuda against the naive module, F.triplet_margin_loss and torch.compile of it.

    tripletloss-cuda bench                            # CPU, default shapes, float32 and bfloat16
    tripletloss-cuda bench --device cuda              # or --device auto
    tripletloss-cuda bench --quick                    # small shapes, few repeats (CI smoke)
    tripletloss-cuda bench --shapes 128x128,16384x512 --dtypes float32 --modes fwdbwd --impls torch,tl
    tripletloss-cuda bench --distance cosine          # the cosine distance (see below)
    tripletloss-cuda bench --plot bench.png           # also draw time and GB/s per shape (matplotlib)

(`python -m tripletloss_cuda bench ...` and, from a checkout, `python benchmarks/bench.py ...` are the same.)

Every implementation computes the same loss (margin 1.0, p = 2, eps 1e-6, mean) on the same random inputs.
With --distance cosine: F.triplet_margin_with_distance_loss(distance_function=lambda x, y: 1 -
F.cosine_similarity(x, y)) eager ("torch") and under torch.compile ("compile"), against
tl.triplet_margin_with_distance_loss(distance_function=tl.cosine_distance) ("tl"); no naive module.
Modes: "fwd" (the loss alone) and "fwd+bwd" (inputs require grad; the loss, then the gradients of the three
inputs with torch.autograd.grad). A row's time is the median per call, with p20 and p80, over repeats picked
to fit a time budget after one warm-up call (which also compiles torch.compile, outside the timing).

CPU: time.perf_counter around each call. CUDA: CUDA events around batches of back-to-back calls (one call
per batch for large shapes, more for small ones), cycling through enough input sets to overflow the L2 cache
4 times, so the inputs come from memory; under ~4 MB a call is launch-bound and the time is per call.

Minimum bytes moved: forward reads the three inputs (3·N·D·s, s = element size); forward+backward also
reads them again and writes the three gradients (9·N·D·s). GB/s = minimum bytes / time, compared with
dst.copy_(src) of 256 MB measured in the same run (bytes read + written).

Results: a table on stdout (markdown), a progress bar on stderr (tqdm, when installed), and
<out-dir>/<device>-<date>.json and .md (metadata: device, torch, tripletloss_cuda.info(), git commit, date,
copy bandwidth; every row), except with --quick. The default out-dir is benchmarks/results in a checkout
(an in-place build), the current directory for an installed package. A timeout's SIGTERM (or Ctrl-C) stops the run and writes the rows measured so far.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import tripletloss_cuda as tl

from .args import ArgumentParser
from .common import fmt_time, log, resolve_device, sync

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout (results go to benchmarks/results)
CHECKOUT = (ROOT / "setup.py").is_file() and (ROOT / "benchmarks").is_dir()  # an in-place build, not site-packages

MARGIN = 1.0
IMPLS = {  # key: label in the table
    "naive": "naive module",
    "torch": "F.triplet_margin_loss",
    "compile": "torch.compile(F)",
    "tl": "tripletloss_cuda",
}
MODES = ("fwd", "fwd+bwd")
DISTANCES = ("pnorm", "cosine")
COSINE_IMPLS = {  # the cosine rows' labels
    "torch": "F.triplet_margin_with_distance_loss (cosine lambda)",
    "compile": "torch.compile(F, cosine lambda)",
    "tl": "tripletloss_cuda (tl.cosine_distance)",
}
COSINE_SHAPES = [(128, 128), (4096, 256), (16384, 512), (65536, 512)]
CPU_SHAPES = [(128, 128), (1024, 128), (4096, 256), (16384, 512), (65536, 512)]
CUDA_SHAPES = sorted(CPU_SHAPES + [(8192, 1024), (32768, 8192)], key=math.prod)
QUICK_SHAPES = [(128, 128), (1024, 128)]
DTYPES = ("float32", "bfloat16")
LAUNCH_BOUND_BYTES = 4e6  # CUDA rows moving fewer bytes are launch-bound: the time per call is what counts

# Timing budget per (shape, dtype, mode, impl): seconds of timed calls, and the least and most repeats.
BUDGET = {"cpu": (0.3, 3, 500), "cuda": (0.15, 5, 200), "quick": (0.01, 3, 10)}
CUDA_MIN_SAMPLE_S = 1e-4  # a CUDA sample (one pair of events) spans at least this long: batches small calls


def _time_calls(call, device, samples, inner=1):
    """Seconds per call of `call()`, one value per sample of `inner` back-to-back calls."""
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
        for start, end in events:
            start.record()
            for _ in range(inner):
                call()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 / inner for start, end in events]
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(inner):
            call()
        times.append((time.perf_counter() - t) / inner)
    return times


def _stats(times):
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")  # the 20th, 40th, 60th and 80th percentiles
    return statistics.median(times), q[0], q[3]


def copy_bandwidth(device, nbytes=256 << 20, repeats=None):
    """Memory-copy bandwidth in GB/s (1e9 bytes/s) of dst.copy_(src), counting bytes read + written."""
    device = resolve_device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of the pages
    sync(device)
    times = _time_calls(lambda: dst.copy_(src), device, repeats or (20 if device == "cuda" else 10))
    return 2 * nbytes / statistics.median(times) / 1e9


def _cosine_distance_loss(anchor, positive, negative):
    """How PyTorch users write a cosine triplet loss: a lambda as the distance function."""
    return F.triplet_margin_with_distance_loss(
        anchor, positive, negative, distance_function=lambda x, y: 1 - F.cosine_similarity(x, y), margin=MARGIN
    )


def _tl_cosine_distance_loss(anchor, positive, negative):
    return tl.triplet_margin_with_distance_loss(
        anchor, positive, negative, distance_function=tl.cosine_distance, margin=MARGIN
    )


def _make_impl(impl, distance="pnorm"):
    if distance == "cosine":
        if impl == "compile":
            torch.compiler.reset()
            return torch.compile(_cosine_distance_loss, dynamic=False)
        return {"torch": _cosine_distance_loss, "tl": _tl_cosine_distance_loss}[impl]
    if impl == "naive":
        return tl.naive.TripletLoss(margin=MARGIN)
    if impl == "torch":
        return F.triplet_margin_loss
    if impl == "compile":
        torch.compiler.reset()  # one specialized graph per row, and no recompile limit across rows
        return torch.compile(F.triplet_margin_loss, dynamic=False)
    return tl.triplet_margin_loss


def _cache_bytes(device):
    """The last-level cache: the GPU's L2, or the CPU's largest cache (at least 32 MB)."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
    sizes = [32 << 20]
    for path in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1))
    return max(sizes)


def _input_sets(n, d, dtype, device, requires_grad):
    """Enough sets of (anchor, positive, negative), at most 32, to overflow the last-level cache 4 times."""
    count = max(1, min(32, math.ceil(4 * _cache_bytes(device) / (3 * n * d * dtype.itemsize))))
    gen = torch.Generator(device).manual_seed(0)
    return [
        tuple(torch.randn(n, d, dtype=dtype, device=device, generator=gen, requires_grad=requires_grad) for _ in "apn")
        for _ in range(count)
    ]


def _measure(fn, sets, mode, device, repeats, budget):
    """Warm up, then time `fn` on the input sets in turn: (per-call times, extra peak memory in bytes)."""
    cycle = itertools.cycle(sets)

    def call():
        inputs = next(cycle)
        loss = fn(*inputs)
        if mode != "fwd":
            torch.autograd.grad(loss, inputs)

    call()  # warm-up; compiles torch.compile
    sync(device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = _time_calls(call, device, 1)[0]
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    seconds, least, most = budget
    inner = max(1, min(100, math.ceil(CUDA_MIN_SAMPLE_S / max(t0, 1e-9)))) if cuda else 1
    samples = repeats or max(least, min(most, int(seconds / (t0 * inner))))
    return _time_calls(call, device, samples, inner), peak


def _is_oom(err):
    msg = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in msg or "can't allocate" in msg


def run(
    device="cpu",
    shapes=None,
    dtypes=DTYPES,
    modes=MODES,
    impls=tuple(IMPLS),
    repeats=None,
    quick=False,
    distance="pnorm",
):
    """Benchmark rows (see iter_rows) as a list."""
    return list(iter_rows(device, shapes, dtypes, modes, impls, repeats, quick, distance=distance))


class _Progress:
    """A tqdm bar on stderr when asked for, stderr is a terminal and tqdm is installed; else a log line per row
    (a log file gets readable lines, not a bar's carriage returns)."""

    def __init__(self, total, bar):
        self.bar = None
        if bar and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True, leave=False)
            except ImportError:
                pass
        self.count = itertools.count(1)
        self.total = total

    def start(self, what):
        if self.bar is None:
            log(f"[{next(self.count)}/{self.total}] {what} ...")
        else:
            self.bar.set_description(what, refresh=True)

    def result(self, text, failed=False):
        if self.bar is None:
            log(f"    {text}")
        elif failed:
            self.bar.write(text, file=sys.stderr)

    def advance(self):
        if self.bar is not None:
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def iter_rows(
    device="cpu",
    shapes=None,
    dtypes=DTYPES,
    modes=MODES,
    impls=tuple(IMPLS),
    repeats=None,
    quick=False,
    progress_bar=False,
    distance="pnorm",
):
    """Benchmark rows, yielded as they are measured: one dict per (dtype, shape, mode, impl), in that order.

    shapes: [(N, D), ...] (default: the device's list); dtypes: names or torch dtypes; modes: "fwd",
    "fwd+bwd" (or "fwdbwd"); repeats: fixed number of timed samples (default: fit the time budget);
    progress_bar: a tqdm bar on stderr instead of a log line per row; distance: "pnorm" (F.triplet_margin_loss
    and the naive module) or "cosine" (COSINE_IMPLS; the naive module has none, and is left out).
    A row's status is "ok", "oom" (out of memory for the shape: the other rows go on), "n/a" (torch.compile
    failed) or "error"; times are in seconds, bytes in bytes.
    """
    device = resolve_device(device)
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; known: {list(DISTANCES)}")
    cosine = distance == "cosine"
    if cosine:
        impls = [i for i in impls if i in COSINE_IMPLS]
    default_shapes = COSINE_SHAPES if cosine else CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    shapes = shapes or (QUICK_SHAPES if quick else default_shapes)
    dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
    modes = ["fwd+bwd" if m in ("fwdbwd", "fwd+bwd", "bwd") else m for m in modes]
    budget = BUDGET["quick" if quick else device]
    unknown = (set(impls) - set(IMPLS)) | (set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown implementations or modes {sorted(unknown)}; known: {list(IMPLS)}, {list(MODES)}")
    if device not in tl.info()["kernels"]:
        log(f"warning: tripletloss_cuda has no compiled {device} kernel: its rows time the PyTorch reference")
    total = len(dtypes) * len(shapes) * len(modes) * len(impls)
    progress = _Progress(total, progress_bar)
    try:
        for dtype, (n, d), mode in itertools.product(dtypes, shapes, modes):
            base = {"device": device, "dtype": str(dtype).removeprefix("torch."), "n": n, "d": d, "mode": mode}
            base["distance"] = distance
            base["min_bytes"] = (3 if mode == "fwd" else 9) * n * d * dtype.itemsize
            sets = None
            for impl in impls:
                row = dict(base, impl=impl, status="ok")
                progress.start(f"{device} {row['dtype']} {n}x{d} {mode} {impl}")
                try:
                    sets = sets or _input_sets(n, d, dtype, device, requires_grad=mode != "fwd")
                    times, peak = _measure(_make_impl(impl, distance), sets, mode, device, repeats, budget)
                    median, p20, p80 = _stats(times)
                    row.update(median_s=median, p20_s=p20, p80_s=p80, repeats=len(times))
                    row["gbps"] = row["min_bytes"] / median / 1e9
                    if peak is not None:
                        row["peak_extra_bytes"] = peak
                    progress.result(fmt_time(median))
                except Exception as err:  # noqa: BLE001  (report the row and go on)
                    row["status"] = "oom" if _is_oom(err) else "n/a" if impl == "compile" else "error"
                    first_line = (str(err).strip().splitlines() or [""])[0]
                    row["error"] = f"{type(err).__name__}: {first_line[:300]}"
                    progress.result(f"{base['dtype']} {n}x{d} {mode} {impl}: {row['status']}: {row['error']}", True)
                    if row["status"] == "oom":
                        sets = None  # free the inputs too, and make them again for the next implementation
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                progress.advance()
                yield row
            del sets
    finally:
        progress.close()


def annotate(rows, copy_gbps=None):
    """Add to each row: `pct_copy` (its GB/s as % of the copy bandwidth) and, for the peers of tripletloss_cuda,
    `tl_speedup` (peer time / tripletloss_cuda time). Returns the rows."""
    ours = {_group(r): r["median_s"] for r in rows if r["impl"] == "tl" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if copy_gbps:
            r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        if r["impl"] != "tl" and _group(r) in ours:
            r["tl_speedup"] = r["median_s"] / ours[_group(r)]
    return rows


def _group(row):
    return row["device"], row.get("distance", "pnorm"), row["dtype"], row["n"], row["d"], row["mode"]


def markdown(meta, rows):
    """The results as markdown: a header of metadata and one table line per row."""
    copy = meta.get("copy_gbps")
    lines = [
        f"## {meta['device_kind']}: {meta['device_name']}",
        "",
        f"torch {meta['torch']}, tripletloss_cuda kernels {meta['tripletloss_cuda'].get('kernels')}, "
        f"commit {meta['git_commit']}, {meta['date']}; copy bandwidth "
        + (f"{copy:.1f} GB/s" if copy else "not measured")
        + ". Time: median per call (p20–p80); speedup: peer time / tripletloss_cuda time; GB/s: minimum bytes "
        "(fwd 3·N·D·s, fwd+bwd 9·N·D·s) / time."
        + (" CUDA rows under 4 MB are launch-bound (marked *)." if meta["device_kind"] == "cuda" else "")
        + (" **Interrupted: partial results.**" if meta.get("interrupted") else ""),
        "",
        "| dtype | N×D | mode | min MB | impl | time | p20–p80 | tl speedup | GB/s | % copy | extra MB |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    previous = None
    for r in rows:
        group = _group(r)
        star = "*" if r["device"] == "cuda" and r["min_bytes"] < LAUNCH_BOUND_BYTES else ""
        head = [r["dtype"], f"{r['n']}×{r['d']}{star}", r["mode"], f"{r['min_bytes'] / 1e6:.2f}"]
        head = head if group != previous else [""] * 4
        previous = group
        if r["status"] != "ok":
            cells = [r["status"], "", "", "", "", ""]
        else:
            speedup = f"{r['tl_speedup']:.2f}×" if "tl_speedup" in r else ""
            peak = f"{r['peak_extra_bytes'] / 1e6:.1f}" if "peak_extra_bytes" in r else ""
            pct = f"{r['pct_copy']:.0f}%" if "pct_copy" in r else ""
            spread = f"{fmt_time(r['p20_s'])}–{fmt_time(r['p80_s'])}"
            cells = [fmt_time(r["median_s"]), spread, speedup, f"{r['gbps']:.1f}", pct, peak]
        labels = COSINE_IMPLS if r.get("distance") == "cosine" else IMPLS
        lines.append("| " + " | ".join(head + [labels.get(r["impl"], r["impl"])] + cells) + " |")
    return "\n".join(lines) + "\n"


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(device):
    """Device name, versions, tripletloss_cuda.info(), git commit and date of a run on `device`."""
    device = resolve_device(device)
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        cpuinfo = pathlib.Path("/proc/cpuinfo")
        for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
        name = f"{model}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs)"
    commit = os.environ.get("GIT_COMMIT")  # set it where the copy has no .git: the commit it was made from
    if not commit:
        commit = _git("rev-parse", "--short", "HEAD") or "unknown"
        if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
    return {
        "device_kind": device,
        "device_name": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tripletloss_cuda": tl.info(),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def plot(meta, rows, path):
    """Draw time and achieved bandwidth per shape, one line per implementation, for each (dtype, mode):
    a PNG (or any format matplotlib writes) at `path`, titled with the device and date."""
    plt = _pyplot()
    groups = sorted({(r["dtype"], r["mode"]) for r in rows}, key=lambda g: (g[0], MODES.index(g[1])))
    shapes = sorted({(r["n"], r["d"]) for r in rows}, key=math.prod)
    fig, axes = plt.subplots(2, max(1, len(groups)), figsize=(4.5 * max(1, len(groups)), 7), squeeze=False)
    for col, (dtype, mode) in enumerate(groups):
        for impl, label in IMPLS.items():
            ok = {(r["n"], r["d"]): r for r in rows if (r["dtype"], r["mode"], r["impl"]) == (dtype, mode, impl)}
            ok = {k: r for k, r in ok.items() if r["status"] == "ok"}
            if not ok:
                continue
            xs = [i for i, shape in enumerate(shapes) if shape in ok]
            axes[0][col].plot(xs, [ok[shapes[i]]["median_s"] * 1e3 for i in xs], marker="o", label=label)
            axes[1][col].plot(xs, [ok[shapes[i]]["gbps"] for i in xs], marker="o", label=label)
        axes[0][col].set_title(f"{dtype}, {mode}")
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("median time per call (ms)")
        axes[1][col].set_ylabel("GB/s (minimum bytes / time)")
        if meta.get("copy_gbps"):
            axes[1][col].axhline(meta["copy_gbps"], color="grey", linestyle="--", label="copy bandwidth")
        for ax in axes[0][col], axes[1][col]:
            ax.set_xticks(range(len(shapes)), [f"{n}×{d}" for n, d in shapes], rotation=30, fontsize=8)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle(
        f"tripletloss_cuda benchmark: {meta['device_name']}; torch {meta['torch']}; {meta['date']}", fontsize=9
    )
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or a one-line error saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or tripletloss_cuda[demo])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _parse_shapes(parser, text):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        parser.error(f"--shapes: expected NxD[,NxD...] with positive N and D, got {text!r}")
    return shapes


def _parse_args(argv):
    parser = ArgumentParser(
        prog="tripletloss-cuda bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (cuda when available)")
    parser.add_argument("--shapes", help="NxD list, e.g. 128x128,16384x512 (default: the device's list)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default: %(default)s")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd (default: %(default)s)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="default: %(default)s")
    parser.add_argument(
        "--distance",
        default="pnorm",
        choices=DISTANCES,
        help="pnorm: F.triplet_margin_loss (default); cosine: F.triplet_margin_with_distance_loss with the cosine "
        "distance, eager and compiled, against tl.triplet_margin_with_distance_loss",
    )
    parser.add_argument("--repeats", type=int, help="timed samples per row (default: fit a time budget)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats, no files (CI smoke test)")
    parser.add_argument("--json", help="also write the results JSON to this file")
    parser.add_argument("--plot", help="also draw time and GB/s per shape to this image (e.g. bench.png; matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="a log line per row instead of a progress bar")
    parser.add_argument(
        "--out-dir",
        help="folder for <device>-<date>.json and .md (default: benchmarks/results in a checkout, else the "
        "current directory; '' or --quick: none)",
    )
    args = parser.parse_args(argv)
    if args.out_dir is None and not args.quick:
        args.out_dir = str(ROOT / "benchmarks" / "results") if CHECKOUT else "."
    args.shapes = _parse_shapes(parser, args.shapes) if args.shapes else None
    for name in ("dtypes", "modes", "impls"):
        setattr(args, name, [v.strip() for v in getattr(args, name).split(",") if v.strip()])
    bad_dtypes = [d for d in args.dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]
    if bad_dtypes or not args.dtypes:
        parser.error(f"--dtypes: unknown dtype(s) {bad_dtypes}; e.g. float32,bfloat16")
    bad_modes = [m for m in args.modes if m not in ("fwd", "fwdbwd", "fwd+bwd", "bwd")]
    if bad_modes or not args.modes:
        parser.error(f"--modes: unknown mode(s) {bad_modes}; known: fwd, fwdbwd")
    bad_impls = [i for i in args.impls if i not in IMPLS]
    if bad_impls or not args.impls:
        parser.error(f"--impls: unknown implementation(s) {bad_impls}; known: {','.join(IMPLS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected a positive number, got {args.repeats}")
    if args.device not in ("cpu", "cuda", "auto") and not args.device.startswith("cuda:"):
        parser.error(f"--device: expected cpu, cuda or auto, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def write_results(meta, rows, table, json_path=None, stem=None):
    """Writes {"meta", "rows"} to json_path, and stem.json + stem.md (the table); returns the paths written."""
    result = json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    outputs = {pathlib.Path(json_path): result} if json_path else {}
    if stem:
        stem = pathlib.Path(stem)
        outputs.update({stem.with_suffix(".json"): result, stem.with_suffix(".md"): table})
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(map(str, outputs))


def main(argv=None):
    """The benchmark program: returns the exit status (0; 2 for bad arguments, through SystemExit)."""
    args = _parse_args(argv)
    device = resolve_device(args.device)
    if args.plot:
        _pyplot()  # fail now, not after the measurements, when matplotlib is missing
    started = time.perf_counter()
    meta = metadata(device)
    started_at = datetime.datetime.fromisoformat(meta["date"])
    log(f"{device}: {meta['device_name']}; torch {meta['torch']}; tripletloss_cuda {meta['tripletloss_cuda']}")
    log("copy bandwidth ...")
    meta["copy_gbps"] = copy_bandwidth(device)
    log(f"    {meta['copy_gbps']:.1f} GB/s")
    rows = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout's SIGTERM: keep the rows so far
    try:
        rows.extend(
            iter_rows(
                device,
                args.shapes,
                args.dtypes,
                args.modes,
                args.impls,
                args.repeats,
                args.quick,
                not args.no_progress,
                args.distance,
            )
        )
    except KeyboardInterrupt:
        meta["interrupted"] = True
        log(f"interrupted: keeping the {len(rows)} rows measured")
    annotate(rows, meta["copy_gbps"])
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    table = markdown(meta, rows)
    print(table)
    written = write_results(
        meta, rows, table, args.json, args.out_dir and f"{args.out_dir}/{device}-{started_at:%Y%m%d-%H%M%S}"
    )
    if args.plot:
        written.append(str(plot(meta, rows, args.plot)))
    log(f"done in {meta['elapsed_s']} s; wrote {', '.join(written) or 'no files'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
