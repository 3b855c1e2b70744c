"""``streamlabel demo``: a local broker + Redis, a model, a worker in this process, a synthetic feed, live figures.

Phases, and how each stops on Ctrl-C / SIGTERM: finding or building the model and starting local services
are synchronous (the signal unwinds them, and whatever was started is stopped); the feed and the worker
run on an event loop, where the signal stops the feed, stops the worker (it drains and commits), and the
local services are stopped last. Exit 130 (SIGINT) or 143 (SIGTERM), no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from pipeline.cli.common import ConfigOpt, Interrupted, emit_json, positive, reachable, run_async, settings, share

if TYPE_CHECKING:
    from pipeline.config import Settings

DEFAULT_PRESET = "sentiment-minilm"
DEMO_PRESET = "sentiment-quick"  # the first run: a model trained in about two minutes; the full one: --preset sentiment-minilm
GEN_PRESET = "reply-smollm2"
GEN_TASKS = ("reply", "summary", "explain-label")
MODELS = Path("models")


def demo_cmd(
    config: ConfigOpt = None,
    events: Annotated[Optional[int], typer.Option(help="Stop after this many events (default: run until Ctrl-C).",
                                                  callback=positive)] = None,
    rate: Annotated[float, typer.Option(help="Offered events per second (open loop).", callback=positive)] = 100.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final figures as JSON on stdout.")] = False,
    model: Annotated[Optional[Path], typer.Option(help="Artifact directory (default: models/PRESET); built from "
                                                       "--preset when missing.")] = None,
    preset: Annotated[Optional[str], typer.Option(help=f"Preset to use and build when missing (default: "
                                                       f"{DEMO_PRESET}, trained in about two minutes; the full model: "
                                                       f"{DEFAULT_PRESET}).")] = None,
    bootstrap: Annotated[Optional[str], typer.Option(help="Use this broker instead of starting a local one.")] = None,
    redis_url: Annotated[Optional[str], typer.Option("--redis", help="Use this Redis instead of starting "
                                                                     "redis-server ('none': in-process cache only).")] = None,
    bad_ratio: Annotated[float, typer.Option(help="Share of deliberately malformed events (they go to the DLQ).",
                                             callback=share)] = 0.005,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
    task: Annotated[str, typer.Option(help="label (the classifier) | reply | summary | explain-label (the generator, "
                                           "on a support stream for reply; default preset reply-smollm2).")] = "label",
) -> None:
    """Everything on this machine: local Kafka + Redis, a model (sentiment, or a generator with --task), a worker, a synthetic feed, live figures."""
    from rich.console import Console

    from pipeline import logs
    from pipeline.errors import UsageError

    if task not in ("label", *GEN_TASKS):
        raise UsageError(f"unknown task '{task}'", where="demo --task", hint=f"use label, {', '.join(GEN_TASKS)}")
    generating = task != "label"
    gen_sections: dict = {}
    if generating:
        preset = preset or (GEN_PRESET if model is None else None)
        gen_sections = {"generate": {"template": task}}
        rate = rate if rate != 100.0 else 2.0  # a 135M LLM on 2 cores answers a few events per second
    s = settings(config, kafka={"bootstrap_servers": bootstrap}, **gen_sections)
    if generating and s.slo.objective_ms < 1000:
        s = s.replace(slo={"objective_ms": 5000.0})  # a generation's deadline: seconds, not the classifier's 100 ms
    logs.configure("warning", "console")
    console = Console(stderr=True, soft_wrap=True)
    path, name, strict = model_slot(model, preset, DEMO_PRESET)
    artifact = find_model(path, name, strict=strict, where="demo")
    if bootstrap is not None:  # an unreachable broker is said before minutes of model building, not after
        _, sig = run_async(lambda stop: reachable(s, "demo"), drain_s=s.worker.drain_timeout_s)
        if sig is not None:
            raise Interrupted(sig)
    if artifact is None:
        artifact = build_model(path, name, console)
    accuracy = model_accuracy(artifact)
    if accuracy:
        console.print(f"model {accuracy['model']} ({accuracy['variant']}): accuracy {accuracy['accuracy']:.3f}, "
                      f"macro-F1 {accuracy['macro_f1']:.3f} on {accuracy['n']} held-out examples"
                      + (f"  [dim](the full model: --preset {DEFAULT_PRESET})[/]" if name == DEMO_PRESET and model is None else ""))

    from pipeline.cli.local_services import LocalKafka, LocalRedis

    work = Path(tempfile.mkdtemp(prefix="streamlabel-demo-"))
    broker = redis = None
    tag = uuid.uuid4().hex[:6]
    try:
        if bootstrap is None:
            broker = LocalKafka(work / "kafka")
            with console.status("starting a local Apache Kafka broker (KRaft)…"):
                broker.start()
            bootstrap = broker.bootstrap
            console.print(f"[green]✓[/] Kafka on {bootstrap}")
        if redis_url == "none":
            redis_url = None
            console.print("running with the in-process cache only (--redis none)")
        elif redis_url is None:
            if LocalRedis.available():
                redis = LocalRedis(workdir=work / "redis")
                redis.start()
                redis_url = redis.url
                console.print(f"[green]✓[/] redis-server on {redis_url}")
            else:
                console.print("[yellow]redis-server is not installed: using the in-process cache only[/]")
        ds = s.replace(
            kafka={"bootstrap_servers": bootstrap, "group_id": f"demo-{tag}"},
            topics={"input": f"demo-in-{tag}", "output": f"demo-labels-{tag}", "dlq": f"demo-dlq-{tag}"},
            model={"path": str(artifact)},
            cache={"redis_url": redis_url},
            metrics={"summary_interval_s": 3600.0},
        )
        result, sig = run_async(lambda stop: demo(ds, stop, events=events, rate=rate, as_json=json_out,
                                                  bad_ratio=bad_ratio, seed=seed, console=console,
                                                  profile="support" if task == "reply" else "news" if task == "summary"
                                                  else "mixed"),
                                drain_s=s.worker.drain_timeout_s)
    finally:
        if redis is not None:
            redis.stop()
        if broker is not None:
            with console.status("stopping the local broker…"), contextlib.suppress(Exception):
                broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    if sig is not None:
        raise Interrupted(sig)
    if accuracy and result is not None:
        result["model_accuracy"] = accuracy["accuracy"]
    if json_out:
        keys = ("produced", "labelled", "dlq", "lost", "p50_ms", "p99_ms", "goodput")
        emit_json({**{k: result[k] for k in keys}, **{k: v for k, v in result.items() if k not in keys}})
    else:
        console.print(result)
    if result["lost"]:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ model slot
def model_accuracy(artifact: Path) -> dict | None:
    """The quality figures the build measured for the variant this machine runs (None if it measured none)."""
    from pipeline.manifest import load_manifest

    _, m = load_manifest(artifact, verify=False)
    if m.task != "text-classification":
        return None  # a generator's gate figures are exact match and ROUGE-L, printed by `model info`
    v = next((m.variants[n] for n in ("int8", "fp32") if n in m.variants and (m.variants[n].quality or {}).get("accuracy")
              is not None), None)
    if v is None:
        return None
    return {"model": m.model_id, "variant": v.name, "accuracy": v.quality["accuracy"],
            "macro_f1": v.quality["macro_f1"], "n": v.quality.get("n")}


def model_slot(model: Optional[Path], preset: Optional[str], default: str = DEFAULT_PRESET) -> tuple[Path, str, bool]:
    """Where the artifact lives, which preset fills that slot, and whether what is there must be that preset.

    The default path follows the preset (``models/<preset>``), so one preset never builds into another's
    slot. Only an explicit ``--model`` without ``--preset`` takes whatever artifact is there.
    """
    name = preset or default
    path = model if model is not None else MODELS / name
    return path, name, not (model is not None and preset is None)


def find_model(path: Path, preset: str, *, strict: bool, where: str) -> Path | None:
    """The artifact at ``path`` (``None``: nothing there, build it); with ``strict`` it must be ``preset``'s."""
    from pipeline.errors import ModelError, UsageError
    from pipeline.model import presets
    from pipeline.manifest import load_manifest, resolve_artifact_dir

    from pipeline.model.generative import GEN_PRESETS

    try:
        if preset not in GEN_PRESETS:
            presets.get(preset)
    except ModelError as exc:
        raise UsageError(exc.message, where=f"{where} --preset", hint=exc.hint) from None
    try:
        root = resolve_artifact_dir(path)
    except ModelError:
        return None
    if strict:
        _, m = load_manifest(root, verify=False)
        made_from = m.training.get("preset")
        if preset not in (m.name, made_from):
            what = m.model_id + (f" (preset {made_from})" if made_from and made_from != m.name else "")
            hint = (f"use --model {MODELS / preset} for {preset}, or drop --preset to run {m.model_id}"
                    if path != MODELS / preset else
                    f"move it out of {path} to build {preset} there, or pass --model DIR to run it")
            raise UsageError(f"the artifact at {path} is {what}, not the {preset} preset", where=f"{where} --model",
                             hint=hint)
    return root


def build_model(path: Path, preset: str, console) -> Path:
    """Build ``preset`` into ``path`` (``OUT/NAME``) once; synchronous, so Ctrl-C stops it."""
    from pipeline.model.build import Reporter
    from pipeline.model.generative import GEN_PRESETS, build_generator
    from pipeline.model.recipes import build_classifier

    if preset in GEN_PRESETS:
        console.print(f"[bold]no model at {path}[/]: building the {preset} preset once (a few minutes on 2 cores)")
        res = build_generator(out=path.parent, preset=preset, name=path.name, reporter=Reporter(console=console))
        console.print(f"[green]✓[/] built {res.manifest.model_id} in {res.seconds:.0f} s")
        return res.path
    from pipeline.runtime import available_providers

    console.print(f"[bold]no model at {path}[/]: building the {preset} preset once (training takes minutes on 2 cores)")
    # Without a GPU the FP16 variant would only be built and checked, never served: the first run skips it.
    gpu = "CUDAExecutionProvider" in available_providers()
    res = build_classifier(out=path.parent, preset=preset, name=path.name, reporter=Reporter(console=console),
                           variants=("fp32", "int8", "fp16") if gpu else ("fp32", "int8"))
    console.print(f"[green]✓[/] built {res.manifest.model_id} in {res.seconds:.0f} s")
    return res.path


# ------------------------------------------------------------------------------------------ the run
async def demo(s: Settings, stop: asyncio.Event, *, events: int | None, rate: float, as_json: bool, bad_ratio: float,
               seed: int, console, profile: str = "mixed") -> dict | None:
    """Worker + feed until ``events`` are answered (then figures counted from the topics) or ``stop``."""
    import random

    import orjson

    from consumers.runner import serve
    from pipeline.cli.common import require_topics, start_client
    from pipeline.events import encode_input
    from producers.bench.harness import pct
    from producers.rate import producer_for_load, send_at_rate
    from producers.synthetic import Generator
    from producers.topics import read_until

    await require_topics(s, {"input": s.topics.input, "output": s.topics.output, "dlq": s.topics.dlq},
                         where="demo", create=True)
    holder: dict = {}
    have_worker = asyncio.Event()

    def on_ready(w) -> None:
        holder["w"] = w
        have_worker.set()

    worker_task = asyncio.create_task(serve(s, name="demo", install_signals=False, on_ready=on_ready))
    live_stop = asyncio.Event()
    live = None
    try:
        if not await _started(worker_task, have_worker, holder, stop):
            return None
        w = holder["w"]
        console.print(f"[green]✓[/] worker on {w.task.engine.model_id} ({w.task.engine.variant}), topics {s.topics.input} → "
                      f"{s.topics.output} (DLQ {s.topics.dlq}); SLO {s.slo.target:.0%} within {s.slo.objective_ms:.0f} ms")
        gen = Generator(profile, seed=seed, duplicate_ratio=0.2)
        rng = random.Random(seed)
        inputs_by_id: dict[str, str] = {}

        def records():
            for ev in gen:
                if len(inputs_by_id) < 50:
                    inputs_by_id[ev.id] = ev.text
                if bad_ratio and rng.random() < bad_ratio:
                    yield None, rng.choice([b'{"text": ', b"\xff\xfe", b'{"text": 7}', b'{"id": "no-text"}'])
                else:
                    yield ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity)

        producer = producer_for_load(s)
        await start_client(s, producer, "demo")
        live = asyncio.create_task(_live(console, holder, live_stop, as_json))
        try:
            rep = await send_at_rate(producer, s.topics.input, records(), rate=rate, count=events, stop=stop)
        finally:
            await producer.stop()
        if stop.is_set():
            return None
        produced = rep.acked
        # Wait until the worker has answered everything it was given (bounded), then count from the topics.
        deadline = time.monotonic() + 120
        while (holder["w"].labelled + holder["w"].dead_lettered < produced and time.monotonic() < deadline
               and not worker_task.done()):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)  # polling the worker's counters (or a stop)
            if stop.is_set():
                return None
        live_stop.set()
        await live
        out = await read_until(s, [s.topics.output, s.topics.dlq], lambda r: len(r) >= produced or stop.is_set(), 30)
        if stop.is_set():
            return None
        w = holder["w"]
        labels = [orjson.loads(r.value) for r in out if r.topic == s.topics.output]
        dlq = sum(1 for r in out if r.topic == s.topics.dlq)
        ids = {d["id"] for d in labels}
        lat = sorted(r.timestamp - d["produced_at"] for r, d in zip([r for r in out if r.topic == s.topics.output], labels))
        good = sum(1 for x in lat if x <= s.slo.objective_ms)
        for warning in rep.warnings:
            console.print(f"[yellow]{warning}[/]")
        extra: dict = {}
        if w.task.kind == "generate":
            fresh = [d for d in labels if not d["cached"]]
            extra = {"task": s.generate.template, "tokens_per_answer": round(sum(d["tokens"] for d in labels) / max(1, len(labels)), 1),
                     "ttft_p50_ms": pct([d["latency_ms"]["ttft"] for d in fresh], 50) if fresh else None,
                     "samples": [{"in": inputs_by_id.get(d["id"], ""), "out": d["text"], "finish_reason": d["finish_reason"]}
                                 for d in labels[:3] if d["id"] in inputs_by_id]}
            if not as_json:
                for x in extra["samples"]:
                    console.print(f"[dim]in :[/] {x['in']}\n[bold]out:[/] {x['out']}  [dim]({x['finish_reason']})[/]",
                                  highlight=False)
        return {
            "produced": produced, "labelled": len(ids), "dlq": dlq, "lost": produced - len(ids) - dlq,
            "duplicates": len(labels) - len(ids),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "goodput": round(good / len(lat), 4) if lat else 0.0,
            "offered_rate": rate, "achieved_rate": round(rep.achieved_rate, 1),
            "cache_hit_ratio": round(w.cache_hits / w.cache_lookups, 3) if w.cache_lookups else 0.0,
            "model": w.task.engine.model_id, "variant": w.task.engine.variant,
            "slo": {"objective_ms": s.slo.objective_ms, "target": s.slo.target}, **extra,
        }
    finally:
        live_stop.set()
        if live is not None:
            with contextlib.suppress(Exception):
                await live
        if "w" in holder:
            holder["w"].stop()  # drains in-flight work and commits (bounded by worker.drain_timeout_s)
        if not worker_task.done() and "w" not in holder:
            worker_task.cancel()  # still loading the model or joining the group: nothing to drain
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task


async def _started(worker_task: asyncio.Task, have_worker: asyncio.Event, holder: dict, stop: asyncio.Event) -> bool:
    """Wait for the worker's first assignment; ``False`` on a stop; the worker's error if it fails first."""
    from pipeline.errors import UsageError

    async def ready() -> None:
        await have_worker.wait()
        await holder["w"].ready.wait()

    waiter, stopper = asyncio.ensure_future(ready()), asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({waiter, stopper, worker_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        stopper.cancel()
    if worker_task in done:
        worker_task.result()  # the worker's own error, if it raised one
        raise UsageError("the worker stopped during start-up", where="demo", hint="see the log lines above")
    return waiter in done and not stop.is_set()


async def _live(console, holder: dict, stop: asyncio.Event, quiet: bool) -> None:
    """One line a second: rate, latency percentiles, goodput, cache hits, batches."""
    t0 = time.monotonic()
    last = 0
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        w = holder["w"]
        snap = w.slo.snapshot()
        now = time.monotonic()
        rate = (w.labelled - last) / max(1e-6, now - t0)
        t0, last = now, w.labelled
        line = (f"labelled {w.labelled:>7}  dlq {w.dead_lettered:>4}  {rate:7.1f}/s  p50 {snap.p50_ms:6.1f} ms  "
                f"p99 {snap.p99_ms:6.1f} ms  goodput {snap.goodput:6.2%}  cache hits "
                f"{(w.cache_hits / w.cache_lookups if w.cache_lookups else 0):5.1%}  batches {w.batcher.batches}")
        if w.task.kind == "generate":
            line = (f"answered {w.labelled:>5}  dlq {w.dead_lettered:>3}  {rate:5.1f}/s  p50 {snap.p50_ms:7.0f} ms  "
                    f"p99 {snap.p99_ms:7.0f} ms  goodput {snap.goodput:6.2%}  tokens {w.batcher.tokens:>6}  "
                    f"decode rows {w.batcher.running:>2}  waiting {w.batcher.waiting():>3}  cache hits "
                    f"{(w.cache_hits / w.cache_lookups if w.cache_lookups else 0):5.1%}")
        if not quiet or sys.stderr.isatty():  # --json into a pipe: keep stderr for errors only
            console.print(line, highlight=False)
