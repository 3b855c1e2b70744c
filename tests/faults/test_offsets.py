"""Committed offsets read on the real broker: strictly (a loading coordinator is waited for) and stably (an open
transaction holding offsets is waited for), so a partition is never resumed from a guess.

These are the two reads behind the exactly-once duplicates after a broker restart: aiokafka alone answers
"never committed" while the coordinator loads, and the offset from before a transaction that is still ending.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiokafka import TopicPartition

from pipeline import kafka as K
from pipeline.cli.local_services import LocalKafka
from producers.topics import ensure_topics

pytestmark = pytest.mark.faults


async def _group_consumer(bootstrap: str, group: str):
    c = K.consumer(bootstrap, group_id=group)
    await c.start()
    return c


async def _aiokafka_read(c, tp):
    """What aiokafka alone answers (the response's group-level error ignored, no stable read)."""
    await c._coordinator.ensure_coordinator_known()
    got = await K.AIOKAFKA_FETCH(c._coordinator, [tp])
    return got[tp].offset if tp in got else None


async def test_a_stable_read_waits_for_an_open_transaction_and_sees_a_commit_the_client_gave_up_on(kafka, names):
    await ensure_topics(kafka.bootstrap, [names.input, names.output], partitions=1)
    tp = TopicPartition(names.input, 0)
    c = await _group_consumer(kafka.bootstrap, names.group)
    tx = K.transactional_producer(K.KafkaSettings(bootstrap_servers=kafka.bootstrap), f"t-{names.tag}")
    await tx.start()
    try:
        await tx.begin_transaction()
        await (await tx.send(names.output, b"label"))
        await tx.send_offsets_to_transaction({tp: 10}, names.group)
        # The transaction holding offset 10 is open: aiokafka alone answers the stale "never committed"; the
        # strict read does not answer until the transaction has ended.
        assert await _aiokafka_read(c, tp) is None
        with pytest.raises(K.OffsetReadTimeout):
            await K.committed(c, tp, 2.0)
        # The client gives up on commit_transaction almost at once; the broker commits it all the same.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(tx.commit_transaction(), 0.001)
        assert await K.committed(c, tp, 30.0) == 10
    finally:
        await tx.stop()
        await c.stop()


@pytest.fixture()
def own_kafka(tmp_path):
    broker = LocalKafka(tmp_path / "kafka").start()
    yield broker
    broker.kill()


async def test_committed_offsets_read_right_after_a_broker_restart(own_kafka):
    """Consumers that live through the restart (as a worker's does) read as soon as the broker is back, while
    its group coordinator may still be loading __consumer_offsets."""
    topic, group = "restart-in", "restart-g"
    await ensure_topics(own_kafka.bootstrap, [topic], partitions=2)
    tps = [TopicPartition(topic, p) for p in (0, 1)]
    plain_c = await _group_consumer(own_kafka.bootstrap, group)
    strict_c = await _group_consumer(own_kafka.bootstrap, group)
    try:
        plain_c.assign(tps)
        await plain_c.commit({tps[0]: 37, tps[1]: 5})
        assert await K.committed(strict_c, tps[0], 30.0) == 37  # both know the coordinator now
        await _aiokafka_read(plain_c, tps[0])
        await asyncio.to_thread(own_kafka.kill)

        async def plain_reads():
            out = []
            for _ in range(400):
                try:
                    got = await K.AIOKAFKA_FETCH(plain_c._coordinator, [tps[0]])
                    out.append(got[tps[0]].offset if tps[0] in got else None)
                except Exception as exc:  # noqa: BLE001 — raising is fine: it is the silent None that is not
                    out.append(type(exc).__name__)
                await asyncio.sleep(0.05)  # sampling what aiokafka answers over the first seconds
            return [x for i, x in enumerate(out) if i == 0 or x != out[i - 1]]  # the changes only

        async def strict_read():
            await asyncio.sleep(0.5)  # it starts reading while the broker is still starting
            return await K.committed(strict_c, tps[0], 90.0)

        # Both read from before the broker listens again: same port, same data, __consumer_offsets loads again.
        plain, first, _ = await asyncio.gather(plain_reads(), strict_read(), asyncio.to_thread(own_kafka.start))
        second = await K.committed(strict_c, tps[1], 60.0)
    finally:
        await plain_c.stop()
        await strict_c.stop()
    print(f"after the restart: aiokafka alone read {plain}; the strict read {first}, {second}")
    assert (first, second) == (37, 5)
