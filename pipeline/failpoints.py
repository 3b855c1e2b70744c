"""Failpoints: named places in the data path where a fault test can kill the process on the Nth pass.

Armed only by configuration (``worker.failpoint = "after_inference:200"``); unarmed, ``hit`` is a dict
lookup. Points: ``after_poll`` (records taken, nothing done), ``after_inference`` (labels computed, nothing
published), ``after_publish`` (outputs acknowledged, offsets not committed), ``in_transaction`` (exactly-once:
outputs sent inside an open transaction).
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_poll", "after_inference", "after_publish", "in_transaction")


class Failpoints:
    def __init__(self, spec: str | None) -> None:
        self.armed: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            name, _, n = part.strip().partition(":")
            if name not in POINTS:
                raise ValueError(f"unknown failpoint {name!r}; points are {', '.join(POINTS)}")
            self.armed[name] = int(n or 1)

    def hit(self, name: str) -> None:
        if name in self.armed:
            self.hits[name] = self.hits.get(name, 0) + 1
            if self.hits[name] >= self.armed[name]:
                os.kill(os.getpid(), signal.SIGKILL)
