"""The alerting worker: label topic → windowed rules (pipeline/alerts.py) → alert topic (+ optional webhook).

It commits through the delivery protocol (``consumers/delivery.py``, at-least-once), whose commit step first
saves each partition's state (windows, open incidents) to Redis with the offset it belongs to, then commits
that offset: state and offsets move together, as Quix Streams' checkpoint flushes state before it commits. On
assignment the worker restores the state and seeks to its offset, so a restart neither re-fires nor forgets an
open incident. Label events are keyed by entity (the input key), so each alerting worker sees all events of
its entities.

Start-up checks, each a one-line ``ConfigError``: Redis answers (and takes the password), the label topic
exists, the alert topic exists (or is created with ``topics.create``), the broker is reachable. A Redis
failure later stops the worker (state could no longer be saved before a commit) with one line, exit 1.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from urllib.parse import urlsplit

import orjson
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from consumers.delivery import AtLeastOnce, Output
from pipeline import kafka as K
from pipeline import logs
from pipeline.alerts import AlertEngine
from pipeline.config import Settings
from pipeline.errors import ConfigError, StreamlabelError
from pipeline.redis_client import redis_client, safe_url

REDIS_TIMEOUT_S = 5.0
COMMIT_INTERVAL_S = 0.2  # state saves and offset commits, at most this often
REVOKE_S = 10.0  # the drain deadline when partitions are revoked or the worker stops


class _Listener(ConsumerRebalanceListener):
    def __init__(self, w: AlertingWorker) -> None:
        self.w = w

    # aiokafka logs and swallows a listener's exception; the worker must not run on without its state.
    async def on_partitions_revoked(self, revoked):
        try:
            await self.w.delivery.revoke(list(revoked), time.monotonic() + REVOKE_S)
        except Exception as exc:  # noqa: BLE001
            self.w._fail(exc)
        for tp in revoked:
            self.w.engines.pop(tp, None)
            self.w.pending.pop(tp, None)

    async def on_partitions_assigned(self, assigned):
        try:
            await self.w.delivery.assign(assigned)
            await self.w._restore(assigned)
        except Exception as exc:  # noqa: BLE001
            self.w._fail(exc)


class AlertingWorker:
    def __init__(self, settings: Settings, name: str = "alerts-0") -> None:
        self.s = settings
        self.a = settings.alerting
        self.topic_in = self.a.input or settings.topics.output
        self.name = name
        self.engines: dict[TopicPartition, AlertEngine] = {}
        self.pending: dict[TopicPartition, tuple[int, bytes]] = {}  # state to save with the next commit: (offset, state)
        self.log = logs.get("streamlabel.alerting").bind(worker=name)
        self.fired = 0
        self.resolved = 0
        self.invalid_states = 0  # saved states that could not be read (dropped)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._redis = None
        self._webhook_tasks: set[asyncio.Task] = set()
        self.consumer = None
        self.delivery: AtLeastOnce | None = None
        if not self.a.rules:
            raise ConfigError("no alert rules configured", where="alerting.rules",
                              hint="add [[alerting.rules]] tables to the config; docs/operations/alerting.md has examples")
        if settings.format.output != "json" and (self.a.input or settings.topics.output) == settings.topics.output:
            raise ConfigError(f"the alerting worker reads JSON label records, and format.output is "
                              f"{settings.format.output!r}", where="[format] output",
                              hint="run the alerts with a config whose [format] output is json (the label workers "
                                   "may keep theirs: alerting.input can name a JSON copy of the label topic)")
        if self.a.state_redis_url:
            c = settings.cache  # the same password and TLS settings as the prediction cache
            self._redis = redis_client(self.a.state_redis_url, password=c.redis_password, tls=c.redis_tls,
                                       ca_file=c.redis_ca_file, timeout_s=REDIS_TIMEOUT_S,
                                       where="alerting.state_redis_url")

    def stop(self) -> None:
        self._stop.set()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self.stop()

    def _key(self, tp: TopicPartition) -> str:
        return f"streamlabel:alerting:{self.a.group_id}:{tp.topic}:{tp.partition}"

    async def _restore(self, assigned) -> None:
        for tp in assigned:
            eng = AlertEngine(self.a.rules, self.a.lateness_s)
            if self._redis is not None:
                raw = await self._redis.get(self._key(tp))
                if raw:
                    try:  # saved state is untrusted input too: a damaged one is dropped, not a crash loop
                        snap = orjson.loads(raw)
                        offset = snap["offset"]
                        if type(offset) is not int or offset < 0:
                            raise ValueError(f"offset {offset!r}")
                        eng.restore(snap["state"])
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                        self.invalid_states += 1
                        eng = AlertEngine(self.a.rules, self.a.lateness_s)
                        self.log.warning("alert_state_invalid", partition=tp.partition, error=str(exc)[:160],
                                         note="starting this partition with empty windows from the committed offset")
                    else:
                        self.consumer.seek(tp, offset)
            self.engines[tp] = eng
        self.ready.set()
        self.log.info("alerting_assigned", partitions=sorted(tp.partition for tp in assigned))

    async def _save_states(self, offsets: dict[TopicPartition, int]) -> None:
        """The commit protocol's first step: each partition's state, with the offset about to be committed, to
        Redis (one pipelined write). Raises if Redis fails: then nothing is committed."""
        if self._redis is None:
            return
        states = {tp: st for tp, off in offsets.items() if (st := self.pending.get(tp)) and st[0] == off}
        if not states:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for tp, (off, state) in states.items():
                pipe.set(self._key(tp), b'{"offset":%d,"state":%s}' % (off, state))
            await pipe.execute()
        for tp, st in states.items():
            if self.pending.get(tp) is st:
                del self.pending[tp]

    async def run(self) -> None:
        """Check Redis and the topics, then read labels and publish alerts until ``stop()``."""
        k = self.s.kafka
        started = False
        try:
            await self._check_redis()
            await K.check_topics(self.s, {"label": self.topic_in, "alert": self.a.output}, create=self.s.topics.create,
                                 partitions=self.s.topics.partitions,
                                 replication_factor=self.s.topics.replication_factor)
            self.consumer = K.consumer(self.s, group_id=self.a.group_id, auto_offset_reset="earliest",
                                       session_timeout_ms=k.session_timeout_ms)
            self.delivery = AtLeastOnce(self.consumer, K.producer(self.s), make_producer=lambda: K.producer(self.s),
                                        group_id=self.a.group_id, commit_interval_s=COMMIT_INTERVAL_S, log=self.log,
                                        before_commit=self._save_states)
            try:
                await self.delivery.start_clients()
                self.consumer.subscribe([self.topic_in], listener=_Listener(self))
                await self.consumer.start()
            except (KafkaError, OSError) as exc:
                raise K.connection_error(self.s, exc) from None
            started = True
            self.log.info("alerting_started", input=self.topic_in, output=self.a.output, rules=len(self.a.rules))
            await self._loop()
            if self._failure is None:
                await self.delivery.close(time.monotonic() + REVOKE_S)
            if self._failure is not None:
                raise self._failure
        except Exception as exc:
            if _is_redis_error(exc):
                raise redis_error(self.a.state_redis_url or "", exc, self._has_password(), running=True) from None
            raise
        finally:
            if self.delivery is not None and self._failure is not None:
                await self.delivery.abandon(time.monotonic() + 5)
            if self._webhook_tasks:  # alerts already published: their webhook calls get their retries
                await asyncio.wait(self._webhook_tasks, timeout=self.a.webhook_timeout_s * (self.a.webhook_retries + 1))
            if self.consumer is not None:
                await self.consumer.stop()
            if self.delivery is not None:
                await self.delivery.stop_clients(time.monotonic() + 5)
            if self._redis is not None:
                await self._redis.aclose()
            if started:
                self.log.info("alerting_stopped", fired=self.fired, resolved=self.resolved,
                              invalid_events=sum(e.invalid for e in self.engines.values()),
                              invalid_states=self.invalid_states)

    async def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=200, max_records=1000)
            for tp, records in batches.items():
                eng = self.engines.get(tp)
                batch = self.delivery.admit(tp, records) if eng is not None and records else None
                if batch is None:
                    continue
                try:
                    alerts = []
                    for r in records:
                        try:
                            ev = orjson.loads(r.value)
                        except (orjson.JSONDecodeError, TypeError):
                            continue  # not a label event: the label topic's producer owns its schema
                        if isinstance(ev, dict):
                            alerts += eng.observe(ev)
                    alerts += eng.advance()
                    await self.delivery.publish(batch, [Output(self.a.output, str(al["entity"]).encode(),
                                                               orjson.dumps(al), []) for al in alerts])
                    self.pending[tp] = (records[-1].offset + 1, orjson.dumps(eng.snapshot()))
                    self._announce(alerts)
                finally:
                    self.delivery.settle(batch)
            now = time.monotonic()
            if now - last >= COMMIT_INTERVAL_S:
                await self.delivery.tick()  # state saved, then offsets committed (see _save_states)
                last = now

    def _announce(self, alerts: list[dict]) -> None:
        for al in alerts:
            if al["status"] == "firing":
                self.fired += 1
            else:
                self.resolved += 1
            self.log.info("alert", status=al["status"], rule=al["rule"], entity=al["entity"], value=al["value"])
        if alerts and self.a.webhook_url:
            task = asyncio.get_running_loop().create_task(self._webhooks(alerts))
            self._webhook_tasks.add(task)
            task.add_done_callback(self._webhook_tasks.discard)

    async def _webhooks(self, alerts: list[dict]) -> None:
        await asyncio.gather(*(asyncio.to_thread(self._post, al) for al in alerts))

    def _has_password(self) -> bool:
        return bool(self.s.cache.redis_password or urlsplit(self.a.state_redis_url or "").password)

    async def _check_redis(self) -> None:
        if self._redis is None:
            return
        try:
            await asyncio.wait_for(self._redis.ping(), REDIS_TIMEOUT_S * 2)
        except Exception as exc:
            if _is_redis_error(exc) or isinstance(exc, (OSError, asyncio.TimeoutError)):
                raise redis_error(self.a.state_redis_url, exc, self._has_password()) from None
            raise

    def _post(self, alert: dict) -> bool:
        body = orjson.dumps(alert)
        for attempt in range(self.a.webhook_retries + 1):
            try:
                req = urllib.request.Request(self.a.webhook_url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.a.webhook_timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        return True
            except OSError as exc:
                self.log.warning("webhook_failed", attempt=attempt + 1, error=type(exc).__name__)
            if attempt < self.a.webhook_retries:
                time.sleep(min(5.0, 0.2 * 2 ** attempt))  # retry backoff (worker thread, not the event loop)
        return False


def _is_redis_error(exc: BaseException) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.RedisError)


def redis_error(url: str, exc: BaseException, has_password: bool, *, running: bool = False) -> StreamlabelError:
    """One line for a Redis failure: which Redis (no password), what went wrong, what to check."""
    import os
    import re

    import redis.exceptions

    where, shown = "alerting.state_redis_url", safe_url(url)
    text = str(exc).strip()
    errno = re.match(r"Error (\d+) connecting", text)
    why = os.strerror(int(errno.group(1))).lower() if errno else (text.split(". ")[0] or type(exc).__name__)[:160]
    if isinstance(exc, redis.exceptions.AuthenticationError):
        if has_password:
            return ConfigError(f"Redis at {shown} refused the password", where=where,
                               hint="check cache.redis_password or STREAMLABEL_CACHE__REDIS_PASSWORD")
        return ConfigError(f"Redis at {shown} needs a password", where=where,
                           hint="set cache.redis_password or STREAMLABEL_CACHE__REDIS_PASSWORD")
    if running:
        return StreamlabelError(f"lost Redis at {shown}: {why}", where=where,
                                hint="nothing was committed past the state Redis holds; "
                                     "start `alerts run` again when Redis is back")
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, asyncio.TimeoutError)):
        return ConfigError(f"cannot reach Redis at {shown}: {why or 'timed out'}", where=where,
                           hint="is redis-server running? check the URL; 'none' runs without saved state")
    return ConfigError(f"Redis at {shown}: {type(exc).__name__}: {why}", where=where,
                       hint="check alerting.state_redis_url and the cache.redis_* settings")
