"""The serving seam: what the worker talks to, whatever the model behind it.

Two protocols and the values that cross them:

- ``Scheduler``: takes the texts (or rendered prompts) of one poll batch with their deadlines and answers them
  all through one future (``Answers``). ``MicroBatcher`` (classifiers, ``pipeline/batcher.py``) and
  ``GenerationScheduler`` (generators, ``pipeline/generation/``) implement it.
- ``ServingTask``: what differs between classifying and generating, chosen once from the artifact
  (``pipeline/tasks.py``): the text a record is served by, the cache namespace, which answers may be cached,
  and the output record with its latency fields. The worker never asks what kind of engine it holds.

Answers are ``Prediction`` / ``Generation`` (``pipeline/events.py``, with typed ``Timings``) or an
``EngineFailure`` for a text the engine failed on alone (the worker dead-letters it).
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

from pipeline.errors import EngineFailure
from pipeline.events import Event, Generation, Prediction

__all__ = ["Answer", "Answers", "EngineFailure", "NO_DEADLINE", "Scheduler", "ServingTask"]

NO_DEADLINE = 3600.0  # seconds after admission, for texts submitted without a deadline

Answer = Prediction | Generation | EngineFailure


class Answers:
    """The answers to one ``submit_many`` call, in its order: ``Prediction``/``Generation`` or ``EngineFailure``.

    ``waits[i]``: seconds text i waited before its engine call (or decode row) started; 0.0 for a text that
    shared an answer already computed. Several callers may share one answer object (identical texts), so the
    per-caller wait lives here, not in the answer.
    """

    __slots__ = ("results", "waits", "left", "future", "trace")

    def __init__(self, n: int, future: asyncio.Future, trace: Sequence | None = None) -> None:
        self.results: list = [None] * n
        self.waits: list[float] = [0.0] * n
        self.left = n
        self.future = future
        self.trace = trace  # tracing on: text i's message span context (an engine call's span links to them)


class Scheduler(Protocol):
    """One owner of the queue in front of an engine (TEI's queue, vLLM's scheduler): the worker only submits."""

    batches: int  # engine calls (classifier) or decode steps (generator) so far

    def start(self) -> None: ...

    async def close(self, timeout_s: float = 10.0) -> None: ...

    def submit_many(self, texts: Sequence[str], deadlines: Sequence[float] | None = None, *,
                    trace: Sequence | None = None) -> asyncio.Future:
        """Queue texts with their deadlines (epoch seconds); the future resolves to their ``Answers``, or raises
        ``EngineError`` when the engine is broken. ``trace``: the texts' span contexts (tracing on), which the
        engine call that answers them links to."""
        ...

    def waiting(self) -> int:
        """Texts queued and not yet in the engine."""
        ...

    @property
    def call_seconds(self) -> float:
        """Running average of one engine call (or decode step)."""
        ...

    @property
    def task(self) -> asyncio.Future | None:
        """Resolves (or fails) only when the scheduler stops on its own: for the owner's supervision."""
        ...


class ServingTask(Protocol):
    """Classify or generate: everything the worker's loop needs that depends on which."""

    kind: str  # "classify" | "generate"
    engine: object  # what answers: a classifier engine or a GenerativeModel (model_id, variant, providers, …)
    model_id: str  # name@version of what answers (a cascade: first>second)
    cache_namespace: str  # what cache keys are made of, beside the text: model and answer-shaping settings
    scheduler: Scheduler

    def text(self, event: Event) -> str:
        """What the engine is given for this event: its text, or the prompt a template renders from it."""
        ...

    def cacheable(self, answer: Prediction | Generation) -> bool:
        """Whether a computed answer may be written back (never a degraded or truncated one)."""
        ...

    def encode(self, event: Event, answer: Prediction | Generation, *, wait_s: float, now_ms: int,
               record_ts_ms: int) -> bytes:
        """The output record's value, with its latency fields (``latency_ms``)."""
        ...

    def started(self, log) -> None:
        """Log what an operator should know about this task at start (one line, if any)."""
        ...
