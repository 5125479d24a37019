"""Benchmark tripletloss_cuda against the naive module, F.triplet_margin_loss and torch.compile of it.

    python benchmarks/bench.py                        # CPU, default shapes, float32 and bfloat16
    python benchmarks/bench.py --device cuda          # or --device auto
    python benchmarks/bench.py --quick                # small shapes, few repeats (CI smoke)
    python benchmarks/bench.py --shapes 128x128,16384x512 --dtypes float32 --modes fwdbwd --impls torch,tl

Every implementation computes the same loss (margin 1.0, p = 2, eps 1e-6, mean) on the same random inputs.
Modes: "fwd" (the loss alone) and "fwd+bwd" (inputs require grad; the loss, then the gradients of the three
inputs with torch.autograd.grad). A row's time is the median per call, with p20 and p80, over repeats picked
to fit a time budget after one warm-up call (which also compiles torch.compile, outside the timing).

CPU: time.perf_counter around each call. CUDA: CUDA events around batches of back-to-back calls (one call
per batch for large shapes, more for small ones), cycling through enough input sets to overflow the L2 cache
4 times, so the inputs come from memory; under ~4 MB a call is launch-bound and the time is per call.

Minimum bytes moved: forward reads the three inputs (3·N·D·s, s = element size); forward+backward also
reads them again and writes the three gradients (9·N·D·s). GB/s = minimum bytes / time, compared with
dst.copy_(src) of 256 MB measured in the same run (bytes read + written).

Results: a table on stdout (markdown), progress on stderr, and benchmarks/results/<device>-<date>.json and
.md (metadata: device, torch, tripletloss_cuda.info(), git commit, date, copy bandwidth; every row), except
with --quick. A timeout's SIGTERM (or Ctrl-C) stops the run and writes the rows measured so far.
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench.py` from a checkout with an in-place build
    sys.path.insert(0, str(ROOT))

import tripletloss_cuda as tl

MARGIN = 1.0
IMPLS = {  # key: label in the table
    "naive": "naive module",
    "torch": "F.triplet_margin_loss",
    "compile": "torch.compile(F)",
    "tl": "tripletloss_cuda",
}
MODES = ("fwd", "fwd+bwd")
CPU_SHAPES = [(128, 128), (1024, 128), (4096, 256), (16384, 512), (65536, 512)]
CUDA_SHAPES = sorted(CPU_SHAPES + [(8192, 1024), (32768, 8192)], key=math.prod)
QUICK_SHAPES = [(128, 128), (1024, 128)]
DTYPES = ("float32", "bfloat16")
LAUNCH_BOUND_BYTES = 4e6  # CUDA rows moving fewer bytes are launch-bound: the time per call is what counts

# Timing budget per (shape, dtype, mode, impl): seconds of timed calls, and the least and most repeats.
BUDGET = {"cpu": (0.3, 3, 500), "cuda": (0.15, 5, 200), "quick": (0.01, 3, 10)}
CUDA_MIN_SAMPLE_S = 1e-4  # a CUDA sample (one pair of events) spans at least this long: batches small calls


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


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
    _sync(device)
    times = _time_calls(lambda: dst.copy_(src), device, repeats or (20 if device == "cuda" else 10))
    return 2 * nbytes / statistics.median(times) / 1e9


def _make_impl(impl):
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
    _sync(device)
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


def run(device="cpu", shapes=None, dtypes=DTYPES, modes=MODES, impls=tuple(IMPLS), repeats=None, quick=False):
    """Benchmark rows (see iter_rows) as a list."""
    return list(iter_rows(device, shapes, dtypes, modes, impls, repeats, quick))


def iter_rows(device="cpu", shapes=None, dtypes=DTYPES, modes=MODES, impls=tuple(IMPLS), repeats=None, quick=False):
    """Benchmark rows, yielded as they are measured: one dict per (dtype, shape, mode, impl), in that order.

    shapes: [(N, D), ...] (default: the device's list); dtypes: names or torch dtypes; modes: "fwd",
    "fwd+bwd" (or "fwdbwd"); repeats: fixed number of timed samples (default: fit the time budget).
    A row's status is "ok", "oom" (out of memory for the shape: the other rows go on), "n/a" (torch.compile
    failed) or "error"; times are in seconds, bytes in bytes.
    """
    device = resolve_device(device)
    shapes = shapes or (QUICK_SHAPES if quick else CUDA_SHAPES if device == "cuda" else CPU_SHAPES)
    dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
    modes = ["fwd+bwd" if m in ("fwdbwd", "fwd+bwd", "bwd") else m for m in modes]
    budget = BUDGET["quick" if quick else device]
    unknown = (set(impls) - set(IMPLS)) | (set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown implementations or modes {sorted(unknown)}; known: {list(IMPLS)}, {list(MODES)}")
    if device not in tl.info()["kernels"]:
        log(f"warning: tripletloss_cuda has no compiled {device} kernel: its rows time the PyTorch reference")
    count = itertools.count(1)
    total = len(dtypes) * len(shapes) * len(modes) * len(impls)
    for dtype, (n, d), mode in itertools.product(dtypes, shapes, modes):
        base = {"device": device, "dtype": str(dtype).removeprefix("torch."), "n": n, "d": d, "mode": mode}
        base["min_bytes"] = (3 if mode == "fwd" else 9) * n * d * dtype.itemsize
        sets = None
        for impl in impls:
            row = dict(base, impl=impl, status="ok")
            log(f"[{next(count)}/{total}] {device} {row['dtype']} {n}x{d} {mode} {impl} ...")
            try:
                sets = sets or _input_sets(n, d, dtype, device, requires_grad=mode != "fwd")
                times, peak = _measure(_make_impl(impl), sets, mode, device, repeats, budget)
                median, p20, p80 = _stats(times)
                row.update(median_s=median, p20_s=p20, p80_s=p80, repeats=len(times))
                row["gbps"] = row["min_bytes"] / median / 1e9
                if peak is not None:
                    row["peak_extra_bytes"] = peak
                log(f"    {_fmt_time(median)}")
            except Exception as err:  # noqa: BLE001  (report the row and go on)
                row["status"] = "oom" if _is_oom(err) else "n/a" if impl == "compile" else "error"
                first_line = (str(err).strip().splitlines() or [""])[0]
                row["error"] = f"{type(err).__name__}: {first_line[:300]}"
                log(f"    {row['status']}: {row['error']}")
                if row["status"] == "oom":
                    sets = None  # free the inputs too, and make them again for the next implementation
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            yield row
        del sets


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
    return row["device"], row["dtype"], row["n"], row["d"], row["mode"]


def _fmt_time(seconds):
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


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
            spread = f"{_fmt_time(r['p20_s'])}–{_fmt_time(r['p80_s'])}"
            cells = [_fmt_time(r["median_s"]), spread, speedup, f"{r['gbps']:.1f}", pct, peak]
        lines.append("| " + " | ".join(head + [IMPLS.get(r["impl"], r["impl"])] + cells) + " |")
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


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (cuda when available)")
    parser.add_argument("--shapes", help="NxD list, e.g. 128x128,16384x512 (default: the device's list)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default: %(default)s")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd (default: %(default)s)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="default: %(default)s")
    parser.add_argument("--repeats", type=int, help="timed samples per row (default: fit a time budget)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats, no files (CI smoke test)")
    parser.add_argument("--json", help="also write the results JSON to this file")
    parser.add_argument(
        "--out-dir", help="folder for <device>-<date>.json and .md (default: benchmarks/results; '' or --quick: none)"
    )
    args = parser.parse_args(argv)
    if args.out_dir is None and not args.quick:
        args.out_dir = str(ROOT / "benchmarks" / "results")
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes else None
    for name in ("dtypes", "modes", "impls"):
        setattr(args, name, [v.strip() for v in getattr(args, name).split(",") if v.strip()])
    return args


def main(argv=None):
    args = _parse_args(argv)
    device = resolve_device(args.device)
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
        rows.extend(iter_rows(device, args.shapes, args.dtypes, args.modes, args.impls, args.repeats, args.quick))
    except KeyboardInterrupt:
        meta["interrupted"] = True
        log(f"interrupted: keeping the {len(rows)} rows measured")
    annotate(rows, meta["copy_gbps"])
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    table = markdown(meta, rows)
    print(table)
    result = json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    outputs = {pathlib.Path(args.json): result} if args.json else {}
    if args.out_dir:
        stem = pathlib.Path(args.out_dir) / f"{device}-{started_at:%Y%m%d-%H%M%S}"
        outputs.update({stem.with_suffix(".json"): result, stem.with_suffix(".md"): table})
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    log(f"done in {meta['elapsed_s']} s; wrote {', '.join(map(str, outputs)) or 'no files'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
