"""``streamlabel bench``: part of the CLI composition root (local broker + worker processes + load harness)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console


async def bench(*, artifact: Path, bootstrap: str | None, quick: bool, rate: float | None, slo_ms: float,
                json_path: Path | None, plot_prefix: Path | None, naive: bool, duplicates: bool,
                step_seconds: float | None, max_batch: int, fp32: bool, delivery: str = "at_least_once",
                compare_eos: bool = False) -> dict:
    from pipeline.cli_demo import ensure_model
    from producers import loadtest as L
    from producers.local_services import LocalKafka
    from producers.synthetic import Generator

    console = Console(stderr=True)
    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    art = ensure_model(artifact, "sentiment-minilm", console)
    from pipeline.model.manifest import load_manifest

    _, manifest = load_manifest(art, verify=False)
    work = Path(tempfile.mkdtemp(prefix="streamlabel-bench-"))
    broker = None
    t_start = time.monotonic()
    try:
        if bootstrap is None:
            with console.status("starting a local Apache Kafka broker (KRaft)…"):
                broker = LocalKafka(work / "kafka").start()
            bootstrap = broker.bootstrap
        cfg = L.BenchConfig(bootstrap=bootstrap, artifact=str(art), slo_ms=slo_ms, max_batch=max_batch,
                            step_seconds=step_seconds or (10.0 if quick else 20.0), delivery=delivery)
        texts = [ev.text for _, ev in zip(range(2048), Generator("mixed", seed=1))]
        variant = "int8" if "int8" in manifest.variants else "fp32"
        with console.status("raw engine throughput (no Kafka)…"):
            eng = L.engine_throughput(str(art), texts, variant=variant, batch=max_batch, seconds=4 if quick else 8)
            eng_fp32 = L.engine_throughput(str(art), texts, variant="fp32", batch=max_batch, seconds=4 if quick else 8) if fp32 else None
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
                naive_cap = _naive_capacity(texts)
            say(f"naive baseline capacity (in-process, one at a time): {naive_cap:.0f} msgs/s")
            cmd = [sys.executable, "-m", "producers.naive"]
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
    finally:
        if broker is not None:
            with contextlib.suppress(Exception):
                broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _naive_capacity(texts) -> float:
    """Messages/s of transformers.pipeline on one text at a time, without Kafka (the ladder's scale)."""
    from producers.naive import make_classifier

    clf = make_classifier()
    clf(texts[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3:
        clf(texts[n % len(texts)])
        n += 1
    return n / (time.perf_counter() - t0)
