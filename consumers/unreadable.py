"""Records the Kafka client cannot parse (a header key that is not UTF-8, a corrupt batch): found, dead-lettered by
their coordinates, skipped; the partition goes on.

aiokafka cannot iterate a record batch past a record it cannot parse, so the records of the same producer batch
from that one on are dead-lettered too (value not available to this client; the reason says how to read them
with kcat). Records before it are labelled as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from aiokafka import TopicPartition
from aiokafka.errors import CorruptRecordException, IllegalStateError, KafkaError

from pipeline import kafka as K
from pipeline.errors import OffsetReadTimeout
from pipeline.events import now_ms

UNREADABLE_MAX = 10_000  # offsets dead-lettered at once for one unreadable producer batch


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A record the Kafka client could not parse: only its coordinates are known."""

    offset: int
    reason: str
    timestamp: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple = ()


class Recovery:
    """Finds the unreadable record after a failed fetch and hands it (with what could be read) to ``take``.

    ``poll(tp, timeout_ms=, max_records=)`` polls one partition (None: the worker is stopping); ``take(tp,
    records)`` admits records as a poll would; ``expect`` is the worker's next offset not taken per partition.
    """

    def __init__(self, consumer, *, poll: Callable[..., Awaitable[dict | None]], take: Callable[[TopicPartition, list], None],
                 expect: dict[TopicPartition, int], auto_offset_reset: str, stopping: Callable[[], bool], log) -> None:
        self.consumer = consumer
        self.poll = poll
        self.take = take
        self.expect = expect
        self.auto_offset_reset = auto_offset_reset
        self.stopping = stopping
        self.log = log
        self.unreadable = 0  # records dead-lettered by their coordinates

    async def recover(self, exc: BaseException, open_partitions: list[TopicPartition]) -> bool:
        """After ``getmany`` raised ``exc`` while parsing: True once the unreadable record is dead-lettered."""
        loc = K.locate_unparsable(exc)
        await self._rewind(skip=loc[0] if loc else None)
        for tp in [loc[0]] if loc else open_partitions:
            if await self._step_to_unreadable(tp):
                return True
        return False

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
                if tp in self.expect:
                    self.consumer.seek(tp, self.expect[tp])
                    continue
                c = await K.committed(self.consumer, tp, K.START_TIMEOUT_S)
                if c is not None:
                    self.consumer.seek(tp, c)
                elif self.auto_offset_reset == "earliest":
                    await self.consumer.seek_to_beginning(tp)
            except (IllegalStateError, KafkaError, OffsetReadTimeout) as exc:
                self.log.warning("rewind_failed", partition=tp.partition, error=type(exc).__name__)

    async def _step_to_unreadable(self, tp: TopicPartition) -> bool:
        for _ in range(100_000):
            if self.stopping():
                return True
            try:
                got = await self.poll(tp, timeout_ms=2000, max_records=1)
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
                        self.take(tp2, recs)
                continue
            loc = K.locate_unparsable(err)
            pos = await self.consumer.position(tp)
            first = max(pos, loc[1]) if loc and loc[0] == tp else pos
            last = max(first, min(loc[2] - 1, first + UNREADABLE_MAX - 1)) if loc and loc[0] == tp else first
            why = f"{type(err).__name__}: {str(err)[:160]}"
            recs = [Unreadable(o, f"unreadable: the Kafka client cannot parse this record or the rest of its producer "
                                  f"batch ({why}); value not available here: kcat -C -t {tp.topic} -p {tp.partition} "
                                  f"-o {o} -c 1", timestamp=now_ms())
                    for o in range(first, last + 1)]
            self.unreadable += len(recs)
            self.log.error("unreadable_records", topic=tp.topic, partition=tp.partition, offsets=f"{first}-{last}",
                           error=why, note="dead-lettered by offset and skipped; the partition goes on")
            self.consumer.seek(tp, last + 1)
            self.take(tp, recs)
            self.expect[tp] = last + 1
            return True
        return False  # 100,000 readable records stepped through and no failure: let the caller decide

