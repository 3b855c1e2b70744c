"""Delivery state, no I/O: the poll batches taken from a partition, what may be committed, the partition's
lifecycle, the open transaction's contents, and the records to publish."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from aiokafka import TopicPartition

from pipeline.errors import PartitionClosed


@dataclass(eq=False, slots=True)
class Batch:
    """One poll batch of one partition: offsets ``first``..``last`` (``size`` records, maybe with gaps)."""

    first: int
    last: int
    size: int
    done: bool = False
    failed: bool = False
    settled: bool = False
    prev: asyncio.Future | None = None  # the previous batch's turn: resolved once its outputs are sent
    turn: asyncio.Future | None = None  # this batch's turn, resolved by ``release_turn``
    owner: Partition | None = None  # the partition incarnation it was taken from (not a later re-assignment)

    def release_turn(self) -> None:
        if self.turn is not None and not self.turn.done():
            self.turn.set_result(None)


class OffsetTracker:
    """What was taken from one partition, what is done, and what may be committed. No I/O.

    Invariant (checked by a property test): ``committable()`` never reaches past the first offset of a
    batch that is not done, so no offset is committed before its outputs are durable, and nothing at or
    after a failed batch is ever committed by this tracker (the latch). Done batches at the head are
    folded into ``done_upto`` as they complete, so memory is bounded by the batches in flight.
    """

    __slots__ = ("_open", "_done_upto", "_committed", "failure", "inflight")

    def __init__(self) -> None:
        self._open: deque[Batch] = deque()
        self._done_upto: int | None = None  # one past the last offset of the done prefix
        self._committed: int | None = None
        self.failure: str | None = None
        self.inflight = 0  # records in batches neither done nor failed

    def take(self, first: int, last: int, size: int) -> Batch:
        tail = self._open[-1].last if self._open else (self._done_upto - 1 if self._done_upto is not None else -1)
        if first <= tail or last < first:
            raise ValueError(f"offsets must increase: batch {first}..{last} after {tail}")
        b = Batch(first, last, size)
        self._open.append(b)
        self.inflight += size
        return b

    def done(self, b: Batch) -> None:
        if b.done or b.failed:
            return
        b.done = True
        self.inflight -= b.size
        while self._open and self._open[0].done:
            self._done_upto = self._open.popleft().last + 1

    def fail(self, b: Batch, reason: str) -> None:
        if not (b.done or b.failed):
            b.failed = True
            self.inflight -= b.size
        if self.failure is None:
            self.failure = reason

    def committable(self) -> int | None:
        """The next offset to commit (one past the done prefix) if it is beyond the last commit, else None."""
        if self._done_upto is None or (self._committed is not None and self._done_upto <= self._committed):
            return None
        return self._done_upto

    def committed(self, offset: int) -> None:
        if self._committed is None or offset > self._committed:
            self._committed = offset

    def heads(self, batches: Sequence[Batch]) -> bool:
        """True when ``batches`` are exactly the oldest not-done batches, in order (a transaction may commit them)."""
        if len(batches) > len(self._open):
            return False
        return all(self._open[i] is b for i, b in enumerate(batches))

    def __len__(self) -> int:
        return len(self._open)


class Lifecycle(enum.Enum):
    STARTING = "starting"  # assigned; exactly-once: its producer is being initialised, nothing is read yet
    ASSIGNED = "assigned"
    REVOKING = "revoking"  # in-flight batches may still publish, until the revoke deadline
    REVOKED = "revoked"  # final: nothing is produced for it by this worker instance again
    FAILED = "failed"  # a publish or transaction failed: latched until the partition is re-read


# The only moves a partition makes (the diagram in the module docstring); ``Partition.move`` checks each.
_TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.STARTING: frozenset({Lifecycle.ASSIGNED, Lifecycle.REVOKING, Lifecycle.REVOKED, Lifecycle.FAILED}),
    Lifecycle.ASSIGNED: frozenset({Lifecycle.REVOKING, Lifecycle.FAILED, Lifecycle.REVOKED}),
    Lifecycle.REVOKING: frozenset({Lifecycle.REVOKED, Lifecycle.FAILED}),
    Lifecycle.FAILED: frozenset({Lifecycle.REVOKED}),
    Lifecycle.REVOKED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A partition asked to move where its lifecycle does not go: a bug in the protocol, not a runtime event."""


@dataclass(eq=False)
class _Txn:
    started: float
    batches: list[Batch] = field(default_factory=list)
    sent: list[tuple[Output, asyncio.Future]] = field(default_factory=list)  # in send order, with their acks
    waiters: list[asyncio.Future] = field(default_factory=list)
    dirty: bool = False  # a batch was cut off mid-send: this transaction may only be aborted


class Partition:
    """One assigned input partition: lifecycle, offset tracker, publish turns, handler tasks."""

    def __init__(self, tp: TopicPartition, state: Lifecycle = Lifecycle.ASSIGNED) -> None:
        self.tp = tp
        self.state = state
        self.tracker = OffsetTracker()
        self.tail: asyncio.Future | None = None  # the newest batch's turn
        self.tasks: set[asyncio.Task] = set()
        self.pending = 0  # batches admitted and not yet settled
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_offset = -1
        self.producer = None  # exactly-once: this partition's transactional producer
        self.lock = asyncio.Lock()  # exactly-once: sends and the commit of the open transaction take turns
        self.txn: _Txn | None = None
        self.committing: asyncio.Task | None = None  # exactly-once: the commit running for it, if any

    @property
    def open(self) -> bool:
        return self.state in (Lifecycle.ASSIGNED, Lifecycle.REVOKING)

    def move(self, to: Lifecycle) -> None:
        """Change state; every change goes through here and must be one ``_TRANSITIONS`` allows."""
        if to is self.state:
            return
        if to not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"partition {self.tp.partition}: {self.state.value} → {to.value}")
        self.state = to

    def check_open(self) -> None:
        if not self.open:
            raise PartitionClosed(f"partition {self.tp.partition} is {self.state.value}")

    def fail(self, batch: Batch | None, reason: str) -> None:
        if batch is not None:
            self.tracker.fail(batch, reason)
        elif self.tracker.failure is None:
            self.tracker.failure = reason
        if self.state is not Lifecycle.REVOKED:
            self.move(Lifecycle.FAILED)


class Output:
    """One record to publish. ``fallback`` is sent instead if the broker or client refuses it as too large.

    The fallback may be given as a function that builds it: it is then built only if it is needed.
    """

    __slots__ = ("topic", "key", "value", "headers", "_fallback")

    def __init__(self, topic: str, key: bytes | None, value: bytes, headers: list,
                 fallback: Output | Callable[[], Output] | None = None) -> None:
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self._fallback = fallback

    @property
    def fallback(self) -> Output | None:
        if callable(self._fallback):
            self._fallback = self._fallback()
        return self._fallback

    def __repr__(self) -> str:
        return f"Output(topic={self.topic!r}, key={self.key!r}, value={len(self.value)} bytes)"
