"""A confidence cascade: a small model answers every text; only those it is unsure of go to a bigger one.

``CascadeEngine`` is an ``Engine`` over two classifier engines of the same labels and tokenizer (e.g. a
distilled MiniLM-L3 student and its MiniLM-L6 teacher). In one engine call (one batch formed by the
batcher), the first stage labels every text; texts whose top probability is below ``threshold`` are
answered by the second stage, in the same call. Each answer says which model gave it (``model``) and at
which stage (``cascade_stage``: 0 or 1).

Gathering: the batcher runs as many first-stage calls at once as the first stage has session replicas
(``sessions``). Each call's escalated texts wait in one second-stage queue, which goes to the second stage as
one batch when it holds ``second_batch`` texts, or as soon as no first-stage call is still running (nothing
more can join, so nobody waits for a timer: an escalated text waits at most for the first-stage calls that
ran beside its own). The second stage runs on its own replicas. Escalations from several small first-stage
batches so become one full second-stage batch instead of several small ones (the teacher is the expensive
model, and its cost per text falls with the batch).

Overload: when the batcher has a full batch or more waiting (``pressure()``), escalating would make
everyone later, so the cascade stops escalating: those answers stay the student's and say so
(``cascade_degraded``), and ``streamlabel_cascade_total{result="degraded"}`` counts them. Degradation
instead of missed SLOs.

``calibrate`` picks the threshold on a labelled validation split: the smallest one at which the
cascade's labels agree with the second stage's on at least ``target`` of the texts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from pipeline.engine import OnnxEngine, Tokens
from pipeline.errors import NoTokens, UsageError
from pipeline.events import Prediction, Timings
from pipeline.runtime import softmax


class CascadeEngine:
    task = "text-classification"

    def __init__(self, first: OnnxEngine, second: OnnxEngine, threshold: float, *, metrics=None) -> None:
        if tuple(first.labels) != tuple(second.labels):
            raise UsageError(f"cascade stages have different labels: {first.labels} vs {second.labels}",
                             hint="cascade a student with its own teacher")
        if first.manifest.tokenizer_sha256 != second.manifest.tokenizer_sha256:
            raise UsageError("cascade stages use different tokenizers",
                             hint="cascade models built from the same base (e.g. MiniLM students and teacher)")
        if not 0.0 <= threshold <= 1.0:
            raise UsageError(f"model.cascade_threshold must be between 0 and 1, got {threshold}")
        self.stages = (first, second)
        self.threshold = threshold
        self.labels = first.labels
        self.model_id = f"{first.model_id}>{second.model_id}"
        self.manifest = first.manifest
        self.variant = f"{first.variant}>{second.variant}"
        self.providers = first.providers
        self.threads = first.threads
        self.sessions = first.sessions  # first-stage calls at once (the batcher's concurrency)
        self.second_batch = 64  # escalated texts per second-stage call at most (ClassifyTask: batching.max_batch)
        self._first_running = 0
        self._pending: list[tuple[list[Tokens], asyncio.Future]] = []
        self._pending_n = 0
        self._flushes: set[asyncio.Task] = set()
        self.second_calls = 0
        self.max_length = min(first.max_length, second.max_length)
        self.width = first.width
        self.call_overhead_tokens = first.call_overhead_tokens
        self.thread_ids = set(first.thread_ids) | set(second.thread_ids)
        self.pressure: Callable[[], bool] = lambda: False
        self.metrics = metrics
        self.counts = {"first": 0, "escalated": 0, "degraded": 0}

    def tokenize(self, texts: Sequence[str]) -> list[Tokens]:
        return self.stages[0].tokenize(texts)

    def infer_sync(self, batch: Sequence[Tokens]) -> list[Prediction | NoTokens]:
        first, second = self.stages
        t0 = time.perf_counter()
        out = first.infer_sync(batch)
        unsure = [i for i, p in enumerate(out) if isinstance(p, Prediction) and p.score < self.threshold]
        degraded = bool(unsure) and self.pressure()
        if unsure and not degraded:
            again = second.infer_sync([batch[i] for i in unsure])
            for i, p in zip(unsure, again):
                if isinstance(p, Prediction):
                    out[i] = dataclasses.replace(p, stage=1)
        return self._finish(out, unsure, degraded, time.perf_counter() - t0)

    def _finish(self, out: list, unsure: list[int], degraded: bool, took: float) -> list:
        """First-stage answers say so (and whether overload kept them); the counters and metrics."""
        for i, p in enumerate(out):
            if isinstance(p, Prediction) and p.stage is None:
                out[i] = dataclasses.replace(p, stage=0, degraded=degraded and i in unsure,
                                             timings=Timings(infer=took))
        n_first = len(out) - len(unsure)
        self.counts["first"] += n_first
        self.counts["degraded" if degraded else "escalated"] += len(unsure)
        if self.metrics is not None:
            self.metrics.cascade.labels("first_stage").inc(n_first)
            if unsure:
                self.metrics.cascade.labels("degraded" if degraded else "escalated").inc(len(unsure))
        return out

    async def infer(self, batch: Sequence[Tokens]) -> list[Prediction | NoTokens]:
        """The first stage on one of its replicas; the escalated texts through the gathering second stage."""
        first, second = self.stages
        t0 = time.perf_counter()
        self._first_running += 1
        try:
            out = await first.infer(batch)
        finally:
            self._first_running -= 1
        unsure = [i for i, p in enumerate(out) if isinstance(p, Prediction) and p.score < self.threshold]
        degraded = bool(unsure) and self.pressure()
        if unsure and not degraded:
            fut = asyncio.get_running_loop().create_future()
            self._pending.append(([batch[i] for i in unsure], fut))
            self._pending_n += len(unsure)
            self._flush_if_due()
            again = await fut
            for i, p in zip(unsure, again):
                if isinstance(p, Prediction):
                    out[i] = dataclasses.replace(p, stage=1, timings=Timings(infer=time.perf_counter() - t0))
        else:
            self._flush_if_due()  # this call's end may be what the others' escalations wait for
        return self._finish(out, unsure, degraded, time.perf_counter() - t0)

    def _flush_if_due(self) -> None:
        while self._pending and (self._pending_n >= self.second_batch or self._first_running == 0):
            take, n = [], 0
            while self._pending and (not take or n + len(self._pending[0][0]) <= self.second_batch):
                items, fut = self._pending.pop(0)
                take.append((items, fut))
                n += len(items)
            self._pending_n -= n
            task = asyncio.get_running_loop().create_task(self._second(take), name="cascade-second")
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _second(self, take: list[tuple[list[Tokens], asyncio.Future]]) -> None:
        self.second_calls += 1
        try:
            res = await self.stages[1].infer([t for items, _ in take for t in items])
        except BaseException as exc:  # noqa: BLE001 — every waiting call gets the failure (or the cancellation)
            for _, fut in take:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        at = 0
        for items, fut in take:
            if not fut.done():
                fut.set_result(res[at:at + len(items)])
            at += len(items)

    def predict_sync(self, texts: Sequence[str]):
        return self.infer_sync(self.tokenize(texts))

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities the cascade answers with (first stage's, or the second's where it escalated)."""
        first, second = self.stages
        p = softmax(first.logits(texts).astype(np.float64))
        unsure = np.flatnonzero(p.max(1) < self.threshold)
        if len(unsure):
            p[unsure] = softmax(second.logits([texts[i] for i in unsure]).astype(np.float64))
        return p

    def warmup(self) -> None:
        for s in self.stages:
            s.warmup()

    def close(self) -> None:
        for t in list(self._flushes):
            t.cancel()
        for s in self.stages:
            s.close()


def load_cascade(paths: Sequence[str], threshold: float, *, provider: str = "auto", threads: int | None = None,
                 sessions: int | None = None, metrics=None) -> CascadeEngine:
    if len(paths) != 2:
        raise UsageError(f"model.cascade names {len(paths)} artifacts; a cascade has two (first, second)",
                         hint='e.g. cascade = ["models/sentiment-minilm-minilm-l3", "models/sentiment-minilm"]')
    # One session per stage unless model.sessions says otherwise: on 2 cores two single-thread replicas per stage
    # made the cascade slower (1,118 against 1,425 texts/s, MiniLM-L3 → MiniLM-L6, 10% escalated), and with one
    # first-stage call at a time there is nothing to gather across calls.
    first, second = (OnnxEngine(p, provider=provider, threads=threads, sessions=sessions or 1) for p in paths)
    return CascadeEngine(first, second, threshold, metrics=metrics)


def calibrate(first: OnnxEngine, second: OnnxEngine, texts: Sequence[str], y: np.ndarray | None,
              target: float = 0.995) -> dict:
    """The smallest threshold whose cascade agrees with ``second`` on ≥ ``target`` of ``texts``, and its figures."""
    p1 = np.concatenate([softmax(first.logits(texts[i:i + 64]).astype(np.float64)) for i in range(0, len(texts), 64)])
    l2 = np.concatenate([second.logits(texts[i:i + 64]).argmax(1) for i in range(0, len(texts), 64)])
    l1, conf = p1.argmax(1), p1.max(1)
    best = None
    for t in np.unique(np.concatenate([[0.0], conf, [1.01]])):
        final = np.where(conf < t, l2, l1)
        agree = float((final == l2).mean())
        if agree >= target:
            best = (float(t), agree, float((conf < t).mean()), final)
            break
    t, agree, esc, final = best
    out = {"threshold": round(min(1.0, t), 6), "target_agreement": target, "agreement_with_second": round(agree, 4),
           "escalation_rate": round(esc, 4), "n": len(texts),
           "first_agreement_with_second": round(float((l1 == l2).mean()), 4)}
    if y is not None:
        out.update({"accuracy_first": round(float((l1 == y).mean()), 4), "accuracy_second": round(float((l2 == y).mean()), 4),
                    "accuracy_cascade": round(float((final == y).mean()), 4)})
    return out
