"""The classify worker: one consumer-group member, a thin loop.

poll → decode (bad → DLQ) → cache → micro-batch → engine → outputs → ``consumers/delivery.py`` (ordered
publish, acks or transactions, commits, rebalance, failure latch).

Every task the worker starts is supervised: an unexpected exit of any of them (the commit task, the
batcher, a batch handler, the broker watch) stops the worker without committing anything more, and
``streamlabel run`` restarts it with fresh clients (uncommitted records are read again). A broken or hung
engine stops it for good (``EngineError``, exit code 4).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    GroupAuthorizationFailedError,
    IllegalStateError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from consumers.delivery import AtLeastOnce, Batch, ExactlyOnce, Lifecycle, Output, PartitionClosed
from pipeline import kafka as K
from pipeline import logs
from pipeline.batcher import EngineFailure, MicroBatcher
from pipeline.cache import Cache, NullCache, cache_key, cacheable, settings_digest
from pipeline.config import Settings
from pipeline.engine import Engine
from pipeline.errors import BadEvent, ConfigError, EngineError
from pipeline.events import (Event, Generation, Prediction, deadline_ms, decode_event, encode_generation, encode_label,
                             now_ms)
from pipeline.failpoints import Failpoints
from pipeline.metrics import Metrics
from pipeline.slo import STAGES, SloTracker

H_ERROR = "streamlabel.error"
H_TOPIC = "streamlabel.source.topic"
H_PARTITION = "streamlabel.source.partition"
H_OFFSET = "streamlabel.source.offset"
H_TRUNCATED = "streamlabel.value.truncated"  # the original value's length when the DLQ copy is cut
H_DROPPED = "streamlabel.dropped"  # what a fallback DLQ record left out, and why
GATHER_MAX_MS = 50.0  # adaptive fetching: the longest a fetch gathers records under load
H_DEADLINE = "streamlabel.deadline_ms"  # input: this record's deadline, epoch ms (default: timestamp + objective)
_RESERVED = "streamlabel."
_INPUT_PREFIX = "streamlabel.input."  # input headers that would pose as ours are renamed under this
_RECORD_OVERHEAD = 512  # bytes of batch and record framing allowed for when a record must fit a topic limit
_UNREADABLE_MAX = 10_000  # offsets dead-lettered at once for one unreadable producer batch


class WorkerError(Exception):
    """The worker cannot go on without risking loss (e.g. outputs cannot be published); it stops uncommitted."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record the Kafka client could not parse: only its coordinates are known."""

    offset: int
    reason: str
    timestamp: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple = ()


class _Rebalance(ConsumerRebalanceListener):
    # aiokafka logs and swallows exceptions raised here; the worker turns them into a supervised failure.
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        try:
            await self.worker._on_revoked(revoked)
        except Exception as exc:  # noqa: BLE001 — reported to the supervisor, which stops the worker
            self.worker._fail(exc)

    async def on_partitions_assigned(self, assigned):
        try:
            await self.worker._on_assigned(assigned)
        except Exception as exc:  # noqa: BLE001
            self.worker._fail(exc)


class Worker:
    def __init__(self, settings: Settings, engine: Engine, *, cache: Cache | None = None,
                 metrics: Metrics | None = None, slo: SloTracker | None = None, name: str = "worker-0") -> None:
        self.s = settings
        self.fail = Failpoints(settings.worker.failpoint, stall_s=3 * settings.worker.drain_timeout_s + 5)
        self.engine = self.fail.wrap_engine(engine)
        self.metrics = metrics or Metrics()
        self.slo = slo or SloTracker(settings.slo.objective_ms, settings.slo.target)
        stage_hist = self.metrics.stage
        stage_obs = {st: stage_hist.labels(st).observe for st in STAGES}  # one label look-up per stage, not per batch
        self.slo.observer = lambda stage, seconds: (stage_obs.get(stage) or stage_hist.labels(stage).observe)(seconds)
        self.cache = cache or NullCache()
        self.caching = not isinstance(self.cache, NullCache)
        self._labelled_counter = self.metrics.events.labels("labelled")
        self._ignored_deadline = self.metrics.ignored.labels("deadline_header")
        self._bad_deadline_logged = False
        self._fetched = self._fetched_seen = self._fetched_bytes = self._fetched_bytes_seen = 0
        self._takes = 0  # poll batches taken (one per partition per poll): records / takes is the batch size
        self.name = name
        self.log = logs.get("streamlabel.worker").bind(worker=name)
        b = settings.batching
        self.generating = getattr(engine, "task", "") == "text-generation"
        self.model_key = self.engine.model_id  # what cache keys are made of, beside the text
        self.template = None
        if self.generating:
            from pipeline.generator import GenerationScheduler, Sampling, template_from

            g = settings.generate
            self.template = template_from(g.template, g.system, g.user)
            sampling = Sampling(g.do_sample, g.temperature, g.top_p, g.seed)
            self.batcher = GenerationScheduler(
                self.engine, max_batch=b.max_batch, max_tokens=b.max_tokens, max_new_tokens=g.max_new_tokens,
                stop=g.stop, sampling=sampling, prefill_tokens=g.prefill_tokens, max_prompt_tokens=g.max_prompt_tokens,
                ignore_eos=g.ignore_eos, metrics=self.metrics, slo=self.slo)
            self.batcher.add_prefix(self.engine.prefix_of(self.template.render("")[0]))
            # A cached generation is only valid for the same prompt and decoding settings: their digest goes into
            # the key (never the template's text, which would then sit in every Redis key).
            self.model_key = f"{self.engine.model_id}|{settings_digest(self.template.system, self.template.user, g.max_new_tokens, g.stop, g.ignore_eos, g.do_sample and (g.temperature, g.top_p, g.seed))}"
        else:
            self.batcher = MicroBatcher(self.engine, max_batch=b.max_batch, max_tokens=b.max_tokens,
                                        max_wait_ms=b.max_wait_ms, metrics=self.metrics,
                                        concurrency=b.engine_concurrency or getattr(self.engine, "sessions", 1),
                                        slo=self.slo, timeout_s=b.engine_timeout_s)
            if hasattr(engine, "pressure"):  # a cascade: a full batch waiting means no time to escalate
                engine.pressure = lambda: self.batcher.waiting() >= self.batcher.max_batch
                # Its answers depend on the threshold as much as on the two models.
                self.model_key = f"{self.engine.model_id}|t={engine.threshold}"
        self.eos = settings.worker.delivery == "exactly_once"
        self.inflight = 0
        self.inflight_bytes = 0  # what the records in flight hold (values, keys, headers): the memory bound
        self.paused = False
        self.labelled = 0
        self.dead_lettered = 0
        self.unreadable = 0
        self.cache_hits = 0
        self.cache_lookups = 0
        self.ready = asyncio.Event()  # set once partitions are assigned (exactly-once: and fenced)
        self.consumer = None
        self.producer = None
        self.delivery: AtLeastOnce | ExactlyOnce | None = None
        self.dlq_cap = settings.worker.dlq_max_bytes
        self.dlq_limit = K.MAX_REQUEST_BYTES
        self.output_limit = K.MAX_REQUEST_BYTES
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._handlers: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._kafka_down_since: float | None = None
        self._expect: dict[TopicPartition, int] = {}  # per partition: the next offset the worker has not taken
        self._positions: dict[TopicPartition, int] = {}  # fetch position at assignment (lag before the first record)
        self._stop_waiter: asyncio.Future | None = None
        self._missing_topics: set[str] = set()

    def assigned(self) -> bool:
        """Partitions are assigned to this worker now."""
        try:
            return bool(self.consumer is not None and self.consumer.assignment())
        except Exception:  # noqa: BLE001 — a consumer that is closing has no assignment
            return False

    def kafka_reachable(self) -> bool:
        return self._kafka_down_since is None

    @property
    def commits(self) -> int:
        return self.delivery.commits if self.delivery else 0

    # ------------------------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the worker to drain and exit (SIGTERM/SIGINT call this)."""
        self._stopping.set()

    def _fail(self, exc: BaseException) -> None:
        """The supervisor: the first unexpected failure stops the worker (nothing more is committed)."""
        if self._fatal is None:
            self._fatal = exc
            self.log.error("worker_fatal", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        self._stopping.set()

    async def run(self) -> None:
        s, k, t = self.s, self.s.kafka, self.s.topics
        info = await K.check_topics(s, {"input": t.input, "output": t.output, "dlq": t.dlq}, create=t.create,
                                    partitions=t.partitions, replication_factor=t.replication_factor)
        limit = min(K.MAX_REQUEST_BYTES, info["dlq"].max_message_bytes or K.MAX_REQUEST_BYTES)
        self.dlq_cap = max(1024, min(s.worker.dlq_max_bytes, limit - 16 * 1024))
        self.dlq_limit = limit
        self.output_limit = min(K.MAX_REQUEST_BYTES, info["output"].max_message_bytes or K.MAX_REQUEST_BYTES)
        self.consumer = K.consumer(
            s, group_id=k.group_id, client_id=f"{k.client_id}-{self.name}", session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 4), max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=k.fetch_max_records, fetch_max_wait_ms=k.fetch_max_wait_ms, fetch_min_bytes=k.fetch_min_bytes or 1,
            isolation_level="read_committed",
            # One fetch may bring this much beside what is in flight: a quarter of the in-flight byte bound (at least
            # one maximal record), not aiokafka's 50 MB.
            fetch_max_bytes=max(K.MAX_REQUEST_BYTES + 1024, min(52_428_800, s.worker.max_inflight_bytes // 4)),
        )
        common = dict(consumer=self.consumer, group_id=k.group_id, commit_interval_s=s.worker.commit_interval_ms / 1000,
                      log=self.log, on_point=self.fail.hit, on_failure=self._fail)
        if self.eos:
            self.delivery = ExactlyOnce(
                make_producer=lambda tp: K.transactional_producer(
                    s, f"{k.group_id}.{tp.topic}.{tp.partition}", client_id=f"{k.client_id}-{self.name}-tx{tp.partition}",
                    request_timeout_ms=30_000),
                can_resume=lambda tp: not self.paused, **common)
        else:
            def make_producer():
                return K.producer(s, client_id=f"{k.client_id}-{self.name}-out", request_timeout_ms=30_000)

            self.producer = make_producer()
            self.delivery = AtLeastOnce(producer=self.producer, make_producer=make_producer, **common)
        try:
            try:
                if self.producer is not None:
                    await asyncio.wait_for(self.producer.start(), K.START_TIMEOUT_S)
                self.consumer.subscribe([t.input], listener=_Rebalance(self))
                await asyncio.wait_for(self.consumer.start(), K.START_TIMEOUT_S)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                raise K.connection_error(s, exc) from None
            self.batcher.start()
            if self.generating and self.s.slo.objective_ms < 1000:
                self.log.warning("generation_deadline_short", objective_ms=self.s.slo.objective_ms,
                                 note="each generation must finish by its record timestamp + slo.objective_ms; most will "
                                      "end with finish_reason=deadline. Set [slo] objective_ms = 5000 (or more) for "
                                      "generators")
            self._stop_waiter = asyncio.ensure_future(self._stopping.wait())
            self.log.info("worker_started", input=t.input, output=t.output, dlq=t.dlq, group=k.group_id,
                          model=self.engine.model_id, delivery=self.delivery.mode)
            self._background = [self._supervise(self._commit_loop(), "commit"),
                                self._supervise(self._summary_loop(), "summary"),
                                self._supervise(self._watch_loop(), "kafka-watch"),
                                self._supervise(self._lag_loop(), "lag")]
            self.batcher.task.add_done_callback(lambda task: self._background_done("batcher", task))
            try:
                await self._poll_loop()
            except Exception as exc:  # noqa: BLE001 — stop uncommitted; run() re-raises it below
                self._fail(exc)
            finally:
                await self._shutdown()
        finally:
            await self._close_clients(time.monotonic() + 5.0)
            self.log.info("worker_stopped", labelled=self.labelled, dlq=self.dead_lettered, unreadable=self.unreadable,
                          commits=self.commits, refused_after_revoke=self.delivery.refused,
                          records_per_poll_batch=round(self._fetched / max(1, self._takes), 1))
        if self._fatal is not None:
            if isinstance(self._fatal, (EngineError, ConfigError)):
                raise self._fatal
            raise WorkerError(f"{type(self._fatal).__name__}: {self._fatal}") from self._fatal

    def _supervise(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(lambda tk: self._background_done(name, tk))
        return task

    def _background_done(self, name: str, task: asyncio.Task) -> None:
        if task.cancelled():
            if not self._stopping.is_set():
                self._fail(RuntimeError(f"the {name} task was cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)
        elif not self._stopping.is_set():
            self._fail(RuntimeError(f"the {name} task exited"))

    async def _shutdown(self) -> None:
        """Drain, commit what is complete and close, all within ``worker.drain_timeout_s``."""
        self._stopping.set()
        deadline = time.monotonic() + self.s.worker.drain_timeout_s
        for task in self._background:  # no commit tick may hold a partition while the revoke path commits
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            if self._fatal is None:
                await self.delivery.close(deadline)
            else:
                await self.delivery.abandon(deadline)
        except Exception as exc:  # noqa: BLE001 — a failed drain must not leave tasks and clients behind
            self._fail(exc)
            await self.delivery.abandon(deadline)
        for task in self._handlers:
            task.cancel()
        if self._stop_waiter is not None:
            await self._stop_waiter
        await self.batcher.close(timeout_s=max(0.05, deadline - time.monotonic() - 1.0))
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        await self._close_clients(deadline)

    async def _close_clients(self, deadline: float) -> None:
        if isinstance(self.delivery, AtLeastOnce):
            await self.delivery.stop_clients(deadline)
        for client in (self.consumer,):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), max(0.5, deadline - time.monotonic()))
                except (KafkaError, asyncio.TimeoutError, OSError) as exc:
                    self.log.warning("client_stop_failed", error=type(exc).__name__)

    # ------------------------------------------------------------------------------------ polling
    async def _poll(self, *tps: TopicPartition, timeout_ms: int, max_records: int) -> dict | None:
        """``getmany``, given up when the worker is asked to stop (it can wait without bound during a rebalance)."""
        poll = asyncio.ensure_future(self.consumer.getmany(*tps, timeout_ms=timeout_ms, max_records=max_records))
        await asyncio.wait({poll, self._stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not poll.done():
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
            return None
        return poll.result()

    async def _poll_loop(self) -> None:
        w = self.s.worker
        while not self._stopping.is_set():
            try:
                # getmany keeps the group membership alive even while every partition is paused.
                batches = await self._poll(timeout_ms=50, max_records=self.s.kafka.fetch_max_records)
            except (TopicAuthorizationFailedError, GroupAuthorizationFailedError) as exc:
                raise K.connection_error(self.s, exc) from None
            except CorruptRecordException as exc:
                await self._unreadable(exc)
                continue
            except KafkaError as exc:
                self._fail(exc)
                break
            except Exception as exc:  # noqa: BLE001 — the client could not parse a record (e.g. a non-UTF-8 header key)
                await self._unreadable(exc)
                continue
            if batches is None:
                break
            t_poll = time.perf_counter()
            for tp, records in batches.items():
                if records:
                    self._take(tp, records, t_poll)
            self.metrics.inflight.set(self.inflight)
            self.metrics.inflight_bytes.set(self.inflight_bytes)
            if not self.paused and (self.inflight >= w.max_inflight or self.inflight_bytes >= w.max_inflight_bytes):
                self.consumer.pause(*self.consumer.assignment())
                self.paused = True
                self.log.info("backpressure_pause", inflight=self.inflight, inflight_bytes=self.inflight_bytes)
            elif self.paused and self.inflight <= w.max_inflight // 2 and self.inflight_bytes <= w.max_inflight_bytes // 2:
                self.paused = False
                open_ = [tp for tp, p in self.delivery.parts.items() if p.state is Lifecycle.ASSIGNED]
                self.consumer.resume(*open_)
                self.log.info("backpressure_resume", inflight=self.inflight, inflight_bytes=self.inflight_bytes)

    def _take(self, tp: TopicPartition, records: list, t_poll: float) -> None:
        batch = self.delivery.admit(tp, records)
        if batch is None:
            # Not open yet (exactly-once: still being fenced) or being revoked: read these again later.
            if tp in self.consumer.assignment():
                try:
                    self.consumer.seek(tp, records[0].offset)
                    self._expect[tp] = records[0].offset
                except IllegalStateError:
                    pass
            return
        self._expect[tp] = records[-1].offset + 1
        self.inflight += len(records)
        size = record_bytes(records)
        self.inflight_bytes += size
        self._fetched += len(records)
        self._takes += 1
        self._fetched_bytes += size
        self.fail.hit("after_poll")
        task = asyncio.get_running_loop().create_task(self._handle(tp, batch, records, t_poll, size))
        self.delivery.track(batch, task)
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    # ------------------------------------------------------------------------------------ unreadable records
    async def _unreadable(self, exc: BaseException) -> None:
        """The client raised while parsing a fetch. Find the record, dead-letter it by its coordinates, skip it.

        aiokafka cannot iterate a record batch past a record it cannot parse, so the records of the same
        producer batch from that one on are dead-lettered too (value not available to this client; the
        reason says how to read them with kcat). Records before it are labelled as usual.
        """
        loc = _locate(exc)
        await self._rewind(skip=loc[0] if loc else None)
        candidates = [loc[0]] if loc else [tp for tp, p in self.delivery.parts.items() if p.state is Lifecycle.ASSIGNED]
        for tp in candidates:
            if await self._step_to_unreadable(tp):
                return
        self._fail(WorkerError(f"the Kafka client failed to read a fetch and the record was not found: {exc!r}"))

    async def _rewind(self, skip: TopicPartition | None) -> None:
        """Seek every other partition back to the first offset not yet taken.

        aiokafka drains partitions one after another inside one ``getmany``; when one raises, the records it
        already drained from others are dropped with their positions moved on. Without this they would be
        skipped, and a later commit would pass them.
        """
        for tp in self.consumer.assignment():
            if tp == skip:
                continue
            try:
                if tp in self._expect:
                    self.consumer.seek(tp, self._expect[tp])
                    continue
                c = await K.committed(self.consumer, tp, K.START_TIMEOUT_S)
                if c is not None:
                    self.consumer.seek(tp, c)
                elif self.s.kafka.auto_offset_reset == "earliest":
                    await self.consumer.seek_to_beginning(tp)
            except (IllegalStateError, KafkaError) as exc:
                self.log.warning("rewind_failed", partition=tp.partition, error=type(exc).__name__)

    async def _step_to_unreadable(self, tp: TopicPartition) -> bool:
        for _ in range(100_000):
            if self._stopping.is_set():
                return True
            try:
                got = await self._poll(tp, timeout_ms=2000, max_records=1)
                if got is None:
                    return True
            except KafkaError as exc:
                if not isinstance(exc, CorruptRecordException):
                    raise
                err: BaseException = exc
            except Exception as exc:  # noqa: BLE001 — the parse failure, now pinned to this partition
                err = exc
            else:
                if not got:
                    return False
                for tp2, recs in got.items():
                    if recs:
                        self._take(tp2, recs, time.perf_counter())
                continue
            loc = _locate(err)
            pos = await self.consumer.position(tp)
            first = max(pos, loc[1]) if loc and loc[0] == tp else pos
            last = max(first, min(loc[2] - 1, first + _UNREADABLE_MAX - 1)) if loc and loc[0] == tp else first
            why = f"{type(err).__name__}: {str(err)[:160]}"
            recs = [Unreadable(o, f"unreadable: the Kafka client cannot parse this record or the rest of its producer "
                                  f"batch ({why}); value not available here: kcat -C -t {tp.topic} -p {tp.partition} "
                                  f"-o {o} -c 1", timestamp=now_ms())
                    for o in range(first, last + 1)]
            self.unreadable += len(recs)
            self.log.error("unreadable_records", topic=tp.topic, partition=tp.partition, offsets=f"{first}-{last}",
                           error=why, note="dead-lettered by offset and skipped; the partition goes on")
            self.consumer.seek(tp, last + 1)
            self._take(tp, recs, time.perf_counter())
            self._expect[tp] = last + 1
            return True
        return False  # 100,000 readable records stepped through and no failure: let the caller decide

    # ------------------------------------------------------------------------------------ handling
    async def _handle(self, tp: TopicPartition, batch: Batch, records: list, t_poll: float, size: int) -> None:
        try:
            outputs, answered, fresh = await self._outputs(tp, records)
            if self.fail:
                for _ in records:
                    self.fail.hit("after_inference")
                await self.fail.stall()
            await self.delivery.publish(batch, outputs)
            self._count(answered)
            if fresh:
                await self.cache.put_many(fresh)
        except PartitionClosed:
            pass  # revoked or failed: not published, not committed; whoever owns it next reads it again
        finally:
            self.delivery.settle(batch)
            self.inflight -= len(records)
            self.inflight_bytes -= size

    async def _outputs(self, tp: TopicPartition, records: list) -> tuple[list[Output], list, list]:
        """One poll batch → one output per record, in order: decode, cache, one batcher call for the misses."""
        w = self.s.worker
        poll_ms = now_ms()
        objective = self.s.slo.objective_ms
        events: list[Event | BadEvent] = []
        deadlines: list[float] = []
        queued = 0
        prefix = f"{tp.topic}-{tp.partition}-"
        for r in records:
            if isinstance(r, Unreadable):
                events.append(BadEvent(r.reason))
                deadlines.append(0.0)
                continue
            try:
                events.append(decode_event(r.value, default_id=prefix + str(r.offset), record_ts_ms=r.timestamp,
                                           key=r.key, headers=r.headers or (), max_bytes=w.max_bytes,
                                           max_chars=w.max_chars))
            except BadEvent as bad:
                events.append(bad)
            queued += poll_ms - r.timestamp
            deadlines.append(((self._deadline_header(r.headers) if r.headers else None)
                              or r.timestamp + objective) / 1000.0)
        self.slo.record_stage("queue", max(0.0, queued / len(records) / 1000.0), len(records))

        good = [i for i, e in enumerate(events) if isinstance(e, Event)]
        answers: list = [None] * len(records)
        waits: list[float] = [0.0] * len(records)
        misses = good
        keys: dict[int, str] = {}
        if self.generating:  # the generator's input is the prompt the template builds from the event
            render, tpl = self.engine.render, self.template
            texts = {i: render(*tpl.for_event(events[i])) for i in good}
        else:
            texts = {i: events[i].text for i in good}
        if self.caching and good:
            keys = {i: cache_key(self.model_key, texts[i]) for i in good}
            t0 = time.perf_counter()
            cached = await self.cache.get_many(list(keys.values()))
            self.slo.record_stage("cache", time.perf_counter() - t0, len(good))
            self.cache_lookups += len(good)
            misses = []
            for i, hit in zip(good, cached):
                if hit is None:
                    misses.append(i)
                else:
                    answers[i] = hit
            self.cache_hits += len(good) - len(misses)
        if misses:
            got = await self.batcher.submit_many([texts[i] for i in misses], [deadlines[i] for i in misses])
            for i, a, wt in zip(misses, got.results, got.waits):
                answers[i] = a
                waits[i] = wt

        outputs: list[Output] = []
        labelled: list[int] = []  # record timestamps of the labelled events
        dlq_reasons: list[str] = []
        fresh: list[tuple[str, Prediction]] = []
        labeled_at = now_ms()
        for i, (r, ev) in enumerate(zip(records, events)):
            a = answers[i]
            if isinstance(a, EngineFailure):
                ev = BadEvent(a.reason)
            if isinstance(ev, Event):
                if keys and not a.cached and cacheable(a):  # computed by the engine, a normal answer: write back
                    fresh.append((keys[i], a))
                outputs.append(self._label(tp, r, ev, a, labeled_at, waits[i]))
                labelled.append(r.timestamp)
            else:
                outputs.append(self._dlq(tp, r, ev.reason))
                dlq_reasons.append(ev.reason)
        return outputs, (labelled, dlq_reasons), fresh

    def _deadline_header(self, headers) -> int | None:
        """``streamlabel.deadline_ms``: the record's own deadline, epoch milliseconds (1-15 ASCII digits). Any
        other value is ignored, counted (``streamlabel_ignored_total{what="deadline_header"}``) and logged once."""
        for k, v in headers:
            if k == H_DEADLINE:
                ms = deadline_ms(v)
                if ms is None:
                    self._ignored_deadline.inc()
                    if not self._bad_deadline_logged:
                        self._bad_deadline_logged = True
                        self.log.warning("deadline_header_ignored", header=H_DEADLINE, value=repr(v)[:40],
                                         note="expected epoch milliseconds as 1-15 ASCII digits; the default deadline "
                                              "(record timestamp + slo.objective_ms) applies; counted in "
                                              "streamlabel_ignored_total")
                return ms
        return None

    def _label(self, tp: TopicPartition, r, ev: Event, pred: Prediction | Generation, labeled: int, wait: float) -> Output:
        if pred.cached:
            lat = {"e2e": labeled - r.timestamp}
        elif type(pred) is Generation:
            t = pred.timings
            lat = {"e2e": labeled - r.timestamp, "queue": round(t.get("queue", 0.0) * 1000, 3),
                   "ttft": round(t.get("ttft", 0.0) * 1000, 3), "decode": round(t.get("decode", 0.0) * 1000, 3)}
        else:
            lat = {"e2e": labeled - r.timestamp, "batch_wait": round(wait * 1000, 3),
                   "infer": round(pred.timings.get("infer", 0.0) * 1000, 3)}
        if type(pred) is Generation:
            value = encode_generation(ev, pred, generated_at_ms=labeled, latency_ms=lat)
        else:
            value = encode_label(ev, pred, labeled_at_ms=labeled, latency_ms=lat)
        out = Output(self.s.topics.output, r.key, value, list(r.headers) if r.headers else [],
                     lambda: self._fallback(tp, r, "publish: the label record is larger than the output topic allows "
                                                   "(input key and headers are kept on labels)"))
        if (len(value) < 4096 and not r.headers) or _size(out) <= self.output_limit - _RECORD_OVERHEAD:
            return out
        return out.fallback

    def _ours(self, tp: TopicPartition, r, reason: str) -> list:
        return [(H_ERROR, reason.encode()), (H_TOPIC, tp.topic.encode()),
                (H_PARTITION, str(tp.partition).encode()), (H_OFFSET, str(r.offset).encode())]

    def _dlq(self, tp: TopicPartition, r, reason: str) -> Output:
        """The DLQ copy: our headers first, then the input's (any posing as ours renamed), the value capped."""
        if self.s.log.log_text:  # switched on explicitly: the record's value may hold personal data
            self.log.info("dead_letter", partition=tp.partition, offset=r.offset, reason=reason[:200],
                          value=(r.value or b"")[:500].decode("utf-8", "replace"))
        else:
            self.log.debug("dead_letter", partition=tp.partition, offset=r.offset, reason=reason[:200])
        headers = self._ours(tp, r, reason)
        value = r.value if r.value is not None else b""
        if len(value) > self.dlq_cap:
            headers.append((H_TRUNCATED, str(len(value)).encode()))
            value = value[: self.dlq_cap]
        for k, v in r.headers or ():
            headers.append((_INPUT_PREFIX + k[len(_RESERVED):] if k.startswith(_RESERVED) else k, v))
        fallback = self._fallback(tp, r, reason)
        out = Output(self.s.topics.dlq, r.key, value, headers, fallback)
        return out if _size(out) <= self.dlq_limit - _RECORD_OVERHEAD else fallback

    def _fallback(self, tp: TopicPartition, r, reason: str) -> Output:
        """A DLQ record that always fits: reason and coordinates only (the input stays in its topic)."""
        headers = self._ours(tp, r, reason[:2000])
        key = r.key if r.key is None or len(r.key) <= 4096 else None
        headers.append((H_DROPPED, f"value ({len(r.value or b'')} bytes) and input headers: the record would "
                                   f"exceed the topic's size limit".encode()))
        return Output(self.s.topics.dlq, key, b"", headers)

    def _count(self, answered: tuple[list[int], list[str]]) -> None:
        """Counters and latency for one published batch (one metric call per kind, not per record)."""
        labelled, reasons = answered
        if labelled:
            now = now_ms()
            e2e = [max(0, now - ts) for ts in labelled]
            self.labelled += len(labelled)
            self._labelled_counter.inc(len(labelled))
            self.slo.record_e2e_many(e2e)
            self.metrics.e2e.observe_many(e2e, scale=0.001)
        if reasons:
            self.dead_lettered += len(reasons)
            self.metrics.events.labels("dlq").inc(len(reasons))
            for reason in reasons:
                self.metrics.dlq_reasons.labels(reason.split(":")[0]).inc()

    # ------------------------------------------------------------------------------------ background
    async def _commit_loop(self) -> None:
        # Exactly-once checks four times per interval, so a transaction commits soon after it is due.
        period = self.s.worker.commit_interval_ms / 1000 / (4 if self.eos else 1)
        last = time.monotonic()
        while True:
            await asyncio.sleep(period)  # a period, not synchronisation
            await self.delivery.tick()
            if self.s.kafka.fetch_min_bytes == 0 and (now := time.monotonic()) - last >= 1.0:
                self._adapt_fetch(now - last)
                last = now

    def _adapt_fetch(self, span_s: float) -> None:
        """Adaptive fetching (``kafka.fetch_min_bytes = 0``): see ``fetch_params``. The worker polls eagerly to
        keep the batcher fed, so without this every fetch returns the one record that arrived since the last:
        a fetch request and response per record, most of the worker's CPU outside the engine at moderate load."""
        fetcher = getattr(self.consumer, "_fetcher", None)  # aiokafka reads both fields for every fetch request
        if fetcher is None or not hasattr(fetcher, "_fetch_min_bytes"):
            return
        k = self.s.kafka
        records, size = self._fetched - self._fetched_seen, self._fetched_bytes - self._fetched_bytes_seen
        self._fetched_seen, self._fetched_bytes_seen = self._fetched, self._fetched_bytes
        # While the engine is busy, records fetched one by one only wait in the batcher for its next call: a
        # fetch may gather for half an engine call (at most GATHER_MAX_MS) at no cost in latency.
        gather = max(k.fetch_gather_ms, min(GATHER_MAX_MS, 500 * self.batcher.call_seconds))
        fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = fetch_params(
            records / span_s, size / records if records else 0.0, gather, k.fetch_max_wait_ms)

    async def _watch_loop(self) -> None:
        """Log a broker outage once when it starts and once when it ends; a deleted output topic once."""
        while True:
            await asyncio.sleep(2.0)  # a period, not synchronisation
            try:
                topics = await asyncio.wait_for(self.consumer.topics(), 5.0)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                if self._kafka_down_since is None:
                    self._kafka_down_since = time.monotonic()
                    self.log.warning("kafka_unreachable", bootstrap=self.s.kafka.bootstrap_servers,
                                     error=type(exc).__name__, note="retrying; records stay uncommitted meanwhile")
                continue
            if self._kafka_down_since is not None:
                self.log.warning("kafka_reachable", bootstrap=self.s.kafka.bootstrap_servers,
                                 outage_s=round(time.monotonic() - self._kafka_down_since, 1))
                self._kafka_down_since = None
            for role in ("input", "output", "dlq"):
                name = getattr(self.s.topics, role)
                if name not in topics and name not in self._missing_topics:
                    self._missing_topics.add(name)
                    self.log.error("topic_missing", role=role, topic=name,
                                   note="publishes to it fail after the producer's timeout; the worker then restarts")
                elif name in topics:
                    self._missing_topics.discard(name)

    # ------------------------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked) -> None:
        for tp in revoked:
            self._expect.pop(tp, None)
            self._positions.pop(tp, None)
            try:  # a partition this worker no longer owns has no lag here
                self.metrics.lag.remove(str(tp.partition))
            except KeyError:
                pass
        revoked = [tp for tp in revoked if tp in self.delivery.parts]
        if not revoked:
            return
        await self.delivery.revoke(revoked, time.monotonic() + self.s.worker.drain_timeout_s)
        self.log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def _on_assigned(self, assigned) -> None:
        for tp in assigned:
            self._expect.pop(tp, None)
        if self.paused and assigned:
            self.consumer.pause(*assigned)
        await self.delivery.assign(assigned)
        self.ready.set()
        self.log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

    # ------------------------------------------------------------------------------------ reporting
    def lag(self) -> int:
        """Records behind the partition end: high watermark − the next offset this worker reads (before it has
        read one: its fetch position, i.e. the committed offset). Sets ``streamlabel_consumer_lag``."""
        total = 0
        if self.consumer is None or self.delivery is None:
            return 0
        for tp in list(self.delivery.parts):
            hw = self.consumer.highwater(tp)
            pos = self._expect.get(tp, self._positions.get(tp))
            if hw is not None and pos is not None:
                lag = max(0, hw - pos)
                self.metrics.lag.labels(str(tp.partition)).set(lag)
                total += lag
        return total

    async def _lag_loop(self) -> None:
        """Keep ``streamlabel_consumer_lag`` current (every second, not only when the summary is logged)."""
        while True:
            for tp in list(self.delivery.parts) if self.delivery else ():
                if tp not in self._expect and tp not in self._positions:
                    try:  # the fetch position after assignment: the committed offset (or the reset policy's)
                        self._positions[tp] = await asyncio.wait_for(self.consumer.position(tp), 2.0)
                    except (KafkaError, asyncio.TimeoutError, AssertionError, IllegalStateError):
                        pass
            self.lag()
            self.refresh_gauges()
            await asyncio.sleep(1.0)  # a refresh period, not synchronisation

    def refresh_gauges(self):
        """Goodput (since start and windowed), burn rates, lag: the gauges a scrape reads."""
        snap = self.slo.snapshot()
        self.metrics.goodput.set(snap.goodput)
        for wname, v in snap.burn_rates.items():
            self.metrics.burn.labels(wname).set(v)
            # burn = bad share / error budget, so the window's goodput is 1 − burn × (1 − target)
            self.metrics.goodput_window.labels(wname).set(max(0.0, 1.0 - v * (1.0 - self.slo.target)))
        return snap

    def summary(self) -> dict:
        snap = self.refresh_gauges()
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


_RECORD_FRAMING = 70  # bytes of record and batch framing per record, roughly


def record_bytes(records) -> int:
    """The memory a poll batch holds while in flight: values, keys and headers (and their DLQ copies scale
    with them)."""
    total = _RECORD_FRAMING * len(records)
    for r in records:
        total += len(r.value or b"") + len(r.key or b"")
        if r.headers:
            total += sum(len(k) + len(v or b"") for k, v in r.headers)
    return total


def _size(o: Output) -> int:
    return len(o.value) + len(o.key or b"") + sum(len(k) + len(v or b"") + 2 for k, v in o.headers)


def _locate(exc: BaseException) -> tuple[TopicPartition, int, int] | None:
    """(partition, batch base offset, batch next offset) of the record batch aiokafka failed to parse.

    Read from the traceback of aiokafka's record iterator (``PartitionRecords._unpack_records``): its locals
    name the partition and the batch. None if the traceback does not show it (another aiokafka version);
    the caller then steps every partition instead.
    """
    tb = exc.__traceback__
    found = None
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_name == "_unpack_records" and "tp" in f.f_locals:
            tp = f.f_locals["tp"]
            nb = f.f_locals.get("next_batch")
            try:
                found = (tp, int(nb.base_offset), int(nb.next_offset)) if nb is not None else (tp, -1, -1)
            except (AttributeError, TypeError, ValueError):
                found = (tp, -1, -1)
        tb = tb.tb_next
    if found is not None and found[1] < 0:
        return (found[0], 0, 0)
    return found


def fetch_params(rate: float, record_bytes: float, gather_ms: float, idle_wait_ms: int) -> tuple[int, int]:
    """(fetch_min_bytes, fetch_max_wait_ms) for the observed arrival rate (records/s) and record size.

    Every fetch is a request, a response to parse and a wake-up of the loop. Idle or light load (fewer than
    two records per ``gather_ms``): the broker answers as soon as one byte is there and long-polls
    ``idle_wait_ms`` otherwise, so a lone record is not held back. Busier: ask the broker to gather what
    arrives in ``gather_ms`` (min bytes = rate × record size × gather time, at most 1 MiB; max wait =
    ``gather_ms``), so one fetch carries a handful of records and no record waits more than ``gather_ms``.
    """
    gather = gather_ms / 1000
    if rate * gather >= 2 and record_bytes > 0:
        return max(1, min(1 << 20, int(rate * gather * record_bytes))), max(1, int(gather_ms))
    return 1, idle_wait_ms
