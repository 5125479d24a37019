"""Argument parsing shared by the commands: one-line errors, and the message for a missing optional package."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2: `tripletloss-cuda bench: error: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def missing(package, what):
    """The one-line error for an optional package that is not installed (they are imported lazily)."""
    return RuntimeError(f"{what} needs {package}: pip install {package} (or pip install 'tripletloss_cuda[demo]')")
