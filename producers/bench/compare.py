"""``streamlabel model compare``: the speed/quality points of artifacts, their variants and a cascade, one run."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import UsageError


def compare(artifacts: Sequence[Path], *, cascade: str | None, data_preset: str | None, seconds: float, batch: int,
            plot: Path | None) -> dict:
    from pipeline.cascade import CascadeEngine
    from pipeline.engine import OnnxEngine
    from pipeline.model import data as D
    from pipeline.model import presets as P
    from pipeline.manifest import load_manifest
    from producers.bench.engine import bench_texts, engine_throughput

    if not artifacts:
        raise UsageError("name at least one artifact")
    _, m0 = load_manifest(artifacts[0], verify=False)
    found = P.labelled_split([data_preset, m0.training.get("preset"), m0.training.get("teacher_preset")], "test",
                             m0.labels)
    if found is None:
        raise UsageError("no held-out split to score: the first artifact was not built from a preset",
                         hint="pass --data-preset NAME")
    name, test, y = found
    texts = [e.text for e in test]
    speed_texts = bench_texts()
    rows = []

    def score(engine) -> dict:
        pred = np.concatenate([engine.logits(texts[i:i + 64]).argmax(1) for i in range(0, len(texts), 64)])
        return D.quality(y, pred, m0.labels)

    for art in artifacts:
        root, m = load_manifest(art, verify=False)
        for variant in ("fp32", "int8"):
            if variant not in m.variants:
                continue
            eng = OnnxEngine(root, variant=variant, provider="cpu", warmup=False)
            q = score(eng)
            eng.close()
            tput = engine_throughput(str(root), speed_texts, variant=variant, batch=batch, seconds=seconds)
            rows.append({"name": f"{m.model_id} {variant}", "model": m.model_id, "variant": variant,
                         "layers": (m.training.get("pruning") or {}).get("kept_layers"),
                         "heads": (m.training.get("head_pruning") or {}).get("heads_after"),
                         "accuracy": q["accuracy"], "macro_f1": q["macro_f1"], "msgs_per_s": round(tput, 1)})
    if cascade:
        try:
            first, second, threshold = cascade.split(",")
            threshold = float(threshold)
        except ValueError:
            raise UsageError(f"--cascade takes FIRST,SECOND,THRESHOLD, got {cascade!r}") from None
        eng = CascadeEngine(OnnxEngine(first, variant="int8", provider="cpu", warmup=False),
                            OnnxEngine(second, variant="int8", provider="cpu", warmup=False), threshold)
        q = score(eng)
        p1 = np.concatenate([eng.stages[0].logits(texts[i:i + 64]) for i in range(0, len(texts), 64)])
        from pipeline.runtime import softmax

        esc = float((softmax(p1.astype(np.float64)).max(1) < threshold).mean())
        eng.close()
        tput = engine_throughput(first, speed_texts, variant="int8", batch=batch, seconds=seconds, cascade_to=second,
                                 threshold=threshold)
        rows.append({"name": f"cascade int8 (t={threshold})", "model": eng.model_id, "variant": "int8",
                     "accuracy": q["accuracy"], "macro_f1": q["macro_f1"], "msgs_per_s": round(tput, 1),
                     "escalation_rate_test": round(esc, 4)})
    report = {"data": f"{name} held-out test split (n={len(texts)})", "batch": batch, "rows": rows}
    if plot is not None:
        report["plots"] = [str(p) for p in _plot(report, plot)]
    return report


def _plot(report: dict, prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in report["rows"]:
        ax.scatter(r["msgs_per_s"], r["accuracy"] * 100, s=60)
        ax.annotate(r["name"], (r["msgs_per_s"], r["accuracy"] * 100), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("engine throughput, no Kafka (texts/s, 2-core CPU)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"speed vs quality — {report['data']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
    fig.tight_layout()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    png = prefix.with_suffix(".png")
    fig.savefig(png, dpi=110)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    html = prefix.with_suffix(".html")
    rows = "".join(f"<tr><td style='text-align:left'>{r['name']}</td><td>{r['accuracy']:.4f}</td><td>{r['macro_f1']:.4f}</td>"
                   f"<td>{r['msgs_per_s']:.0f}</td></tr>" for r in report["rows"])
    html.write_text("<!doctype html><meta charset=utf-8><title>streamlabel model compare</title>"
                    "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style>"
                    f"<h1>speed vs quality</h1><p>{report['data']}</p>"
                    f"<img style='max-width:100%' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
                    "<table><tr><th style='text-align:left'>model</th><th>accuracy</th><th>macro-F1</th><th>texts/s</th></tr>"
                    f"{rows}</table>")
    return [png, html]
