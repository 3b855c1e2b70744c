"""Schema Registry formats: Avro, Protobuf and JSON Schema values in the Confluent wire format.

A value is a magic byte (0), a 4-byte schema id, for Protobuf the message indexes, then the payload. Input:
``RegistryDecoder`` reads the ids of a poll batch, fetches the schemas it has not seen (once per id, then
cached), decodes each value with the writer's schema and plucks the configured fields (``[format] text_field``,
…) for ``pipeline.events.event_from_fields``. Output: ``RegistryEncoder`` registers the label (or
generated-text) schema under the subject naming strategy at start and prefixes every record with its id.

The codecs and the client are libraries: confluent-kafka's registry client (HTTP, auth, TLS, cache) and its
``SchemaId`` framing, fastavro, jsonschema, protobuf (``.proto`` texts are compiled by grpcio-tools' protoc).

What goes wrong, and what happens:

* not in the wire format, a schema id the registry does not know, a value that does not match its schema, a
  schema that cannot be parsed: a ``BadEvent`` (the record goes to the DLQ with the reason);
* the registry unreachable, timing out or answering 5xx: the batch waits and retries with backoff (the records
  stay uncommitted; backpressure pauses fetching); counted and logged once per outage, never a loss;
* the registry refusing our credentials (401/403) or our output schema (409, incompatible): a ``ConfigError``
  that stops the worker with what to change.

This module is the one factory of registry clients (design: one factory per external client kind).
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import FormatSettings
from pipeline.errors import BadEvent, ConfigError

SCHEMA_TYPES = {"avro": "AVRO", "protobuf": "PROTOBUF", "json-schema": "JSON"}
UNKNOWN_ID_TTL_S = 30.0  # an id the registry did not know is asked again after this long (it may be registered since)
BACKOFF_MAX_S = 5.0
MAX_SCHEMAS = 10_000  # schema ids remembered; past it the unknown ones are forgotten (asked again if seen again)
_FIELDS = ("text", "id", "source", "entity", "ts", "label")


def _libs():
    try:
        from confluent_kafka.schema_registry import AsyncSchemaRegistryClient, Schema, SchemaRegistryError
        from confluent_kafka.schema_registry.common.serde import SchemaId
    except ImportError:
        raise ConfigError("Schema Registry formats need confluent-kafka's registry client, fastavro, jsonschema and "
                          "protobuf", hint="pip install 'streamlabel[registry]'") from None
    return AsyncSchemaRegistryClient, Schema, SchemaRegistryError, SchemaId


def client(f: FormatSettings):
    """The registry client for ``[format]`` (basic auth, TLS); our own loop retries, so the client does not."""
    Client = _libs()[0]
    conf: dict[str, Any] = {"url": f.registry_url, "timeout": f.registry_timeout_s, "max.retries": 0}
    if f.registry_username:
        conf["basic.auth.credentials.source"] = "USER_INFO"
        conf["basic.auth.user.info"] = f"{f.registry_username}:{f.registry_password}"
    for key, value in (("ssl.ca.location", f.registry_ca_file), ("ssl.certificate.location", f.registry_certfile),
                       ("ssl.key.location", f.registry_keyfile)):
        if value:
            conf[key] = value
    try:
        return Client(conf)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the Schema Registry client refused its settings: {exc}", where="[format]") from None


def _transient(exc: BaseException, Error) -> bool:
    """The registry could not answer now (unreachable, timeout, 5xx, 408, 429): wait and retry."""
    if isinstance(exc, Error):
        code = exc.http_status_code
        return code is None or code < 0 or code >= 500 or code in (408, 429)
    return isinstance(exc, (OSError, asyncio.TimeoutError)) or type(exc).__module__.split(".")[0] in ("httpx", "httpcore",
                                                                                                        "httpx2", "httpcore2")


def _tls_failure(exc: BaseException) -> str | None:
    """A certificate the client does not trust (or a TLS version or cipher it cannot agree on): configuration,
    not an outage that waiting would end."""
    import ssl

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return getattr(exc, "verify_message", None) or exc.reason or str(exc)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class _Outage:
    """Backoff and one log line per outage, for every registry call."""

    def __init__(self, url: str, log, counter) -> None:
        self.url, self.log, self.counter = url, log, counter
        self.since: float | None = None

    async def call(self, what: str, fn: Callable, Error, give_up_s: float | None = None):
        delay = 0.1
        end = None if give_up_s is None else time.monotonic() + give_up_s
        while True:
            try:
                result = await fn()
            except Exception as exc:  # noqa: BLE001 — sorted below: transient (wait), else the caller's
                if (tls := _tls_failure(exc)) is not None:
                    raise ConfigError(f"the TLS handshake with the Schema Registry at {self.url} failed: {tls}",
                                      where="format.registry_url",
                                      hint="set format.registry_ca_file to the CA that signed the registry's "
                                           "certificate (and registry_certfile/keyfile if it asks for a client "
                                           "certificate)") from None
                if not _transient(exc, Error):
                    raise
                if end is not None and time.monotonic() > end:
                    raise ConfigError(f"the Schema Registry at {self.url} did not answer ({what}): "
                                      f"{type(exc).__name__}: {str(exc)[:160]}", where="format.registry_url",
                                      hint="check the URL and that the registry runs") from None
                self.counter.inc()
                if self.since is None:
                    self.since = time.monotonic()
                    self.log.warning("schema_registry_unavailable", url=self.url, during=what,
                                     error=f"{type(exc).__name__}: {str(exc)[:200]}",
                                     note="the records wait (uncommitted) and the request is retried with backoff")
                await asyncio.sleep(delay)  # backoff, not synchronisation
                delay = min(BACKOFF_MAX_S, delay * 2)
                continue
            if self.since is not None:
                self.log.info("schema_registry_back", url=self.url, waited_s=round(time.monotonic() - self.since, 1))
                self.since = None
            return result


def _auth(exc, url: str) -> ConfigError | None:
    if getattr(exc, "http_status_code", None) in (401, 403):
        return ConfigError(f"the Schema Registry at {url} refused our credentials (HTTP {exc.http_status_code}: "
                           f"{exc.error_message})", where="[format]",
                           hint="check format.registry_username / registry_password (and the registry's ACLs)")
    return None


# ------------------------------------------------------------------------------------------------ input
@dataclass(frozen=True, slots=True)
class _Unknown:
    reason: str
    until: float


class RegistryDecoder:
    """Values in the Confluent wire format → the configured fields (a dict per value), or ``BadEvent``."""

    def __init__(self, fmt: str, f: FormatSettings, *, log, waits, registry=None) -> None:
        _, _, self.Error, self.SchemaId = _libs()
        self.fmt = fmt
        self.schema_type = SCHEMA_TYPES[fmt]
        self.url = f.registry_url
        self.client = registry or client(f)
        self.paths = {name: tuple(getattr(f, f"{name}_field").split(".")) for name in _FIELDS if name != "label"}
        self.paths["label"] = ("label",)
        self.readers: dict[int, Callable[[bytes, list[int] | None], Any] | _Unknown] = {}
        self.outage = _Outage(self.url, log, waits)
        self.log = log

    async def decode_many(self, values: list[bytes | None]) -> list[dict | BadEvent]:
        """One poll batch: the schemas it needs are fetched first (waiting out an outage), then each value."""
        heads: list[tuple[int, Any] | BadEvent] = []
        for v in values:
            heads.append(self._head(v))
        now = time.monotonic()
        missing = {h[0] for h in heads if not isinstance(h, BadEvent)}
        missing = {i for i in missing if not (i in self.readers and not (isinstance(self.readers[i], _Unknown)
                                                                          and self.readers[i].until <= now))}
        if len(self.readers) + len(missing) > MAX_SCHEMAS:  # junk ids must not grow memory without bound
            for sid in [k for k, r in self.readers.items() if isinstance(r, _Unknown)]:
                del self.readers[sid]
        for sid in sorted(missing):
            self.readers[sid] = await self._reader(sid)
        out: list[dict | BadEvent] = []
        for h in heads:
            if isinstance(h, BadEvent):
                out.append(h)
                continue
            sid, (payload, indexes) = h
            reader = self.readers[sid]
            if isinstance(reader, _Unknown):
                out.append(BadEvent(reader.reason))
                continue
            try:
                out.append(self._pluck(reader(payload, indexes)))
            except BadEvent as bad:
                out.append(bad)
            except Exception as exc:  # noqa: BLE001 — any codec failure on untrusted bytes is this record's reason
                out.append(BadEvent(f"schema mismatch: the value does not decode with its schema (id {sid}, "
                                    f"{self.fmt}): {type(exc).__name__}: {str(exc)[:160]}"))
        return out

    def _head(self, value: bytes | None):
        if value is None:
            return BadEvent("tombstone: the record value is null")
        if len(value) < 5 or value[0] != 0:
            return BadEvent(f"not the Confluent wire format: a {self.fmt} value starts with the magic byte 0 and a "
                            f"4-byte schema id (got {len(value)} bytes, first byte {value[:1].hex() or 'none'})")
        sid = self.SchemaId(self.schema_type)
        try:
            rest = sid.from_bytes(io.BytesIO(value))
        except Exception as exc:  # noqa: BLE001 — truncated message indexes, …
            return BadEvent(f"not the Confluent wire format: {type(exc).__name__}: {str(exc)[:120]}")
        return sid.id, (rest.read(), sid.message_indexes)

    def _pluck(self, doc) -> dict:
        fields = {}
        for name, path in self.paths.items():
            v = doc
            for part in path:
                v = _get(v, part)
                if v is None:
                    break
            if v is not None:
                fields[name] = _plain(v)
        return fields

    async def _reader(self, sid: int):
        try:
            schema = await self.outage.call(f"schema id {sid}", lambda: self.client.get_schema(sid), self.Error)
        except self.Error as exc:
            if (err := _auth(exc, self.url)) is not None:
                raise err from None
            if exc.http_status_code == 404:
                reason = (f"unknown schema id: the registry at {self.url} has no schema {sid} (written against another "
                          f"registry, or deleted)")
            else:
                reason = f"schema id {sid}: the registry answered HTTP {exc.http_status_code}: {exc.error_message}"
            self.log.warning("schema_id_unknown", schema_id=sid, reason=reason[:200])
            return _Unknown(reason, time.monotonic() + UNKNOWN_ID_TTL_S)
        if (schema.schema_type or "AVRO") != self.schema_type:  # the Confluent API leaves out AVRO, the default
            return _Unknown(f"schema type mismatch: schema {sid} is {schema.schema_type}, [format] input is "
                            f"{self.fmt}", time.monotonic() + UNKNOWN_ID_TTL_S)
        try:
            if self.fmt == "avro":
                return await self._avro(schema)
            if self.fmt == "json-schema":
                return _json_reader(schema.schema_str)
            return await self._protobuf(sid, schema)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 — a schema we cannot use: every record written with it is dead-lettered
            self.log.warning("schema_unusable", schema_id=sid, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            return _Unknown(f"unusable schema {sid} ({self.fmt}): {type(exc).__name__}: {str(exc)[:160]}",
                            time.monotonic() + UNKNOWN_ID_TTL_S)

    async def _references(self, schema, seen: dict[str, str]) -> None:
        for ref in schema.references or ():
            if ref.name in seen:
                continue
            got = await self.outage.call(f"reference {ref.subject}/{ref.version}",
                                         lambda ref=ref: self.client.get_version(ref.subject, ref.version), self.Error)
            await self._references(got.schema, seen)
            seen[ref.name] = got.schema.schema_str

    async def _avro(self, schema):
        import fastavro

        named: dict = {}
        refs: dict[str, str] = {}
        await self._references(schema, refs)
        for text in refs.values():
            fastavro.parse_schema(json.loads(text), named_schemas=named)
        parsed = fastavro.parse_schema(json.loads(schema.schema_str), named_schemas=named)

        def read(payload: bytes, _indexes):
            buf = io.BytesIO(payload)
            doc = fastavro.schemaless_reader(buf, parsed, None)
            if buf.tell() != len(payload):
                raise BadEvent(f"schema mismatch: {len(payload) - buf.tell()} bytes left after the Avro record")
            return doc
        return read

    async def _protobuf(self, sid: int, schema):
        from google.protobuf import message_factory

        refs: dict[str, str] = {}
        await self._references(schema, refs)
        pool, fd = await asyncio.to_thread(compile_proto, schema.schema_str, refs)
        classes: dict[tuple[int, ...], type] = {}

        def read(payload: bytes, indexes):
            key = tuple(indexes or (0,))
            cls = classes.get(key)
            if cls is None:
                desc = _message_at(fd, key)
                cls = classes[key] = message_factory.GetMessageClass(pool.FindMessageTypeByName(desc))
            return cls.FromString(payload)
        return read


def _get(v, part: str):
    if isinstance(v, dict):
        return v.get(part)
    if hasattr(v, "DESCRIPTOR"):  # a protobuf message: an unset field (proto3 default "" or 0) counts as absent
        if part not in v.DESCRIPTOR.fields_by_name:
            return None
        field = v.DESCRIPTOR.fields_by_name[part]
        if field.message_type is not None and not _is_repeated(field):
            return getattr(v, part) if v.HasField(part) else None
        got = getattr(v, part)
        return None if got in ("", 0) and not isinstance(got, bool) else got
    return None


def _is_repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)
    return bool(rep) if rep is not None else field.label == field.LABEL_REPEATED


def _plain(v):
    if hasattr(v, "ToMilliseconds"):  # google.protobuf.Timestamp
        return v.ToMilliseconds()
    if hasattr(v, "DESCRIPTOR") and "value" in v.DESCRIPTOR.fields_by_name:  # wrappers (StringValue, Int64Value, …)
        return v.value
    return v


def _json_reader(schema_str: str):
    import jsonschema
    import orjson

    schema = json.loads(schema_str)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema)

    def read(payload: bytes, _indexes):
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadEvent(f"invalid JSON: {str(exc)[:120]}") from None
        error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the record"
            raise BadEvent(f"schema mismatch: {where}: {error.message[:160]}")
        return doc
    return read


def compile_proto(text: str, imports: dict[str, str]):
    """A Protobuf schema as registries hold it (and the files it imports, by name) → a descriptor pool and the
    file's descriptor proto. Two forms: ``.proto`` source (Java and Go clients register it; compiled by protoc),
    and a base64 ``FileDescriptorProto`` (confluent-kafka's Python serializer registers that)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    fd = _descriptor(text)
    if fd is None:
        files = _protoc(text, {k: v for k, v in imports.items() if _descriptor(v) is None})
        for f in files:
            pool.Add(f)
        return pool, files[-1]
    added: set[str] = set()

    def add(f: descriptor_pb2.FileDescriptorProto) -> None:
        for dep in f.dependency:
            if dep in added:
                continue
            if dep in imports:
                got = _descriptor(imports[dep])
                add(got if got is not None else _protoc(imports[dep], {})[-1])
            else:  # a well-known type (google/protobuf/…), which registries leave out of the references
                add(_well_known(dep))
        if f.name not in added:
            added.add(f.name)
            pool.Add(f)
    add(fd)
    return pool, fd


def _descriptor(text: str):
    import base64
    import binascii

    from google.protobuf import descriptor_pb2
    from google.protobuf.message import DecodeError

    if not text or any(c in text for c in " \n;{"):
        return None
    try:
        fd = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, DecodeError):
        return None
    return fd if fd.message_type or fd.name else None


def _well_known(name: str):
    import importlib

    from google.protobuf import descriptor_pb2, descriptor_pool

    if name.startswith("google/protobuf/") and name.endswith(".proto"):
        try:
            importlib.import_module("google.protobuf." + name[len("google/protobuf/"):-len(".proto")] + "_pb2")
        except ImportError:
            pass
    try:
        f = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        raise ValueError(f"the schema imports {name}, which is neither a reference nor a well-known type") from None
    out = descriptor_pb2.FileDescriptorProto()
    f.CopyToProto(out)
    return out


def _protoc(text: str, imports: dict[str, str]) -> list:
    import importlib.resources

    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="streamlabel-proto-") as tmp:
        root = Path(tmp)
        for name, body in imports.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(body, encoding="utf-8")
        (root / "schema.proto").write_text(text, encoding="utf-8")
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        out = root / "out.pb"
        rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", "--include_imports",
                          f"--descriptor_set_out={out}", str(root / "schema.proto")])
        if rc != 0 or not out.exists():
            raise ValueError("protoc could not compile the schema (its errors are on stderr)")
        return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _message_at(fd, indexes: tuple[int, ...]) -> str:
    """The full name of the message the wire format's indexes point at (``[0]``: the file's first message)."""
    msgs, name = fd.message_type, fd.package
    for depth, i in enumerate(indexes):
        if not 0 <= i < len(msgs):
            raise BadEvent(f"schema mismatch: message index {list(indexes)} is not in the schema")
        name = f"{name}.{msgs[i].name}" if name else msgs[i].name
        msgs = msgs[i].nested_type
    return name


# ------------------------------------------------------------------------------------------------ output
_LATENCY = {"type": "map", "values": "double"}
AVRO_LABEL = {
    "type": "record", "name": "Label", "namespace": "streamlabel",
    "doc": "A label record (docs/wire-format.md).",
    "fields": [
        {"name": "id", "type": "string"}, {"name": "label", "type": "string"}, {"name": "score", "type": "double"},
        {"name": "scores", "type": {"type": "map", "values": "double"}}, {"name": "model", "type": "string"},
        {"name": "cached", "type": "boolean"},
        {"name": "source", "type": ["null", "string"], "default": None},
        {"name": "entity", "type": ["null", "string"], "default": None},
        {"name": "produced_at", "type": "long"}, {"name": "labeled_at", "type": "long"},
        {"name": "latency_ms", "type": _LATENCY},
        {"name": "cascade_stage", "type": ["null", "int"], "default": None},
        {"name": "cascade_degraded", "type": ["null", "boolean"], "default": None},
    ],
}
AVRO_GENERATION = {
    "type": "record", "name": "Generation", "namespace": "streamlabel",
    "doc": "A generated-text record (docs/wire-format.md).",
    "fields": [
        {"name": "id", "type": "string"}, {"name": "text", "type": "string"}, {"name": "tokens", "type": "int"},
        {"name": "finish_reason", "type": "string"}, {"name": "model", "type": "string"},
        {"name": "cached", "type": "boolean"},
        {"name": "source", "type": ["null", "string"], "default": None},
        {"name": "entity", "type": ["null", "string"], "default": None},
        {"name": "produced_at", "type": "long"}, {"name": "generated_at", "type": "long"},
        {"name": "latency_ms", "type": _LATENCY},
    ],
}
_JSON_TYPES = {"string": "string", "double": "number", "long": "integer", "int": "integer", "boolean": "boolean"}


def json_schema(avro: dict) -> dict:
    """The JSON Schema twin of an output Avro schema (one definition of the fields)."""
    props, required = {}, []
    for fld in avro["fields"]:
        t = fld["type"]
        if isinstance(t, dict):
            props[fld["name"]] = {"type": "object", "additionalProperties": {"type": "number"}}
        elif isinstance(t, list):
            props[fld["name"]] = {"type": ["null", _JSON_TYPES[t[1]]]}
        else:
            props[fld["name"]] = {"type": _JSON_TYPES[t]}
        if "default" not in fld:
            required.append(fld["name"])
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"streamlabel.{avro['name']}",
            "type": "object", "properties": props, "required": required, "additionalProperties": False}


_PROTO_TYPES = {"string": "string", "double": "double", "long": "int64", "int": "int32", "boolean": "bool"}


def proto_schema(avro: dict) -> str:
    """The ``.proto`` twin of an output Avro schema: proto3, optional fields where Avro allows null."""
    lines = ['syntax = "proto3";', "package streamlabel;", "", f"message {avro['name']} {{"]
    for n, fld in enumerate(avro["fields"], 1):
        t = fld["type"]
        if isinstance(t, dict):
            lines.append(f"  map<string, double> {fld['name']} = {n};")
        elif isinstance(t, list):
            lines.append(f"  optional {_PROTO_TYPES[t[1]]} {fld['name']} = {n};")
        else:
            lines.append(f"  {_PROTO_TYPES[t]} {fld['name']} = {n};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def input_schema(f: FormatSettings) -> dict:
    """The Avro schema ``streamlabel produce`` and ``replay`` write input events with, under the field names the
    worker is configured to read (``[format] text_field``, …); its Protobuf and JSON Schema twins follow."""
    names = {"text": f.text_field, "id": f.id_field, "source": f.source_field, "entity": f.entity_field,
             "ts": f.ts_field, "label": "label"}
    dotted = [n for n in names.values() if "." in n]
    if dotted or len(set(names.values())) < len(names):
        raise ConfigError(f"produce and replay write flat records with distinct field names; got {sorted(names.values())}",
                          where="[format] *_field", hint="use plain field names to produce, or produce with your own client")
    opt = {"default": None}
    return {"type": "record", "name": "TextEvent", "namespace": "streamlabel", "doc": "A text event to label.",
            "fields": [{"name": names["text"], "type": "string"}]
            + [{"name": names[k], "type": ["null", "string"], **opt} for k in ("id", "source", "entity")]
            + [{"name": names["ts"], "type": ["null", "long"], **opt}, {"name": "label", "type": ["null", "string"], **opt}]}


def input_record(doc: dict, f: FormatSettings) -> dict:
    """A JSON input event (``pipeline.events.encode_input``'s fields) under the configured field names."""
    names = {"text": f.text_field, "id": f.id_field, "source": f.source_field, "entity": f.entity_field,
             "ts": f.ts_field, "label": "label"}
    return {names[k]: doc.get(k) for k in names}


class RegistryEncoder:
    """Output records → the Confluent wire format under the schema registered at ``start``."""

    def __init__(self, fmt: str, f: FormatSettings, *, kind: str, log, waits, registry=None,
                 schema: dict | None = None) -> None:
        _, self.Schema, self.Error, self.SchemaId = _libs()
        self.fmt, self.f, self.log = fmt, f, log
        self.url = f.registry_url
        self.client = registry or client(f)
        self.avro = schema or (AVRO_LABEL if kind == "classify" else AVRO_GENERATION)
        self.outage = _Outage(self.url, log, waits)
        self.schema_id: int | None = None
        self.subject: str | None = None
        self._encode: Callable[[dict], bytes] | None = None

    def subject_for(self, topic: str) -> str:
        record = f"{self.avro['namespace']}.{self.avro['name']}"
        return {"topic": f"{topic}-value", "record": record, "topic_record": f"{topic}-{record}"}[self.f.subject_strategy]

    async def start(self, topic: str, give_up_s: float | None = None) -> int:
        """Register the output schema (waiting out an outage, or up to ``give_up_s``); its id prefixes every record
        from now on."""
        self.subject = self.subject_for(topic)
        if self.fmt == "avro":
            text = json.dumps(self.avro)
        elif self.fmt == "json-schema":
            text = json.dumps(json_schema(self.avro))
        else:
            text = proto_schema(self.avro)
        schema = self.Schema(text, SCHEMA_TYPES[self.fmt])
        try:
            sid = await self.outage.call(f"registering {self.subject}",
                                         lambda: self.client.register_schema(self.subject, schema), self.Error,
                                         give_up_s)
        except self.Error as exc:
            if (err := _auth(exc, self.url)) is not None:
                raise err from None
            raise ConfigError(f"the Schema Registry at {self.url} refused the output schema under subject "
                              f"{self.subject!r} (HTTP {exc.http_status_code}, error {exc.error_code}: "
                              f"{exc.error_message})", where="[format] output",
                              hint="a subject holding an incompatible schema: use another output topic or "
                                   "format.subject_strategy, or relax the subject's compatibility") from None
        self.schema_id = sid
        self._encode = await asyncio.to_thread(self._encoder, sid, text)
        self.log.info("schema_registered", subject=self.subject, schema_id=sid, format=self.fmt)
        return sid

    def _encoder(self, sid: int, text: str) -> Callable[[dict], bytes]:
        if self.fmt == "avro":
            import fastavro

            prefix = struct.pack(">bI", 0, sid)
            parsed = fastavro.parse_schema(self.avro)

            def avro(record: dict) -> bytes:
                buf = io.BytesIO()
                buf.write(prefix)
                fastavro.schemaless_writer(buf, parsed, record)
                return buf.getvalue()
            return avro
        if self.fmt == "json-schema":
            import orjson

            prefix = struct.pack(">bI", 0, sid)
            return lambda record: prefix + orjson.dumps(record)
        from google.protobuf import json_format, message_factory

        pool, fd = compile_proto(text, {})
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(_message_at(fd, (0,))))
        prefix = self.SchemaId("PROTOBUF", sid, message_indexes=[0]).id_to_bytes()

        def protobuf(record: dict) -> bytes:
            msg = json_format.ParseDict({k: v for k, v in record.items() if v is not None}, cls())
            return prefix + msg.SerializeToString()
        return protobuf

    def encode(self, record: dict) -> bytes:
        return self._encode(record)


def open_formats(f: FormatSettings, *, kind: str, log, waits) -> tuple[RegistryDecoder | None, RegistryEncoder | None]:
    """The worker's decoder (None: JSON input) and encoder (None: JSON output), sharing one client."""
    if f.input == "json" and f.output == "json":
        return None, None
    registry = client(f)
    decoder = RegistryDecoder(f.input, f, log=log, waits=waits, registry=registry) if f.input != "json" else None
    encoder = RegistryEncoder(f.output, f, kind=kind, log=log, waits=waits, registry=registry) if f.output != "json" else None
    return decoder, encoder
