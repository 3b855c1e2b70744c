"""The bench's parts that need no broker: the worker's /metrics parsing, baseline reporting, the ORT ceiling,
the hand-written consumer's classifier, the summary and the plots."""

from __future__ import annotations

from producers.bench.ladder import naive_model_note, summary
from producers.bench.harness import (Step, analyse, at_slo, ceiling_throughput, cpu_at_knee, cpu_per_event, knee,
                                knee_step, plots, ratio, worker_counters)
from tests.unit.test_loadtest_accounting import outs

METRICS_BEFORE = """\
# HELP streamlabel_events_total Events by outcome (labelled, dlq).
# TYPE streamlabel_events_total counter
streamlabel_events_total{outcome="labelled"} 1.0
streamlabel_events_total{outcome="dlq"} 3.0
# HELP streamlabel_events_created Events by outcome (labelled, dlq).
# TYPE streamlabel_events_created gauge
streamlabel_events_created{outcome="labelled"} 1.7e9
# HELP streamlabel_cpu_seconds_total Process CPU by thread group.
# TYPE streamlabel_cpu_seconds_total counter
streamlabel_cpu_seconds_total{part="outside_engine"} 2.5
streamlabel_cpu_seconds_total{part="engine"} 10.0
# HELP streamlabel_tokenizer_cpu_seconds_total CPU time spent tokenizing.
# TYPE streamlabel_tokenizer_cpu_seconds_total counter
streamlabel_tokenizer_cpu_seconds_total 1.0
# HELP streamlabel_inflight Records taken from Kafka and not yet committed.
# TYPE streamlabel_inflight gauge
streamlabel_inflight 0.0
"""

METRICS_AFTER = (METRICS_BEFORE.replace('outcome="labelled"} 1.0', 'outcome="labelled"} 1001.0')
                 .replace('"outside_engine"} 2.5', '"outside_engine"} 2.75').replace('"engine"} 10.0', '"engine"} 11.5')
                 .replace("tokenizer_cpu_seconds_total 1.0", "tokenizer_cpu_seconds_total 1.04"))


def test_worker_counters_read_cpu_by_part_and_labelled_events():
    before, after = worker_counters(METRICS_BEFORE), worker_counters(METRICS_AFTER)
    assert before == {"labelled": 1.0, "cpu_outside_engine": 2.5, "cpu_engine": 10.0, "cpu_tokenizer": 1.0}
    # 0.25 s outside the engine (0.04 s of it tokenizing) and 1.5 s in it over 1000 events
    assert cpu_per_event(before, after) == (250.0, 1500.0, 40.0)


def test_cpu_figures_are_none_when_the_worker_does_not_export_them():
    no_cpu = "".join(line + "\n" for line in METRICS_BEFORE.splitlines() if "cpu_seconds" not in line)
    assert worker_counters(no_cpu) == {"labelled": 1.0}
    assert cpu_per_event(worker_counters(no_cpu), worker_counters(no_cpu)) == (None, None, None)
    assert cpu_per_event(None, worker_counters(METRICS_AFTER)) == (None, None, None)  # no endpoint answered
    assert worker_counters(None) is None
    assert worker_counters("this is { not prometheus text") is None
    # no event labelled between the scrapes: no figure rather than a division by zero
    assert cpu_per_event(worker_counters(METRICS_BEFORE), worker_counters(METRICS_BEFORE)) == (None, None, None)


def _step(name: str, rate: float, latency_ms: int, n: int = 100, answered: int | None = None, queued=()) -> Step:
    inputs = {f"{name}-{i}": 1000 for i in range(n)}
    answered = n if answered is None else answered
    return analyse(name, inputs, outs((i, 1000 + latency_ms) for i in list(inputs)[:answered]), rate, rate, 250, 0.99,
                   queued={f"{name}-{i}" for i in queued})


def test_unanswered_ids_past_the_committed_offset_are_backlog_not_loss():
    s = _step("a", 50, 900, n=100, answered=40, queued=range(40, 100))
    assert s.labelled == 40 and s.backlog == 60 and s.lost == 0 and not s.meets_slo
    t = _step("b", 50, 10, n=100, answered=90, queued=range(95, 100))  # 5 queued, 5 below the committed offset
    assert t.backlog == 5 and t.lost == 5 and not t.meets_slo
    assert "backlog" in t.row() and "worker_cpu_us_per_event" in t.row()


def test_a_baseline_that_never_meets_the_slo_is_reported_as_such():
    steps = [_step("n1", 20, 900, answered=60, queued=range(60, 100)), _step("n2", 40, 3000, answered=30,
                                                                            queued=range(30, 100))]
    value, note = at_slo(steps)
    assert value == 0 and knee_step(steps) is None
    assert note.startswith("did not meet the SLO at any step (lowest 20/s: p99 900 ms")
    assert "40 of 100 events still queued" in note and "lost" not in note
    assert ratio(123.0, value) is None  # pipeline_vs_naive: null, the note says why
    ok = _step("ok", 10, 20)
    assert at_slo([ok, *steps]) == (ok.throughput, None)
    assert at_slo([]) == (0.0, "not measured")


def test_cpu_at_the_knee_step_else_the_busiest():
    low, mid, high = _step("l", 10, 20), _step("m", 20, 20), _step("h", 30, 900)
    low.worker_cpu_us_per_event, mid.worker_cpu_us_per_event, high.worker_cpu_us_per_event = 100.0, 90.0, 80.0
    mid.engine_cpu_us_per_event = 500.0
    assert knee_step([low, mid, high]) in (low, mid) and knee([low, mid, high]) == knee_step([low, mid, high]).throughput
    mid.throughput = low.throughput + 1  # the knee is the busiest step that held the SLO
    mid.tokenizer_cpu_us_per_event = 30.0
    assert cpu_at_knee([low, mid, high]) == (90.0, 500.0, 30.0)
    assert cpu_at_knee([high]) == (80.0, None, None)  # no step met the SLO: the busiest step's figure
    assert cpu_at_knee([]) == (None, None, None)


def test_ceiling_runs_on_the_engines_session_and_tokenizer(tiny_artifact):
    texts = [("short" if i % 3 else "a much longer text about shares falling sharply today " * 3) + str(i)
             for i in range(256)]
    stats: dict = {}
    assert ceiling_throughput(str(tiny_artifact), texts, variant="int8", batch=32, seconds=0.3, stats=stats) > 0
    assert 0 < stats["cpu_us_per_text"] < 1e5, "the ceiling's CPU per text (the worker's CPU is compared with it)"


def test_handwritten_classifier_labels_each_text_in_order(tiny_artifact):
    from producers.bench.handwritten import Classifier
    from pipeline.engine import OnnxEngine
    from pipeline.errors import NoTokens

    texts = [f"{'word ' * (i % 17)}shares {i}" for i in range(150)]
    got = Classifier(tiny_artifact, max_batch=16)(texts)
    assert len(got) == len(texts) and all(label in ("negative", "neutral", "positive") for label, _ in got)
    assert all(0 < score <= 1 for _, score in got)
    eng = OnnxEngine(tiny_artifact, variant="int8", provider="cpu")
    try:
        want = [p.label for p in eng.predict_sync(texts) if not isinstance(p, NoTokens)]
    finally:
        eng.close()
    # same INT8 file; only the padding differs (INT8 activations are quantized per batch), so nearly all agree
    assert sum(a == b for (a, _), b in zip(got, want)) >= 0.9 * len(texts)
    assert Classifier(tiny_artifact, max_batch=16)([]) == []


def _report(**over) -> dict:
    r = {"model": "tiny@1", "variant": "int8", "batch": 64, "delivery": "at_least_once",
         "slo": {"objective_ms": 250, "target": 0.99}, "machine": {"cpu": "test", "cores": 2},
         "ceiling_msgs_per_s": 1000.0, "engine_msgs_per_s": 900.0, "engine_vs_ceiling": 0.9,
         "pipeline_msgs_per_s_at_slo": 800.0, "pipeline_vs_ceiling": 0.8, "handwritten_msgs_per_s_at_slo": 400.0,
         "pipeline_vs_handwritten": 2.0, "handwritten_note": None, "naive_msgs_per_s_at_slo": 0.0,
         "pipeline_vs_naive": None, "naive_note": "did not meet the SLO at any step (lowest 20/s: p99 900 ms)",
         "worker_cpu_us_per_event": 250.0, "engine_cpu_us_per_event": 1500.0}
    r.update(over)
    return r


def test_summary_gives_the_ratios_and_says_what_is_missing():
    text = "\n".join(summary(_report()))
    assert "engine / ceiling        0.90×" in text and "pipeline / ceiling      0.80×" in text
    assert "pipeline / hand-written  2.00×" in text and "pipeline / naive         –" in text
    assert "250 µs (engine: 1,500 µs)" in text and "naive: did not meet the SLO" in text
    bare = "\n".join(summary(_report(worker_cpu_us_per_event=None, engine_cpu_us_per_event=None)))
    assert "outside the engine: – (not exported by this worker)" in bare
    plain = {k: v for k, v in _report().items() if not k.startswith(("handwritten", "naive", "pipeline_vs_h"))}
    assert "hand-written" not in "\n".join(summary(plain))


def test_naive_note_only_for_an_artifact_that_is_not_minilm(tiny_artifact):
    from pipeline.manifest import load_manifest

    _, tiny = load_manifest(tiny_artifact, verify=False)
    note = naive_model_note(tiny)
    assert note and "tiny@1" in note and "MiniLM-L6" in note
    minilm = type("M", (), {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "name": "sentiment-minilm"})
    assert naive_model_note(minilm) is None


def test_plots_show_the_ceiling_and_the_handwritten_baseline(tmp_path):
    hand = _step("hand@0.50", 450, 30)
    naive = _step("naive@0.25", 20, 900, answered=50, queued=range(50, 100))
    report = _report(steps=[_step("unique@0.50", 450, 20).row()], handwritten_steps=[hand.row()],
                     naive_steps=[naive.row()], series_step={"offered_rate": 450, "series": [(0.0, 20.0)]})
    png, html = plots(report, tmp_path / "r")
    text = html.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "ORT ceiling" in text and "hand-written consumer at the SLO" in text and "hand@0.50" in text
    assert "naive@0.25" in text and "did not meet the SLO at any step" in text and "<td>50</td>" in text


def test_engine_only_bench_needs_no_broker(tiny_artifact, capsys, tmp_path):
    """``bench --engine-only``: ceiling and engine per batch size, JSON on stdout and in --json; no Kafka."""
    import orjson

    from pipeline.cli import main

    out = tmp_path / "engine.json"
    rc = main(["bench", "--model", str(tiny_artifact), "--engine-only", "--provider", "cpu",
               "--engine-batches", "8,32", "--step-seconds", "0.3", "--json", str(out)])
    assert rc == 0
    report = orjson.loads(out.read_bytes())
    assert report["providers"] == ["CPUExecutionProvider"] and report["variant"] == "int8"
    assert [r["batch"] for r in report["rows"]] == [8, 32]
    for r in report["rows"]:
        assert r["ceiling_msgs_per_s"] > 0 and r["engine_msgs_per_s"] > 0
        assert r["engine_vs_ceiling"] == round(r["engine_msgs_per_s"] / r["ceiling_msgs_per_s"], 3)
        assert r["batcher_only_msgs_per_s"] > r["engine_msgs_per_s"] and r["batcher_cpu_us_per_text"] > 0
    assert orjson.loads(capsys.readouterr().out)["rows"] == report["rows"]


def test_refine_bisects_the_knee_between_the_last_pass_and_the_first_failure():
    import asyncio

    from producers.bench.ladder import refine

    tried: list[float] = []

    async def run(rate: float):  # a system that holds up to 180/s
        tried.append(rate)
        return held(_step(f"r{rate:.0f}", rate, 20 if rate <= 180 else 900))

    def held(s):  # what it answered per second: what it was offered
        s.throughput = s.offered_rate
        return s

    coarse = [held(_step("a", 50, 20)), held(_step("b", 100, 20)), held(_step("c", 200, 900)), held(_step("d", 400, 900))]
    new = asyncio.run(refine(coarse, run, lambda _: None, rounds=2))
    assert [round(r) for r in tried] == [141, 168]  # √(100·200), then √(141·200)
    assert knee(coarse + new) == knee_step(coarse + new).throughput > 160


def test_summary_gives_exactly_once_against_at_least_once_and_its_latency_floor():
    text = "\n".join(summary(_report(eos_msgs_per_s_at_slo=700.0, eos_vs_alo_at_slo=0.875, eos_low_load_p50_ms=131.0,
                                     eos_low_load_p99_ms=190.0, eos_commit_interval_ms=100)))
    assert "exactly-once / at-least-once 0.88×" in text and "p50/p99 131/190 ms" in text and "every 100 ms" in text
