"""The confidence cascade on tiny artifacts: who escalates, what the output says, overload, calibration."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.cascade import CascadeEngine, calibrate
from pipeline.engine import OnnxEngine
from pipeline.events import Event, label_record
from pipeline.model import presets as P

TEXTS = [e.text for e in P.get("tiny").examples()[1][:120]]


@pytest.fixture(scope="module")
def stages(tiny_artifact):
    first = OnnxEngine(tiny_artifact, variant="int8", provider="cpu", warmup=False)
    second = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu", warmup=False)
    yield first, second
    first.close()
    second.close()


def test_escalates_exactly_the_texts_below_the_threshold(stages):
    first, second = stages
    conf = np.array([p.score for p in first.predict_sync(TEXTS)])  # the scores the cascade compares
    # About half escalate: a threshold between two distinct confidences near the median.
    srt = np.unique(conf)
    j = len(srt) // 2
    threshold = float((srt[j - 1] + srt[j]) / 2)
    cascade = CascadeEngine(first, second, threshold)
    out = cascade.predict_sync(TEXTS)
    stage = np.array([p.stage for p in out])
    assert (stage == 1).tolist() == (conf < threshold).tolist()
    assert 0 < (stage == 1).sum() < len(TEXTS)
    ref2 = second.predict_sync(TEXTS)
    for p, q, s in zip(out, ref2, stage):
        if s == 1:
            assert p.label == q.label and p.model == second.model_id
        assert not p.degraded
    assert cascade.counts == {"first": int((stage == 0).sum()), "escalated": int((stage == 1).sum()), "degraded": 0}
    doc = label_record(Event("e", "t"), out[0], labeled_at_ms=1, latency_ms={"e2e": 1})
    assert doc["cascade_stage"] in (0, 1) and doc["cascade_degraded"] is False


def test_under_overload_the_cascade_stops_escalating_and_says_so(stages):
    first, second = stages
    cascade = CascadeEngine(first, second, 1.0)  # everything would escalate
    cascade.pressure = lambda: True
    out = cascade.predict_sync(TEXTS[:20])
    assert all(p.stage == 0 and p.degraded for p in out)
    assert cascade.counts["degraded"] == 20 and cascade.counts["escalated"] == 0


def test_calibration_reaches_the_target_agreement(stages):
    first, second = stages
    res = calibrate(first, second, TEXTS, None, target=1.0)
    assert res["agreement_with_second"] == 1.0 and 0.0 <= res["threshold"] <= 1.0
    cascade = CascadeEngine(first, second, res["threshold"])
    final = cascade.logits(TEXTS).argmax(1)
    assert (final == second.logits(TEXTS).argmax(1)).mean() == 1.0


def test_compare_gives_speed_and_quality_points_and_a_plot(tiny_artifact, tmp_path):
    from producers.bench.compare import compare

    rep = compare([tiny_artifact], cascade=f"{tiny_artifact},{tiny_artifact},0.5", data_preset="tiny", seconds=0.3,
                  batch=32, plot=tmp_path / "cmp")
    names = [r["name"] for r in rep["rows"]]
    assert names[:2] == ["tiny@1 fp32", "tiny@1 int8"] and names[-1].startswith("cascade")
    for r in rep["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["msgs_per_s"] > 0
    assert (tmp_path / "cmp.png").stat().st_size > 10_000 and "<img" in (tmp_path / "cmp.html").read_text()


async def test_escalations_of_concurrent_calls_are_gathered_into_one_second_stage_call(tiny_artifact):
    """Two first-stage calls run at once (two replicas); their escalated texts go to the second stage together,
    once neither first-stage call is still running, and each call gets its own answers back."""
    first = OnnxEngine(tiny_artifact, variant="int8", provider="cpu", warmup=False, sessions=2)
    second = OnnxEngine(tiny_artifact, variant="fp32", provider="cpu", warmup=False)
    try:
        cascade = CascadeEngine(first, second, 1.0)  # every text escalates
        assert cascade.sessions == 2
        sizes: list[int] = []
        infer = second.infer

        async def recording(batch):
            sizes.append(len(batch))
            return await infer(batch)

        second.infer = recording
        a, b = TEXTS[:10], TEXTS[10:25]
        out_a, out_b = await asyncio.gather(cascade.infer(first.tokenize(a)), cascade.infer(first.tokenize(b)))
        assert sizes == [25], "one second-stage call for both first-stage calls"
        want = second.predict_sync(a + b)
        assert [p.label for p in out_a + out_b] == [p.label for p in want]
        assert all(p.stage == 1 and p.model == second.model_id for p in out_a + out_b)
        # A full second-stage batch goes at once, without waiting for the other call.
        cascade.second_batch = 8
        sizes.clear()
        await asyncio.gather(cascade.infer(first.tokenize(TEXTS[:20])), cascade.infer(first.tokenize(TEXTS[20:23])))
        assert sum(sizes) == 23 and max(sizes) <= 20 and len(sizes) >= 2
        assert cascade.counts["escalated"] == 48
    finally:
        first.close()
        second.close()


async def test_a_failing_second_stage_fails_the_calls_that_wait_for_it(stages):
    first, second = stages
    cascade = CascadeEngine(first, second, 1.0)

    async def broken(batch):
        raise RuntimeError("second stage down")

    second_infer, second.infer = second.infer, broken
    try:
        with pytest.raises(RuntimeError, match="second stage down"):
            await cascade.infer(first.tokenize(TEXTS[:5]))
    finally:
        second.infer = second_infer
