"""Fault scenarios under open-loop load, measured from the records (input CreateTime → output LogAppendTime).

A scenario: topics, worker process(es), a steady producer; once ``fault_after`` events are sent the fault runs
(kill, pause, outage…); then the harness waits for every label and reports produced, labelled, lost,
duplicated, p99 overall and during the fault, the time to recover (the SLO holds again for events produced
after the fault ends) and throughput before vs during the fault. Reports are printed and, with
STREAMLABEL_FAULT_REPORT=FILE, appended as JSON lines.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

import orjson

from pipeline.events import encode_input, now_ms
from producers.bench.harness import LOG_APPEND, WorkerProcess, pct, wait_worker_ready
from producers.rate import producer_for_load, send_at_rate
from producers.topics import ensure_topics, read_until


@dataclass
class Ctx:
    bootstrap: str
    artifact: str
    topics: tuple[str, str, str]
    group: str
    env: dict
    redis_url: str | None
    workers: list[WorkerProcess] = field(default_factory=list)
    fault_start_ms: int = 0
    fault_end_ms: int = 0
    notes: dict = field(default_factory=dict)

    def start_worker(self, **extra_env) -> WorkerProcess:
        w = WorkerProcess(self.bootstrap, self.artifact, self.topics, self.group, redis_url=self.redis_url,
                          extra_env={**self.env, **extra_env})
        self.workers.append(w)
        return w

    async def ready(self, w: WorkerProcess, timeout: float = 120) -> None:
        await wait_worker_ready(self.bootstrap, self.topics, w, timeout)


@dataclass
class FaultReport:
    fault: str
    delivery: str
    produced: int
    labelled: int
    lost: int
    duplicated: int
    p99_ms: float
    p99_during_fault_ms: float
    recovery_s: float
    order_violations: int  # a key's label for a later input published before an earlier one (first answers only)
    aborted_hidden: int  # exactly-once: records of aborted transactions, present in the log, unseen by read_committed
    throughput_before: float
    throughput_during: float
    fault_seconds: float
    notes: dict

    def line(self) -> str:
        return (f"{self.fault:<28} {self.delivery:<13} produced {self.produced:5d} labelled {self.labelled:5d} "
                f"lost {self.lost} dup {self.duplicated} order {self.order_violations} aborted-hidden "
                f"{self.aborted_hidden}  p99 {self.p99_ms:7.0f} ms (during fault {self.p99_during_fault_ms:7.0f}) "
                f"recovery {self.recovery_s:5.1f} s  throughput before {self.throughput_before:6.0f}/s during "
                f"{self.throughput_during:6.0f}/s  {self.notes or ''}")


async def run_scenario(bootstrap: str, artifact: str, *, fault: str, inject: Callable[[Ctx], Awaitable[None]],
                       rate: float = 200, seconds: float = 12, fault_after: float = 0.3, delivery: str = "at_least_once",
                       slo_ms: float = 250, redis_url: str | None = None, env: dict | None = None,
                       first_worker_env: dict | None = None, drain_timeout: float = 120) -> FaultReport:
    tag = uuid.uuid4().hex[:8]
    topics = (f"f-in-{tag}", f"f-out-{tag}", f"f-dlq-{tag}")
    await ensure_topics(bootstrap, [topics[0], topics[2]], partitions=4)
    await ensure_topics(bootstrap, [topics[1]], partitions=4, configs=LOG_APPEND)
    ctx = Ctx(bootstrap, artifact, topics, f"f-{tag}",
              env={"STREAMLABEL_WORKER__DELIVERY": delivery, "STREAMLABEL_KAFKA__SESSION_TIMEOUT_MS": "6000",
                   "STREAMLABEL_WORKER__DRAIN_TIMEOUT_S": "5", **(env or {})}, redis_url=redis_url)
    try:
        w = ctx.start_worker(**(first_worker_env or {}))
        await ctx.ready(w)
        count = int(rate * seconds)
        sent_ids: list[str] = []
        reached = asyncio.Event()
        trigger = max(1, int(count * fault_after))

        def records():
            for i in range(count):
                ev_id = f"{tag}-{i}"
                sent_ids.append(ev_id)
                if len(sent_ids) == trigger:
                    reached.set()
                yield f"k{i % 64}".encode(), encode_input(f"fault test text {i % 997} about item {i}", id=ev_id)

        p = producer_for_load(bootstrap, request_timeout_ms=120_000)
        await p.start()
        t0 = now_ms()
        try:
            send = asyncio.create_task(send_at_rate(p, topics[0], records(), rate=rate, count=count))
            await asyncio.wait_for(reached.wait(), seconds * 3 + 30)
            ctx.fault_start_ms = now_ms()
            await inject(ctx)
            ctx.fault_end_ms = ctx.fault_end_ms or now_ms()
            await send
        finally:
            await p.stop()
        want = set(sent_ids)
        iso = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
        outs = await read_until(bootstrap, [topics[1]], lambda r: want <= {orjson.loads(x.value)["id"] for x in r},
                                drain_timeout, isolation_level=iso)
        outs = await read_until(bootstrap, [topics[1]], lambda r: False, 2, isolation_level=iso)
        ins = await read_until(bootstrap, [topics[0]], lambda r: len(r) >= count + 1, 30)
        raw = (await read_until(bootstrap, [topics[1]], lambda r: False, 2)) if delivery == "exactly_once" else outs
    finally:
        for wp in ctx.workers:  # always, or a failed scenario leaves workers behind
            wp.stop()
    inputs = {}
    for r in ins:
        i = orjson.loads(r.value).get("id")
        if i in want:
            inputs[i] = r.timestamp
    counts = Counter(orjson.loads(r.value)["id"] for r in outs)
    first: dict[str, int] = {}
    for r in outs:
        i = orjson.loads(r.value)["id"]
        first.setdefault(i, r.timestamp)
    lat = {i: first[i] - inputs[i] for i in first if i in inputs}
    during = [v for i, v in lat.items() if ctx.fault_start_ms <= inputs[i] <= ctx.fault_end_ms]
    late = [inputs[i] for i, v in lat.items() if v > slo_ms and inputs[i] >= ctx.fault_start_ms]
    recovery = max(0.0, (max(late) - ctx.fault_end_ms) / 1000) if late else 0.0

    def rate_in(a: int, b: int) -> float:
        n = sum(1 for ts in first.values() if a <= ts < b)
        return n / max(0.001, (b - a) / 1000)

    # Per-key order: walk each output partition in log order; the first label of each id must follow its key's
    # input order (ids carry the input sequence number).
    order = 0
    last_seq: dict[bytes, int] = {}
    firsts: set[str] = set()
    for r in sorted(outs, key=lambda r: (r.partition, r.offset)):
        i = orjson.loads(r.value)["id"]
        if i not in want or i in firsts:
            continue
        firsts.add(i)
        seq = int(i.rsplit("-", 1)[1])
        if last_seq.get(r.key, -1) > seq:
            order += 1
        last_seq[r.key] = max(seq, last_seq.get(r.key, -1))
    dups = [i for i, c in counts.items() if c > 1 and i in want]
    if dups:  # where each copy sits: one transaction's worth, a re-read range, or a retried produce batch
        where_in = {orjson.loads(r.value).get("id"): (r.partition, r.offset) for r in ins}
        copies: dict[str, list] = {}
        for r in outs:
            i = orjson.loads(r.value)["id"]
            if i in dups:
                copies.setdefault(i, []).append((r.partition, r.offset, r.timestamp))
        ctx.notes["duplicates"] = [{"id": i, "input": where_in.get(i), "outputs": copies[i]} for i in sorted(dups)[:12]]
    rep = FaultReport(
        fault=fault, delivery=delivery, produced=len(want), labelled=len(set(counts) & want),
        lost=len(want - set(counts)), duplicated=sum(c - 1 for i, c in counts.items() if i in want),
        p99_ms=pct(list(lat.values()), 99), p99_during_fault_ms=pct(during, 99), recovery_s=round(recovery, 2),
        order_violations=order, aborted_hidden=len(raw) - len(outs),
        throughput_before=round(rate_in(t0, ctx.fault_start_ms), 1),
        throughput_during=round(rate_in(ctx.fault_start_ms, ctx.fault_end_ms), 1),
        fault_seconds=round((ctx.fault_end_ms - ctx.fault_start_ms) / 1000, 2), notes=ctx.notes,
    )
    print("\n" + rep.line())
    path = os.environ.get("STREAMLABEL_FAULT_REPORT")
    if path:
        with open(path, "ab") as f:
            f.write(orjson.dumps(asdict(rep)) + b"\n")
    return rep


async def wait_exit(w: WorkerProcess, timeout: float) -> int:
    """The exit code; a worker that has not exited within ``timeout`` is killed and the wait fails."""
    from tests.integration.helpers import process_exit

    code = await process_exit(w.proc, timeout)
    assert code is not None, f"the worker did not exit within {timeout:g} s (killed)"
    return code


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling a process/broker state that offers no notification
