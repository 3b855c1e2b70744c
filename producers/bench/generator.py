"""``streamlabel bench`` for generator artifacts: closed-loop capacity, the open-loop ladder through Kafka,
and the naive ``transformers`` ``generate()`` consumer at its own ladder, in one run.

Every answer is exactly ``max_new_tokens`` long for everyone (``generate.ignore_eos``), so an event is the
same work in every system; the SLO is on end-to-end latency (input record timestamp → output append time).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from producers.bench import harness as L
from producers.bench.generator_check import texts  # noqa: F401 — the bench's prompts, shared

LADDER = {False: (0.15, 0.3, 0.5, 0.7, 0.85, 1.0, 1.2), True: (0.2, 0.5, 0.8, 1.0)}
NAIVE_LADDER = {False: (0.3, 0.5, 0.7, 0.85, 1.0), True: (0.4, 0.7, 1.0)}


def capacity(artifact: str, prompts_text: list[str], *, max_batch: int, max_new: int, template: str,
             variant: str | None, provider: str = "cpu") -> dict:
    """Closed loop, no Kafka, with the worker's admission settings (``generator_check.capacity``)."""
    from pipeline.generation import GenerativeModel
    from producers.bench.generator_check import capacity as closed_loop

    model = GenerativeModel(artifact, variant=variant, provider=provider)
    try:
        r = asyncio.run(closed_loop(model, prompts_text, max_batch, max_new, template=template))
        return {**r, "variant": model.variant, "provider": model.providers[0]}
    finally:
        model.close()


def naive_capacity(prompts_text: list[str], *, max_new: int, template: str, n: int = 3) -> float:
    """In-process answers/s of the naive baseline (``generate()`` one message at a time, PyTorch FP32)."""
    from producers.bench.naive_generate import answer, make_generator

    model, tok = make_generator()
    answer(model, tok, prompts_text[0], template, max_new, True)
    t0 = time.perf_counter()
    for t in prompts_text[1:n + 1]:
        answer(model, tok, t, template, max_new, True)
    return n / (time.perf_counter() - t0)


async def bench_generator(*, artifact: Path, manifest, bootstrap: str, quick: bool, rate: float | None, slo_ms: float,
                          max_batch: int, max_new: int, template: str, naive: bool, step_seconds: float | None,
                          delivery: str, refine, baseline_ladder, say, console, refine_steps: int = 2,
                          variant: str | None = None) -> dict:
    t_start = time.monotonic()
    env = {"STREAMLABEL_GENERATE__MAX_NEW_TOKENS": str(max_new), "STREAMLABEL_GENERATE__IGNORE_EOS": "true",
           "STREAMLABEL_GENERATE__TEMPLATE": template}
    cfg = L.BenchConfig(bootstrap=bootstrap, artifact=str(artifact), slo_ms=slo_ms, max_batch=max_batch,
                        step_seconds=step_seconds or (20.0 if quick else 30.0), delivery=delivery, env=env,
                        variant=variant)
    ts = texts()
    with console.status("closed-loop capacity of the generator (no Kafka)…"):
        cap = await asyncio.to_thread(capacity, str(artifact), ts, max_batch=max_batch, max_new=max_new,
                                      template=template, variant=variant)
    say(f"generator capacity ({cap['variant']}, {max_batch} rows, {max_new} new tokens, no Kafka): "
        f"{cap['answers_per_s']:.2f} answers/s, {cap['tokens_per_s']:.0f} output tokens/s")
    fractions = [rate / cap["answers_per_s"]] if rate else list(LADDER[quick])
    rates = [(f, max(0.2, f * cap["answers_per_s"])) for f in fractions]
    say(f"pipeline ladder ({len(rates)} steps of {cfg.step_seconds:.0f} s, SLO p99 ≤ {slo_ms:.0f} ms):")
    steps = [await L.run_step(cfg, f"gen@{f:.2f}", r, progress=say) for f, r in rates]
    if not rate:
        steps += await refine(steps, lambda r: L.run_step(cfg, f"gen@{r / cap['answers_per_s']:.2f}", r, progress=say),
                              say, rounds=refine_steps)
    knee = L.knee(steps)
    ks = L.knee_step(sorted(steps, key=lambda s: s.offered_rate))
    report: dict = {
        "model": manifest.model_id, "task": "text-generation", "variant": cap["variant"], "delivery": delivery,
        "slo": {"objective_ms": slo_ms, "target": cfg.target}, "machine": L.machine(), "batch": max_batch,
        "max_new_tokens": max_new, "template": template, "step_seconds": cfg.step_seconds,
        "capacity_answers_per_s": cap["answers_per_s"], "capacity_tokens_per_s": cap["tokens_per_s"],
        "steps": [s.row() for s in steps],
        "pipeline_msgs_per_s_at_slo": knee,
        "pipeline_vs_capacity": L.ratio(knee, cap["answers_per_s"]),
        "knee_generation": ks.gen if ks is not None else None,
    }
    busiest_ok = max((s for s in steps if s.meets_slo), key=lambda s: s.offered_rate, default=steps[-1])
    report["series_step"] = {"offered_rate": busiest_ok.offered_rate, "series": busiest_ok.series}
    if naive and not rate:
        with console.status("naive baseline: transformers generate(), PyTorch FP32, one message at a time…"):
            ncap = await asyncio.to_thread(naive_capacity, ts, max_new=max_new, template=template)
        say(f"naive baseline capacity (in-process, one at a time): {ncap:.2f} answers/s")
        cmd = [sys.executable, "-m", "producers.bench.naive_generate"]
        nsteps = await baseline_ladder(cfg, [(f"naive@{f:.2f}", max(0.1, f * ncap)) for f in NAIVE_LADDER[quick]], cmd, say)
        nsteps += await refine(nsteps, lambda r: L.run_step(cfg, f"naive@{r / ncap:.2f}", r, worker_cmd=cmd, progress=say),
                               say, rounds=refine_steps)
        report["naive_capacity_msgs_per_s"] = round(ncap, 3)
        report["naive_steps"] = [s.row() for s in nsteps]
        report["naive_msgs_per_s_at_slo"], report["naive_note"] = L.at_slo(nsteps)
        report["pipeline_vs_naive"] = L.ratio(knee, report["naive_msgs_per_s_at_slo"], 1)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    return report


def summary(report: dict) -> list[str]:
    g = report.get("knee_generation") or {}

    def f(x, fmt="{:,.2f}"):
        return "–" if x is None else fmt.format(x)

    lines = [
        f"{report['model']} [{report['variant']}], {report['max_new_tokens']} new tokens per event, "
        f"SLO p99 ≤ {report['slo']['objective_ms']:.0f} ms",
        f"  capacity (no Kafka)           {f(report['capacity_answers_per_s']):>10} events/s   "
        f"{f(report['capacity_tokens_per_s'], '{:,.0f}')} tokens/s",
        f"  pipeline at the SLO           {f(report['pipeline_msgs_per_s_at_slo']):>10} events/s   "
        f"decode {f(g.get('tokens_per_s'), '{:,.0f}')} tokens/s at the knee",
        f"  TTFT p50/p99 at the knee      {f(g.get('ttft_p50_ms'), '{:,.0f}')} / {f(g.get('ttft_p99_ms'), '{:,.0f}')} ms   "
        f"per token p50/p99 {f(g.get('tpot_p50_ms'), '{:,.1f}')} / {f(g.get('tpot_p99_ms'), '{:,.1f}')} ms",
    ]
    if "naive_msgs_per_s_at_slo" in report:
        lines.append(f"  naive generate() at the SLO   {f(report['naive_msgs_per_s_at_slo']):>10} events/s   "
                     f"pipeline / naive {f(report.get('pipeline_vs_naive'), '{:,.1f}')}×")
        if report.get("naive_note"):
            lines.append(f"  note: {report['naive_note']}")
    return lines
