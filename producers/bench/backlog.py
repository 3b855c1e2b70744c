"""Draining a backlog, measured: N records wait in the input topic, then one worker (``streamlabel run``) starts,
once with backlog mode on and once off (``[backlog] enabled``), while a live producer adds records at a low rate.
``--modes trace,off`` measures tracing's cost the same way (the service rate with spans exported to an OTLP
receiver in this process, against none), ``--modes off,baseline --baseline DIR`` the cost of a change. Prints
JSON: the drain time of each run, the drain-time metric's estimate (``streamlabel_backlog_seconds``, read
``--estimate-at`` seconds after the first answer) against the time the drain then actually took, and the p99
latency of the live records during the drain; writes a PNG of the estimate against the actual remaining time.

    python -m producers.bench.backlog --bootstrap 127.0.0.1:9092 --model models/sentiment-quick
        [--records 200000] [--live-rate 20] [--modes on,off] [--out docs/results/data/backlog.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import uuid
from pathlib import Path

import orjson

from pipeline import kafka as K
from pipeline.events import encode_input
from producers.bench.harness import LOG_APPEND, WorkerProcess, free_port, pct, scrape
from producers.rate import producer_for_load
from producers.synthetic import Generator
from producers.topics import ensure_topics

_METRIC = re.compile(r"^(streamlabel_backlog_seconds|streamlabel_backlog_mode|streamlabel_consumer_lag)(\{[^}]*\})? (\S+)$",
                     re.M)


def gauges(port: int) -> dict:
    """The drain-time gauges and the summed lag from the worker's /metrics ({} while it cannot be read)."""
    text = scrape(port, timeout=2)
    if text is None:
        return {}
    got = {"lag": 0.0}
    for name, _, value in _METRIC.findall(text):
        if name == "streamlabel_consumer_lag":
            got["lag"] += float(value)
        else:
            got[name.removeprefix("streamlabel_")] = float(value)
    return got


async def fill(bootstrap: str, topic: str, n: int, tag: str) -> float:
    p = producer_for_load(bootstrap)
    await p.start()
    t0 = time.perf_counter()
    try:
        gen = Generator("mixed", seed=7, id_prefix=f"bl-{tag}")
        pending = []
        for i, ev in enumerate(gen):
            if i >= n:
                break
            pending.append(await p.send(topic, encode_input(ev.text, id=ev.id), key=ev.entity.encode()))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
                print(f"\r  filled {i + 1:,}/{n:,}", end="", file=sys.stderr, flush=True)
        await asyncio.gather(*pending)
    finally:
        await p.stop()
    print(file=sys.stderr)
    return time.perf_counter() - t0


MODES = {  # label → environment of the worker
    "on": {"STREAMLABEL_BACKLOG__ENABLED": "true"},
    "off": {"STREAMLABEL_BACKLOG__ENABLED": "false"},
    "trace": {"STREAMLABEL_BACKLOG__ENABLED": "false"},  # + STREAMLABEL_TRACING__OTLP_ENDPOINT: a receiver here
    "baseline": {},  # the worker of another checkout (--baseline DIR), e.g. before a change
}


async def one(a, mode: str, receiver=None) -> dict:
    tag = uuid.uuid4().hex[:8]
    inp, out, dlq, group = f"bl-in-{tag}", f"bl-out-{tag}", f"bl-dlq-{tag}", f"bl-{tag}"
    await ensure_topics(a.bootstrap, [inp, dlq], partitions=a.partitions)
    await ensure_topics(a.bootstrap, [out], partitions=a.partitions, configs=LOG_APPEND)
    fill_s = await fill(a.bootstrap, inp, a.records, tag)
    port = free_port()
    env = {**MODES[mode], "STREAMLABEL_CACHE__ENABLED": "false", "STREAMLABEL_METRICS__PORT": str(port),
           "STREAMLABEL_SLO__OBJECTIVE_MS": str(a.slo_ms)}
    if mode == "trace":
        env["STREAMLABEL_TRACING__OTLP_ENDPOINT"] = receiver.endpoint
    consumer = K.consumer(a.bootstrap, out, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    started = time.time()
    worker = WorkerProcess(a.bootstrap, str(Path(a.model).resolve()), (inp, out, dlq), group, extra_env=env,
                           cwd=a.baseline if mode == "baseline" else None)
    live_sent = 0
    live_e2e: list[float] = []
    backlog_seen = 0
    first = last_backlog = None
    samples: list[tuple[float, dict]] = []
    p = producer_for_load(a.bootstrap)
    await p.start()
    try:
        next_live = next_scrape = time.time()
        while backlog_seen < a.records or len(live_e2e) < live_sent:
            now = time.time()
            if now - started > a.timeout_s:
                raise RuntimeError(f"not drained within {a.timeout_s} s ({backlog_seen:,} of {a.records:,})")
            if first is not None and backlog_seen < a.records and now >= next_live:
                await p.send(inp, encode_input("live message about my order", id=f"live-{live_sent}"), key=b"live")
                live_sent += 1
                next_live += 1.0 / a.live_rate
            if now >= next_scrape:
                samples.append((now, await asyncio.to_thread(gauges, port)))
                next_scrape = now + 1.0
            batches = await consumer.getmany(timeout_ms=50, max_records=20_000)
            for recs in batches.values():
                for r in recs:
                    doc = orjson.loads(r.value)
                    if doc["id"].startswith("live-"):
                        live_e2e.append(doc["latency_ms"]["e2e"])
                    else:
                        backlog_seen += 1
                        last_backlog = r.timestamp / 1000.0
                        if first is None:
                            first = r.timestamp / 1000.0
                            print(f"  [{mode}] first answer {first - started:.1f} s after start", file=sys.stderr)
            if samples and len(samples) % 10 == 0 and samples[-1][0] == now:
                print(f"\r  [{mode}] {backlog_seen:,}/{a.records:,} answered", end="", file=sys.stderr, flush=True)
    finally:
        await p.stop()
        await consumer.stop()
        worker.stop()
    print(file=sys.stderr)
    drain_s = last_backlog - first
    est = [(t, m) for t, m in samples if first is not None and t >= first + a.estimate_at and "backlog_seconds" in m]
    t_est, m_est = est[0] if est else (None, {})
    modes = sorted({m.get("backlog_mode") for _, m in samples if "backlog_mode" in m})
    spans = None
    if receiver is not None:
        spans = len(receiver.spans)
        receiver.spans.clear()
    return {"spans_received": spans,
        "mode": mode, "records": a.records, "fill_s": round(fill_s, 1),
        "startup_s": round(first - started, 1), "drain_s": round(drain_s, 1),
        "rate_per_s": round(a.records / drain_s, 1),
        "estimate_at_s": a.estimate_at,
        "estimate_s": None if t_est is None else round(m_est["backlog_seconds"], 1),
        "actual_remaining_s": None if t_est is None else round(last_backlog - t_est, 1),
        "backlog_mode_seen": modes,
        "live_sent": live_sent, "live_p50_ms": round(pct(live_e2e, 50), 1) if live_e2e else None,
        "live_p99_ms": round(pct(live_e2e, 99), 1) if live_e2e else None,
        "series": [{"t": round(t - first, 2), "estimate_s": m.get("backlog_seconds"),
                    "actual_remaining_s": round(max(0.0, last_backlog - t), 2), "lag": m.get("lag")}
                   for t, m in samples if first is not None and t >= first and m],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        s = [x for x in r["series"] if x["estimate_s"] is not None and x["estimate_s"] != float("inf")]
        ax.plot([x["t"] for x in s], [x["estimate_s"] for x in s], label=f"estimate, backlog mode {r['mode']}")
        ax.plot([x["t"] for x in r["series"]], [x["actual_remaining_s"] for x in r["series"]], linestyle="--",
                label=f"actual remaining, backlog mode {r['mode']}")
    ax.set_xlabel("seconds since the first answer")
    ax.set_ylabel("seconds to drain")
    ax.set_title(f"streamlabel_backlog_seconds against the actual drain ({results[0]['records']:,} records)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(a) -> dict:
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or ("baseline" in modes and not a.baseline):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)} (baseline needs --baseline DIR); got {a.modes}")
    receiver = None
    if "trace" in modes:
        from producers.bench.otlp import OtlpReceiver

        receiver = OtlpReceiver().__enter__()
    try:
        results = [await one(a, mode, receiver if mode == "trace" else None) for mode in modes]
    finally:
        if receiver is not None:
            receiver.__exit__(None, None, None)
    by = {r["mode"]: r for r in results}
    summary = {"results": results}
    for x, y in (("on", "off"), ("trace", "off"), ("off", "baseline")):
        if x in by and y in by:  # a ratio of service rates measured in one run
            summary[f"rate_{x}_over_{y}"] = round(by[x]["rate_per_s"] / by[y]["rate_per_s"], 3)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--model", default="models/sentiment-quick")
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--live-rate", type=float, default=20.0)
    ap.add_argument("--estimate-at", type=float, default=10.0)
    ap.add_argument("--modes", default="on,off", help="backlog mode on/off; trace: tracing on into a receiver here; "
                    "baseline: the worker of --baseline DIR")
    ap.add_argument("--baseline", default=None, help="a checkout (e.g. a git worktree) whose worker runs as 'baseline'")
    ap.add_argument("--slo-ms", type=float, default=100.0)
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--out", default=None, help="write the JSON here (and a PNG beside it)")
    a = ap.parse_args()
    summary = asyncio.run(main_async(a))
    text = json.dumps(summary, indent=1)
    if a.out:
        Path(a.out).write_text(text)
        plot(summary["results"], Path(a.out).with_suffix(".png"))
    brief = {k: v for k, v in summary.items() if k != "results"}
    brief["runs"] = [{k: v for k, v in r.items() if k != "series"} for r in summary["results"]]
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
