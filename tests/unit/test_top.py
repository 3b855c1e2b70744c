"""`streamlabel top` against a real /metrics endpoint (a worker's registry, served over HTTP)."""

from __future__ import annotations

import subprocess
import sys

from pipeline.cli.local_services import free_port
from pipeline.cli.top import quantile, row, scrape
from pipeline.metrics import Metrics


def served():
    m = Metrics()
    port = free_port()
    server, _ = m.serve(port)
    return m, server, f"http://127.0.0.1:{port}/metrics"


def test_rates_and_percentiles_over_the_interval():
    m, server, url = served()
    try:
        m.events.labels("labelled").inc(100)
        before = scrape(url)
        m.events.labels("labelled").inc(50)
        m.events.labels("dlq").inc(5)
        for _ in range(98):
            m.e2e.observe(0.02)
        for _ in range(2):
            m.e2e.observe(0.4)
        m.cache.labels("redis", "hit").inc(3)
        m.cache.labels("redis", "miss").inc(1)
        m.lag.labels("0").set(7)
        m.lag.labels("1").set(5)
        after = scrape(url)
    finally:
        server.shutdown()
    r = row(url, before, after, 2.0, 100.0)
    assert r["rate"] == 25.0 and r["dlq_rate"] == 2.5 and r["lag"] == 12 and r["cache_hit"] == 0.75
    assert 15 <= r["p50_ms"] <= 25 and 250 <= r["p99_ms"] <= 500
    assert quantile(before, before, "streamlabel_e2e_latency_seconds", 0.99) is None, "no events in the interval"


def test_top_once_prints_a_frame_and_marks_a_dead_worker():
    m, server, url = served()
    dead = f"127.0.0.1:{free_port()}"
    try:
        m.events.labels("labelled").inc(10)
        p = subprocess.run([sys.executable, "-m", "pipeline.cli", "top", url, dead, "--once", "--interval", "0.2"],
                           capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})
    finally:
        server.shutdown()
    assert p.returncode == 0, p.stderr
    assert "streamlabel top" in p.stdout and url in p.stdout and "down" in p.stdout
