"""Benchmark the drop-in losses against the libraries they replace (`tripletloss-cuda bench --integrations`).

    python -m tripletloss_cuda.cli.bench_integrations            # CPU, all cases (minutes)
    python -m tripletloss_cuda.cli.bench_integrations --quick    # small sizes, few repeats, no files (smoke test)

Rows (forward + backward: the loss, then torch.autograd.grad of the embeddings; float32, D = 128):
- pml pipelines at N = 1024 and 8192 (32 samples per class, margin 0.2, PML's default normalized Euclidean
  LpDistance), each as pytorch-metric-learning runs it and with our drop-in loss (the miner, PML's own, is part
  of both): BatchHardMiner + TripletMarginLoss; TripletMarginMiner("semihard") + TripletMarginLoss; no miner
  (every triplet). PML lists all triplets from an N^3 mask in its no-miner loss and in TripletMarginMiner: those
  rows are not run where N^3 bytes exceed half the free memory.
- the indexed loss at N = 4096 with T = 100,000 random triplets (unnormalized Euclidean, margin 1):
  tl.triplet_margin_loss_from_indices; gather + torch.nn.functional.triplet_margin_loss (three (T, D) copies);
  PML's TripletMarginLoss with that indices_tuple (the full N x N distance matrix, then indexing).
Each row runs in a fresh process; time: median (p20, p80) of calls within a budget after a measured first call;
memory: the peak of one call (CUDA: max_memory_allocated minus allocated before; CPU: VmHWM after clear_refs
minus VmRSS before, as in bench_mining). Results: a markdown table on stdout and
benchmarks/results/integrations-<device>-<date>.{json,md} (not with --quick).
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import torch

from . import bench_mining
from .bench import metadata as core_metadata
from .bench import write_results
from .common import fmt_bytes, fmt_time, log, measure, resolve_device

ROOT = pathlib.Path(__file__).resolve().parents[2]
D, PER_CLASS, MARGIN = 128, 32, 0.2
PIPELINES = ("batch_hard_miner", "semihard_miner", "no_miner")
INDEXED = ("tl_indexed", "gather_F", "pml_indices")
ROW_TIMEOUT_S = 300


def _pipeline(case, impl):
    from pytorch_metric_learning import losses, miners

    from tripletloss_cuda.integrations import pml as drop_in

    loss_fn = (drop_in if impl == "tl" else losses).TripletMarginLoss(margin=MARGIN)
    miner = {
        "batch_hard_miner": lambda: miners.BatchHardMiner(),
        "semihard_miner": lambda: miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard"),
        "no_miner": lambda: None,
    }[case]()
    if miner is None:
        return lambda x, y: loss_fn(x, y)
    return lambda x, y: loss_fn(x, y, miner(x, y))


def _indexed(impl, triplets):
    import torch.nn.functional as F

    import tripletloss_cuda as tl

    a, p, n = triplets
    if impl == "tl_indexed":
        return lambda x, y: tl.triplet_margin_loss_from_indices(x, a, p, n, margin=1.0)
    if impl == "gather_F":
        return lambda x, y: F.triplet_margin_loss(x[a], x[p], x[n], margin=1.0)
    from pytorch_metric_learning import distances, losses, reducers

    loss_fn = losses.TripletMarginLoss(
        margin=1.0, distance=distances.LpDistance(normalize_embeddings=False), reducer=reducers.MeanReducer()
    )
    return lambda x, y: loss_fn(x, y, (a, p, n))


def make(spec, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = spec["n"]
    x = torch.randn(n, D, generator=g).to(device).requires_grad_()
    y = (torch.arange(n) // PER_CLASS)[torch.randperm(n, generator=g)].to(device)
    if spec["case"] == "indexed":
        t = spec["triplets"]
        triplets = [torch.randint(0, n, (t,), generator=g).to(device) for _ in range(3)]
        return _indexed(spec["impl"], triplets), x, y
    return _pipeline(spec["case"], spec["impl"]), x, y


def measure_row(spec):
    device = spec["device"]
    fn, x, y = make(spec, device)

    def call():
        loss = fn(x, y)
        torch.autograd.grad(loss, x)
        return loss.detach()

    small = dict(spec, n=128, triplets=min(spec.get("triplets") or 0, 500))
    warm_fn, wx, wy = make(small, device, seed=1)
    torch.autograd.grad(warm_fn(wx, wy), wx)
    m = measure(call, device, spec["repeats"], spec["budget_s"])
    keys = ("median_s", "p20_s", "p80_s", "first_s", "repeats", "peak_bytes")
    return {**{k: m[k] for k in keys}, "loss_value": m["value"].item()}


def run_row(spec):
    return bench_mining.run_row(spec, ROW_TIMEOUT_S, module="tripletloss_cuda.cli.bench_integrations")


def _skip(case, impl, n, device):
    """Why a row is not run: PML's N^3 triplet mask (its no-miner loss, and its TripletMarginMiner in both rows)."""
    if (case == "no_miner" and impl == "pml") or case == "semihard_miner":
        if device == "cuda":
            free = torch.cuda.mem_get_info()[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if n**3 > free / 2:
            return f"not run: PML lists all triplets from an N^3 mask ({n**3 / 2**30:.0f} GiB) > half the free memory"
    return None


def rows(device, ns, indexed_n, triplets, quick):
    budget, repeats = (0.05, [1, 2]) if quick else (2.0, [3, 20])
    specs = [{"case": c, "impl": i, "n": n} for c in PIPELINES for n in ns for i in ("pml", "tl")]
    specs += [{"case": "indexed", "impl": i, "n": indexed_n, "triplets": triplets} for i in INDEXED]
    for spec in specs:
        row = dict(spec)
        reason = _skip(spec["case"], spec["impl"], spec["n"], device)
        row.update(
            {"skipped": reason} if reason else run_row(dict(spec, device=device, budget_s=budget, repeats=repeats))
        )
        summary = row.get("skipped") or f"{fmt_time(row['median_s'])}, peak {fmt_bytes(row['peak_bytes'])}"
        log(f"{spec['case']} N={spec['n']} {spec['impl']}: {summary}")
        yield row


def annotate(all_rows):
    base = {}
    for r in all_rows:
        if not r.get("skipped") and r["impl"] in ("tl", "tl_indexed"):
            base[(r["case"], r["n"])] = r
    for r in all_rows:
        b = base.get((r["case"], r["n"]))
        if b and not r.get("skipped") and r is not b:
            r["tl_speedup"] = r["median_s"] / b["median_s"]
            r["tl_memory_ratio"] = r["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] else None


def markdown(meta, all_rows):
    lines = [
        (
            f"Drop-in losses vs the libraries, forward+backward, float32, D = {D}; {meta['device_name']}; torch "
            f"{meta['torch']}, pytorch-metric-learning {meta['pytorch_metric_learning']}; commit {meta['git_commit']}, "
            f"{meta['date']}. Pipelines: {PER_CLASS} per class, margin {MARGIN}, normalized Euclidean, PML's miner in "
            "both. Indexed: random triplets, unnormalized Euclidean, margin 1. tl speedup = row time / tl time; memory "
            "ratio = row peak / tl peak (peak: RSS high-water mark of one call, fresh process per row)."
        ),
        "",
        "| case | N | triplets | implementation | loss value | median | p20–p80 | peak memory | tl speedup | tl memory ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in all_rows:
        head = [r["case"], str(r["n"]), str(r.get("triplets", "")), r["impl"]]
        lines.append("| " + " | ".join(head + bench_mining.result_cells(r)) + " |")
    return "\n".join(lines) + "\n"


def _ints(text):
    return tuple(int(v) for v in text.split(",") if v)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tripletloss-cuda bench --integrations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--n", type=_ints, help="pipeline batch sizes (default 1024,8192)")
    parser.add_argument("--indexed-n", type=int, default=4096, help="rows of the indexed case (default %(default)s)")
    parser.add_argument(
        "--triplets", type=int, default=100_000, help="triplets of the indexed case (default %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="N=256, 2000 triplets, few repeats, no files")
    parser.add_argument("--out-dir", help="folder for the results (default: benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_row(json.loads(args.worker))))
        return 0
    device = resolve_device(args.device)
    ns = args.n or ((256,) if args.quick else (1024, 8192))
    indexed_n, triplets = (256, 2000) if args.quick else (args.indexed_n, args.triplets)
    import pytorch_metric_learning

    started = time.perf_counter()
    meta = {**core_metadata(device), "pytorch_metric_learning": pytorch_metric_learning.__version__}
    started_at = datetime.datetime.fromisoformat(meta["date"])
    all_rows = list(rows(device, ns, indexed_n, triplets, args.quick))
    annotate(all_rows)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    table = markdown(meta, all_rows)
    print(table)
    out_dir = "" if args.quick else (args.out_dir or str(ROOT / "benchmarks" / "results"))
    stem = out_dir and f"{out_dir}/integrations-{device}-{started_at:%Y%m%d-%H%M%S}"
    written = write_results(meta, all_rows, table, None, stem)
    log(f"done in {meta['elapsed_s']} s; wrote {', '.join(written) or 'no files'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
