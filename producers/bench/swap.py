"""A hot swap under open-loop load, measured: ``streamlabel run`` follows a name directory holding a copy of an
artifact as version 1; a third of the way into the load the same files are published as version 2. Prints JSON:
lost, duplicated, the rebalances the worker saw, whether each partition's versions are in order, and the p99
latency before the publication, during the swap (from the publication until 2 s after the first answer of
version 2) and after it.

    python -m producers.bench.swap --bootstrap 127.0.0.1:9092 --model models/sentiment-minilm [--rate 100]
        [--seconds 30] [--delivery exactly_once]
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
import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson

from pipeline.events import encode_input
from pipeline.manifest import resolve_artifact_dir
from producers.bench.harness import LOG_APPEND, pct
from producers.rate import producer_for_load, send_at_rate
from producers.synthetic import Generator
from producers.topics import ensure_topics, read_until


def publish(src: Path, name_dir: Path, version: int) -> None:
    tmp = name_dir / f".staging-{version}"
    shutil.copytree(src, tmp)
    m = json.loads((tmp / "manifest.json").read_text())
    m["version"] = version
    (tmp / "manifest.json").write_text(json.dumps(m))
    tmp.rename(name_dir / str(version))


async def run(a) -> dict:
    src = resolve_artifact_dir(a.model)
    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    name = json.loads((src / "manifest.json").read_text())["name"]
    name_dir = work / name
    name_dir.mkdir()
    publish(src, name_dir, 1)
    tag = uuid.uuid4().hex[:8]
    inp, out, dlq, group = f"swap-in-{tag}", f"swap-out-{tag}", f"swap-dlq-{tag}", f"swap-{tag}"
    await ensure_topics(a.bootstrap, [inp, dlq], partitions=4)
    await ensure_topics(a.bootstrap, [out], partitions=4, configs=LOG_APPEND)
    env = {**os.environ, "STREAMLABEL_MODEL__PATH": str(name_dir), "STREAMLABEL_MODEL__FOLLOW": "true",
           "STREAMLABEL_MODEL__FOLLOW_INTERVAL_S": "0.5", "STREAMLABEL_WORKER__DELIVERY": a.delivery,
           "STREAMLABEL_CACHE__ENABLED": "false", "STREAMLABEL_METRICS__PORT": "none", "STREAMLABEL_LOG__FORMAT": "json",
           "STREAMLABEL_LOG__LEVEL": "info", "STREAMLABEL_KAFKA__AUTO_OFFSET_RESET": "earliest",
           "STREAMLABEL_SLO__OBJECTIVE_MS": str(a.slo_ms)}
    log = open(work / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--bootstrap", a.bootstrap, "--input", inp,
                             "--output", out, "--dlq", dlq, "--group", group], env=env, stdout=subprocess.DEVNULL,
                            stderr=log, start_new_session=True)
    try:
        p = producer_for_load(a.bootstrap)
        await p.start()
        try:  # readiness: a probe answered
            await (await p.send(inp, encode_input("probe", id="probe")))
            await read_until(a.bootstrap, [out], lambda r: any(b'"probe"' in x.value for x in r), 180)
            count = int(a.rate * a.seconds)
            gen = Generator("mixed", seed=1, id_prefix=f"sw-{tag}")
            sent: list[str] = []

            def records():
                for ev in gen:
                    sent.append(ev.id)
                    yield ev.entity.encode(), encode_input(ev.text, id=ev.id, source=ev.source, entity=ev.entity)

            published: list[float] = []

            async def publish_later():
                await asyncio.sleep(a.seconds / 3)  # the schedule: a third of the way into an open-loop load
                published.append(time.time() * 1000)
                await asyncio.to_thread(publish, src, name_dir, 2)

            _, rep = await asyncio.gather(publish_later(), send_at_rate(p, inp, records(), rate=a.rate, count=count))
        finally:
            await p.stop()
        want = set(sent)
        outs = await read_until(a.bootstrap, [out],
                                lambda r: len({orjson.loads(x.value)["id"] for x in r} & want) >= len(want), 120)
        ins = await read_until(a.bootstrap, [inp], lambda r: len(r) >= count + 1, 60)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    sent_ts = {orjson.loads(r.value)["id"]: r.timestamp for r in ins}
    docs = [(r.partition, r.offset, r.timestamp, orjson.loads(r.value)) for r in outs]
    docs = [d for d in docs if d[3]["id"] in want]
    ids = [d[3]["id"] for d in docs]
    per_part = defaultdict(list)
    for part, off, _, d in sorted(docs, key=lambda x: (x[0], x[1])):
        per_part[part].append(d["model"])
    in_order = all(m == sorted(m, key=lambda v: int(v.rsplit("@", 1)[1])) for m in per_part.values())
    first_new = min((sent_ts[d["id"]] for _, _, _, d in docs if d["model"].endswith("@2")), default=None)
    t_pub = published[0]
    lat = [(sent_ts[d["id"]], ts - sent_ts[d["id"]]) for _, _, ts, d in docs]
    before = [v for t, v in lat if t < t_pub]
    during = [v for t, v in lat if first_new is not None and t_pub <= t <= first_new + 2000]
    after = [v for t, v in lat if first_new is not None and t > first_new + 2000]
    events = [json.loads(line).get("event") for line in (work / "worker.log").read_text().splitlines()
              if line.startswith("{")]
    shutil.rmtree(work, ignore_errors=True)
    return {"model": f"{name} (a copy published as version 2)", "delivery": a.delivery, "rate": a.rate,
            "sent": rep.sent, "answered": len(set(ids)), "lost": len(want - set(ids)), "duplicated": len(ids) - len(set(ids)),
            "rebalances": events.count("partitions_assigned") - 1, "switched": events.count("model_switched"),
            "versions_in_order_per_partition": in_order,
            "answers_by_version": {v: sum(1 for _, _, _, d in docs if d["model"] == v) for v in sorted({d["model"] for *_, d in docs})},
            "switch_after_publication_ms": round(first_new - t_pub) if first_new else None,
            "p99_ms": {"before": pct(before, 99), "during_swap": pct(during, 99), "after": pct(after, 99)},
            "p50_ms": {"before": pct(before, 50), "during_swap": pct(during, 50), "after": pct(after, 50)},
            "during_vs_before_p99": round(pct(during, 99) / pct(before, 99), 2) if before and during else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--delivery", default="at_least_once", choices=["at_least_once", "exactly_once"])
    ap.add_argument("--slo-ms", type=float, default=250.0)
    print(json.dumps(asyncio.run(run(ap.parse_args())), indent=2))


if __name__ == "__main__":
    main()
