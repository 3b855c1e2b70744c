"""The worker: one consumer-group member, a thin loop.

poll → decode (bad → DLQ) → cache → the task's scheduler → output records (``consumers/records.py``) →
``consumers/delivery.py`` (ordered publish, acks or transactions, commits, rebalance, failure latch).

The same loop serves classifiers and generators: what differs is the ``ServingTask`` (``pipeline/tasks.py``).
Beside it: ``consumers/unreadable.py`` (records the client cannot parse) and ``consumers/health.py`` (lag,
gauges, summary, broker watch).

Every task the worker starts is supervised: an unexpected exit of any of them (the commit task, the
scheduler, a batch handler, a health loop) stops the worker without committing anything more, and
``streamlabel run`` rebuilds it if the error is retriable (``pipeline/errors.py``) with fresh clients
(uncommitted records are read again). A broken or hung engine stops it for good (``EngineError``, exit 4).
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    GroupAuthorizationFailedError,
    IllegalStateError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from consumers.delivery import AtLeastOnce, Batch, ExactlyOnce, Output
from consumers.health import Health
from consumers.records import RecordBuilder, record_bytes
from consumers.shadow_topic import ShadowTopic
from consumers.unreadable import Recovery, Unreadable
from pipeline import kafka as K
from pipeline import logs
from pipeline.backlog import Backlog, Policy
from pipeline.cache import Cache, NullCache, cache_key
from pipeline.config import Settings
from pipeline.errors import BadEvent, EngineFailure, PartitionClosed, StreamlabelError, WorkerError
from pipeline.events import Event, Generation, decode_event, event_from_fields, now_ms
from pipeline.failpoints import Failpoints
from pipeline.metrics import Metrics
from pipeline.slo import STAGES, SloTracker
from pipeline.swap import key_share
from pipeline.tasks import open_task


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
    def __init__(self, settings: Settings, engine, *, cache: Cache | None = None, metrics: Metrics | None = None,
                 slo: SloTracker | None = None, name: str = "worker-0") -> None:
        self.s = settings
        self.name = name
        self.log = logs.get("streamlabel.worker").bind(worker=name)
        self.fail = Failpoints(settings.worker.failpoint, stall_s=3 * settings.worker.drain_timeout_s + 5)
        self.metrics = metrics or Metrics()
        self.slo = slo or SloTracker(settings.slo.objective_ms, settings.slo.target)
        stage_hist = self.metrics.stage
        stage_obs = {st: stage_hist.labels(st).observe for st in STAGES}  # one label look-up per stage, not per batch
        self.slo.observer = lambda stage, seconds: (stage_obs.get(stage) or stage_hist.labels(stage).observe)(seconds)
        self.task = open_task(settings, self.fail.wrap_engine(engine), metrics=self.metrics, slo=self.slo)
        self.batcher = self.task.scheduler
        self.engine = engine  # what serves now (hot swap moves it; the runner restarts a worker with it)
        self.follower = None
        if settings.model.follow:
            if self.task.kind == "classify" and not settings.model.cascade:
                from pipeline.swap import ModelFollower

                self.follower = ModelFollower(settings, self.task, metrics=self.metrics, log=self.log,
                                              on_switch=self._switched, wrap=self.fail.wrap_engine)
            else:
                self.log.warning("model_follow_ignored", reason="hot swap follows a single classifier, not "
                                 "a generator or a cascade", note="restart the workers to change the model")
        self.shadow_out: ShadowTopic | None = None  # model.shadow_topic's writer, started in run()
        self.decoder = self.encoder = None
        if settings.format.input != "json" or settings.format.output != "json":
            from pipeline.registry import open_formats

            self.decoder, self.encoder = open_formats(settings.format, kind=self.task.kind, log=self.log,
                                                      waits=self.metrics.registry_waits)
        self.tracing = None  # pipeline.tracing.Tracing with [tracing] otlp_endpoint set; None: no span, no cost
        if settings.tracing.otlp_endpoint:
            from pipeline.tracing import Tracing

            self.tracing = Tracing(settings.tracing, group_id=settings.kafka.group_id,
                                   resource={"service.instance.id": f"{settings.kafka.client_id}-{name}"})
            self.batcher.tracer = self.tracing
        self.cache = cache or NullCache()
        self.caching = not isinstance(self.cache, NullCache)
        self.records = RecordBuilder(self.task, output=settings.topics.output, dlq=settings.topics.dlq,
                                     dlq_max_bytes=settings.worker.dlq_max_bytes, log=self.log,
                                     log_text=settings.log.log_text,
                                     ignored_deadline=self.metrics.ignored.labels("deadline_header"))
        self._labelled_counter = self.metrics.events.labels("labelled")
        self.health = Health(self)
        b = settings.batching
        self.backlog = Backlog(settings.backlog, Policy(b.max_batch, b.max_tokens))
        self.eos = settings.worker.delivery == "exactly_once"
        self.inflight = 0
        self.inflight_bytes = 0  # what the records in flight hold (values, keys, headers): the memory bound
        self.paused = False
        self.labelled = 0
        self.dead_lettered = 0
        self.cache_hits = 0
        self.cache_lookups = 0
        self.ready = asyncio.Event()  # set once partitions are assigned (exactly-once: and fenced)
        self.consumer = None
        self.delivery: AtLeastOnce | ExactlyOnce | None = None
        self.recovery: Recovery | None = None
        self.expect: dict[TopicPartition, int] = {}  # per partition: the next offset the worker has not taken
        self._fetched = self._fetched_seen = self._fetched_bytes = self._fetched_bytes_seen = 0
        self._takes = 0  # poll batches taken (one per partition per poll): records / takes is the batch size
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._handlers: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._stop_waiter: asyncio.Future | None = None

    def _switched(self, old, new) -> None:
        from pipeline import __version__

        self.engine = new
        info = self.metrics.build_info
        info.labels(__version__, old.model_id, str(old.variant), str(old.providers[0]), old.task).set(0)
        info.labels(__version__, new.model_id, str(new.variant), str(new.providers[0]), new.task).set(1)
        self.metrics.track_cpu(new.thread_ids)

    def assigned(self) -> bool:
        """Partitions are assigned to this worker now."""
        try:
            return bool(self.consumer is not None and self.consumer.assignment())
        except Exception:  # noqa: BLE001 — a consumer that is closing has no assignment
            return False

    def kafka_reachable(self) -> bool:
        return self.health.kafka_reachable()

    @property
    def commits(self) -> int:
        return self.delivery.commits if self.delivery else 0

    @property
    def unreadable(self) -> int:
        return self.recovery.unreadable if self.recovery else 0

    def summary(self) -> dict:
        return self.health.summary()

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
        self.records.set_limits(info["output"].max_message_bytes, info["dlq"].max_message_bytes,
                                s.worker.dlq_max_bytes)
        if self.encoder is not None:  # before anything is read: every output carries the registered schema's id
            await self._until_stopped(self.encoder.start(t.output))
            if self._stopping.is_set():
                return
            self.task.dumps = self.encoder.encode
        self.consumer = K.consumer(
            s, group_id=k.group_id, client_id=f"{k.client_id}-{self.name}", session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 4), max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=k.fetch_max_records, fetch_max_wait_ms=k.fetch_max_wait_ms, fetch_min_bytes=k.fetch_min_bytes or 1,
            isolation_level="read_committed",
            # One fetch may bring this much beside what is in flight: a quarter of the in-flight byte bound (at least
            # one maximal record), not aiokafka's 50 MB.
            fetch_max_bytes=max(K.MAX_REQUEST_BYTES + 1024, min(52_428_800, s.worker.max_inflight_bytes // 4)),
        )
        self.recovery = Recovery(self.consumer, poll=self._poll, take=lambda tp, recs: self._take(tp, recs, time.perf_counter()),
                                 expect=self.expect, auto_offset_reset=k.auto_offset_reset,
                                 stopping=self._stopping.is_set, log=self.log)
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

            self.delivery = AtLeastOnce(producer=make_producer(), make_producer=make_producer, **common)
        try:
            try:
                await asyncio.wait_for(self.delivery.start_clients(), K.START_TIMEOUT_S)
                self.consumer.subscribe([t.input], listener=_Rebalance(self))
                await asyncio.wait_for(self.consumer.start(), K.START_TIMEOUT_S)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                raise K.connection_error(s, exc) from None
            self.batcher.start()
            self.task.started(self.log)
            self._stop_waiter = asyncio.ensure_future(self._stopping.wait())
            self.log.info("worker_started", input=t.input, output=t.output, dlq=t.dlq, group=k.group_id,
                          model=self.task.model_id, task=self.task.kind, delivery=self.delivery.mode)
            self._background = [self._supervise(self._commit_loop(), "commit"),
                                self._supervise(self.health.summary_loop(), "summary"),
                                self._supervise(self.health.watch_loop(), "kafka-watch"),
                                self._supervise(self.health.lag_loop(), "lag")]
            if self.follower is not None:
                if s.model.shadow_topic:
                    self.shadow_out = ShadowTopic(s, name=self.name, metrics=self.metrics)
                    await self.shadow_out.start()
                    self.task.shadow_sink = self.shadow_out.publish
                    if self.task.shadow is not None:
                        self.task.shadow.sink = self.shadow_out.publish
                self._background.append(self._supervise(self.follower.run(), "model-follower"))
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
            if isinstance(self._fatal, StreamlabelError):
                raise self._fatal
            raise WorkerError(f"{type(self._fatal).__name__}: {self._fatal}") from self._fatal

    async def _until_stopped(self, coro) -> None:
        """Await ``coro`` unless the worker is asked to stop first (then it is cancelled)."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        task.result()

    def _supervise(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(lambda tk: self._background_done(name, tk))
        return task

    def _background_done(self, name: str, task: asyncio.Future) -> None:
        if task.cancelled():
            if not self._stopping.is_set():
                self._fail(WorkerError(f"the {name} task was cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)
        elif not self._stopping.is_set():
            self._fail(WorkerError(f"the {name} task exited"))

    async def _shutdown(self) -> None:
        """Drain, commit what is complete and close, all within ``worker.drain_timeout_s``."""
        self._stopping.set()
        deadline = time.monotonic() + self.s.worker.drain_timeout_s
        for task in self._background:  # no commit tick may start while the revoke path commits
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
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown, max(0.5, min(5.0, deadline - time.monotonic())))

    async def _close_clients(self, deadline: float) -> None:
        if self.shadow_out is not None:
            await self.shadow_out.stop(deadline)
        if self.delivery is not None:
            await self.delivery.stop_clients(deadline)
        if self.consumer is not None:
            try:
                await asyncio.wait_for(self.consumer.stop(), max(0.5, deadline - time.monotonic()))
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
                self.consumer.resume(*self.delivery.open_partitions())
                self.log.info("backpressure_resume", inflight=self.inflight, inflight_bytes=self.inflight_bytes)

    async def _unreadable(self, exc: BaseException) -> None:
        if not await self.recovery.recover(exc, self.delivery.open_partitions()):
            self._fail(WorkerError(f"the Kafka client failed to read a fetch and the record was not found: {exc!r}"))

    def _take(self, tp: TopicPartition, records: list, t_poll: float) -> None:
        batch = self.delivery.admit(tp, records)
        if batch is None:
            # Not open yet (exactly-once: still being fenced) or being revoked: read these again later.
            if tp in self.consumer.assignment():
                try:
                    self.consumer.seek(tp, records[0].offset)
                    self.expect[tp] = records[0].offset
                except IllegalStateError:
                    pass
            return
        self.expect[tp] = records[-1].offset + 1
        self.inflight += len(records)
        size = record_bytes(records)
        self.inflight_bytes += size
        self._fetched += len(records)
        self._takes += 1
        self._fetched_bytes += size
        self.fail.hit("after_poll")
        task = asyncio.get_running_loop().create_task(self._handle(tp, batch, records, size))
        self.delivery.track(batch, task)
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    # ------------------------------------------------------------------------------------ handling
    async def _handle(self, tp: TopicPartition, batch: Batch, records: list, size: int) -> None:
        spans = publishing = None
        if self.tracing is not None:
            spans = self.tracing.messages(tp.topic, tp.partition, records, time.time_ns())
        try:
            outputs, answered, fresh = await self._outputs(tp, records, spans)
            if spans is not None:
                out_topic = self.s.topics.output
                now_ns = time.time_ns()
                for i, o in enumerate(outputs):
                    if o.topic == out_topic:
                        self.tracing.continue_in(spans[i], o.headers)
                        if self.task.kind == "generate" and isinstance(a := answered[2][i], Generation) and not a.cached:
                            self.tracing.generation(spans[i], a, now_ns)
                publishing = [self.tracing.publish(out_topic, spans, len(outputs))]
            if self.fail:
                for _ in records:
                    self.fail.hit("after_inference")
                await self.fail.stall()
            t0 = time.perf_counter()
            await self.delivery.publish(batch, outputs)  # acknowledged (exactly-once: committed)
            self.slo.record_stage("publish", time.perf_counter() - t0, len(records))
            self._count(answered)
            if spans is not None:
                self.tracing.end(publishing)
                self.tracing.end(spans)
                spans = None
            if fresh:
                await self.cache.put_many(fresh)
        except PartitionClosed:
            pass  # revoked or failed: not published, not committed; whoever owns it next reads it again
        finally:
            if spans is not None:  # not published: the spans say so
                self.tracing.end(publishing or (), error="not_published")
                self.tracing.end(spans, error="not_published")
            self.delivery.settle(batch)
            self.inflight -= len(records)
            self.inflight_bytes -= size

    async def _outputs(self, tp: TopicPartition, records: list, spans: list | None = None) -> tuple[list[Output], tuple, list]:
        """One poll batch → one output per record, in order: decode, cache, one scheduler call for the misses."""
        w, task = self.s.worker, self.task
        poll_ms = now_ms()
        objective = self.s.slo.objective_ms
        events: list[Event | BadEvent] = []
        deadlines: list[float] = []
        queued = 0
        prefix = f"{tp.topic}-{tp.partition}-"
        decoded = None
        if self.decoder is not None:  # Schema Registry formats: the batch's schemas first (an outage waits here)
            decoded = await self.decoder.decode_many(
                [None if isinstance(r, Unreadable) or len(r.value or b"") > w.max_bytes else r.value for r in records])
        for n, r in enumerate(records):
            if isinstance(r, Unreadable):
                events.append(BadEvent(r.reason))
                deadlines.append(0.0)
                continue
            try:
                if decoded is None:
                    events.append(decode_event(r.value, default_id=prefix + str(r.offset), record_ts_ms=r.timestamp,
                                               key=r.key, headers=r.headers or (), max_bytes=w.max_bytes,
                                               max_chars=w.max_chars))
                elif r.value is not None and len(r.value) > w.max_bytes:
                    raise BadEvent(f"oversized: value is {len(r.value)} bytes, the cap is {w.max_bytes}")
                elif isinstance(decoded[n], BadEvent):
                    raise decoded[n]
                else:
                    events.append(event_from_fields(decoded[n], default_id=prefix + str(r.offset),
                                                    record_ts_ms=r.timestamp, key=r.key, headers=r.headers or (),
                                                    max_chars=w.max_chars))
            except BadEvent as bad:
                events.append(bad)
            queued += poll_ms - r.timestamp
            deadlines.append(((self.records.deadline(r.headers) if r.headers else None)
                              or r.timestamp + objective) / 1000.0)
        self.slo.record_stage("queue", max(0.0, queued / len(records) / 1000.0), len(records))

        good = [i for i, e in enumerate(events) if isinstance(e, Event)]
        answers: list = [None] * len(records)
        waits: list[float] = [0.0] * len(records)
        misses = good
        keys: dict[int, str] = {}
        texts = {i: task.text(events[i]) for i in good}
        if self.follower is not None:
            self.follower.recent.extend(texts.values())
        namespace = task.cache_namespace
        routed: list[int] = []  # a canary's keys (pipeline/swap.py): its model answers them, never the cache
        if self.follower is not None and task.canary is not None and good:
            share = task.canary_share
            routed = [i for i in good if key_share(events[i].key or events[i].id.encode()) < share]
        lookup = [i for i in good if i not in set(routed)] if routed else good
        misses = lookup
        if self.caching and lookup:
            keys = {i: cache_key(namespace, texts[i]) for i in lookup}
            t0 = time.perf_counter()
            cached = await self.cache.get_many(list(keys.values()))
            self.slo.record_stage("cache", time.perf_counter() - t0, len(lookup))
            self.cache_lookups += len(lookup)
            misses = []
            for i, hit in zip(lookup, cached):
                if hit is None:
                    misses.append(i)
                else:
                    answers[i] = hit
            self.cache_hits += len(lookup) - len(misses)
        calls = []
        if misses:
            trace = None if spans is None else [spans[i].get_span_context() for i in misses]
            calls.append((misses, self.batcher.submit_many([texts[i] for i in misses], [deadlines[i] for i in misses],
                                                           trace=trace)))
        if routed:
            calls.append((routed, task.canary_scheduler.submit_many([texts[i] for i in routed],
                                                                    [deadlines[i] for i in routed])))
        for idx, fut in calls:
            got = await fut
            for i, a, wt in zip(idx, got.results, got.waits):
                answers[i] = a
                waits[i] = wt

        if self.follower is not None and task.shadow is not None and good:
            tags = [(records[i].key, events[i]) for i in good] if self.shadow_out is not None else None
            slack = min(deadlines[i] for i in good) - time.time()
            task.shadow.offer([texts[i] for i in good], [answers[i] for i in good], self.batcher, tags, slack)
        if keys and task.cache_namespace != namespace:
            keys = {}  # the model was swapped meanwhile: these keys name the old version, the answers may be the new's
        outputs: list[Output] = []
        answered: list[int] = []  # record timestamps of the answered events
        dlq_reasons: list[str] = []
        fresh: list = []
        now = now_ms()
        for i, (r, ev) in enumerate(zip(records, events)):
            a = answers[i]
            if isinstance(a, EngineFailure):
                ev = BadEvent(a.reason)
            if isinstance(ev, Event):
                if i in keys and not a.cached and task.cacheable(a):  # computed by the engine, a normal answer: write back
                    fresh.append((keys[i], a))
                outputs.append(self.records.answer(tp, r, ev, a, now, waits[i]))
                answered.append(r.timestamp)
            else:
                outputs.append(self.records.dead_letter(tp, r, ev.reason))
                dlq_reasons.append(ev.reason)
        return outputs, (answered, dlq_reasons, answers), fresh

    def _count(self, answered: tuple[list[int], list[str], list]) -> None:
        """Counters and latency for one published batch (one metric call per kind, not per record)."""
        labelled, reasons, _ = answered
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

    # ------------------------------------------------------------------------------------ commits and fetching
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
        """Adaptive fetching (``kafka.fetch_min_bytes = 0``): see ``pipeline.kafka.fetch_params``. The worker polls
        eagerly to keep the scheduler fed, so without this every fetch returns the one record that arrived since
        the last: a fetch request and response per record, most of the worker's CPU outside the engine at
        moderate load."""
        k = self.s.kafka
        records, size = self._fetched - self._fetched_seen, self._fetched_bytes - self._fetched_bytes_seen
        self._fetched_seen, self._fetched_bytes_seen = self._fetched, self._fetched_bytes
        gather = K.gather_ms(k.fetch_gather_ms, self.batcher.call_seconds, self.s.slo.objective_ms)
        K.set_fetch_params(self.consumer, *K.fetch_params(records / span_s, size / records if records else 0.0, gather,
                                                          k.fetch_max_wait_ms))

    # ------------------------------------------------------------------------------------ rebalance
    async def _on_revoked(self, revoked) -> None:
        for tp in revoked:
            self.expect.pop(tp, None)
            self.health.forget(tp)
        revoked = [tp for tp in revoked if tp in self.delivery.parts]
        if not revoked:
            return
        await self.delivery.revoke(revoked, time.monotonic() + self.s.worker.drain_timeout_s)
        self.log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def _on_assigned(self, assigned) -> None:
        for tp in assigned:
            self.expect.pop(tp, None)
        if self.paused and assigned:
            self.consumer.pause(*assigned)
        await self.delivery.assign(assigned)
        self.ready.set()
        self.log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

