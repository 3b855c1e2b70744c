"""Delivery: publish each poll batch's outputs in partition order, then commit its input offsets.

Three parts, each small enough to check by reading it:

- ``OffsetTracker`` (state only, no I/O): the poll batches taken from one partition, which are done
  (outputs durable) or failed, and the offset that may be committed: one past the longest done prefix.
  It is never destructive: asking what may be committed changes nothing, so a failed commit is retried
  with the same offset, and a failed batch stops the prefix for good (the failure latch).
- ``AtLeastOnce`` and ``ExactlyOnce``: the two protocols, each with its steps in its docstring.
- ``Partition``: the lifecycle every protocol checks before producing anything for a partition:

      STARTING ──► ASSIGNED ──► REVOKING ──► REVOKED
                       │                        ▲
                       └──► FAILED ─────────────┘   (a failed publish or transaction; latched)

  Only ASSIGNED and REVOKING partitions produce. REVOKED is final for this worker instance: a handler that
  outlives its partition's revoke deadline is cancelled and, should it still reach ``publish``, is refused.

Batches of one partition publish strictly in the order they were polled (a chain of "turns"), so the
outputs of one key keep the input order. The worker calls ``admit`` when it polls records, ``publish``
when their outputs are ready, and ``settle`` in its ``finally``; everything else happens here.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
)

from pipeline import logs
from pipeline.failpoints import InjectedFault
from pipeline.kafka import committed as read_committed

SEND_RETRIES = 5
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# After the broker refuses a batch, the idempotent producer's later batches of that partition are out of order.
_SEQUENCE_SPENT = _TOO_LARGE + (OutOfOrderSequenceNumber,)


# ---------------------------------------------------------------------------------------------- errors
class PartitionClosed(Exception):
    """The partition is revoked or failed: this batch is not published (the next owner re-reads it)."""


class DeliveryFailed(Exception):
    """A publish or a transaction failed. Retriable: the worker stops uncommitted and a restart re-reads."""


# ---------------------------------------------------------------------------------------------- state
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

    def check_open(self) -> None:
        if not self.open:
            raise PartitionClosed(f"partition {self.tp.partition} is {self.state.value}")

    def fail(self, batch: Batch | None, reason: str) -> None:
        if batch is not None:
            self.tracker.fail(batch, reason)
        elif self.tracker.failure is None:
            self.tracker.failure = reason
        if self.state is not Lifecycle.REVOKED:
            self.state = Lifecycle.FAILED


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


# ---------------------------------------------------------------------------------------------- protocols
class _Protocol:
    """What both protocols share: the partitions, admission with publish turns, settle, revoke, close."""

    mode = "?"

    def __init__(self, consumer, *, group_id: str, commit_interval_s: float, log=None,
                 on_point: Callable[[str], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.consumer = consumer
        self.group_id = group_id
        self.commit_interval_s = commit_interval_s
        self.parts: dict[TopicPartition, Partition] = {}
        self.log = log or logs.get("streamlabel.delivery")
        self._point = on_point or (lambda _name: None)
        self._on_failure = on_failure
        self.failure: BaseException | None = None  # the first failure of a background commit
        self.commits = 0
        self.dropped_after_revoke = 0  # records whose handlers were cancelled at a revoke deadline
        self.refused = 0  # batches that reached publish after their partition was revoked or failed
        self.too_large = 0  # outputs the broker refused as too large (replaced by their fallbacks)

    def _report(self, exc: BaseException) -> None:
        """A failure of work running on its own (a commit task): to the supervisor, once."""
        if self.failure is None:
            self.failure = exc
        if self._on_failure is not None:
            self._on_failure(exc)

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, tp: TopicPartition, records: Sequence) -> Batch | None:
        """Take a poll batch: returns its ``Batch`` (with its publish turn), or None if the partition is not open."""
        part = self.parts.get(tp)
        if part is None or part.state is not Lifecycle.ASSIGNED:
            return None
        b = part.tracker.take(records[0].offset, records[-1].offset, len(records))
        b.owner = part
        b.prev, b.turn = part.tail, asyncio.get_running_loop().create_future()
        part.tail = b.turn
        part.pending += 1
        part.idle.clear()
        part.last_offset = records[-1].offset
        return b

    def track(self, batch: Batch, task: asyncio.Task) -> None:
        part = batch.owner
        part.tasks.add(task)
        task.add_done_callback(part.tasks.discard)

    def settle(self, batch: Batch) -> None:
        """The batch needs nothing more from its partition's drain (published, failed or abandoned). Idempotent."""
        batch.release_turn()
        if batch.settled:
            return
        batch.settled = True
        part = batch.owner
        part.pending -= 1
        if part.pending <= 0:
            part.idle.set()

    async def _await_turn(self, part: Partition, batch: Batch) -> None:
        if batch.prev is not None:
            await batch.prev
        if not part.open:
            self.refused += 1
            self.log.warning("publish_refused", partition=part.tp.partition, state=part.state.value,
                             offsets=f"{batch.first}-{batch.last}", note="not published; the owner re-reads them")
        part.check_open()

    async def _send_all(self, producer, outputs: Sequence[Output]) -> list[tuple[Output, asyncio.Future]]:
        """Enqueue every output in order; ``(output, ack future)`` each. The common case is one ``send`` per
        record; a refused or failing one takes ``_send`` (retries, the too-large fallback)."""
        send = producer.send
        sent = []
        for o in outputs:
            try:
                fut = await send(o.topic, value=o.value, key=o.key, headers=o.headers)
            except KafkaError:
                fut = await self._send(producer, o)
            sent.append((o, fut))
        return sent

    async def _send(self, producer, o: Output) -> asyncio.Future:
        """Enqueue one record (retrying a busy client); a record refused as too large is replaced by its fallback."""
        for attempt in range(SEND_RETRIES):
            try:
                return await producer.send(o.topic, value=o.value, key=o.key, headers=o.headers)
            except _TOO_LARGE as exc:
                if o.fallback is None:
                    raise DeliveryFailed(f"record for '{o.topic}' refused as too large: {exc!r}") from exc
                o = o.fallback
            except KafkaError as exc:
                if attempt == SEND_RETRIES - 1:
                    raise DeliveryFailed(f"cannot publish to '{o.topic}': {exc!r}") from exc
                await asyncio.sleep(0.2 * 2 ** attempt)  # backoff between retries, not synchronisation
        raise DeliveryFailed(f"cannot publish to '{o.topic}'")

    # -- lifecycle ---------------------------------------------------------------------------------
    async def assign(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            if tp not in self.parts or self.parts[tp].state is Lifecycle.REVOKED:
                self.parts[tp] = Partition(tp)

    async def revoke(self, tps: Iterable[TopicPartition], deadline: float) -> None:
        """Give partitions up within one deadline: drain, commit what is complete, cancel the rest, close.

        1. REVOKING: nothing new is admitted; batches in flight may still publish.
        2. Wait (until the deadline, less a reserve for steps 3-5) for every admitted batch to settle.
        3. REVOKED: from here nothing more is published for them (a handler mid-send finishes its batch first:
           the commit below waits for it), and commit what is complete (at-least-once: the done prefix;
           exactly-once: the open transaction, which releases the handlers waiting on it).
        4. Cancel the handlers still running (stuck engine, slow broker): they can never produce.
        5. Close per-partition clients (exactly-once producers).
        """
        parts = [self.parts[tp] for tp in tps if tp in self.parts]
        if not parts:
            return
        for p in parts:
            if p.state in (Lifecycle.ASSIGNED, Lifecycle.STARTING):
                p.state = Lifecycle.REVOKING
        reserve = min(2.0, 0.3 * max(0.0, deadline - time.monotonic()))
        busy = [p.idle.wait() for p in parts if not p.idle.is_set()]
        if busy:
            try:
                await asyncio.wait_for(asyncio.gather(*busy), max(0.0, deadline - reserve - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        for p in parts:
            if p.state is not Lifecycle.FAILED:  # a failed partition stays latched: nothing more is committed
                p.state = Lifecycle.REVOKED
        try:
            await asyncio.wait_for(self._finish(parts, deadline), max(0.05, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.log.warning("revoke_commit_timeout", partitions=sorted(p.tp.partition for p in parts),
                             note="not committed in time; the next owner re-reads these records")
        cancelled = 0
        for p in parts:
            cancelled += sum(1 for t in p.tasks if not t.done() and t.cancel())
        waits = [t for p in parts for t in p.tasks]
        if waits:
            await asyncio.wait(waits, timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        await self._close_clients(parts, deadline)
        if cancelled:
            n = sum(p.tracker.inflight for p in parts)
            self.dropped_after_revoke += n
            self.log.warning("revoke_deadline", partitions=sorted(p.tp.partition for p in parts), handlers=cancelled,
                             records=n, note="cancelled at the drain deadline; uncommitted, the next owner re-reads them")
        for p in parts:
            if self.parts.get(p.tp) is p:
                del self.parts[p.tp]

    async def close(self, deadline: float) -> None:
        """Stop: every partition goes through the revoke path with this deadline."""
        await self.revoke(list(self.parts), deadline)

    async def abandon(self, deadline: float) -> None:
        """After a failure: produce nothing more, commit nothing more, cancel handlers, close clients."""
        parts = list(self.parts.values())
        for p in parts:
            p.state = Lifecycle.REVOKED
            for t in p.tasks:
                t.cancel()
        waits = [t for p in parts for t in p.tasks]
        if waits:
            await asyncio.wait(waits, timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            await self._close_clients(parts, deadline)
        except Exception as exc:  # noqa: BLE001 — already failing: closing is best effort
            self.log.warning("close_failed", error=repr(exc)[:200])
        self.parts.clear()

    async def _finish(self, parts: list[Partition], deadline: float) -> None:
        raise NotImplementedError

    async def _close_clients(self, parts: list[Partition], deadline: float) -> None:
        pass

    async def tick(self) -> None:
        """Called every commit interval by the worker's commit task."""
        raise NotImplementedError

    async def publish(self, batch: Batch, outputs: Sequence[Output]) -> None:
        """Publish one batch's outputs (one per input record, in order); returns once they are durable."""
        raise NotImplementedError


class AtLeastOnce(_Protocol):
    """At-least-once: outputs acknowledged first, offsets committed after.

    1. ``publish``: wait for the previous batch of the partition to have sent (per-key order), refuse if the
       partition is not open, enqueue every output, release the turn, await every ack.
    2. All acks in: the batch is done. One ack failed (the producer gave up after its own retries): the
       batch fails, the partition is latched (nothing at or after it is committed), ``DeliveryFailed``
       stops the worker and the restart re-reads from the last commit. A record the broker refuses as too
       large is replaced by its fallback (a DLQ record without the value).
    3. ``tick`` (every commit interval): commit each open partition's ``committable()``; a commit that
       fails (rebalance in progress) is retried next tick with the same offsets.
    4. Revoke: drain, then commit the done prefix (see ``_Protocol.revoke``).
    Duplicates happen only after a crash or a cancelled drain: outputs acked but not yet committed.
    """

    mode = "at_least_once"

    def __init__(self, consumer, producer, *, make_producer: Callable[[], object] | None = None, **kw) -> None:
        super().__init__(consumer, **kw)
        self.producer = producer
        self.make_producer = make_producer  # a fresh, unstarted producer (to replace one a refusal broke)
        self.renewed = 0
        self._renewing = asyncio.Lock()
        self._retired: set[asyncio.Task] = set()
        self._commit_failures = 0

    async def publish(self, batch: Batch, outputs: Sequence[Output]) -> None:
        part = batch.owner
        try:
            await self._await_turn(part, batch)
            producer = self.producer
            sent = await self._send_all(producer, outputs)
        finally:
            batch.release_turn()
        for o, fut in sent:
            try:
                await fut
            except _SEQUENCE_SPENT:  # the broker refused a batch (too large) and so broke the producer's sequence
                await self._renew(producer)
                await self._alone(part, batch, o)
            except KafkaError as exc:
                part.fail(batch, f"not acknowledged: {exc!r}")
                raise DeliveryFailed(f"output to '{o.topic}' not acknowledged: {exc!r}") from exc
        part.tracker.done(batch)
        for _ in outputs:
            self._point("after_publish")

    async def _alone(self, part: Partition, batch: Batch, o: Output) -> None:
        """A record whose producer batch the broker refused as too large. The broker judges whole batches (and
        aiokafka does not split them), so the record is sent again on its own, awaited; only if it is refused
        on its own (a few tries: another handler's records may share its batch) does its fallback replace it."""
        for _ in range(3):
            producer = self.producer
            try:
                await (await self._send(producer, o))
                return
            except _SEQUENCE_SPENT:
                await self._renew(producer)
            except KafkaError as exc:
                part.fail(batch, f"not acknowledged: {exc!r}")
                raise DeliveryFailed(f"output to '{o.topic}' not acknowledged: {exc!r}") from exc
        if o.fallback is None:
            part.fail(batch, "output refused as too large")
            raise DeliveryFailed(f"output to '{o.topic}' refused as too large, with no fallback")
        self.too_large += 1
        try:
            await (await self._send(self.producer, o.fallback))
        except KafkaError as exc:
            part.fail(batch, f"not acknowledged: {exc!r}")
            raise DeliveryFailed(f"output not acknowledged: {exc!r}") from exc

    async def _renew(self, broken) -> None:
        """Replace a producer the broker refused a batch from. The idempotent producer has already numbered that
        batch, so every later batch of its partition would fail as out of order (a restart loop). The new one
        starts a fresh sequence; records in flight on the old one are sent again by their handlers."""
        if self.make_producer is None:
            return
        async with self._renewing:
            if self.producer is not broken:  # another handler renewed it already
                return
            new = self.make_producer()
            await asyncio.wait_for(new.start(), 30.0)
            self.producer = new
            self.renewed += 1
            self.log.warning("producer_renewed", reason="a batch was refused as too large",
                             note="its sequence numbers are spent; records in flight are sent again")
            task = asyncio.get_running_loop().create_task(_stop_quietly(broken, 30.0))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def stop_clients(self, deadline: float) -> None:
        """Stop the producer (and any replaced one still flushing)."""
        if self._retired:
            await asyncio.wait(list(self._retired), timeout=max(0.1, deadline - time.monotonic()))
        if self.producer is not None:
            await _stop_quietly(self.producer, max(0.5, deadline - time.monotonic()))

    async def tick(self) -> None:
        await self.commit()

    async def commit(self, only: Iterable[TopicPartition] | None = None,
                     states: tuple[Lifecycle, ...] = (Lifecycle.ASSIGNED, Lifecycle.REVOKING)) -> None:
        wanted = set(only) if only is not None else None
        offsets = {}
        for tp, p in self.parts.items():
            if wanted is not None and tp not in wanted:
                continue
            if p.state in states:
                c = p.tracker.committable()
                if c is not None:
                    offsets[tp] = c
        if not offsets:
            return
        try:
            # Bounded: a coordinator that does not answer must not hold the commit loop (the next tick retries).
            await asyncio.wait_for(self.consumer.commit(offsets), max(5.0, 10 * self.commit_interval_s))
        except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
            if not self._commit_failures:  # once per streak: an outage must not log ten lines a second
                self.log.warning("commit_failed", error=type(exc).__name__, partitions=len(offsets),
                                 note="retried every interval with the same offsets")
            self._commit_failures += 1
            return
        if self._commit_failures:
            self.log.info("commits_resumed", failed_attempts=self._commit_failures)
            self._commit_failures = 0
        for tp, off in offsets.items():
            if tp in self.parts:
                self.parts[tp].tracker.committed(off)
        self.commits += 1

    async def _finish(self, parts: list[Partition], deadline: float) -> None:
        # The done prefix is safe to commit in any state but FAILED (whose latch already bounds it).
        await self.commit(only=[p.tp for p in parts], states=(Lifecycle.REVOKED,))


class ExactlyOnce(_Protocol):
    """Exactly-once: outputs and input offsets in one Kafka transaction per partition per commit interval.

    aiokafka has no KIP-447, so each input partition has its own transactional producer
    (``transactional.id = GROUP.TOPIC.PARTITION``).

    0. ``assign``: the partition is paused, its producer is created and started (InitProducerId fences any
       older owner and waits for its open transaction to end: committed, or aborted), the committed offset
       is read again, strictly (``pipeline.kafka.committed``: a coordinator still loading is waited for,
       never taken for "never committed"; stable offsets where the broker offers them) and the consumer
       seeks to it (never to before the end of this worker's own last committed transaction for the
       partition: a stale read), then the partition is resumed. Nothing is read before it is fenced. If one
       partition fails to start, the others starting beside it are cancelled (their producers stopped).
    1. ``publish``: wait for the previous batch's turn, take the partition lock, refuse if not open, begin a
       transaction if none is open, enqueue the outputs into it, release the turn and the lock; then wait
       until the transaction holding the batch commits (or fails).
    2. ``tick``: each partition whose transaction is older than the commit interval gets its own commit task
       (one slow commit never holds up another partition's), under the lock (no sends in between): await
       every ack, check the transaction's batches are exactly the oldest batches not yet done (so its end
       offset passes nothing incomplete), ``send_offsets_to_transaction`` (end of its last batch),
       ``commit_transaction``. Then its batches are done and committed. A record the broker refused as too
       large poisons the transaction: it is aborted and sent again whole, with that record's fallback.
    3. A failed transaction is aborted, the partition is FAILED (latched: later batches are refused and
       never committed) and, if it was still assigned, ``DeliveryFailed`` goes to ``on_failure`` (the worker
       stops; the restart re-reads from the last committed transaction). A commit whose partition was revoked
       meanwhile fails alone: the next owner re-reads it; the worker goes on. A commit that timed out or was
       cut off after ``commit_transaction`` was sent has an outcome only the broker knows: it is not aborted
       (the producer is committing), the partition is latched, and whoever reads the partition next starts
       only after step 0's fence and strict read, which see that outcome. read_committed readers never see
       an aborted output; a commit cancelled before ``commit_transaction`` aborts its transaction first.
    4. Revoke: drain (batches inside the open transaction count as settled), wait for a commit in flight,
       commit the transaction (or abort it if a cancelled handler left a batch half-sent), cancel what is
       left, stop the producer. A revoked partition's producer is closed, so a late handler cannot produce.
    """

    mode = "exactly_once"

    def __init__(self, consumer, make_producer: Callable[[TopicPartition], object], *,
                 can_resume: Callable[[TopicPartition], bool] = lambda tp: True, txn_timeout_s: float = 30.0,
                 **kw) -> None:
        super().__init__(consumer, **kw)
        self.make_producer = make_producer
        self.can_resume = can_resume
        self.txn_timeout_s = txn_timeout_s
        self.aborted = 0
        self.outcome_unknown = 0  # commits cut off after commit_transaction was sent
        # The end offset of this worker's last committed transaction per partition, kept across revocations:
        # a partition that comes back is never read from before it (see ``_start``).
        self.committed_end: dict[TopicPartition, int] = {}

    async def assign(self, tps: Iterable[TopicPartition]) -> None:
        new = []
        for tp in tps:
            old = self.parts.get(tp)
            if old is not None and old.state is not Lifecycle.REVOKED:
                continue
            part = self.parts[tp] = Partition(tp, Lifecycle.STARTING)
            new.append(part)
        if not new:
            return
        self.consumer.pause(*[p.tp for p in new])  # before any await: nothing is read before the fence
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the others (each stops its producer)
                for p in new:
                    group.create_task(self._start(p))
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None

    async def _start(self, part: Partition) -> None:
        prod = self.make_producer(part.tp)
        try:
            await asyncio.wait_for(prod.start(), self.txn_timeout_s)
            committed = await read_committed(self.consumer, part.tp, self.txn_timeout_s)
        except BaseException:
            await _stop_quietly(prod, 2.0)
            raise
        if part.state is not Lifecycle.STARTING:  # revoked while starting
            await _stop_quietly(prod, 2.0)
            return
        part.producer = prod
        ours = self.committed_end.get(part.tp)
        if ours is not None and (committed is None or committed < ours):
            # commit_transaction returned for offsets up to ``ours``, so they are committed; an older answer is
            # a stale read (a broker without stable offset reads). Reading from it would label those records twice.
            self.log.warning("stale_committed_offset", partition=part.tp.partition, broker=committed, ours=ours,
                             note="resuming after this worker's own last committed transaction")
            committed = ours
        if committed is not None:
            self.consumer.seek(part.tp, committed)
            part.tracker.committed(committed)
        part.state = Lifecycle.ASSIGNED
        if self.can_resume(part.tp):
            self.consumer.resume(part.tp)

    async def publish(self, batch: Batch, outputs: Sequence[Output]) -> None:
        part = batch.owner
        done = asyncio.get_running_loop().create_future()
        try:
            await self._await_turn(part, batch)
            async with part.lock:
                part.check_open()
                if part.txn is None:
                    await part.producer.begin_transaction()
                    part.txn = _Txn(started=time.monotonic())
                txn = part.txn
                try:
                    txn.sent.extend(await self._send_all(part.producer, outputs))
                except BaseException:
                    txn.dirty = True
                    raise
                txn.batches.append(batch)
                txn.waiters.append(done)
                self._point("in_transaction")
        finally:
            batch.release_turn()
        self.settle(batch)  # inside the transaction: the drain need not wait for the commit
        await done

    async def tick(self) -> None:
        """Start a commit task for each partition whose transaction is due; never waits for one."""
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        for p in list(self.parts.values()):
            if (p.committing is None and p.txn is not None and p.state is Lifecycle.ASSIGNED
                    and now - p.txn.started >= self.commit_interval_s):
                p.committing = task = loop.create_task(self._commit(p), name=f"commit-{p.tp.partition}")
                task.add_done_callback(lambda t, p=p: self._commit_done(p, t))

    def _commit_done(self, part: Partition, task: asyncio.Task) -> None:
        if part.committing is task:
            part.committing = None
        if not task.cancelled() and task.exception() is not None:
            self._report(task.exception())

    async def commits_settled(self) -> None:
        """Wait for the commit tasks in flight (tests, and ``close``)."""
        tasks = [p.committing for p in self.parts.values() if p.committing is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _commit(self, part: Partition, *, revoking: bool = False, timeout: float | None = None) -> None:
        async with part.lock:
            txn, part.txn = part.txn, None
            if txn is None:
                return
            tp = part.tp
            limit = timeout or self.txn_timeout_s
            ending = False  # commit_transaction was called: from then on only the broker knows the outcome
            try:
                if txn.dirty or not txn.batches or not part.tracker.heads(txn.batches):
                    raise _MustAbort("a batch in this transaction is incomplete" if txn.dirty
                                     else "the transaction does not continue the committed prefix")
                end = txn.batches[-1].last + 1
                async with asyncio.timeout(limit):
                    await self._acks(part, txn)  # per-record errors surface here
                    self._point("txn_fail")
                    await part.producer.send_offsets_to_transaction({tp: end}, self.group_id)
                    ending = True
                    await part.producer.commit_transaction()
            except asyncio.CancelledError:
                # Cut off (a shutdown after a failure): never leave the transaction open for read_committed
                # readers. Before commit_transaction it is aborted; after it, the broker finishes it.
                if not ending:
                    await self._abort(part, "cancelled", 2.0)
                self._fail_txn(part, txn, PartitionClosed(f"partition {tp.partition}: commit cancelled"))
                raise
            except (KafkaError, TimeoutError, _MustAbort, InjectedFault) as exc:
                if ending:
                    self.outcome_unknown += 1
                    self.log.warning("commit_outcome_unknown", partition=tp.partition, error=repr(exc)[:200],
                                     note="commit_transaction was sent: the broker commits or aborts it; the next "
                                          "reader of this partition fences it and reads the committed offset first")
                else:
                    await self._abort(part, exc, min(5.0, limit))
                revoked = revoking or part.state is not Lifecycle.ASSIGNED
                err = DeliveryFailed(f"transaction for partition {tp.partition} failed and was "
                                     f"{'cut off' if ending else 'aborted'}: {exc!r}")
                for b in txn.batches:
                    part.tracker.fail(b, str(err))
                if revoked:  # its records go to the next owner: nothing for this worker to restart over
                    self.log.warning("revoked_transaction_failed", partition=tp.partition, error=repr(exc)[:200],
                                     note="the next owner re-reads these records")
                    self._fail_txn(part, txn, PartitionClosed(f"partition {tp.partition} was revoked"))
                    return
                part.fail(None, str(err))
                self._fail_txn(part, txn, err)
                raise err from exc
            for b in txn.batches:
                part.tracker.done(b)
            part.tracker.committed(end)
            self.committed_end[tp] = max(end, self.committed_end.get(tp, end))
            for w in txn.waiters:
                if not w.done():
                    w.set_result(None)
            self.commits += 1

    async def _acks(self, part: Partition, txn: _Txn) -> None:
        """Every output of the transaction acknowledged.

        The broker refuses a whole producer batch over the topic's ``max.message.bytes`` (aiokafka does not split
        batches, as the Java client does), and one refused batch makes the transaction abortable only. So: abort,
        begin again and send the outputs one record per batch (each awaited), in order; the first record the
        broker refuses on its own is replaced by its fallback (a DLQ record without the value) and the round
        starts over. One round per refused record, on this rare path only."""
        results = await asyncio.gather(*(f for _, f in txn.sent), return_exceptions=True)
        other = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, _TOO_LARGE)), None)
        if other is not None:
            raise other
        if not any(isinstance(r, _TOO_LARGE) for r in results):
            return
        outputs = [o for o, _ in txn.sent]
        self.log.warning("output_too_large", partition=part.tp.partition, records=len(outputs),
                         note="the broker refused a batch over the topic's limit; sending one record at a time")
        for _ in range(len(outputs) + 1):
            # A refused batch has spent its sequence numbers: a fresh producer (InitProducerId fences the old
            # epoch and aborts its transaction on the broker) starts clean; aborting would leave the gap.
            await self._renew(part)
            self.aborted += 1
            await part.producer.begin_transaction()
            sent = []
            for i, o in enumerate(outputs):
                fut = await part.producer.send(o.topic, value=o.value, key=o.key, headers=o.headers)
                try:
                    await fut
                except _TOO_LARGE:
                    if o.fallback is None:
                        raise _MustAbort(f"a record to '{o.topic}' is refused as too large and has no fallback")
                    outputs[i] = o.fallback
                    self.too_large += 1
                    break
                sent.append((o, fut))
            else:
                txn.sent = sent
                return
        raise _MustAbort("records refused as too large, even as fallbacks")

    async def _renew(self, part: Partition) -> None:
        old = part.producer
        new = self.make_producer(part.tp)
        try:
            await asyncio.wait_for(new.start(), self.txn_timeout_s)
        except BaseException:
            await _stop_quietly(new, 2.0)
            raise
        part.producer = new
        await _stop_quietly(old, 2.0)

    @staticmethod
    def _fail_txn(part: Partition, txn: _Txn, err: BaseException) -> None:
        for w in txn.waiters:
            if not w.done():
                w.set_exception(err)

    async def _abort(self, part: Partition, why, timeout: float = 5.0) -> None:
        """Abort the open transaction (bounded; shielded, so a cancelled caller still aborts it)."""
        self.aborted += 1
        job = asyncio.ensure_future(part.producer.abort_transaction())
        try:
            await asyncio.wait_for(asyncio.shield(job), max(0.05, min(5.0, timeout)))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 — the producer is closed below either way
            self.log.warning("abort_failed", partition=part.tp.partition, error=repr(exc)[:200], why=repr(why)[:200],
                             note="a new producer for this partition fences and aborts it")

    async def _finish(self, parts: list[Partition], deadline: float) -> None:
        await asyncio.gather(*(self._commit(p, revoking=True, timeout=max(0.1, deadline - time.monotonic()))
                               for p in parts if p.producer is not None and (p.txn is not None or p.committing)))

    async def _close_clients(self, parts: list[Partition], deadline: float) -> None:
        running = [p.committing for p in parts if p.committing is not None]
        for t in running:  # after a failure (abandon): a commit still running is cut off (it aborts if it can)
            t.cancel()
        if running:
            await asyncio.wait(running, timeout=max(0.1, min(3.0, deadline - time.monotonic())))
        prods = [p.producer for p in parts if p.producer is not None]
        for p in parts:
            p.producer = None
        await asyncio.gather(*(_stop_quietly(prod, max(0.5, deadline - time.monotonic())) for prod in prods))


class _MustAbort(Exception):
    pass


async def _stop_quietly(client, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.stop(), timeout)
    except (KafkaError, OSError, asyncio.TimeoutError):
        pass
