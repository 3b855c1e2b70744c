"""Everything from outside is untrusted: headers, cache entries, tokenizer failures, saved alerting state, label
events, broker configs. Each bad value is ignored (counted) or a per-record failure, never an exception that
stops a worker. One test per class of input."""

from __future__ import annotations

import asyncio
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.alerts import AlertEngine, Rule
from pipeline.batcher import MicroBatcher
from pipeline.errors import EngineFailure
from pipeline.cache import CircuitBreaker, _pack, _unpack, cacheable, settings_digest
from pipeline.events import DEADLINE_MAX_DIGITS, Generation, Prediction, deadline_ms
from pipeline.generation import prompt_seed

from .test_batcher import RecordingEngine


# ---------------------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("value", [
    b"", b"abc", b"-5", b"+5", b" 12", b"1_000", b"NaN", b"nan", b"inf", b"1e3", b"12.5", b"\xff\xfe",
    "١٢٣".encode(),  # Arabic-Indic digits: int() takes them, a header must not
    b"9" * (DEADLINE_MAX_DIGITS + 1), b"9" * 309, b"9" * 4300, b"9" * 5000, None, "123",
])
def test_deadline_header_values_that_are_not_epoch_ms_are_ignored(value):
    assert deadline_ms(value) is None


def test_deadline_header_takes_epoch_milliseconds():
    assert deadline_ms(b"1732330000123") == 1732330000123
    assert deadline_ms(b"9" * DEADLINE_MAX_DIGITS) / 1000.0 < math.inf


def test_the_crash_loop_header_parsed_the_old_way_overflows():
    """Why: a 309+ digit integer parses, then overflows when it becomes a float deadline (the worker died)."""
    with pytest.raises(OverflowError):
        int(b"9" * 400) / 1000.0
    assert deadline_ms(b"9" * 400) is None


# ---------------------------------------------------------------------------------------------- cache entries
def P(**kw):
    base = dict(label="pos", score=0.9, scores={"pos": 0.9, "neg": 0.1}, model="m@1")
    return Prediction(**{**base, **kw})


def test_cache_entries_round_trip():
    p = _unpack(_pack(P(stage=1)))
    assert p.label == "pos" and p.cached and p.stage == 1 and p.scores == {"pos": 0.9, "neg": 0.1}
    g = _unpack(_pack(Generation("hi", 1, "stop", "g@1")))
    assert g.text == "hi" and g.cached and g.finish_reason == "stop"


@pytest.mark.parametrize("raw", [
    b"", b"null", b"[]", b"5", b'"x"', b"{}", b"\xff", b'{"m": 1}',
    b'{"l": "pos", "s": 1e400, "ps": {"pos": 1}, "m": "m@1"}',  # the float overflow
    b'{"l": "pos", "s": 123456789012345678901234567890, "ps": {"pos": 1}, "m": "m@1"}',
    b'{"l": "pos", "s": 0.9, "ps": "abc", "m": "m@1"}',  # dict("abc") broke the label record
    b'{"l": "pos", "s": 0.9, "ps": [["pos", 0.9]], "m": "m@1"}',
    b'{"l": 5, "s": 0.9, "ps": {"pos": 0.9}, "m": "m@1"}',
    b'{"l": "pos", "s": 0.9, "ps": {"neg": 0.9}, "m": "m@1"}',  # its label is not among its scores
    b'{"l": "pos", "s": -1, "ps": {"pos": 0.9}, "m": "m@1"}',
    b'{"l": "pos", "s": 0.9, "ps": {"pos": "x"}, "m": "m@1"}',
    b'{"l": "pos", "s": 0.9, "ps": {"pos": 0.9}, "m": "m@1", "st": "zero"}',
    b'{"l": "pos", "s": true, "ps": {"pos": 0.9}, "m": "m@1"}',
    b'{"g": 5, "n": 1, "f": "stop", "m": "g@1"}',
    b'{"g": "x", "n": -1, "f": "stop", "m": "g@1"}',
    b'{"g": "x", "n": 1, "f": "deadline", "m": "g@1"}',  # a truncated answer is never served as normal
    b'{"g": "x", "n": 1e400, "f": "stop", "m": "g@1"}',
])
def test_a_damaged_or_hostile_cache_entry_is_a_miss(raw):
    assert _unpack(raw) is None


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                        st.sampled_from(["l", "s", "ps", "m", "st", "g", "n", "f", "x"]), kids, max_size=6),
                    max_leaves=20))
@settings(max_examples=300, deadline=None)
def test_no_cache_entry_raises_and_what_passes_encodes(doc):
    from pipeline.events import Event, encode_generation, encode_label

    try:
        raw = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return
    got = _unpack(raw)
    ev = Event("e", "text")
    if isinstance(got, Prediction):  # whatever passes must build a label record
        encode_label(ev, got, labeled_at_ms=1, latency_ms={"e2e": 1})
    elif isinstance(got, Generation):
        encode_generation(ev, got, generated_at_ms=1, latency_ms={"e2e": 1})


def test_degraded_and_truncated_answers_are_not_written_back():
    assert cacheable(P()) and not cacheable(P(degraded=True))
    assert cacheable(Generation("x", 3, "stop", "g@1")) and cacheable(Generation("x", 32, "length", "g@1"))
    assert not cacheable(Generation("x", 3, "deadline", "g@1"))


def test_generator_cache_keys_carry_a_digest_not_the_template():
    d = settings_digest("You are a support agent. Never say no.", "{text}", 32, ("\n",), False, False)
    assert len(d) == 16 and "support" not in d
    assert d != settings_digest("You are a support agent. Never say no.", "{text}", 33, ("\n",), False, False)


# ---------------------------------------------------------------------------------------------- breaker
def test_a_probe_cancelled_mid_flight_does_not_switch_the_cache_off_for_good():
    now = [0.0]
    b = CircuitBreaker(failures=1, reset_s=1.0, clock=lambda: now[0])
    b.failure(OSError())
    now[0] = 1.5
    assert b.allow(), "the probe"
    b.abandon()  # the probe's caller was cancelled (a revoke, a shutdown): no answer either way
    assert b.allow(), "the next call probes again"
    # and a probe that never reports back at all does not block probing beyond one reset period
    now[0] = 3.0
    assert b.allow()


async def test_redis_cache_releases_the_probe_when_its_call_is_cancelled():
    from pipeline.cache import RedisCache

    r = RedisCache("redis://127.0.0.1:1/0", timeout_ms=50, breaker=CircuitBreaker(failures=1, reset_s=0.0))
    r.breaker.failure(OSError())  # open; reset 0 s: half-open at once

    async def hang():
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(r._guard(hang()))
    await asyncio.sleep(0)
    assert r.breaker._probing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not r.breaker._probing and r.breaker.allow()
    await r.close()


# ---------------------------------------------------------------------------------------------- tokenizer
class PanicException(BaseException):
    """What pyo3 raises for a Rust panic in the tokenizers library: a BaseException, not an Exception."""


class PanickingEngine(RecordingEngine):
    def tokenize(self, texts):
        if any("☠" in t for t in texts):
            raise PanicException("thread '<unnamed>' panicked")
        return super().tokenize(texts)


async def test_a_tokenizer_panic_fails_only_its_text():
    b = MicroBatcher(PanickingEngine())
    b.start()
    try:
        got = await b.submit_many(["fine text here", "☠ poison", "another fine one"])
        assert isinstance(got.results[1], EngineFailure) and "PanicException" in got.results[1].reason
        assert all(isinstance(r, Prediction) for r in (got.results[0], got.results[2]))
        again = await b.submit_many(["still serving"])  # the batcher lives on
        assert isinstance(again.results[0], Prediction)
    finally:
        await b.close()


async def test_a_tokenizer_panic_on_the_tokenizer_thread_fails_only_its_text():
    b = MicroBatcher(PanickingEngine())
    b.start()
    try:
        texts = [f"text number {i}" for i in range(40)] + ["☠"]  # more than INLINE_TOKENIZE: the thread path
        got = await b.submit_many(texts)
        assert isinstance(got.results[-1], EngineFailure)
        assert sum(isinstance(r, Prediction) for r in got.results) == 40
    finally:
        await b.close()


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_seeds_are_the_same_in_every_process():
    import subprocess
    import sys

    code = "from pipeline.generation import prompt_seed; print(prompt_seed('Where is my refund?'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout.strip()
            for seed in ("1", "2", "random")}
    assert outs == {str(prompt_seed("Where is my refund?"))}


# ---------------------------------------------------------------------------------------------- alerting
RULES = (Rule("neg", "share", labels=("negative",), threshold=0.5, window_s=60, min_events=2),
         Rule("abuse", "single", labels=("toxic",), threshold=0.9))


@pytest.mark.parametrize("ev", [
    {"produced_at": "abc", "label": "negative", "entity": "A"},
    {"produced_at": 1e400, "label": "negative", "entity": "A"},
    {"produced_at": float("nan"), "label": "negative", "entity": "A"},
    {"produced_at": -5, "label": "negative", "entity": "A"},
    {"produced_at": 10**30, "label": "negative", "entity": "A"},
    {"produced_at": 1000, "label": "toxic", "score": "high", "entity": "A"},
    {"produced_at": [1], "label": "negative", "entity": "A"},
])
def test_a_label_event_with_foreign_fields_is_skipped_and_counted(ev):
    eng = AlertEngine(RULES)
    assert eng.observe(ev) == []
    assert eng.invalid == 1
    eng.observe({"produced_at": 2000, "label": "toxic", "score": 0.95, "entity": "A", "id": "x"})
    assert eng.invalid == 1, "a good event after it is evaluated as usual"


@pytest.mark.parametrize("snap", [
    {"keys": "nope"}, {"keys": [{"rule": "neg"}]}, {"watermark": "x"}, {"keys": [{"rule": "neg", "key": "A",
                                                                                  "events": [[1, 2]]}]},
    {"keys": [{"rule": "neg", "key": "A", "events": [], "incident": {"bogus": 1}}]}, [], "text",
])
def test_a_damaged_alerting_state_raises_one_value_error_and_keeps_the_engine_empty(snap):
    eng = AlertEngine(RULES)
    with pytest.raises(ValueError):
        eng.restore(snap)
    assert eng.state == {} and eng.watermark == 0


def test_alerting_state_round_trips():
    eng = AlertEngine(RULES)
    for i in range(3):
        eng.observe({"produced_at": 1000 + i, "label": "negative", "entity": "A", "id": f"e{i}"})
    again = AlertEngine(RULES)
    again.restore(orjson.loads(orjson.dumps(eng.snapshot())))
    assert again.snapshot() == eng.snapshot()


# ---------------------------------------------------------------------------------------------- broker configs
class _Described:
    def __init__(self, entries):
        self.resources = [(0, None, 2, "t", entries)]


class _Admin:
    def __init__(self, value):
        self.value = value

    async def describe_configs(self, resources):
        return [_Described([("max.message.bytes", self.value)])]


@pytest.mark.parametrize("value, expect", [("1048588", 1048588), ("0", None), ("-1", None), ("abc", None),
                                           ("99999999999999", None), (None, None), ("", None), (" 2000 ", 2000)])
async def test_a_topic_size_limit_from_the_broker_is_taken_only_when_it_is_one(value, expect):
    from pipeline.kafka import _max_message_bytes

    got = await _max_message_bytes(_Admin(value), ["t"])
    assert got.get("t") == expect


# ---------------------------------------------------------------------------------------------- log_text
@pytest.mark.parametrize("log_text", [False, True])
def test_raw_values_reach_the_logs_only_when_log_text_is_on(log_text):
    import logging
    from dataclasses import dataclass

    import structlog
    from aiokafka import TopicPartition

    from consumers.worker import Worker
    from pipeline.config import Settings

    @dataclass
    class Rec:
        offset: int = 7
        value: bytes = b"my card number is 4111 1111"
        key: bytes | None = None
        headers: tuple = ()
        timestamp: int = 0

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))  # debug lines too
    try:
        with structlog.testing.capture_logs() as logs:
            w = Worker(Settings().replace(log={"log_text": log_text, "level": "debug"}), RecordingEngine())
            w.records.dead_letter(TopicPartition("in", 0), Rec(), "invalid JSON: oops")
    finally:
        structlog.configure(**saved)
    lines = [e for e in logs if e["event"] == "dead_letter"]
    assert lines and all(e.get("reason") == "invalid JSON: oops" for e in lines)
    assert any("4111" in str(e.get("value", "")) for e in lines) is log_text
