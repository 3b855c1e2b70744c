"""Backlog mode and the drain-time estimate (``[backlog]``; docs/operations/deploy.md).

After an outage or a deploy the lag is large and every record is already past its deadline: the latency
policy (small batches that leave at once) only costs throughput then. ``Backlog`` watches the worker's lag once a
second; above ``lag_records`` it switches the batcher to throughput settings (``max_batch``, ``max_tokens``) and
back once the lag is below a quarter of that (hysteresis: no flapping at the threshold).

``seconds``: the estimated time to drain, lag ÷ the service rate over the last ``rate_window_s`` (records
answered or dead-lettered per second); ``inf`` while there is lag and nothing is served. Exported as
``streamlabel_backlog_seconds`` for an autoscaler (deploy/k8s/keda.yaml), beside ``streamlabel_backlog_mode``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from pipeline.config import BacklogSettings


@dataclass(frozen=True)
class Policy:
    max_batch: int
    max_tokens: int


class Backlog:
    def __init__(self, b: BacklogSettings, live: Policy) -> None:
        self.enabled = b.enabled
        self.enter = b.lag_records
        self.leave = max(1, b.lag_records // 4)
        self.live = live
        self.drain = Policy(max(live.max_batch, b.max_batch), max(live.max_tokens, b.max_tokens))
        self.window_s = b.rate_window_s
        self.on = False
        self.switches = 0
        self.seconds = 0.0
        self.rate = 0.0
        self._served: deque[tuple[float, int]] = deque()

    def update(self, now: float, lag: int, served: int) -> Policy | None:
        """One look (``served``: records answered or dead-lettered so far). Returns the policy to apply when the
        mode changes, else None."""
        q = self._served
        q.append((now, served))
        while len(q) > 2 and q[1][0] <= now - self.window_s:
            q.popleft()
        span = now - q[0][0]
        self.rate = (served - q[0][1]) / span if span > 0 else 0.0
        if lag <= 0:
            self.seconds = 0.0
        else:
            self.seconds = lag / self.rate if self.rate > 0 else math.inf
        if not self.enabled:
            return None
        if not self.on and lag > self.enter:
            self.on = True
            self.switches += 1
            return self.drain
        if self.on and lag < self.leave:
            self.on = False
            self.switches += 1
            return self.live
        return None
