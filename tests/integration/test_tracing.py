"""OpenTelemetry spans through a real broker into an OTLP/HTTP receiver: the span tree and the engine call's links."""

from __future__ import annotations

import aiokafka
import pytest

from pipeline.events import encode_input
from producers.topics import ensure_topics
from producers.bench.otlp import OtlpReceiver

from .helpers import read_labels, running_worker, settings_for

pytestmark = pytest.mark.integration

CONSUMER, PRODUCER = 5, 4  # OTLP's SpanKind numbers (SPAN_KIND_CONSUMER, SPAN_KIND_PRODUCER)


async def test_three_traces_one_batch_links_and_continued_context(kafka, names, engine):
    traces = [f"{i + 1:032x}" for i in range(3)]
    parents = [f"{0xa0 + i:016x}" for i in range(3)]
    with OtlpReceiver() as otlp:
        s = settings_for(kafka, names, tracing={"otlp_endpoint": otlp.endpoint, "service_name": "sl-test"})
        await ensure_topics(kafka.bootstrap, [names.input], partitions=1)
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await p.start()
        try:  # three messages from three traces, in one partition before the worker starts: one poll batch
            for i in range(3):
                await p.send(names.input, encode_input(f"text number {i}", id=f"m{i}"), key=b"k",
                             headers=[("traceparent", f"00-{traces[i]}-{parents[i]}-01".encode())])
            await p.send(names.input, encode_input("no trace here", id="m3"), key=b"k")
            await p.send(names.input, encode_input("bad traceparent", id="m4"), key=b"k",
                         headers=[("traceparent", b"\xff\xfe not a traceparent")])
            await p.flush()
        finally:
            await p.stop()
        async with running_worker(s, engine):
            out = await read_labels(kafka.bootstrap, names.output, {f"m{i}" for i in range(5)})
        spans = await otlp.wait_for(lambda got: sum(sp.name.endswith(" process") for sp in got) >= 5)

    by_id = {sp.span_id: sp for sp in spans}
    process = {sp.trace_id: sp for sp in spans if sp.name == f"{names.input} process"}
    for t, parent in zip(traces, parents):
        sp = process[t]
        assert sp.parent_id == parent and sp.kind == CONSUMER, "the message span continues its traceparent"
        assert sp.attributes["messaging.destination.name"] == names.input and sp.service == "sl-test"
        kids = {c.name: c for c in spans if c.parent_id == sp.span_id}
        assert set(kids) == {"queue"}
        assert kids["queue"].start_ns == sp.start_ns <= kids["queue"].end_ns <= sp.end_ns
    fresh = [sp for sp in process.values() if sp.trace_id not in traces]
    assert len(fresh) == 2 and all(sp.parent_id == "" for sp in fresh), "no or a bad traceparent: a new root"

    infer = [sp for sp in spans if sp.name == "infer"]
    linked = {ln for sp in infer for ln in sp.links}
    for t in traces:
        assert (t, process[t].span_id) in linked, "the engine call links to every message it answered"
    one = [sp for sp in infer if {t for t, _ in sp.links} >= set(traces)]
    assert one, "the three messages rode one engine call, whose span links all three traces"
    assert one[0].trace_id not in traces and one[0].attributes["streamlabel.batch.rows"] >= 3

    publish = [sp for sp in spans if sp.name == f"{names.output} publish"]
    assert all(sp.kind == PRODUCER for sp in publish)
    published = {ln for sp in publish for ln in sp.links}
    assert {(sp.trace_id, sp.span_id) for sp in process.values()} <= published, "publish spans link every message"
    for r in out:  # the output's traceparent continues the message's trace from its span
        _, trace_id, span_id, _ = dict(r.headers)["traceparent"].decode().split("-")
        assert by_id[span_id].name == f"{names.input} process" and by_id[span_id].trace_id == trace_id


async def test_a_generated_answer_gets_a_generate_span_under_its_message(kafka, names, tiny_generator):
    from pipeline.generation import GenerativeModel

    model = GenerativeModel(tiny_generator, variant="fp32", provider="cpu")
    trace, parent = f"{0xbeef:032x}", f"{0xcafe:016x}"
    try:
        with OtlpReceiver() as otlp:
            s = settings_for(kafka, names, tracing={"otlp_endpoint": otlp.endpoint}, slo={"objective_ms": 30_000},
                             generate={"max_new_tokens": 6})
            await ensure_topics(kafka.bootstrap, [names.input], partitions=1)
            p = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
            await p.start()
            try:
                await p.send(names.input, encode_input("my card was declined", id="g0"), key=b"k",
                             headers=[("traceparent", f"00-{trace}-{parent}-01".encode())])
                await p.flush()
            finally:
                await p.stop()
            async with running_worker(s, model):
                await read_labels(kafka.bootstrap, names.output, {"g0"})
            spans = await otlp.wait_for(lambda got: any(sp.name == "generate" for sp in got))
    finally:
        model.close()
    [msg] = [sp for sp in spans if sp.name == f"{names.input} process"]
    [gen] = [sp for sp in spans if sp.name == "generate"]
    assert msg.trace_id == trace and msg.parent_id == parent
    assert gen.parent_id == msg.span_id and gen.trace_id == trace
    assert 1 <= gen.attributes["gen_ai.usage.output_tokens"] <= 6 and gen.attributes["streamlabel.model"] == model.model_id
    assert msg.start_ns <= gen.start_ns <= gen.end_ns <= msg.end_ns
