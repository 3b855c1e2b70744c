"""The worker serving the tiny generator against the real Apache Kafka broker and a real redis-server."""

from __future__ import annotations

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.events import encode_input, now_ms
from pipeline.generation import GenerativeModel
from pipeline.metrics import Metrics
from producers.topics import read_until

from .helpers import read_labels, running_worker, settings_for

pytestmark = pytest.mark.integration

GEN = {"slo": {"objective_ms": 30_000}, "generate": {"max_new_tokens": 12}}


@pytest.fixture(scope="module")
def model(tiny_generator):
    m = GenerativeModel(tiny_generator, variant="fp32", provider="cpu")
    yield m
    m.close()


async def send(bootstrap, topic, items):
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for key, value, headers in items:
            await p.send(topic, value=value, key=key, headers=headers)
        await p.flush()
    finally:
        await p.stop()


async def test_every_id_gets_one_generation_with_key_headers_and_timings(kafka, names, model):
    s = settings_for(kafka, names, **GEN)
    n = 60
    items = [(f"k{i % 7}".encode(), encode_input(f"complaint {i}: my card {i % 5} was declined", id=f"g{i}", source="support"),
              [("traceparent", f"t{i}".encode())]) for i in range(n)]
    metrics = Metrics()
    async with running_worker(s, model, metrics=metrics) as w:
        await send(kafka.bootstrap, names.input, items)
        out = await read_labels(kafka.bootstrap, names.output, {f"g{i}" for i in range(n)})
    docs = [orjson.loads(r.value) for r in out]
    assert sorted(d["id"] for d in docs) == sorted(f"g{i}" for i in range(n)), "exactly one record per input id"
    for r, d in zip(out, docs):
        i = int(d["id"][1:])
        assert r.key == f"k{i % 7}".encode() and dict(r.headers)["traceparent"] == f"t{i}".encode()
        assert isinstance(d["text"], str) and 1 <= d["tokens"] <= 12
        assert d["finish_reason"] in ("length", "stop") and d["model"] == model.model_id and d["cached"] is False
        lat = d["latency_ms"]
        assert lat["e2e"] >= lat["ttft"] >= lat["queue"] >= 0 and lat["decode"] >= 0
    assert w.dead_lettered == 0
    sample = metrics.registry.get_sample_value
    assert sample("streamlabel_generation_tokens_total") >= n, "output tokens counted"
    assert sample("streamlabel_generation_batch_rows_sum") > sample("streamlabel_generation_batch_rows_count"), \
        "decode steps ran several rows at once"
    assert sample("streamlabel_generation_ttft_seconds_count") == n


async def test_repeated_text_is_a_cache_hit(kafka, names, model, redis_server):
    s = settings_for(kafka, names, redis_url=redis_server.url, **GEN)
    text = encode_input("where is my refund, it has been three weeks", id="first")
    async with running_worker(s, model):
        await send(kafka.bootstrap, names.input, [(None, text, [])])
        first = await read_labels(kafka.bootstrap, names.output, {"first"})
        again = encode_input("Where is my refund,  it has been three weeks", id="again")  # same after normalizing
        await send(kafka.bootstrap, names.input, [(None, again, [])])
        both = await read_labels(kafka.bootstrap, names.output, {"first", "again"})
    docs = {orjson.loads(r.value)["id"]: orjson.loads(r.value) for r in both}
    assert docs["first"]["cached"] is False and docs["again"]["cached"] is True
    assert docs["again"]["text"] == docs["first"]["text"] and docs["again"]["tokens"] == docs["first"]["tokens"]
    assert len(first) == 1


async def test_poison_prompt_to_dlq_and_deadline_finish(kafka, names, model):
    s = settings_for(kafka, names, slo={"objective_ms": 30_000}, generate={"max_new_tokens": 400})
    long_text = " ".join(f"w{i}" for i in range(1500))  # past the tiny model's 512-token context, under max_chars
    items = [
        (b"a", encode_input(long_text, id="poison"), []),
        (b"b", encode_input("the app crashes when I log in", id="ok"), []),
        (b"c", encode_input("my transfer never arrived", id="hurry"),
         # A deadline already past when it arrives: it joins, gets its first token and leaves with it (a deadline
         # 150 ms ahead raced the tiny model, which now writes 400 tokens in less).
         [("streamlabel.deadline_ms", str(now_ms() - 1).encode())]),
    ]
    async with running_worker(s, model) as w:
        await send(kafka.bootstrap, names.input, items)
        dlq = await read_until(kafka.bootstrap, [names.dlq], lambda r: len(r) >= 1, 60)
        out = await read_labels(kafka.bootstrap, names.output, {"ok", "hurry"})
    assert len(dlq) == 1 and dlq[0].value == items[0][1], "the original bytes go to the DLQ"
    reason = dict(dlq[0].headers)["streamlabel.error"].decode()
    assert reason.startswith("too long") and "context" in reason
    docs = {orjson.loads(r.value)["id"]: orjson.loads(r.value) for r in out}
    assert docs["hurry"]["finish_reason"] == "deadline" and 1 <= docs["hurry"]["tokens"] < 400
    assert docs["ok"]["finish_reason"] in ("length", "stop")
    assert w.dead_lettered == 1
