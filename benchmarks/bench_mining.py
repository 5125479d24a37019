"""Shim: `python benchmarks/bench_mining.py ...` runs tripletloss_cuda.cli.bench_mining (see its docstring)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # a checkout with an in-place build

from tripletloss_cuda.cli.bench_mining import main

if __name__ == "__main__":
    sys.exit(main())
