"""Latency accounting, loss and duplicate detection of the load-test harness; the synthetic generator."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from producers.bench.harness import analyse, knee, pct
from producers.synthetic import Generator


@dataclass
class Rec:
    value: bytes
    timestamp: int


def outs(pairs):
    return [Rec(orjson.dumps({"id": i}), ts) for i, ts in pairs]


def test_known_delay_shows_up_in_percentiles():
    inputs = {f"e{i}": 1_000_000 + i * 10 for i in range(1000)}
    # 98% answered in 5 ms, 2% delayed by a known 400 ms
    out = outs((i, t + (400 if n % 50 == 0 else 5)) for n, (i, t) in enumerate(inputs.items()))
    s = analyse("x", inputs, out, offered=100, achieved=100, slo_ms=250, target=0.99)
    assert s.p50_ms == 5 and s.p99_ms == 400 and s.max_ms == 400
    assert s.goodput == 0.98 and not s.meets_slo
    assert s.lost == 0 and s.duplicated == 0


def test_lost_and_duplicated_ids_are_counted():
    inputs = {f"e{i}": 1000 for i in range(10)}
    out = outs([("e0", 1005), ("e1", 1005), ("e1", 1010), ("e2", 1005), ("stranger", 1005)])
    s = analyse("x", inputs, out, offered=10, achieved=10, slo_ms=250, target=0.99)
    assert s.labelled == 3 and s.lost == 7 and s.duplicated == 1 and not s.meets_slo


def test_knee_is_highest_throughput_meeting_the_slo():
    base = {f"e{i}": 0 for i in range(4)}
    ok = analyse("a", base, outs((i, 10) for i in base), 100, 100, 250, 0.99)
    slow = analyse("b", base, outs((i, 900) for i in base), 200, 200, 250, 0.99)
    assert ok.meets_slo and not slow.meets_slo and knee([ok, slow]) == ok.throughput
    # a lucky step above a failed one does not raise the knee
    lucky = analyse("c", base, outs((i, 10) for i in base), 300, 300, 250, 0.99)
    assert knee([ok, slow, lucky]) == ok.throughput and knee([ok, lucky]) == max(ok.throughput, lucky.throughput)


def test_pct():
    assert pct([], 99) == 0.0 and pct([1, 2, 3, 4], 50) == 2 and pct(list(range(1, 101)), 99) == 99


def test_generator_is_seeded_labelled_and_duplicates_as_asked():
    a = [e for _, e in zip(range(500), Generator("mixed", seed=7, duplicate_ratio=0.5))]
    b = [e for _, e in zip(range(500), Generator("mixed", seed=7, duplicate_ratio=0.5))]
    assert a == b
    assert {e.label for e in a} == {"negative", "neutral", "positive"}
    assert {e.source for e in a} == {"support", "news"}
    dup_share = 1 - len({e.text for e in a}) / len(a)
    assert 0.4 <= dup_share <= 0.65
    g = Generator("news", seed=1)
    g.burst("ACME", 1.0)
    burst = [e for _, e in zip(range(400), g) if e.entity == "ACME"]
    assert burst and all(e.label == "negative" for e in burst)


def test_latency_breakdown_from_the_labels_own_figures():
    """Each label says when it was built and how long it waited and ran: the rest is before the batcher
    (produce, fetch, decode, tokenize) and after it (publish to the broker's acknowledgement)."""
    inputs = {f"e{i}": 1_000_000 for i in range(100)}
    out = []
    for n, i in enumerate(inputs):
        slow_publish = 30 if n == 99 else 0  # one label whose publish took 30 ms longer
        lm = {"e2e": 10, "batch_wait": 1.5, "infer": 2.5}
        out.append(Rec(orjson.dumps({"id": i, "cached": False, "latency_ms": lm}), 1_000_000 + 12 + slow_publish))
    out.append(Rec(orjson.dumps({"id": "e0", "cached": True, "latency_ms": {"e2e": 1}}), 1_000_050))  # a duplicate
    s = analyse("x", inputs, out, offered=100, achieved=100, slo_ms=250, target=0.99)
    b = s.breakdown
    assert b["to_batcher"] == {"p50_ms": 6.0, "p99_ms": 6.0}
    assert b["batch_wait"]["p99_ms"] == 1.5 and b["infer"]["p50_ms"] == 2.5
    assert b["publish"] == {"p50_ms": 2.0, "p99_ms": 2.0} and s.max_ms == 42
    assert analyse("y", inputs, outs((i, 1_000_005) for i in inputs), 100, 100, 250, 0.99).breakdown is None
