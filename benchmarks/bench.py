"""Shim: the benchmark program lives in the package (tripletloss_cuda/cli/bench.py) so that the installed
`tripletloss-cuda bench` command has it. `python benchmarks/bench.py ARGS` still works from a checkout."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A checkout with an in-place build, unless tripletloss_cuda is installed (then that one runs).
if str(ROOT) not in sys.path and importlib.util.find_spec("tripletloss_cuda") is None:
    sys.path.insert(0, str(ROOT))

from tripletloss_cuda.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
