"""The strict committed-offset read (pipeline/kafka.py): a group-level error is an error, never "never committed".

aiokafka's coordinator loop is driven here with canned broker responses (the real-broker counterparts are in
tests/faults/test_offsets.py): the response a just-restarted broker gives (COORDINATOR_LOAD_IN_PROGRESS at the
top level, no partitions), NOT_COORDINATOR, and KIP-447's UNSTABLE_OFFSET_COMMIT.
"""

from __future__ import annotations

import io

import aiokafka.errors as Errors
import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.commit import OffsetFetchResponse_v3

from pipeline import kafka as K

TP = TopicPartition("in", 0)


def v3(topics=(), error=0):
    return OffsetFetchResponse_v3(0, list(topics), error)


def v7(topics=(), error=0):
    return K._OffsetFetchResponse_v7(0, list(topics), error, {})


def ok_v3(offset):
    return v3([("in", [(0, offset, "", 0)])])


def ok_v7(offset, code=0):
    return v7([("in", [(0, offset, -1, "", code, {})], {})])


class Coordinator:
    """What ``GroupCoordinator.fetch_committed_offsets`` uses of ``self``; ``_send_req`` answers from a script."""

    group_id = "g"
    _retry_backoff_ms = 1
    _do_fetch_commit_offsets = GroupCoordinator._do_fetch_commit_offsets  # the strict one, once pipeline.kafka loaded

    def __init__(self, *responses) -> None:
        self.responses = list(responses)
        self.requests = []
        self.dead = 0

    async def ensure_coordinator_known(self):
        pass

    async def _send_req(self, request):
        self.requests.append(request)
        return self.responses.pop(0)

    def coordinator_dead(self):
        self.dead += 1


async def test_aiokafka_alone_takes_a_loading_coordinator_for_never_committed():
    """The bug: the group-level error is ignored and the empty answer means "no committed offset"."""
    got = await K.AIOKAFKA_FETCH(Coordinator(v3(error=14)), [TP])
    assert got == {}


@pytest.mark.parametrize("first", [v3(error=14), v3(error=16), v3(error=15), v7(error=14), ok_v7(-1, code=88)],
                         ids=["loading", "not-coordinator", "coordinator-unavailable", "loading-v7", "unstable"])
async def test_the_strict_read_retries_until_the_broker_answers(first):
    c = Coordinator(first, ok_v3(42))
    got = await GroupCoordinator.fetch_committed_offsets(c, [TP])
    assert got[TP].offset == 42 and len(c.requests) == 2
    if first.error_code in (15, 16):
        assert c.dead == 1, "the coordinator is looked up again"


async def test_never_committed_only_when_the_broker_says_so():
    assert await GroupCoordinator.fetch_committed_offsets(Coordinator(ok_v3(-1)), [TP]) == {}
    assert await GroupCoordinator.fetch_committed_offsets(Coordinator(ok_v7(-1)), [TP]) == {}


async def test_a_non_retriable_error_is_raised():
    with pytest.raises(Errors.GroupAuthorizationFailedError):
        await GroupCoordinator.fetch_committed_offsets(Coordinator(v3(error=30)), [TP])


def test_the_read_asks_for_stable_offsets_where_the_broker_can():
    req = K.StableOffsetFetch("g", [("in", [0, 1])])
    assert req.prepare({9: (1, 9)}).API_VERSION == 7
    assert req.prepare({9: (1, 6)}).API_VERSION == 3
    v7req = req.prepare({9: (1, 9)})
    assert v7req.require_stable is True
    # the v7 request and response encode and decode as Kafka's flexible versions do
    wire = v7req.encode()
    assert wire.endswith(b"\x01\x00"), "require_stable, then no tagged fields"
    resp = ok_v7(42)
    back = K._OffsetFetchResponse_v7.decode(io.BytesIO(resp.encode()))
    assert K.offsets_from_response(back)[TP].offset == 42
