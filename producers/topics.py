"""Small Kafka helpers shared by the demo, the load-test harness and the tests: create, produce, read back.

Clients come from ``pipeline.kafka`` (so SASL/TLS settings apply). ``s`` is a bootstrap string, a
``KafkaSettings`` or a ``Settings``; extra keyword arguments are aiokafka client arguments that override
what the settings give (e.g. a test's ``ssl_context``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline import kafka as K
from pipeline.config import KafkaSettings, Settings

Conn = str | KafkaSettings | Settings


async def ensure_topics(s: Conn, names: Iterable[str], partitions: int = 4, configs: dict | None = None,
                        **client_kw) -> None:
    """Create whichever of ``names`` do not exist yet (``configs``: topic configs for the new ones)."""
    names = list(names)
    if not client_kw:
        await K.ensure_topics(s, names, partitions=partitions, configs=configs)
        return
    admin = K.admin(s, **client_kw)
    try:
        await asyncio.wait_for(admin.start(), K.START_TIMEOUT_S)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        await admin.close()
        raise K.connection_error(s, exc) from None
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})
               for n in names if n not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def produce(s: Conn, topic: str, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None,
                  **client_kw) -> list:
    """Send and wait for every ack; returns the record metadata (partition, offset, timestamp)."""
    p = K.producer(s, **{"linger_ms": 5, **client_kw})
    await p.start()
    try:
        futs = [await p.send(topic, value=v, key=(keys[i] if keys else None)) for i, v in enumerate(values)]
        return list(await asyncio.gather(*futs))
    finally:
        await p.stop()


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple
    timestamp: int


async def read_until(s: Conn, topics: Sequence[str], done: Callable[[list[Record]], bool], timeout: float,
                     *, isolation_level: str = "read_uncommitted", **client_kw) -> list[Record]:
    """Read ``topics`` from the beginning until ``done(records)`` or the timeout; returns what was read."""
    c = K.consumer(s, *topics, group_id=None, **{"auto_offset_reset": "earliest",
                                                 "isolation_level": isolation_level, **client_kw})
    await c.start()
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=100)
            for tp, recs in batch.items():
                out += [Record(tp.topic, tp.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                        for r in recs]
            if done(out):
                break
    finally:
        await c.stop()
    return out


async def end_offsets(s: Conn, topic: str, **client_kw) -> dict[int, int]:
    """Each partition's high watermark (``read_uncommitted``: transactional markers count)."""
    # Subscribed to the topic (no group: every partition assigned), so start() brings its metadata.
    c = K.consumer(s, topic, group_id=None, **{"isolation_level": "read_uncommitted", **client_kw})
    await c.start()
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await c.end_offsets(tps) if tps else {}
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await c.stop()


async def committed(s: Conn, group: str, topic: str, partitions: int, **client_kw) -> dict[int, int | None]:
    c = K.consumer(s, group_id=group, **client_kw)
    await c.start()
    try:
        return {p: await c.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await c.stop()


async def topic_names(s: Conn, **client_kw) -> set[str]:
    """The topics the broker has (tests check that a check did not create one)."""
    admin = K.admin(s, **client_kw)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
