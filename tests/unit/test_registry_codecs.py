"""The Schema Registry codecs without a registry: the output schemas' three forms agree, wire-format heads, the
Protobuf schema forms, and an output that cannot be encoded is dead-lettered, not raised."""

from __future__ import annotations

import base64
import io
import json
import struct

import fastavro
import pytest
from aiokafka import TopicPartition

from consumers.records import RecordBuilder
from pipeline.config import FormatSettings
from pipeline.errors import BadEvent
from pipeline.events import Event, Prediction
from pipeline.registry import AVRO_GENERATION, AVRO_LABEL, RegistryDecoder, compile_proto, json_schema, proto_schema

LABEL = {"id": "e1", "label": "negative", "score": 0.9, "scores": {"negative": 0.9, "positive": 0.1},
         "model": "m@1", "cached": False, "source": None, "entity": "ACME", "produced_at": 1, "labeled_at": 2,
         "latency_ms": {"e2e": 3, "infer": 1.5}}


def test_the_output_schema_in_three_forms_accepts_the_label_record():
    import jsonschema

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(AVRO_LABEL), LABEL)
    buf.seek(0)
    assert fastavro.schemaless_reader(buf, fastavro.parse_schema(AVRO_LABEL), None)["label"] == "negative"
    jsonschema.validate(LABEL, json_schema(AVRO_LABEL))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**LABEL, "extra": 1}, json_schema(AVRO_LABEL))
    for avro in (AVRO_LABEL, AVRO_GENERATION):
        pool, fd = compile_proto(proto_schema(avro), {})
        names = [f.name for f in pool.FindMessageTypeByName(f"streamlabel.{avro['name']}").fields]
        assert names == [f["name"] for f in avro["fields"]]


def test_protobuf_schema_as_source_or_as_base64_descriptor():
    text = 'syntax = "proto3";\npackage shop;\nimport "google/protobuf/timestamp.proto";\n' \
           'message Outer { message Inner { string body = 1; } Inner inner = 1; google.protobuf.Timestamp at = 2; }\n'
    pool, fd = compile_proto(text, {})
    assert pool.FindMessageTypeByName("shop.Outer.Inner").fields_by_name["body"]
    encoded = base64.b64encode(fd.SerializeToString()).decode()
    pool2, fd2 = compile_proto(encoded, {})  # the form confluent-kafka's Python serializer registers
    assert fd2.package == "shop" and pool2.FindMessageTypeByName("shop.Outer.Inner")
    with pytest.raises(ValueError):
        compile_proto('syntax = "proto3";\nmessage Broken {', {})


@pytest.mark.parametrize("value, start", [
    (None, "tombstone"),
    (b"", "not the Confluent wire format"),
    (b'{"text": "json"}', "not the Confluent wire format"),
    (b"\x00\x00\x00", "not the Confluent wire format"),
    (b"\x01" + b"\x00" * 20, "not the Confluent wire format"),
])
def test_values_outside_the_wire_format_are_bad_events(value, start):
    dec = RegistryDecoder("avro", FormatSettings(input="avro", registry_url="http://127.0.0.1:9"), log=None,
                          waits=None, registry=object())
    head = dec._head(value)
    assert isinstance(head, BadEvent) and head.reason.startswith(start)


def test_wire_format_head_reads_the_id_and_protobuf_indexes():
    dec = RegistryDecoder("protobuf", FormatSettings(input="protobuf", registry_url="http://127.0.0.1:9"), log=None,
                          waits=None, registry=object())
    sid, (payload, indexes) = dec._head(b"\x00" + struct.pack(">I", 42) + b"\x04\x02\x00" + b"payload")
    assert (sid, payload, indexes) == (42, b"payload", [1, 0])  # zigzag varints: count 2, then 1 and 0


class _Refusing:
    kind = "classify"

    def encode(self, *a, **kw):
        raise ValueError("no schema for this")


def test_an_output_that_cannot_be_encoded_is_dead_lettered():
    rb = RecordBuilder(_Refusing(), output="out", dlq="dlq", dlq_max_bytes=1024, log=_Log(), log_text=False,
                       ignored_deadline=None)
    rec = type("R", (), {"value": b"v", "key": b"k", "headers": [], "offset": 7, "timestamp": 1})()
    out = rb.answer(TopicPartition("in", 0), rec, Event(id="e", text="t"),
                    Prediction("a", 1.0, {"a": 1.0}, "m@1"), 2, 0.0)
    assert out.topic == "dlq" and dict(out.headers)["streamlabel.error"].startswith(b"output encoding: ValueError")


class _Log:
    def debug(self, *a, **kw):
        pass

    info = warning = debug
