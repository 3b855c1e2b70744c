"""``MicroBatcher``: group texts into engine calls, earliest deadline first. Knows nothing of where texts come from.

Policy
------
* **Admission.** ``submit_many`` takes the texts of one poll batch with their deadlines (epoch seconds) and
  returns one future for all of them. New texts are tokenized here, once; the exact token counts drive
  batch formation and the encodings travel to the engine. A text identical to one already waiting or
  in the engine shares its answer (it keeps the earlier item's place and deadline).
* **Order: earliest deadline first.** Waiting texts are ordered by deadline. A text whose deadline is
  nearer than the expected duration of an engine call (a running average) can no longer make it: it is
  counted as *late* (``late``, ``streamlabel_batcher_late``) and moves behind every text that still can,
  where it is still labelled, never dropped. So overload degrades the late texts, not everyone's.
* **Formation.** When the engine has a free slot, the batcher takes a window of the most urgent texts (up
  to ``window``: on-time ones first, then late ones), sorts it by token count and cuts it into runs of
  similar length: a run is cut where adding the next text would pad the run by more tokens than an extra
  engine call costs (the engine's ``call_overhead_tokens``), or where it would pass ``max_batch`` texts or
  ``max_tokens`` padded tokens (rows × longest). The run holding the most urgent text goes to the engine,
  padded only to its own longest text; the rest wait for the next slot, with whatever arrived meanwhile.
* **Throughput under load.** Nothing waits on a timer when the engine is idle (``max_wait_ms`` = 0): a
  lone text leaves at once. While the engine is busy, arrivals queue, so windows fill and runs grow to
  ``max_batch`` texts of near-equal length: the batcher moves to big, dense batches by itself as load
  rises. ``max_wait_ms`` > 0 lets a small batch wait for company, but never past its deadline's slack.
* **Failures.** A batch the engine fails on is split in halves until the failing text is alone; that text
  is poison only if the engine still answers a text it answered before (the canary): its result is an
  ``EngineFailure`` and the rest of its group is answered. If the canary fails too, the engine is broken:
  every waiting group fails with ``EngineError`` and the worker stops instead of dead-lettering the
  stream. Every engine call has a timeout; a call that outlives it means a hung engine (``EngineError``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Callable, Sequence

from pipeline.engine import Engine, Tokens
from pipeline.runtime import DaemonExecutor
from pipeline.errors import EngineError, EngineFailure, is_input_failure
from pipeline.events import Prediction
from pipeline.serving import NO_DEADLINE, Answers

CANARY = "ok"  # asked when no text has been answered yet
INLINE_TOKENIZE = 32  # up to this many new texts are tokenized on the loop (a thread hand-off costs more)


class _Item:
    __slots__ = ("text", "tok", "width", "deadline", "seq", "enqueued", "waiters", "late", "done")

    def __init__(self, text: str, deadline: float, seq: int, enqueued: float) -> None:
        self.text = text
        self.tok: Tokens | None = None  # set once tokenized
        self.width = 0  # padded width this text needs
        self.deadline = deadline
        self.seq = seq
        self.enqueued = enqueued
        self.waiters: list[tuple[Answers, int]] = []
        self.late = False
        self.done = False


class MicroBatcher:
    def __init__(self, engine: Engine, *, max_batch: int = 64, max_tokens: int = 8192, max_wait_ms: float = 0.0,
                 concurrency: int = 1, metrics=None, slo=None, timeout_s: float = 30.0, window: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.broken: EngineError | None = None
        self._canary: Tokens | None = None  # the latest text the engine answered
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.window = window or 2 * max_batch
        self.metrics = metrics
        self.slo = slo
        self.clock = clock
        self.overhead = float(engine.call_overhead_tokens)
        self._width = engine.width
        self._ontime: list[tuple[float, int, _Item]] = []  # heap by deadline
        self._late: list[tuple[float, int, _Item]] = []  # heap by deadline: texts that cannot make it any more
        self._seq = itertools.count()
        self._inflight: dict[str, _Item] = {}  # text → its item, while waiting or in the engine
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None
        self._tokenizer = DaemonExecutor("tokenizer")
        self._closed = False
        self._call_s = 0.0  # running average of an engine call's duration
        self.tracer = None  # pipeline.tracing.Tracing when tracing is on: a span per engine call
        self._concurrency = concurrency
        self._busy_s = 0.0  # seconds of engine calls, summed (utilization)
        self._util_t0, self._util_busy0, self._util = time.monotonic(), 0.0, 0.0
        self._fit = [0.0] * 5  # weighted sums for the call-cost fit: n, Σtokens, Σseconds, Σtokens², Σtokens·seconds
        self.batches = 0
        self.coalesced = 0
        self.late = 0

    def swap(self, engine: Engine) -> Engine:
        """Serve with ``engine`` from the next engine call on (calls already running finish on the old one, which
        is returned). Its costs are learnt afresh. The caller checks that it tokenizes like the old one."""
        old, self.engine = self.engine, engine
        self.overhead = float(engine.call_overhead_tokens)
        self._width = engine.width
        self._fit = [0.0] * 5
        self._canary = None
        return old

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    @property
    def task(self) -> asyncio.Task | None:
        """The dispatcher task (for the owner's supervision)."""
        return self._dispatcher

    @property
    def call_seconds(self) -> float:
        """Running average of an engine call's duration (0.0 before the first)."""
        return self._call_s

    def waiting(self) -> int:
        return len(self._ontime) + len(self._late)

    def utilization(self) -> float:
        """The share of the engine's slots busy with calls, smoothed over the last second or so (0 to 1). Sampled
        every quarter second, so a load that arrives at once shows within one (a shadow gives way that soon)."""
        now = time.monotonic()
        span = now - self._util_t0
        if span >= 0.25:
            instant = min(1.0, (self._busy_s - self._util_busy0) / (span * self._concurrency))  # calls ended since
            # Rises at once with the latest sample, falls smoothed: a load that starts stops a shadow at once.
            self._util = instant if self._util == 0.0 else max(instant, 0.5 * self._util + 0.5 * instant)
            self._util_t0, self._util_busy0 = now, self._busy_s
        return self._util

    # -- admission ------------------------------------------------------------------------------------
    def submit_many(self, texts: Sequence[str], deadlines: Sequence[float] | None = None, *,
                    trace: Sequence | None = None) -> asyncio.Future:
        """Queue texts; one future resolves to their ``Answers`` (or raises ``EngineError``).

        ``deadlines``: epoch seconds by which each answer is wanted (default: an hour from now). ``trace``: the
        texts' span contexts, linked from the engine call that answers them (``pipeline/tracing.py``).
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        group = Answers(len(texts), fut, trace)
        if self.broken is not None:
            fut.set_exception(self.broken)
            return fut
        if not texts:
            fut.set_result(group)
            return fut
        now = self.clock()
        new: list[tuple[int, str]] = []
        first: dict[str, int] = {}  # a text repeated within this call: position of its first copy in ``new``
        repeats: list[tuple[int, int]] = []
        for i, text in enumerate(texts):
            item = self._inflight.get(text)
            if item is not None:
                item.waiters.append((group, i))
            elif (p := first.get(text)) is not None:
                repeats.append((p, i))
            else:
                first[text] = len(new)
                new.append((i, text))
        shared = len(texts) - len(new)
        if shared:
            self.coalesced += shared
            if self.metrics is not None:
                self.metrics.coalesced.inc(shared)
        if new:
            items = []
            for i, text in new:
                item = _Item(text, deadlines[i] if deadlines is not None else now + NO_DEADLINE, next(self._seq), now)
                item.waiters.append((group, i))
                self._inflight[text] = item
                items.append(item)
            for p, i in repeats:
                items[p].waiters.append((group, i))
            texts_new = [t for _, t in new]
            if len(texts_new) <= INLINE_TOKENIZE:  # a few texts: cheaper here than a hand-off to another thread
                self._admit(items, self._tokenize(texts_new))
            else:
                # On the tokenizer's thread (the Rust tokenizer releases the GIL): the loop goes on polling,
                # decoding and publishing meanwhile. The items queue when their encodings are back.
                job = self._tokenizer.run(self._tokenize, texts_new)
                job.add_done_callback(lambda f, items=items: self._admit_job(items, f))
        return fut

    def _tokenize(self, texts: list[str]) -> tuple[list, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            toks: list = self.engine.tokenize(texts)
            if len(toks) != len(texts):
                raise ValueError(f"the tokenizer returned {len(toks)} encodings for {len(texts)} texts")
        except BaseException as exc:  # noqa: BLE001 — also a Rust panic (a BaseException): find the text it fails on
            if not is_input_failure(exc):
                raise
            toks = []
            for t in texts:
                try:
                    toks.append(self.engine.tokenize([t])[0])
                except BaseException as exc1:  # noqa: BLE001 — this text's answer is the failure (DLQ)
                    if not is_input_failure(exc1):
                        raise
                    toks.append(EngineFailure(f"tokenizer: {type(exc1).__name__}: {str(exc1)[:200]}"))
        if self.metrics is not None:  # this thread's CPU: all of it while the tokenizer's own pool is off (CPU)
            self.metrics.tokenizer_cpu.inc(time.thread_time() - c0)
        return toks, time.perf_counter() - t0

    def _admit_job(self, items: list[_Item], job: asyncio.Future) -> None:
        if job.cancelled():
            return
        if job.exception() is not None:  # the executor itself failed (shut down): fail these texts
            for it in items:
                self._fail(it, job.exception())
            return
        self._admit(items, job.result())

    def _admit(self, items: list[_Item], tokenized: tuple[list, float]) -> None:
        toks, took = tokenized
        if self._closed:
            for it in items:
                for g, _ in it.waiters:
                    if not g.future.done():
                        g.future.cancel()
            return
        if self.slo is not None:
            self.slo.record_stage("tokenize", took / len(items), len(items))
        if self.broken is not None:
            for it in items:
                self._fail(it, self.broken)
            return
        width = self._width
        ontime = self._ontime
        for it, tok in zip(items, toks):
            if isinstance(tok, EngineFailure):
                self._resolve(it, tok)
                continue
            it.tok = tok
            it.width = width(tok.n)
            heapq.heappush(ontime, (it.deadline, it.seq, it))
        self._arrived.set()

    def submit(self, text: str, deadline: float | None = None) -> asyncio.Future:
        """One text; the future resolves to its ``Prediction`` (or raises ``EngineFailure`` / ``EngineError``)."""
        inner = self.submit_many([text], None if deadline is None else [deadline])
        out = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                r = f.result().results[0]
                out.set_exception(r) if isinstance(r, Exception) else out.set_result(r)

        inner.add_done_callback(done)
        return out

    async def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Answers for texts; raises the first ``EngineFailure``."""
        answers = await self.submit_many(list(texts))
        for r in answers.results:
            if isinstance(r, Exception):
                raise r
        return list(answers.results)

    # -- formation ------------------------------------------------------------------------------------
    def _form(self) -> list[_Item]:
        """The next engine call: the run of similar lengths that holds the most urgent text (see module doc)."""
        horizon = self.clock() + self._call_s
        ontime, late = self._ontime, self._late
        while ontime and ontime[0][0] < horizon:  # cannot make its deadline any more: labelled later, counted late
            entry = heapq.heappop(ontime)
            entry[2].late = True
            heapq.heappush(late, entry)
            self.late += 1
            if self.metrics is not None:
                self.metrics.late.inc()
        everything = len(ontime) + len(late) <= self.window
        if everything:  # the whole queue fits in the window: no heap traffic
            entries = ontime + late
            head = (ontime[0] if ontime else late[0])[2] if entries else None
            ontime.clear()
            late.clear()
        else:
            entries = [heapq.heappop(ontime) for _ in range(min(self.window, len(ontime)))]
            entries += [heapq.heappop(late) for _ in range(min(self.window - len(entries), len(late)))]
            head = entries[0][2]
        if not entries:
            return []
        entries.sort(key=lambda e: e[2].width)
        chosen: list = []
        rest: list = []
        run: list = []
        width = 0
        rows_max, tokens_max, overhead = self.max_batch, self.max_tokens, self.overhead
        for e in entries:
            w = e[2].width
            if run and (len(run) >= rows_max or (len(run) + 1) * w > tokens_max or len(run) * (w - width) > overhead):
                if not chosen and any(x[2] is head for x in run):
                    chosen = run
                else:
                    rest += run
                run = []
            run.append(e)
            width = w
        if not chosen:
            chosen = run
        else:
            rest += run
        if rest:
            if everything:  # the heaps were emptied: rebuild them in O(n)
                ontime.extend(e for e in rest if not e[2].late)
                late.extend(e for e in rest if e[2].late)
                heapq.heapify(ontime)
                heapq.heapify(late)
            else:
                for e in rest:
                    heapq.heappush(late if e[2].late else ontime, e)
        return [e[2] for e in chosen]

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            await self._slots.acquire()
            try:
                if not (self._ontime or self._late):  # emptied meanwhile (a broken engine fails the queue)
                    self._arrived.clear()
                    self._slots.release()
                    continue
                if self.max_wait > 0 and not self._late and len(self._ontime) < self.max_batch:
                    await self._wait_for_company()
                batch = self._form()
                if self._ontime or self._late:  # left behind: they go in the next batch, not on a later arrival
                    self._arrived.set()
                else:
                    self._arrived.clear()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            t = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _wait_for_company(self) -> None:
        """Let a small batch grow until ``max_wait_ms`` after its oldest text, but never past its deadline's slack."""
        first = min(it.enqueued for _, _, it in self._ontime)
        until = min(first + self.max_wait, self._ontime[0][0] - self._call_s)
        while len(self._ontime) < self.max_batch and not self._late and (left := until - self.clock()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            start = self.clock()
            for it in batch:
                wait = start - it.enqueued
                for g, i in it.waiters:
                    g.waits[i] = wait
            if self.slo is not None:
                self.slo.record_stage("batch_wait", sum(start - it.enqueued for it in batch) / len(batch), len(batch))
            await self._infer(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — a bug here must fail its texts, never leave them waiting
            for it in batch:
                self._fail(it, exc)
        finally:
            self._slots.release()

    # -- answers --------------------------------------------------------------------------------------
    def _resolve(self, it: _Item, result) -> None:
        it.done = True
        if self._inflight.get(it.text) is it:
            del self._inflight[it.text]
        for g, i in it.waiters:
            if g.future.done():
                continue
            g.results[i] = result
            g.left -= 1
            if g.left == 0:
                g.future.set_result(g)

    def _fail(self, it: _Item, exc: BaseException) -> None:
        it.done = True
        if self._inflight.get(it.text) is it:
            del self._inflight[it.text]
        for g, _ in it.waiters:
            if not g.future.done():
                g.future.set_exception(exc)

    def _learn(self, tokens: int, seconds: float) -> None:
        """Fit call time = fixed + per_token × padded tokens over recent calls (exponentially weighted least
        squares); the run cut (``overhead``, in tokens) follows what calls cost here, under this load, hand-offs
        and contention included, rather than the idle figure measured at warm-up."""
        d = 0.98
        st = self._fit
        st[0] = d * st[0] + 1.0
        st[1] = d * st[1] + tokens
        st[2] = d * st[2] + seconds
        st[3] = d * st[3] + tokens * tokens
        st[4] = d * st[4] + tokens * seconds
        if self.batches < 32:
            return
        n, sx, sy, sxx, sxy = st
        var = n * sxx - sx * sx
        if var <= 1e-9 * max(1.0, sxx * n):  # every call the same size: nothing to learn from
            return
        per_token = (n * sxy - sx * sy) / var
        fixed = (sy - per_token * sx) / n
        if per_token > 0 and fixed > 0:
            self.overhead = min(4096.0, max(1.0, fixed / per_token))

    async def _call(self, toks: list[Tokens]):
        try:
            async with asyncio.timeout(self.timeout_s):  # a timer on this task: no extra task per call (wait_for)
                return await self.engine.infer(toks)
        except TimeoutError:
            raise EngineError(f"an engine call on {len(toks)} text(s) did not return within {self.timeout_s:g} s",
                              hint="the model or its execution provider is hung; raise batching.engine_timeout_s "
                                   "only if batches legitimately take that long") from None

    async def _healthy(self) -> bool:
        """Does the engine still answer a text it answered before? (poison text vs broken engine)"""
        try:
            await self._call([self._canary or self.engine.tokenize([CANARY])[0]])
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 — any failure of the canary means the engine is broken
            return False
        return True

    def _break(self, err: EngineError, batch: list[_Item]) -> None:
        if self.broken is None:
            self.broken = err
        for it in list(batch) + [e[2] for e in self._ontime] + [e[2] for e in self._late]:
            self._fail(it, self.broken)
        self._ontime.clear()
        self._late.clear()
        for it in list(self._inflight.values()):  # in the engine or still being tokenized
            self._fail(it, self.broken)
        self._arrived.clear()

    async def _infer(self, batch: list[_Item]) -> None:
        if self.broken is not None:
            self._break(self.broken, batch)
            return
        t0 = time.perf_counter()
        t0_ns = time.time_ns() if self.tracer is not None else 0
        try:
            preds = await self._call([it.tok for it in batch])
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
                self._resolve(batch[0], EngineFailure(f"engine: {why}"))
                return
            mid = len(batch) // 2
            await self._infer(batch[:mid])
            await self._infer(batch[mid:])
            return
        took = time.perf_counter() - t0
        if self.tracer is not None:
            self._span(batch, t0_ns)
        if len(preds) != len(batch):
            self._break(EngineError(f"the engine returned {len(preds)} answers for {len(batch)} texts",
                                    hint="the engine breaks its contract: one answer per text"), batch)
            return
        self._call_s = took if not self.batches else 0.8 * self._call_s + 0.2 * took
        self._busy_s += took
        self._learn(len(batch) * max(it.width for it in batch), took)
        self.batches += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tokens.observe(len(batch) * max(it.width for it in batch))
        if self.slo is not None:
            self.slo.record_stage("infer", took, len(batch))
        for it, p in zip(batch, preds):
            if isinstance(p, Exception):  # the engine's per-text failure (e.g. no tokens): only this text fails
                self._resolve(it, EngineFailure(str(p)))
                continue
            self._canary = it.tok
            self._resolve(it, p)

    def _span(self, batch: list[_Item], start_ns: int) -> None:
        links = [g.trace[i] for it in batch for g, i in it.waiters if g.trace is not None]
        self.tracer.engine_call(links, start_ns, time.time_ns(), rows=len(batch),
                                tokens=len(batch) * max(it.width for it in batch),
                                model=getattr(self.engine, "model_id", "?"))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel the dispatcher; let running engine calls finish (bounded, then cancelled); fail what is queued."""
        self._closed = True
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
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
        for _, _, it in self._ontime + self._late:
            for g, _ in it.waiters:
                if not g.future.done():
                    g.future.cancel()
        self._ontime.clear()
        self._late.clear()
        for it in list(self._inflight.values()):  # still being tokenized
            for g, _ in it.waiters:
                if not g.future.done():
                    g.future.cancel()
        self._inflight.clear()
