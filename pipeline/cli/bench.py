"""``streamlabel bench``: open-loop load test — raw engine vs pipeline vs naive consumer, ladder, knee, JSON + plots.

The broker is started here unless ``--bootstrap`` names one; the workers are ``streamlabel run`` child
processes (``producers/loadtest.py``), the naive baseline is ``consumers/naive_baseline.py``. Ctrl-C / SIGTERM
stops the running step (its worker process is stopped), then the local broker; exit 130 / 143.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli.common import Interrupted, emit_json, positive, reachable, run_async


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
    slo_ms: Annotated[float, typer.Option(help="Latency objective: p99 must stay within this.", callback=positive)] = 250.0,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here.")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Write PLOTS.png and PLOTS.html (default: next to --json).")] = None,
    naive: Annotated[bool, typer.Option(help="Also measure the naive transformers.pipeline consumer (needs the train extra).")] = True,
    duplicates: Annotated[bool, typer.Option(help="Also measure a stream with 50% duplicate texts.")] = True,
    fp32: Annotated[bool, typer.Option(help="Also measure the FP32 engine for the INT8/FP32 ratio.")] = True,
    step_seconds: Annotated[Optional[float], typer.Option(help="Seconds of load per step.", callback=positive)] = None,
    max_batch: Annotated[int, typer.Option(help="Batch size for the engine and the workers.", callback=positive)] = 64,
    bootstrap: Annotated[Optional[str], typer.Option(help="Use this broker instead of starting a local one.")] = None,
    delivery: Annotated[Delivery, typer.Option(help="Delivery of the workers (and the label reader).")] = Delivery.at_least_once,
    compare_eos: Annotated[bool, typer.Option(help="Also run the ladder in exactly-once mode (its cost, same run).")] = False,
) -> None:
    """Open-loop load test: raw engine vs pipeline vs naive consumer, latency ladder, knee, JSON and plots."""
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
    work = Path(tempfile.mkdtemp(prefix="streamlabel-bench-"))
    broker = None
    try:
        if bootstrap is None:
            broker = LocalKafka(work / "kafka")
            with console.status("starting a local Apache Kafka broker (KRaft)…"):
                broker.start()
            bootstrap = broker.bootstrap

        async def go(stop: asyncio.Event) -> dict | None:
            return await until_stopped(stop, bench(
                artifact=art, bootstrap=bootstrap, quick=quick, rate=rate, slo_ms=slo_ms, plot_prefix=plots,
                naive=naive, duplicates=duplicates, step_seconds=step_seconds, max_batch=max_batch, fp32=fp32,
                delivery=delivery.value, compare_eos=compare_eos, console=console))

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


async def bench(*, artifact: Path, bootstrap: str, quick: bool, rate: float | None, slo_ms: float,
                plot_prefix: Path | None, naive: bool, duplicates: bool, step_seconds: float | None, max_batch: int,
                fp32: bool, delivery: str, compare_eos: bool, console) -> dict:
    """The measurements, on a running broker; the report as a dict."""
    from pipeline.model.manifest import load_manifest
    from producers import loadtest as L
    from producers.synthetic import Generator

    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    art = artifact
    _, manifest = load_manifest(art, verify=False)
    t_start = time.monotonic()
    cfg = L.BenchConfig(bootstrap=bootstrap, artifact=str(art), slo_ms=slo_ms, max_batch=max_batch,
                        step_seconds=step_seconds or (10.0 if quick else 20.0), delivery=delivery)
    texts = [ev.text for _, ev in zip(range(2048), Generator("mixed", seed=1))]
    variant = "int8" if "int8" in manifest.variants else "fp32"
    with console.status("raw engine throughput (no Kafka)…"):
        # In a thread: the loop stays free to take a Ctrl-C (the measurement finishes in seconds anyway).
        eng = await asyncio.to_thread(L.engine_throughput, str(art), texts, variant=variant, batch=max_batch,
                                      seconds=4 if quick else 8)
        eng_fp32 = (await asyncio.to_thread(L.engine_throughput, str(art), texts, variant="fp32", batch=max_batch,
                                            seconds=4 if quick else 8)) if fp32 else None
    say(f"engine ({variant}, batch {max_batch}): {eng:.0f} msgs/s" +
        (f"; fp32: {eng_fp32:.0f} msgs/s (int8/fp32 = {eng / eng_fp32:.2f}×)" if eng_fp32 else ""))
    fractions = [rate / eng] if rate else ([0.1, 0.5, 0.8, 0.95] if quick else [0.1, 0.25, 0.5, 0.7, 0.85, 0.95, 1.1])
    say(f"pipeline ladder ({len(fractions)} steps of {cfg.step_seconds:.0f} s, SLO p99 ≤ {slo_ms:.0f} ms):")
    steps = [await L.run_step(cfg, f"unique@{f:.2f}", max(1.0, f * eng), progress=say) for f in fractions]
    report: dict = {
        "model": manifest.model_id, "variant": variant, "delivery": delivery,
        "slo": {"objective_ms": slo_ms, "target": cfg.target},
        "machine": L.machine(), "batch": max_batch, "step_seconds": cfg.step_seconds,
        "engine_msgs_per_s": round(eng, 1),
        "int8_vs_fp32_engine_ratio": round(eng / eng_fp32, 2) if eng_fp32 else None,
        "fp32_engine_msgs_per_s": round(eng_fp32, 1) if eng_fp32 else None,
        "steps": [s.row() for s in steps],
    }
    knee = L.knee(steps)
    report["pipeline_msgs_per_s_at_slo"] = knee
    report["unique_msgs_per_s_at_slo"] = knee
    report["pipeline_vs_engine"] = round(knee / eng, 3) if eng else None
    low = min(steps, key=lambda s: s.offered_rate)
    report["low_load_p99_ms"] = low.p99_ms
    report["low_load_rate"] = low.offered_rate
    busiest_ok = max((s for s in steps if s.meets_slo), key=lambda s: s.offered_rate, default=steps[-1])
    report["series_step"] = {"offered_rate": busiest_ok.offered_rate, "series": busiest_ok.series}
    if compare_eos:
        import dataclasses

        say("exactly-once, same rates:")
        ecfg = dataclasses.replace(cfg, delivery="exactly_once")
        esteps = [await L.run_step(ecfg, f"eos@{f:.2f}", max(1.0, f * eng), progress=say) for f in fractions]
        report["eos_steps"] = [s.row() for s in esteps]
        report["eos_msgs_per_s_at_slo"] = L.knee(esteps)
        report["eos_vs_alo_at_slo"] = round(report["eos_msgs_per_s_at_slo"] / knee, 3) if knee else None
    if duplicates and not rate:
        say("50% duplicate texts:")
        dsteps = [await L.run_step(cfg, f"dup50@{f:.2f}", f * eng, duplicate_ratio=0.5, progress=say)
                  for f in ([1.0, 1.6] if quick else [0.95, 1.3, 1.7, 2.1])]
        report["dup50_steps"] = [s.row() for s in dsteps]
        report["dup50_msgs_per_s_at_slo"] = L.knee(dsteps)
        report["dup50_vs_unique"] = round(report["dup50_msgs_per_s_at_slo"] / knee, 2) if knee else None
    if naive and not rate:
        with console.status("naive baseline: PyTorch FP32 transformers pipeline, one message at a time…"):
            naive_cap = await asyncio.to_thread(_naive_capacity, texts)
        say(f"naive baseline capacity (in-process, one at a time): {naive_cap:.0f} msgs/s")
        cmd = [sys.executable, "-m", "consumers.naive_baseline"]
        nsteps = [await L.run_step(cfg, f"naive@{f:.2f}", max(1.0, f * naive_cap), worker_cmd=cmd, progress=say)
                  for f in ([0.3, 0.7] if quick else [0.3, 0.6, 0.8, 1.0])]
        report["naive_capacity_msgs_per_s"] = round(naive_cap, 1)
        report["naive_steps"] = [s.row() for s in nsteps]
        report["naive_msgs_per_s_at_slo"] = L.knee(nsteps)
        report["pipeline_vs_naive"] = round(knee / report["naive_msgs_per_s_at_slo"], 1) if report["naive_msgs_per_s_at_slo"] else None
    report["seconds"] = round(time.monotonic() - t_start, 1)
    if plot_prefix is not None:
        for f in L.plots(report, plot_prefix):
            say(f"wrote {f}")
    report.pop("series_step", None)
    return report


def _naive_capacity(texts) -> float:
    """Messages/s of transformers.pipeline on one text at a time, without Kafka (the ladder's scale)."""
    from consumers.naive_baseline import make_classifier

    clf = make_classifier()
    clf(texts[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3:
        clf(texts[n % len(texts)])
        n += 1
    return n / (time.perf_counter() - t0)
