"""The load-test harness behind ``streamlabel bench``: open-loop ladders measured from the records.

For each step: a fresh input/output topic pair; the input records get their CreateTime from the producer,
the output topic uses LogAppendTime, so ``output.timestamp − input.timestamp`` is the broker-side
end-to-end latency (input written → label acknowledged), read from the records, never from the worker's
own counters. The worker runs as a separate process (``streamlabel run``), as in production; the baselines
(``producers/bench/naive.py``, ``producers/bench/handwritten.py``) run the same way.

Ids not labelled when the read-back ends are split by the group's committed offsets: at or past them the
worker had simply not got there yet (``backlog``: it was behind, a restart would read them again); below
them a label is missing for good (``lost``). The pipeline worker also serves ``/metrics`` on a free port,
scraped before and after each step for its CPU seconds per event outside and inside the engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import orjson

from pipeline.events import encode_input
from producers.bench.engine import ceiling_throughput, engine_throughput  # noqa: F401 — re-exported
from producers.rate import producer_for_load, send_at_rate
from producers.synthetic import Generator
from producers.topics import Record, committed, ensure_topics, read_until

LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}


def pct(vals: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (the value below which p% of the samples fall)."""
    if not vals:
        return 0.0
    s = sorted(vals)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return float(s[k])


@dataclass
class Step:
    name: str
    offered_rate: float
    achieved_rate: float
    sent: int
    labelled: int
    lost: int
    duplicated: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    goodput: float
    throughput: float  # labels acknowledged per second over the step
    meets_slo: bool
    series: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, latency ms), sampled
    backlog: int = 0  # not labelled when the read-back ended, at or past the committed offset: not lost, behind
    worker_cpu_us_per_event: float | None = None  # worker process CPU outside the engine thread, per labelled event
    engine_cpu_us_per_event: float | None = None  # CPU of the engine thread(s), per labelled event
    tokenizer_cpu_us_per_event: float | None = None  # tokenizing, per labelled event (a part of worker_cpu_us_per_event)
    gen: dict | None = None  # generators: output tokens/s, tokens per answer, TTFT and time per output token p50/p99
    # classifiers: p50/p99 ms of each part of a label's latency, from the label's own latency_ms: to_batcher
    # (input written → admitted to the batcher: produce, fetch, poll, decode, tokenize), batch_wait, infer,
    # publish (label built → acknowledged by the broker)
    breakdown: dict | None = None
    send_failed: int = 0  # load records the broker never acknowledged (not in ``sent``; a step with any is suspect)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("series")
        return d


def analyse(name: str, inputs: dict[str, int], outputs: list, offered: float, achieved: float, slo_ms: float,
            target: float, *, queued: Collection[str] = ()) -> Step:
    """``inputs``: id → input record timestamp. ``outputs``: label records (LogAppendTime timestamps).

    ``queued``: ids still at or past the group's committed offset when the read-back ended; those of them
    without a label count as ``backlog`` (the worker was behind), the other unlabelled ids as ``lost``.
    """
    seen: dict[str, int] = {}
    dup = 0
    lat = []
    series = []
    tokens: list[int] = []
    ttft: list[float] = []
    tpot: list[float] = []
    parts: dict[str, list[float]] = {"to_batcher": [], "batch_wait": [], "infer": [], "publish": []}
    t0 = min(inputs.values()) if inputs else 0
    for r in outputs:
        doc = orjson.loads(r.value)
        i = doc["id"]
        if i not in inputs:
            continue
        if i in seen:
            dup += 1
            continue
        seen[i] = r.timestamp
        if "tokens" in doc:  # a generator's answer
            tokens.append(int(doc["tokens"]))
            lm = doc.get("latency_ms") or {}
            if "ttft" in lm and not doc.get("cached"):
                ttft.append(float(lm["ttft"]))
                if doc["tokens"] > 1:
                    tpot.append(float(lm["decode"]) / (doc["tokens"] - 1))
        ms = r.timestamp - inputs[i]
        lm = doc.get("latency_ms") or {}
        if "batch_wait" in lm and not doc.get("cached"):  # a classifier's label: where its latency went
            parts["batch_wait"].append(lm["batch_wait"])
            parts["infer"].append(lm["infer"])
            parts["to_batcher"].append(max(0.0, lm["e2e"] - lm["batch_wait"] - lm["infer"]))
            parts["publish"].append(max(0.0, ms - lm["e2e"]))
        lat.append(ms)
        series.append(((inputs[i] - t0) / 1000.0, float(ms)))
    good = sum(1 for x in lat if x <= slo_ms)
    span = (max(seen.values()) - min(inputs.values())) / 1000.0 if seen else 0.0
    step = max(1, len(series) // 2000)
    p99 = pct(lat, 99)
    queued = set(queued)
    backlog = sum(1 for i in inputs if i not in seen and i in queued)
    lost = len(inputs) - len(seen) - backlog
    return Step(name=name, offered_rate=offered, achieved_rate=round(achieved, 1), sent=len(inputs), labelled=len(seen),
                lost=lost, duplicated=dup, p50_ms=pct(lat, 50), p95_ms=pct(lat, 95), p99_ms=p99,
                p999_ms=pct(lat, 99.9), max_ms=float(max(lat)) if lat else 0.0,
                goodput=round(good / len(inputs), 4) if inputs else 0.0,
                throughput=round(len(seen) / span, 1) if span > 0 else 0.0,
                meets_slo=bool(lat) and lost == 0 and backlog == 0 and p99 <= slo_ms and good / len(inputs) >= target - 1e-9,
                series=sorted(series)[::step], backlog=backlog,
                breakdown=({k: {"p50_ms": round(pct(v, 50), 2), "p99_ms": round(pct(v, 99), 2)} for k, v in parts.items()}
                           if parts["publish"] else None),
                gen=({"tokens_per_s": round(sum(tokens) / span, 1) if span > 0 else 0.0,
                      "tokens_per_answer": round(sum(tokens) / len(tokens), 1),
                      "ttft_p50_ms": pct(ttft, 50) if ttft else None, "ttft_p99_ms": pct(ttft, 99) if ttft else None,
                      "tpot_p50_ms": round(pct(tpot, 50), 2) if tpot else None,
                      "tpot_p99_ms": round(pct(tpot, 99), 2) if tpot else None} if tokens else None))


class WorkerProcess:
    """``streamlabel run`` as a child process, configured by environment variables."""

    def __init__(self, bootstrap: str, artifact: str, topics: tuple[str, str, str], group: str, *,
                 variant: str | None = None, redis_url: str | None = None, extra_env: dict | None = None,
                 command: list[str] | None = None, cwd: str | None = None) -> None:
        """``cwd``: run the worker of another checkout (a worktree of an older commit: a baseline)."""
        env = {**os.environ, "STREAMLABEL_METRICS__PORT": "none", "STREAMLABEL_LOG__FORMAT": "json",
               "STREAMLABEL_LOG__LEVEL": "warning", "STREAMLABEL_CACHE__REDIS_URL": redis_url or "none",
               "STREAMLABEL_KAFKA__AUTO_OFFSET_RESET": "earliest", **(extra_env or {})}
        if variant:
            env["STREAMLABEL_MODEL__VARIANT"] = variant
        cmd = command or [sys.executable, "-m", "pipeline.cli", "run", "--model", artifact, "--bootstrap", bootstrap,
                          "--input", topics[0], "--output", topics[1], "--dlq", topics[2], "--group", group]
        if cwd is not None:
            env["PYTHONPATH"] = cwd
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, cwd=cwd)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _distinct_ids(prefix: str, count: int):
    """A ``read_until`` condition: ``count`` distinct load ids (starting with ``prefix``) read back. Counting records
    instead stopped the read early when the reader saw a record twice or a probe more than once: one load record
    was then missing from the step ("sent" 299 of 300)."""
    seen: set = set()
    done = [0]  # records already looked at

    def enough(records) -> bool:
        for r in records[done[0]:]:
            i = str(orjson.loads(r.value).get("id", ""))
            if i.startswith(prefix):
                seen.add(i)
        done[0] = len(records)
        return len(seen) >= count

    return enough


async def wait_worker_ready(bootstrap: str, topics: tuple[str, str, str], proc: WorkerProcess, timeout: float = 120,
                            partitions: int | None = None) -> None:
    """Send a probe event (one to each of ``partitions``, when given: every worker of a group) and wait for its
    label: the worker has its assignment and a warm engine."""
    tag = uuid.uuid4().hex[:6]
    probes = [f"probe-{tag}-{i}" for i in range(partitions or 1)]
    p = producer_for_load(bootstrap)
    await p.start()
    try:
        for i, probe in enumerate(probes):
            await (await p.send(topics[0], value=encode_input("warm-up probe", id=probe),
                                partition=i if partitions else None))
    finally:
        await p.stop()
    want = {x.encode() for x in probes}

    def answered(r) -> bool:
        return all(any(w in x.value for x in r) for w in want)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"worker exited during start-up: {proc.proc.stderr.read().decode()[-800:]}")
        got = await read_until(bootstrap, [topics[1]], answered, 2)
        if answered(got):
            return
    raise RuntimeError("worker did not answer the probe in time")


@dataclass
class BenchConfig:
    bootstrap: str
    artifact: str
    slo_ms: float = 250.0
    target: float = 0.99
    step_seconds: float = 15.0
    variant: str | None = None
    max_batch: int = 64
    redis_url: str | None = None
    seed: int = 0
    delivery: str = "at_least_once"
    env: dict = field(default_factory=dict)  # more STREAMLABEL_* settings for the worker and the baselines
    workers: int = 1  # worker processes in one consumer group (the input topic gets at least as many partitions)
    producers: int = 1  # load-generator processes, each offering rate / producers (one Python producer tops out)


async def run_step(cfg: BenchConfig, name: str, rate: float, *, duplicate_ratio: float = 0.0, worker_cmd: list[str] | None = None, variant: str | None = None,
                   progress: Callable[[str], None] | None = None) -> Step:
    """One step at ``rate`` on fresh topics: the ``streamlabel run`` worker, or ``worker_cmd`` (a baseline).

    ``worker_cmd`` gets ``BOOTSTRAP INPUT OUTPUT DLQ GROUP`` appended, and the same environment as the worker
    (``STREAMLABEL_MODEL__PATH``, ``STREAMLABEL_BATCHING__MAX_BATCH``, …).
    """
    tag = uuid.uuid4().hex[:8]
    topics = (f"bench-in-{tag}", f"bench-out-{tag}", f"bench-dlq-{tag}")
    group = f"bench-{tag}"
    partitions = max(PARTITIONS, cfg.workers)
    await ensure_topics(cfg.bootstrap, [topics[0], topics[2]], partitions=partitions)
    await ensure_topics(cfg.bootstrap, [topics[1]], partitions=partitions, configs=LOG_APPEND)
    env = {"STREAMLABEL_BATCHING__MAX_BATCH": str(cfg.max_batch), "STREAMLABEL_MODEL__PATH": cfg.artifact,
           "STREAMLABEL_SLO__OBJECTIVE_MS": str(cfg.slo_ms), "STREAMLABEL_WORKER__DELIVERY": cfg.delivery,
           # Unique-text steps compare serving, so the cache is off; the duplicate steps measure the cache.
           "STREAMLABEL_CACHE__ENABLED": "true" if duplicate_ratio > 0 else "false", **cfg.env}
    cmd = [*worker_cmd, cfg.bootstrap, *topics, group] if worker_cmd is not None else None
    ports: list[int] = []
    procs: list[WorkerProcess] = []
    try:
        for _ in range(cfg.workers):
            wenv = dict(env)
            if worker_cmd is None:
                ports.append(free_port())
                wenv["STREAMLABEL_METRICS__PORT"] = str(ports[-1])
            procs.append(WorkerProcess(cfg.bootstrap, cfg.artifact, topics, group, variant=variant or cfg.variant,
                                       redis_url=cfg.redis_url, extra_env=wenv, command=cmd))
        if cfg.workers > 1:
            await wait_group(cfg.bootstrap, group, cfg.workers, procs)
        await wait_worker_ready(cfg.bootstrap, topics, procs[0], partitions=partitions if cfg.workers > 1 else None)
        before = _sum_counters([worker_counters(await asyncio.to_thread(scrape, p)) for p in ports])
        count = max(1, int(rate * cfg.step_seconds))
        sent_ids: list[str] = []

        # Exactly-once: a label's LogAppendTime is stamped when it is appended, before its transaction commits;
        # what a read_committed reader sees is the commit. So the latency is measured to the moment a live
        # read_committed reader receives the label.
        tail = _VisibleTail(cfg.bootstrap, topics[1]) if cfg.delivery == "exactly_once" else None
        if tail is not None:
            await tail.start()
        failed = 0
        if cfg.producers > 1:
            achieved = await _load_processes(cfg, topics[0], rate, count, f"{name}-{tag}", duplicate_ratio)
        else:
            gen = Generator("mixed", seed=cfg.seed, duplicate_ratio=duplicate_ratio, id_prefix=f"{name}-{tag}")

            def records():
                for ev in gen:
                    sent_ids.append(ev.id)
                    yield ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity)

            p = producer_for_load(cfg.bootstrap)
            await p.start()
            try:
                sent = await send_at_rate(p, topics[0], records(), rate=rate, count=count, seed=cfg.seed)
            finally:
                await p.stop()
            achieved, failed = sent.achieved_rate, sent.failed
            if failed and progress:
                progress(f"{name}: {failed} load record(s) not acknowledged by the broker ({sent.first_error})")
        # Drain: wait for every label, bounded by what an SLO-breaking backlog could need. The read-back of the
        # input ends at the records the broker acknowledged (a failed send is never there to be read).
        prefix = f"{name}-{tag}"
        ins = await read_until(cfg.bootstrap, [topics[0]], _distinct_ids(prefix, count - failed), 30)
        inputs = {}
        for r in ins:
            d = orjson.loads(r.value)
            if str(d.get("id", "")).startswith(prefix):  # not the readiness probes
                inputs[d["id"]] = r.timestamp
        want = set(sent_ids) if sent_ids else set(inputs)
        drain = max(30.0, cfg.step_seconds * 3)
        if tail is not None:
            outs = await tail.until(want, drain)
        else:
            outs = await read_until(cfg.bootstrap, [topics[1]],
                                    lambda r: len({orjson.loads(x.value)["id"] for x in r} & want) >= len(want), drain)
        after = _sum_counters([worker_counters(await asyncio.to_thread(scrape, p)) for p in ports])
        queued = await _queued_ids(cfg.bootstrap, group, topics[0], ins, want - _ids(outs))
        step = analyse(name, {k: v for k, v in inputs.items() if k in want}, outs, rate, achieved, cfg.slo_ms,
                       cfg.target, queued=queued)
        (step.worker_cpu_us_per_event, step.engine_cpu_us_per_event,
         step.tokenizer_cpu_us_per_event) = cpu_per_event(before, after)
        step.send_failed = failed
        if progress:
            progress(progress_line(step))
        return step
    finally:
        for w in procs:
            w.stop()


def _sum_counters(items: Sequence[dict | None]) -> dict | None:
    """The workers' counters added up (None when any worker exported none)."""
    if not items or any(i is None for i in items):
        return None
    out: dict[str, float] = {}
    for d in items:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


async def _load_processes(cfg: BenchConfig, topic: str, rate: float, count: int, prefix: str,
                          duplicate_ratio: float) -> float:
    """``cfg.producers`` load-generator processes (``producers.bench.load``), each offering its share of ``rate``;
    the events/s they achieved together."""
    n = cfg.producers
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producers.bench.load", cfg.bootstrap, topic, str(rate / n), str(-(-count // n)),
        str(cfg.seed + i), f"{prefix}-p{i}", str(duplicate_ratio), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE) for i in range(n)]
    achieved = 0.0
    for p in procs:
        out, err = await p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a load generator failed: {err.decode()[-500:]}")
        achieved += orjson.loads(out.splitlines()[-1])["achieved_rate"]
    return achieved


async def wait_group(bootstrap: str, group: str, members: int, procs: Sequence[WorkerProcess],
                     timeout: float = 180) -> None:
    """Wait until ``group`` is stable with ``members`` members (every worker has loaded its model and joined)."""
    from pipeline import kafka as K

    admin = K.admin(bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            for w in procs:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker exited during start-up: {w.proc.stderr.read().decode()[-800:]}")
            desc = await admin.describe_consumer_groups([group])
            groups = [g for resp in desc for g in resp.groups]
            state, n = (groups[0][2], len(groups[0][5])) if groups else ("", 0)
            if state == "Stable" and n >= members:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the group {group} has {n} of {members} workers after {timeout:.0f} s")
            await asyncio.sleep(0.5)  # polling the group coordinator: its state has no push signal
    finally:
        await admin.close()


PARTITIONS = 4


def progress_line(step: Step) -> str:
    """One line per step for the terminal."""
    missing = (f"  {step.backlog} still queued (behind)" if step.backlog else "") + \
              (f"  LOST {step.lost}" if step.lost else "")
    cpu = f"  cpu {step.worker_cpu_us_per_event:.0f} µs/ev" if step.worker_cpu_us_per_event is not None else ""
    return (f"  {step.name:>14} offered {step.offered_rate:8.1f}/s achieved {step.achieved_rate:8.1f}/s  "
            f"p50 {step.p50_ms:7.1f}  p99 {step.p99_ms:7.1f}  p99.9 {step.p999_ms:7.1f} ms  goodput {step.goodput:6.2%}  "
            f"dup {step.duplicated}{missing}{cpu}  {'✓' if step.meets_slo else '✗'}")


def _ids(records: Sequence[Record]) -> set[str]:
    return {orjson.loads(r.value).get("id") for r in records}


async def _queued_ids(bootstrap: str, group: str, topic: str, inputs: Sequence[Record], missing: set[str]) -> set[str]:
    """Of the ``missing`` ids, those at or past the group's committed offset of their partition (not yet done)."""
    if not missing:
        return set()
    done = await committed(bootstrap, group, topic, PARTITIONS)
    out = set()
    for r in inputs:
        i = orjson.loads(r.value).get("id")
        if i in missing and r.offset >= (done.get(r.partition) or 0):
            out.add(i)
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the worker's /metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int | None, timeout: float = 5.0) -> str | None:
    """The worker's /metrics text, or ``None`` when it cannot be read (no endpoint: not an error here)."""
    import urllib.request

    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return r.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


CPU_SECONDS = "streamlabel_cpu_seconds_total"
TOKENIZER_CPU = "streamlabel_tokenizer_cpu_seconds_total"
EVENTS = "streamlabel_events_total"


def worker_counters(text: str | None) -> dict[str, float] | None:
    """From a /metrics text: ``cpu_<part>`` (CPU seconds by ``part``) and ``labelled`` events; absent ones left out.

    Samples are matched by name, so the CPU split counts whether it is exported as a counter or a gauge.
    """
    from prometheus_client.parser import text_string_to_metric_families

    if text is None:
        return None
    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == CPU_SECONDS and "part" in s.labels:
                    key = f"cpu_{s.labels['part']}"
                    out[key] = out.get(key, 0.0) + s.value
                elif s.name == TOKENIZER_CPU:
                    out["cpu_tokenizer"] = out.get("cpu_tokenizer", 0.0) + s.value
                elif s.name == EVENTS and s.labels.get("outcome") == "labelled":
                    out["labelled"] = out.get("labelled", 0.0) + s.value
    except ValueError:  # not Prometheus text: treat as absent
        return None
    return out


def cpu_per_event(before: Mapping[str, float] | None, after: Mapping[str, float] | None
                  ) -> tuple[float | None, float | None, float | None]:
    """(outside-engine, engine, tokenizer) CPU µs per labelled event between two scrapes; ``None`` where a figure
    is missing. The tokenizer's share is a part of the outside-engine figure."""
    if not before or not after or "labelled" not in before or "labelled" not in after:
        return None, None, None
    events = after["labelled"] - before["labelled"]

    def per(part: str) -> float | None:
        k = f"cpu_{part}"
        if events <= 0 or k not in before or k not in after:
            return None
        return round((after[k] - before[k]) / events * 1e6, 1)

    return per("outside_engine"), per("engine"), per("tokenizer")


class _VisibleTail:
    """A read_committed reader running during a step; each record is stamped with the wall time it arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from pipeline import kafka as K

        self._c = K.consumer(bootstrap, topic, group_id=None, auto_offset_reset="earliest",
                             isolation_level="read_committed", fetch_max_wait_ms=5)
        self.records: list[Record] = []
        self._ids: set[str] = set()
        self._task: asyncio.Task | None = None
        self._live = asyncio.Event()

    async def start(self, timeout: float = 60) -> None:
        await self._c.start()
        self._task = asyncio.create_task(self._run())
        # the worker's probe label is already on the topic: once it is read, the reader is live
        await asyncio.wait_for(self._live.wait(), timeout)

    async def _run(self) -> None:
        while True:
            batch = await self._c.getmany(timeout_ms=50)
            now = time.time_ns() // 1_000_000
            for tp, recs in batch.items():
                for r in recs:
                    self.records.append(Record(tp.topic, tp.partition, r.offset, r.key, r.value,
                                               tuple(r.headers or ()), now))
                    self._ids.add(orjson.loads(r.value).get("id"))
                self._live.set()

    async def until(self, want: set[str], timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        try:
            while not want <= self._ids and time.monotonic() < deadline and not self._task.done():
                await asyncio.sleep(0.05)  # polling the reader's progress
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self._c.stop()
        return self.records


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            gpu = "CUDA available"
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform()}


def knee_step(steps: Sequence[Step]) -> Step | None:
    """The step of highest throughput among those up to which every step met the SLO (in offered-rate order).

    A step that passes above a failed one (noise near saturation on a small machine) does not count: the
    knee is the load the system holds, not its luckiest step. ``None``: not even the lowest step met it.
    """
    best = None
    for s in sorted(steps, key=lambda s: s.offered_rate):
        if not s.meets_slo:
            break
        if best is None or s.throughput > best.throughput:
            best = s
    return best


def knee(steps: Sequence[Step]) -> float:
    """The throughput at the knee (``knee_step``); 0 when no step met the SLO."""
    k = knee_step(steps)
    return k.throughput if k is not None else 0.0


def at_slo(steps: Sequence[Step]) -> tuple[float, str | None]:
    """(events/s at the knee, note): a ladder that met the SLO at no step is reported as such, not as a figure."""
    if not steps:
        return 0.0, "not measured"
    if knee_step(steps) is not None:
        return knee(steps), None
    low = min(steps, key=lambda s: s.offered_rate)
    why = f"p99 {low.p99_ms:.0f} ms, goodput {low.goodput:.1%}"
    if low.backlog:
        why += f", {low.backlog} of {low.sent} events still queued when the read-back ended"
    if low.lost:
        why += f", {low.lost} lost"
    return 0.0, f"did not meet the SLO at any step (lowest {low.offered_rate:.0f}/s: {why})"


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """``a / b`` rounded, or ``None`` when either is missing or ``b`` is 0."""
    return round(a / b, digits) if a is not None and b else None


def cpu_at_knee(steps: Sequence[Step]) -> tuple[float | None, float | None, float | None]:
    """(outside-engine, engine, tokenizer) CPU µs per event at the knee step, else at the busiest step."""
    if not steps:
        return None, None, None
    s = knee_step(steps) or max(steps, key=lambda s: s.offered_rate)
    return s.worker_cpu_us_per_event, s.engine_cpu_us_per_event, s.tokenizer_cpu_us_per_event


# (report key, bar label, colour) of the throughput chart; a key that is absent or None is left out
BARS = (("ceiling_msgs_per_s", "ORT ceiling (no Kafka)", "#555"),
        ("ceiling_one_session_msgs_per_s", "ORT, one session (no Kafka)", "#777"),
        ("capacity_answers_per_s", "generator capacity (no Kafka)", "#888"),
        ("engine_msgs_per_s", "engine (no Kafka)", "#888"),
        ("pipeline_msgs_per_s_at_slo", "pipeline at SLO", "#2a7"),
        ("handwritten_msgs_per_s_at_slo", "hand-written at SLO", "#d92"),
        ("naive_msgs_per_s_at_slo", "naive at SLO", "#c55"),
        ("dup50_msgs_per_s_at_slo", "pipeline, 50% dup", "#27a"),
        ("second_engine_msgs_per_s", "second stage engine", "#aaa"),
        ("second_msgs_per_s_at_slo", "second stage alone at SLO", "#7a4"))
# (report key, row label, note key) of the HTML figures table
FIGURE_ROWS = (("ceiling_msgs_per_s", "ORT ceiling: sorted batches, plain session.run on the engine's session "
                "replicas (no Kafka)", None),
               ("ceiling_one_session_msgs_per_s", "ORT, one session with every core: sorted batches (no Kafka)", None),
               ("capacity_answers_per_s", "generator capacity: the scheduler, closed loop (no Kafka)", None),
               ("engine_msgs_per_s", "streamlabel engine (no Kafka)", None),
               ("fp32_engine_msgs_per_s", "streamlabel engine, FP32 (no Kafka)", None),
               ("pipeline_msgs_per_s_at_slo", "streamlabel pipeline at the SLO", None),
               ("handwritten_msgs_per_s_at_slo", "hand-written consumer at the SLO", "handwritten_note"),
               ("naive_msgs_per_s_at_slo", "naive consumer at the SLO", "naive_note"),
               ("dup50_msgs_per_s_at_slo", "pipeline, 50% duplicate texts, at the SLO", None),
               ("eos_msgs_per_s_at_slo", "pipeline, exactly-once, at the SLO", None),
               ("second_engine_msgs_per_s", "cascade's second stage alone: engine (no Kafka)", None),
               ("second_msgs_per_s_at_slo", "cascade's second stage alone: pipeline at the SLO", "second_note"),
               ("cascade_vs_second_at_slo", "cascade / second stage alone, at the SLO", None),
               ("escalation_rate_bench_texts", "share of the bench texts the cascade escalates", None))
STEP_KEYS = ("steps", "handwritten_steps", "naive_steps", "dup50_steps", "eos_steps", "second_steps")


def plots(report: dict, out_prefix: Path) -> list[Path]:
    """latency percentiles vs offered load (with the SLO line), latency over time, throughput bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    slo = report["slo"]["objective_ms"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    ours = "cascade" if report.get("cascade") else "streamlabel"
    for key, label in (("steps", ours), ("handwritten_steps", "hand-written"), ("naive_steps", "naive"),
                       ("second_steps", "second stage alone")):
        steps = [s for s in report.get(key, []) if s["labelled"]]
        if not steps:
            continue
        xs = [s["offered_rate"] for s in steps]
        for p, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p999_ms", "--")):
            ax.plot(xs, [s[p] for s in steps], style, marker="o", label=f"{label} {p[:-3]}")
    ax.axhline(slo, color="red", lw=1, label=f"SLO {slo:.0f} ms")
    ax.set_xlabel("offered load (events/s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_yscale("log")
    ax.set_title("latency vs offered load")
    ax.legend(fontsize=7)
    ax = axes[1]
    series = report.get("series_step") or {}
    if series.get("series"):
        xs, ys = zip(*series["series"])
        ax.plot(xs, ys, ".", ms=2)
    ax.axhline(slo, color="red", lw=1)
    ax.set_title(f"latency over time at {series.get('offered_rate', 0):.0f}/s")
    ax.set_xlabel("seconds into the step")
    ax.set_ylabel("ms")
    ax = axes[2]
    bars = {label: (report[key], color) for key, label, color in BARS if report.get(key) is not None}
    ax.bar(list(bars), [v for v, _ in bars.values()], color=[c for _, c in bars.values()])
    ax.set_ylabel("events/s")
    ax.set_title("throughput")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(f"streamlabel bench — {report['model']} on {report['machine']['cpu']} ({report['machine']['cores']} cores)",
                 fontsize=10)
    fig.tight_layout()
    png = out_prefix.with_suffix(".png")
    fig.savefig(png, dpi=110)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    files.append(png)
    html = out_prefix.with_suffix(".html")
    figures = "".join(f"<tr><td style='text-align:left'>{label}</td><td>{report[key]:.3g}</td>"
                      f"<td style='text-align:left'>{report.get(note) or ''}</td></tr>"
                      for key, label, note in FIGURE_ROWS if report.get(key) is not None)
    cpu = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
    rows = "".join(f"<tr><td>{s['name']}</td><td>{s['offered_rate']:.0f}</td><td>{s['achieved_rate']:.0f}</td>"
                   f"<td>{s['p50_ms']:.1f}</td><td>{s['p99_ms']:.1f}</td><td>{s['p999_ms']:.1f}</td>"
                   f"<td>{s['goodput']:.2%}</td><td>{s.get('backlog', 0)}</td><td>{s['lost']}</td><td>{s['duplicated']}</td>"
                   f"<td>{cpu(s.get('worker_cpu_us_per_event'))}</td><td>{cpu(s.get('engine_cpu_us_per_event'))}</td>"
                   f"<td>{'✓' if s['meets_slo'] else '✗'}</td></tr>"
                   for key in STEP_KEYS for s in report.get(key) or [])
    html.write_text(
        "<!doctype html><meta charset=utf-8><title>streamlabel bench</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style>"
        f"<h1>streamlabel bench</h1><p>{report['model']} · SLO p99 ≤ {slo:.0f} ms · {report['machine']['cpu']}</p>"
        f"<img style='max-width:100%' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        f"<table><tr><th style='text-align:left'>measured</th><th>events/s</th><th></th></tr>{figures}</table>"
        "<table><tr><th>step</th><th>offered/s</th><th>achieved/s</th><th>p50</th><th>p99</th><th>p99.9</th>"
        "<th>goodput</th><th>queued at end</th><th>lost</th><th>dup</th><th>CPU µs/ev outside engine</th>"
        f"<th>engine CPU µs/ev</th><th>SLO</th></tr>{rows}</table>"
        f"<pre>{orjson.dumps({k: v for k, v in report.items() if not k.endswith('steps') and k != 'series_step'}, option=orjson.OPT_INDENT_2).decode()}</pre>")
    files.append(html)
    return files
