"""The delivery protocol without a broker: the offset tracker and both protocols against in-memory clients.

The clients here are small stand-ins that keep the same contract as aiokafka's (send → future of an ack;
transactions that become visible on commit and vanish on abort), so random completion and failure orders
can be explored by hypothesis in milliseconds. The real-broker counterparts are in tests/faults.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.delivery import (
    AtLeastOnce,
    DeliveryFailed,
    ExactlyOnce,
    Lifecycle,
    OffsetTracker,
    Output,
    PartitionClosed,
)

TP = TopicPartition("in", 0)


# ---------------------------------------------------------------------------------------------- tracker
@st.composite
def tracker_runs(draw):
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=30))
    gaps = draw(st.lists(st.integers(0, 3), min_size=len(sizes), max_size=len(sizes)))
    order = draw(st.permutations(range(len(sizes))))
    fail_at = draw(st.one_of(st.none(), st.integers(0, len(sizes) - 1)))
    commit_every = draw(st.integers(1, 4))
    return sizes, gaps, order, fail_at, commit_every


@given(tracker_runs())
@settings(max_examples=400, deadline=None)
def test_tracker_never_commits_past_an_incomplete_or_failed_batch(run):
    sizes, gaps, order, fail_at, commit_every = run
    t = OffsetTracker()
    batches, off = [], 0
    for size, gap in zip(sizes, gaps):
        off += gap
        batches.append(t.take(off, off + size - 1, size))
        off += size
    last_commit = None
    for step, i in enumerate(order):
        b = batches[i]
        if i == fail_at:
            t.fail(b, "boom")
        else:
            t.done(b)
        if step % commit_every == 0:
            c = t.committable()
            if c is not None:
                # every batch starting below the commit point is done, none failed or pending
                assert all(x.done for x in batches if x.first < c), (c, [(x.first, x.done) for x in batches])
                if fail_at is not None:
                    assert c <= batches[fail_at].first
                assert last_commit is None or c > last_commit
                t.committed(c)
                last_commit = c
            elif last_commit is not None:
                assert t.committable() is None  # nothing new: asking changes nothing
    # all answered: without a failure everything is committable and the tracker holds nothing
    c = t.committable()
    final = c if c is not None else last_commit
    if fail_at is None:
        assert final == batches[-1].last + 1
        assert len(t) == 0 and t.inflight == 0
    else:
        assert (final or 0) <= batches[fail_at].first
        assert t.failure == "boom"


def test_tracker_failed_commit_is_retried_with_the_same_offset():
    t = OffsetTracker()
    b = t.take(0, 9, 10)
    t.done(b)
    assert t.committable() == 10
    assert t.committable() == 10  # asking twice (a commit that failed in between) gives the same answer
    t.committed(10)
    assert t.committable() is None


def test_tracker_refuses_offsets_going_back():
    t = OffsetTracker()
    t.take(5, 9, 5)
    with pytest.raises(ValueError):
        t.take(9, 12, 4)


# ---------------------------------------------------------------------------------------------- stand-ins
@dataclass
class Rec:
    offset: int


class MemConsumer:
    """The consumer calls delivery makes: commit, committed, pause/resume, seek."""

    def __init__(self, fail_commits: int = 0) -> None:
        self.commits: list[dict] = []
        self.fail_commits = fail_commits
        self.paused: set = set()
        self.seeks: dict = {}
        self.stored: dict = {}

    async def commit(self, offsets):
        if self.fail_commits:
            self.fail_commits -= 1
            from aiokafka.errors import CommitFailedError

            raise CommitFailedError("rebalance in progress")
        self.commits.append(dict(offsets))
        self.stored.update(offsets)

    async def committed(self, tp):
        return self.stored.get(tp)

    def pause(self, *tps):
        self.paused.update(tps)

    def resume(self, *tps):
        self.paused.difference_update(tps)

    def seek(self, tp, offset):
        self.seeks[tp] = offset


class MemProducer:
    """Sends resolve (or fail) when ``flush_acks`` says; transactions are visible only once committed."""

    def __init__(self, log: list, consumer: MemConsumer | None = None, fail_ack: set | None = None,
                 fail_commit_at: int | None = None) -> None:
        self.log = log  # committed (or, without transactions, acknowledged) values in order
        self.consumer = consumer
        self.fail_ack = fail_ack or set()
        self.fail_commit_at = fail_commit_at
        self.txn: list | None = None
        self.txn_offsets: dict | None = None
        self.commits = 0
        self.pending: list[tuple[asyncio.Future, bytes]] = []
        self.stopped = False

    async def start(self):
        pass

    async def stop(self):
        self.stopped = True

    async def send(self, topic, value, key=None, headers=None):
        if self.stopped:
            raise KafkaTimeoutError("producer closed")
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((fut, value))
        if self.txn is not None:
            self.txn.append(value)
        asyncio.get_running_loop().call_soon(self._ack, fut, value)
        return fut

    def _ack(self, fut, value):
        if fut.done():
            return
        if value in self.fail_ack:
            fut.set_exception(KafkaTimeoutError("not acknowledged"))
        else:
            fut.set_result(None)
            if self.txn is None:
                self.log.append(value)

    async def begin_transaction(self):
        assert self.txn is None
        self.txn, self.txn_offsets = [], None

    async def send_offsets_to_transaction(self, offsets, group_id):
        self.txn_offsets = dict(offsets)

    async def commit_transaction(self):
        self.commits += 1
        if self.fail_commit_at is not None and self.commits == self.fail_commit_at:
            raise KafkaTimeoutError("transaction commit timed out")
        self.log.extend(self.txn)
        if self.consumer is not None and self.txn_offsets:
            self.consumer.stored.update(self.txn_offsets)
        self.txn = None

    async def abort_transaction(self):
        self.txn = None


def batches_of(sizes):
    off, out = 0, []
    for n in sizes:
        out.append([Rec(o) for o in range(off, off + n)])
        off += n
    return out


async def run_handlers(proto, recs_list, *, delays, ticks: int = 0):
    """Admit every batch in poll order, then let handlers finish in the order ``delays`` gives."""
    handlers = []

    async def handler(batch, recs, delay):
        try:
            for _ in range(delay):
                await asyncio.sleep(0)
            await proto.publish(batch, [Output("out", None, f"{r.offset}".encode(), []) for r in recs])
        except (PartitionClosed, DeliveryFailed):
            pass
        finally:
            proto.settle(batch)

    for recs, d in zip(recs_list, delays):
        b = proto.admit(TP, recs)
        assert b is not None
        t = asyncio.ensure_future(handler(b, recs, d))
        proto.track(b, t)
        handlers.append(t)

    async def ticker():
        # commit ticks interleave with the handlers (``ticks`` event-loop turns first), until all are done
        for _ in range(ticks):
            await asyncio.sleep(0)
        for _ in range(5000):  # bounded: a handler left waiting forever is a failure, not a hang
            if all(h.done() for h in handlers):
                break
            await asyncio.sleep(0)
            try:
                await proto.tick()
            except DeliveryFailed:
                pass

    tk = asyncio.ensure_future(ticker())
    await tk
    stuck = [h for h in handlers if not h.done()]
    for h in stuck:
        h.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    assert not stuck, f"{len(stuck)} handlers never finished"



# ---------------------------------------------------------------------------------------------- protocols
@st.composite
def protocol_runs(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=12))
    delays = draw(st.lists(st.integers(0, 6), min_size=len(sizes), max_size=len(sizes)))
    total = sum(sizes)
    fail_ack = draw(st.one_of(st.none(), st.integers(0, total - 1)))
    fail_commit_at = draw(st.one_of(st.none(), st.integers(1, 4)))
    ticks = draw(st.integers(0, 20))
    return sizes, delays, fail_ack, fail_commit_at, ticks


@given(protocol_runs())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_at_least_once_commits_never_pass_an_unacknowledged_output(run):
    sizes, delays, fail_ack, _, ticks = run

    async def go():
        consumer = MemConsumer()
        acked: list = []
        prod = MemProducer(acked, fail_ack={str(fail_ack).encode()} if fail_ack is not None else set())
        proto = AtLeastOnce(consumer, prod, group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        await run_handlers(proto, batches_of(sizes), delays=delays, ticks=ticks)
        await proto.tick()
        return consumer, acked, proto

    consumer, acked, proto = asyncio.run(go())
    acked_offsets = {int(v) for v in acked}
    assert [int(v) for v in acked] == sorted(int(v) for v in acked), "outputs published in partition order"
    committed = [c[TP] for c in consumer.commits]
    assert committed == sorted(committed)
    if committed:
        assert set(range(committed[-1])) <= acked_offsets, "an offset was committed before its output was acked"
    if fail_ack is not None:
        assert not committed or committed[-1] <= fail_ack
        assert proto.parts[TP].state is Lifecycle.FAILED
    else:
        assert committed and committed[-1] == sum(sizes)


@given(protocol_runs())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_exactly_once_outputs_and_offsets_commit_together(run):
    sizes, delays, _, fail_commit_at, ticks = run

    async def go():
        consumer = MemConsumer()
        visible: list = []
        prods = []

        def make(tp):
            p = MemProducer(visible, consumer, fail_commit_at=fail_commit_at)
            prods.append(p)
            return p

        proto = ExactlyOnce(consumer, make, group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        assert TP not in consumer.paused, "resumed once fenced"
        await run_handlers(proto, batches_of(sizes), delays=delays, ticks=ticks)
        try:
            await proto.tick()
        except DeliveryFailed:
            pass
        await proto.close(asyncio.get_running_loop().time() + 5)
        return consumer, visible, proto

    consumer, visible, proto = asyncio.run(go())
    seen = [int(v) for v in visible]
    assert len(seen) == len(set(seen)), "an output became visible twice"
    stored = consumer.stored.get(TP, 0)
    # read_committed view: exactly the outputs of the committed offsets, in order, nothing more
    assert seen == list(range(stored)), (seen, stored)
    if fail_commit_at is None:
        assert stored == sum(sizes)


async def _eos_one_failure():
    consumer = MemConsumer()
    visible: list = []
    proto = ExactlyOnce(consumer, lambda tp: MemProducer(visible, consumer, fail_commit_at=2), group_id="g",
                        commit_interval_s=0.0)
    await proto.assign([TP])
    recs = batches_of([3, 3, 3])
    b1 = proto.admit(TP, recs[0])
    t1 = asyncio.ensure_future(proto.publish(b1, [Output("o", None, b"0", []), Output("o", None, b"1", []),
                                                  Output("o", None, b"2", [])]))
    await asyncio.sleep(0)
    await proto.tick()  # commit 1: offsets 0..2 visible
    await t1
    b2 = proto.admit(TP, recs[1])
    t2 = asyncio.ensure_future(proto.publish(b2, [Output("o", None, str(o).encode(), []) for o in (3, 4, 5)]))
    await asyncio.sleep(0)
    await proto.tick()  # commit 2 fails: aborted, reported to the supervisor
    await proto.commits_settled()
    assert isinstance(proto.failure, DeliveryFailed)
    with pytest.raises(DeliveryFailed):
        await t2
    # the next handler of the partition is refused: nothing after the failed batch is ever committed
    b3 = proto.admit(TP, recs[2])
    assert b3 is None, "a failed partition admits nothing until it is re-read"
    return consumer, visible, proto


def test_exactly_once_failed_transaction_latches_the_partition():
    consumer, visible, proto = asyncio.run(_eos_one_failure())
    assert visible == [b"0", b"1", b"2"]
    assert consumer.stored[TP] == 3
    assert proto.parts[TP].state is Lifecycle.FAILED


def test_exactly_once_publish_after_revoke_is_refused_and_producer_closed():
    async def go():
        consumer = MemConsumer()
        visible: list = []
        prods = []

        def make(tp):
            prods.append(MemProducer(visible, consumer))
            return prods[-1]

        proto = ExactlyOnce(consumer, make, group_id="g", commit_interval_s=10.0)
        await proto.assign([TP])
        b = proto.admit(TP, [Rec(0)])
        loop = asyncio.get_running_loop()
        await proto.revoke([TP], loop.time() + 0.2)  # the handler never came: its batch is not committed
        with pytest.raises(PartitionClosed):
            await proto.publish(b, [Output("o", None, b"late", [])])
        return visible, prods

    visible, prods = asyncio.run(go())
    assert visible == [] and prods[0].stopped


def test_at_least_once_commit_failure_is_retried():
    async def go():
        consumer = MemConsumer(fail_commits=1)
        proto = AtLeastOnce(consumer, MemProducer([]), group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        await run_handlers(proto, batches_of([2, 2]), delays=[0, 0])
        await proto.tick()  # fails (rebalance in progress)
        await proto.tick()  # same offsets again
        return consumer

    consumer = asyncio.run(go())
    assert consumer.commits == [{TP: 4}]


def test_handlers_publish_in_poll_order_whatever_order_they_finish():
    async def go():
        acked: list = []
        proto = AtLeastOnce(MemConsumer(), MemProducer(acked), group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        delays = list(range(10))[::-1]  # the last polled finishes first
        random.Random(0).shuffle(delays)
        await run_handlers(proto, batches_of([1] * 10), delays=delays)
        return acked

    assert [int(v) for v in asyncio.run(go())] == list(range(10))


def test_exactly_once_never_resumes_before_its_own_committed_transaction():
    """A partition revoked and assigned back to the same worker: if the broker answers an older committed offset
    than the transaction this worker saw commit (a stale read), the worker seeks past its own commit."""
    async def go():
        consumer = MemConsumer()
        visible: list = []
        proto = ExactlyOnce(consumer, lambda tp: MemProducer(visible, consumer), group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        b = proto.admit(TP, batches_of([3])[0])
        t = asyncio.ensure_future(proto.publish(b, [Output("o", None, str(o).encode(), []) for o in range(3)]))
        await asyncio.sleep(0)
        await proto.tick()
        await t
        loop = asyncio.get_running_loop()
        await proto.revoke([TP], loop.time() + 1)
        assert consumer.stored[TP] == 3
        consumer.stored[TP] = 1  # the broker's answer lags the commit
        await proto.assign([TP])
        stale_seek = consumer.seeks[TP]
        consumer.stored[TP] = 7  # another owner committed further meanwhile: the broker's answer wins
        await proto.revoke([TP], loop.time() + 1)
        await proto.assign([TP])
        return stale_seek, consumer.seeks[TP], visible

    stale_seek, later_seek, visible = asyncio.run(go())
    assert visible == [b"0", b"1", b"2"]
    assert stale_seek == 3, "resumed after its own committed transaction, not at the stale offset 1"
    assert later_seek == 7


# ---------------------------------------------------------------------------------------------- stalls and loops
TP1 = TopicPartition("in", 1)


class SlowCommitProducer(MemProducer):
    """commit_transaction waits for ``gate`` (a slow broker for this partition's transaction)."""

    def __init__(self, *a, gate: asyncio.Event, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = gate
        self.committing = asyncio.Event()

    async def commit_transaction(self):
        self.committing.set()
        await self.gate.wait()
        await super().commit_transaction()


async def _publish(proto, tp, recs, values):
    b = proto.admit(tp, recs)
    return asyncio.ensure_future(proto.publish(b, [Output("o", None, v, []) for v in values])), b


def test_one_slow_commit_does_not_hold_up_another_partition():
    async def go():
        consumer = MemConsumer()
        visible: list = []
        gate = asyncio.Event()
        prods = {}

        def make(tp):
            prods[tp] = (SlowCommitProducer(visible, consumer, gate=gate) if tp == TP
                         else MemProducer(visible, consumer))
            return prods[tp]

        proto = ExactlyOnce(consumer, make, group_id="g", commit_interval_s=0.0)
        await proto.assign([TP, TP1])
        slow, _ = await _publish(proto, TP, [Rec(0)], [b"a0"])
        fast, _ = await _publish(proto, TP1, [Rec(0)], [b"b0"])
        await asyncio.sleep(0)
        await proto.tick()  # returns at once: each partition commits in its own task
        await asyncio.wait_for(prods[TP].committing.wait(), 1)
        await asyncio.wait_for(fast, 1)  # partition 1 committed while partition 0's commit hangs
        assert not slow.done()
        assert visible == [b"b0"]
        gate.set()
        await asyncio.wait_for(slow, 1)
        await proto.close(asyncio.get_running_loop().time() + 1)
        return visible, proto

    visible, proto = asyncio.run(go())
    assert sorted(visible) == [b"a0", b"b0"] and proto.failure is None


def test_a_commit_that_fails_after_its_partition_was_revoked_does_not_stop_the_worker():
    async def go():
        consumer = MemConsumer()
        gate = asyncio.Event()
        failures: list = []

        class Failing(SlowCommitProducer):
            async def send_offsets_to_transaction(self, offsets, group_id):
                self.committing.set()
                await self.gate.wait()
                raise KafkaTimeoutError("the coordinator moved")

        prod = Failing([], consumer, gate=gate)
        proto = ExactlyOnce(consumer, lambda tp: prod, group_id="g", commit_interval_s=0.0,
                            on_failure=failures.append)
        await proto.assign([TP])
        pub, _ = await _publish(proto, TP, [Rec(0)], [b"x"])
        await asyncio.sleep(0)
        await proto.tick()
        await asyncio.wait_for(prod.committing.wait(), 1)
        loop = asyncio.get_running_loop()
        revoke = asyncio.ensure_future(proto.revoke([TP], loop.time() + 2))
        await asyncio.sleep(0.01)
        gate.set()  # the commit fails now, with the partition being revoked
        await revoke
        with pytest.raises(PartitionClosed):
            await pub  # its handler is told "not published; the next owner re-reads"
        return failures, proto

    failures, proto = asyncio.run(go())
    assert failures == [] and proto.failure is None, "a revoked partition's failed commit restarts nothing"
    assert proto.aborted == 1


def test_a_failed_commit_of_an_assigned_partition_goes_to_the_supervisor():
    async def go():
        consumer = MemConsumer()
        failures: list = []
        proto = ExactlyOnce(consumer, lambda tp: MemProducer([], consumer, fail_commit_at=1), group_id="g",
                            commit_interval_s=0.0, on_failure=failures.append)
        await proto.assign([TP])
        pub, _ = await _publish(proto, TP, [Rec(0)], [b"x"])
        await asyncio.sleep(0)
        await proto.tick()
        await proto.commits_settled()
        with pytest.raises(DeliveryFailed):
            await pub
        return failures, proto

    failures, proto = asyncio.run(go())
    assert len(failures) == 1 and isinstance(failures[0], DeliveryFailed)
    assert proto.parts[TP].state is Lifecycle.FAILED


def test_a_commit_cut_off_before_commit_transaction_aborts_its_transaction():
    """A tick cancelled mid-commit used to leave the transaction open (read_committed readers stall)."""
    async def go():
        consumer = MemConsumer()
        calls: list = []

        class NeverAcked(MemProducer):
            async def send(self, topic, value, key=None, headers=None):
                self.txn.append(value)
                return asyncio.get_running_loop().create_future()  # the ack never comes

            async def abort_transaction(self):
                calls.append("abort")
                await super().abort_transaction()

        prod = NeverAcked([], consumer)
        proto = ExactlyOnce(consumer, lambda tp: prod, group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        pub, _ = await _publish(proto, TP, [Rec(0)], [b"x"])
        await asyncio.sleep(0)
        await proto.tick()
        await asyncio.sleep(0.01)
        await proto.abandon(asyncio.get_running_loop().time() + 2)  # after a failure: cut everything off
        await asyncio.gather(pub, return_exceptions=True)
        return calls, prod

    calls, prod = asyncio.run(go())
    assert calls == ["abort"] and prod.txn is None and prod.stopped


def test_a_commit_that_times_out_after_commit_transaction_is_not_aborted_and_latches():
    """Its outcome is the broker's: aborting a committing producer is refused; the next reader fences it."""
    async def go():
        consumer = MemConsumer()
        calls: list = []

        class Hangs(MemProducer):
            async def commit_transaction(self):
                await asyncio.sleep(3600)

            async def abort_transaction(self):
                calls.append("abort")

        proto = ExactlyOnce(consumer, lambda tp: Hangs([], consumer), group_id="g", commit_interval_s=0.0,
                            txn_timeout_s=0.05)
        await proto.assign([TP])
        pub, _ = await _publish(proto, TP, [Rec(0)], [b"x"])
        await asyncio.sleep(0)
        await proto.tick()
        await proto.commits_settled()
        await asyncio.gather(pub, return_exceptions=True)
        return calls, proto

    calls, proto = asyncio.run(go())
    assert calls == [] and proto.outcome_unknown == 1
    assert proto.parts[TP].state is Lifecycle.FAILED and isinstance(proto.failure, DeliveryFailed)
    assert proto.committed_end == {}, "not recorded as committed either"


def test_a_partition_that_fails_to_start_cancels_the_others_starting_beside_it():
    async def go():
        consumer = MemConsumer()
        prods = {}

        class Hangs(MemProducer):
            async def start(self):
                await asyncio.sleep(3600)

        class Refused(MemProducer):
            async def start(self):
                raise KafkaTimeoutError("InitProducerId failed")

        def make(tp):
            prods[tp] = Refused([], consumer) if tp == TP else Hangs([], consumer)
            return prods[tp]

        proto = ExactlyOnce(consumer, make, group_id="g", commit_interval_s=0.0)
        with pytest.raises(KafkaTimeoutError):
            await asyncio.wait_for(proto.assign([TP, TP1]), 2)
        return prods

    prods = asyncio.run(go())
    assert prods[TP1].stopped, "the sibling's producer was stopped, not left starting"


def test_a_committed_offset_read_that_never_answers_times_out():
    from pipeline.kafka import OffsetReadTimeout

    async def go():
        class Loading(MemConsumer):
            async def committed(self, tp):
                await asyncio.sleep(3600)  # a coordinator loading for ever

        consumer = Loading()
        prods = []

        def make(tp):
            prods.append(MemProducer([], consumer))
            return prods[-1]

        proto = ExactlyOnce(consumer, make, group_id="g", commit_interval_s=0.0, txn_timeout_s=0.1)
        with pytest.raises(OffsetReadTimeout):
            await asyncio.wait_for(proto.assign([TP]), 2)
        return consumer, prods

    consumer, prods = asyncio.run(go())
    assert TP in consumer.paused, "never resumed on a guess"
    assert prods[0].stopped


def test_exactly_once_sends_the_transaction_again_with_fallbacks_for_records_refused_as_too_large():
    """At-least-once had a fallback for a record the broker refuses as too large; exactly-once aborted and
    restarted for ever. Now: abort, then the same outputs again in one transaction, the refused one replaced."""
    from aiokafka.errors import RecordTooLargeError

    async def go():
        consumer = MemConsumer()
        visible: list = []

        class Limit(MemProducer):
            def _ack(self, fut, value):
                if len(value) > 10 and not fut.done():
                    fut.set_exception(RecordTooLargeError("over the topic's max.message.bytes"))
                    return
                super()._ack(fut, value)

        proto = ExactlyOnce(consumer, lambda tp: Limit(visible, consumer), group_id="g", commit_interval_s=0.0)
        await proto.assign([TP])
        b = proto.admit(TP, [Rec(0), Rec(1), Rec(2)])
        outs = [Output("o", None, b"a", []), Output("o", None, b"x" * 100, [], Output("dlq", None, b"fb", [])),
                Output("o", None, b"c", [])]
        pub = asyncio.ensure_future(proto.publish(b, outs))
        await asyncio.sleep(0)
        await proto.tick()
        await asyncio.wait_for(pub, 2)
        return visible, consumer, proto

    visible, consumer, proto = asyncio.run(go())
    assert visible == [b"a", b"fb", b"c"], "in order, the refused record replaced by its fallback"
    assert consumer.stored[TP] == 3 and proto.too_large == 1 and proto.failure is None
