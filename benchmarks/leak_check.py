"""Memory over many training steps: process RSS (and CUDA allocated memory on a GPU) must stay flat.

    python benchmarks/leak_check.py                        # 10,000 steps on CPU
    python benchmarks/leak_check.py --device cuda --steps 10000 --json leak_cuda.json

Each step runs forward + backward of tl.triplet_margin_loss in float32, the module with swap, bfloat16 under
autocast, and every 10th step torch.func.grad. RSS is sampled after a warm-up (allocator caches, the CPU
gradient buffer cache of csrc/cpu/triplet_kernel.cpp, which keeps up to TRIPLETLOSS_GRAD_CACHE_MB of freed
large buffers by design) and then every --every steps; the report gives the growth after the warm-up.
"""

import argparse
import gc
import json
import os
import time

import torch
from torch.func import grad

import tripletloss_cuda as tl


def rss_mib():
    """Resident set size of this process in MiB (from /proc: no psutil needed on the GPU machine)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def training_step(inputs, module, device, i):
    """One step of everything that allocates: forward + backward of the functional, the module and the
    bfloat16 autocast path, and every 10th step torch.func.grad; the gradients are then dropped."""
    a, p, n = inputs
    tl.triplet_margin_loss(a, p, n).backward()
    module(a, p, n).backward()
    with torch.autocast(device, dtype=torch.bfloat16):
        tl.triplet_margin_loss(a, p, n, reduction="none").sum().backward()
    if i % 10 == 0:
        grad(tl.triplet_margin_loss)(a.detach(), p.detach(), n.detach())
    for x in (a, p, n):
        x.grad = None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--json", help="write the samples and the summary here")
    args = parser.parse_args(argv)

    device = args.device
    gen = torch.Generator().manual_seed(0)
    inputs = [
        [torch.randn(args.rows, args.dim, generator=gen).to(dtype).to(device).requires_grad_() for _ in range(3)]
        for dtype in (torch.float32, torch.bfloat16)
    ]
    module = tl.TripletMarginLoss(swap=True, reduction="sum")

    def step(i):
        training_step(inputs[i % 2], module, device, i)

    def sample(i):
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        cuda = torch.cuda.memory_allocated() if device.startswith("cuda") else None
        return {"step": i, "rss_mib": rss_mib(), "cuda_allocated_mib": cuda and cuda / 2**20}

    for i in range(args.warmup):
        step(i)
    samples = [sample(0)]
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(i)
        if i % args.every == 0 or i == args.steps:
            samples.append(sample(i))
            s = samples[-1]
            print(
                f"step {i:6d}: RSS {s['rss_mib']:8.1f} MiB"
                + (
                    f", CUDA allocated {s['cuda_allocated_mib']:.1f} MiB" if s["cuda_allocated_mib"] is not None else ""
                ),
                flush=True,
            )
    summary = {
        "device": device,
        "steps": args.steps,
        "shape": [args.rows, args.dim],
        "seconds": round(time.perf_counter() - t0, 1),
        "rss_growth_mib": round(samples[-1]["rss_mib"] - samples[0]["rss_mib"], 2),
        "rss_max_minus_min_mib": round(max(s["rss_mib"] for s in samples) - min(s["rss_mib"] for s in samples), 2),
    }
    if device.startswith("cuda"):
        summary["cuda_allocated_growth_mib"] = samples[-1]["cuda_allocated_mib"] - samples[0]["cuda_allocated_mib"]
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "samples": samples}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
