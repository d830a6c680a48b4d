"""``python -m eep.rank``: the slot supervisor (what torchrun starts, one per slot)."""

import sys

from eep.rank.cli import main

sys.exit(main())
