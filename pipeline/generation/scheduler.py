"""``GenerationScheduler``: iteration-level batching of prompts over a ``GenerativeModel``, on its own thread.

Policy
------
* **Admission.** ``submit_many`` takes rendered prompts with their deadlines (epoch seconds) and returns one
  future for all of them. The decode thread tokenizes them; a prompt longer than the model's context (less
  ``max_new_tokens``) fails at once (``EngineFailure``: the worker dead-letters it), as does one the tokenizer
  fails on (its error or its panic). An identical prompt already waiting or running shares its answer.
* **Order: earliest deadline first.** Waiting prompts are ordered by deadline.
* **Joining between steps.** Before every decode step, waiting prompts are prefilled (their common prefix,
  the template's system part, is computed once and reused) and join the running batch, while it has fewer
  than ``max_batch`` rows and the batch's KV, as it lays it out, stays within ``max_tokens`` positions (on
  CPU: rows × the longest row's prompt + ``max_new_tokens``). At most ``prefill_tokens`` prompt tokens are
  prefilled per step, so a burst of arrivals delays the running rows' next token by a bounded amount.
* **Retiring.** A row finishes with ``finish_reason`` ``stop``, ``length`` or ``deadline``
  (``pipeline/generation/sampling.py``). Its slot is free for the next step.
* **Failures.** A prompt whose prefill fails is that prompt's ``EngineFailure``. A failing decode step
  means a broken engine (``EngineError``): every waiting and running prompt fails and the worker stops.

Threads: the decode thread owns every piece of scheduling state (the waiting heap, the batch, the prompts in
flight). The event loop talks to it through commands in one inbox (``submit``, ``close``) and gets answers
back through ``call_soon_threadsafe``; ``close`` is a command, so nothing reads the thread's lists from the
loop. Counters the loop reads (``waiting``, ``batches``) are single integers the thread writes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from typing import Sequence

import numpy as np

from pipeline.errors import EngineError, EngineFailure, UsageError, is_input_failure
from pipeline.events import Generation, Timings
from pipeline.generation.kv import GPU_SLOT_POSITIONS
from pipeline.generation.model import GenerativeModel
from pipeline.generation.sampling import Sampling, StopCheck, pick, rng_for
from pipeline.serving import NO_DEADLINE, Answers

_CLOSE = object()  # the inbox command that stops the decode thread


class _Seq:
    __slots__ = ("prompt", "ids", "deadline", "order", "enqueued", "admitted", "first_at", "out", "waiters",
                 "finish", "rng", "stop_at")

    def __init__(self, prompt: str, deadline: float, order: int, enqueued: float) -> None:
        self.prompt = prompt
        self.ids: list[int] = []
        self.deadline = deadline
        self.order = order
        self.enqueued = enqueued
        self.admitted = 0.0
        self.first_at = 0.0
        self.out: list[int] = []
        self.waiters: list = []  # (Answers, index)
        self.finish: str | None = None
        self.rng = None
        self.stop_at: int | None = None  # text cut at a stop string


class GenerationScheduler:
    """Iteration-level batching over a ``GenerativeModel`` (policy: the module docstring). A ``Scheduler``
    (``pipeline/serving.py``); answers are ``Generation`` or ``EngineFailure``."""

    def __init__(self, model: GenerativeModel, *, max_batch: int = 32, max_tokens: int = 8192, max_new_tokens: int = 32,
                 stop: Sequence[str] = (), sampling: Sampling = Sampling(), prefill_tokens: int = 512,
                 max_prompt_tokens: int | None = None, ignore_eos: bool = False, metrics=None, slo=None,
                 clock=time.time) -> None:
        self.m = model
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_new = max_new_tokens
        self.sampling = sampling
        self.prefill_tokens = prefill_tokens
        self.max_prompt = min(max_prompt_tokens or model.context, model.context - max_new_tokens)
        gpu = model.providers[0] == "CUDAExecutionProvider"
        if gpu and max_prompt_tokens is None:  # device slots are preallocated: keep them to 1,024 positions
            self.max_prompt = min(self.max_prompt, GPU_SLOT_POSITIONS - max_new_tokens)
        if self.max_prompt < 1:
            raise UsageError(f"generate.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                             f"model's context of {model.context} tokens", hint="lower generate.max_new_tokens")
        self.stops = StopCheck(frozenset() if ignore_eos else model.eos, stop, max_new_tokens, model.decode_text)
        self.metrics = metrics
        self.slo = slo
        self.clock = clock
        self.broken: EngineError | None = None
        # Written by the loop, drained by the decode thread: the only shared structure (deque append/popleft
        # are atomic).
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None  # resolved when the thread ends (closed or broken)
        # The decode thread's own state.
        self._waiting: list = []  # heap (deadline, order, seq)
        self._by_prompt: dict[str, _Seq] = {}
        self._order = itertools.count()
        self._prefixes: list[tuple[int, ...]] = []
        self._batch = model.new_batch(max_batch, self.max_prompt + max_new_tokens + 1, capture=True)
        # Counters the loop may read.
        self._queued = 0  # prompts waiting for a row (the thread's heap size)
        self.running = 0  # rows in the decode batch after the last step
        self._step_s = 0.0
        self.batches = 0  # decode steps
        self.coalesced = 0
        self.late = 0  # finished by their deadline
        self.tokens = 0
        self.generated = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def add_prefix(self, text: str) -> None:
        """A prompt prefix many prompts share (a template's system part): its KV is computed once. Before start."""
        ids = tuple(self.m.encode(text)) if text else ()
        # The last token may merge with the user's text: keep a prefix that tokenizes the same inside prompts.
        ids = ids[:-1] if len(ids) > 1 else ids
        if ids and ids not in self._prefixes:
            self._prefixes.append(ids)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, name="generator", daemon=True)
        self._thread.start()
        self.m.thread_ids.add(self._thread.native_id)  # the decode thread's CPU is the engine's

    @property
    def task(self) -> asyncio.Future | None:
        """Resolves when the decode thread ends: with an ``EngineError`` if it broke (the owner's supervision)."""
        return self._done

    @property
    def call_seconds(self) -> float:
        """Running average of one decode step."""
        return self._step_s

    def waiting(self) -> int:
        return len(self._inbox) + self._queued

    def submit_many(self, prompts: Sequence[str], deadlines: Sequence[float] | None = None, *,
                    trace: Sequence | None = None) -> asyncio.Future:
        """Queue rendered prompts; one future resolves to their ``Answers`` (or raises ``EngineError``)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        group = Answers(len(prompts), fut)
        if self.broken is not None:
            fut.set_exception(self.broken)
            return fut
        if not prompts:
            fut.set_result(group)
            return fut
        now = self.clock()
        for i, p in enumerate(prompts):
            self._inbox.append((group, i, p, deadlines[i] if deadlines is not None else now + NO_DEADLINE, now))
        self._wake.set()
        return fut

    async def generate(self, prompts: Sequence[str], deadlines: Sequence[float] | None = None) -> list:
        """Answers for prompts (``Generation`` or ``EngineFailure`` each)."""
        return list((await self.submit_many(prompts, deadlines)).results)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Tell the decode thread to stop after its current step; it cancels what has not finished (through the
        loop) and ends. Waits for that, at most ``timeout_s``."""
        if self._thread is None:
            return
        self._inbox.append(_CLOSE)
        self._wake.set()
        if self._done is not None and not self._done.done():
            await asyncio.wait([self._done], timeout=max(0.05, timeout_s))

    # -- the decode thread --------------------------------------------------------------------------
    def _main(self) -> None:
        err: EngineError | None = None
        try:
            while self._intake():
                if not self._waiting and not self._batch.rows:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._iteration()
        except BaseException as exc:  # noqa: BLE001 — a broken engine: fail everything, tell the owner
            err = exc if isinstance(exc, EngineError) else EngineError(
                f"the generator failed in a decode step ({type(exc).__name__}: {str(exc)[:300]})",
                hint="check the model artifact and the execution provider")
            self.broken = err
        seqs = [s for _, _, s in self._waiting] + list(self._batch.rows)
        self._waiting.clear()
        self._queued = self.running = 0
        self._batch = self.m.new_batch(1, 1) if err is None else self._batch  # the KV is given back
        self._post(self._end, seqs, err)

    def _intake(self) -> bool:
        """Take the inbox's commands: prompts join the waiting heap; ``close`` ends the thread (False)."""
        if not self._inbox:
            return True
        new: list[_Seq] = []
        go_on = True
        while self._inbox:
            item = self._inbox.popleft()
            if item is _CLOSE:
                go_on = False
                break
            group, i, prompt, deadline, enq = item
            s = self._by_prompt.get(prompt)
            if s is not None:
                s.waiters.append((group, i))
                self.coalesced += 1
                continue
            s = _Seq(prompt, deadline, next(self._order), enq)
            s.waiters.append((group, i))
            self._by_prompt[prompt] = s
            new.append(s)
        if new:
            self._admit(new)
        return go_on

    def _admit(self, new: list[_Seq]) -> None:
        failed: list[tuple[_Seq, EngineFailure]] = []
        tok = self.m.tokenizer
        try:
            encs = tok.encode_batch([s.prompt for s in new], add_special_tokens=False)
        except BaseException as exc:  # noqa: BLE001 — also a tokenizer panic (pyo3's PanicException is a BaseException)
            if not is_input_failure(exc):
                raise
            encs = []
            for s in new:  # one text the tokenizer fails on must not fail the others
                try:
                    encs.append(tok.encode(s.prompt, add_special_tokens=False))
                except BaseException as exc1:  # noqa: BLE001
                    if not is_input_failure(exc1):
                        raise
                    encs.append(exc1)
        for s, e in zip(new, encs):
            if isinstance(e, BaseException):
                failed.append((s, EngineFailure(f"tokenizer: {type(e).__name__}: {str(e)[:200]}")))
                continue
            s.ids = e.ids
            if len(s.ids) > self.max_prompt:
                failed.append((s, EngineFailure(
                    f"too long: the prompt is {len(s.ids)} tokens; this model takes at most {self.max_prompt} "
                    f"(context {self.m.context} minus max_new_tokens {self.max_new})")))
                continue
            s.rng = rng_for(self.sampling, s.prompt)
            heapq.heappush(self._waiting, (s.deadline, s.order, s))
        self._queued = len(self._waiting)
        if failed:
            for s, _ in failed:
                self._by_prompt.pop(s.prompt, None)
            self._post(self._resolve_many, failed)

    def _iteration(self) -> None:
        finished: list[tuple[_Seq, object]] = []
        batch = self._batch
        sample = self.sampling.do_sample
        # 1. Join: prefill waiting prompts (earliest deadline first) into free rows, within the KV budget as the
        #    batch lays it out (on CPU: rows × the longest row, so one long prompt cannot inflate every row).
        needs = [len(r.ids) + self.max_new for r in batch.rows]
        prefilled = 0
        joining: list[tuple[_Seq, tuple[int, ...]]] = []
        padded = batch.batched  # one padded call: its cost is rows × the longest prompt, the prefix included
        width = 0
        while self._waiting and len(batch.rows) + len(joining) < self.max_batch:
            s = self._waiting[0][2]
            need = len(s.ids) + self.max_new
            if (needs and not batch.admits(needs, need, self.max_tokens)) or prefilled >= self.prefill_tokens:
                break
            heapq.heappop(self._waiting)
            s.admitted = self.clock()
            prefix = next((p for p in self._prefixes if len(s.ids) > len(p) and tuple(s.ids[: len(p)]) == p), ())
            joining.append((s, prefix))
            if padded:
                width = max(width, len(s.ids))
                prefilled = len(joining) * width
            else:
                prefilled += len(s.ids) - len(prefix)
            needs.append(need)
        self._queued = len(self._waiting)
        if joining:
            # Room for the burst in one go: as many rows as wait, within max_batch and the KV budget.
            batch.reserve(min(self.max_batch, len(batch.rows) + len(joining) + len(self._waiting),
                              self.max_tokens // max(needs)))
            finished += self._join(batch, joining, sample)
        # 2. Rows whose deadline passed leave with what they have.
        now = self.clock()
        gone = []
        for j, s in enumerate(batch.rows):
            if now >= s.deadline:
                s.finish = "deadline"
                self.late += 1
                finished.append((s, self._result(s)))
                gone.append(j)
        batch.leave(gone)
        # 3. One decode step for every row.
        rows = batch.rows
        if rows:
            t0 = time.perf_counter()
            last = np.asarray([s.out[-1] for s in rows], dtype=np.int64)
            if sample:
                nxt = pick(batch.step(last), [s.rng for s in rows], self.sampling)
            else:
                nxt = batch.step(last, greedy=True).tolist()
            took = time.perf_counter() - t0
            self._step_s = took if not self.batches else 0.9 * self._step_s + 0.1 * took
            self.batches += 1
            if self.metrics is not None:
                self.metrics.gen_batch_rows.observe(len(rows))
                self.metrics.gen_occupancy.set(len(rows) / self.max_batch)
            now = self.clock()
            gone = []
            for j, (s, t) in enumerate(zip(rows, nxt)):
                s.out.append(t)
                if self._finished(s, now):
                    finished.append((s, self._result(s)))
                    gone.append(j)
            batch.leave(gone)
        self.running = len(batch.rows)
        if finished:
            for s, _ in finished:
                self._by_prompt.pop(s.prompt, None)
            self._post(self._resolve_many, finished)

    def _join(self, batch, joining: list[tuple[_Seq, tuple[int, ...]]], sample: bool) -> list:
        """Prefill the admitted prompts into the batch: one ``join_many`` per shared prefix (the decode batch
        decides how: one padded call, or one call per prompt over the prefix's KV); a call that fails is
        retried prompt by prompt, so a prompt that cannot be prefilled fails alone."""
        finished: list[tuple[_Seq, object]] = []
        groups: dict[tuple[int, ...], list[_Seq]] = {}
        for s, prefix in joining:
            groups.setdefault(prefix, []).append(s)
        for prefix, seqs in groups.items():
            try:
                firsts = batch.join_many([(s, s.ids) for s in seqs], prefix, greedy=not sample)
                joined = list(zip(seqs, firsts))
            except Exception:  # noqa: BLE001 — find the prompt that fails, the others join
                # Rows that joined before the failure (an earlier run of slots) lost their first token: they
                # leave and are prefilled again with the others.
                batch.leave([j for j, r in enumerate(batch.rows) if any(r is s for s in seqs)])
                joined = []
                for s in seqs:
                    try:
                        joined.append((s, batch.join(s, s.ids, prefix, greedy=not sample)))
                    except Exception as exc:  # noqa: BLE001 — this prompt's failure, not the engine's
                        finished.append((s, EngineFailure(
                            f"engine: prefill failed: {type(exc).__name__}: {str(exc)[:200]}")))
            now = self.clock()
            gone = []
            for s, first in joined:
                s.out.append(pick(first[None, :], [s.rng], self.sampling)[0] if sample else first)
                s.first_at = now
                if self._finished(s, now):
                    finished.append((s, self._result(s)))
                    gone.append(batch.rows.index(s))
            batch.leave(sorted(gone))
        return finished

    def _finished(self, s: _Seq, now: float) -> bool:
        reason, cut = self.stops(s.out, now, s.deadline)
        if reason is None:
            return False
        s.finish, s.stop_at = reason, cut
        if reason == "deadline":
            self.late += 1
        return True

    def _result(self, s: _Seq) -> Generation:
        done = self.clock()
        text = self.m.decode_text(s.out)
        if s.stop_at is not None:
            text = text[: s.stop_at]
        n = len(s.out) - (1 if s.out and s.out[-1] in self.stops.eos else 0)  # the end-of-sequence token is not text
        self.tokens += n
        self.generated += 1
        queue, ttft, decode = s.admitted - s.enqueued, s.first_at - s.enqueued, done - s.first_at
        if self.metrics is not None:
            self.metrics.gen_ttft.observe(ttft)
            if n > 1:
                self.metrics.gen_tpot.observe(decode / (n - 1))
            self.metrics.gen_tokens.inc(n)
            self.metrics.gen_finish.labels(s.finish).inc()
        return Generation(text.strip(), n, s.finish or "length", self.m.model_id, False,
                          Timings(queue=queue, ttft=ttft, decode=decode))

    # -- answers (on the event loop) ----------------------------------------------------------------
    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

    @staticmethod
    def _resolve_many(items) -> None:
        for s, result in items:
            wait = s.admitted - s.enqueued if s.admitted else 0.0
            for g, i in s.waiters:
                if g.future.done():
                    continue
                g.results[i] = result
                g.waits[i] = wait
                g.left -= 1
                if g.left == 0:
                    g.future.set_result(g)

    def _end(self, seqs, err: EngineError | None) -> None:
        """On the loop, once the thread has ended: what was unanswered fails (broken) or is cancelled (closed);
        so does whatever reached the inbox after the thread stopped reading it."""
        groups = [item[0] for item in self._inbox if item is not _CLOSE]
        self._inbox.clear()
        groups += [g for s in seqs for g, _ in s.waiters]
        for g in groups:
            if not g.future.done():
                g.future.set_exception(err) if err is not None else g.future.cancel()
        if self._done is not None and not self._done.done():
            self._done.set_exception(err) if err is not None else self._done.set_result(None)
