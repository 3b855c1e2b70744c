"""Faults under load, each bounded in time: worker kills at failpoints, broker kill/pause, Redis outage,
rebalances, a 10× burst. Every scenario checks input set = output set (nothing lost) and, in exactly-once
mode, no duplicates."""

from __future__ import annotations

import asyncio

import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.cli.local_services import LocalKafka, LocalRedis

from .scenario import Ctx, run_scenario, wait_exit, wait_for

pytestmark = pytest.mark.faults

ALO, EOS = "at_least_once", "exactly_once"


def restart_after_crash(ctx: Ctx):
    async def inject(ctx: Ctx) -> None:
        await wait_exit(ctx.workers[0], 120)  # the failpoint killed it (SIGKILL)
        ctx.notes["exit_code"] = ctx.workers[0].proc.returncode
        w = ctx.start_worker()
        await ctx.ready(w)
        ctx.fault_end_ms = __import__("pipeline.events", fromlist=["now_ms"]).now_ms()
    return inject


@pytest.mark.parametrize("delivery, point", [
    (ALO, "after_poll"), (ALO, "after_inference"), (ALO, "after_publish"),
    (EOS, "after_inference"), (EOS, "in_transaction"),
])
async def test_worker_kill9_at_failpoint_and_restart(kafka, tiny_artifact, delivery, point):
    rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault=f"worker kill -9 {point}", delivery=delivery,
                             inject=restart_after_crash(None), first_worker_env={"STREAMLABEL_WORKER__FAILPOINT": f"{point}:400"})
    assert rep.notes["exit_code"] == -9, "the failpoint killed the worker"
    assert rep.lost == 0
    if delivery == EOS:
        assert rep.duplicated == 0 and rep.order_violations == 0


async def test_generator_worker_kill9_mid_batch_loses_nothing(kafka, tiny_generator):
    """The generator path: SIGKILL while a decode batch is in flight, a new worker takes over, 0 lost."""
    rep = await run_scenario(kafka.bootstrap, str(tiny_generator), fault="generator kill -9 after_inference",
                             rate=60, seconds=8, inject=restart_after_crash(None),
                             env={"STREAMLABEL_SLO__OBJECTIVE_MS": "30000", "STREAMLABEL_GENERATE__MAX_NEW_TOKENS": "8"},
                             first_worker_env={"STREAMLABEL_WORKER__FAILPOINT": "after_inference:150"})
    assert rep.notes["exit_code"] == -9, "the failpoint killed the worker"
    assert rep.lost == 0 and rep.labelled >= rep.produced


@pytest.fixture()
def own_kafka(tmp_path):
    broker = LocalKafka(tmp_path / "kafka").start()
    yield broker
    broker.kill()


@pytest.mark.parametrize("delivery", [ALO, EOS])
async def test_broker_kill9_and_restart(own_kafka, tiny_artifact, delivery):
    async def inject(ctx: Ctx) -> None:
        from pipeline.events import now_ms

        await asyncio.to_thread(own_kafka.kill)
        await asyncio.to_thread(own_kafka.start)  # same port, same (durable) data dir
        ctx.fault_end_ms = now_ms()

    rep = await run_scenario(own_kafka.bootstrap, str(tiny_artifact), fault="broker kill -9 + restart",
                             delivery=delivery, inject=inject, drain_timeout=180)
    assert rep.lost == 0
    if delivery == EOS:
        assert rep.duplicated == 0 and rep.order_violations == 0
    assert rep.recovery_s < 10, f"recovery {rep.recovery_s} s after the broker returned"


async def test_broker_pause_longer_than_session_timeout(own_kafka, tiny_artifact):
    async def inject(ctx: Ctx) -> None:
        from pipeline.events import now_ms

        own_kafka.pause()
        try:
            await asyncio.sleep(8)  # the fault itself: a stopped broker for longer than session.timeout.ms (6 s)
        finally:
            own_kafka.resume()
        ctx.fault_end_ms = now_ms()

    rep = await run_scenario(own_kafka.bootstrap, str(tiny_artifact), fault="broker SIGSTOP 8 s", inject=inject,
                             drain_timeout=180)
    assert rep.lost == 0
    assert rep.recovery_s < 10


async def test_redis_killed_10s_keeps_throughput(kafka, tiny_artifact, tmp_path):
    redis = LocalRedis(workdir=tmp_path / "redis").start()

    async def inject(ctx: Ctx) -> None:
        from pipeline.events import now_ms

        redis.kill()
        await asyncio.sleep(10)  # the fault itself: a 10 s Redis outage
        ctx.fault_end_ms = now_ms()
        redis.start()

    try:
        rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault="redis kill 10 s", inject=inject,
                                 redis_url=redis.url, seconds=16, fault_after=0.2)
    finally:
        redis.stop()
    assert rep.lost == 0
    assert rep.throughput_during >= 0.5 * rep.throughput_before, rep


async def _members(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.describe_consumer_groups([group])
        # raw DescribeGroups response: groups = [(error_code, group, state, protocol_type, protocol, members), …]
        return len(resp[0].groups[0][5]) if resp and resp[0].groups else 0
    finally:
        await admin.close()


async def test_rebalance_under_load_join_and_leave(kafka, tiny_artifact):
    async def inject(ctx: Ctx) -> None:
        from pipeline.events import now_ms

        for _ in range(3):
            w = ctx.start_worker()
            n = {"m": 0}

            async def poll_members():
                n["m"] = await _members(ctx.bootstrap, ctx.group)
                return n["m"]

            deadline = asyncio.get_running_loop().time() + 60
            while await poll_members() < 2:
                assert asyncio.get_running_loop().time() < deadline, "second worker never joined"
                await asyncio.sleep(0.2)  # polling the group's membership
            w.stop()
            while await poll_members() > 1:
                assert asyncio.get_running_loop().time() < deadline + 60, "second worker never left"
                await asyncio.sleep(0.2)
        ctx.fault_end_ms = now_ms()

    rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault="rebalance: join/leave ×3", inject=inject,
                             seconds=20, fault_after=0.15)
    assert rep.lost == 0 and rep.order_violations == 0, "a clean hand-over keeps per-key order"


async def test_burst_10x_capacity_memory_bounded_lag_drains(kafka, tiny_artifact):
    """Base load 150/s, then a burst far above what one worker can take; in-flight stays bounded."""
    from pipeline.events import encode_input, now_ms
    from producers.rate import producer_for_load, send_at_rate
    from producers.topics import read_until
    import orjson

    async def inject(ctx: Ctx) -> None:
        proc = psutil.Process(ctx.workers[0].proc.pid)
        rss0 = proc.memory_info().rss
        peak = [rss0]
        stop = asyncio.Event()

        async def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass

        sampler = asyncio.create_task(sample())
        ids = [f"burst-{i}" for i in range(15000)]
        p = producer_for_load(ctx.bootstrap)
        await p.start()
        try:
            rep = await send_at_rate(p, ctx.topics[0], ((None, encode_input(f"burst text {i % 300} number {i}", id=i_))
                                                         for i, i_ in enumerate(ids)), rate=15000, count=len(ids), poisson=False)
        finally:
            await p.stop()
        ctx.fault_end_ms = now_ms()
        want = set(ids)
        t = asyncio.get_running_loop().time()
        await read_until(ctx.bootstrap, [ctx.topics[1]], lambda r: want <= {orjson.loads(x.value)["id"] for x in r}, 180)
        stop.set()
        await sampler
        ctx.notes.update(burst_events=len(ids), burst_offered_rate=round(rep.achieved_rate),
                         drain_s=round(asyncio.get_running_loop().time() - t, 1),
                         rss_growth_mb=round((peak[0] - rss0) / 1e6, 1))

    rep = await run_scenario(kafka.bootstrap, str(tiny_artifact), fault="burst 15k events at ~10× capacity",
                             inject=inject, rate=150, seconds=14, fault_after=0.2,
                             # batch size 1 makes one worker slow enough (~800/s) that the producer's
                             # ~8k/s burst is ~10× its capacity
                             env={"STREAMLABEL_WORKER__MAX_INFLIGHT": "2000", "STREAMLABEL_MODEL__THREADS": "1",
                                  "STREAMLABEL_BATCHING__MAX_BATCH": "1"})
    assert rep.lost == 0
    assert rep.notes["rss_growth_mb"] < 300, rep.notes
    assert rep.recovery_s < 60, "the SLO holds again once the backlog has drained"
