"""MicroBatcher policy with a fake-free, real-shaped engine (a small class honouring the Engine protocol)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.batcher import EngineFailure, MicroBatcher
from pipeline.events import Prediction


class RecordingEngine:
    """A deterministic engine: label = 'long' if len(text) > 10; can be told to fail on a text."""

    model_id = "rec@1"
    labels = ("short", "long")
    max_length = 64

    def __init__(self, poison: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.poison = poison
        self.gate = asyncio.Event()
        self.gate.set()

    def token_count(self, text: str) -> int:
        return len(text.split()) + 2

    async def predict(self, texts):
        self.calls.append(list(texts))
        await self.gate.wait()
        if self.poison in texts:
            raise ValueError("tokenizer exploded")
        return [Prediction("long" if len(t) > 10 else "short", 1.0, {"short": 0.0, "long": 1.0}, self.model_id) for t in texts]


async def test_idle_engine_gets_a_batch_at_once():
    eng = RecordingEngine()
    b = MicroBatcher(eng, max_batch=32, max_wait_ms=0)
    b.start()
    p = await asyncio.wait_for(b.submit("hello"), 1)
    assert p.label == "short" and eng.calls == [["hello"]]
    await b.close()


async def test_batches_grow_while_engine_is_busy_and_respect_max_batch():
    eng = RecordingEngine()
    eng.gate.clear()
    b = MicroBatcher(eng, max_batch=8, max_wait_ms=0)
    b.start()
    first = b.submit("first")
    while not eng.calls:
        await asyncio.sleep(0)
    rest = [b.submit(f"text number {i}") for i in range(20)]
    eng.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert eng.calls[0] == ["first"]
    assert [len(c) for c in eng.calls[1:]] == [8, 8, 4]
    await b.close()


async def test_token_budget_limits_batch():
    eng = RecordingEngine()
    eng.gate.clear()
    b = MicroBatcher(eng, max_batch=64, max_tokens=60, max_wait_ms=0)
    b.start()
    first = b.submit("x")
    while not eng.calls:
        await asyncio.sleep(0)
    long_texts = [("word " * 20) + str(i) for i in range(6)]  # ~27 estimated tokens each
    futs = [b.submit(t) for t in long_texts]
    eng.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *futs), 5)
    assert all(len(c) <= 2 for c in eng.calls[1:]), eng.calls


async def test_identical_texts_in_flight_are_coalesced():
    eng = RecordingEngine()
    eng.gate.clear()
    b = MicroBatcher(eng, max_batch=64)
    b.start()
    futs = [b.submit("same text") for _ in range(10)] + [b.submit("other")]
    eng.gate.set()
    res = await asyncio.wait_for(asyncio.gather(*futs), 5)
    assert sum(len(c) for c in eng.calls) == 2 and b.coalesced == 9
    assert all(r.label == "short" for r in res[:10])
    await b.close()


async def test_max_wait_lets_a_small_batch_grow():
    eng = RecordingEngine()
    b = MicroBatcher(eng, max_batch=4, max_wait_ms=200)
    b.start()
    futs = [b.submit(f"t{i}") for i in range(3)]
    await asyncio.sleep(0)
    futs.append(b.submit("t3"))
    await asyncio.wait_for(asyncio.gather(*futs), 5)
    assert eng.calls == [["t0", "t1", "t2", "t3"]]
    await b.close()


async def test_poison_text_is_isolated_by_splitting():
    eng = RecordingEngine(poison="POISON")
    eng.gate.clear()
    b = MicroBatcher(eng, max_batch=16)
    b.start()
    first = b.submit("warm")
    while not eng.calls:
        await asyncio.sleep(0)
    texts = [f"good text {i}" for i in range(7)] + ["POISON"] + [f"good text {i}" for i in range(7, 14)]
    futs = [b.submit(t) for t in texts]
    eng.gate.set()
    res = await asyncio.gather(first, *futs, return_exceptions=True)
    bad = [r for r in res if isinstance(r, BaseException)]
    assert len(bad) == 1 and isinstance(bad[0], EngineFailure) and "tokenizer exploded" in bad[0].reason
    assert sum(isinstance(r, Prediction) for r in res) == 15
    assert ["POISON"] in eng.calls, "the failing text ends up alone"
    await b.close()
