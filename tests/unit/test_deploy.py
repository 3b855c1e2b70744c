"""deploy/: Prometheus rules (checked and unit-tested with the real promtool) and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make services installs it)")


def exported() -> set[str]:
    """Every series name the worker exports (with a cascade's and a generator's metrics; CPU split registered)."""
    m = Metrics()
    m.track_cpu(set())
    names = set()
    for fam in m.registry.collect():
        for sample in fam.samples:
            names.add(sample.name)
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def recorded() -> set[str]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    return {t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if t.startswith("streamlabel")}


@needs_promtool
def test_promtool_checks_the_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_fire_and_stay_quiet():
    """rules_test.yml: all-slow traffic pages (fast burn), 0.5% slow stays quiet, 5% DLQ raises the DLQ alert."""
    r = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=DEPLOY / "prometheus", capture_output=True,
                       text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_rules_name_only_metrics_the_worker_exports():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    known = exported() | recorded()
    for g in doc["groups"]:
        for rule in g["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"


def test_dashboard_loads_and_every_expression_names_an_exported_metric():
    dash = json.loads((DEPLOY / "grafana" / "streamlabel.json").read_text())
    assert dash["title"] == "streamlabel" and dash["uid"] and dash["schemaVersion"] >= 30
    known = exported() | recorded()
    titles = set()
    ids = set()
    for p in dash["panels"]:
        assert {"id", "type", "title", "gridPos", "targets"} <= set(p), p.get("title")
        assert p["id"] not in ids
        ids.add(p["id"])
        titles.add(p["title"])
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names or t["expr"].startswith("vector("), f"{p['title']}: {t['expr']} names no streamlabel metric"
            assert not names - known, f"{p['title']}: {names - known} is not exported"
    for want in ("Throughput", "End-to-end latency", "Per-stage", "Batch size", "Cache hit", "lag", "Dead-letter", "burn"):
        assert any(want.lower() in t.lower() for t in titles), want
