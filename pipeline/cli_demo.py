"""``streamlabel demo`` and ``streamlabel produce``: part of the CLI composition root (wires consumers + producers)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from pipeline import logs
from pipeline.config import Settings
from pipeline.errors import UsageError


def ensure_model(path: Path, preset: str, console) -> Path:
    from pipeline.model.manifest import resolve_artifact_dir

    try:
        return resolve_artifact_dir(path)
    except UsageError:
        pass
    console.print(f"[bold]no model at {path}[/]: building the {preset} preset once (fine-tuning takes minutes on 2 cores)")
    from pipeline.model.build import Reporter, build

    res = build(out=path.parent, preset=preset, name=path.name, reporter=Reporter(console=console))
    console.print(f"[green]✓[/] built {res.manifest.model_id} in {res.seconds:.0f} s")
    return res.path


async def demo(*, settings: Settings, events: int | None, rate: float, as_json: bool, model: Path, preset: str,
               bootstrap: str | None, redis_url: str | None, bad_ratio: float, seed: int) -> dict:
    from rich.console import Console

    from consumers.runner import serve
    from pipeline.events import encode_input
    from producers.loadtest import pct
    from producers.local_services import LocalKafka, LocalRedis
    from producers.rate import producer_for_load, send_at_rate
    from producers.synthetic import Generator
    from producers.topics import ensure_topics, read_until

    console = Console(stderr=True)
    artifact = ensure_model(model, preset, console)
    work = Path(tempfile.mkdtemp(prefix="streamlabel-demo-"))
    broker = redis = None
    tag = uuid.uuid4().hex[:6]
    try:
        if bootstrap is None:
            with console.status("starting a local Apache Kafka broker (KRaft)…"):
                broker = LocalKafka(work / "kafka").start()
            bootstrap = broker.bootstrap
            console.print(f"[green]✓[/] Kafka on {bootstrap}")
        if redis_url == "none":
            redis_url = None
            console.print("running with the in-process cache only (--redis none)")
        elif redis_url is None:
            if LocalRedis.available():
                redis = LocalRedis(workdir=work / "redis").start()
                redis_url = redis.url
                console.print(f"[green]✓[/] redis-server on {redis_url}")
            else:
                console.print("[yellow]redis-server is not installed: using the in-process cache only[/]")
        s = settings.replace(
            kafka={"bootstrap_servers": bootstrap, "group_id": f"demo-{tag}"},
            topics={"input": f"demo-in-{tag}", "output": f"demo-labels-{tag}", "dlq": f"demo-dlq-{tag}"},
            model={"path": str(artifact)},
            cache={"redis_url": redis_url},
            metrics={"summary_interval_s": 3600.0},
        )
        await ensure_topics(bootstrap, [s.topics.input, s.topics.output, s.topics.dlq])
        holder: dict = {}
        worker_task = asyncio.create_task(serve(s, name="demo", install_signals=False,
                                                on_ready=lambda w: holder.setdefault("w", w)))
        while "w" not in holder or not holder["w"].ready.is_set():
            if worker_task.done():
                worker_task.result()
                raise UsageError("the worker stopped during start-up")
            await asyncio.sleep(0.05)  # waiting for the worker's assignment, bounded by the broker's start
        w = holder["w"]
        console.print(f"[green]✓[/] worker on {w.engine.model_id} ({w.engine.variant}), topics {s.topics.input} → "
                      f"{s.topics.output} (DLQ {s.topics.dlq}); SLO {s.slo.target:.0%} within {s.slo.objective_ms:.0f} ms")

        gen = Generator("mixed", seed=seed, duplicate_ratio=0.2)
        import random

        rng = random.Random(seed)

        def records():
            for ev in gen:
                if bad_ratio and rng.random() < bad_ratio:
                    yield None, rng.choice([b'{"text": ', b"\xff\xfe", b'{"text": 7}', b'{"id": "no-text"}'])
                else:
                    yield ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity)

        producer = producer_for_load(bootstrap)
        await producer.start()
        live_stop = asyncio.Event()
        live = asyncio.create_task(_live(console, w, live_stop, as_json))
        try:
            rep = await send_at_rate(producer, s.topics.input, records(), rate=rate, count=events)
        finally:
            await producer.stop()
        produced = rep.acked
        # Wait until the worker has answered everything it was given (bounded), then count from the topics.
        deadline = time.monotonic() + 120
        while w.labelled + w.dead_lettered < produced and time.monotonic() < deadline and not worker_task.done():
            await asyncio.sleep(0.1)  # polling the worker's counters only to know when to read the topics
        live_stop.set()
        await live
        out = await read_until(bootstrap, [s.topics.output, s.topics.dlq], lambda r: len(r) >= produced, 30)
        w.stop()
        await worker_task
        labels = [orjson.loads(r.value) for r in out if r.topic == s.topics.output]
        dlq = sum(1 for r in out if r.topic == s.topics.dlq)
        ids = {d["id"] for d in labels}
        lat = sorted(r.timestamp - d["produced_at"] for r, d in zip([r for r in out if r.topic == s.topics.output], labels))
        good = sum(1 for x in lat if x <= s.slo.objective_ms)
        result = {
            "produced": produced, "labelled": len(ids), "dlq": dlq, "lost": produced - len(ids) - dlq,
            "duplicates": len(labels) - len(ids),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "goodput": round(good / len(lat), 4) if lat else 0.0,
            "offered_rate": rate, "achieved_rate": round(rep.achieved_rate, 1),
            "cache_hit_ratio": round(w.cache_hits / w.cache_lookups, 3) if w.cache_lookups else 0.0,
            "model": w.engine.model_id, "variant": w.engine.variant,
            "slo": {"objective_ms": s.slo.objective_ms, "target": s.slo.target},
        }
        for warning in rep.warnings:
            console.print(f"[yellow]{warning}[/]")
        return result
    finally:
        if redis is not None:
            redis.stop()
        if broker is not None:
            with contextlib.suppress(Exception):
                broker.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _live(console, w, stop: asyncio.Event, quiet: bool) -> None:
    t0 = time.monotonic()
    last = 0
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        snap = w.slo.snapshot()
        now = time.monotonic()
        rate = (w.labelled - last) / max(1e-6, now - t0)
        t0, last = now, w.labelled
        line = (f"labelled {w.labelled:>7}  dlq {w.dead_lettered:>4}  {rate:7.1f}/s  p50 {snap.p50_ms:6.1f} ms  "
                f"p99 {snap.p99_ms:6.1f} ms  goodput {snap.goodput:6.2%}  cache hits "
                f"{(w.cache_hits / w.cache_lookups if w.cache_lookups else 0):5.1%}  batches {w.batcher.batches}")
        if not quiet or sys.stderr.isatty():  # --json into a pipe: keep stderr for errors only
            console.print(line, highlight=False)


async def produce_cmd(*, bootstrap: str, topic: str, rate: float, count: int | None, duration: float | None,
                      profile: str, duplicate_ratio: float, seed: int, poisson: bool) -> dict:
    from rich.console import Console

    from pipeline.events import encode_input
    from producers.rate import producer_for_load, send_at_rate
    from producers.synthetic import Generator
    from producers.topics import ensure_topics

    console = Console(stderr=True)
    await ensure_topics(bootstrap, [topic])
    gen = Generator(profile, seed=seed, duplicate_ratio=duplicate_ratio)
    recs = ((ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity, label=ev.label))
            for ev in gen)
    p = producer_for_load(bootstrap)
    await p.start()
    try:
        rep = await send_at_rate(p, topic, recs, rate=rate, count=count, duration_s=duration, poisson=poisson, seed=seed,
                                 on_progress=lambda r: console.print(
                                     f"sent {r.sent}  {r.sent / r.seconds:7.1f}/s of {r.offered_rate:.0f}/s", highlight=False))
    finally:
        await p.stop()
    for wmsg in rep.warnings:
        console.print(f"[yellow]{wmsg}[/]")
    return {"topic": topic, "sent": rep.sent, "acked": rep.acked, "failed": rep.failed, "seconds": round(rep.seconds, 2),
            "offered_rate": rate, "achieved_rate": round(rep.achieved_rate, 1)}
