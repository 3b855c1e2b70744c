"""A shadow model beside the served one (``pipeline/swap.py`` starts it from the followed directory): it labels the
same texts off the critical path, behind its own batcher; its answers are compared with the served ones
(agreement, per-class confusion, its latency as metrics). They are never published as answers; with
``model.shadow_topic`` set, the worker's ``sink`` writes each comparison to that topic, best effort."""

from __future__ import annotations

import time


UTILIZATION_MAX = 0.4  # the served engine busier than this (share of its slots, last second): no shadow work


class Shadow:
    """A shadow model beside the served one: compares answers, never publishes them."""

    def __init__(self, engine, batcher, metrics=None, sink=None, guard_s: float = 0.0, idle=None,
                 idle_min: float = 0.0) -> None:
        self.engine = engine
        # A shadow on CPU shares the cores with everything else on the machine (the served model, the Kafka
        # clients, maybe a broker): it works only while at least ``idle_min`` of the CPU was idle (``idle``: a
        # ``pipeline.runtime.IdleCpu``). The served engine's own utilization does not see the rest of the machine.
        self.idle, self.idle_min = idle, idle_min
        self.guard_s = guard_s  # drop unless the served answers just given had this much of their deadline left
        self.batcher = batcher
        self.metrics = metrics
        self.sink = sink  # sink(tags, served answers, shadow answers, shadow model id): the shadow topic's writer
        self.agree = self.disagree = self.dropped = 0
        self.confusion: dict[tuple[str, str], int] = {}
        self._tasks: set = set()

    def offer(self, texts: list[str], served: list, primary, tags: list | None = None,
              slack_s: float | None = None) -> None:
        """Label ``texts`` in the background and compare with ``served`` (the served answers, same order); dropped
        (counted) when anything waits in the served model's batcher, a batch waits in the shadow's, the served
        answers just given had less than ``guard_s`` of their deadline left (``slack_s``: the least of theirs), the
        served engine was busy more than ``UTILIZATION_MAX`` of the last second, or (``idle``) less than
        ``idle_min`` of the machine's CPU was idle."""
        import asyncio

        if not texts:
            return
        # Only when the served model has nothing waiting and the shadow has less than a batch queued: on shared
        # cores any shadow work is time the served model does not get.
        # And only while the served path runs with room to spare: a shadow call on shared cores slows the served
        # calls that start meanwhile, so it must stop before the served latency nears the objective, not after:
        # its budget is the served engine's idle time (busy under UTILIZATION_MAX of the last second).
        if primary.waiting() > 0 or self.batcher.waiting() >= self.batcher.max_batch or \
                (slack_s is not None and slack_s < self.guard_s) or primary.utilization() > UTILIZATION_MAX or \
                (self.idle is not None and (self.idle.share() or 0.0) < self.idle_min):
            self.dropped += len(texts)
            if self.metrics is not None:
                self.metrics.shadow.labels("dropped").inc(len(texts))
            return
        t0 = time.monotonic()
        fut = self.batcher.submit_many(texts)
        task = asyncio.ensure_future(self._compare(fut, served, t0, tags))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, fut, served: list, t0: float, tags: list | None = None) -> None:
        try:
            got = await fut
        except Exception:  # noqa: BLE001 — a failing shadow costs the stream nothing; counted as dropped
            self.dropped += len(served)
            if self.metrics is not None:
                self.metrics.shadow.labels("dropped").inc(len(served))
            return
        took = time.monotonic() - t0
        m = self.metrics
        for a, b in zip(served, got.results):
            la, lb = getattr(a, "label", None), getattr(b, "label", None)
            if la is None or lb is None:
                continue
            same = la == lb
            self.agree += same
            self.disagree += not same
            self.confusion[(la, lb)] = self.confusion.get((la, lb), 0) + 1
            if m is not None:
                m.shadow.labels("agree" if same else "disagree").inc()
                m.shadow_confusion.labels(la, lb).inc()
        if m is not None:
            m.shadow_latency.observe(took)
        if self.sink is not None and tags is not None:
            self.sink(tags, served, got.results, getattr(self.engine, "model_id", "?"))

    @property
    def agreement(self) -> float | None:
        n = self.agree + self.disagree
        return round(self.agree / n, 4) if n else None
