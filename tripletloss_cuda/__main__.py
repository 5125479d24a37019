"""`python -m tripletloss_cuda COMMAND ...`: the same as the `tripletloss-cuda` script (see cli/__init__.py)."""

import sys

from .cli import main

sys.exit(main())
