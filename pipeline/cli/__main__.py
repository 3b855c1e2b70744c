"""``python -m pipeline.cli …``: the same as the ``streamlabel`` console script (tests and the load harness use it)."""

from pipeline.cli import entry

entry()
