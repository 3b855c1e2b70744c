"""``streamlabel bench``: the measurements on a running broker, as ladders of offered rates.

The ORT ceiling and the engine without Kafka; then the pipeline's ladder of open-loop steps (engine-scaled
fractions, the knee bisected by ``refine``), the hand-written consumer at the same rates, exactly-once at the
same rates, a stream of duplicates, and the naive consumer at fractions of its own capacity; the report, its
summary lines and plots. ``pipeline/cli/bench.py`` is the command around it (arguments, the local broker,
Ctrl-C).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path


async def bench(*, artifact: Path, bootstrap: str, quick: bool, rate: float | None, slo_ms: float,
                plot_prefix: Path | None, naive: bool, handwritten: bool, duplicates: bool, step_seconds: float | None, max_batch: int,
                fp32: bool, delivery: str, compare_eos: bool, console, refine_steps: int = 2,
                max_new_tokens: int = 32, gen_variant: str | None = None, cascade: tuple[str, float] | None = None) -> dict:
    """The measurements, on a running broker; the report as a dict."""
    from pipeline.manifest import load_manifest
    from producers.bench import harness as L
    from producers.synthetic import Generator

    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    art = artifact
    _, manifest = load_manifest(art, verify=False)
    if manifest.task == "text-generation":
        from producers.bench import generator as G

        report = await G.bench_generator(
            artifact=art, manifest=manifest, bootstrap=bootstrap, quick=quick, rate=rate, slo_ms=slo_ms,
            max_batch=max_batch, max_new=max_new_tokens, template="reply", naive=naive, step_seconds=step_seconds,
            variant=gen_variant,
            delivery=delivery, refine=refine, baseline_ladder=baseline_ladder, say=say, console=console,
            refine_steps=refine_steps)
        if plot_prefix is not None:
            for f in L.plots(report, plot_prefix):
                say(f"wrote {f}")
        report.pop("series_step", None)
        for line in G.summary(report):
            say(line)
        return report
    t_start = time.monotonic()
    cfg = L.BenchConfig(bootstrap=bootstrap, artifact=str(art), slo_ms=slo_ms, max_batch=max_batch,
                        step_seconds=step_seconds or (10.0 if quick else 20.0), delivery=delivery)
    cascade_kw: dict = {}
    if cascade is not None:
        import dataclasses
        import json

        cfg = dataclasses.replace(cfg, env={"STREAMLABEL_MODEL__CASCADE": json.dumps([cascade[0], str(art)]),
                                            "STREAMLABEL_MODEL__CASCADE_THRESHOLD": str(cascade[1])})
        cascade_kw = {"cascade_to": str(art), "threshold": cascade[1]}
    texts = [ev.text for _, ev in zip(range(2048), Generator("mixed", seed=1))]
    variant = "int8" if "int8" in manifest.variants else "fp32"
    secs = 4 if quick else 8
    with console.status("ORT ceiling and raw engine throughput (no Kafka)…"):
        # In a thread: the loop stays free to take a Ctrl-C (the measurement finishes in seconds anyway).
        ceiling_stats: dict = {}
        ceiling = await asyncio.to_thread(L.ceiling_throughput, str(art), texts, variant=variant, batch=max_batch,
                                          seconds=secs, stats=ceiling_stats)
        # The engine runs session replicas (model.sessions): also plain ORT's usual set-up, one session with
        # every core, so the replicas' own gain shows.
        from pipeline.engine import default_sessions

        ceiling_one = (await asyncio.to_thread(L.ceiling_throughput, str(art), texts, variant=variant, batch=max_batch,
                                               seconds=secs, sessions=1)) if default_sessions(os.cpu_count() or 1, False) > 1 else None
        eng_stats: dict = {}
        eng = await asyncio.to_thread(L.engine_throughput, cascade[0] if cascade else str(art), texts, variant=variant,
                                      batch=max_batch, seconds=secs, stats=eng_stats, **cascade_kw)
        eng_fp32 = (await asyncio.to_thread(L.engine_throughput, str(art), texts, variant="fp32", batch=max_batch,
                                            seconds=secs)) if fp32 else None
    say(f"ORT ceiling ({variant}, length-sorted batches of {max_batch}, plain session.run): {ceiling:.0f} msgs/s"
        + (f" (one session with every core: {ceiling_one:.0f} msgs/s)" if ceiling_one else ""))
    say(f"engine ({variant}, batch {max_batch}): {eng:.0f} msgs/s (engine/ceiling = {eng / ceiling:.2f})" +
        (f"; fp32: {eng_fp32:.0f} msgs/s (int8/fp32 = {eng / eng_fp32:.2f}×)" if eng_fp32 else ""))
    fractions = [rate / eng] if rate else ([0.1, 0.5, 0.8, 0.95] if quick else [0.1, 0.25, 0.5, 0.7, 0.85, 0.95, 1.1])
    rates = [(f, max(1.0, f * eng)) for f in fractions]
    say(f"pipeline ladder ({len(fractions)} steps of {cfg.step_seconds:.0f} s, SLO p99 ≤ {slo_ms:.0f} ms):")
    steps = [await L.run_step(cfg, f"unique@{f:.2f}", r, progress=say) for f, r in rates]
    if not rate:
        steps += await refine(steps, lambda r: L.run_step(cfg, f"unique@{r / eng:.2f}", r, progress=say), say,
                              rounds=refine_steps)
    report: dict = {
        "model": manifest.model_id, "variant": variant, "delivery": delivery,
        "cascade": {"first": cascade[0], "threshold": cascade[1]} if cascade else None,
        "slo": {"objective_ms": slo_ms, "target": cfg.target},
        "machine": L.machine(), "batch": max_batch, "step_seconds": cfg.step_seconds,
        "ceiling_msgs_per_s": round(ceiling, 1),
        "ceiling_one_session_msgs_per_s": round(ceiling_one, 1) if ceiling_one else None,
        "engine_msgs_per_s": round(eng, 1),
        "engine_vs_ceiling": L.ratio(eng, ceiling),
        "engine_host_us_per_text": eng_stats.get("host_us_per_text"),
        "engine_host_cpu_us_per_text": eng_stats.get("host_cpu_us_per_text"),
        "ceiling_cpu_us_per_text": ceiling_stats.get("cpu_us_per_text"),
        "int8_vs_fp32_engine_ratio": round(eng / eng_fp32, 2) if eng_fp32 else None,
        "fp32_engine_msgs_per_s": round(eng_fp32, 1) if eng_fp32 else None,
        "steps": [s.row() for s in steps],
    }
    knee = L.knee(steps)
    report["pipeline_msgs_per_s_at_slo"] = knee
    report["unique_msgs_per_s_at_slo"] = knee
    report["pipeline_vs_engine"] = L.ratio(knee, eng)
    report["pipeline_vs_ceiling"] = L.ratio(knee, ceiling)
    (report["worker_cpu_us_per_event"], report["engine_cpu_us_per_event"],
     report["tokenizer_cpu_us_per_event"]) = L.cpu_at_knee(steps)
    # The worker's whole CPU per event at the knee (engine threads and the rest) against what a text costs the
    # ceiling: what streaming adds on top of the model itself.
    if report["worker_cpu_us_per_event"] is not None and report["engine_cpu_us_per_event"] is not None \
            and report["ceiling_cpu_us_per_text"]:
        report["worker_vs_ceiling_cpu"] = round((report["worker_cpu_us_per_event"] + report["engine_cpu_us_per_event"])
                                                / report["ceiling_cpu_us_per_text"], 2)
    low = min(steps, key=lambda s: s.offered_rate)
    report["low_load_p99_ms"] = low.p99_ms
    report["low_load_rate"] = low.offered_rate
    report["low_load_breakdown"] = low.breakdown
    busiest_ok = max((s for s in steps if s.meets_slo), key=lambda s: s.offered_rate, default=steps[-1])
    report["series_step"] = {"offered_rate": busiest_ok.offered_rate, "series": busiest_ok.series}
    if cascade is not None:
        report.update(await _cascade_vs_second(cfg, cascade, art, manifest, texts, variant, max_batch, secs, rates,
                                               knee, eng, rate, refine_steps, say))
    if handwritten:
        say("hand-written baseline (aiokafka getmany → ONNX Runtime, sorted batches), same offered rates:")
        cmd = [sys.executable, "-m", "producers.bench.handwritten"]
        hsteps = await baseline_ladder(cfg, [(f"hand@{f:.2f}", r) for f, r in rates], cmd, say)
        if not rate:
            hsteps += await refine(hsteps, lambda r: L.run_step(cfg, f"hand@{r / eng:.2f}", r, worker_cmd=cmd,
                                                                progress=say), say, rounds=refine_steps)
        report["handwritten_steps"] = [s.row() for s in hsteps]
        report["handwritten_msgs_per_s_at_slo"], report["handwritten_note"] = L.at_slo(hsteps)
        report["pipeline_vs_handwritten"] = L.ratio(knee, report["handwritten_msgs_per_s_at_slo"], 2)
    if compare_eos:
        import dataclasses

        say("exactly-once, same rates:")
        ecfg = dataclasses.replace(cfg, delivery="exactly_once")
        esteps = [await L.run_step(ecfg, f"eos@{f:.2f}", r, progress=say) for f, r in rates]
        if not rate:  # bisected like at-least-once's: a knee between two coarse steps must not read as the lower one
            esteps += await refine(esteps, lambda r: L.run_step(ecfg, f"eos@{r / eng:.2f}", r, progress=say), say,
                                   rounds=refine_steps)
        report["eos_steps"] = [s.row() for s in esteps]
        report["eos_msgs_per_s_at_slo"] = L.knee(esteps)
        report["eos_vs_alo_at_slo"] = L.ratio(report["eos_msgs_per_s_at_slo"], knee)
        # Its latency floor: an output is readable (read_committed) once its transaction commits, so at low load
        # the p50 sits near the commit interval (a transaction stays open that long) plus the commit itself.
        elow = min(esteps, key=lambda s: s.offered_rate)
        report["eos_low_load_p50_ms"], report["eos_low_load_p99_ms"] = elow.p50_ms, elow.p99_ms
        from pipeline.config import WorkerSettings

        report["eos_commit_interval_ms"] = int(ecfg.env.get("STREAMLABEL_WORKER__COMMIT_INTERVAL_MS",
                                                            WorkerSettings().commit_interval_ms))
    if duplicates and not rate:
        say("50% duplicate texts:")
        dsteps = [await L.run_step(cfg, f"dup50@{f:.2f}", f * eng, duplicate_ratio=0.5, progress=say)
                  for f in ([1.0, 1.6] if quick else [0.95, 1.3, 1.7, 2.1])]
        report["dup50_steps"] = [s.row() for s in dsteps]
        report["dup50_msgs_per_s_at_slo"] = L.knee(dsteps)
        report["dup50_vs_unique"] = L.ratio(report["dup50_msgs_per_s_at_slo"], knee, 2)
    if naive and not rate:
        with console.status("naive baseline: PyTorch FP32 transformers pipeline, one message at a time…"):
            naive_cap = await asyncio.to_thread(_naive_capacity, texts)
        say(f"naive baseline capacity (in-process, one at a time): {naive_cap:.0f} msgs/s")
        cmd = [sys.executable, "-m", "producers.bench.naive"]
        nsteps = await baseline_ladder(cfg, [(f"naive@{f:.2f}", max(1.0, f * naive_cap)) for f in NAIVE_FRACTIONS[quick]],
                                       cmd, say)
        nsteps += await refine(nsteps, lambda r: L.run_step(cfg, f"naive@{r / naive_cap:.2f}", r, worker_cmd=cmd,
                                                            progress=say), say, rounds=refine_steps)
        report["naive_capacity_msgs_per_s"] = round(naive_cap, 1)
        report["naive_steps"] = [s.row() for s in nsteps]
        report["naive_msgs_per_s_at_slo"], note = L.at_slo(nsteps)
        report["naive_note"] = "; ".join(n for n in (note, naive_model_note(manifest)) if n) or None
        report["pipeline_vs_naive"] = L.ratio(knee, report["naive_msgs_per_s_at_slo"], 1)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    if plot_prefix is not None:
        for f in L.plots(report, plot_prefix):
            say(f"wrote {f}")
    report.pop("series_step", None)
    for line in summary(report):
        say(line)
    return report


async def _cascade_vs_second(cfg, cascade, art, manifest, texts, variant, max_batch, secs, rates, knee, eng, rate,
                             refine_steps, say) -> dict:
    """The cascade's second stage served alone, same run, broker, texts and offered rates, and both scored on
    the held-out test split of the second stage's preset: what the cascade buys and what it costs."""
    import dataclasses

    import numpy as np

    from pipeline.cascade import CascadeEngine
    from pipeline.engine import OnnxEngine
    from pipeline.runtime import softmax
    from pipeline.model import data as D
    from pipeline.model import presets as P
    from producers.bench import harness as L

    first, threshold = cascade
    plain = dataclasses.replace(cfg, env={})
    second_eng = await asyncio.to_thread(L.engine_throughput, str(art), texts, variant=variant, batch=max_batch,
                                         seconds=secs)
    say(f"second stage alone ({manifest.model_id} {variant}): engine {second_eng:.0f} msgs/s; its ladder, same rates:")
    steps = []
    for f, r in sorted(rates, key=lambda x: x[1]):
        steps.append(await L.run_step(plain, f"second@{f:.2f}", r, progress=say))
        if not steps[-1].meets_slo:
            break
    if not rate:
        steps += await refine(steps, lambda r: L.run_step(plain, f"second@{r / eng:.2f}", r, progress=say), say,
                              rounds=refine_steps)
    second_knee, note = L.at_slo(steps)
    out = {"second_stage": manifest.model_id, "second_engine_msgs_per_s": round(second_eng, 1),
           "second_steps": [s.row() for s in steps], "second_msgs_per_s_at_slo": second_knee, "second_note": note,
           "cascade_vs_second_engine": L.ratio(eng, second_eng, 2),
           "cascade_vs_second_at_slo": L.ratio(knee, second_knee, 2)}
    one = OnnxEngine(first, variant=variant, provider="cpu", warmup=False)
    two = OnnxEngine(art, variant=variant, provider="cpu", warmup=False)
    conf = np.concatenate([softmax(one.logits(texts[i:i + 64]).astype(np.float64)).max(1)
                           for i in range(0, len(texts), 64)])
    out["escalation_rate_bench_texts"] = round(float((conf < threshold).mean()), 4)
    found = P.labelled_split([p for p in (manifest.training.get("preset"), manifest.training.get("teacher_preset"))
                              if p in P.PRESETS], "test", manifest.labels)
    if found is not None:
        preset, test, y = found
        tt = [e.text for e in test]
        casc = CascadeEngine(one, two, threshold)
        for key, e in (("second", two), ("cascade", casc)):
            pred = np.concatenate([e.logits(tt[i:i + 64]).argmax(1) for i in range(0, len(tt), 64)])
            out[f"{key}_accuracy"] = D.quality(y, pred, manifest.labels)["accuracy"]
        out["cascade_accuracy_drop_points"] = round((out["second_accuracy"] - out["cascade_accuracy"]) * 100, 2)
        out["accuracy_data"] = f"{preset} held-out test split (n={len(tt)})"
    one.close()
    two.close()
    return out


# The naive ladder's fractions of its in-process capacity (--quick: True); fine enough to find its knee.
NAIVE_FRACTIONS = {False: (0.2, 0.35, 0.5, 0.65, 0.8, 1.0), True: (0.25, 0.45, 0.65, 0.85)}


async def refine(steps: list, run, say, rounds: int = 2) -> list:
    """Bisect the knee: between the busiest step up to which all passed and the first that failed, try the
    geometric midpoint ``rounds`` times. A coarse ladder (engine-scaled fractions) then still finds each
    system's knee to within a few per cent, for the pipeline and the baselines alike."""
    from producers.bench import harness as L

    new: list = []
    for _ in range(rounds):
        ordered = sorted(steps + new, key=lambda s: s.offered_rate)
        ok = L.knee_step(ordered)
        above = [s for s in ordered if not s.meets_slo and (ok is None or s.offered_rate > ok.offered_rate)]
        if not above:
            break
        hi = above[0].offered_rate
        lo = ok.offered_rate if ok is not None else hi / 4
        if hi / lo < 1.08:
            break
        say(f"  refining the knee between {lo:,.3g}/s and {hi:,.3g}/s")
        new.append(await run((lo * hi) ** 0.5))
    return new


async def baseline_ladder(cfg, rates: list[tuple[str, float]], cmd: list[str], say) -> list:
    """A baseline's steps in rising order, up to and including its first step that misses the SLO.

    Busier steps could not move its knee (the busiest step up to which every step met the SLO), and a
    baseline past its capacity only grows a backlog that each step would wait out.
    """
    from producers.bench import harness as L

    steps = []
    for name, r in sorted(rates, key=lambda x: x[1]):
        steps.append(await L.run_step(cfg, name, r, worker_cmd=cmd, progress=say))
        if not steps[-1].meets_slo:
            break
    return steps


def naive_model_note(manifest) -> str | None:
    """The naive baseline always runs MiniLM-L6: say so when the artifact is another model."""
    if "minilm" in f"{manifest.base_model} {manifest.name}".lower():
        return None
    return (f"the naive baseline runs MiniLM-L6 (PyTorch FP32) whatever the artifact; this artifact is "
            f"{manifest.model_id} ({manifest.base_model or 'base model not recorded'}), so pipeline_vs_naive "
            f"compares models as well as serving")


def summary(report: dict) -> list[str]:
    """The one-screen summary: the figures and the ratios the bench is for."""
    def fig(key: str) -> str:
        v = report.get(key)
        return "–" if v is None else f"{v:,.0f}/s"

    def x(key: str) -> str:
        v = report.get(key)
        return "–" if v is None else f"{v:.2f}×"

    def us(key: str) -> str:
        v = report.get(key)
        return "– (not exported by this worker)" if v is None else f"{v:,.0f} µs"

    lines = [f"summary — {report['model']} ({report['variant']}, batch {report['batch']}), "
             f"SLO p99 ≤ {report['slo']['objective_ms']:.0f} ms, {report['delivery']}",
             f"  ORT ceiling (no Kafka)        {fig('ceiling_msgs_per_s'):>12}"
             + (f"   one session, every core {fig('ceiling_one_session_msgs_per_s')}"
                if report.get("ceiling_one_session_msgs_per_s") else ""),
             f"  engine (no Kafka)             {fig('engine_msgs_per_s'):>12}   engine / ceiling        {x('engine_vs_ceiling')}",
             f"  pipeline at the SLO           {fig('pipeline_msgs_per_s_at_slo'):>12}   pipeline / ceiling      {x('pipeline_vs_ceiling')}"]
    if "handwritten_msgs_per_s_at_slo" in report:
        lines.append(f"  hand-written at the SLO       {fig('handwritten_msgs_per_s_at_slo'):>12}   "
                     f"pipeline / hand-written  {x('pipeline_vs_handwritten')}")
    if "second_msgs_per_s_at_slo" in report:
        lines.append(f"  second stage alone at the SLO {fig('second_msgs_per_s_at_slo'):>12}   "
                     f"cascade / second stage  {x('cascade_vs_second_at_slo')} (engine {x('cascade_vs_second_engine')})")
        if report.get("cascade_accuracy") is not None:
            lines.append(f"  accuracy: cascade {report['cascade_accuracy']:.4f}, second stage {report['second_accuracy']:.4f} "
                         f"(cascade − second: {-report['cascade_accuracy_drop_points']:+.2f} points) on {report['accuracy_data']}; "
                         f"escalated on the bench texts: {report['escalation_rate_bench_texts']:.1%}")
    if "eos_msgs_per_s_at_slo" in report:
        lines.append(f"  exactly-once at the SLO       {fig('eos_msgs_per_s_at_slo'):>12}   "
                     f"exactly-once / at-least-once {x('eos_vs_alo_at_slo')}; low-load p50/p99 "
                     f"{report['eos_low_load_p50_ms']:.0f}/{report['eos_low_load_p99_ms']:.0f} ms "
                     f"(transactions commit every {report['eos_commit_interval_ms']} ms)")
    if "naive_msgs_per_s_at_slo" in report:
        lines.append(f"  naive at the SLO              {fig('naive_msgs_per_s_at_slo'):>12}   "
                     f"pipeline / naive         {x('pipeline_vs_naive')}")
    b = report.get("low_load_breakdown")
    if b:
        lines.append(f"  at the lowest load ({report['low_load_rate']:,.0f}/s, p99 {report['low_load_p99_ms']:.0f} ms), "
                     "p50/p99 ms: " + ", ".join(f"{k.replace('_', ' ')} {v['p50_ms']:g}/{v['p99_ms']:g}" for k, v in b.items()))
    lines.append(f"  worker CPU per event outside the engine: {us('worker_cpu_us_per_event')}"
                 + (f", of which tokenizing {us('tokenizer_cpu_us_per_event')}"
                    if report.get("tokenizer_cpu_us_per_event") is not None else "")
                 + (f" (engine: {us('engine_cpu_us_per_event')})" if report.get("engine_cpu_us_per_event") is not None else "")
                 + (f"; all of it {report['worker_vs_ceiling_cpu']}× the ceiling's {us('ceiling_cpu_us_per_text')} per text"
                    if report.get("worker_vs_ceiling_cpu") is not None else ""))
    for key in ("handwritten_note", "naive_note", "second_note"):
        if report.get(key):
            lines.append(f"  {key.split('_')[0]}: {report[key]}")
    return lines


def _naive_capacity(texts, windows: int = 3, window_s: float = 1.0) -> float:
    """Messages/s of transformers.pipeline on one text at a time, without Kafka (the ladder's scale).

    The best of ``windows`` one-second windows: PyTorch's two intra-op threads on a 2-core machine slow
    down many times over whenever anything else runs (the broker, a process finishing), and the scale of the
    ladder should be what the model can do, not what a neighbour left it.
    """
    from producers.bench.naive import make_classifier

    clf = make_classifier()
    clf(texts[0])
    best, n = 0.0, 0
    for _ in range(windows):
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < window_s:
            clf(texts[n % len(texts)])
            n += 1
            k += 1
        best = max(best, k / (time.perf_counter() - t0))
    return best
