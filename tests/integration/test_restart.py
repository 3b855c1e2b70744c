"""A real worker process killed or stopped mid-stream loses nothing on restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import orjson
import pytest

from pipeline.events import encode_input
from producers.topics import committed, ensure_topics, produce, read_until

from .helpers import process_exit

pytestmark = pytest.mark.integration


def start_worker(kafka, names, artifact, **env_overrides) -> subprocess.Popen:
    env = {**os.environ, "STREAMLABEL_METRICS__PORT": "none", "STREAMLABEL_CACHE__REDIS_URL": "none",
           "STREAMLABEL_LOG__FORMAT": "json", "STREAMLABEL_KAFKA__SESSION_TIMEOUT_MS": "6000",
           "STREAMLABEL_BATCHING__MAX_BATCH": "16", **env_overrides}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--model", str(artifact), "--bootstrap", kafka.bootstrap,
         "--input", names.input, "--output", names.output, "--dlq", names.dlq, "--group", names.group],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def label_ids(records) -> list[str]:
    return [orjson.loads(r.value)["id"] for r in records]


async def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code; a process still running after ``timeout`` is killed and the wait fails."""
    code = await process_exit(proc, timeout)
    assert code is not None, f"the process did not exit within {timeout:g} s (killed)"
    return code


async def test_kill_after_publish_before_commit_loses_nothing(kafka, names, tiny_artifact):
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq])
    n = 200
    await produce(kafka.bootstrap, names.input, [encode_input(f"text {i}", id=f"e{i}") for i in range(n)])
    want = {f"e{i}" for i in range(n)}
    # Commits are held back (an hour apart): every output is published, no offset committed.
    w1 = start_worker(kafka, names, tiny_artifact, STREAMLABEL_WORKER__COMMIT_INTERVAL_MS="3600000")
    try:
        out = await read_until(kafka.bootstrap, [names.output], lambda r: want <= set(label_ids(r)), 120)
        assert want <= set(label_ids(out))
        before = await committed(kafka.bootstrap, names.group, names.input, 4)
        assert all(v is None for v in before.values()), f"nothing should be committed yet: {before}"
    finally:
        os.killpg(w1.pid, signal.SIGKILL)
        await wait_exit(w1, 30)
    w2 = start_worker(kafka, names, tiny_artifact)
    try:
        out = await read_until(kafka.bootstrap, [names.output], lambda r: len(r) >= 2 * n, 120)
        ids = label_ids(out)
        assert set(ids) == want and len(ids) == 2 * n, "every record re-read and re-labelled after the kill"
        ends = {p: o for p, o in (await _ends(kafka, names)).items()}
        for _ in range(100):
            got = await committed(kafka.bootstrap, names.group, names.input, 4)
            if all((got[p] or 0) == ends[p] for p in ends):
                break
            await asyncio.sleep(0.1)  # polling the broker's committed offsets
        assert all((got[p] or 0) == ends[p] for p in ends), (got, ends)
    finally:
        w2.send_signal(signal.SIGTERM)
        assert await wait_exit(w2, 60) == 0


async def _ends(kafka, names):
    from producers.topics import end_offsets

    return await end_offsets(kafka.bootstrap, names.input)


async def test_sigterm_mid_stream_commits_only_published_and_restart_loses_nothing(kafka, names, tiny_artifact):
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq])
    n = 3000
    metas = await produce(kafka.bootstrap, names.input, [encode_input(f"long enough text number {i} " * 3, id=f"e{i}")
                                                         for i in range(n)])
    where = {(m.partition, m.offset): f"e{i}" for i, m in enumerate(metas)}
    # Little in flight at a time, so the SIGTERM lands while most of the topic is still unread.
    w1 = start_worker(kafka, names, tiny_artifact, STREAMLABEL_WORKER__MAX_INFLIGHT="64",
                      STREAMLABEL_KAFKA__FETCH_MAX_RECORDS="32")
    out = await read_until(kafka.bootstrap, [names.output], lambda r: len(r) >= 300, 120)
    w1.send_signal(signal.SIGTERM)
    code = await wait_exit(w1, 60)
    log = w1.stdout.read().decode()
    assert code == 0, log[-2000:]
    assert "worker_stopped" in log
    out = await read_until(kafka.bootstrap, [names.output], lambda r: False, 3)
    published = set(label_ids(out))
    got = await committed(kafka.bootstrap, names.group, names.input, 4)
    assert any(v for v in got.values()), "the drain committed progress"
    for p, c in got.items():
        for off in range(c or 0):
            assert where[(p, off)] in published, f"offset {off} of partition {p} committed but never published"
    assert len(published) < n, "the stop came mid-stream"
    w2 = start_worker(kafka, names, tiny_artifact)
    try:
        want = {f"e{i}" for i in range(n)}
        out = await read_until(kafka.bootstrap, [names.output], lambda r: want <= set(label_ids(r)), 180)
        assert want <= set(label_ids(out))
    finally:
        w2.send_signal(signal.SIGTERM)
        assert await wait_exit(w2, 60) == 0


async def test_lag_after_a_restart_is_the_true_lag(kafka, names, tiny_artifact):
    """Everything committed, a new worker starts: lag 0 on every partition (it used to read the high watermark)."""
    import time

    from pipeline.engine import OnnxEngine
    from pipeline.events import encode_input
    from pipeline.metrics import Metrics
    from producers.topics import produce

    from .helpers import read_labels, running_worker, settings_for

    engine = OnnxEngine(tiny_artifact, provider="cpu")
    s = settings_for(kafka, names)
    async with running_worker(s, engine):
        await produce(kafka.bootstrap, names.input, [encode_input(f"lag {i}", id=f"l{i}") for i in range(80)])
        await read_labels(kafka.bootstrap, names.output, {f"l{i}" for i in range(80)})
    m = Metrics()
    async with running_worker(s, engine, metrics=m, name="w1") as w:
        deadline = time.monotonic() + 20
        lags = {}
        while time.monotonic() < deadline:
            lags = {p: m.registry.get_sample_value("streamlabel_consumer_lag", {"partition": str(p)}) for p in range(4)}
            if all(v is not None for v in lags.values()):
                break
            await asyncio.sleep(0.1)  # waiting for the lag loop's first pass, bounded
        assert lags == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, lags
        assert w.health.lag() == 0
    engine.close()
