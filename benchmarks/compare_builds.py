"""Two builds of tripletloss_cuda side by side: the same `tripletloss-cuda bench` rows run under each tree in
turn, for several rounds in one run (these machines are shared and noisy), then each row's best median per
build and the ratio after / before. PyTorch's own rows (impl torch) are timed in the same processes, so their
ratio shows how much the machine drifted between the two builds' turns.

    python benchmarks/compare_builds.py BEFORE_TREE AFTER_TREE [--rounds 3] [--json FILE] [-- BENCH ARGS]

Each tree is a checkout with its own in-place build (PYTHONPATH=tree). Default bench arguments: per-call
fwd+bwd in float32 at 4x4, 128x128 and 16384x512, tripletloss_cuda and F.triplet_margin_loss.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

DEFAULT_BENCH = ["--shapes", "4x4,128x128,16384x512", "--dtypes", "float32", "--modes", "fwdbwd"]
DEFAULT_BENCH += ["--impls", "torch,tl"]


def run_bench(tree, bench_args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "tripletloss_cuda", "bench", "--no-progress", "--out-dir", "", "--json", out]
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
        subprocess.run(cmd + bench_args, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def key(row):
    return (row["impl"], row["dtype"], f"{row['n']}x{row['d']}", row["mode"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write every round's rows here")
    args, bench_args = parser.parse_known_args(argv)
    bench_args = [a for a in bench_args if a != "--"] or DEFAULT_BENCH
    best, rounds = {}, []
    for r in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            result = run_bench(tree, bench_args)
            rounds.append({"round": r, "build": name, "meta": result["meta"], "rows": result["rows"]})
            for row in result["rows"]:
                if row["status"] == "ok":
                    slot = best.setdefault(key(row), {})
                    slot[name] = min(slot.get(name, float("inf")), row["median_s"])
            print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    print("| impl | dtype | shape | mode | before | after | after / before |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: |")
    for (impl, dtype, shape, mode), t in sorted(best.items(), key=lambda kv: (kv[0][0] != "tl", kv[0])):
        if {"before", "after"} <= t.keys():
            b, a = t["before"], t["after"]
            print(f"| {impl} | {dtype} | {shape} | {mode} | {b * 1e6:.1f} µs | {a * 1e6:.1f} µs | {a / b:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": args.before, "after": args.after, "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
