"""Hot swap against the real broker: a new version published while open-loop load runs is served from a batch
boundary on, with nothing lost or answered twice and no rebalance (at-least-once and exactly-once); each
partition's outputs name the old version up to a point and the new one after it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

import orjson
import pytest

from consumers.worker import Worker
from pipeline.cache import make_cache
from pipeline.engine import OnnxEngine
from pipeline.events import encode_input
from pipeline.metrics import Metrics
from producers.rate import producer_for_load, send_at_rate
from producers.topics import ensure_topics, produce, read_until

from ..unit.test_swap import publish
from .helpers import read_labels, settings_for

pytestmark = pytest.mark.integration


async def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def name_dir_with(tmp_path, artifact, versions=(1,), **files: str):
    """A followed name directory holding ``versions`` of ``artifact`` and the control files given (current, …)."""
    name_dir = tmp_path / "models" / "tiny"
    name_dir.mkdir(parents=True)
    for v in versions:
        publish(artifact, name_dir, v)
    for name, text in files.items():
        (name_dir / name).write_text(text)
    return name_dir


@contextlib.asynccontextmanager
async def following_worker(kafka, names, name_dir, *, model=None, worker=None, topics=(), interval_s: float = 0.1):
    """A worker following ``name_dir`` (serving version 1 at first), with its metrics and the assignments it saw."""
    s = settings_for(kafka, names, model={"path": str(name_dir), "follow": True, "follow_interval_s": interval_s,
                                          "provider": "cpu", **(model or {})},
                     worker={"commit_interval_ms": 100, **(worker or {})})
    await ensure_topics(kafka.bootstrap, [names.input, names.output, names.dlq, *topics], partitions=4)
    metrics = Metrics()
    w = Worker(s, OnnxEngine(name_dir / "1", provider="cpu"), cache=make_cache(s.cache, metrics), metrics=metrics)
    w.assignments = []
    assigned = w._on_assigned

    async def counting(parts):
        w.assignments.append(set(parts))
        await assigned(parts)

    w._on_assigned = counting
    run = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(w.ready.wait(), 60)
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(run, 60)
        w.engine.close()


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_version_published_under_load_is_served_without_a_gap(kafka, names, tiny_artifact, tmp_path, delivery):
    name_dir = name_dir_with(tmp_path, tiny_artifact)
    n, rate = 1500, 250.0
    async with following_worker(kafka, names, name_dir, worker={"delivery": delivery}, interval_s=0.2) as w:
        def records():
            for i in range(n):
                yield f"k{i % 16}".encode(), encode_input(f"swap text {i} about fees and delays", id=f"s{i}")

        async def publish_midway():
            await wait_for(lambda: w.labelled >= n // 3, 60, "a third labelled")
            await asyncio.to_thread(publish, tiny_artifact, name_dir, 2)
            await wait_for(lambda: w.follower.switches == 1, 60, "the switch")

        p = producer_for_load(kafka.bootstrap)
        await p.start()
        try:
            _, rep = await asyncio.gather(publish_midway(), send_at_rate(p, names.input, records(), rate=rate, count=n))
        finally:
            await p.stop()
        out = await read_labels(kafka.bootstrap, names.output, {f"s{i}" for i in range(n)}, timeout=90)
    assignments, metrics = w.assignments, w.metrics
    docs = [(r.partition, r.offset, orjson.loads(r.value)) for r in out]
    ids = [d["id"] for _, _, d in docs]
    assert rep.sent == n and len(ids) == n and set(ids) == {f"s{i}" for i in range(n)}, "none lost, none twice"
    assert len(assignments) == 1, f"no rebalance: {assignments}"
    per_partition = defaultdict(list)
    for part, off, d in sorted(docs, key=lambda x: (x[0], x[1])):
        per_partition[part].append(d["model"])
    for part, models in per_partition.items():
        assert set(models) <= {"tiny@1", "tiny@2"}
        switch = models.index("tiny@2") if "tiny@2" in models else len(models)
        assert models[:switch] == ["tiny@1"] * switch and set(models[switch:]) <= {"tiny@2"}, \
            f"partition {part}: versions out of order around the switch"
    versions = [d["model"] for _, _, d in docs]
    assert versions.count("tiny@1") > 0 and versions.count("tiny@2") > 0
    assert metrics.registry.get_sample_value("streamlabel_model_swaps_total", {"result": "switched"}) == 1


async def test_a_canary_answers_its_share_of_keys_and_a_key_stays_on_one_model(kafka, names, tiny_artifact, tmp_path):
    from pipeline.swap import key_share

    name_dir = name_dir_with(tmp_path, tiny_artifact, (1, 2), current="1", canary="2 0.5")
    keys = [f"customer-{i}" for i in range(40)]
    async with following_worker(kafka, names, name_dir) as w:
        await wait_for(lambda: w.task.canary is not None, 30, "the canary")
        p = producer_for_load(kafka.bootstrap)
        await p.start()
        try:
            for i in range(400):
                await p.send(names.input, key=keys[i % 40].encode(), value=encode_input(f"text {i}", id=f"c{i}"))
            await p.flush()
        finally:
            await p.stop()
        out = await read_labels(kafka.bootstrap, names.output, {f"c{i}" for i in range(400)})
    by_key = defaultdict(set)
    for r in out:
        by_key[r.key.decode()].add(orjson.loads(r.value)["model"])
    assert all(len(m) == 1 for m in by_key.values()), "a key's messages stay on one model"
    on_canary = {k for k, m in by_key.items() if m == {"tiny@2"}}
    assert on_canary == {k for k in keys if key_share(k.encode()) < 0.5} and 0 < len(on_canary) < 40


async def test_a_broken_candidate_is_refused_while_the_old_version_serves_and_rollback_moves_back(
        kafka, names, tiny_artifact, tmp_path):
    """Through the worker and the real broker: a version whose file fails its sha256 is refused (version 1 goes on
    answering), a good one is served, and writing ``current`` back to 1 rolls back; one assignment throughout."""
    import json

    name_dir = name_dir_with(tmp_path, tiny_artifact)
    answered: dict[str, str] = {}

    async def batch(tag: str, n: int = 40) -> set[str]:
        ids = {f"{tag}{i}" for i in range(n)}
        await produce(kafka.bootstrap, names.input, [encode_input(f"{tag} text {i}", id=f"{tag}{i}") for i in range(n)])
        for r in await read_labels(kafka.bootstrap, names.output, ids, timeout=60):
            d = orjson.loads(r.value)
            answered[d["id"]] = d["model"]
        return {answered[i] for i in ids}

    async with following_worker(kafka, names, name_dir) as w:
        sample = w.metrics.registry.get_sample_value
        assert await batch("a") == {"tiny@1"}
        bad = publish(tiny_artifact, name_dir, 2)
        onnx = bad / json.loads((bad / "manifest.json").read_text())["variants"]["int8"]["file"]
        onnx.write_bytes(onnx.read_bytes()[:-4] + b"\x00\x00\x00\x00")
        await wait_for(lambda: sample("streamlabel_model_swaps_total", {"result": "refused"}) == 1, 60, "the refusal")
        assert await batch("b") == {"tiny@1"}, "the old version keeps serving"
        (name_dir / "current").write_text("3")
        publish(tiny_artifact, name_dir, 3)
        await wait_for(lambda: w.task.model_id == "tiny@3", 60, "the switch to 3")
        assert await batch("c") == {"tiny@3"}
        (name_dir / "current").write_text("1")  # rollback
        await wait_for(lambda: w.task.model_id == "tiny@1", 60, "the rollback")
        assert await batch("d") == {"tiny@1"}
    assert len(w.assignments) == 1, "no rebalance"
    assert sample("streamlabel_model_swaps_total", {"result": "switched"}) == 2


async def test_a_shadow_writes_its_comparisons_to_the_shadow_topic(kafka, names, tiny_artifact, tmp_path):
    """model.shadow_topic: each text the shadow labelled becomes one record there (the input key kept, both labels,
    the shadow's model); the served outputs are unchanged and name the served version."""
    name_dir = name_dir_with(tmp_path, tiny_artifact, (1, 2), current="1", shadow="2")
    shadow_topic = f"shadow-{names.tag}"
    async with following_worker(kafka, names, name_dir, model={"shadow_topic": shadow_topic, "shadow_idle_min": 0.0},
                                topics=[shadow_topic]) as w:
        await wait_for(lambda: w.task.shadow is not None, 30, "the shadow")
        for i in range(30):  # one at a time: the served batcher is idle, so the shadow is not dropped
            await produce(kafka.bootstrap, names.input, [encode_input(f"text {i}", id=f"s{i}")], [f"k{i % 3}".encode()])
            await read_labels(kafka.bootstrap, names.output, {f"s{i}"})
        await wait_for(lambda: w.task.shadow.agree + w.task.shadow.dropped >= 30, 30, "the shadow's comparisons")
        agreed = w.task.shadow.agree
        shadowed = await read_until(kafka.bootstrap, [shadow_topic], lambda r: len(r) >= agreed, 30)
    metrics = w.metrics
    assert agreed >= 15, "most texts were compared, not dropped"
    docs = [orjson.loads(r.value) for r in shadowed]
    assert len({d["id"] for d in docs}) == len(docs) == agreed
    for r, d in zip(shadowed, docs):
        assert d["model"] == "tiny@2" and d["served_model"] == "tiny@1" and d["agree"] is True
        assert d["label"] == d["served_label"] and r.key == f"k{int(d['id'][1:]) % 3}".encode()
    assert metrics.shadow.labels("published")._value.get() == agreed
