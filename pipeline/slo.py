"""``SloTracker``: per-stage and end-to-end latency in HDR histograms, the objective, goodput and burn rates."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

STAGES = ("queue", "batch_wait", "tokenize", "infer", "cache", "publish")
WINDOWS = {"1m": 60, "5m": 300, "1h": 3600}
_MAX_US = 3_600_000_000  # an hour, in microseconds


def _hist() -> HdrHistogram:
    return HdrHistogram(1, _MAX_US, 3)


@dataclass(frozen=True)
class SloSnapshot:
    count: int
    good: int
    goodput: float  # share of events within the objective, since start
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    burn_rates: dict[str, float]  # window → error-budget burn rate (1.0 = spending exactly the budget)
    rate_per_s: float  # events per second over the last minute


class SloTracker:
    """Thread-safe. ``objective_ms`` and ``target``: e.g. 99% of events within 100 ms."""

    def __init__(self, objective_ms: float = 100.0, target: float = 0.99, clock=time.monotonic) -> None:
        self.objective_ms = objective_ms
        self.target = target
        self._clock = clock
        self._lock = threading.Lock()
        self.e2e = _hist()
        self.stages = {s: _hist() for s in STAGES}
        self._good = 0
        self._count = 0
        self._seconds: deque[list[int]] = deque()  # [second, good, total], newest last, at most an hour
        self._start = clock()
        self.observer = None  # (stage, seconds) → None, called per record_stage

    def record_stage(self, stage: str, seconds: float, count: int = 1) -> None:
        """``count`` events spent ``seconds`` each in ``stage`` (one call per batch, not per event)."""
        with self._lock:
            self.stages[stage].record_value(max(1, min(int(seconds * 1e6), _MAX_US)), count)
        if self.observer is not None:  # e.g. streamlabel_stage_seconds: one observation per batch
            self.observer(stage, seconds)

    def record_e2e(self, ms: float) -> bool:
        """Record one event's end-to-end latency; returns whether it met the objective."""
        self.record_e2e_many([ms])
        return ms <= self.objective_ms

    def record_e2e_many(self, values_ms: list[float]) -> None:
        """Record a batch of end-to-end latencies at once (one lock, one time bucket)."""
        if not values_ms:
            return
        objective = self.objective_ms
        good = 0
        # Latencies of one batch repeat (milliseconds, one clock reading): one HDR call per distinct value.
        counts: dict[int, int] = {}
        for ms in values_ms:
            if ms <= objective:
                good += 1
            us = max(1, min(int(ms * 1000), _MAX_US))
            counts[us] = counts.get(us, 0) + 1
        now = int(self._clock())
        with self._lock:
            rec = self.e2e.record_value
            for us, n in counts.items():
                rec(us, n)
            self._count += len(values_ms)
            self._good += good
            if self._seconds and self._seconds[-1][0] == now:
                b = self._seconds[-1]
            else:
                b = [now, 0, 0]
                self._seconds.append(b)
                while self._seconds and self._seconds[0][0] <= now - WINDOWS["1h"]:
                    self._seconds.popleft()
            b[1] += good
            b[2] += len(values_ms)

    def burn_rate(self, window_s: int) -> float:
        now = int(self._clock())
        with self._lock:
            good = total = 0
            for sec, g, t in reversed(self._seconds):
                if sec <= now - window_s:
                    break
                good += g
                total += t
        if not total:
            return 0.0
        return ((total - good) / total) / (1.0 - self.target)

    def snapshot(self) -> SloSnapshot:
        burns = {name: self.burn_rate(w) for name, w in WINDOWS.items()}
        now = int(self._clock())
        with self._lock:
            h = self.e2e
            last_min = sum(t for sec, _, t in self._seconds if sec > now - 60)
            span = min(60.0, max(1.0, self._clock() - self._start))

            def q(p: float) -> float:
                return h.get_value_at_percentile(p) / 1000.0 if self._count else 0.0

            return SloSnapshot(
                count=self._count, good=self._good, goodput=(self._good / self._count) if self._count else 1.0,
                p50_ms=q(50), p95_ms=q(95), p99_ms=q(99), p999_ms=q(99.9),
                max_ms=(h.get_max_value() / 1000.0) if self._count else 0.0,
                burn_rates=burns, rate_per_s=last_min / span,
            )

    def stage_percentile_ms(self, stage: str, p: float) -> float:
        with self._lock:
            h = self.stages[stage]
            return h.get_value_at_percentile(p) / 1000.0 if h.get_total_count() else 0.0
