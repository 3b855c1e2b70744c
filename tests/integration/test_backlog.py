"""Backlog mode through a real broker: a worker started behind a backlog switches to throughput batching, drains
it, switches back, and exports the drain-time estimate."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.events import encode_input
from pipeline.metrics import Metrics
from producers.rate import producer_for_load
from producers.topics import ensure_topics

from .helpers import running_worker, settings_for

pytestmark = pytest.mark.integration


async def test_backlog_mode_on_while_draining_then_off(kafka, names, engine):
    n = 40_000
    await ensure_topics(kafka.bootstrap, [names.input], partitions=4)
    p = producer_for_load(kafka.bootstrap)
    await p.start()
    try:
        sends = [await p.send(names.input, encode_input(f"backlog text {i % 500}", id=f"b{i}"), key=str(i % 40).encode())
                 for i in range(n)]
        await asyncio.gather(*sends)
    finally:
        await p.stop()
    metrics = Metrics()
    # 40,000 records and a small in-flight bound: the drain lasts several lag samples (one a second; ~4 s here).
    s = settings_for(kafka, names, backlog={"enabled": True, "lag_records": 1000, "max_batch": 128},
                     batching={"max_batch": 16}, worker={"max_inflight": 256, "commit_interval_ms": 100})
    async with running_worker(s, engine, metrics=metrics) as w:
        estimates = []
        end = asyncio.get_running_loop().time() + 120
        while not (w.labelled >= n and w.backlog.switches >= 2):
            assert asyncio.get_running_loop().time() < end, f"labelled {w.labelled}, switches {w.backlog.switches}"
            if w.backlog.on:
                assert w.batcher.max_batch == 128, "draining: the throughput policy"
                estimates.append(metrics.backlog_seconds._value.get())
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        assert not w.backlog.on and w.batcher.max_batch == 16, "caught up: back to the latency policy"
        assert metrics.backlog_mode._value.get() == 0 and w.dead_lettered == 0
    assert w.backlog.switches == 2
    assert estimates and all(e > 0 for e in estimates), "a drain-time estimate while there was lag"
