"""Shim: `python benchmarks/bench_mining.py ...` runs tripletloss_cuda.bench_mining (see its docstring)."""

import sys

from tripletloss_cuda.bench_mining import main

if __name__ == "__main__":
    sys.exit(main())
