"""At-least-once delivery: outputs acknowledged first, offsets committed after."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable, Sequence

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, OutOfOrderSequenceNumber

from consumers.delivery.protocol import _SEQUENCE_SPENT, _TOO_LARGE, _Protocol, _stop_quietly
from consumers.delivery.state import Batch, Lifecycle, Output, Partition
from pipeline.errors import DeliveryFailed


class AtLeastOnce(_Protocol):
    """At-least-once: outputs acknowledged first, offsets committed after.

    1. ``publish``: wait for the previous batch of the partition to have sent (per-key order), refuse if the
       partition is not open, enqueue every output, release the turn, await every ack.
    2. All acks in: the batch is done. One ack failed (the producer gave up after its own retries): the
       batch fails, the partition is latched (nothing at or after it is committed), ``DeliveryFailed``
       stops the worker and the restart re-reads from the last commit. A record the broker refuses as too
       large is sent again alone and, refused alone, replaced by its fallback (a DLQ record without the value);
       the producer whose sequence the refusal spent is replaced.
    3. ``tick`` (every commit interval): for each open partition's ``committable()`` offset, first the
       owner's ``before_commit`` step (the alerting worker saves its state there: state and offsets move
       together), then the commit, bounded in time; a commit that fails (rebalance in progress) is retried next
       tick with the same offsets; a failing ``before_commit`` commits nothing and stops the owner.
    4. Revoke: drain, then commit the done prefix (see ``_Protocol.revoke``).
    Duplicates happen only after a crash or a cancelled drain: outputs acked but not yet committed.
    """

    mode = "at_least_once"

    def __init__(self, consumer, producer, *, make_producer: Callable[[], object] | None = None,
                 before_commit: Callable[[dict[TopicPartition, int]], Awaitable[None]] | None = None, **kw) -> None:
        super().__init__(consumer, **kw)
        self.producer = producer
        self.before_commit = before_commit  # a step of the commit: e.g. state saved for the offsets about to be committed
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
        refused = 0  # times the broker refused it as too large; an out-of-order answer is not one of them
        for _ in range(12):
            producer = self.producer
            try:
                await (await self._send(producer, o))
                return
            except _TOO_LARGE:
                await self._renew(producer)
                # Refused in a batch it may have shared with another handler's records: send it on a producer
                # of its own, where its batch is itself; a refusal there is its own (the fault suite saw innocent
                # records dead-lettered after three shared refusals).
                if await self._private_send(o):
                    return
                refused = 3
                break
            except OutOfOrderSequenceNumber:
                # Another record's refusal broke the producer this one was sent on (records in flight share it):
                # this record is innocent; it goes again on the renewed producer, and never to its fallback.
                await self._renew(producer)
            except KafkaError as exc:
                part.fail(batch, f"not acknowledged: {exc!r}")
                raise DeliveryFailed(f"output to '{o.topic}' not acknowledged: {exc!r}") from exc
        if refused < 3:
            part.fail(batch, "the producer kept failing out of order")
            raise DeliveryFailed(f"output to '{o.topic}' not acknowledged: the producer kept failing out of order")
        if o.fallback is None:
            part.fail(batch, "output refused as too large")
            raise DeliveryFailed(f"output to '{o.topic}' refused as too large, with no fallback")
        self.too_large += 1
        try:
            await (await self._send(self.producer, o.fallback))
        except KafkaError as exc:
            part.fail(batch, f"not acknowledged: {exc!r}")
            raise DeliveryFailed(f"output not acknowledged: {exc!r}") from exc

    async def _private_send(self, o: Output) -> bool:
        """Send ``o`` on a fresh producer of its own: True when acknowledged, False when refused as too large."""
        if self.make_producer is None:
            return False
        p = self.make_producer()
        await asyncio.wait_for(p.start(), 30.0)
        try:
            await (await p.send(o.topic, value=o.value, key=o.key, headers=o.headers))
            return True
        except _TOO_LARGE:
            return False
        finally:
            await _stop_quietly(p, 5.0)

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

    async def start_clients(self) -> None:
        await self.producer.start()

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
        if self.before_commit is not None:  # raises: then nothing is committed (the owner stops)
            await self.before_commit(offsets)
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
