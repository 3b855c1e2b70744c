"""The alerting worker: label topic → windowed rules (pipeline/alerts.py) → alert topic (+ optional webhook).

State (windows, open incidents) lives per input partition and is saved to Redis together with the next
offset after every batch, before the offsets are committed; on assignment the worker restores it and seeks
to the saved offset, so a restart neither re-fires nor forgets an open incident. Label events are keyed by
entity (the input key), so each alerting worker sees all events of its entities.
"""

from __future__ import annotations

import asyncio
import urllib.request

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from pipeline import logs
from pipeline.alerts import AlertEngine
from pipeline.config import Settings
from pipeline.kafka import client_kwargs as kafka_client_kwargs
from pipeline.errors import ConfigError


class _Listener(ConsumerRebalanceListener):
    def __init__(self, w: AlertingWorker) -> None:
        self.w = w

    async def on_partitions_revoked(self, revoked):
        for tp in revoked:
            self.w.engines.pop(tp, None)

    async def on_partitions_assigned(self, assigned):
        await self.w._restore(assigned)


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
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._redis = None
        if self.a.state_redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.a.state_redis_url, password=settings.cache.redis_password or None)
        if not self.a.rules:
            raise ConfigError("no alert rules configured", hint="add [[alerting.rules]] tables to the config (README)")

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
                    snap = orjson.loads(raw)
                    eng.restore(snap["state"])
                    self.consumer.seek(tp, snap["offset"])
            self.engines[tp] = eng
        self.ready.set()
        self.log.info("alerting_assigned", partitions=sorted(tp.partition for tp in assigned))

    async def run(self) -> None:
        k = self.s.kafka
        kw = kafka_client_kwargs(k)
        self.consumer = AIOKafkaConsumer(**kw, group_id=self.a.group_id, enable_auto_commit=False,
                                         auto_offset_reset="earliest", isolation_level="read_committed",
                                         session_timeout_ms=k.session_timeout_ms)
        self.producer = AIOKafkaProducer(**kw, acks="all", enable_idempotence=True)
        try:
            await self.producer.start()
            self.consumer.subscribe([self.topic_in], listener=_Listener(self))
            await self.consumer.start()
        except (KafkaError, OSError) as exc:
            raise ConfigError(f"cannot connect to Kafka at {k.bootstrap_servers} ({exc})",
                              hint="check kafka.bootstrap_servers and the security settings") from None
        self.log.info("alerting_started", input=self.topic_in, output=self.a.output, rules=len(self.a.rules))
        try:
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
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            if self._redis is not None:
                await self._redis.aclose()
            self.log.info("alerting_stopped", fired=self.fired, resolved=self.resolved)

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


async def serve_alerting(settings: Settings, name: str = "alerts-0") -> int:
    import signal

    w = AlertingWorker(settings, name)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, w.stop)
    await w.run()
    return 0
