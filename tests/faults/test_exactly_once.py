"""Exactly-once mode: Kafka transactions around consume → label → produce, proven by killing the worker."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import orjson
import pytest

from pipeline.engine import OnnxEngine
from pipeline.events import encode_input
from producers.topics import committed, end_offsets, ensure_topics, produce, read_until

from tests.integration.helpers import running_worker, settings_for
from tests.integration.test_restart import start_worker, wait_exit

pytestmark = pytest.mark.faults


def ids(records):
    return [orjson.loads(r.value)["id"] for r in records]


async def test_exactly_once_clean_run_commits_offsets_in_transactions(kafka, names, tiny_artifact):
    eng = OnnxEngine(tiny_artifact, provider="cpu")
    s = settings_for(kafka, names, worker={"delivery": "exactly_once"})
    try:
        async with running_worker(s, eng):
            bad = [b'{"text": 1}']
            await produce(kafka.bootstrap, names.input, [encode_input(f"t{i}", id=f"e{i}") for i in range(300)] + bad)
            out = await read_until(kafka.bootstrap, [names.output], lambda r: len(set(ids(r))) >= 300, 60,
                                   isolation_level="read_committed")
            dlq = await read_until(kafka.bootstrap, [names.dlq], lambda r: len(r) >= 1, 30, isolation_level="read_committed")
    finally:
        eng.close()
    assert sorted(ids(out)) == sorted(f"e{i}" for i in range(300))
    assert len(dlq) == 1
    ends = await end_offsets(kafka.bootstrap, names.input)
    got = await committed(kafka.bootstrap, names.group, names.input, 4)
    assert all((got[p] or 0) == ends[p] for p in ends), (got, ends)


async def test_exactly_once_kill9_mid_stream_no_loss_no_duplicates(kafka, names, tiny_artifact):
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq])
    n = 2000
    await produce(kafka.bootstrap, names.input, [encode_input(f"text number {i}", id=f"e{i}") for i in range(n)],
                  keys=[f"k{i % 50}".encode() for i in range(n)])
    eos = {"STREAMLABEL_WORKER__DELIVERY": "exactly_once", "STREAMLABEL_WORKER__MAX_INFLIGHT": "64",
           "STREAMLABEL_KAFKA__FETCH_MAX_RECORDS": "32"}
    w1 = start_worker(kafka, names, tiny_artifact, **eos)
    try:
        seen = await read_until(kafka.bootstrap, [names.output], lambda r: len(r) >= 300, 120,
                                isolation_level="read_committed")
        assert len(seen) >= 300
    finally:
        os.killpg(w1.pid, signal.SIGKILL)
        await wait_exit(w1, 30)
    w2 = start_worker(kafka, names, tiny_artifact, **eos)
    try:
        want = {f"e{i}" for i in range(n)}
        out = await read_until(kafka.bootstrap, [names.output], lambda r: want <= set(ids(r)), 180,
                               isolation_level="read_committed")
        # read on a little: a duplicate committed later would show up now
        out = await read_until(kafka.bootstrap, [names.output], lambda r: False, 3, isolation_level="read_committed")
    finally:
        w2.send_signal(signal.SIGTERM)
        assert await wait_exit(w2, 60) == 0
    counts = Counter(ids(out))
    assert set(counts) == want, f"lost: {len(want - set(counts))}"
    assert max(counts.values()) == 1, f"duplicates: {sum(c - 1 for c in counts.values())}"
    # per-key order in the committed output
    last: dict[bytes, int] = {}
    for r in sorted(out, key=lambda r: (r.partition, r.offset)):
        i = int(orjson.loads(r.value)["id"][1:])
        assert last.get(r.key, -1) < i, "per-key order broken"
        last[r.key] = i
    raw = await read_until(kafka.bootstrap, [names.output], lambda r: False, 3)
    print(f"EOS kill -9: produced {n}, committed labels {len(out)}, duplicates 0, "
          f"records in aborted transactions (visible to read_uncommitted) {len(raw) - len(out)}")
