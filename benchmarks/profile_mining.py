"""Where the time of a mining loss goes (issue 18): forward + backward of each loss on the CPU, split by
torch.profiler into the matrix products (GEMM), the mining ops, and everything else (the distance epilogue,
the gradient's elementwise passes, allocation), each for the forward and for the backward, next to
torch.cdist(x, x).sum().backward() on the same rows.

    python benchmarks/profile_mining.py --n 2048,8192 --threads 2

Inputs as `tripletloss-cuda bench --mining`: float32 Gaussian (N, D = 128), 32 per class, margin 0.2,
normalized Euclidean. Each case: a warm-up call, then `--calls` profiled calls; times are per call (the sum
of the self CPU time of the ops in each group, so a group's time excludes the ops it calls). The totals are
wall-clock medians of separate, unprofiled calls.
"""

import argparse
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

import tripletloss_cuda as tl

LOSSES = ("batch_hard", "batch_all", "semi_hard")
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm")


def inputs(n, d=128, per_class=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).requires_grad_()
    labels = (torch.arange(n) // per_class)[torch.randperm(n, generator=g)]
    return x, labels


def call_of(loss, x, labels):
    if loss == "cdist":
        return lambda: torch.autograd.grad(torch.cdist(x, x).sum(), x)
    fn = getattr(tl, f"{loss}_triplet_loss")
    return lambda: torch.autograd.grad(fn(x, labels, margin=0.2, normalize=True), x)


def median_time(f, calls):
    f()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def group(name):
    if name in GEMM:
        return "gemm"
    if name.startswith("tripletloss_cuda::"):
        # The fused ops (tripletloss_cuda::*_gram*) read the product's block: their time is the distance epilogue's
        # and the mining's; mined_gram_backward (and the indexed op before it) send the mined triplets' gradients.
        return "sparse grad" if "indexed" in name or "mined_gram_backward" in name else "mining"
    return "other"


def split(f, calls):
    """{(phase, group): seconds per call}: phase forward / backward (ops under autograd's engine)."""
    f()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            f()
    events = prof.events()
    # Backward: every op that runs inside an autograd engine evaluate_function (or a Function's backward).
    back = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")]
    spans = sorted((e.time_range.start, e.time_range.end) for e in back)
    out = {}
    for e in events:
        if e.name.startswith("autograd::engine") or e.name.startswith("ProfilerStep"):
            continue
        start = e.time_range.start
        phase = "backward" if any(s <= start < t for s, t in spans) else "forward"
        key = (phase, group(e.name))
        out[key] = out.get(key, 0.0) + e.self_cpu_time_total / 1e6 / calls
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="2048,8192")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--losses", default=",".join(LOSSES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cols = [(p, g) for p in ("forward", "backward") for g in ("gemm", "mining", "sparse grad", "other")]
    print("| loss | N | total | cdist | ratio | " + " | ".join(f"{p} {g}" for p, g in cols) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(cols))
    for n in (int(v) for v in args.n.split(",")):
        x, labels = inputs(n)
        cdist = median_time(call_of("cdist", x, labels), args.calls)
        for loss in args.losses.split(","):
            f = call_of(loss, x, labels)
            total = median_time(f, args.calls)
            parts = split(f, args.calls)
            cells = [f"{parts.get(c, 0.0) * 1e3:.1f}" for c in cols]
            print(
                f"| {loss} | {n} | {total * 1e3:.1f} ms | {cdist * 1e3:.1f} ms | {total / cdist:.2f} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
