"""The GPU check's command, run small on CPU with the tiny models (what it does on a GPU machine, every stage):
the engine against the ceiling, a broker started from the bundle, one and two workers in one group with the
load from two producer processes, the hand-written consumer, the generator's capacity and a burst; JSON + PNG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not shutil.which("jlink"), reason="building the broker bundle needs the JDK's jlink")
def test_the_gpu_check_runs_every_stage_small_on_cpu(tmp_path, tiny_artifact, tiny_generator):
    bundle = tmp_path / "kafka-bundle"
    subprocess.run([sys.executable, str(ROOT / "deploy/kafka/bundle.py"), "build", str(bundle)], check=True,
                   capture_output=True, timeout=300)
    out = tmp_path / "out"
    r = subprocess.run(
        [str(ROOT / "deploy/gpu/check"), "--model", str(tiny_artifact), "--generator", str(tiny_generator),
         "--provider", "cpu", "--variant", "int8", "--bundle", str(bundle), "--batches", "16,64",
         "--engine-seconds", "1", "--workers", "1,2", "--producers", "2", "--fractions", "0.005,0.02",
         "--slo-ms", "500", "--step-seconds", "2", "--rows", "4,8", "--burst", "16", "--budget-s", "400"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "gpu-check.json").read_text())
    assert [b["batch"] for b in rep["engine"]["batches"]] == [16, 64]
    assert all(b["engine_texts_per_s"] > 0 and b["ceiling_texts_per_s"] > 0 for b in rep["engine"]["batches"])
    for b in rep["engine"]["batches"]:  # the engine without its GPU path and with two replicas, beside the default
        assert b["engine_unbound_texts_per_s"] > 0 and b["engine_two_sessions_texts_per_s"] > 0
        assert b["engine_bound"] is False and b["engine_cuda_graph"] is False  # on CPU: neither, by default
    ws = rep["kafka"]["workers"]
    assert [w["workers"] for w in ws] == [1, 2] and all(w["events_per_s_at_slo"] > 0 for w in ws), ws
    assert all(s["lost"] == 0 for w in ws for s in w["steps"])
    assert rep["kafka"]["handwritten"]["events_per_s_at_slo"] > 0
    assert [c["rows"] for c in rep["generator"]["capacity"]] == [4, 8]
    assert rep["generator"]["cuda_graph"] is False and "capacity_without_graphs" not in rep["generator"]  # CPU
    assert rep["generator"]["burst"]["burst"] == 16 and rep["generator"]["burst"]["ttft_p99_ms"] > 0
    assert (out / "gpu-check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
