"""Hot swap without a broker: which version a name directory points at, and the follower's checks (a verified,
gated classifier of the same labels and tokenizer, loaded, warmed and answering the recent texts) and switch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.engine import OnnxEngine
from pipeline.errors import ConfigError, ModelError
from pipeline.metrics import Metrics
from pipeline.swap import ModelFollower, target_version
from pipeline.tasks import open_task


def publish(src: Path, name_dir: Path, version: int, **manifest_changes) -> Path:
    """A copy of artifact ``src`` as version ``version`` of ``name_dir`` (written aside, then renamed into place)."""
    tmp = name_dir / f".staging-{version}"
    shutil.copytree(src, tmp)
    m = json.loads((tmp / "manifest.json").read_text())
    m.update(version=version, **manifest_changes)
    (tmp / "manifest.json").write_text(json.dumps(m))
    tmp.rename(name_dir / str(version))
    return name_dir / str(version)


@pytest.fixture()
def name_dir(tmp_path, tiny_artifact) -> Path:
    d = tmp_path / "models" / "tiny"
    d.mkdir(parents=True)
    publish(tiny_artifact, d, 1)
    return d


def test_the_target_is_current_else_the_newest_version(name_dir, tiny_artifact):
    assert target_version(name_dir) == name_dir / "1"
    publish(tiny_artifact, name_dir, 2)
    (name_dir / "10").mkdir()  # a version still being written (no manifest yet) is not a target
    assert target_version(name_dir) == name_dir / "2"
    (name_dir / "current").write_text("1\n")
    assert target_version(name_dir) == name_dir / "1"
    (name_dir / "current").write_text("latest")
    with pytest.raises(ModelError, match="not a version number"):
        target_version(name_dir)


def test_a_following_worker_starts_on_the_version_current_names_not_the_newest(name_dir, tiny_artifact):
    """A worker started after a rollback (``current`` = 1 while 2 exists) serves 1 from its first record; it does not
    load 2 and switch at its first look."""
    from pipeline.swap import starting_version
    from pipeline.tasks import load_engine

    publish(tiny_artifact, name_dir, 2)
    s = Settings().replace(model={"path": str(name_dir), "follow": True, "provider": "cpu"})
    assert Path(starting_version(s.model).path) == name_dir / "2", "no current: the newest"
    (name_dir / "current").write_text("1\n")
    m = starting_version(s.model)
    assert Path(m.path) == name_dir / "1"
    engine = load_engine(m)
    try:
        assert engine.model_id == "tiny@1"
    finally:
        engine.close()
    plain = Settings().replace(model={"path": str(name_dir), "provider": "cpu"})
    assert starting_version(plain.model) is plain.model, "without follow: the path as given (the newest)"
    for bad in ("latest", "", "7"):  # unreadable, half written, no such version: start as without current
        (name_dir / "current").write_text(bad)
        assert starting_version(s.model) is s.model


def test_follow_needs_a_name_directory_and_no_cascade(name_dir):
    with pytest.raises(ConfigError, match="name directory"):
        Settings().replace(model={"path": str(name_dir / "1"), "follow": True})
    with pytest.raises(ConfigError, match="not a cascade"):
        Settings().replace(model={"path": str(name_dir), "follow": True, "cascade": ["a", "b"]})


async def test_a_new_version_is_checked_then_served_a_broken_one_refused_and_rollback_moves_back(name_dir, tiny_artifact):
    s = Settings().replace(model={"path": str(name_dir), "follow": True, "provider": "cpu"})
    first = OnnxEngine(name_dir / "1", provider="cpu")
    metrics = Metrics()
    task = open_task(s, first, metrics=metrics)
    switched = []
    f = ModelFollower(s, task, metrics=metrics, on_switch=lambda old, new: switched.append((old.model_id, new.model_id)))
    f.recent.extend(["great service", "awful delay", "the meeting is at noon"])
    sample = metrics.registry.get_sample_value
    try:
        assert await f.check() is None, "nothing new"
        publish(tiny_artifact, name_dir, 2)
        assert await f.check() == "switched"
        assert task.model_id == task.cache_namespace == "tiny@2" and task.scheduler.engine.model_id == "tiny@2"
        assert switched == [("tiny@1", "tiny@2")]
        assert sample("streamlabel_model_swaps_total", {"result": "switched"}) == 1
        # A corrupt candidate (its ONNX file no longer matches the manifest's sha256) is refused, once.
        bad = publish(tiny_artifact, name_dir, 3)
        onnx = bad / json.loads((bad / "manifest.json").read_text())["variants"]["int8"]["file"]
        onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
        assert await f.check() == "refused" and task.model_id == "tiny@2"
        assert "sha256" in f.refused[str(bad.resolve())] or "checksum" in f.refused[str(bad.resolve())]
        assert await f.check() is None, "not tried again until the target moves"
        assert sample("streamlabel_model_swaps_total", {"result": "refused"}) == 1
        # One that failed its quality gate, or has other labels, is refused too.
        (name_dir / "current").write_text("4")
        publish(tiny_artifact, name_dir, 4, gate={"passed": False})
        assert await f.check() == "refused" and "quality gate" in f.refused[str((name_dir / "4").resolve())]
        (name_dir / "current").write_text("5")
        publish(tiny_artifact, name_dir, 5, labels=["bad", "good", "meh"])
        assert await f.check() == "refused" and "labels" in f.refused[str((name_dir / "5").resolve())]
        assert task.model_id == "tiny@2"
        # Rollback: the same operation, pointing current at the old version.
        (name_dir / "current").write_text("1")
        assert await f.check() == "switched" and task.model_id == "tiny@1"
        out = task.scheduler.engine.predict_sync(["fine"])
        assert out[0].model == "tiny@1"
    finally:
        task.scheduler.engine.close()


def test_a_canary_share_by_key_hash_is_stable_and_matches_the_setting():
    from pipeline.swap import key_share

    keys = [f"customer-{i}".encode() for i in range(10_000)]
    for share in (0.05, 0.1, 0.5):
        picked = [k for k in keys if key_share(k) < share]
        assert abs(len(picked) / len(keys) - share) <= 0.02, (share, len(picked))
        assert picked == [k for k in keys if key_share(k) < share], "the same keys every time"
    small, big = ({k for k in keys if key_share(k) < s} for s in (0.1, 0.3))
    assert small <= big, "raising the share only adds keys: nobody moves back and forth"


async def test_the_canary_file_starts_moves_and_ends_a_canary(name_dir, tiny_artifact):
    s = Settings().replace(model={"path": str(name_dir), "follow": True, "provider": "cpu"},
                           batching={"engine_timeout_s": 1})
    task = open_task(s, OnnxEngine(name_dir / "1", provider="cpu"))
    f = ModelFollower(s, task)
    try:
        publish(tiny_artifact, name_dir, 2)
        (name_dir / "current").write_text("1")
        (name_dir / "canary").write_text("2 0.1\n")
        await f.check()
        assert task.canary.model_id == "tiny@2" and task.canary_share == 0.1 and task.model_id == "tiny@1"
        got = await task.canary_scheduler.submit_many(["the canary answers this"])
        assert got.results[0].model == "tiny@2"
        (name_dir / "canary").write_text("2 0.3")
        await f.check()
        assert task.canary_share == 0.3 and task.canary.model_id == "tiny@2"
        (name_dir / "canary").write_text("two thirds")
        await f.check()
        assert task.canary_share == 0.3, "an unreadable canary file changes nothing"
        (name_dir / "canary").unlink()
        await f.check()
        assert task.canary is None and task.canary_scheduler is None
    finally:
        task.scheduler.engine.close()


class Idle:
    """The served batcher as a shadow sees it: nothing waiting, the engine idle."""

    max_batch = 64

    def waiting(self):
        return 0

    def utilization(self):
        return 0.0


async def test_a_shadow_labels_beside_the_served_model_and_is_dropped_when_the_served_one_is_backed_up(name_dir, tiny_artifact):
    import asyncio

    s = Settings().replace(model={"path": str(name_dir), "follow": True, "provider": "cpu", "shadow_idle_min": 0.0},
                           batching={"engine_timeout_s": 1})
    metrics = Metrics()
    task = open_task(s, OnnxEngine(name_dir / "1", provider="cpu"), metrics=metrics)
    f = ModelFollower(s, task, metrics=metrics)
    try:
        publish(tiny_artifact, name_dir, 2)
        (name_dir / "current").write_text("1")
        (name_dir / "shadow").write_text("2")
        await f.check()
        assert task.shadow is not None and task.shadow.engine.model_id == "tiny@2" and task.model_id == "tiny@1"
        assert task.shadow.idle is None, "shadow_idle_min = 0: no CPU check"
        assert task.shadow.batcher.max_batch == 16, "a CPU shadow's calls are short"
        texts = ["great service", "awful delay", "the meeting is at noon", "fine"]
        served = task.engine.predict_sync(texts)

        class BackedUp(Idle):
            def waiting(self):
                return 64

        class Busy(Idle):
            def utilization(self):
                return 0.9

        task.shadow.offer(texts, served, Idle())
        deadline = asyncio.get_running_loop().time() + 10
        while task.shadow.agree + task.shadow.disagree < len(texts):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert task.shadow.agreement == 1.0, "the same weights agree"
        sample = metrics.registry.get_sample_value
        assert sample("streamlabel_shadow_total", {"result": "agree"}) == 4
        assert sum(task.shadow.confusion.values()) == 4
        task.shadow.offer(texts, served, BackedUp())
        assert task.shadow.dropped == 4 and sample("streamlabel_shadow_total", {"result": "dropped"}) == 4
        guard = task.shadow.guard_s
        assert guard == task.objective_ms / 2000, "half the objective"
        task.shadow.offer(texts, served, Idle(), slack_s=guard * 0.9)  # the served path runs close to its objective
        assert task.shadow.dropped == 8, "dropped while the served answers had less than half their deadline left"
        task.shadow.offer(texts, served, Busy())
        assert task.shadow.dropped == 12, "dropped while the served engine was busy most of the last second"

        class Share:
            def __init__(self, v):
                self.v = v

            def share(self):
                return self.v

        task.shadow.idle, task.shadow.idle_min = Share(0.3), 0.5
        task.shadow.offer(texts, served, Idle())
        assert task.shadow.dropped == 16, "dropped while less than half the machine's CPU was idle"
        task.shadow.idle = Share(None)
        task.shadow.offer(texts, served, Idle())
        assert task.shadow.dropped == 20, "dropped before the first reading of the CPU"
        task.shadow.idle = Share(0.8)
        task.shadow.offer(texts, served, Idle())
        assert task.shadow.dropped == 20, "labelled while most of the CPU was idle"
        deadline = asyncio.get_running_loop().time() + 10
        while task.shadow.agree + task.shadow.disagree < 2 * len(texts):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        (name_dir / "shadow").unlink()
        await f.check()
        assert task.shadow is None
    finally:
        task.scheduler.engine.close()


async def test_a_generator_served_as_a_classifier_can_shadow_the_classifier(name_dir, tiny_generator):
    """The shadow file may name another artifact: with generate.labels set, a generator labels the same texts by
    label-constrained decoding, beside the served classifier (its own tokenizer: it is handed texts)."""
    import asyncio

    labels = ["negative", "neutral", "positive"]
    s = Settings().replace(model={"path": str(name_dir), "follow": True, "provider": "cpu", "shadow_idle_min": 0.0},
                           generate={"labels": labels, "instruction": "Classify the sentiment."},
                           batching={"engine_timeout_s": 1})
    task = open_task(s, OnnxEngine(name_dir / "1", provider="cpu"))
    f = ModelFollower(s, task)
    try:
        (name_dir / "shadow").write_text(str(tiny_generator))
        await f.check()
        assert task.shadow is not None and task.shadow.engine.model_id.endswith(":choice")
        texts = ["great service", "awful delay", "the meeting is at noon"]

        task.shadow.offer(texts, task.engine.predict_sync(texts), Idle())
        deadline = asyncio.get_running_loop().time() + 20
        while task.shadow.agree + task.shadow.disagree < len(texts):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert sum(task.shadow.confusion.values()) == 3
        assert {b for _, b in task.shadow.confusion} <= set(labels)
    finally:
        task.scheduler.engine.close()


def test_idle_cpu_reads_the_machine_or_the_cgroup_quota(tmp_path):
    """The share of CPU left idle: from /proc/stat's busy and idle jiffies (iowait is idle, steal is busy), or, when
    the cgroup sets a quota, from its usage against that quota. Smoothed; None until two readings."""
    from pipeline.runtime import IdleCpu

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n")
    clock = [0.0]
    idle = IdleCpu(period_s=0.25, proc_stat=str(stat), cgroup=str(tmp_path / "no-cgroup"), clock=lambda: clock[0])
    assert idle.share() is None
    stat.write_text("cpu  400 0 100 900 100 0 0 100 0 0\n")  # +300 user, +200 idle, +100 steal: a third idle
    clock[0] = 0.3
    assert abs(idle.share() - 200 / 600) < 1e-9
    stat.write_text("cpu  400 0 100 1500 100 0 0 100 0 0\n")  # +600 idle only: all idle, smoothed with the last
    clock[0] = 0.4
    assert abs(idle.share() - 200 / 600) < 1e-9, "within the period: the last figure"
    clock[0] = 0.7
    assert abs(idle.share() - (0.5 * 200 / 600 + 0.5)) < 1e-9, "quieter: recovers gradually"
    stat.write_text("cpu  940 0 100 1560 100 0 0 100 0 0\n")  # +540 busy, +60 idle: a load starts
    clock[0] = 1.0
    assert abs(idle.share() - 0.1) < 1e-9, "busier: the latest sample at once"

    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("150000 100000\n")  # 1.5 cores
    (cg / "cpu.stat").write_text("usage_usec 1000000\nuser_usec 1\n")
    t = [10.0]
    q = IdleCpu(period_s=0.25, proc_stat=str(stat), cgroup=str(cg), clock=lambda: t[0])
    (cg / "cpu.stat").write_text("usage_usec 1750000\n")  # 0.75 s of CPU in 1 s of 1.5 cores: half idle
    t[0] = 11.0
    assert abs(q.share() - 0.5) < 1e-9
    (cg / "cpu.max").write_text("max 100000\n")
    assert IdleCpu(proc_stat=str(stat), cgroup=str(cg))._quota is None, "no quota: the machine's figures"
    assert IdleCpu(proc_stat=str(tmp_path / "missing"), cgroup=str(cg)).share() is None
