"""Exactly-once delivery: outputs and input offsets in one Kafka transaction per partition per commit interval."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable, Sequence

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumers.delivery.protocol import _SEQUENCE_SPENT, _TOO_LARGE, _Protocol, _stop_quietly
from consumers.delivery.state import Batch, Lifecycle, Output, Partition, _Txn
from pipeline.errors import DeliveryFailed, PartitionClosed
from pipeline.failpoints import InjectedFault
from pipeline.kafka import committed as read_committed


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
        part.move(Lifecycle.ASSIGNED)
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
        # A refused batch spends its sequence numbers: the partition's later batches of the same producer come back
        # OutOfOrderSequenceNumber, sometimes before the refusal itself does. Both go the one-record-at-a-time way
        # on a fresh producer (the fault suite's exactly-once too-large case failed 1 run in 3 without this).
        other = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, _SEQUENCE_SPENT)), None)
        if other is not None:
            raise other
        if not any(isinstance(r, _SEQUENCE_SPENT) for r in results):
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
