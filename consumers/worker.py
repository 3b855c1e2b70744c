"""The classify worker: one aiokafka consumer-group member.

poll → decode (bad → DLQ) → cache → micro-batch → engine → publish (key, headers kept; partition order kept)
→ broker ack → offset done → commit up to each partition's watermark (at-least-once).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from pipeline import logs
from pipeline.batcher import EngineFailure, MicroBatcher
from pipeline.cache import Cache, NullCache, cache_key
from pipeline.config import Settings
from pipeline.kafka import client_kwargs as kafka_client_kwargs
from pipeline.engine import Engine
from pipeline.errors import BadEvent, ConfigError
from pipeline.events import Event, Prediction, decode_event, encode_label, now_ms
from pipeline.failpoints import Failpoints
from pipeline.metrics import Metrics
from pipeline.slo import SloTracker

H_ERROR = "streamlabel.error"
H_TOPIC = "streamlabel.source.topic"
H_PARTITION = "streamlabel.source.partition"
H_OFFSET = "streamlabel.source.offset"
SEND_RETRIES = 5


class WorkerError(Exception):
    """The worker cannot go on without risking loss (e.g. outputs cannot be published); it stops uncommitted."""


@dataclass
class PartitionState:
    """Offsets taken from one partition, which are done, and the ordering chain of its publishes."""

    offsets: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    committed: int | None = None  # the offset last committed (next to read)
    tail: asyncio.Future | None = None  # resolves when the newest handler has sent all its records
    inflight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    last_offset: int = -1

    def add(self, offset: int) -> None:
        self.offsets.append(offset)
        self.inflight += 1
        self.last_offset = offset
        self.drained.clear()

    def complete(self, offset: int) -> None:
        self.done.add(offset)

    def finished(self, n: int) -> None:
        self.inflight -= n
        if self.inflight <= 0:
            self.drained.set()

    def watermark(self) -> int | None:
        """The next offset to commit: one past the longest done prefix; None if nothing new."""
        last = None
        while self.offsets and self.offsets[0] in self.done:
            last = self.offsets.popleft()
            self.done.discard(last)
        if last is None:
            return None
        return last + 1


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        await self.worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned):
        self.worker._on_assigned(assigned)


class Worker:
    def __init__(self, settings: Settings, engine: Engine, *, cache: Cache | None = None,
                 metrics: Metrics | None = None, slo: SloTracker | None = None, name: str = "worker-0") -> None:
        self.s = settings
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.slo = slo or SloTracker(settings.slo.objective_ms, settings.slo.target)
        self.cache = cache or NullCache()
        self.name = name
        self.log = logs.get("streamlabel.worker").bind(worker=name)
        self.batcher = MicroBatcher(engine, max_batch=settings.batching.max_batch,
                                    max_tokens=settings.batching.max_tokens, max_wait_ms=settings.batching.max_wait_ms,
                                    concurrency=settings.batching.engine_concurrency, metrics=self.metrics)
        self.parts: dict[TopicPartition, PartitionState] = {}
        self.inflight = 0
        self.paused = False
        self.labelled = 0
        self.dead_lettered = 0
        self.cache_hits = 0
        self.cache_lookups = 0
        self.commits = 0
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self.ready = asyncio.Event()  # set once partitions are assigned
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.eos = settings.worker.delivery == "exactly_once"
        self.fail = Failpoints(settings.worker.failpoint)
        self._txn: dict[TopicPartition, AIOKafkaProducer] = {}

    # ------------------------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the worker to drain and exit (SIGTERM/SIGINT call this)."""
        self._stopping.set()

    async def run(self) -> None:
        k = self.s.kafka
        common = kafka_client_kwargs(k)
        self.consumer = AIOKafkaConsumer(
            **common, group_id=k.group_id, client_id=f"{k.client_id}-{self.name}", enable_auto_commit=False,
            auto_offset_reset=k.auto_offset_reset, session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 4), max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=k.fetch_max_records, fetch_max_wait_ms=k.fetch_max_wait_ms, isolation_level="read_committed",
        )
        self.producer = AIOKafkaProducer(
            **common, client_id=f"{k.client_id}-{self.name}-out", acks="all", enable_idempotence=True,
            linger_ms=k.linger_ms, compression_type=None if k.compression == "none" else k.compression,
            request_timeout_ms=30_000,
        )
        try:
            await self.producer.start()
        except (KafkaError, OSError) as exc:
            raise ConfigError(f"cannot connect to Kafka at {k.bootstrap_servers} ({type(exc).__name__}: {exc})",
                              hint="check kafka.bootstrap_servers, security_protocol and the SASL/TLS settings") from None
        try:
            self.consumer.subscribe([self.s.topics.input], listener=_Rebalance(self))
            try:
                await self.consumer.start()
            except (KafkaError, OSError) as exc:
                raise ConfigError(f"cannot connect to Kafka at {k.bootstrap_servers} ({type(exc).__name__}: {exc})",
                                  hint="check kafka.bootstrap_servers, security_protocol and the SASL/TLS settings") from None
            self.batcher.start()
            self.log.info("worker_started", input=self.s.topics.input, output=self.s.topics.output,
                          dlq=self.s.topics.dlq, group=k.group_id, model=self.engine.model_id)
            background = [asyncio.create_task(self._commit_loop(), name="commit"),
                          asyncio.create_task(self._summary_loop(), name="summary")]
            try:
                await self._poll_loop()
            finally:
                await self._drain()
                for t in background:
                    t.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await self._commit()
        finally:
            await self.batcher.close()
            await self._close_clients()
            self.log.info("worker_stopped", labelled=self.labelled, dlq=self.dead_lettered, commits=self.commits)
        if self._fatal is not None:
            raise WorkerError(str(self._fatal)) from self._fatal

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer, *self._txn.values()):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), 15)
                except (KafkaError, asyncio.TimeoutError, OSError) as exc:
                    self.log.warning("client_stop_failed", error=type(exc).__name__)

    async def _drain(self) -> None:
        """Let in-flight records finish (bounded), so that what is done gets committed."""
        deadline = time.monotonic() + self.s.worker.drain_timeout_s
        while self.inflight > 0 and time.monotonic() < deadline and self._fatal is None:
            waits = [st.drained.wait() for st in self.parts.values() if st.inflight > 0]
            if not waits:
                break
            try:
                await asyncio.wait_for(asyncio.gather(*waits), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        if self.inflight > 0:
            self.log.warning("drain_incomplete", inflight=self.inflight, note="uncommitted records will be re-read")

    # ------------------------------------------------------------------------------------ polling
    async def _poll_loop(self) -> None:
        assert self.consumer is not None
        w = self.s.worker
        while not self._stopping.is_set() and self._fatal is None:
            # getmany keeps the group membership alive even while every partition is paused.
            batches = await self.consumer.getmany(timeout_ms=50, max_records=self.s.kafka.fetch_max_records)
            t_poll = time.perf_counter()
            for tp, records in batches.items():
                st = self.parts.get(tp)
                if st is None or not records:
                    continue  # revoked between fetch and now: the new owner reads them
                for r in records:
                    st.add(r.offset)
                self.inflight += len(records)
                self.fail.hit("after_poll")
                prev, mine = st.tail, asyncio.get_running_loop().create_future()
                st.tail = mine
                self._spawn(self._handle(tp, st, records, prev, mine, t_poll))
            self.metrics.inflight.set(self.inflight)
            if not self.paused and self.inflight >= w.max_inflight:
                self.consumer.pause(*self.consumer.assignment())
                self.paused = True
                self.log.info("backpressure_pause", inflight=self.inflight)
            elif self.paused and self.inflight <= w.max_inflight // 2:
                self.consumer.resume(*self.consumer.assignment())
                self.paused = False
                self.log.info("backpressure_resume", inflight=self.inflight)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None and self._fatal is None:
            self._fatal = t.exception()
            self.log.error("worker_fatal", error=repr(t.exception())[:300])
            self._stopping.set()

    # ------------------------------------------------------------------------------------ handling
    async def _handle(self, tp: TopicPartition, st: PartitionState, records: list, prev: asyncio.Future | None,
                      mine: asyncio.Future, t_poll: float) -> None:
        try:
            await self._handle_inner(tp, st, records, prev, mine, t_poll)
        finally:
            if not mine.done():
                mine.set_result(None)
            st.finished(len(records))
            self.inflight -= len(records)

    async def _handle_inner(self, tp, st, records, prev, mine, t_poll) -> None:
        w = self.s.worker
        poll_ms = now_ms()
        events: list[Event | BadEvent] = []
        for r in records:
            try:
                events.append(decode_event(r.value, default_id=f"{tp.topic}-{tp.partition}-{r.offset}",
                                           record_ts_ms=r.timestamp, key=r.key, headers=r.headers or (),
                                           max_bytes=w.max_bytes, max_chars=w.max_chars))
            except BadEvent as bad:
                events.append(bad)
            self.slo.record_stage("queue", max(0.0, (poll_ms - r.timestamp) / 1000.0))

        good_idx = [i for i, e in enumerate(events) if isinstance(e, Event)]
        keys = [cache_key(self.engine.model_id, events[i].text) for i in good_idx]
        t0 = time.perf_counter()
        cached = await self.cache.get_many(keys) if keys else []
        self.slo.record_stage("cache", time.perf_counter() - t0)
        self.cache_lookups += len(keys)

        futures: dict[int, asyncio.Future] = {}
        misses: list[tuple[str, int]] = []
        for j, i in enumerate(good_idx):
            if cached[j] is not None:
                self.cache_hits += 1
                f = asyncio.get_running_loop().create_future()
                f.set_result(cached[j])
                futures[i] = f
            else:
                futures[i] = self.batcher.submit(events[i].text)
                misses.append((keys[j], i))

        if prev is not None:
            await prev  # publish after every earlier record of this partition has been sent: per-key order
        if self.eos:
            await self._deliver_transaction(tp, st, records, events, futures, dict((i, k) for k, i in misses), mine)
            return
        acks: list[tuple[int, int, Any, Event | BadEvent, float]] = []
        fresh: list[tuple[str, Prediction]] = []
        miss_keys = dict((i, k) for k, i in misses)
        for i, (r, ev) in enumerate(zip(records, events)):
            topic, value, headers, ev = await self._output_for(tp, r, ev, futures.get(i), miss_keys.get(i), fresh)
            self.fail.hit("after_inference")
            t_send = time.perf_counter()
            fut = await self._send(topic, r.key, value, headers)
            acks.append((r.offset, r.timestamp, fut, ev, t_send))
        mine.set_result(None)  # the next handler of this partition may send now

        put = asyncio.create_task(self.cache.put_many(fresh)) if fresh else None
        for offset, ts, fut, ev, t_send in acks:
            await self._await_ack(fut)
            self.slo.record_stage("publish", time.perf_counter() - t_send)
            self._count(ev, ts)
            st.complete(offset)
            self.fail.hit("after_publish")
        if put is not None:
            await put

    async def _output_for(self, tp, r, ev, fut, miss_key: str | None, fresh: list):
        """(topic, value, headers, final event-or-BadEvent) of one input record's output."""
        if isinstance(ev, Event):
            try:
                pred = await fut
            except EngineFailure as fail:
                ev = BadEvent(fail.reason)
            else:
                if miss_key is not None:  # computed by the engine, not the cache: write it back
                    fresh.append((miss_key, pred))
                    for stage in ("batch_wait", "tokenize", "infer"):
                        if stage in pred.timings:
                            self.slo.record_stage(stage, pred.timings[stage])
                labeled = now_ms()
                lat = {"e2e": labeled - r.timestamp}
                if not pred.cached:
                    lat["batch_wait"] = round(pred.timings.get("batch_wait", 0.0) * 1000, 3)
                    lat["infer"] = round(pred.timings.get("infer", 0.0) * 1000, 3)
                value = encode_label(ev, pred, labeled_at_ms=labeled, latency_ms=lat)
                return self.s.topics.output, value, list(r.headers or ()), ev
        self.log.debug("dead_letter", partition=tp.partition, offset=r.offset, reason=ev.reason)
        headers = list(r.headers or ()) + [
            (H_ERROR, ev.reason.encode()), (H_TOPIC, tp.topic.encode()),
            (H_PARTITION, str(tp.partition).encode()), (H_OFFSET, str(r.offset).encode()),
        ]
        return self.s.topics.dlq, (r.value if r.value is not None else b""), headers, ev

    def _count(self, ev, record_ts: int) -> None:
        if isinstance(ev, BadEvent):
            self.dead_lettered += 1
            self.metrics.events.labels("dlq").inc()
            self.metrics.dlq_reasons.labels(ev.reason.split(":")[0]).inc()
        else:
            self.labelled += 1
            self.metrics.events.labels("labelled").inc()
            e2e = max(0, now_ms() - record_ts)
            self.slo.record_e2e(e2e)
            self.metrics.e2e.observe(e2e / 1000.0)

    # ------------------------------------------------------------------------------------ exactly-once
    async def _txn_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        p = self._txn.get(tp)
        if p is None:
            k = self.s.kafka
            # aiokafka has no KIP-447: one transactional id per input partition fences a zombie owner of it.
            p = AIOKafkaProducer(**kafka_client_kwargs(k), client_id=f"{k.client_id}-{self.name}-tx{tp.partition}",
                                 transactional_id=f"{k.group_id}.{tp.topic}.{tp.partition}", enable_idempotence=True,
                                 acks="all", linger_ms=k.linger_ms, request_timeout_ms=30_000,
                                 compression_type=None if k.compression == "none" else k.compression)
            await p.start()
            self._txn[tp] = p
        return p

    async def _deliver_transaction(self, tp, st, records, events, futures, miss_keys, mine) -> None:
        """Outputs and the input offsets in one Kafka transaction: all visible to read_committed, or none."""
        fresh: list[tuple[str, Prediction]] = []
        outs = []
        for i, (r, ev) in enumerate(zip(records, events)):
            outs.append((r, *await self._output_for(tp, r, ev, futures.get(i), miss_keys.get(i), fresh)))
            self.fail.hit("after_inference")
        t_send = time.perf_counter()
        try:
            prod = await self._txn_producer(tp)
            async with prod.transaction():
                sends = [await prod.send(topic, value=value, key=r.key, headers=headers)
                         for r, topic, value, headers, _ in outs]
                await asyncio.gather(*sends)
                self.fail.hit("in_transaction")
                await prod.send_offsets_to_transaction({tp: records[-1].offset + 1}, self.s.kafka.group_id)
        except (KafkaError, asyncio.TimeoutError) as exc:
            # Indefinite outcome: the producer is re-created by a worker restart (fencing the old one); the
            # aborted or committed transaction decides, and read_committed readers never see a half.
            raise WorkerError(f"transaction for partition {tp.partition} failed: {exc!r}") from exc
        finally:
            if not mine.done():
                mine.set_result(None)
        self.slo.record_stage("publish", time.perf_counter() - t_send)
        for r, _, _, _, ev in outs:
            self._count(ev, r.timestamp)
            st.complete(r.offset)
        st.committed = records[-1].offset + 1
        if fresh:
            await self.cache.put_many(fresh)

    async def _send(self, topic: str, key, value: bytes, headers: list) -> asyncio.Future:
        assert self.producer is not None
        for attempt in range(SEND_RETRIES):
            try:
                return await self.producer.send(topic, value=value, key=key, headers=headers)
            except KafkaError as exc:
                if attempt == SEND_RETRIES - 1:
                    raise WorkerError(f"cannot publish to '{topic}': {exc!r}") from exc
                await asyncio.sleep(0.2 * 2 ** attempt)  # backoff between retries, not synchronisation
        raise AssertionError("unreachable")

    async def _await_ack(self, fut: asyncio.Future) -> None:
        try:
            await fut
        except KafkaError as exc:
            # The producer already retried for request_timeout; without an ack the offset must not be
            # committed, and going on would let the watermark stall: stop and let a restart re-read.
            raise WorkerError(f"output not acknowledged: {exc!r}") from exc

    # ------------------------------------------------------------------------------------ commits
    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.worker.commit_interval_ms / 1000)  # a period, not synchronisation
            await self._commit()

    async def _commit(self, only: set | None = None) -> None:
        if self.consumer is None or self.eos:  # exactly-once: offsets are committed inside each transaction
            return
        offsets = {}
        for tp, st in self.parts.items():
            if only is not None and tp not in only:
                continue
            wm = st.watermark()
            if wm is not None and (st.committed is None or wm > st.committed):
                offsets[tp] = wm
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            self.log.warning("commit_failed", error=type(exc).__name__, partitions=len(offsets))
            return
        for tp, wm in offsets.items():
            self.parts[tp].committed = wm
        self.commits += 1

    # ------------------------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked) -> None:
        revoked = set(revoked)
        mine = [self.parts[tp] for tp in revoked if tp in self.parts]
        busy = [st.drained.wait() for st in mine if st.inflight > 0]
        if busy:
            try:
                await asyncio.wait_for(asyncio.gather(*busy), self.s.worker.drain_timeout_s)
            except asyncio.TimeoutError:
                self.log.warning("revoke_drain_timeout", note="incomplete records stay uncommitted")
        await self._commit(only=revoked)
        for tp in revoked:
            self.parts.pop(tp, None)
            prod = self._txn.pop(tp, None)
            if prod is not None:
                await prod.stop()
        self.log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    def _on_assigned(self, assigned) -> None:
        for tp in assigned:
            self.parts.setdefault(tp, PartitionState())
        if self.paused and self.consumer is not None and assigned:
            self.consumer.pause(*assigned)
        self.ready.set()
        self.log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

    # ------------------------------------------------------------------------------------ reporting
    def lag(self) -> int:
        total = 0
        if self.consumer is None:
            return 0
        for tp, st in self.parts.items():
            hw = self.consumer.highwater(tp)
            if hw is not None:
                lag = max(0, hw - (st.last_offset + 1)) if st.last_offset >= 0 else hw
                self.metrics.lag.labels(str(tp.partition)).set(lag)
                total += lag
        return total

    def summary(self) -> dict:
        snap = self.slo.snapshot()
        self.metrics.goodput.set(snap.goodput)
        for wname, v in snap.burn_rates.items():
            self.metrics.burn.labels(wname).set(v)
        return {
            "rate_per_s": round(snap.rate_per_s, 1), "p50_ms": round(snap.p50_ms, 2), "p99_ms": round(snap.p99_ms, 2),
            "goodput": round(snap.goodput, 4), "burn_1m": round(snap.burn_rates["1m"], 2),
            "cache_hit_ratio": round(self.cache_hits / self.cache_lookups, 3) if self.cache_lookups else 0.0,
            "lag": self.lag(), "inflight": self.inflight, "labelled": self.labelled, "dlq": self.dead_lettered,
            "batches": self.batcher.batches,
        }

    async def _summary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.metrics.summary_interval_s)  # a period, not synchronisation
            self.log.info("summary", **self.summary())
