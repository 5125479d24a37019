"""Benchmark the mining losses against pytorch-metric-learning (pml) and our pure-PyTorch reference.

    python -m tripletloss_cuda.cli.bench_mining                    # CPU, all cases (minutes)
    python -m tripletloss_cuda.cli.bench_mining --quick            # small case, few repeats, no files (smoke test)
    python -m tripletloss_cuda.cli.bench_mining --n 1024 --d 128 --per-class 32 --losses batch_all --impls tl,pml

One row per (loss, N, D, samples per class, implementation): median time of forward+backward (the loss, then
torch.autograd.grad of the embeddings) with p20/p80, and the peak memory of one forward+backward. Inputs: float32
Gaussian embeddings (N, D), labels with `per-class` samples per class in random order, margin 0.2, Euclidean
distance of L2-normalized embeddings (pml's default distance, so that the functions agree):

- tl: tripletloss_cuda's public functions (compiled kernels where built);
- reference: tripletloss_cuda.mining.reference (pure PyTorch, O(N^2) memory) on its own distance matrix;
- cdist: torch.cdist(x, x).sum() (the distance computation alone, on the same rows: issue 18's yardstick; measured
  once per case; the table ends with tl's time over it);
- pml: batch-hard = TripletMarginLoss(reducer=MeanReducer()) + BatchHardMiner (the same function as ours);
  batch-all = TripletMarginLoss without a miner (all triplets, AvgNonZeroReducer = our "mean_nonzero"; the same
  function); semi-hard = TripletMarginLoss + TripletMarginMiner(type_of_triplets="semihard"): NOT the same
  function (pml keeps every triplet with 0 < d_an - d_ap <= margin; ours, as FaceNet / TF Addons, mines one
  negative per positive pair); it is the nearest pml offers, timed for scale only.

Each row runs in a fresh subprocess, so that one implementation's freed memory cannot hide another's peak.
Peak memory: CUDA, torch.cuda.max_memory_allocated over the call minus the memory allocated before it. CPU, the
resident-set high-water mark: after the inputs are made and a small warm-up call has loaded every code path, the
peak is reset (writing 5 to /proc/self/clear_refs), and the peak is VmHWM after one call minus VmRSS before it:
the physical memory the call touched at its busiest, freed-and-reused memory counted once (if clear_refs is
unavailable, ru_maxrss minus the RSS before the call, which includes the warm-up's peak).

``--scale`` runs instead the memory-bounded mining rows of issue 10 (CPU, 2 threads unless --threads, D = 128,
32 per class, tl only; a few calls per row): the three losses at N = 32768 with the default chunk size (peak
memory growth should stay <= 2 GiB, where the whole N x N path grew by 16 GiB); at N = 8192 the default chunking,
a forced chunk of 1024 anchors and the whole matrix (chunk_size = N: the unchunked path, time ratio in the "tl
speedup" column, to be within 1.5x); and N = 1024 queries against M = 65536 references (gradients to both).

``--split`` times instead the mining ops alone next to the matrix product that makes their distance matrix (tl
only, D = 128, 32 per class, N = 1024, 4096, 16384 unless --n): the median of x @ x.T (N, D), of each loss's
forward op and of its backward op on the (N, N) float32 distance matrix, and the ops' time over the product's;
where the fused CPU ops run (issue 18), also their forward op on the raw product and their backward op.

Skipped rows say why: pml's batch-all and semi-hard build N x N x N masks (64 Gi elements at N = 4096), so a pml
case whose N^3 bytes exceed half the available memory is not run; a row whose process exceeds its time limit is
killed. Results: progress on stderr, a markdown table on stdout (speedup = other time / tl time, memory ratio =
other peak / tl peak), and benchmarks/results/mining-<device>-<date>.{json,md} with metadata (not with --quick).
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

from .bench import metadata as core_metadata
from .bench import write_results
from .common import fmt_bytes, fmt_time, log, measure, resolve_device, sync

LOSSES = ("batch_hard", "batch_all", "semi_hard")
IMPLS = {
    "tl": "tripletloss_cuda",
    "reference": "tl reference (PyTorch)",
    "pml": "pytorch-metric-learning",
    "cdist": "torch.cdist(x, x).sum()",
}
NS, DS, PER_CLASS = (256, 1024, 4096), (128, 512), (4, 32)
MARGIN = 0.2
BUDGET_S = {"full": 2.0, "quick": 0.05}  # seconds of timed calls per row (after the measured first call)
REPEATS = {"full": (3, 50), "quick": (2, 3)}  # least and most timed calls per row
ROW_TIMEOUT_S = 240  # a row's process is killed after this long
# --scale: (loss-independent) cases (N, M or None, chunk_size: None = the default, or "whole" = N)
SCALE_CASES = [(32768, None, None), (8192, None, None), (8192, None, 1024), (8192, None, "whole"), (1024, 65536, None)]
SPLIT_NS, SPLIT_D, SPLIT_PER_CLASS, SPLIT_CALLS = (1024, 4096, 16384), 128, 32, 10  # --split; calls per timing
SCALE_D, SCALE_PER_CLASS, SCALE_THREADS, SCALE_REPEATS, SCALE_TIMEOUT_S = 128, 32, 2, (1, 3), 1500
ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout (results go to benchmarks/results)


# ---------------------------------------------------------------- the implementations (imported lazily)


def make_loss(loss, impl, chunk_size=None):
    """A function (embeddings, labels[, ref_embeddings, ref_labels]) -> loss for one loss and implementation."""
    import tripletloss_cuda as tl

    if impl == "tl":
        fn = getattr(tl, f"{loss}_triplet_loss")

        def tl_loss(x, y, r=None, ry=None):
            chunk = x.shape[0] if chunk_size == "whole" else chunk_size
            return fn(x, y, margin=MARGIN, normalize=True, chunk_size=chunk, ref_embeddings=r, ref_labels=ry)

        return tl_loss
    if impl == "reference":
        from tripletloss_cuda.mining import reference as ref

        fn = getattr(ref, loss)
        return lambda x, y: fn(ref.distance_matrix(x, "euclidean", normalize=True), y.to(torch.int64), MARGIN)[0]
    if impl == "cdist":  # the distance computation alone (issue 18's yardstick): the same rows, no mining
        return lambda x, y: torch.cdist(x, x).sum()
    if impl == "pml":
        from pytorch_metric_learning import losses, miners, reducers

        if loss == "batch_all":
            criterion = losses.TripletMarginLoss(margin=MARGIN)
            return lambda x, y: criterion(x, y)
        if loss == "batch_hard":
            criterion, miner = (
                losses.TripletMarginLoss(margin=MARGIN, reducer=reducers.MeanReducer()),
                miners.BatchHardMiner(),
            )
        else:
            criterion = losses.TripletMarginLoss(margin=MARGIN)
            miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")
        return lambda x, y: criterion(x, y, miner(x, y))
    raise ValueError(f"impl should be one of {', '.join(IMPLS)}, got {impl!r}")


def make_inputs(n, d, per_class, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, d, generator=g).to(device).requires_grad_()
    labels = (torch.arange(n) // per_class)[torch.randperm(n, generator=g)].to(device)
    return embeddings, labels


def skip_reason(loss, impl, n, device):
    """Why a row is not run (None: run it): pml's N^3 masks that cannot fit."""
    if impl != "pml" or loss == "batch_hard":
        return None
    if device == "cuda":
        available = torch.cuda.mem_get_info()[0]
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free RAM; no psutil needed
    if n**3 > available / 2:
        return f"not run: pml builds N^3 masks ({n**3 / 2**30:.0f} GiB) > half the available memory"
    return None


# ---------------------------------------------------------------- one row, in its own process


def measure_row(spec):
    """Runs one row: {loss, impl, n, d, per_class, device, budget_s, repeats: [min, max]} -> the row's results."""
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fn = make_loss(spec["loss"], spec["impl"], spec.get("chunk_size"))
    x, y = make_inputs(spec["n"], spec["d"], spec["per_class"], device)
    refs = make_inputs(spec["m"], spec["d"], spec["per_class"], device, seed=2) if spec.get("m") else ()

    def call():
        loss = fn(x, y, *refs)
        torch.autograd.grad(loss, (x, refs[0]) if refs else x)
        return loss.detach()

    # A small call first loads libraries and code paths (and pml's imports) outside the measurement.
    small_x, small_y = make_inputs(64, spec["d"], min(spec["per_class"], 4), device, seed=1)
    torch.autograd.grad(fn(small_x, small_y), small_x)
    m = measure(call, device, spec["repeats"], spec["budget_s"])
    chunk = spec.get("chunk_size")
    if spec["impl"] == "tl" and chunk is None:  # the anchors per block the call used by default
        from tripletloss_cuda.mining import ops

        refs = spec.get("m") or spec["n"]
        if ops.use_fused(spec["loss"], x):
            chunk = ops.fused_chunk(spec["loss"], spec["n"], refs, torch.float32, None)[0]
        else:
            chunk = ops.default_chunk(refs, torch.float32)
    keys = ("median_s", "p20_s", "p80_s", "min_s", "first_s", "repeats", "peak_bytes", "memory_measure")
    chunk = spec["n"] if chunk == "whole" or (chunk or 0) >= spec["n"] else chunk
    return {"chunk": chunk, **{k: m[k] for k in keys}, "loss_value": m["value"].item()}


def _median_time(f, device, budget_s, calls=SPLIT_CALLS):
    """Median seconds of one call of f, timed over batches of `calls` calls between synchronizations."""
    f()
    sync(device)
    times = []
    while len(times) < 3 or (len(times) < 30 and sum(times) * calls < budget_s):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure_split(spec):
    """One --split row: {loss, n, d, per_class, device, budget_s} -> median seconds of the distance matrix's
    product, the forward op and the backward op (tripletloss_cuda's registered ops, on the matrix)."""
    device, n = spec["device"], spec["n"]
    x, labels = make_inputs(n, spec["d"], spec["per_class"], device)
    x = torch.nn.functional.normalize(x.detach(), dim=1)
    dist = torch.cdist(x, x).contiguous()
    self_index = torch.arange(n, device=device)
    ops = torch.ops.tripletloss_cuda
    forward, backward = getattr(ops, f"{spec['loss']}_forward"), getattr(ops, f"{spec['loss']}_backward")
    extra = (False,) if spec["loss"] == "batch_hard" else ()
    _, *saved = forward(dist, labels, labels, self_index, MARGIN, *extra)
    grad = torch.ones((), dtype=torch.float64, device=device)
    if spec["loss"] == "batch_hard":

        def back():
            return backward(grad, dist, saved[1], MARGIN, *extra)
    else:  # batch-all and semi-hard mine again from the labels

        def back():
            return backward(grad, dist, labels, labels, self_index, MARGIN)

    budget = spec["budget_s"]
    times = {
        "matmul_s": _median_time(lambda: x @ x.T, device, budget),
        "forward_s": _median_time(lambda: forward(dist, labels, labels, self_index, MARGIN, *extra), device, budget),
        "backward_s": _median_time(back, device, budget),
    }
    times["ops_over_matmul"] = (times["forward_s"] + times["backward_s"]) / times["matmul_s"]
    from tripletloss_cuda.mining import ops as mining_ops

    if mining_ops.use_fused(spec["loss"], x):
        times.update(_measure_fused_split(spec["loss"], x, labels, self_index, extra, device, budget))
        times["fused_over_matmul"] = (times["fused_forward_s"] + times["fused_backward_s"]) / times["matmul_s"]
    return times


def _measure_fused_split(loss, x, labels, self_index, extra, device, budget):
    """The fused CPU ops of one loss on the raw product x @ x.T (issue 18): the forward op (the distances and the
    mining in one pass; batch-all's op overwrites its block, so it runs on a fresh copy, whose time is subtracted),
    and the backward op (batch-hard, semi-hard: mined_gram_backward; batch-all: symmetrize_, before its product)."""
    from tripletloss_cuda.mining import ops as mining_ops

    block = mining_ops.Gram(x, x, labels, labels, self_index, "euclidean").block(0, x.shape[0])
    gram, rest = block[0], block[1:]
    op = getattr(torch.ops.tripletloss_cuda, mining_ops.GRAM_OPS[loss])
    if loss == "batch_all":
        work = gram.clone()
        copy_s = _median_time(lambda: work.copy_(gram), device, budget)
        forward_s = _median_time(lambda: op(work.copy_(gram), *rest, MARGIN), device, budget) - copy_s
        backward_s = _median_time(lambda: torch.ops.tripletloss_cuda.symmetrize_(work), device, budget)
    else:
        _, _, pairs, coef = op(gram, *rest, MARGIN, *extra)
        forward_s = _median_time(lambda: op(gram, *rest, MARGIN, *extra), device, budget)
        code = block[-1]
        backward_s = _median_time(
            lambda: torch.ops.tripletloss_cuda.mined_gram_backward(coef, pairs, x, None, code), device, budget
        )
    return {"fused_forward_s": max(forward_s, 0.0), "fused_backward_s": backward_s}


def iter_split_rows(device, ns, losses):
    for loss in losses:
        for n in ns:
            row = {"loss": loss, "n": n, "d": SPLIT_D, "per_class": SPLIT_PER_CLASS, "impl": "tl ops"}
            spec = dict(row, device=device, budget_s=BUDGET_S["full"], split=True)
            row.update(run_row(spec, ROW_TIMEOUT_S))
            if not row.get("skipped"):
                log(
                    f"{loss} N={n}: matmul {fmt_time(row['matmul_s'])}, forward {fmt_time(row['forward_s'])}, "
                    f"backward {fmt_time(row['backward_s'])}, ops/matmul {row['ops_over_matmul']:.2f}"
                )
            else:
                log(f"{loss} N={n}: {row['skipped']}")
            yield row


def split_markdown(meta, rows):
    header = (
        f"Mining ops alone vs the distance matrix's product x @ x.T, float32, D = {SPLIT_D}, {SPLIT_PER_CLASS} per "
        f"class; {meta['device_name']}; torch {meta['torch']}; commit {meta['git_commit']}, {meta['date']}. "
        f"Medians over batches of {SPLIT_CALLS} calls."
    )
    lines = [
        header,
        (
            "Fused (CPU): the ops on the raw product that compute the distances and mine in one pass, and the backward op "
            "(batch-hard, semi-hard: mined_gram_backward; batch-all: symmetrize_, then a product like the matmul)."
        ),
        "",
        (
            "| loss | N | matmul | forward op | backward op | (forward + backward) / matmul | fused forward op "
            "| fused backward op | fused / matmul |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['loss']} | {r['n']} | {r['skipped']} | | | | | | |")
            continue
        cells = [fmt_time(r[k]) for k in ("matmul_s", "forward_s", "backward_s")] + [f"{r['ops_over_matmul']:.2f}"]
        if "fused_forward_s" in r:
            cells += [fmt_time(r["fused_forward_s"]), fmt_time(r["fused_backward_s"]), f"{r['fused_over_matmul']:.2f}"]
        else:
            cells += ["", "", ""]
        lines.append(f"| {r['loss']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_row(spec, timeout_s, module="tripletloss_cuda.cli.bench_mining"):
    """`python -m module --worker SPEC` (its measure_row) in a fresh interpreter; {'skipped': why} when it fails
    or runs out of time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"killed: over the {timeout_s} s time limit"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        if "out of memory" in out.stderr.lower() or out.returncode in (-9, 137):
            return {"skipped": f"out of memory ({tail[:200]})"}
        return {"skipped": f"failed: {tail[:300]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run, the table, the files


def iter_rows(device, ns, ds, per_classes, losses, impls, quick=False, repeats=None, threads=None):
    mode = "quick" if quick else "full"
    least, most = REPEATS[mode] if repeats is None else (repeats, repeats)
    done = []
    for loss in losses:
        for n in ns:
            for d in ds:
                for per_class in per_classes:
                    for impl in impls:
                        if impl == "cdist" and loss != losses[0]:
                            # loss-independent: measured once per case, with the first loss
                            row = next(
                                r for r in done if r["impl"] == "cdist" and _case(r)[1:] == (n, None, d, per_class)
                            )
                            yield dict(row, loss=loss)
                            continue
                        row = {"loss": loss, "n": n, "d": d, "per_class": per_class, "impl": impl}
                        reason = skip_reason(loss, impl, n, device)
                        if reason:
                            row["skipped"] = reason
                        else:
                            spec = dict(
                                row, device=device, budget_s=BUDGET_S[mode], repeats=[least, most], threads=threads
                            )
                            row.update(run_row(spec, ROW_TIMEOUT_S))
                        log(f"{loss} N={n} D={d} per class {per_class} {impl}: " + _row_summary(row))
                        done.append(row)
                        yield row


def iter_scale_rows(device, losses, threads=None):
    """The --scale rows (SCALE_CASES for each loss), tl only."""
    threads = threads or SCALE_THREADS
    for loss in losses:
        for n, m, chunk_size in SCALE_CASES:
            impl = "tl" if chunk_size is None else f"tl chunk_size={'N' if chunk_size == 'whole' else chunk_size}"
            row = {"loss": loss, "n": n, "m": m, "d": SCALE_D, "per_class": SCALE_PER_CLASS, "impl": impl}
            spec = dict(row, impl="tl", chunk_size=chunk_size, device=device, budget_s=BUDGET_S["full"])
            spec.update(repeats=list(SCALE_REPEATS), threads=threads)
            row.update(run_row(spec, SCALE_TIMEOUT_S))
            log(f"{loss} N={n} M={m or n} chunk {chunk_size or 'default'}: " + _row_summary(row))
            yield row


def _row_summary(row):
    if row.get("skipped"):
        return row["skipped"]
    return f"{fmt_time(row['median_s'])} ({row['repeats']} calls), peak {fmt_bytes(row['peak_bytes'])}"


def annotate(rows):
    """Adds to each measured row its speedup (row time / tl time) and memory ratio (row peak / tl peak)."""
    tl_rows = {_case(r): r for r in rows if r["impl"] == "tl" and not r.get("skipped")}
    for r in rows:
        base = tl_rows.get(_case(r))
        if base and not r.get("skipped"):
            r["tl_speedup"] = r["median_s"] / base["median_s"]
            measured = r["peak_bytes"] is not None and base["peak_bytes"]  # None or 0: no ratio
            r["tl_memory_ratio"] = r["peak_bytes"] / base["peak_bytes"] if measured else None


def cdist_ratios(rows):
    """{(loss, N, D, per class): tl time / torch.cdist time} for the cases with both rows measured."""
    cdist = {_case(r)[1:]: r for r in rows if r["impl"] == "cdist" and not r.get("skipped")}
    out = {}
    for r in rows:
        base = cdist.get(_case(r)[1:])
        if r["impl"] == "tl" and not r.get("skipped") and base:
            out[(r["loss"], r["n"], r["d"], r["per_class"])] = r["median_s"] / base["median_s"]
    return out


def _case(row):
    return row["loss"], row["n"], row.get("m"), row["d"], row["per_class"]


def result_cells(r, ratios=True):
    """The table cells of a measured row (or of a skipped one): loss value, median, p20–p80, peak memory, and
    (with ratios) tl speedup and memory ratio."""
    if r.get("skipped"):
        return ["", r["skipped"], "", "", "", ""]
    speedup, ratio = (r.get("tl_speedup"), r.get("tl_memory_ratio")) if ratios else (None, None)
    return [
        f"{r['loss_value']:.6g}",
        fmt_time(r["median_s"]),
        f"{fmt_time(r['p20_s'])}–{fmt_time(r['p80_s'])}",
        fmt_bytes(r["peak_bytes"]),
        "" if speedup is None else f"{speedup:.1f}×",
        "" if ratio is None else f"{ratio:.1f}×",
    ]


def markdown(meta, rows):
    header = (
        f"Mining losses, forward+backward, float32, margin {MARGIN}, normalized Euclidean; {meta['device_name']}; "
        f"torch {meta['torch']}, pytorch-metric-learning {meta['pytorch_metric_learning']}; commit "
        f"{meta['git_commit']}, {meta['date']}. Peak memory: {meta['memory_measure']}. "
        "Loss value: of the first call (the same function, so the same value, for tl, reference and pml "
        "batch-hard and batch-all). tl speedup = that row's time / tl's time; memory ratio = that row's peak / tl's peak. "
        "pml semi-hard (TripletMarginMiner 'semihard') is not the same function as ours."
    )
    lines = [
        header,
        "",
        (
            "| loss | N | M | D | per class | implementation | chunk | loss value | median | p20–p80 | peak memory "
            "| tl speedup | tl memory ratio |"
        ),
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = [r["loss"], str(r["n"]), str(r.get("m") or r["n"]), str(r["d"]), str(r["per_class"])]
        head += [IMPLS.get(r["impl"], r["impl"]), str(r.get("chunk") or "")]
        lines.append("| " + " | ".join(head + result_cells(r, ratios=r["impl"] != "tl")) + " |")
    ratios = cdist_ratios(rows)
    if ratios:
        lines += ["", "tl time / torch.cdist(x, x).sum() forward+backward time on the same rows (the same run):", ""]
        lines += ["| loss | N | D | per class | tl / cdist |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {v:.2f} |" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def metadata(device):
    """The core benchmark's metadata (device, versions, tripletloss_cuda.info(), git commit, date) plus the
    pytorch-metric-learning version, the margin and how memory is measured."""
    try:
        import pytorch_metric_learning

        pml_version = pytorch_metric_learning.__version__
    except ImportError:
        pml_version = None
    memory = (
        "torch.cuda.max_memory_allocated minus allocated before the call"
        if device == "cuda"
        else "resident-set high-water mark of one call minus the RSS before it, in a fresh process per row"
    )
    return {**core_metadata(device), "pytorch_metric_learning": pml_version, "margin": MARGIN, "memory_measure": memory}


def _ints(text):
    return tuple(int(v) for v in text.split(",") if v)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (cuda when available)")
    parser.add_argument("--n", type=_ints, help=f"batch sizes (default {','.join(map(str, NS))})")
    parser.add_argument("--d", type=_ints, help=f"embedding widths (default {','.join(map(str, DS))})")
    parser.add_argument("--per-class", type=_ints, help=f"samples per class (default {','.join(map(str, PER_CLASS))})")
    parser.add_argument("--losses", default=",".join(LOSSES), help="default: %(default)s")
    parser.add_argument("--impls", default=",".join(IMPLS), help="default: %(default)s")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default: fit a time budget)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads (torch.set_num_threads) in every row (default: torch's default)"
    )
    parser.add_argument("--quick", action="store_true", help="N=64, D=32, 4 per class, few repeats, no files")
    parser.add_argument("--scale", action="store_true", help="the memory-bounded mining rows (see above), tl only")
    parser.add_argument("--split", action="store_true", help="the mining ops' time next to the matrix product's")
    parser.add_argument("--json", help="also write the results JSON to this file")
    parser.add_argument("--out-dir", help="folder for mining-<device>-<date>.{json,md} (default: benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one row (JSON spec), print JSON
    args = parser.parse_args(argv)
    args.split_n = args.n or ((256,) if args.quick else SPLIT_NS)
    for name, default, quick in (("n", NS, (64,)), ("d", DS, (32,)), ("per_class", PER_CLASS, (4,))):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    args.losses = tuple(v for v in args.losses.split(",") if v)
    args.impls = tuple(v for v in args.impls.split(",") if v)
    for value, allowed, what in ((args.losses, LOSSES, "--losses"), (args.impls, tuple(IMPLS), "--impls")):
        if not value or set(value) - set(allowed):
            parser.error(f"{what} should be a list of {', '.join(allowed)}, got {','.join(value)!r}")
    if args.out_dir is None:
        args.out_dir = "" if args.quick else str(ROOT / "benchmarks" / "results")
    return args


def main(argv=None):
    args = _parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure_split(spec) if spec.get("split") else measure_row(spec)))
        return 0
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # also in every row's process; recorded in the metadata
    started = time.perf_counter()
    meta = metadata(device)
    started_at = datetime.datetime.fromisoformat(meta["date"])
    log(f"{device}: {meta['device_name']}; torch {meta['torch']}; pml {meta['pytorch_metric_learning']}")
    rows = []
    if args.scale:
        meta["threads"] = args.threads or SCALE_THREADS
    try:
        if args.scale:
            rows.extend(iter_scale_rows(device, args.losses, args.threads))
        elif args.split:
            rows.extend(iter_split_rows(device, args.split_n, args.losses))
        else:
            rows.extend(
                iter_rows(device, args.n, args.d, args.per_class, args.losses, args.impls, args.quick, args.repeats)
            )
    except KeyboardInterrupt:
        meta["interrupted"] = True
        log(f"interrupted: keeping the {len(rows)} rows measured")
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    if args.split:
        table = split_markdown(meta, rows)
    else:
        annotate(rows)
        table = markdown(meta, rows)
    print(table)
    kind = "mining-scale" if args.scale else "mining-split" if args.split else "mining"
    stem = args.out_dir and f"{args.out_dir}/{kind}-{device}-{started_at:%Y%m%d-%H%M%S}"
    written = write_results(meta, rows, table, args.json, stem)
    log(f"done in {meta['elapsed_s']} s; wrote {', '.join(written) or 'no files'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
