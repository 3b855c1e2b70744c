"""``MicroBatcher``: group texts into engine calls. Knows nothing of where texts come from.

Policy: a batch leaves as soon as the engine has a free slot (no fixed wait at low load); while the engine
is busy, arrivals queue and the next batch takes as many as ``max_batch`` and ``max_tokens`` allow, so
batches grow with load. ``max_wait_ms`` > 0 lets a small batch wait that long for company when idle.
Identical texts in flight share one answer. A batch the engine fails on is split in halves until the
failing text is alone; that text is poison only if the engine still answers a text it answered before
(the canary). If it does not, the engine is broken: every waiting text fails with ``EngineError`` and the
worker stops instead of dead-lettering the stream. Every engine call has a timeout; a call that outlives
it means a hung engine, which is ``EngineError`` too.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from pipeline.engine import Engine
from pipeline.errors import EngineError
from pipeline.events import Prediction

CANARY = "ok"  # asked when no text has been answered yet


class EngineFailure(Exception):
    """The engine failed on this one text (after the batch was split down to it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(eq=False)
class _Item:
    text: str
    future: asyncio.Future
    enqueued: float
    tokens: int
    timings: dict = field(default_factory=dict)


class MicroBatcher:
    def __init__(self, engine: Engine, *, max_batch: int = 64, max_tokens: int = 8192, max_wait_ms: float = 0.0,
                 concurrency: int = 1, metrics=None, timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.broken: EngineError | None = None
        self._canary: str | None = None  # the latest text the engine answered
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._inflight: dict[str, _Item] = {}
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None
        self._max_len = int(getattr(engine, "max_length", 512))
        self.batches = 0
        self.coalesced = 0

    def _estimate_tokens(self, text: str) -> int:
        # ~4 characters per word piece for English; exact counts would tokenize every text twice.
        return min(self._max_len, len(text) // 4 + 2)

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    @property
    def task(self) -> asyncio.Task | None:
        """The dispatcher task (for the owner's supervision)."""
        return self._dispatcher

    def submit(self, text: str) -> asyncio.Future:
        """Queue a text; the future resolves to its ``Prediction`` (or raises ``EngineFailure`` / ``EngineError``)."""
        if self.broken is not None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(self.broken)
            return fut
        item = self._inflight.get(text)
        if item is not None and not item.future.done():
            self.coalesced += 1
            if self.metrics is not None:
                self.metrics.coalesced.inc()
            return asyncio.shield(item.future)
        fut = asyncio.get_running_loop().create_future()
        item = _Item(text, fut, time.perf_counter(), self._estimate_tokens(text))
        self._inflight[text] = item
        fut.add_done_callback(lambda _f, t=text, it=item: self._inflight.pop(t, None) if self._inflight.get(t) is it else None)
        self._queue.append(item)
        self._arrived.set()
        return asyncio.shield(fut)

    async def predict(self, texts: Sequence[str]) -> list[Prediction]:
        return list(await asyncio.gather(*(self.submit(t) for t in texts)))

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        widest = 0
        while self._queue and len(batch) < self.max_batch:
            nxt = self._queue[0]
            w = max(widest, nxt.tokens)
            if batch and w * (len(batch) + 1) > self.max_tokens:
                break
            widest = w
            batch.append(self._queue.popleft())
        if not self._queue:
            self._arrived.clear()
        return batch

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            await self._slots.acquire()
            try:
                if not self._queue:  # emptied meanwhile (a broken engine fails the queue): nothing to take
                    self._arrived.clear()
                    self._slots.release()
                    continue
                if self.max_wait > 0 and len(self._queue) < self.max_batch:
                    deadline = self._queue[0].enqueued + self.max_wait
                    while len(self._queue) < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                        self._arrived.clear()
                        try:
                            await asyncio.wait_for(self._arrived.wait(), left)
                        except TimeoutError:
                            break
                batch = self._take()
                if self._queue:  # the token budget left some behind: they go in the next batch, not on a later arrival
                    self._arrived.set()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            t = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            start = time.perf_counter()
            for it in batch:
                it.timings["batch_wait"] = start - it.enqueued
            await self._infer(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — a bug here must fail its texts, never leave them waiting
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
        finally:
            self._slots.release()

    async def _call(self, texts: list[str]):
        try:
            return await asyncio.wait_for(self.engine.predict(texts), self.timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(f"an engine call on {len(texts)} text(s) did not return within {self.timeout_s:g} s",
                              hint="the model or its execution provider is hung; raise batching.engine_timeout_s "
                                   "only if batches legitimately take that long") from None

    async def _healthy(self) -> bool:
        """Does the engine still answer a text it answered before? (poison text vs broken engine)"""
        try:
            await self._call([self._canary or CANARY])
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 — any failure of the canary means the engine is broken
            return False
        return True

    def _break(self, err: EngineError, batch: list[_Item]) -> None:
        if self.broken is None:
            self.broken = err
        for it in list(batch) + list(self._queue):
            if not it.future.done():
                it.future.set_exception(self.broken)
        self._queue.clear()
        self._arrived.clear()

    async def _infer(self, batch: list[_Item]) -> None:
        if self.broken is not None:
            self._break(self.broken, batch)
            return
        try:
            preds = await self._call([it.text for it in batch])
        except asyncio.CancelledError:
            raise
        except EngineError as err:
            self._break(err, batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                if not await self._healthy():
                    self._break(EngineError(f"the engine fails every text, even one it answered before ({why})",
                                            hint="check the model artifact and the execution provider"), batch)
                    return
                it = batch[0]
                if not it.future.done():
                    it.future.set_exception(EngineFailure(f"engine: {why}"))
                return
            mid = len(batch) // 2
            await self._infer(batch[:mid])
            await self._infer(batch[mid:])
            return
        if len(preds) != len(batch):
            self._break(EngineError(f"the engine returned {len(preds)} answers for {len(batch)} texts",
                                    hint="the engine breaks its contract: one answer per text"), batch)
            return
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tokens.observe(len(batch) * max(it.tokens for it in batch))
        for it, p in zip(batch, preds):
            if isinstance(p, Exception):  # the engine's per-text failure (e.g. no tokens): only this text fails
                if not it.future.done():
                    it.future.set_exception(EngineFailure(str(p)))
                continue
            self._canary = it.text
            if not it.future.done():
                timings = {**p.timings, "batch_wait": it.timings.get("batch_wait", 0.0)}
                it.future.set_result(Prediction(p.label, p.score, p.scores, p.model, False, timings))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel the dispatcher; let running engine calls finish (bounded, then cancelled); fail what is queued."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=max(0.01, timeout_s))
            for t in late:  # a hung engine call: its thread is abandoned, the coroutine is cancelled
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        while self._queue:
            it = self._queue.popleft()
            if not it.future.done():
                it.future.cancel()
