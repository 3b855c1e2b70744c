"""The label-diff report (``streamlabel model diff``): agreement, the served × candidate confusion, accuracies,
disagreement examples without the texts unless asked, and its HTML."""

from __future__ import annotations

import json
import shutil

from producers.bench.diff import label_diff, write_html


def test_the_diff_of_int8_against_fp32_counts_every_text_once(tiny_artifact, tmp_path):
    fp32_only = tmp_path / "tiny-fp32"
    shutil.copytree(tiny_artifact, fp32_only)
    m = json.loads((fp32_only / "manifest.json").read_text())
    m["variants"] = {"fp32": m["variants"]["fp32"]}  # the engine's CPU default is then FP32
    (fp32_only / "manifest.json").write_text(json.dumps(m))
    r = label_diff(tiny_artifact, fp32_only, data_preset="tiny", examples=5)
    conf = r["confusion"]["matrix"]
    assert r["n"] == sum(map(sum, conf)) and r["n"] > 500
    assert sum(conf[i][i] for i in range(len(conf))) == r["n"] - r["disagreements"]
    assert r["agreement"] == round((r["n"] - r["disagreements"]) / r["n"], 4) and r["agreement"] >= 0.9
    assert 0 <= r["served_accuracy"] <= 1 and 0 <= r["candidate_accuracy"] <= 1
    assert len(r["examples"]) == min(5, r["disagreements"])
    assert all("text" not in e and len(e["text_digest"]) == 16 and e["served"] != e["candidate"] for e in r["examples"])
    shown = label_diff(tiny_artifact, fp32_only, data_preset="tiny", examples=5, show_text=True)
    assert all(e["text"] for e in shown["examples"])
    page = write_html(r, tmp_path / "diff.html").read_text()
    assert "Confusion (rows: served, columns: candidate)" in page and f"{r['n']:,} texts" in page
    assert "texts hidden" in page
