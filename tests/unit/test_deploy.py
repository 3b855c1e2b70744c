"""deploy/: Prometheus rules (checked and unit-tested with the real promtool) and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
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


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_manifests_validate_against_the_api_schemas():
    import kubernetes_validate

    seen = set()
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in docs(f):
            if d["apiVersion"].startswith("keda.sh/"):
                continue  # a CRD: checked below
            kubernetes_validate.validate(d, "1.30.0", strict=True)  # raises ValidationError naming the field
            seen.add(d["kind"])
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= seen
    workers = [d for f in (DEPLOY / "k8s").glob("worker*.yaml") for d in docs(f) if d["kind"] == "Deployment"]
    for dep in workers:
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 20, "longer than the drain timeout"
    gpu = [d for d in workers if d["metadata"]["name"].endswith("gpu")][0]
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_keda_scaledobject_scales_on_consumer_lag_up_to_the_partitions():
    [so] = docs(DEPLOY / "k8s" / "keda.yaml")
    assert so["kind"] == "ScaledObject" and so["spec"]["scaleTargetRef"]["name"] == "streamlabel-worker"
    trig, drain = so["spec"]["triggers"]
    assert drain["type"] == "prometheus" and float(drain["metadata"]["threshold"]) > 0
    assert "streamlabel_backlog_seconds" in drain["metadata"]["query"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert any(j["job_name"] == "streamlabel" for j in prom["scrape_configs"]), "the query's job label exists"
    if shutil.which("promtool"):  # the query parses as PromQL (promtool checks it as a recording rule)
        with tempfile.TemporaryDirectory() as tmp:
            rules = Path(tmp) / "q.yml"
            rules.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [
                {"record": "streamlabel:drain_seconds:max", "expr": drain["metadata"]["query"]}]}]}))
            out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
            assert out.returncode == 0, out.stdout + out.stderr
    assert trig["type"] == "kafka" and int(trig["metadata"]["lagThreshold"]) > 0
    cm = next(d for d in docs(DEPLOY / "k8s" / "worker.yaml") if d["kind"] == "ConfigMap")["data"]
    assert trig["metadata"]["consumerGroup"] == cm["STREAMLABEL_KAFKA__GROUP_ID"]
    assert trig["metadata"]["topic"] == cm["STREAMLABEL_TOPICS__INPUT"]
    assert so["spec"]["maxReplicaCount"] <= 4, "no more workers than the input topic's partitions (4)"


def test_compose_file_validates_against_the_compose_spec_and_mounts_what_exists():
    import importlib.resources

    import jsonschema

    spec = json.loads(importlib.resources.files("compose").joinpath("config/compose_spec.json").read_text())
    f = DEPLOY / "compose" / "compose.yaml"
    doc = yaml.safe_load(f.read_text())
    jsonschema.validate(doc, spec)
    assert {"kafka", "redis", "worker", "alerting", "prometheus", "grafana"} <= set(doc["services"])
    for svc in doc["services"].values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (f.parent / src).exists() or src.endswith("models"), f"{src} is mounted but missing"
    assert "redis-data:/data" in doc["services"]["redis"]["volumes"], "Redis keeps its data"


def test_alerting_config_of_the_compose_file_loads():
    from pipeline.config import load_settings

    s = load_settings(DEPLOY / "compose" / "alerts.toml")
    assert s.alerting.rules and s.alerting.rules[0].kind == "share"


@needs_promtool
def test_prometheus_scrape_config_checks(tmp_path):
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "p.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_images_install_the_serving_lock_without_torch_or_cuda_wheels():
    lock = (DEPLOY.parent / "requirements-serve.lock").read_text()
    pins = {line.split("==")[0] for line in lock.splitlines() if "==" in line}
    assert {"onnxruntime", "tokenizers", "aiokafka", "redis", "prometheus-client"} <= pins
    assert not {p for p in pins if p.startswith(("torch", "nvidia", "transformers"))}, "serving pulls no torch/CUDA"
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "requirements-serve.lock" in text and "USER 10001" in text
        for line in text.splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (DEPLOY.parent / src).exists(), f"{name}: COPY {src} does not exist"
    assert "onnxruntime-gpu" in (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
