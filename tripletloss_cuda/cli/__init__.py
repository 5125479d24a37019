"""The `tripletloss-cuda` command (also `python -m tripletloss_cuda`).

    tripletloss-cuda info            versions, compiled kernels (CPU, CUDA and its architectures), the device that runs
    tripletloss-cuda check           verify an installation: gradcheck, values and gradients vs PyTorch and the reference
    tripletloss-cuda bench [...]     the benchmark (bench --help); bench --mining: the mining benchmark;
                                     bench --integrations: the drop-ins against pytorch-metric-learning
    tripletloss-cuda demo [...]      train a small embedding network on scikit-learn's digits (demo --help)

Bad arguments give a one-line error and exit status 2; a failure while running gives a one-line error and
exit status 1 (TRIPLETLOSS_CUDA_TRACEBACK=1 shows the traceback instead); `check` exits 1 when a check fails.
The command modules (check, bench, bench_mining, bench_integrations, demo) sit beside this one and are imported only when
their command runs; this package imports only the standard library at the top, so that argument errors are quick.
"""

import argparse
import importlib
import json
import os
import sys

from .args import ArgumentParser

PROG = "tripletloss-cuda"
# command: (module, function, one-line help)
COMMANDS = {
    "info": ("tripletloss_cuda.cli", "info_main", "versions, compiled kernels and the device that will run"),
    "check": (
        "tripletloss_cuda.cli.check",
        "main",
        "verify the installation on every device and dtype (exit 1 on failure)",
    ),
    "bench": (
        "tripletloss_cuda.cli.bench",
        "main",
        "benchmark against PyTorch (--mining: the mining losses, when built)",
    ),
    "demo": ("tripletloss_cuda.cli.demo", "main", "train an embedding network on scikit-learn's digits"),
}


def _format_info(info):
    kernels = ", ".join(info["kernels"]) or "none (everything runs through the PyTorch reference)"
    lines = [
        f"tripletloss_cuda   {info['version']} (Python {info['python']})",
        f"torch              {info['torch']} (extension built with {info['built_with_torch'] or 'n/a'})",
        f"compiled kernels   {kernels}",
        f"CUDA architectures {info['cuda_architectures'] or 'none'}",
        f"CPU capability     {info['cpu_capability']} (what torch dispatches to on this CPU)",
        f"CUDA available     {info['cuda_available']}" + (f" ({info['cuda_device']})" if info["cuda_device"] else ""),
        f"device that runs   {info['default_device']}",
        f"mining kernels     {', '.join(info['mining_kernels']) or 'none (the PyTorch reference runs)'}",
    ]
    if info["extension_error"]:
        lines.append(f"extension error    {info['extension_error']}")
    return "\n".join(lines)


def info_main(argv=None):
    parser = ArgumentParser(prog=f"{PROG} info", description="What is compiled and what will run.")
    parser.add_argument("--json", action="store_true", help="print the information as JSON")
    args = parser.parse_args(argv)
    import torch

    import tripletloss_cuda as tl

    info = dict(tl.info(), python=sys.version.split()[0])
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(json.dumps(info, indent=1) if args.json else _format_info(info))
    return 0


def _bench_mining(argv):
    return importlib.import_module("tripletloss_cuda.cli.bench_mining").main(argv)


def _bench_integrations(argv):
    return importlib.import_module("tripletloss_cuda.cli.bench_integrations").main(argv)


def _parser():
    parser = ArgumentParser(
        prog=PROG,
        description="Fused triplet margin loss for PyTorch: information, verification, benchmark and demo.",
        epilog="Run `tripletloss-cuda COMMAND --help` for a command's options.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    parser.usage = f"{PROG} {{{','.join(COMMANDS)}}} [ARGS...]"
    parser.description += "\n" + "\n".join(f"  {name:6} {help_}" for name, (_, _, help_) in COMMANDS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv=None):
    """Entry point of the `tripletloss-cuda` script: returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:
        parser.error(f"a COMMAND is required: {', '.join(COMMANDS)}")
    args = parser.parse_args(argv[:1])  # only the command (or --help): the command's own parser reads the rest
    rest = argv[1:]
    try:
        if args.command == "bench" and "--mining" in rest:
            return _bench_mining([a for a in rest if a != "--mining"])
        if args.command == "bench" and "--integrations" in rest:
            return _bench_integrations([a for a in rest if a != "--integrations"])
        module, function, _ = COMMANDS[args.command]
        return getattr(importlib.import_module(module), function)(rest) or 0
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a one-line message, not a traceback
        if os.environ.get("TRIPLETLOSS_CUDA_TRACEBACK"):
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"{PROG} {args.command}: error: {type(err).__name__}: {first_line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
