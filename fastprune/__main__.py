"""``python -m fastprune`` (and ``torchrun -m fastprune``): the command line."""

import sys

from fastprune.cli import main

sys.exit(main())
