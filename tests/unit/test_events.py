"""Decoding: every bad input class becomes BadEvent with a reason; good inputs keep their fields."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import BadEvent
from pipeline.events import Event, Prediction, decode_event, encode_label


def dec(value, **kw):
    return decode_event(value, default_id="t-0-5", record_ts_ms=1_700_000_000_000, **kw)


def test_json_event_fields_and_defaults():
    ev = dec(b'{"id": "a1", "text": " Shares fell ", "source": "news", "entity": "ACME", "ts": 1732330000123, "extra": 1}',
             key=b"ACME", headers=[("traceparent", b"x")])
    assert ev == Event(id="a1", text="Shares fell", key=b"ACME", source="news", entity="ACME",
                       produced_at=1732330000123, headers=(("traceparent", b"x"),))
    ev = dec(b'{"text": "hello"}')
    assert ev.id == "t-0-5" and ev.produced_at == 1_700_000_000_000


def test_plain_text_and_json_string_are_text():
    assert dec("Plain UTF-8 text, with ünïcode".encode()).text == "Plain UTF-8 text, with ünïcode"
    assert dec(b'"a json string"').text == "a json string"
    assert dec(b"[not json but text").text == "[not json but text"


@pytest.mark.parametrize("value, reason", [
    (None, "tombstone"),
    (b"", "empty"),
    (b"   \n", "empty"),
    (b'{"text": "x"', "invalid JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b'{"text": ""}', "empty"),
    (b'{"text": "\\u0000\\u0007"}', "empty"),
    (b'{"text": 3}', "wrong type"),
    (b'{"text": ["a"]}', "wrong type"),
    (b'{"text": null}', "schema"),
    (b'{"id": "x"}', "schema"),
    (b'[1, 2]', "wrong type"),
    (b'null', "wrong type"),
    (b'true', "wrong type"),
    (b'{"text": "ok", "ts": "soon"}', "wrong type"),
    (b'{"text": "ok", "source": {"a": 1}}', "wrong type"),
    (b'{"text": "' + b"x" * 20_000 + b'"}', "oversized"),
    (b"y" * 70_000, "oversized"),
    (b'{"text": "ok", "id": "' + b"i" * 300 + b'"}', "oversized"),
    (b"[" * 100_000, "oversized"),
])
def test_bad_inputs(value, reason):
    with pytest.raises(BadEvent) as e:
        dec(value)
    assert e.value.reason.startswith(reason), e.value.reason


def test_deeply_nested_json_is_rejected_not_crashing():
    with pytest.raises(BadEvent) as e:
        dec(b'{"text": ' + b"[" * 2000 + b"]" * 2000 + b"}")
    assert e.value.reason.startswith(("invalid JSON", "wrong type"))


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.none(),
                 st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["text", "id", "ts", "source", "x"]), c, max_size=4),
                              max_leaves=10).map(lambda d: orjson.dumps(d))))
def test_decoder_fuzz_never_raises_anything_but_badevent(value):
    try:
        ev = dec(value)
    except BadEvent as bad:
        assert bad.reason and ":" in bad.reason
    else:
        assert isinstance(ev.text, str) and ev.text and ev.text == ev.text.strip()


def test_label_encoding_roundtrip():
    ev = Event(id="a", text="t", key=b"k", source="news", entity="ACME", produced_at=5)
    p = Prediction("negative", 0.9, {"negative": 0.9, "neutral": 0.05, "positive": 0.05}, "sentiment@3")
    doc = orjson.loads(encode_label(ev, p, labeled_at_ms=10, latency_ms={"e2e": 5.0}))
    assert doc == {"id": "a", "label": "negative", "score": 0.9, "scores": {"negative": 0.9, "neutral": 0.05, "positive": 0.05},
                   "model": "sentiment@3", "cached": False, "source": "news", "entity": "ACME", "produced_at": 5,
                   "labeled_at": 10, "latency_ms": {"e2e": 5.0}}
    assert "t" not in doc.values(), "label events carry no input text"
