"""Avro, Protobuf and JSON Schema topics through a real Schema Registry (Apicurio, deploy/schema-registry/) and a
real broker: records written by confluent-kafka's own serializers in, records its deserializers read out."""

from __future__ import annotations

import asyncio
import json
import struct

import aiokafka
import pytest

from pipeline.metrics import Metrics
from pipeline.registry import AVRO_LABEL, compile_proto, proto_schema
from producers.topics import ensure_topics, read_until

from .helpers import running_worker, settings_for

pytestmark = pytest.mark.integration

USER_AVRO = {"type": "record", "name": "Message", "namespace": "shop", "fields": [
    {"name": "body", "type": "string"}, {"name": "msg_id", "type": "string"},
    {"name": "ts", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "default": None}]}
USER_AVRO_V2 = {**USER_AVRO, "fields": USER_AVRO["fields"] + [{"name": "channel", "type": "string", "default": "web"}]}
USER_JSON = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
             "properties": {"body": {"type": "string"}, "msg_id": {"type": "string"}}, "required": ["body"],
             "additionalProperties": False}  # a closed content model: adding a property is a compatible change
USER_PROTO = 'syntax = "proto3";\npackage shop;\nmessage Message {\n  string body = 1;\n  string msg_id = 2;\n}\n'
USER_PROTO_V2 = USER_PROTO.replace("  string msg_id = 2;\n", "  string msg_id = 2;\n  string channel = 3;\n")
USER_JSON_V2 = {**USER_JSON, "properties": {**USER_JSON["properties"], "channel": {"type": "string"}}}
V2 = {"avro": USER_AVRO_V2, "protobuf": USER_PROTO_V2, "json-schema": USER_JSON_V2}


def _client(url):
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": url, "timeout": 10})


def _proto_class(text: str, name: str):
    from google.protobuf import message_factory

    pool, _ = compile_proto(text, {})
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _serializer(fmt: str, url: str, schema=None):
    """The library's own serializer for our test's input schema (what users' producers run)."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

    c = _client(url)
    if fmt == "avro":
        return AvroSerializer(c, json.dumps(schema or USER_AVRO)), dict
    if fmt == "json-schema":
        return JSONSerializer(json.dumps(schema or USER_JSON), c), dict
    cls = _proto_class(schema or USER_PROTO, "shop.Message")
    return ProtobufSerializer(cls, c, {"use.deprecated.format": False}), (lambda **kw: cls(**kw))


def _deserializer(fmt: str, url: str):
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.schema_registry.json_schema import JSONDeserializer
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer

    c = _client(url)
    if fmt == "avro":
        return AvroDeserializer(c)
    if fmt == "json-schema":
        return JSONDeserializer(None, schema_registry_client=c)
    from google.protobuf import json_format

    des = ProtobufDeserializer(_proto_class(proto_schema(AVRO_LABEL), "streamlabel.Label"),
                               {"use.deprecated.format": False})
    return lambda value, ctx: json_format.MessageToDict(des(value, ctx), preserving_proto_field_name=True)


def _encode(fmt, url, topic, docs, schema=None) -> list[bytes]:
    from confluent_kafka.serialization import MessageField, SerializationContext

    ser, make = _serializer(fmt, url, schema)
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [ser(make(**d), ctx) for d in docs]


async def _produce(bootstrap, topic, values) -> None:
    p = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for v in values:
            await p.send(topic, v, key=b"k")
        await p.flush()
    finally:
        await p.stop()


def _decode_all(fmt, url, topic, records) -> list[dict]:
    from confluent_kafka.serialization import MessageField, SerializationContext

    des = _deserializer(fmt, url)
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [des(r.value, ctx) for r in records]


def _fmt_settings(kafka, names, reg, fmt, **extra):
    return settings_for(kafka, names, format={"input": fmt, "output": fmt, "registry_url": reg.url,
                                              "text_field": "body", "id_field": "msg_id", "registry_timeout_s": 2.0},
                        **extra)


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "json-schema"])
async def test_round_trip_and_bad_records_to_the_dlq(kafka, names, engine, schema_registry, fmt):
    url = schema_registry.url
    await ensure_topics(kafka.bootstrap, [names.input], partitions=1)
    good = await asyncio.to_thread(_encode, fmt, url, names.input,
                                   [{"body": f"message {i} about a refund", "msg_id": f"m{i}"} for i in range(20)])
    bad = [b'{"text": "plain JSON on an Avro topic"}', b"\x00" + struct.pack(">I", 987_654) + b"\x02ab"]
    if fmt == "json-schema":  # written against its schema id, but breaking it: no "body"
        bad.append(good[0][:5] + b'{"msg_id": "nobody"}')
    await _produce(kafka.bootstrap, names.input, good + bad)
    async with running_worker(_fmt_settings(kafka, names, schema_registry, fmt), engine):
        out = await read_until(kafka.bootstrap, [names.output], lambda recs: len(recs) >= 20, 60)
        dlq = await read_until(kafka.bootstrap, [names.dlq], lambda recs: len(recs) >= len(bad), 60)
    docs = await asyncio.to_thread(_decode_all, fmt, url, names.output, out)
    assert sorted(d["id"] for d in docs) == sorted(f"m{i}" for i in range(20))
    assert all(d["label"] in engine.labels and d["model"] == engine.model_id for d in docs)
    assert all(r.value[0] == 0 for r in out), "outputs are in the Confluent wire format"
    reasons = sorted(dict(r.headers)["streamlabel.error"].decode() for r in dlq)
    assert any(x.startswith("not the Confluent wire format") for x in reasons), reasons
    assert any(x.startswith("unknown schema id") and "987654" in x for x in reasons), reasons
    if fmt == "json-schema":
        assert any(x.startswith("schema mismatch") and "body" in x for x in reasons), reasons
    subjects = _client(url).get_subjects()
    assert f"{names.output}-value" in subjects, "the output schema is registered under TopicNameStrategy"


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "json-schema"])
async def test_schema_evolution_and_a_registry_outage_lose_nothing(kafka, names, engine, schema_registry, fmt):
    url = schema_registry.url
    await ensure_topics(kafka.bootstrap, [names.input], partitions=2)
    v1 = await asyncio.to_thread(_encode, fmt, url, names.input,
                                 [{"body": f"first version {i}", "msg_id": f"a{i}"} for i in range(10)])
    # A compatible new version (one more field): registered now, its records written later.
    v2 = await asyncio.to_thread(_encode, fmt, url, names.input,
                                 [{"body": f"second version {i}", "msg_id": f"b{i}", "channel": "app"}
                                  for i in range(10)], V2[fmt])
    assert v1[0][1:5] != v2[0][1:5], "two schema ids"
    metrics = Metrics()
    s = _fmt_settings(kafka, names, schema_registry, fmt)
    async with running_worker(s, engine, metrics=metrics) as w:
        await _produce(kafka.bootstrap, names.input, v1)
        await read_until(kafka.bootstrap, [names.output], lambda recs: len(recs) >= 10, 60)
        schema_registry.stop(kill=True)  # the worker has not seen v2's id yet: it must wait for the registry
        await _produce(kafka.bootstrap, names.input, v2)
        await _wait(lambda: metrics.registry_waits._value.get() >= 2, 30)
        assert w.labelled == 10 and w.dead_lettered == 0, "nothing dead-lettered or skipped while the registry is down"
        schema_registry.start()
        out = await read_until(kafka.bootstrap, [names.output], lambda recs: len(recs) >= 20, 90)
        assert w.dead_lettered == 0
    docs = await asyncio.to_thread(_decode_all, fmt, url, names.output, out)
    assert sorted(d["id"] for d in docs) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])


async def _wait(cond, timeout: float) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)  # polling a condition with a deadline


async def test_produce_writes_registry_records_the_worker_reads(kafka, names, engine, schema_registry):
    """``streamlabel produce`` with a registry format registers its input schema as .proto source (what Java and Go
    clients register) under the worker's field names; the worker reads it back; an unreachable registry is one line."""
    import os
    import subprocess
    import sys

    from pipeline.cli.local_services import free_port

    await ensure_topics(kafka.bootstrap, [names.input], partitions=2)
    env = {**os.environ, "STREAMLABEL_FORMAT__INPUT": "protobuf", "STREAMLABEL_FORMAT__REGISTRY_URL": schema_registry.url,
           "STREAMLABEL_FORMAT__TEXT_FIELD": "body", "STREAMLABEL_FORMAT__ID_FIELD": "msg_id"}
    cmd = [sys.executable, "-m", "pipeline.cli", "produce", "--count", "40", "--rate", "400", "--topic", names.input,
           "--bootstrap", kafka.bootstrap]
    done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["acked"] == 40
    s = settings_for(kafka, names, format={"input": "protobuf", "registry_url": schema_registry.url,
                                           "text_field": "body", "id_field": "msg_id"})
    async with running_worker(s, engine) as w:
        out = await read_until(kafka.bootstrap, [names.output], lambda recs: len(recs) >= 40, 60)
        assert w.dead_lettered == 0
    assert len({json.loads(r.value)["id"] for r in out}) == 40, "JSON out, every produced id answered"
    latest = _client(schema_registry.url).get_latest_version(f"{names.input}-value")
    assert latest.schema.schema_type == "PROTOBUF" and "message TextEvent" in latest.schema.schema_str
    assert "string body = 1;" in latest.schema.schema_str

    env["STREAMLABEL_FORMAT__REGISTRY_URL"] = f"http://127.0.0.1:{free_port()}"
    env["STREAMLABEL_FORMAT__REGISTRY_TIMEOUT_S"] = "0.5"
    done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: format.registry_url: the Schema Registry at http://")


async def test_a_registry_behind_tls(kafka, names, engine, tmp_path):
    """https with format.registry_ca_file: produce and the worker both trust the registry; without the CA, one line
    naming TLS and the setting to change (not a wait for an outage that never ends)."""
    import os
    import subprocess
    import sys

    from tests.faults.test_security import make_certs
    from tests.services import LocalRegistry

    certs = make_certs(tmp_path)
    reg = LocalRegistry(tmp_path / "registry", None, tls=(certs["cert"], certs["key"])).start()
    try:
        await ensure_topics(kafka.bootstrap, [names.input], partitions=1)
        env = {**os.environ, "STREAMLABEL_FORMAT__INPUT": "avro", "STREAMLABEL_FORMAT__REGISTRY_URL": reg.https_url,
               "STREAMLABEL_FORMAT__REGISTRY_CA_FILE": certs["ca"]}
        cmd = [sys.executable, "-m", "pipeline.cli", "produce", "--count", "10", "--rate", "200", "--topic",
               names.input, "--bootstrap", kafka.bootstrap]
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        s = settings_for(kafka, names, format={"input": "avro", "registry_url": reg.https_url,
                                               "registry_ca_file": certs["ca"]})
        async with running_worker(s, engine) as w:
            out = await read_until(kafka.bootstrap, [names.output], lambda recs: len(recs) >= 10, 60)
            assert w.dead_lettered == 0
        assert len({json.loads(r.value)["id"] for r in out}) == 10

        del env["STREAMLABEL_FORMAT__REGISTRY_CA_FILE"]
        done = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=120)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert last.startswith("error: format.registry_url: the TLS handshake with the Schema Registry") and \
            "registry_ca_file" in last, last
    finally:
        reg.stop()
