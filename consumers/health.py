"""What a worker reports about itself: consumer lag, the SLO gauges, a periodic summary line, and the broker's
reachability (an outage logged once when it starts and once when it ends; a deleted topic once)."""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError


class Health:
    """Runs beside a worker (its ``lag``, ``watch`` and ``summary`` loops are supervised by it) and reads its
    counters; it changes nothing in the data path."""

    def __init__(self, worker) -> None:
        self.w = worker
        self.positions: dict[TopicPartition, int] = {}  # fetch position at assignment (lag before the first record)
        self.kafka_down_since: float | None = None
        self._missing_topics: set[str] = set()

    # -- lag ---------------------------------------------------------------------------------------
    def forget(self, tp: TopicPartition) -> None:
        """A partition this worker no longer owns has no lag here."""
        self.positions.pop(tp, None)
        try:
            self.w.metrics.lag.remove(str(tp.partition))
        except KeyError:
            pass

    def lag(self) -> int:
        """Records behind the partition end: high watermark − the next offset this worker reads (before it has
        read one: its fetch position, i.e. the committed offset). Sets ``streamlabel_consumer_lag``."""
        w = self.w
        total = 0
        if w.consumer is None or w.delivery is None:
            return 0
        for tp in list(w.delivery.parts):
            hw = w.consumer.highwater(tp)
            pos = w.expect.get(tp, self.positions.get(tp))
            if hw is not None and pos is not None:
                lag = max(0, hw - pos)
                w.metrics.lag.labels(str(tp.partition)).set(lag)
                total += lag
        return total

    async def lag_loop(self) -> None:
        """Keep ``streamlabel_consumer_lag`` and the SLO gauges current (every second)."""
        w = self.w
        while True:
            for tp in list(w.delivery.parts) if w.delivery else ():
                if tp not in w.expect and tp not in self.positions:
                    try:  # the fetch position after assignment: the committed offset (or the reset policy's)
                        self.positions[tp] = await asyncio.wait_for(w.consumer.position(tp), 2.0)
                    except (KafkaError, asyncio.TimeoutError, AssertionError, IllegalStateError):
                        pass
            lag = self.lag()
            self.backlog(lag)
            self.refresh_gauges()
            await asyncio.sleep(1.0)  # a refresh period, not synchronisation

    def backlog(self, lag: int) -> None:
        """The drain-time estimate, and backlog mode on or off (``pipeline/backlog.py``)."""
        w = self.w
        b = w.backlog
        policy = b.update(time.monotonic(), lag, w.labelled + w.dead_lettered)
        w.metrics.backlog_seconds.set(b.seconds)
        if policy is None:
            return
        batcher = w.batcher
        if hasattr(batcher, "max_tokens"):  # a MicroBatcher (a generator's decode rows stay as configured)
            batcher.max_batch, batcher.max_tokens = policy.max_batch, policy.max_tokens
            batcher.window = 2 * policy.max_batch
        w.metrics.backlog_mode.set(1 if b.on else 0)
        w.log.info("backlog_mode_on" if b.on else "backlog_mode_off", lag=lag, max_batch=policy.max_batch,
                   max_tokens=policy.max_tokens, drain_estimate_s=round(b.seconds, 1) if b.seconds != float("inf")
                   else None, rate_per_s=round(b.rate, 1))

    # -- SLO and summary ---------------------------------------------------------------------------
    def refresh_gauges(self):
        """Goodput (since start and windowed), burn rates: the gauges a scrape reads."""
        w = self.w
        snap = w.slo.snapshot()
        w.metrics.goodput.set(snap.goodput)
        for wname, v in snap.burn_rates.items():
            w.metrics.burn.labels(wname).set(v)
            # burn = bad share / error budget, so the window's goodput is 1 − burn × (1 − target)
            w.metrics.goodput_window.labels(wname).set(max(0.0, 1.0 - v * (1.0 - w.slo.target)))
        return snap

    def summary(self) -> dict:
        w = self.w
        snap = self.refresh_gauges()
        return {
            "rate_per_s": round(snap.rate_per_s, 1), "p50_ms": round(snap.p50_ms, 2), "p99_ms": round(snap.p99_ms, 2),
            "goodput": round(snap.goodput, 4), "burn_1m": round(snap.burn_rates["1m"], 2),
            "cache_hit_ratio": round(w.cache_hits / w.cache_lookups, 3) if w.cache_lookups else 0.0,
            "lag": self.lag(), "inflight": w.inflight, "labelled": w.labelled, "dlq": w.dead_lettered,
            "batches": w.batcher.batches, "backlog_s": round(w.backlog.seconds, 1)
            if w.backlog.seconds != float("inf") else None, "backlog_mode": w.backlog.on,
        }

    async def summary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.w.s.metrics.summary_interval_s)  # a period, not synchronisation
            self.w.log.info("summary", **self.summary())

    # -- the broker --------------------------------------------------------------------------------
    def kafka_reachable(self) -> bool:
        return self.kafka_down_since is None

    async def watch_loop(self) -> None:
        """Log a broker outage once when it starts and once when it ends; a deleted topic once."""
        w = self.w
        while True:
            await asyncio.sleep(2.0)  # a period, not synchronisation
            try:
                topics = await asyncio.wait_for(w.consumer.topics(), 5.0)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                if self.kafka_down_since is None:
                    self.kafka_down_since = time.monotonic()
                    w.log.warning("kafka_unreachable", bootstrap=w.s.kafka.bootstrap_servers,
                                  error=type(exc).__name__, note="retrying; records stay uncommitted meanwhile")
                continue
            if self.kafka_down_since is not None:
                w.log.warning("kafka_reachable", bootstrap=w.s.kafka.bootstrap_servers,
                              outage_s=round(time.monotonic() - self.kafka_down_since, 1))
                self.kafka_down_since = None
            for role in ("input", "output", "dlq"):
                name = getattr(w.s.topics, role)
                if name not in topics and name not in self._missing_topics:
                    self._missing_topics.add(name)
                    w.log.error("topic_missing", role=role, topic=name,
                                note="publishes to it fail after the producer's timeout; the worker then restarts")
                elif name in topics:
                    self._missing_topics.discard(name)
