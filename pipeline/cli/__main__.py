"""``python -m pipeline.cli …``: the same as the ``streamlabel`` console script (tests and the load harness use it)."""

import sys

from pipeline.cli import main

sys.exit(main())
