"""``streamlabel bench``: open-loop load test — ORT ceiling, raw engine, pipeline, hand-written and naive consumers.

Without Kafka: the ORT ceiling (our engine's session, length-sorted batches, plain ``session.run``) and the
raw engine. Through Kafka, as ladders of offered rates: the pipeline, a hand-written consumer
(``producers/bench/handwritten.py``) at the same rates, and a naive one (``producers/bench/naive.py``)
at fractions of its own capacity; the knee of each, the ratios, the worker's CPU per event outside the
engine, JSON + plots. The broker is started here unless ``--bootstrap`` names one; the workers are child
processes (``producers/bench/harness.py``). Ctrl-C / SIGTERM stops the running step (its worker process is
stopped), then the local broker; exit 130 / 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import Interrupted, emit_json, positive, reachable, run_async


class Provider(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


class Delivery(str, Enum):
    at_least_once = "at_least_once"
    exactly_once = "exactly_once"


def bench_cmd(
    model: Annotated[Optional[Path], typer.Option(help="Artifact directory (default: models/PRESET; built from "
                                                       "--preset when missing).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Preset to use and build when missing (default: "
                                                       "sentiment-minilm).")] = None,
    quick: Annotated[bool, typer.Option(help="A run of a few minutes (shorter steps, fewer rates).")] = False,
    rate: Annotated[Optional[float], typer.Option(help="One step at this offered rate instead of the ladder.",
                                                  callback=positive)] = None,
    slo_ms: Annotated[Optional[float], typer.Option(help="Latency objective: p99 must stay within this (default: 250 ms; "
                                                           "5000 ms for generators).", callback=positive)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generators: tokens generated per event (the same for every "
                                                     "system measured).", callback=positive)] = 32,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here.")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Write PLOTS.png and PLOTS.html (default: next to --json).")] = None,
    naive: Annotated[bool, typer.Option(help="Also measure the naive transformers.pipeline consumer (needs the train extra).")] = True,
    handwritten: Annotated[bool, typer.Option(help="Also measure the hand-written aiokafka + ONNX Runtime consumer "
                                                   "at the pipeline's offered rates.")] = True,
    duplicates: Annotated[bool, typer.Option(help="Also measure a stream with 50% duplicate texts.")] = True,
    fp32: Annotated[bool, typer.Option(help="Also measure the FP32 engine for the INT8/FP32 ratio.")] = True,
    step_seconds: Annotated[Optional[float], typer.Option(help="Seconds of load per step.", callback=positive)] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Batch size for the engine and the workers (default 64; 32 "
                                                          "decode rows for generators).", callback=positive)] = None,
    bootstrap: Annotated[Optional[str], typer.Option(help="Use this broker instead of starting a local one.")] = None,
    delivery: Annotated[Delivery, typer.Option(help="Delivery of the workers (and the label reader).")] = Delivery.at_least_once,
    compare_eos: Annotated[bool, typer.Option(help="Also run the ladder in exactly-once mode (its cost, same run).")] = False,
    cascade_first: Annotated[Optional[Path], typer.Option(help="Serve a cascade: this artifact first, the --model artifact "
                                                               "for the texts it is unsure of (the engine figure and "
                                                               "the ladder are the cascade's).")] = None,
    cascade_threshold: Annotated[float, typer.Option(help="With --cascade-first: the escalation threshold.")] = 0.9,
    refine_steps: Annotated[int, typer.Option(help="Extra steps per ladder that bisect its knee (0: the ladder only).")] = 2,
    engine_only: Annotated[bool, typer.Option(help="Only the ORT ceiling and the engine, no Kafka (e.g. on a GPU "
                                                   "machine); with --provider, --variant, --engine-batches.")] = False,
    provider: Annotated[Provider, typer.Option(help="Execution provider for --engine-only.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="Variant for --engine-only (default: int8 on CPU, fp16 on "
                                                        "CUDA).")] = None,
    engine_batches: Annotated[Optional[str], typer.Option(help="--engine-only: comma-separated batch sizes "
                                                               "(default: --max-batch).", callback=lambda v: v and ",".join(map(str, parse_batches(v, 0))))] = None,
) -> None:
    """Open-loop load test: ORT ceiling, raw engine, pipeline, hand-written and naive consumers; knees, JSON, plots."""
    from rich.console import Console

    from pipeline import logs
    from pipeline.cli.demo import build_model, find_model, model_slot
    from pipeline.cli.local_services import LocalKafka
    from pipeline.config import Settings

    logs.configure("warning", "console")
    console = Console(stderr=True, soft_wrap=True)
    if plots is None and json_file is not None:
        plots = json_file.with_suffix("")
    for f in (json_file, plots):
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
    path, name, strict = model_slot(model, preset)
    art = find_model(path, name, strict=strict, where="bench")
    if bootstrap is not None:
        _, sig = run_async(lambda stop: reachable(Settings().replace(kafka={"bootstrap_servers": bootstrap}), "bench"))
        if sig is not None:
            raise Interrupted(sig)
    if art is None:
        art = build_model(path, name, console)
    from pipeline.manifest import load_manifest

    generating = load_manifest(art, verify=False)[1].task == "text-generation"
    slo_ms = slo_ms or (5000.0 if generating else 250.0)
    max_batch = max_batch or (32 if generating else 64)
    if engine_only and generating:
        from producers.bench.generator import capacity, texts

        return emit_json(capacity(str(art), texts(), max_batch=max_batch, max_new=max_new_tokens, template="reply",
                                  variant=variant, provider=(provider or Provider.auto).value))
    if engine_only:
        return engine_bench(art, provider=(provider or Provider.auto).value, variant=variant, json_file=json_file,
                            batches=parse_batches(engine_batches, max_batch), seconds=step_seconds or 5.0,
                            console=console)
    work = Path(tempfile.mkdtemp(prefix="streamlabel-bench-"))
    broker = None
    try:
        if bootstrap is None:
            broker = LocalKafka(work / "kafka")
            with console.status("starting a local Apache Kafka broker (KRaft)…"):
                broker.start()
            bootstrap = broker.bootstrap

        from producers.bench.ladder import bench

        async def go(stop: asyncio.Event) -> dict | None:
            return await until_stopped(stop, bench(
                artifact=art, bootstrap=bootstrap, quick=quick, rate=rate, slo_ms=slo_ms, plot_prefix=plots,
                naive=naive, handwritten=handwritten, duplicates=duplicates, step_seconds=step_seconds, max_batch=max_batch, fp32=fp32,
                delivery=delivery.value, compare_eos=compare_eos, refine_steps=refine_steps, console=console,
                cascade=(str(cascade_first), cascade_threshold) if cascade_first else None,
                max_new_tokens=max_new_tokens, gen_variant=variant))

        report, sig = run_async(go)
    finally:
        if broker is not None:
            with console.status("stopping the local broker…"), contextlib.suppress(Exception):
                broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    if sig is not None:
        raise Interrupted(sig)
    if json_file is not None:
        import orjson

        json_file.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    emit_json({k: v for k, v in report.items() if not k.endswith("steps")})


def parse_batches(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) <= 0:
        raise typer.BadParameter(f"expected comma-separated whole numbers greater than 0, got {text!r}")
    return out


def engine_bench(art: Path, *, provider: str, variant: str | None, json_file: Path | None, batches: list[int],
                 seconds: float, console) -> None:
    """``--engine-only``: ceiling and engine per batch size on one provider; no broker."""
    from producers.bench.engine import measure

    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    with console.status(f"ORT ceiling and engine ({provider}) at batch {', '.join(map(str, batches))}…"):
        report = measure(str(art), variant=variant, provider=provider, batches=batches, seconds=seconds, say=say)
    if json_file is not None:
        import orjson

        json_file.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    emit_json(report)


async def until_stopped(stop: asyncio.Event, coro) -> object | None:
    """Run ``coro`` until it returns, or until ``stop`` (then cancel it: its cleanup runs; returns ``None``)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
