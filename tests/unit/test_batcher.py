"""MicroBatcher policy with a fake-free, real-shaped engine (a small class honouring the Engine protocol)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.batcher import MicroBatcher
from pipeline.errors import EngineFailure
from pipeline.engine import Tokens
from pipeline.events import Prediction


class RecordingEngine:
    """A deterministic engine: label = 'long' if len(text) > 10; can be told to fail on a text.

    Tokens: one per word plus [CLS] and [SEP], so counts are exact and known to the test.
    """

    task = "text-classification"
    model_id = "rec@1"
    labels = ("short", "long")
    max_length = 64
    variant, providers, threads, sessions, thread_ids = "fp32", ["CPUExecutionProvider"], 1, 1, frozenset()

    def __init__(self, poison: str | None = None, call_overhead_tokens: float = 1000.0) -> None:
        self.calls: list[list[str]] = []
        self.widths: list[int] = []
        self.poison = poison
        self.call_overhead_tokens = call_overhead_tokens
        self.gate = asyncio.Event()
        self.gate.set()
        self._texts: list[str] = []

    def width(self, n):
        return n

    def close(self):
        pass

    def tokenize(self, texts):
        out = []
        for t in texts:
            self._texts.append(t)
            n = min(self.max_length, len(t.split()) + 2)
            out.append(Tokens([len(self._texts) - 1] * n, n, n <= 2))
        return out

    async def infer(self, batch):
        texts = [self._texts[t.ids[0]] for t in batch]
        self.calls.append(texts)
        self.widths.append(max(t.n for t in batch))
        await self.gate.wait()
        if self.poison in texts:
            raise ValueError("tokenizer exploded")
        return [Prediction("long" if len(t) > 10 else "short", 1.0, {"short": 0.0, "long": 1.0}, self.model_id)
                for t in texts]


async def queued(b: MicroBatcher, n: int) -> None:
    """Wait until n texts are tokenized and waiting (tokenization runs on its own thread)."""
    async def until():
        while b.waiting() < n:
            await asyncio.sleep(0.001)  # polling a condition, bounded by the timeout below
    await asyncio.wait_for(until(), 5)


async def started(eng: RecordingEngine) -> None:
    """Wait until the engine has been called."""
    async def until():
        while not eng.calls:
            await asyncio.sleep(0.001)  # polling a condition, bounded by the timeout below
    await asyncio.wait_for(until(), 5)


async def busy(b: MicroBatcher, eng: RecordingEngine) -> asyncio.Future:
    """Hold the engine busy on one text, so what is submitted next queues."""
    eng.gate.clear()
    first = b.submit("warm")
    await started(eng)
    return first


async def test_idle_engine_gets_a_batch_at_once():
    eng = RecordingEngine()
    b = MicroBatcher(eng, max_batch=32, max_wait_ms=0)
    b.start()
    assert b.call_seconds == 0.0
    p = await asyncio.wait_for(b.submit("hello"), 1)
    assert p.label == "short" and eng.calls == [["hello"]]
    assert b.call_seconds > 0.0  # what adaptive fetching gathers by
    await b.close()


async def test_batches_grow_while_engine_is_busy_and_respect_max_batch():
    eng = RecordingEngine()
    eng.gate.clear()
    b = MicroBatcher(eng, max_batch=8, max_wait_ms=0)
    b.start()
    first = b.submit("first")
    await started(eng)
    rest = [b.submit(f"text number {i}") for i in range(20)]
    await queued(b, 20)
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
    await started(eng)
    long_texts = [("word " * 20) + str(i) for i in range(6)]  # exactly 23 tokens each: 3 × 23 > 60
    futs = [b.submit(t) for t in long_texts]
    await queued(b, 6)
    eng.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *futs), 5)
    assert [len(c) for c in eng.calls[1:]] == [2, 2, 2], eng.calls
    await b.close()


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
    await started(eng)
    texts = [f"good text {i}" for i in range(7)] + ["POISON"] + [f"good text {i}" for i in range(7, 14)]
    futs = [b.submit(t) for t in texts]
    await queued(b, 14)
    eng.gate.set()
    res = await asyncio.gather(first, *futs, return_exceptions=True)
    bad = [r for r in res if isinstance(r, BaseException)]
    assert len(bad) == 1 and isinstance(bad[0], EngineFailure) and "tokenizer exploded" in bad[0].reason
    assert sum(isinstance(r, Prediction) for r in res) == 15
    assert ["POISON"] in eng.calls, "the failing text ends up alone"
    await b.close()


async def test_runs_of_similar_length_each_padded_to_its_own_longest():
    eng = RecordingEngine(call_overhead_tokens=4)
    b = MicroBatcher(eng, max_batch=64)
    b.start()
    first = await busy(b, eng)
    short = [f"s{i} a b" for i in range(4)]  # 5 tokens
    long = [f"l{i} " + "w " * 37 for i in range(4)]  # 40 tokens
    mixed = [t for pair in zip(short, long) for t in pair]
    fut = b.submit_many(mixed)
    await queued(b, 8)
    eng.gate.set()
    answers = await asyncio.wait_for(fut, 5)
    await first
    assert [r.label for r in answers.results] == ["short", "long"] * 4
    # Together they would pad 4 short texts by 35 tokens each; one more call costs 4: two runs.
    assert sorted(map(sorted, eng.calls[1:])) == sorted([sorted(short), sorted(long)])
    assert sorted(eng.widths[1:]) == [5, 40]
    await b.close()


async def test_one_run_when_the_padding_costs_less_than_a_call():
    eng = RecordingEngine(call_overhead_tokens=200)
    b = MicroBatcher(eng, max_batch=64)
    b.start()
    first = await busy(b, eng)
    texts = [f"s{i} a b" for i in range(4)] + [f"l{i} " + "w " * 37 for i in range(4)]
    fut = b.submit_many(texts)
    await queued(b, 8)
    eng.gate.set()
    await asyncio.wait_for(asyncio.gather(fut, first), 5)
    assert [len(c) for c in eng.calls[1:]] == [8] and eng.widths[1:] == [40]
    await b.close()


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_earliest_deadline_first():
    clock = FakeClock()
    eng = RecordingEngine()
    b = MicroBatcher(eng, max_batch=2, clock=clock)
    b.start()
    first = await busy(b, eng)
    futs = [b.submit(f"text {i}", deadline=clock.t + d) for i, d in enumerate([5.0, 1.0, 4.0, 2.0, 3.0, 0.5])]
    await queued(b, 6)
    eng.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *futs), 5)
    assert eng.calls[1:] == [["text 5", "text 1"], ["text 3", "text 4"], ["text 2", "text 0"]]
    assert b.late == 0
    await b.close()


async def test_texts_past_their_deadline_are_counted_late_and_served_after_the_rest():
    clock = FakeClock()
    eng = RecordingEngine()
    b = MicroBatcher(eng, max_batch=2, clock=clock)
    b.start()
    first = await busy(b, eng)
    doomed = [b.submit(f"doomed {i}", deadline=clock.t + 0.1) for i in range(2)]
    fine = [b.submit(f"fine {i}", deadline=clock.t + 10.0) for i in range(4)]
    await queued(b, 6)
    clock.t += 1.0  # the engine took a second: the doomed texts can no longer make it
    eng.gate.set()
    res = await asyncio.wait_for(asyncio.gather(first, *doomed, *fine), 5)
    assert all(isinstance(r, Prediction) for r in res), "late texts are still labelled"
    assert b.late == 2
    assert eng.calls[1:] == [["fine 0", "fine 1"], ["fine 2", "fine 3"], ["doomed 0", "doomed 1"]]
    await b.close()


async def test_max_wait_never_waits_past_the_deadline_slack():
    clock = FakeClock()
    eng = RecordingEngine()
    b = MicroBatcher(eng, max_batch=8, max_wait_ms=60_000, clock=clock)
    b.start()
    # The deadline has already come: the text must leave at once, not after max_wait_ms.
    p = await asyncio.wait_for(b.submit("urgent", deadline=clock.t - 1), 5)
    assert p.label == "short" and eng.calls == [["urgent"]]
    await b.close()


async def test_submit_many_answers_in_order_with_repeats_and_failures():
    eng = RecordingEngine(poison="POISON")
    b = MicroBatcher(eng, max_batch=16)
    b.start()
    texts = ["a short one", "x", "POISON", "x", "a short one", "another text here"]
    answers = await asyncio.wait_for(b.submit_many(texts), 5)
    r = answers.results
    assert [getattr(a, "label", None) for a in r] == ["long", "short", None, "short", "long", "long"]
    assert isinstance(r[2], EngineFailure)
    assert sum(len(c) for c in eng.calls if "POISON" not in c) >= 4 and b.coalesced == 2
    assert len(answers.waits) == len(texts) and all(w >= 0 for w in answers.waits)
    await b.close()


@pytest.mark.parametrize("sessions", [1, 2])
async def test_batched_outputs_equal_one_text_at_a_time(tiny_artifact, sessions):
    """2,000 texts through the batcher (exact tokens, runs padded to their own longest; with 2 session
    replicas, two engine calls at once) against the old per-text path (each text alone, no padding at all):
    same labels, scores within 1e-5 (FP32 variant; INT8's dynamic quantization scales activations per
    batch, see the README)."""
    from pipeline.engine import OnnxEngine
    from producers.synthetic import Generator

    texts = [ev.text for _, ev in zip(range(2000), Generator("mixed", seed=7))]
    texts[10] = "\u200b"  # no content tokens: answered as a failure in both paths
    eng = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu", sessions=sessions, threads=2)
    used: set[int] = set()
    run = eng.infer_sync
    eng.infer_sync = lambda batch, replica=0, **kw: used.add(replica) or run(batch, replica, **kw)  # which replicas ran
    try:
        single = [eng.predict_sync([t])[0] for t in texts]
        used.clear()
        b = MicroBatcher(eng, max_batch=64, concurrency=eng.sessions)
        b.start()
        futs = [b.submit_many(texts[i:i + 250]) for i in range(0, len(texts), 250)]
        batched = [r for f in futs for r in (await asyncio.wait_for(f, 60)).results]
        await b.close()
        assert b.batches < 200, "texts were batched"
        assert used == set(range(sessions)), f"calls ran on replicas {used}, expected every one of {sessions}"
        assert len(eng.thread_ids) >= sessions, "each replica's executor thread is counted as the engine's CPU"
        for one, many in zip(single, batched):
            if not isinstance(one, Prediction):
                assert isinstance(many, EngineFailure)
                continue
            assert many.label == one.label
            assert max(abs(many.scores[k] - one.scores[k]) for k in one.scores) <= 1e-5
    finally:
        eng.close()


async def test_a_hung_engine_call_breaks_the_batcher_at_its_timeout():
    """A call on the engine's thread that never returns: ``EngineError`` at ``timeout_s`` for every waiting text."""
    import threading

    from pipeline.runtime import DaemonExecutor
    from pipeline.errors import EngineError

    class HungEngine(RecordingEngine):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.executor = DaemonExecutor("hung")

        async def infer(self, batch):
            return await self.executor.run(self.release.wait)  # the thread blocks; the loop must not

    eng = HungEngine()
    b = MicroBatcher(eng, max_batch=4, timeout_s=0.3)
    b.start()
    try:
        futs = [b.submit(t) for t in ("one", "two words")]
        with pytest.raises(EngineError, match="did not return within 0.3 s"):
            await asyncio.wait_for(asyncio.gather(*futs), 5)
        assert b.broken is not None
    finally:
        eng.release.set()  # the late answer lands on a cancelled future: dropped, not raised
        await b.close()
        eng.executor.shutdown(wait=True)


async def test_engine_thread_hop_delivers_results_and_errors():
    from pipeline.runtime import DaemonExecutor

    ex = DaemonExecutor("hop")
    try:
        assert await ex.run(sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await ex.run(divmod, 1, 0)
        cancelled = ex.run(sum, [1])
        cancelled.cancel()
        assert await ex.run(max, 4, 9) == 9, "a cancelled call does not stop the ones after it"
    finally:
        ex.shutdown(wait=True)


def test_the_engine_reports_its_host_time_outside_onnx_runtime(tiny_artifact):
    """``engine_host_us_per_text`` (the bench key): packing and answers, per text, ORT's own time excluded."""
    from pipeline.engine import OnnxEngine

    eng = OnnxEngine(tiny_artifact, provider="cpu", sessions=1)
    try:
        assert eng.host_us_per_text() is None
        toks = eng.tokenize([f"host time text {i}" for i in range(64)])
        eng.infer_sync(toks)
        eng.infer_sync(toks)
        us = eng.host_us_per_text()
        assert eng.host_stats[0][0] == 128 and 0 < us < 1000
        cpu = eng.host_us_per_text(cpu=True)
        assert 0 < cpu < 1000
    finally:
        eng.close()


def test_answers_built_from_arrays_equal_the_per_text_computation(tiny_artifact):
    """The engine's answers come from array operations over the whole batch (softmax, argmax, rounding in place):
    on 2,000 rows of logits, with exact ties and rows without tokens, each answer equals what a per-row computation
    in plain Python gives: the same label (the model's first on a tie, as before rounding), the same rounded
    scores, and ``NoTokens`` for the empty rows."""
    import math

    import numpy as np

    from pipeline.engine import OnnxEngine
    from pipeline.errors import NoTokens
    from pipeline.events import Timings

    eng = OnnxEngine(tiny_artifact, provider="cpu", sessions=1, warmup=False)
    try:
        k = len(eng.labels)
        rng = np.random.default_rng(3)
        logits = (rng.normal(size=(2000, k)) * 4).astype(np.float32)
        logits[::7, 1] = logits[::7, 0]  # exact ties between the first two labels
        logits[5] = 0.0  # every label tied
        empty = np.zeros(2000, dtype=bool)
        empty[[3, 999, 1999]] = True
        t = Timings(infer=0.01)
        got = eng.answers(logits, empty, t)
        assert len(got) == 2000
        for i, (row, a) in enumerate(zip(logits.tolist(), got)):
            if empty[i]:
                assert isinstance(a, NoTokens)
                continue
            row = [float(np.float32(x)) for x in row]
            m = max(row)
            e = [math.exp(x - m) for x in row]
            probs = [x / sum(e) for x in e]
            best = max(range(k), key=lambda j: (probs[j], -j))  # the first of equal scores
            assert a.label == eng.labels[best], f"row {i}"
            assert list(a.scores) == list(eng.labels)
            assert all(abs(a.scores[lab] - round(p, 6)) <= 1e-9 for lab, p in zip(eng.labels, probs)), f"row {i}"
            assert a.score == a.scores[a.label] and a.model == eng.model_id and a.timings is t and not a.cached
    finally:
        eng.close()


async def test_utilization_is_the_busy_share_of_the_engine_slots():
    import time as _time

    class Slow:
        call_overhead_tokens = 1
        model_id = "slow@1"

        def width(self, n):
            return n

        def tokenize(self, texts):
            from pipeline.engine import Tokens

            return [Tokens([1, 2], 2, False) for _ in texts]

        async def infer(self, batch):
            import asyncio as _asyncio

            await _asyncio.sleep(0.2)  # a model call that takes 200 ms (the engine's stand-in)
            from pipeline.events import Prediction

            return [Prediction("a", 1.0, {"a": 1.0}, "slow@1") for _ in batch]

    from pipeline.batcher import MicroBatcher

    b = MicroBatcher(Slow(), max_batch=4, concurrency=2)
    b.start()
    try:
        assert b.utilization() == 0.0
        t0 = _time.monotonic()
        for _ in range(5):  # five sequential calls of 0.2 s on one of two slots: busy about half the time
            await b.submit_many([f"t{_}"])
        assert _time.monotonic() - t0 >= 1.0
        assert 0.3 < b.utilization() <= 0.55
    finally:
        await b.close()
