"""Alert rules on synthetic label streams whose correct alerts are known in advance."""

from __future__ import annotations

import random

import pytest

from pipeline.alerts import AlertEngine, Rule, parse_rules
from pipeline.errors import ConfigError

MIN = 60_000
NEG_NEWS = Rule(name="negative-news", kind="share", labels=("negative",), threshold=0.7, window_s=300, min_events=12,
                cooldown_s=1800, severity="critical", sources=("news",))
ABUSE = Rule(name="abusive-customer", kind="single", labels=("hate", "offensive"), threshold=0.8, window_s=600,
             key="entity", cooldown_s=3600)
JUMP = Rule(name="negative-jump", kind="jump", labels=("negative",), threshold=0.5, window_s=300, min_events=12,
            baseline_windows=4)


def noise(rng, t0, minutes, tickers, rate_per_min=30, neg=0.25):
    evs = []
    for i in range(minutes * rate_per_min):
        ts = t0 + int(i * MIN / rate_per_min)
        label = "negative" if rng.random() < neg else rng.choice(["neutral", "positive"])
        evs.append({"id": f"n{i}", "entity": rng.choice(tickers), "source": "news", "label": label, "score": 0.9,
                    "produced_at": ts})
    return evs


def run(engine, events):
    out = []
    for e in events:
        out += engine.observe(e)
    out += engine.advance()
    return out


def test_noise_only_control_run_fires_nothing():
    rng = random.Random(1)
    eng = AlertEngine([NEG_NEWS, JUMP])
    assert run(eng, noise(rng, 0, 60, [f"T{i}" for i in range(20)])) == []


def test_planted_negative_burst_alerts_once_within_one_window_then_resolves():
    rng = random.Random(2)
    tickers = [f"T{i}" for i in range(20)]
    evs = noise(rng, 0, 60, tickers)
    burst_start = 30 * MIN
    evs += [{"id": f"b{i}", "entity": "ACME", "source": "news", "label": "negative" if i % 5 else "neutral",
             "score": 0.95, "produced_at": burst_start + i * 15_000} for i in range(40)]  # 10 minutes
    evs.sort(key=lambda e: e["produced_at"])
    eng = AlertEngine([NEG_NEWS])
    alerts = run(eng, evs)
    firing = [a for a in alerts if a["status"] == "firing"]
    assert [a["entity"] for a in firing] == ["ACME"], "exactly one alert, for the planted ticker"
    a = firing[0]
    assert a["at"] - burst_start <= NEG_NEWS.window_s * 1000, "within one window of the incident's start"
    assert a["value"] >= 0.7 and a["severity"] == "critical" and a["sample_ids"] and a["rule"] == "negative-news"
    resolved = [x for x in alerts if x["status"] == "resolved"]
    assert [r["alert_id"] for r in resolved] == [a["alert_id"]], "one resolve once the ticker went quiet"
    assert resolved[0]["at"] >= burst_start + 10 * MIN


def test_one_abusive_customer_one_alert_despite_many_messages():
    eng = AlertEngine([ABUSE])
    evs = [{"id": f"c{i}", "entity": f"customer-{i % 50}", "source": "support", "label": "neither", "score": 0.9,
            "produced_at": i * 1000} for i in range(500)]
    evs += [{"id": f"x{i}", "entity": "customer-7", "source": "support", "label": "offensive", "score": 0.93,
             "produced_at": 100_000 + i * 5000} for i in range(12)]
    evs += [{"id": "weak", "entity": "customer-9", "source": "support", "label": "offensive", "score": 0.5,
             "produced_at": 150_000}]
    evs.sort(key=lambda e: e["produced_at"])
    firing = [a for a in run(eng, evs) if a["status"] == "firing"]
    assert [(a["entity"], a["sample_ids"][0]) for a in firing] == [("customer-7", "x0")]


def test_jump_against_own_baseline():
    eng = AlertEngine([JUMP])
    evs = [{"id": f"a{i}", "entity": "ACME", "source": "news", "label": "negative" if i % 10 == 0 else "neutral",
            "score": 0.9, "produced_at": i * 20_000} for i in range(90)]  # 30 min at 10% negative
    evs += [{"id": f"j{i}", "entity": "ACME", "source": "news", "label": "negative" if i % 4 else "neutral",
             "score": 0.9, "produced_at": 1_800_000 + i * 20_000} for i in range(15)]  # then 75%
    firing = [a for a in run(eng, evs) if a["status"] == "firing"]
    assert len(firing) == 1 and firing[0]["value"] >= 0.5


def test_out_of_order_within_lateness_counts_and_too_late_is_dropped():
    eng = AlertEngine([Rule(name="c", kind="count", threshold=3, window_s=60)], lateness_s=10)
    e = lambda i, ts: {"id": i, "entity": "E", "label": "x", "produced_at": ts}  # noqa: E731
    assert eng.observe(e("1", 50_000)) == [] and eng.observe(e("2", 45_000)) == []  # 5 s late: kept
    fired = eng.observe(e("3", 52_000))
    assert len(fired) == 1 and fired[0]["value"] == 3
    assert eng.observe(e("old", 20_000)) == [] and eng.late == 1


def test_snapshot_restore_keeps_open_incident_no_refire():
    eng = AlertEngine([ABUSE])
    first = eng.observe({"id": "x", "entity": "c1", "label": "hate", "score": 0.99, "produced_at": 1000})
    assert len(first) == 1
    again = AlertEngine([ABUSE])
    again.restore(eng.snapshot())
    assert again.observe({"id": "y", "entity": "c1", "label": "hate", "score": 0.99, "produced_at": 2000}) == []
    again.watermark = 2000 + 601_000
    assert [a["status"] for a in again.advance()] == ["resolved"]


def test_rule_config_errors_name_the_rule():
    with pytest.raises(ConfigError, match=r"alerting.rules\[0\].kind"):
        parse_rules([{"name": "a", "kind": "avg"}])
    with pytest.raises(ConfigError, match=r"unknown key 'alerting.rules\[1\].treshold'"):
        parse_rules([{"name": "a", "kind": "count"}, {"name": "b", "kind": "count", "treshold": 3}])
    with pytest.raises(ConfigError, match="labels' is needed"):
        parse_rules([{"name": "a", "kind": "share"}])
    assert parse_rules([{"name": "a", "kind": "share", "labels": "negative"}])[0].labels == ("negative",)


def test_webhook_retries_then_delivers():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from consumers.alerting import AlertingWorker
    from pipeline.config import Settings

    got, codes = [], [500, 503, 200]

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(codes[min(len(got) - 1, 2)])
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = Settings().replace(alerting={"state_redis_url": None, "webhook_url": f"http://127.0.0.1:{srv.server_port}/hook",
                                         "webhook_retries": 3, "webhook_timeout_s": 2, "rules": (ABUSE,)})
        w = AlertingWorker(s)
        assert w._post({"alert_id": "a", "status": "firing"}) is True
        assert len(got) == 3 and b'"alert_id":"a"' in got[-1]
        s2 = s.replace(alerting={"webhook_url": "http://127.0.0.1:1/none", "webhook_retries": 1})
        assert AlertingWorker(s2)._post({"alert_id": "b"}) is False  # gives up, never raises
    finally:
        srv.shutdown()
