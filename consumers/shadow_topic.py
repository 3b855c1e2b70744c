"""``model.shadow_topic``: a shadow's comparisons written to a topic of their own, best effort.

A producer of its own, outside the delivery protocol: a shadow's answer is never an answer the stream waits
for, so a failed send is counted (``streamlabel_shadow_total{result="not_published"}``), never retried, and
nothing here can hold up, fail or latch a partition. One record per compared text, the input key kept:
``{"id", "label", "score", "scores", "model"}`` (the shadow's), ``"served_label"``, ``"served_model"``,
``"agree"``, ``"source"``, ``"entity"``, ``"produced_at"``, ``"labeled_at"``.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiokafka.errors import KafkaError

from pipeline import kafka as K
from pipeline.events import now_ms


class ShadowTopic:
    def __init__(self, settings, *, name: str, metrics) -> None:
        self.s = settings
        self.topic = settings.model.shadow_topic
        self.name = name
        self.metrics = metrics
        self.producer = None
        self._sends: set[asyncio.Future] = set()
        self._closed = False

    async def start(self) -> None:
        s = self.s
        await K.check_topics(s, {"shadow": self.topic}, create=s.topics.create, partitions=s.topics.partitions,
                             replication_factor=s.topics.replication_factor)
        self.producer = K.producer(s, client_id=f"{s.kafka.client_id}-{self.name}-shadow", request_timeout_ms=30_000)
        await asyncio.wait_for(self.producer.start(), K.START_TIMEOUT_S)

    def publish(self, tags, served, shadowed, shadow_model: str) -> None:
        """``Shadow.sink``: one record per text both models labelled (``tags``: each text's input key and event)."""
        if self.producer is None or self._closed:
            return
        now = now_ms()
        for (key, ev), a, b in zip(tags, served, shadowed):
            if getattr(a, "label", None) is None or getattr(b, "label", None) is None:
                continue
            value = orjson.dumps({"id": ev.id, "label": b.label, "score": b.score, "scores": dict(b.scores),
                                  "model": shadow_model, "served_label": a.label, "served_model": a.model,
                                  "agree": a.label == b.label, "source": ev.source, "entity": ev.entity,
                                  "produced_at": ev.produced_at, "labeled_at": now})
            try:
                fut = asyncio.ensure_future(self.producer.send(self.topic, value, key=key))
            except Exception:  # noqa: BLE001 — best effort: counted, never the stream's problem
                self.metrics.shadow.labels("not_published").inc()
                continue
            self._sends.add(fut)
            fut.add_done_callback(self._sent)

    def _sent(self, fut: asyncio.Future) -> None:
        self._sends.discard(fut)
        ok = not fut.cancelled() and fut.exception() is None
        self.metrics.shadow.labels("published" if ok else "not_published").inc()

    async def stop(self, deadline: float) -> None:
        self._closed = True
        if self.producer is not None:
            producer, self.producer = self.producer, None
            try:
                await asyncio.wait_for(producer.stop(), max(0.5, min(5.0, deadline - time.monotonic())))
            except (KafkaError, asyncio.TimeoutError, OSError):
                pass
