"""A shadow under load, measured: the same open-loop step through ``streamlabel run`` twice, without and with a
shadow (the same artifact published as version 2 and named in the followed directory's ``shadow`` file), at a
rate near the machine's limit. Prints JSON: per run the served model's p50/p99 and goodput against the SLO, and
for the shadow run what the shadow labelled, agreed on and dropped (from the worker's /metrics).

    python -m producers.bench.shadow --bootstrap 127.0.0.1:9092 --model models/sentiment-minilm --rate 400

``--shadow-model models/reply-smollm2`` shadows with another artifact instead (named by path in the ``shadow``
file); a generator there is served as a classifier of the served model's labels (``generate.labels``, with
``--instruction``), which is how a label-constrained LLM is tried beside a trained classifier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import orjson

from pipeline.events import encode_input
from pipeline.manifest import resolve_artifact_dir
from producers.bench.harness import LOG_APPEND, cpu_per_event, free_port, pct, scrape, worker_counters
from producers.bench.swap import publish
from producers.rate import producer_for_load, send_at_rate
from producers.synthetic import Generator
from producers.topics import ensure_topics, read_until


def _shadow_counts(text: str | None) -> dict:
    out = {"agree": 0.0, "disagree": 0.0, "dropped": 0.0}
    for line in (text or "").splitlines():
        if line.startswith("streamlabel_shadow_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


async def one(a, src: Path, shadow: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    name_dir = work / "m"
    name_dir.mkdir()
    publish(src, name_dir, 1)
    extra = {}
    if shadow and a.shadow_model:
        (name_dir / "current").write_text("1")
        (name_dir / "shadow").write_text(str(resolve_artifact_dir(a.shadow_model).resolve()))
        labels = json.loads((src / "manifest.json").read_text())["labels"]
        extra = {"STREAMLABEL_GENERATE__LABELS": json.dumps(labels), "STREAMLABEL_GENERATE__INSTRUCTION": a.instruction}
    elif shadow:
        publish(src, name_dir, 2)
        (name_dir / "current").write_text("1")
        (name_dir / "shadow").write_text("2")
    tag = uuid.uuid4().hex[:8]
    inp, out, dlq, group = f"sh-in-{tag}", f"sh-out-{tag}", f"sh-dlq-{tag}", f"sh-{tag}"
    await ensure_topics(a.bootstrap, [inp, dlq], partitions=4)
    await ensure_topics(a.bootstrap, [out], partitions=4, configs=LOG_APPEND)
    port = free_port()
    env = {**os.environ, "STREAMLABEL_MODEL__PATH": str(name_dir), "STREAMLABEL_MODEL__FOLLOW": "true",
           "STREAMLABEL_MODEL__FOLLOW_INTERVAL_S": "0.5", "STREAMLABEL_CACHE__ENABLED": "false",
           "STREAMLABEL_METRICS__PORT": str(port), "STREAMLABEL_LOG__LEVEL": "warning",
           "STREAMLABEL_KAFKA__AUTO_OFFSET_RESET": "earliest", "STREAMLABEL_SLO__OBJECTIVE_MS": str(a.slo_ms), **extra}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--bootstrap", a.bootstrap, "--input", inp,
                             "--output", out, "--dlq", dlq, "--group", group], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        p = producer_for_load(a.bootstrap)
        await p.start()
        try:
            await (await p.send(inp, encode_input("probe", id="probe")))
            await read_until(a.bootstrap, [out], lambda r: any(b'"probe"' in x.value for x in r), 180)
            if shadow:  # the shadow is prepared (verified, loaded, warmed) before the load starts
                for _ in range(int(a.timeout_s * 5)):
                    if sum(_shadow_counts(scrape(port)).values()) > 0:  # the shadow has been offered texts
                        break
                    await (await p.send(inp, encode_input("probe again", id=f"probe-{uuid.uuid4().hex[:6]}")))
                    await asyncio.sleep(0.2)  # polling the worker's metrics: the shadow's start has no other signal
            if a.settle_s:
                await asyncio.sleep(a.settle_s)  # the worker idle a while before the step, in every run alike
            count = int(a.rate * (a.warmup_s + a.seconds))

            async def at_warmup_end() -> str | None:  # the counters where the measured window starts
                if a.warmup_s:
                    await asyncio.sleep(a.warmup_s)
                return scrape(port)

            mark = asyncio.ensure_future(at_warmup_end())
            gen = Generator("mixed", seed=2, id_prefix=f"sh-{tag}")
            sent: list[str] = []

            def records():
                for ev in gen:
                    sent.append(ev.id)
                    yield ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity)

            rep = await send_at_rate(p, inp, records(), rate=a.rate, count=count)
            text = await mark
            before, cpu0 = _shadow_counts(text), worker_counters(text)
        finally:
            await p.stop()
        want = set(sent)
        outs = await read_until(a.bootstrap, [out],
                                lambda r: len({orjson.loads(x.value)["id"] for x in r} & want) >= len(want), 120)
        ins = await read_until(a.bootstrap, [inp], lambda r: len(r) >= count, 60)
        text = scrape(port)
        after, cpu1 = _shadow_counts(text), worker_counters(text)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    ts = {orjson.loads(r.value)["id"]: r.timestamp for r in ins}
    pairs = [(ts[d["id"]], r.timestamp - ts[d["id"]]) for r in outs if (d := orjson.loads(r.value))["id"] in want]
    t0 = min((t for t, _ in pairs), default=0)
    lat = [v for t, v in pairs if t - t0 >= a.warmup_s * 1000]  # the measured window: after the warm-up load
    by_s: dict[int, list[int]] = {}
    for t, v in pairs:
        by_s.setdefault((t - t0) // 1000, []).append(v)
    res = {"shadow": shadow, "sent": rep.sent, "lost": rep.sent - len(pairs), "achieved_rate": round(rep.achieved_rate, 1),
           "answered": len(lat),
           "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
           "goodput": round(sum(v <= a.slo_ms for v in lat) / max(1, len(lat)), 4),
           "warmup_s": a.warmup_s,  # the first seconds of load, not counted above (a load step's start is counted
           # below, by second: a worker idle before the step takes a second or so to reach its steady latency)
           "p99_ms_by_second": [pct(by_s[k], 99) for k in sorted(by_s)]}  # by the second the event was produced
    # The worker's CPU per labelled event over the step: outside the served engine (the shadow's calls count here)
    # and in it.
    res["worker_cpu_us_per_event"], res["engine_cpu_us_per_event"], _ = cpu_per_event(cpu0, cpu1)
    if shadow:
        res["shadow_counts"] = {k: after[k] - before[k] for k in after}
    return res


async def run(a) -> dict:
    src = resolve_artifact_dir(a.model)
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if any(r not in ("plain", "shadow") for r in runs) or not runs:
        raise SystemExit(f"--runs takes plain and shadow, comma-separated (got {a.runs!r})")
    out = {"model": json.loads((src / "manifest.json").read_text())["name"], "shadow_model": a.shadow_model,
           "rate": a.rate, "seconds": a.seconds, "slo_ms": a.slo_ms, "runs": []}
    for r in runs:  # in this order: a run's place in the sequence matters on a small machine (the A/A check)
        out["runs"].append(await one(a, src, r == "shadow"))
    if runs == ["plain", "shadow"]:
        out["without_shadow"], out["with_shadow"] = out["runs"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rate", type=float, default=400.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--slo-ms", type=float, default=250.0)
    ap.add_argument("--shadow-model", default=None, help="shadow with this artifact (default: the served one again)")
    ap.add_argument("--instruction", default="Classify the sentiment of the message.",
                    help="a generator shadow's instruction (generate.instruction)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="the longest the shadow may take to start")
    ap.add_argument("--settle-s", type=float, default=0.0, help="seconds the ready worker idles before each step")
    ap.add_argument("--warmup-s", type=float, default=0.0,
                    help="seconds of load before the measured --seconds (the same in every run; 0: measure from the "
                         "first event)")
    ap.add_argument("--runs", default="plain,shadow",
                    help="the runs, in order: plain (no shadow) and shadow, comma-separated; e.g. plain,plain for an "
                         "A/A check of the order, or shadow,plain")
    print(json.dumps(asyncio.run(run(ap.parse_args())), indent=2))


if __name__ == "__main__":
    main()
