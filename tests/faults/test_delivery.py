"""The delivery protocol under faults on the real broker: exactly-once through rebalances, a failed (not
killed) transaction, a zombie handler past its revoke deadline, bounded memory over 200,000 records, a
stuck and a broken engine, a broker outage logged once each way, and topic checks at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import orjson
import psutil
import pytest

from pipeline.events import encode_input
from producers.topics import committed, end_offsets, ensure_topics, produce, read_until, topic_names

from tests.integration.helpers import process_exit

from .scenario import Ctx, run_scenario, wait_for

pytestmark = pytest.mark.faults

EOS = "exactly_once"


class Lines:
    """Collects a child's stderr lines in a thread (a full pipe would block the child)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._t.start()

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def events(self, name: str) -> list[dict]:
        out = []
        for ln in self.lines:
            if f'"{name}"' in ln:
                try:
                    out.append(orjson.loads(ln))
                except orjson.JSONDecodeError:
                    pass
        return [e for e in out if e.get("event") == name]

    def text(self) -> str:
        return "\n".join(self.lines)


def spawn(bootstrap: str, artifact, topics: tuple[str, str, str], group: str, **env) -> subprocess.Popen:
    full = {**os.environ, "STREAMLABEL_METRICS__PORT": "none", "STREAMLABEL_CACHE__REDIS_URL": "none",
            "STREAMLABEL_LOG__FORMAT": "json", "STREAMLABEL_KAFKA__SESSION_TIMEOUT_MS": "6000", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--model", str(artifact), "--bootstrap", bootstrap,
         "--input", topics[0], "--output", topics[1], "--dlq", topics[2], "--group", group],
        env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


exited = process_exit  # the exit code, or None when the process had to be killed


def new_topics() -> tuple[tuple[str, str, str], str]:
    tag = uuid.uuid4().hex[:8]
    return (f"d-in-{tag}", f"d-out-{tag}", f"d-dlq-{tag}"), f"d-{tag}"


# ---------------------------------------------------------------------------------------------- exactly-once
async def test_exactly_once_three_workers_join_and_leave_under_load(kafka, tiny_artifact):
    """2nd and 3rd workers join, then leave, twice, under open-loop load; read_committed output is exact."""

    async def inject(ctx: Ctx) -> None:
        from pipeline.events import now_ms

        for _ in range(2):
            extra = [ctx.start_worker(), ctx.start_worker()]
            for w in extra:
                await ctx.ready(w)
            for w in extra:
                await asyncio.to_thread(w.stop)
        ctx.fault_end_ms = now_ms()

    rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault="EOS: 3 workers join/leave ×2",
                             delivery=EOS, inject=inject, seconds=24, fault_after=0.1, rate=150)
    assert rep.lost == 0
    assert rep.duplicated == 0
    assert rep.order_violations == 0


async def test_exactly_once_failed_transaction_aborts_and_loses_nothing(kafka, tiny_artifact):
    """A transaction commit fails (not a kill): aborted, partition latched, worker rebuilt, nothing lost."""
    seen: dict = {}

    async def inject(ctx: Ctx) -> None:
        seen["ctx"] = ctx
        seen["log"] = Lines(ctx.workers[0].proc.stderr)
        await wait_for(lambda: seen["log"].events("worker_failed"), 60, "the injected transaction failure")

    rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault="EOS: a transaction fails mid-run",
                             delivery=EOS, inject=inject, fault_after=0.1,
                             first_worker_env={"STREAMLABEL_WORKER__FAILPOINT": "txn_fail:60",
                                               "STREAMLABEL_LOG__LEVEL": "info"})
    assert rep.lost == 0 and rep.duplicated == 0 and rep.order_violations == 0
    failed = seen["log"].events("worker_failed")
    assert failed and "aborted" in failed[0]["error"], failed
    assert seen["ctx"].workers[0].proc.returncode == 0, "rebuilt in-process, then stopped normally"


async def test_exactly_once_zombie_handler_never_produces_after_revocation(kafka, tiny_artifact):
    """A handler ignores its cancellation at the revoke deadline and tries to publish much later: refused."""
    logs: dict = {}

    async def inject(ctx: Ctx) -> None:
        log = logs["w0"] = Lines(ctx.workers[0].proc.stderr)
        w = ctx.start_worker()
        await ctx.ready(w)  # the join revokes the first worker's partitions (deadline 2 s)
        await wait_for(lambda: log.events("revoke_deadline"), 60, "the revoke deadline passing the stuck handler")
        await wait_for(lambda: log.events("publish_refused"), 60, "the zombie trying to publish")

    rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault="EOS: zombie handler past revoke deadline",
                             delivery=EOS, inject=inject, fault_after=0.2,
                             env={"STREAMLABEL_WORKER__DRAIN_TIMEOUT_S": "2"},
                             first_worker_env={"STREAMLABEL_WORKER__FAILPOINT": "handler_stall:20",
                                               "STREAMLABEL_LOG__LEVEL": "info"})
    assert rep.lost == 0 and rep.duplicated == 0
    refused = logs["w0"].events("publish_refused")
    assert refused and refused[0]["state"] == "revoked", refused
    print(f"zombie: refused {refused[0]['offsets']} of partition {refused[0]['partition']} after revocation")


async def test_exactly_once_memory_bounded_over_200k_records(kafka, tiny_artifact):
    """RSS after 200,000 exactly-once records stays within a small margin of RSS after the first 40,000."""
    topics, group = new_topics()
    await ensure_topics(kafka.bootstrap, list(topics))
    n, chunk = 200_000, 20_000
    for start in range(0, n, chunk):
        await produce(kafka.bootstrap, topics[0], [encode_input(f"memory text {i % 5000} n{i}", id=f"m{i}")
                                                   for i in range(start, start + chunk)],
                      keys=[f"k{i % 97}".encode() for i in range(start, start + chunk)])
    # The in-process answer cache is an LRU bounded by cache.local_size (100,000 by default); a small one keeps
    # it from filling during the run, so what is measured is the worker's own bookkeeping.
    proc = spawn(kafka.bootstrap, tiny_artifact, topics, group, STREAMLABEL_WORKER__DELIVERY=EOS,
                 STREAMLABEL_LOG__LEVEL="warning", STREAMLABEL_CACHE__LOCAL_SIZE="1000")
    log = Lines(proc.stderr)
    samples: list[tuple[int, float]] = []
    try:
        ps = psutil.Process(proc.pid)
        t0 = time.monotonic()
        while True:
            got = await committed(kafka.bootstrap, group, topics[0], 4)
            done = sum(v or 0 for v in got.values())
            samples.append((done, ps.memory_info().rss / 1e6))
            if done >= n:
                break
            assert proc.poll() is None, log.text()[-2000:]
            assert time.monotonic() - t0 < 400, f"only {done} of {n} committed"
            await asyncio.sleep(1.0)  # sampling the worker's RSS and the group's committed offsets
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await exited(proc, 60) == 0
    base = next(rss for done, rss in samples if done >= 40_000)
    peak_late = max(rss for done, rss in samples if done >= 40_000)
    rate = n / (time.monotonic() - t0)
    print(f"EOS memory: RSS {base:.0f} MB after 40k records, peak {peak_late:.0f} MB up to {n}, "
          f"final {samples[-1][1]:.0f} MB; ~{rate:.0f} records/s committed")
    assert peak_late - base < 25, samples


# ---------------------------------------------------------------------------------------------- engine
async def _stream(kafka, n: int = 300):
    topics, group = new_topics()
    await ensure_topics(kafka.bootstrap, list(topics))
    await produce(kafka.bootstrap, topics[0], [encode_input(f"engine text {i}", id=f"e{i}") for i in range(n)])
    return topics, group


async def test_stuck_engine_sigterm_exits_within_drain_timeout(kafka, tiny_artifact):
    topics, group = await _stream(kafka)
    proc = spawn(kafka.bootstrap, tiny_artifact, topics, group, STREAMLABEL_WORKER__FAILPOINT="engine_hang:1",
                 STREAMLABEL_WORKER__DRAIN_TIMEOUT_S="4", STREAMLABEL_LOG__LEVEL="info")
    log = Lines(proc.stderr)
    await wait_for(lambda: log.events("partitions_assigned"), 60, "the worker's assignment")
    await wait_for(lambda: log.events("worker_started"), 10, "start")
    await asyncio.sleep(1.0)  # let it poll and hand the first batch to the hung engine (a fault, not a sync)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = await exited(proc, 30)
    took = time.monotonic() - t
    print(f"stuck engine: SIGTERM → exit {code} in {took:.1f} s (drain timeout 4 s)")
    assert code == 0, log.text()[-2000:]
    assert took < 4 + 2.0, f"took {took:.1f} s"
    got = await committed(kafka.bootstrap, group, topics[0], 4)
    assert all(v in (None, 0) for v in got.values()), f"nothing answered, nothing committed: {got}"


async def test_hung_engine_times_out_and_stops_the_worker(kafka, tiny_artifact):
    topics, group = await _stream(kafka)
    proc = spawn(kafka.bootstrap, tiny_artifact, topics, group, STREAMLABEL_WORKER__FAILPOINT="engine_hang:1",
                 STREAMLABEL_BATCHING__ENGINE_TIMEOUT_S="2")
    log = Lines(proc.stderr)
    code = await exited(proc, 90)
    assert code == 4, log.text()[-2000:]
    failed = log.events("engine_failed")
    assert failed and "did not return within 2 s" in failed[0]["error"], log.text()[-2000:]


async def test_broken_engine_stops_the_worker_instead_of_dead_lettering(kafka, tiny_artifact):
    topics, group = await _stream(kafka)
    proc = spawn(kafka.bootstrap, tiny_artifact, topics, group, STREAMLABEL_WORKER__FAILPOINT="engine_fail:1")
    log = Lines(proc.stderr)
    code = await exited(proc, 90)
    assert code == 4, log.text()[-2000:]
    failed = log.events("engine_failed")
    assert failed and "fails every text" in failed[0]["error"], log.text()[-2000:]
    dlq = await read_until(kafka.bootstrap, [topics[2]], lambda r: False, 3)
    assert dlq == [], f"{len(dlq)} records dead-lettered by a broken engine"
    got = await committed(kafka.bootstrap, group, topics[0], 4)
    assert all(v in (None, 0) for v in got.values()), got


# ---------------------------------------------------------------------------------------------- Kafka
@pytest.fixture()
def own_broker(tmp_path):
    from pipeline.cli.local_services import LocalKafka

    broker = LocalKafka(tmp_path / "kafka").start()
    yield broker
    broker.kill()


async def test_broker_outage_logged_once_when_it_starts_and_once_when_it_ends(own_broker, tiny_artifact):
    topics, group = new_topics()
    await ensure_topics(own_broker.bootstrap, list(topics))
    proc = spawn(own_broker.bootstrap, tiny_artifact, topics, group, STREAMLABEL_LOG__LEVEL="info")
    log = Lines(proc.stderr)
    try:
        await wait_for(lambda: log.events("partitions_assigned"), 60, "assignment")
        await asyncio.to_thread(own_broker.kill)
        await wait_for(lambda: log.events("kafka_unreachable"), 30, "the outage to be logged")
        await asyncio.sleep(6)  # the outage goes on (the fault itself); no second line may appear meanwhile
        await asyncio.to_thread(own_broker.start)
        await wait_for(lambda: log.events("kafka_reachable"), 60, "the recovery to be logged")
        await produce(own_broker.bootstrap, topics[0], [encode_input("after the outage", id="after")])
        out = await read_until(own_broker.bootstrap, [topics[1]], lambda r: len(r) >= 1, 60)
        assert [orjson.loads(r.value)["id"] for r in out] == ["after"]
    finally:
        proc.send_signal(signal.SIGTERM)
        await exited(proc, 60)
    down, up = log.events("kafka_unreachable"), log.events("kafka_reachable")
    watch = [e for e in down if e.get("logger", "") != "streamlabel.runner"]
    assert len(watch) == 1 and len(up) == 1, (down, up)
    print(f"broker outage: {len(down)} unreachable line(s), 1 reachable line, outage {up[0]['outage_s']} s")


@pytest.mark.parametrize("missing", ["input", "output", "dlq"])
async def test_run_refuses_a_missing_topic_naming_it_and_creates_nothing(kafka, tiny_artifact, missing):
    topics, group = new_topics()
    await ensure_topics(kafka.bootstrap, [t for role, t in zip(("input", "output", "dlq"), topics) if role != missing])
    t = time.monotonic()
    proc = spawn(kafka.bootstrap, tiny_artifact, topics, group)
    code = await exited(proc, 60)
    err = proc.stderr.read().decode()
    name = dict(zip(("input", "output", "dlq"), topics))[missing]
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: topics.{missing}: the {missing} topic '{name}' does not exist on {kafka.bootstrap}"), err
    assert time.monotonic() - t < 30
    assert name not in await topic_names(kafka.bootstrap)




async def test_run_create_topics_when_asked(kafka, tiny_artifact):
    topics, group = new_topics()
    env = {**os.environ, "STREAMLABEL_METRICS__PORT": "none", "STREAMLABEL_CACHE__REDIS_URL": "none"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--model", str(tiny_artifact), "--bootstrap", kafka.bootstrap,
         "--input", topics[0], "--output", topics[1], "--dlq", topics[2], "--group", group, "--create-topics"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    log = Lines(proc.stderr)
    try:
        await wait_for_topics(kafka.bootstrap, set(topics), 60)
        ends = await end_offsets(kafka.bootstrap, topics[0])
        assert len(ends) == 4, "topics.partitions"
        # stopped once it runs (a SIGTERM during the model load exits 143, as a signal before any work does)
        await wait_for(lambda: log.events("worker_started"), 60, "the worker to start")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await exited(proc, 60)
        assert code == 0, f"exit {code}; the worker's last lines:\n{log.text()[-4000:]}"


async def wait_for_topics(bootstrap: str, want: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not want <= await topic_names(bootstrap):
        assert time.monotonic() < deadline, f"topics {want} not created"
        await asyncio.sleep(0.2)  # polling the broker's topic list


@pytest.mark.parametrize("delivery", ["at_least_once", EOS])
async def test_output_refused_as_too_large_goes_to_the_dlq_instead_of_a_restart_loop(kafka, names, tiny_artifact,
                                                                                     delivery):
    """The output topic's limit drops below what the worker read at start (as when DescribeConfigs is denied and
    the limit is assumed): the broker refuses a label record; the transaction is sent again with its fallback."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from pipeline import kafka as K
    from pipeline.engine import OnnxEngine
    from tests.integration.helpers import running_worker, settings_for

    eng = OnnxEngine(tiny_artifact, provider="cpu")
    s = settings_for(kafka, names, worker={"delivery": delivery})
    try:
        async with running_worker(s, eng) as w:
            admin = K.admin(kafka.bootstrap)
            await admin.start()
            try:
                await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, names.output,
                                                          {"max.message.bytes": "2048"})])
                for _ in range(100):
                    if (await K._max_message_bytes(admin, [names.output])).get(names.output) == 2048:
                        break
                    await asyncio.sleep(0.1)  # polling the broker's topic config
            finally:
                await admin.close()
            assert w.records.output_limit > 2048, "the worker still assumes the old limit"
            p = K.producer(kafka.bootstrap)
            await p.start()
            try:
                for i in range(5):
                    headers = [("bulk", os.urandom(4000))] if i == 2 else []  # labels keep input headers: too big
                    await (await p.send(names.input, encode_input(f"size text {i}", id=f"s{i}"), key=b"k",
                                        headers=headers))
            finally:
                await p.stop()
            out = await read_until(kafka.bootstrap, [names.output, names.dlq], lambda r: len(r) >= 5, 60,
                                   isolation_level="read_committed")
            assert w._fatal is None, f"worker failed: {w._fatal!r}"
            assert w.delivery.too_large == 1
    finally:
        eng.close()
    labels = sorted(orjson.loads(r.value)["id"] for r in out if r.topic == names.output)
    dlq = [r for r in out if r.topic == names.dlq]
    assert labels == ["s0", "s1", "s3", "s4"]
    assert len(dlq) == 1 and dict(dlq[0].headers)["streamlabel.error"].startswith(b"publish:")


async def test_exactly_once_rss_bounded_under_1mb_records(kafka, tiny_artifact):
    """1 MB records waiting far beyond what the worker can take (a backlog, then more offered while it runs):
    its RSS stays under warm RSS + 3 × worker.max_inflight_bytes (tests/faults/memory_bound.py, 20 s)."""
    from .memory_bound import run

    res = await run(kafka.bootstrap, str(tiny_artifact), 20, head_start_s=6)
    print({k: v for k, v in res.items() if k != "series"})
    assert res["worker_exit"] == 0 and res["handled"] > 0
    assert res["min_seconds_of_work_waiting"] >= 10, "the worker was not kept saturated"
    assert res["within_bound"], f"RSS peak {res['rss_peak_mb']} MB over the bound {res['rss_bound_mb']} MB"
