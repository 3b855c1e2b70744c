"""Wire format: decode input records into ``Event``s (or ``BadEvent``), encode ``Prediction``s as label events.

Input value: JSON ``{"id", "text", "source", "entity", "ts"}`` (only ``text`` required) or plain UTF-8 text.
Unknown JSON fields are ignored (docs/wire-format.md); they stay in the original record for anyone
who needs them. Output value: see ``encode_label``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

import orjson

from pipeline.errors import BadEvent

DEFAULT_MAX_BYTES = 64 * 1024
DEFAULT_MAX_CHARS = 10_000
_ID_MAX = 256
_SHORT_STR_MAX = 256


@dataclass(frozen=True, slots=True)
class Event:
    """One input to label."""

    id: str
    text: str
    key: bytes | None = None
    source: str | None = None
    entity: str | None = None
    produced_at: int = 0  # ms since epoch: the record timestamp, or the event's own "ts"
    headers: tuple[tuple[str, bytes], ...] = ()
    label: str | None = None  # ground truth when a generator knows it (load tests); never used to predict


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one answer's time went, in seconds; zero where a stage does not apply (a cached answer: all)."""

    infer: float = 0.0  # classifier: the engine call that answered it
    tokenize: float = 0.0  # classifier, when tokenized in the same call (``predict``)
    queue: float = 0.0  # generator: admitted → a decode row
    ttft: float = 0.0  # generator: admitted → first token
    decode: float = 0.0  # generator: first token → last


NO_TIMINGS = Timings()


@dataclass(slots=True)
class Prediction:
    """A classifier's answer. Treated as immutable (copies are made with ``dataclasses.replace``); not declared
    frozen because a frozen dataclass is built field by field through ``object.__setattr__``: 0.65 against 0.13 µs
    per answer, measured here, on a path that builds one per text."""

    label: str
    score: float
    scores: Mapping[str, float]
    model: str
    cached: bool = False
    timings: Timings = NO_TIMINGS
    stage: int | None = None  # a cascade's stage that answered (0: the first model); None: no cascade
    degraded: bool = False  # a cascade under overload kept the first stage's unsure answer


@dataclass(frozen=True, slots=True)
class Generation:
    """A generator's answer: the text, its token count and why it ended (``stop``, ``length``, ``deadline``)."""

    text: str
    tokens: int
    finish_reason: str
    model: str
    cached: bool = False
    timings: Timings = NO_TIMINGS


def decode_event(
    value: bytes | None,
    *,
    default_id: str,
    record_ts_ms: int,
    key: bytes | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Event:
    """Decode one record value. Raises ``BadEvent(reason)`` for anything that cannot be labelled."""
    if value is None:
        raise BadEvent("tombstone: the record value is null")
    if value[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark (editors, Windows tools): not part of the event
        value = value[3:]
    if len(value) > max_bytes:
        raise BadEvent(f"oversized: value is {len(value)} bytes, the cap is {max_bytes}")
    if not value.strip():
        raise BadEvent("empty: the record value is empty")
    try:
        raw = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEvent(f"not UTF-8: invalid byte at offset {exc.start}") from None

    fields: dict[str, Any] = {}
    stripped = raw.lstrip()
    if stripped[:1] in ("{", "[", '"') or stripped in ("null", "true", "false"):
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            if stripped[:1] == "{":
                raise BadEvent(f"invalid JSON: {_short(str(exc))}") from None
            doc = raw  # text that merely starts like JSON: take it as plain text
        if isinstance(doc, dict):
            fields = doc
        elif isinstance(doc, str):
            fields = {"text": doc}
        elif stripped[:1] == "[" or doc is None or isinstance(doc, bool):
            raise BadEvent(f"wrong type: a JSON {type(doc).__name__} is not an event object")
        else:
            fields = {"text": raw}
    else:
        fields = {"text": raw}

    return event_from_fields(fields, default_id=default_id, record_ts_ms=record_ts_ms, key=key, headers=headers,
                             max_chars=max_chars)


def event_from_fields(
    fields: Mapping[str, Any],
    *,
    default_id: str,
    record_ts_ms: int,
    key: bytes | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Event:
    """An ``Event`` from decoded fields (JSON, or a Schema Registry record's configured fields); ``BadEvent``
    for a missing or mistyped text, id or timestamp."""
    text = fields.get("text")
    if text is None:
        raise BadEvent("schema: missing required field 'text'")
    if not isinstance(text, str):
        raise BadEvent(f"wrong type: 'text' is a {type(text).__name__}, expected a string")
    text = _clean(text)
    if not text:
        raise BadEvent("empty: 'text' has no printable characters")
    if len(text) > max_chars:
        raise BadEvent(f"oversized: text is {len(text)} characters, the cap is {max_chars}")

    ev_id = _opt_str(fields, "id", _ID_MAX) or default_id
    ts = fields.get("ts")
    if isinstance(ts, datetime):  # an Avro timestamp-millis (fastavro gives a datetime)
        ts = ts.timestamp() * 1000.0
    if ts is None:
        produced_at = record_ts_ms
    elif isinstance(ts, bool) or not isinstance(ts, (int, float)) or not (0 < ts < 1e14):
        raise BadEvent("wrong type: 'ts' must be epoch milliseconds (a positive number)")
    else:
        produced_at = int(ts)
    return Event(
        id=ev_id,
        text=text,
        key=key,
        source=_opt_str(fields, "source", _SHORT_STR_MAX),
        entity=_opt_str(fields, "entity", _SHORT_STR_MAX),
        produced_at=produced_at,
        headers=tuple(headers),
        label=_opt_str(fields, "label", _SHORT_STR_MAX),
    )


def _opt_str(fields: Mapping[str, Any], name: str, cap: int) -> str | None:
    v = fields.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise BadEvent(f"wrong type: '{name}' is a {type(v).__name__}, expected a string")
    v = str(v)
    if len(v) > cap:
        raise BadEvent(f"oversized: '{name}' is {len(v)} characters, the cap is {cap}")
    return v


# Unicode category Cc is exactly U+0000–U+001F and U+007F–U+009F; tab, newline and return are kept.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    # Control characters carry no meaning for a classifier and break some tokenizers' offsets; dropping
    # them keeps "text made only of control bytes" an empty event. One C-level regex pass per event.
    return _CONTROL.sub("", text).strip()


def _short(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


DEADLINE_MAX_DIGITS = 15  # epoch milliseconds up to the year 33658: anything longer is not a deadline


def deadline_ms(value) -> int | None:
    """A ``streamlabel.deadline_ms`` header value: epoch milliseconds as 1-15 ASCII digits; None for anything
    else (empty, signed, spaced, NaN-like, non-ASCII, huge: the caller counts it and uses the default)."""
    if not isinstance(value, (bytes, bytearray)) or not 0 < len(value) <= DEADLINE_MAX_DIGITS or not value.isdigit():
        return None
    return int(value)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def label_record(event: Event, pred: Prediction, *, labeled_at_ms: int, latency_ms: Mapping[str, float]) -> dict:
    if pred.stage is not None:
        return {**_label_fields(event, pred, labeled_at_ms, latency_ms), "cascade_stage": pred.stage,
                "cascade_degraded": pred.degraded}
    return _label_fields(event, pred, labeled_at_ms, latency_ms)


def _label_fields(event: Event, pred: Prediction, labeled_at_ms: int, latency_ms: Mapping[str, float]) -> dict:
    return {
        "id": event.id,
        "label": pred.label,
        "score": pred.score,  # the engine rounds scores to 6 decimals
        "scores": pred.scores if type(pred.scores) is dict else dict(pred.scores),
        "model": pred.model,
        "cached": pred.cached,
        "source": event.source,
        "entity": event.entity,
        "produced_at": event.produced_at,
        "labeled_at": labeled_at_ms,
        "latency_ms": latency_ms,  # the caller rounds (to µs)
    }


def encode_label(event: Event, pred: Prediction, *, labeled_at_ms: int, latency_ms: Mapping[str, float]) -> bytes:
    """The output value of the label topic (schema: docs/wire-format.md)."""
    return orjson.dumps(label_record(event, pred, labeled_at_ms=labeled_at_ms, latency_ms=latency_ms))


def encode_generation(event: Event, gen: Generation, *, generated_at_ms: int, latency_ms: Mapping[str, float]) -> bytes:
    """The output value of a generator's topic (schema: docs/wire-format.md)."""
    return orjson.dumps(generation_record(event, gen, generated_at_ms=generated_at_ms, latency_ms=latency_ms))


def generation_record(event: Event, gen: Generation, *, generated_at_ms: int, latency_ms: Mapping[str, float]) -> dict:
    return {
        "id": event.id,
        "text": gen.text,
        "tokens": gen.tokens,
        "finish_reason": gen.finish_reason,
        "model": gen.model,
        "cached": gen.cached,
        "source": event.source,
        "entity": event.entity,
        "produced_at": event.produced_at,
        "generated_at": generated_at_ms,
        "latency_ms": latency_ms,
    }


def encode_input(text: str, *, id: str | None = None, source: str | None = None, entity: str | None = None,
                 ts: int | None = None, label: str | None = None) -> bytes:
    """An input value in the default wire format (used by producers and tests)."""
    doc: dict[str, Any] = {"text": text}
    if id is not None:
        doc["id"] = id
    if source is not None:
        doc["source"] = source
    if entity is not None:
        doc["entity"] = entity
    if ts is not None:
        doc["ts"] = ts
    if label is not None:
        doc["label"] = label
    return orjson.dumps(doc)
