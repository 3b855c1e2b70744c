"""The classify worker against the real Apache Kafka broker and a real redis-server."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import defaultdict

import orjson
import pytest

from pipeline.engine import OnnxEngine
from pipeline.events import encode_input
from pipeline.metrics import Metrics
from pipeline.cli.local_services import free_port
from producers.topics import ensure_topics, produce, read_until

from .helpers import ids_of, read_labels, running_worker, settings_for

pytestmark = pytest.mark.integration


async def test_every_id_labelled_key_order_and_headers_kept(kafka, names, engine):
    s = settings_for(kafka, names)
    n, keys = 400, 20
    values = [encode_input(f"message {i} about account {i % keys}", id=f"e{i}", source="support", entity=f"k{i % keys}")
              for i in range(n)]
    rec_keys = [f"k{i % keys}".encode() for i in range(n)]
    async with running_worker(s, engine) as w:
        await ensure_topics(kafka.bootstrap, [names.input])
        p = __import__("aiokafka").AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await p.start()
        try:
            for i, v in enumerate(values):
                await p.send(names.input, value=v, key=rec_keys[i], headers=[("traceparent", f"t{i}".encode())])
            await p.flush()
        finally:
            await p.stop()
        out = await read_labels(kafka.bootstrap, names.output, {f"e{i}" for i in range(n)})
    got = ids_of(out)
    assert set(got) == {f"e{i}" for i in range(n)}
    per_key = defaultdict(list)
    for r in sorted(out, key=lambda r: (r.partition, r.offset)):
        doc = orjson.loads(r.value)
        assert r.key == f"k{int(doc['id'][1:]) % keys}".encode(), "output keeps the input key"
        assert dict(r.headers)["traceparent"] == f"t{doc['id'][1:]}".encode(), "output keeps the input headers"
        assert doc["label"] in engine.labels and doc["model"] == engine.model_id
        assert doc["source"] == "support" and doc["latency_ms"]["e2e"] >= 0
        per_key[r.key].append(int(doc["id"][1:]))
    for k, seq in per_key.items():
        assert seq == sorted(seq), f"per-key order broken for {k}"
    assert w.labelled >= n and w.dead_lettered == 0


BAD_INPUTS = {
    "invalid JSON": b'{"text": "unterminated',
    "not UTF-8": b"\xff\xfe\xfa bad bytes",
    "empty": b"",
    "empty text": b'{"text": "   "}',
    "oversized": b'{"text": "' + b"a" * 70_000 + b'"}',
    "wrong type": b'{"text": 42}',
    "array": b'["text"]',
    "missing text": b'{"id": "x", "source": "news"}',
    "tombstone": None,
    "control chars only": b'{"text": "\\u0000\\u0001\\u0002"}',
    "bad ts": b'{"text": "fine", "ts": "yesterday"}',
    "zero tokens": '{"text": "\u200b\u200b\u2060"}'.encode(),
    "deeply nested": b'{"text": ' + b"[" * 600 + b"]" * 600 + b"}",
}


async def test_bad_inputs_go_to_dlq_with_reason_and_worker_survives(kafka, names, engine):
    s = settings_for(kafka, names)
    async with running_worker(s, engine) as w:
        bad = list(BAD_INPUTS.values())
        good = [b'{"text": "shares rallied after the upgrade", "id": "good-after", "unknown_field": [1, 2]}',
                b"plain utf-8 text is accepted too"]
        await produce(kafka.bootstrap, names.input, bad + good, keys=[b"same-key"] * (len(bad) + len(good)))
        dlq = await read_until(kafka.bootstrap, [names.dlq], lambda r: len(r) >= len(bad), 60)
        out = await read_labels(kafka.bootstrap, names.output, {"good-after"})
    assert len(dlq) == len(bad)
    reasons = [dict(r.headers)["streamlabel.error"].decode() for r in dlq]
    for expected, reason in zip(["invalid JSON", "not UTF-8", "empty", "empty", "oversized", "wrong type", "wrong type",
                                 "schema", "tombstone", "empty", "wrong type", "empty: the tokenizer", "wrong type"],
                                reasons):
        assert reason.startswith(expected), (expected, reason)
    for r, original in zip(sorted(dlq, key=lambda r: r.offset), bad):
        h = dict(r.headers)
        assert h["streamlabel.source.topic"] == names.input.encode()
        assert int(h["streamlabel.source.offset"]) >= 0
        assert r.value == (original if original is not None else b""), "DLQ keeps the original bytes"
    assert "good-after" in ids_of(out) and len(out) == 2
    assert w.dead_lettered == len(bad) and w.labelled == 2


async def test_cache_hits_on_repeated_texts_and_keys_hold_no_text(kafka, names, engine, redis_server):
    import redis

    s = settings_for(kafka, names, redis_url=redis_server.url)
    texts = [f"guidance raised for product line {i}" for i in range(30)]
    async with running_worker(s, engine):
        await produce(kafka.bootstrap, names.input, [encode_input(t, id=f"a{i}") for i, t in enumerate(texts)])
        await read_labels(kafka.bootstrap, names.output, {f"a{i}" for i in range(30)})
    r = redis.Redis.from_url(redis_server.url)
    keys = r.keys("sl:*")
    assert len(keys) == 30
    assert not any(b"guidance" in k for k in keys), "cache keys must not contain raw text"
    # A fresh worker (empty local cache) answers repeated texts from Redis.
    s2 = settings_for(kafka, names, redis_url=redis_server.url)
    async with running_worker(s2, engine, name="w1") as w:
        await produce(kafka.bootstrap, names.input, [encode_input(t, id=f"b{i}") for i, t in enumerate(texts)])
        out = await read_labels(kafka.bootstrap, names.output, {f"b{i}" for i in range(30)})
    second = [orjson.loads(x.value) for x in out if orjson.loads(x.value)["id"].startswith("b")]
    assert len(second) == 30 and all(d["cached"] for d in second)
    assert w.cache_hits >= 30


async def test_malformed_redis_entries_are_misses_counted_and_overwritten(kafka, names, engine, redis_server):
    """Cache entries are untrusted: entries that crashed the handler on every hit (scores that are not a dict, a
    score that overflows a float, foreign JSON) are misses, counted, and the worker labels and rewrites them."""
    import redis

    from pipeline.cache import cache_key

    texts = [f"a message the cache was poisoned for {i}" for i in range(6)]
    garbage = [b'{"l": "x", "s": 0.5, "ps": "abc", "m": "m"}', b'{"l": "x", "s": 1e400, "ps": {"x": 1}, "m": "m"}',
               b"[1, 2, 3]", b"\xff\xfe not json", b'{"g": 1, "n": "x", "f": "stop", "m": "m"}', b"null"]
    r = redis.Redis.from_url(redis_server.url)
    for t, g in zip(texts, garbage):
        r.set(cache_key(engine.model_id, t), g)
    metrics = Metrics()
    s = settings_for(kafka, names, redis_url=redis_server.url)
    async with running_worker(s, engine, metrics=metrics) as w:
        await produce(kafka.bootstrap, names.input, [encode_input(t, id=f"m{i}") for i, t in enumerate(texts)])
        out = await read_labels(kafka.bootstrap, names.output, {f"m{i}" for i in range(len(texts))})
        assert w._fatal is None
    docs = [orjson.loads(x.value) for x in out]
    assert len(docs) == len(texts) and not any(d["cached"] for d in docs)
    assert metrics.registry.get_sample_value("streamlabel_ignored_total", {"what": "cache_entry"}) == len(texts)
    from pipeline.cache import _unpack

    assert all(_unpack(r.get(cache_key(engine.model_id, t))) is not None for t in texts), "rewritten with answers"


async def test_generations_stay_out_of_redis_unless_asked(redis_server):
    from pipeline.cache import RedisCache
    from pipeline.events import Generation, Prediction

    gen, pred = Generation("Sorry to hear that, Ann!", 6, "stop", "g@1"), Prediction("pos", 0.9, {"pos": 0.9}, "m@1")
    for allowed in (False, True):
        c = RedisCache(redis_server.url, timeout_ms=500, generations=allowed)
        await c.put_many([(f"g{allowed}", gen), (f"p{allowed}", pred)])
        got = await c.get_many([f"g{allowed}", f"p{allowed}"])
        await c.close()
        assert (got[0] is not None) is allowed and got[1] is not None


async def test_redis_outage_labels_keep_flowing_and_cache_resumes(kafka, names, engine, redis_server):
    import redis

    s = settings_for(kafka, names, redis_url=redis_server.url)
    async with running_worker(s, engine) as w:
        await produce(kafka.bootstrap, names.input, [encode_input(f"before outage {i}", id=f"a{i}") for i in range(20)])
        await read_labels(kafka.bootstrap, names.output, {f"a{i}" for i in range(20)})
        redis_server.kill()
        await produce(kafka.bootstrap, names.input, [encode_input(f"during outage {i}", id=f"b{i}") for i in range(50)])
        await read_labels(kafka.bootstrap, names.output, {f"b{i}" for i in range(50)}, timeout=60)
        assert w.cache.remote.errors > 0, "the outage was noticed"
        redis_server.start()  # same port
        r = redis.Redis.from_url(redis_server.url)
        assert r.dbsize() == 0
        # Keep feeding until writes reach Redis again (the breaker closes after its reset period).
        for round_ in range(40):
            ids = {f"c{round_}-{i}" for i in range(5)}
            await produce(kafka.bootstrap, names.input,
                          [encode_input(f"after outage {round_} {i}", id=f"c{round_}-{i}") for i in range(5)])
            await read_labels(kafka.bootstrap, names.output, ids)
            if r.dbsize() > 0:
                break
        assert r.dbsize() > 0, "cache writes resumed after Redis came back"
    assert w.labelled == 20 + 50 + 5 * (round_ + 1)


async def test_metrics_endpoint_serves_histograms(kafka, names, engine):
    s = settings_for(kafka, names)
    m = Metrics()
    m.track_cpu(engine.thread_ids)
    port = free_port()
    server, _ = m.serve(port)
    try:
        async with running_worker(s, engine, metrics=m) as w:
            await produce(kafka.bootstrap, names.input, [encode_input(f"t {i}", id=f"m{i}") for i in range(10)])
            await read_labels(kafka.bootstrap, names.output, {f"m{i}" for i in range(10)})
            w.summary()
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    finally:
        server.shutdown()
    assert 'streamlabel_e2e_latency_seconds_bucket{le="0.1"}' in body
    assert "streamlabel_e2e_latency_seconds_count 10.0" in body
    assert 'streamlabel_events_total{outcome="labelled"} 10.0' in body
    assert "streamlabel_batch_size_bucket" in body and "streamlabel_slo_goodput_ratio" in body
    assert 'streamlabel_slo_burn_rate{window="1m"}' in body
    assert 'streamlabel_cpu_seconds_total{part="engine"}' in body
    assert 'streamlabel_cpu_seconds_total{part="outside_engine"}' in body
    # stage histograms observed (one observation per batch), windowed goodput, standard process metrics
    assert 'streamlabel_stage_seconds_count{stage="infer"}' in body and 'streamlabel_stage_seconds_count{stage="queue"}' in body
    assert 'streamlabel_slo_goodput_window_ratio{window="5m"}' in body
    assert "process_resident_memory_bytes" in body


async def test_deadline_header_is_honoured_and_late_records_are_still_labelled(kafka, names, engine):
    s = settings_for(kafka, names, slo={"objective_ms": 600_000})  # no record misses the default deadline
    past = [("streamlabel.deadline_ms", b"1")]  # 1 ms after the epoch: long gone
    recs = [(encode_input(f"late {i}", id=f"late{i}"), past) for i in range(3)]
    recs += [(encode_input(f"fine {i}", id=f"fine{i}"), []) for i in range(5)]
    recs += [(encode_input("bad header", id="bad"), [("streamlabel.deadline_ms", b"soon")])]
    async with running_worker(s, engine) as w:
        p = __import__("aiokafka").AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await p.start()
        try:
            for value, headers in recs:
                await p.send(names.input, value=value, headers=headers)
            await p.flush()
        finally:
            await p.stop()
        out = await read_labels(kafka.bootstrap, names.output, {"late0", "late1", "late2", "bad"} |
                                {f"fine{i}" for i in range(5)})
        assert w.batcher.late == 3, "exactly the records whose header deadline had passed"
        assert w.records._bad_deadline_logged, "an unreadable deadline header is reported (and the default applies)"
    assert len(set(ids_of(out))) == 9 and w.dead_lettered == 0


async def test_cascade_worker_says_which_stage_answered(kafka, names, tiny_artifact):
    """Through the worker: every answer says its stage; a threshold of 1 escalates everything (which the
    unit tests split text by text)."""
    from pipeline.cascade import CascadeEngine

    first = OnnxEngine(tiny_artifact, variant="int8", provider="cpu")
    second = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu")
    cascade = CascadeEngine(first, second, 1.0)
    metrics = Metrics()
    cascade.metrics = metrics
    s = settings_for(kafka, names)
    async with running_worker(s, cascade, metrics=metrics):
        await produce(kafka.bootstrap, names.input, [encode_input(f"cascade text {i} about fees", id=f"c{i}")
                                                     for i in range(40)])
        out = await read_labels(kafka.bootstrap, names.output, {f"c{i}" for i in range(40)})
    docs = [orjson.loads(r.value) for r in out]
    assert len({d["id"] for d in docs}) == 40
    assert all(d["cascade_stage"] == 1 and d["cascade_degraded"] is False and d["model"] == second.model_id
               for d in docs)
    sample = metrics.registry.get_sample_value
    assert sample("streamlabel_cascade_total", {"result": "escalated"}) == 40
    cascade.close()


async def test_health_and_readiness_endpoints(kafka, names, engine):
    """/healthz answers while the process lives; /readyz is 200 only once partitions are assigned (503 before,
    with the failing checks named)."""
    import json
    import time
    import urllib.error

    from consumers.runner import serve

    port = free_port()
    s = settings_for(kafka, names, metrics={"port": port, "host": "127.0.0.1", "summary_interval_s": 5})
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq])
    holder = {}
    task = asyncio.create_task(serve(s, engine=engine, install_signals=False, on_ready=lambda w: holder.setdefault("w", w)))

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    seen = set()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            code, body = await asyncio.to_thread(get, "/readyz")
            if code:
                seen.add(code)
                doc = json.loads(body)
                assert set(doc["checks"]) == {"model_loaded", "partitions_assigned", "kafka_reachable", "stopping"}
                if code == 503:
                    assert doc["ready"] is False and not all(doc["checks"][k] for k in ("partitions_assigned", "kafka_reachable"))
                if code == 200:
                    break
            await asyncio.sleep(0.05)  # polling an HTTP endpoint, not synchronising
        assert 200 in seen, f"never ready (saw {seen})"
        code, body = await asyncio.to_thread(get, "/healthz")
        assert code == 200 and json.loads(body)["alive"] is True  # the event loop's heartbeat is recent
        code, body = await asyncio.to_thread(get, "/metrics")
        assert code == 200 and b"streamlabel_events_total" in body
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
    finally:
        holder["w"].stop()
        await asyncio.wait_for(task, 60)


async def test_a_real_prometheus_scrapes_a_running_worker(kafka, names, engine, tmp_path):
    """Prometheus (the Debian server `make services` installs with promtool) scrapes the worker's /metrics and
    answers a query for streamlabel_events_total."""
    import json
    import shutil
    import subprocess
    import time
    import urllib.parse

    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("prometheus not installed (make services installs it)")
    port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: streamlabel, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n")
    m = Metrics()
    server, _ = m.serve(port)
    p = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with running_worker(settings_for(kafka, names), engine, metrics=m):
            await produce(kafka.bootstrap, names.input, [encode_input(f"prom {i}", id=f"p{i}") for i in range(20)])
            await read_labels(kafka.bootstrap, names.output, {f"p{i}" for i in range(20)})
            q = urllib.parse.quote('streamlabel_events_total{outcome="labelled"}')
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={q}"

            def ask():
                try:
                    with urllib.request.urlopen(url, timeout=3) as r:
                        return json.loads(r.read())["data"]["result"]
                except (OSError, KeyError, ValueError):
                    return []

            deadline, result = time.monotonic() + 60, []
            while time.monotonic() < deadline:
                result = await asyncio.to_thread(ask)
                if result and float(result[0]["value"][1]) >= 20:
                    break
                await asyncio.sleep(0.5)  # Prometheus scrapes every second; bounded by the deadline
            assert result and float(result[0]["value"][1]) >= 20, result
    finally:
        p.terminate()
        p.wait(20)
        server.shutdown()


async def test_backpressure_bounds_the_bytes_in_flight_not_only_the_records(kafka, names):
    """Large records and a slow engine: the worker pauses its partitions once the bytes it holds reach
    ``worker.max_inflight_bytes`` (the record count, 4,096 by default, would allow gigabytes of 1 MB values)."""
    from tests.unit.test_batcher import RecordingEngine

    eng = RecordingEngine()
    eng.gate.clear()  # the engine holds every call until released
    bound = 2 * 1024 * 1024
    s = settings_for(kafka, names, worker={"max_inflight_bytes": bound, "max_bytes": 300_000})
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq])
    n = 40
    values = [encode_input(f"big record {i}", id=f"b{i}") [:-1] + b', "pad": "' + b"p" * 200_000 + b'"}'
              for i in range(n)]
    async with running_worker(s, eng) as w:
        await produce(kafka.bootstrap, names.input, values, max_request_size=1_048_576)
        peak = 0
        for _ in range(200):
            peak = max(peak, w.inflight_bytes)
            if w.paused:
                break
            await asyncio.sleep(0.05)  # polling the worker's state while the engine is held
        assert w.paused, f"never paused; {w.inflight_bytes} bytes in flight"
        for _ in range(20):  # held a while longer: it stays paused, the bytes do not grow past one fetch
            peak = max(peak, w.inflight_bytes)
            await asyncio.sleep(0.05)  # sampling
        assert w.paused and peak <= bound + 1_100_000, peak
        assert w.inflight < n, "paused on bytes, long before the record count mattered"
        eng.gate.set()
        await read_labels(kafka.bootstrap, names.output, {f"b{i}" for i in range(n)})
