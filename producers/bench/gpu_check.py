"""The GPU check: one command that measures, on a GPU machine with no Java and no network, what users size a GPU
deployment by, within a time budget (8 minutes by default), and writes JSON + PNG:

1. the classifier engine against the plain ONNX Runtime ceiling at several batch sizes (no Kafka);
2. through Kafka, on a broker started from the bundle (``make broker-bundle``): the open-loop ladder at the
   SLO (p99 ≤ 50 ms by default) with 1, 2, 4 and 8 worker processes in one consumer group sharing the GPU, the
   load offered by several producer processes; and the hand-written consumer on the same GPU;
3. the generator: output tokens/s at several decode batch sizes, and time to first token under a burst.

    deploy/gpu/check                       # the wrapper: wheels, the bundle, then this with the GPU defaults
    python -m producers.bench.gpu_check --model models/sentiment-minilm --generator models/reply-smollm2 \\
        --bundle deploy/kafka/kafka-bundle.tar.xz --provider cuda --variant fp16 --out gpu-check

``--smoke`` runs every stage small (the tiny test models on CPU: what the test suite checks). A stage that
would not fit the remaining budget is skipped and the report says so; whatever was measured is written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path


def _csv(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.monotonic(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def engine_stage(a, texts: list[str]) -> dict:
    from producers.bench.engine import ceiling_throughput, engine_throughput

    rows = []
    for b in _csv(a.batches):
        stats: dict = {}
        ceil = ceiling_throughput(a.model, texts, variant=a.variant, batch=b, seconds=a.engine_seconds,
                                  provider=a.provider)
        ceil_io = ceiling_throughput(a.model, texts, variant=a.variant, batch=b, seconds=a.engine_seconds,
                                     provider=a.provider, io_binding=True) if a.provider == "cuda" else None
        eng = engine_throughput(a.model, texts, variant=a.variant, batch=b, seconds=a.engine_seconds,
                                provider=a.provider, stats=stats)
        # The engine's default on a GPU is bucketed IOBinding runs with a CUDA graph per bucket; the same engine
        # without them, and with two session replicas (copies of one overlapping the other's compute), beside it.
        plain = engine_throughput(a.model, texts, variant=a.variant, batch=b, seconds=a.engine_seconds,
                                  provider=a.provider, bind=False)
        two = engine_throughput(a.model, texts, variant=a.variant, batch=b, seconds=a.engine_seconds,
                                provider=a.provider, sessions=2)
        best = max(c for c in (ceil, ceil_io) if c)
        rows.append({"batch": b, "ceiling_texts_per_s": round(ceil, 1),
                     "ceiling_io_binding_texts_per_s": round(ceil_io, 1) if ceil_io else None,
                     "engine_texts_per_s": round(eng, 1), "engine_vs_best_ceiling": round(eng / best, 3),
                     "engine_unbound_texts_per_s": round(plain, 1),
                     "engine_two_sessions_texts_per_s": round(two, 1),
                     "engine_best_vs_best_ceiling": round(max(eng, plain, two) / best, 3),
                     "engine_host_us_per_text": stats.get("host_us_per_text"),
                     "engine_bound": stats.get("bound"), "engine_buckets": stats.get("buckets"),
                     "engine_cuda_graph": stats.get("cuda_graph"),
                     "engine_cuda_graph_error": stats.get("cuda_graph_error")})
        say(f"engine batch {b}: {eng:,.0f}/s (unbound {plain:,.0f}/s, two sessions {two:,.0f}/s), ceiling "
            f"{best:,.0f}/s ({eng / best:.2f}); CUDA graphs "
            f"{'on' if stats.get('cuda_graph') else 'off'}{': ' + stats['cuda_graph_error'] if stats.get('cuda_graph_error') else ''}")
    return {"batches": rows}


def start_broker(a, work: Path):
    """The broker: ``--bootstrap`` if given, else one started from the bundle (a .tar.xz or a directory)."""
    if a.bootstrap:
        return None, a.bootstrap
    from pipeline.cli.local_services import LocalKafka

    bundle = Path(a.bundle) if a.bundle else None
    if bundle is not None and bundle.is_file():
        with tarfile.open(bundle) as tar:
            tar.extractall(work, filter="tar")
        bundle = work / "kafka-bundle"
    broker = LocalKafka(work / "kafka", bundle=bundle).start()
    return broker, broker.bootstrap


async def kafka_stage(a, bootstrap: str, engine_best: float, budget: Budget) -> dict:
    """Per worker count: a coarse ladder up to the first step over the SLO, one bisection; then the hand-written
    consumer at the one-worker rates."""
    from producers.bench import harness as L
    from producers.bench.ladder import baseline_ladder, refine

    env = {"STREAMLABEL_MODEL__PROVIDER": a.provider, "STREAMLABEL_BATCHING__MAX_WAIT_MS": str(a.max_wait_ms)}
    out: dict = {"slo_ms": a.slo_ms, "step_seconds": a.step_seconds, "producers": a.producers, "workers": []}
    fractions = [float(f) for f in a.fractions.split(",")]
    for n in _csv(a.workers):
        if budget.left < a.step_seconds * 4 + 30:
            out["workers"].append({"workers": n, "skipped": f"out of budget ({budget.left:.0f} s left)"})
            continue
        cfg = L.BenchConfig(bootstrap=bootstrap, artifact=a.model, slo_ms=a.slo_ms, step_seconds=a.step_seconds,
                            variant=a.variant, max_batch=a.max_batch, env=env, workers=n,
                            producers=a.producers)
        steps = []
        for f in fractions:
            if budget.left < a.step_seconds * 3 + 20:
                break
            steps.append(await L.run_step(cfg, f"w{n}@{f:.2f}", max(1.0, f * engine_best), progress=say))
            if not steps[-1].meets_slo:
                break
        if budget.left > a.step_seconds * 3 + 20:
            steps += await refine(steps, lambda r: L.run_step(cfg, f"w{n}@{r / engine_best:.2f}", r, progress=say),
                                  say, rounds=1)
        knee, note = L.at_slo(steps)
        out["workers"].append({"workers": n, "events_per_s_at_slo": knee, "note": note,
                               "steps": [s.row() for s in steps]})
        say(f"{n} worker(s): {knee:,.0f} events/s at p99 ≤ {a.slo_ms:.0f} ms" + (f" ({note})" if note else ""))
    done = [w for w in out["workers"] if w.get("events_per_s_at_slo")]
    one = next((w["events_per_s_at_slo"] for w in done if w["workers"] == 1), None)
    for w in done:
        w["scaling_vs_ideal"] = round(w["events_per_s_at_slo"] / (one * w["workers"]), 3) if one else None
    out["best_events_per_s_at_slo"] = max((w["events_per_s_at_slo"] for w in done), default=0.0)
    if budget.left > a.step_seconds * 4 + 30:
        import sys

        cfg = L.BenchConfig(bootstrap=bootstrap, artifact=a.model, slo_ms=a.slo_ms, step_seconds=a.step_seconds,
                            max_batch=a.max_batch, env=env, producers=a.producers)
        cmd = [sys.executable, "-m", "producers.bench.handwritten"]
        hsteps = await baseline_ladder(cfg, [(f"hand@{f:.2f}", max(1.0, f * engine_best)) for f in fractions],
                                         cmd, say)
        knee, note = L.at_slo(hsteps)
        out["handwritten"] = {"events_per_s_at_slo": knee, "note": note, "steps": [s.row() for s in hsteps]}
        out["best_vs_handwritten"] = round(out["best_events_per_s_at_slo"] / knee, 2) if knee else None
        say(f"hand-written consumer: {knee:,.0f} events/s at the SLO" + (f" ({note})" if note else ""))
    else:
        out["handwritten"] = {"skipped": f"out of budget ({budget.left:.0f} s left)"}
    return out


def generator_stage(a, budget: Budget) -> dict:
    from pipeline.generation import GenerativeModel
    from producers.bench.generator_check import burst, capacity, texts

    m = GenerativeModel(a.generator, variant=a.gen_variant, provider=a.provider)
    gpu = m.providers[0] == "CUDAExecutionProvider"
    out: dict = {"model": m.model_id, "variant": m.variant, "cuda_graph": m.cuda_graph,
                 "cuda_graph_error": m.cuda_graph_error, "capacity": []}
    try:
        for r in _csv(a.rows):
            if budget.left < 20:
                out["capacity"].append({"rows": r, "skipped": "out of budget"})
                continue
            row = asyncio.run(capacity(m, texts(), r, prefill_tokens=4096 if gpu else 512,
                                       max_tokens=r * 1024 if gpu else 8192))
            out["capacity"].append(row)
            say(f"generator {r} rows: {row['tokens_per_s']:,.0f} output tokens/s, step {row['decode_step_ms']} ms")
        if gpu and m.cuda_graph and budget.left > 60:  # the largest batch again, the decode step without graphs
            plain = GenerativeModel(a.generator, variant=a.gen_variant, provider=a.provider, cuda_graph=False)
            try:
                r = max(_csv(a.rows))
                out["capacity_without_graphs"] = asyncio.run(capacity(plain, texts(), r, prefill_tokens=4096,
                                                                      max_tokens=r * 1024))
                say(f"generator {r} rows without CUDA graphs: {out['capacity_without_graphs']['tokens_per_s']:,.0f} "
                    "output tokens/s")
            finally:
                plain.close()
        if a.burst and budget.left > 20:
            rows = max(_csv(a.rows))
            out["burst"] = asyncio.run(burst(m, texts(), a.burst, rows=min(rows, a.burst),
                                             prefill_tokens=4096 if gpu else 512,
                                             max_tokens=min(rows, a.burst) * 1024 if gpu else 8192))
            say(f"burst of {a.burst}: TTFT p50 {out['burst']['ttft_p50_ms']} ms, p99 {out['burst']['ttft_p99_ms']} ms")
    finally:
        m.close()
    return out


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    eng = report.get("engine", {}).get("batches", [])
    if eng:
        xs = [str(r["batch"]) for r in eng]
        w = 0.27
        ax[0].bar([i - w for i in range(len(xs))], [max(r["ceiling_texts_per_s"], r.get("ceiling_io_binding_texts_per_s") or 0)
                                                    for r in eng], w, label="ORT ceiling (best)")
        ax[0].bar(range(len(xs)), [r["engine_texts_per_s"] for r in eng], w, label="engine (default)")
        ax[0].bar([i + w for i in range(len(xs))], [r.get("engine_unbound_texts_per_s") or 0 for r in eng], w,
                  label="engine, no IOBinding buckets")
        ax[0].set_xticks(range(len(xs)), xs)
        ax[0].set_xlabel("batch")
        ax[0].set_ylabel("texts/s")
        ax[0].legend()
    ax[0].set_title("classifier engine (no Kafka)")
    ks = [w for w in report.get("kafka", {}).get("workers", []) if w.get("events_per_s_at_slo")]
    if ks:
        n = [w["workers"] for w in ks]
        ax[1].plot(n, [w["events_per_s_at_slo"] for w in ks], "o-", label="streamlabel workers")
        one = next((w["events_per_s_at_slo"] for w in ks if w["workers"] == 1), None)
        if one:
            ax[1].plot(n, [one * k for k in n], ":", color="grey", label="ideal (N × one worker)")
        hand = report["kafka"].get("handwritten", {}).get("events_per_s_at_slo")
        if hand:
            ax[1].axhline(hand, color="#c33", ls="--", label="hand-written consumer")
        ax[1].set_xticks(n)
        ax[1].set_xlabel("worker processes (one GPU)")
        ax[1].set_ylabel(f"events/s at p99 ≤ {report['kafka']['slo_ms']:.0f} ms")
        ax[1].legend()
    ax[1].set_title("through Kafka")
    cap = [r for r in report.get("generator", {}).get("capacity", []) if "tokens_per_s" in r]
    if cap:
        ax[2].plot([r["rows"] for r in cap], [r["tokens_per_s"] for r in cap], "o-")
        ax[2].set_xlabel("decode rows")
        ax[2].set_ylabel("output tokens/s")
    b = report.get("generator", {}).get("burst")
    ax[2].set_title("generator" + (f" (burst {b['burst']}: TTFT p99 {b['ttft_p99_ms']:.0f} ms)" if b else ""))
    fig.suptitle(f"GPU check: {report['machine'].get('gpu') or report['machine'].get('cpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    import subprocess

    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/sentiment-minilm")
    ap.add_argument("--generator", default="models/reply-smollm2")
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--variant", default="fp16")
    ap.add_argument("--gen-variant", default=None)
    ap.add_argument("--bundle", default="deploy/kafka/kafka-bundle.tar.xz")
    ap.add_argument("--bootstrap", help="a running broker instead of the bundle's")
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--engine-seconds", type=float, default=4.0)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--fractions", default="0.15,0.3,0.5,0.8", help="ladder rates as fractions of the best engine figure")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--rows", default="64,128,256,512")
    ap.add_argument("--burst", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--stages", default="engine,kafka,generator")
    a = ap.parse_args()
    budget = Budget(a.budget_s)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from producers.bench import harness as L
    from producers.bench.generator_check import texts as gen_texts

    report: dict = {"machine": {**L.machine(), "gpu": gpu_name()}, "provider": a.provider, "variant": a.variant,
                    "model": a.model, "budget_s": a.budget_s, "stages": {}}
    texts = gen_texts(4096)
    stages = a.stages.split(",")
    for stage, art in (("engine", a.model), ("kafka", a.model), ("generator", a.generator)):
        if stage in stages and not (art and (Path(art) / "manifest.json").exists() or list(Path(art or ".").glob("*/manifest.json"))):
            stages.remove(stage)
            report["stages"][f"{stage}_skipped"] = f"no model artifact at {art}"
            say(f"skipping the {stage} stage: no model artifact at {art}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    broker = None
    try:
        if "engine" in stages:
            t = time.monotonic()
            report["engine"] = engine_stage(a, texts)
            report["stages"]["engine_s"] = round(time.monotonic() - t, 1)
        best = max((r["engine_texts_per_s"] for r in report.get("engine", {}).get("batches", [])), default=1000.0)
        if "kafka" in stages:
            t = time.monotonic()
            broker, bootstrap = start_broker(a, work)
            say(f"broker at {bootstrap}")
            report["kafka"] = asyncio.run(kafka_stage(a, bootstrap, best, budget))
            report["stages"]["kafka_s"] = round(time.monotonic() - t, 1)
        if "generator" in stages and a.generator:
            t = time.monotonic()
            report["generator"] = generator_stage(a, budget)
            report["stages"]["generator_s"] = round(time.monotonic() - t, 1)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        report["seconds"] = round(time.monotonic() - budget.t0, 1)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
        say(f"wrote {out / 'gpu-check.json'}")
        try:
            say(f"wrote {plot(report, out / 'gpu-check.png')}")
        except Exception as exc:  # noqa: BLE001 — the figures are written already; a plot failure must not hide them
            say(f"no plot: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
