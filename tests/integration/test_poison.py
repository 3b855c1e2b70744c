"""A poison corpus through the real broker: every offset is labelled or dead-lettered, the worker stays up,
the partition never stalls.

Records a newcomer produced with kcat and friends: header keys that are not UTF-8 (aiokafka cannot parse
them), values at and over the size limits with and without large headers, a UTF-8 BOM before a JSON
object, input headers posing as the DLQ's own.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumers.records import H_DROPPED, H_ERROR, H_OFFSET, H_TRUNCATED
from pipeline.engine import OnnxEngine
from pipeline.events import encode_input
from producers.topics import committed, end_offsets, ensure_topics, read_until

from .helpers import running_worker, settings_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by `make services`")]

NEAR_LIMIT = 1_040_000  # a value just under the broker's default message.max.bytes (1,048,588)


async def committed_reaches(bootstrap: str, group: str, topic: str, n: int, timeout: float = 10.0) -> None:
    """The group's committed offset of partition 0 reaches ``n`` (the partition did not stall)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := (await committed(bootstrap, group, topic, 1))[0]) != n:
        assert asyncio.get_running_loop().time() < deadline, f"partition stalled: committed {got} of {n}"
        await asyncio.sleep(0.1)  # polling the broker's committed offsets


def kcat_produce(bootstrap: str, topic: str, values: list[bytes], header: bytes) -> None:
    """One kcat invocation: one producer batch whose records all carry ``header`` (raw bytes, key=value)."""
    subprocess.run([b"kcat", b"-P", b"-b", bootstrap.encode(), b"-t", topic.encode(), b"-p", b"0", b"-H", header],
                   input=b"\n".join(values) + b"\n", check=True, timeout=60, capture_output=True)


async def test_poison_corpus_every_offset_answered_no_stall(kafka, names, tiny_artifact):
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq], partitions=1)
    big_headers = [(f"h{i}", b"x" * 104_800) for i in range(10)]  # the input fits the broker; a copy with more would not
    plan: list[tuple[str, str]] = []  # (what, expected: "label:<id>" | "dlq:<reason prefix>")

    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=2_000_000)
    await p.start()

    async def send(what: str, expect: str, value: bytes | None, headers=None):
        await (await p.send(names.input, value=value, headers=headers or [], partition=0))
        plan.append((what, expect))

    try:
        await send("good before", "label:g0", encode_input("hello there", id="g0"))
        kcat_produce(kafka.bootstrap, names.input, [encode_input("bad header key", id="h1")], b"\xff\xfe=x")
        plan.append(("header key not UTF-8", "dlq:unreadable"))
        await send("good after", "label:g2", encode_input("a fine message", id="g2"))
        await send("BOM before JSON", "label:bom", b"\xef\xbb\xbf" + encode_input("with a byte-order mark", id="bom"))
        await send("spoofed streamlabel.* header", "dlq:invalid JSON", b'{"text": ',
                   headers=[("streamlabel.error", b"fake"), ("streamlabel.source.offset", b"999")])
        await send("value just under the broker limit", "dlq:oversized",
                   b'{"text": "' + b"a" * NEAR_LIMIT + b'"}')
        await send("value over max_bytes", "dlq:oversized", b'{"text": "' + b"b" * 70_000 + b'"}')
        await send("1 MB of headers, bad value", "dlq:invalid JSON", b"{oops", headers=big_headers)
        await send("1 MB of headers, good value", "dlq:publish", encode_input("headers galore", id="hh"),
                   headers=big_headers)
        kcat_produce(kafka.bootstrap, names.input, [b"one", b"two", b"three"], b"\xc3\x28=y")
        plan += [("header key not UTF-8 (batch of 3)", "dlq:unreadable")] * 3
        await send("good last", "label:g9", encode_input("the last one", id="g9"))
    finally:
        await p.stop()
    n = len(plan)
    ends = await end_offsets(kafka.bootstrap, names.input)
    assert ends == {0: n}, f"the plan must match the topic: {ends} vs {n}"

    eng = OnnxEngine(tiny_artifact, provider="cpu")
    s = settings_for(kafka, names)
    try:
        async with running_worker(s, eng) as w:
            def answered(recs):
                return len(recs) >= n

            out = await read_until(kafka.bootstrap, [names.output, names.dlq], answered, 90)
            await committed_reaches(kafka.bootstrap, names.group, names.input, n)  # no stall
            assert w._fatal is None, f"worker failed: {w._fatal!r}"
            assert w.unreadable == 4
    finally:
        eng.close()

    labels = {orjson.loads(r.value)["id"]: r for r in out if r.topic == names.output}
    dlq = {int(dict(r.headers)[H_OFFSET]): r for r in out if r.topic == names.dlq}
    assert len(labels) + len(dlq) == n, (sorted(labels), sorted(dlq))
    for offset, (what, expect) in enumerate(plan):
        kind, _, arg = expect.partition(":")
        if kind == "label":
            assert arg in labels, f"offset {offset} ({what}) was not labelled"
        else:
            assert offset in dlq, f"offset {offset} ({what}) not dead-lettered"
            reason = dict(dlq[offset].headers)[H_ERROR].decode()
            assert reason.startswith(arg), f"offset {offset} ({what}): {reason}"

    unreadable = dlq[1]
    assert unreadable.value == b"" and "-o 1 " in dict(unreadable.headers)[H_ERROR].decode()
    spoofed = dlq[4]
    assert spoofed.headers[0] == (H_ERROR, dict(spoofed.headers)[H_ERROR]), "our headers come first"
    assert [k for k, _ in spoofed.headers].count(H_ERROR) == 1
    assert ("streamlabel.input.error", b"fake") in spoofed.headers
    assert dict(spoofed.headers)[H_OFFSET] == b"4"
    near = dlq[5]
    assert dict(near.headers)[H_TRUNCATED] == str(NEAR_LIMIT + 12).encode()
    assert len(near.value) == s.worker.dlq_max_bytes and near.value == (b'{"text": "' + b"a" * NEAR_LIMIT)[: len(near.value)]
    assert len(dlq[6].value) == 70_012 and H_TRUNCATED not in dict(dlq[6].headers)
    for o in (7, 8):  # too big with our headers added: the fallback keeps the reason and the coordinates
        assert dlq[o].value == b"" and H_DROPPED in dict(dlq[o].headers)
        assert not any(k.startswith("h") for k, _ in dlq[o].headers)
    assert all(dlq[o].value == b"" for o in (9, 10, 11))


async def test_poison_headers_every_offset_labelled_nothing_restarts(kafka, names, tiny_artifact):
    """Every header the worker interprets (``streamlabel.deadline_ms``) with values that are not epoch ms, through
    kcat: each record is labelled with the default deadline, each bad value counted, the worker never fails."""
    from consumers.records import H_DEADLINE
    from pipeline.metrics import Metrics

    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq], partitions=1)
    values = [b"", b"abc", b"9" * 400, b"9" * 4300, b"9" * 5000, b"-1732330000123", b"NaN", b"inf", b"1e309",
              b"\xff\xfe\xfd", b" 123", b"0x10", "١٢٣".encode()]
    for i, v in enumerate(values):
        kcat_produce(kafka.bootstrap, names.input, [encode_input(f"header poison {i}", id=f"p{i}")],
                     H_DEADLINE.encode() + b"=" + v)
    good = 1_900_000_000_000  # a valid deadline far ahead, to show the header is still read when it is one
    kcat_produce(kafka.bootstrap, names.input, [encode_input("a good deadline", id="ok")],
                 H_DEADLINE.encode() + b"=" + str(good).encode())
    n = len(values) + 1
    eng = OnnxEngine(tiny_artifact, provider="cpu")
    metrics = Metrics()
    try:
        async with running_worker(settings_for(kafka, names), eng, metrics=metrics) as w:
            out = await read_until(kafka.bootstrap, [names.output, names.dlq], lambda r: len(r) >= n, 60)
            await committed_reaches(kafka.bootstrap, names.group, names.input, n)  # no stall
            assert w._fatal is None, f"worker failed: {w._fatal!r}"
    finally:
        eng.close()
    ids = sorted(orjson.loads(r.value)["id"] for r in out if r.topic == names.output)
    assert ids == sorted([f"p{i}" for i in range(len(values))] + ["ok"]), "every record labelled, none dead-lettered"
    ignored = metrics.registry.get_sample_value("streamlabel_ignored_total", {"what": "deadline_header"})
    assert ignored == len(values)
