"""Memory under 1 MB records: an exactly-once worker fed far faster than it can go stays under its byte bound.

    python -m tests.faults.memory_bound --seconds 120 --json docs/results/DATE-memory-bound.json

Half the records are 1 MB JSON events with a short text (labelled), half are 1 MB of bytes that are not JSON
(dead-lettered with a 512 KB copy). Two producer tasks offer them as fast as the broker takes them, first for a
head start (a backlog) and then on while an exactly-once worker (``worker.max_inflight_bytes`` = 32 MiB) reads
them; the worker's RSS is sampled twice a second. Printed: the rates offered and handled, how many seconds of
the worker's throughput were waiting (at least 10 throughout), the RSS after warm-up and its peak, and the
bound (warm RSS + 3 × the in-flight byte bound: what is in flight, its outputs and one fetch). The pytest
counterpart (``test_exactly_once_rss_bounded_under_1mb_records``) runs it for 20 seconds after a 6-second head start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

INFLIGHT_BYTES = 32 * 1024 * 1024
VALUE_BYTES = 1_000_000
PARTITIONS = 16  # one fetch may bring a record per partition: enough that fetching outruns the worker
ROOT = Path(__file__).resolve().parents[2]


def _records(tag: str, i: int) -> bytes:
    if i % 2:
        return os.urandom(VALUE_BYTES // 2).hex().encode()  # 1 MB, not JSON: dead-lettered (a 512 KB copy)
    pad = "x" * (VALUE_BYTES - 200)
    return json.dumps({"id": f"{tag}-{i}", "text": f"one megabyte event number {i}", "pad": pad}).encode()


async def run(bootstrap: str, artifact: str, seconds: float, inflight_bytes: int = INFLIGHT_BYTES,
              head_start_s: float = 15.0) -> dict:
    from pipeline import kafka as K
    from producers.topics import committed, ensure_topics

    tag = uuid.uuid4().hex[:8]
    topics = (f"mem-in-{tag}", f"mem-out-{tag}", f"mem-dlq-{tag}")
    group = f"mem-{tag}"
    await ensure_topics(bootstrap, list(topics), partitions=PARTITIONS)
    env = {**os.environ, "STREAMLABEL_METRICS__PORT": "none", "STREAMLABEL_CACHE__REDIS_URL": "none",
           "STREAMLABEL_LOG__FORMAT": "json", "STREAMLABEL_LOG__LEVEL": "warning",
           "STREAMLABEL_WORKER__DELIVERY": "exactly_once", "STREAMLABEL_WORKER__MAX_BYTES": str(VALUE_BYTES + 4096),
           "STREAMLABEL_CACHE__LOCAL_SIZE": "1000"}
    if inflight_bytes:  # 0: leave the setting out (code from before it existed: the comparison run)
        env["STREAMLABEL_WORKER__MAX_INFLIGHT_BYTES"] = str(inflight_bytes)
    sent = 0
    stop = asyncio.Event()

    async def offer(k: int) -> None:
        nonlocal sent
        p = K.producer(bootstrap, linger_ms=5, max_request_size=VALUE_BYTES + 65536, compression_type=None,
                       acks=1, enable_idempotence=False)
        await p.start()
        try:
            i = k
            pending = []
            while not stop.is_set():
                pending.append(await p.send(topics[0], _records(tag, i), key=f"k{i % 16}".encode()))
                i += 2
                if len(pending) >= 8:
                    await asyncio.gather(*pending)
                    sent += len(pending)
                    pending = []
            await asyncio.gather(*pending)
            sent += len(pending)
        finally:
            await p.stop()

    samples: list[tuple[float, float, int, int]] = []  # (seconds, RSS MB, records committed, records sent)
    producers = [asyncio.create_task(offer(k)) for k in (0, 1)]
    proc = None
    try:
        await asyncio.sleep(head_start_s)  # a backlog first: the worker starts far behind
        waiting_at_start = sent
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--model", str(artifact), "--bootstrap", bootstrap,
             "--input", topics[0], "--output", topics[1], "--dlq", topics[2], "--group", group],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=ROOT)
        ps = psutil.Process(proc.pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited: {proc.stderr.read().decode()[-1500:]}")
            got = await committed(bootstrap, group, topics[0], PARTITIONS)
            samples.append((time.monotonic() - t0, ps.memory_info().rss / 2**20, sum(v or 0 for v in got.values()),
                            sent))
            await asyncio.sleep(0.5)  # sampling RSS and progress
    finally:
        stop.set()
        await asyncio.gather(*producers, return_exceptions=True)
        code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = -9
        await _delete_topics(bootstrap, topics)  # gigabytes on a broker other tests share
    took = samples[-1][0]
    warm = [s for s in samples if s[0] >= min(10.0, took / 3)]
    base = warm[0][1]
    peak = max(s[1] for s in warm)
    handled = samples[-1][2]
    rate = handled / took
    # seconds of the worker's throughput waiting for it, at its least (sent and not yet committed)
    behind = min((sn - c) for _, _, c, sn in samples) / max(rate, 1e-9)
    bound_mb = base + 3 * (inflight_bytes or INFLIGHT_BYTES) / 2**20
    return {"seconds": round(took, 1), "value_bytes": VALUE_BYTES, "max_inflight_bytes": inflight_bytes,
            "waiting_at_start": waiting_at_start, "offered": sent, "offered_per_s_during": round(
                (sent - waiting_at_start) / took, 1), "handled": handled, "handled_per_s": round(rate, 1),
            "min_seconds_of_work_waiting": round(behind, 1), "rss_warm_mb": round(base, 1),
            "rss_peak_mb": round(peak, 1), "rss_bound_mb": round(bound_mb, 1), "within_bound": peak <= bound_mb,
            "worker_exit": code, "series": [(round(t, 1), round(r, 1), c, sn) for t, r, c, sn in samples]}


async def _delete_topics(bootstrap: str, topics) -> None:
    from pipeline import kafka as K

    admin = K.admin(bootstrap)
    try:
        await admin.start()
        await admin.delete_topics(list(topics))
    except Exception:  # noqa: BLE001 — best effort: the topics were only this run's
        pass
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--inflight-mb", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from pipeline.cli.local_services import LocalKafka

    with tempfile.TemporaryDirectory() as d:
        broker = LocalKafka(Path(d) / "kafka").start()
        try:
            res = asyncio.run(run(broker.bootstrap, str(ROOT / "tests/fixtures/models/tiny/1"), args.seconds,
                                  args.inflight_mb * 2**20))
        finally:
            broker.stop()
    short = {k: v for k, v in res.items() if k != "series"}
    print(json.dumps(short, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["within_bound"] and res["worker_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
