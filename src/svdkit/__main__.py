"""``python -m svdkit``: the command line (what ``torchrun ... -m svdkit compress`` launches)."""

import sys

from .cli import main

sys.exit(main())
