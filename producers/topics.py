"""Small Kafka helpers shared by the demo, the load-test harness and the tests: create, produce, read back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int = 4, configs: dict | None = None,
                        **client_kw) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kw)
    await admin.start()
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


async def produce(bootstrap: str, topic: str, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None,
                  **client_kw) -> list:
    """Send and wait for every ack; returns the record metadata (partition, offset, timestamp)."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **client_kw)
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


async def read_until(bootstrap: str, topics: Sequence[str], done: Callable[[list[Record]], bool], timeout: float,
                     *, isolation_level: str = "read_uncommitted", **client_kw) -> list[Record]:
    """Read ``topics`` from the beginning until ``done(records)`` or the timeout; returns what was read."""
    c = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False, isolation_level=isolation_level, **client_kw)
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


async def end_offsets(bootstrap: str, topic: str, **client_kw) -> dict[int, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, **client_kw)
    await c.start()
    try:
        parts = c.partitions_for_topic(topic) or set()
        if not parts:
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await c.end_offsets(tps) if tps else {}
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await c.stop()


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {p: await c.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await c.stop()
