"""What both delivery protocols share: the partitions, admission with publish turns, settle, revoke, close."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable, Sequence

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, OutOfOrderSequenceNumber, RecordTooLargeError

from consumers.delivery.state import Batch, Lifecycle, Output, Partition
from pipeline import logs
from pipeline.errors import DeliveryFailed

SEND_RETRIES = 5
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# After the broker refuses a batch, the idempotent producer's later batches of that partition are out of order.
_SEQUENCE_SPENT = _TOO_LARGE + (OutOfOrderSequenceNumber,)



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

    # -- clients -----------------------------------------------------------------------------------
    async def start_clients(self) -> None:
        """Start the clients the protocol owns for all partitions (at-least-once: its producer)."""

    async def stop_clients(self, deadline: float) -> None:
        """Stop them (after ``close`` or ``abandon``; per-partition clients are stopped there)."""

    def open_partitions(self) -> list[TopicPartition]:
        """The partitions records may be taken from now."""
        return [tp for tp, p in self.parts.items() if p.state is Lifecycle.ASSIGNED]

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
                p.move(Lifecycle.REVOKING)
        reserve = min(2.0, 0.3 * max(0.0, deadline - time.monotonic()))
        busy = [p.idle.wait() for p in parts if not p.idle.is_set()]
        if busy:
            try:
                await asyncio.wait_for(asyncio.gather(*busy), max(0.0, deadline - reserve - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        for p in parts:
            if p.state is not Lifecycle.FAILED:  # a failed partition stays latched: nothing more is committed
                p.move(Lifecycle.REVOKED)
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
            p.move(Lifecycle.REVOKED)
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


async def _stop_quietly(client, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.stop(), timeout)
    except (KafkaError, OSError, asyncio.TimeoutError):
        pass
