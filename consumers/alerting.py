"""The alerting worker: label topic → windowed rules (pipeline/alerts.py) → alert topic (+ optional webhook).

State (windows, open incidents) lives per input partition and is saved to Redis together with the next
offset after every batch, before the offsets are committed; on assignment the worker restores it and seeks
to the saved offset, so a restart neither re-fires nor forgets an open incident. Label events are keyed by
entity (the input key), so each alerting worker sees all events of its entities.

Start-up checks, each a one-line ``ConfigError``: Redis answers (and takes the password), the label topic
exists, the alert topic exists (or is created with ``topics.create``), the broker is reachable. A Redis
failure later stops the worker (state could no longer be saved before a commit) with one line, exit 1.
"""

from __future__ import annotations

import asyncio
import urllib.request
from urllib.parse import urlsplit

import orjson
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from pipeline import kafka as K
from pipeline import logs
from pipeline.alerts import AlertEngine
from pipeline.config import Settings
from pipeline.errors import ConfigError, StreamlabelError
from pipeline.redis_client import redis_client, safe_url

REDIS_TIMEOUT_S = 5.0


class _Listener(ConsumerRebalanceListener):
    def __init__(self, w: AlertingWorker) -> None:
        self.w = w

    async def on_partitions_revoked(self, revoked):
        for tp in revoked:
            self.w.engines.pop(tp, None)

    async def on_partitions_assigned(self, assigned):
        # aiokafka logs and swallows a listener's exception; the worker must not run on without its state.
        try:
            await self.w._restore(assigned)
        except Exception as exc:
            self.w._failure = exc
            self.w.stop()


class AlertingWorker:
    def __init__(self, settings: Settings, name: str = "alerts-0") -> None:
        self.s = settings
        self.a = settings.alerting
        self.topic_in = self.a.input or settings.topics.output
        self.name = name
        self.engines: dict[TopicPartition, AlertEngine] = {}
        self.log = logs.get("streamlabel.alerting").bind(worker=name)
        self.fired = 0
        self.resolved = 0
        self.invalid_states = 0  # saved states that could not be read (dropped)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._redis = None
        self.consumer = self.producer = None
        if not self.a.rules:
            raise ConfigError("no alert rules configured", where="alerting.rules",
                              hint="add [[alerting.rules]] tables to the config; the README has examples")
        if self.a.state_redis_url:
            c = settings.cache  # the same password and TLS settings as the prediction cache
            self._redis = redis_client(self.a.state_redis_url, password=c.redis_password, tls=c.redis_tls,
                                       ca_file=c.redis_ca_file, timeout_s=REDIS_TIMEOUT_S,
                                       where="alerting.state_redis_url")

    def stop(self) -> None:
        self._stop.set()

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
            self.producer = K.producer(self.s)
            try:
                await self.producer.start()
                self.consumer.subscribe([self.topic_in], listener=_Listener(self))
                await self.consumer.start()
            except (KafkaError, OSError) as exc:
                raise K.connection_error(self.s, exc) from None
            started = True
            self.log.info("alerting_started", input=self.topic_in, output=self.a.output, rules=len(self.a.rules))
            await self._loop()
            if self._failure is not None:
                raise self._failure
        except Exception as exc:
            if _is_redis_error(exc):
                raise redis_error(self.a.state_redis_url or "", exc, self._has_password(), running=True) from None
            raise
        finally:
            if self.consumer is not None:
                await self.consumer.stop()
            if self.producer is not None:
                await self.producer.stop()
            if self._redis is not None:
                await self._redis.aclose()
            if started:
                self.log.info("alerting_stopped", fired=self.fired, resolved=self.resolved)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            batches = await self.consumer.getmany(timeout_ms=200, max_records=1000)
            for tp, records in batches.items():
                eng = self.engines.get(tp)
                if eng is None or not records:
                    continue
                alerts = []
                for r in records:
                    try:
                        ev = orjson.loads(r.value)
                    except (orjson.JSONDecodeError, TypeError):
                        continue  # not a label event: the label topic's producer owns its schema
                    if isinstance(ev, dict):
                        alerts += eng.observe(ev)
                alerts += eng.advance()
                await self._publish(alerts)
                nxt = records[-1].offset + 1
                if self._redis is not None:
                    await self._redis.set(self._key(tp), orjson.dumps({"offset": nxt, "state": eng.snapshot()}))
                await self.consumer.commit({tp: nxt})

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

    async def _publish(self, alerts: list[dict]) -> None:
        if not alerts:
            return
        futs = [await self.producer.send(self.a.output, orjson.dumps(al), key=str(al["entity"]).encode())
                for al in alerts]
        await asyncio.gather(*futs)
        for al in alerts:
            if al["status"] == "firing":
                self.fired += 1
            else:
                self.resolved += 1
            self.log.info("alert", status=al["status"], rule=al["rule"], entity=al["entity"], value=al["value"])
        if self.a.webhook_url:
            await asyncio.gather(*(asyncio.to_thread(self._post, al) for al in alerts))

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
                import time

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
