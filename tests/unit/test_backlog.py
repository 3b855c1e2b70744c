"""Backlog mode's switch (with hysteresis) and the drain-time estimate."""

from __future__ import annotations

import math

from pipeline.backlog import Backlog, Policy
from pipeline.config import BacklogSettings

LIVE = Policy(64, 8192)


def test_enters_above_the_threshold_and_leaves_below_a_quarter():
    b = Backlog(BacklogSettings(enabled=True, lag_records=1000, max_batch=256, max_tokens=32768), LIVE)
    assert b.update(0.0, 500, 0) is None and not b.on
    assert b.update(1.0, 1500, 100) == Policy(256, 32768) and b.on
    assert b.update(2.0, 800, 800) is None and b.on, "between a quarter and the threshold: stays on"
    assert b.update(3.0, 240, 1400) == LIVE and not b.on
    assert b.update(4.0, 900, 1500) is None and not b.on, "below the threshold again: stays off"


def test_drain_estimate_is_lag_over_the_windowed_service_rate():
    b = Backlog(BacklogSettings(lag_records=10**9, rate_window_s=10.0), LIVE)
    b.update(0.0, 10_000, 0)
    assert math.isinf(b.seconds), "lag and nothing served yet: +Inf"
    for t in range(1, 21):  # 500 records/s
        b.update(float(t), 10_000 - 500 * t if t < 20 else 0, 500 * t)
    assert b.seconds == 0.0
    b.update(21.0, 4000, 10_500)
    assert abs(b.rate - 500.0) < 1e-9 and abs(b.seconds - 8.0) < 1e-9
    # the window forgets: a slower rate shows within rate_window_s
    for t in range(22, 40):
        b.update(float(t), 4000, 10_500 + 100 * (t - 21))
    assert abs(b.rate - 100.0) < 1e-9 and abs(b.seconds - 40.0) < 1e-9


def test_disabled_never_switches_but_still_estimates():
    b = Backlog(BacklogSettings(enabled=False, lag_records=10), LIVE)
    b.update(0.0, 0, 0)
    assert b.update(1.0, 1000, 50) is None and not b.on
    assert abs(b.seconds - 20.0) < 1e-9
