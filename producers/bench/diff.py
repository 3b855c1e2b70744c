"""A label-diff report: how a candidate classifier would have labelled what the served one labelled (``streamlabel
model diff SERVED CANDIDATE``). Both label the same texts (a held-out split of a preset, or a labelled file);
the report gives their agreement, the confusion of served label against candidate label, each one's accuracy
where the texts carry labels, and examples of disagreement: by position and a digest of the text, the text
itself only with ``show_text``. JSON, and HTML with the matrix and the examples.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path
from typing import Sequence

import numpy as np


def label_diff(served: str | Path, candidate: str | Path, *, data: Path | None = None, data_preset: str | None = None,
               show_text: bool = False, examples: int = 20, batch: int = 64) -> dict:
    from pipeline.engine import OnnxEngine
    from pipeline.errors import UsageError
    from pipeline.model import data as D
    from pipeline.model import presets as P
    from pipeline.runtime import softmax

    a = OnnxEngine(served, provider="cpu", warmup=False)
    b = OnnxEngine(candidate, provider="cpu", warmup=False)
    try:
        if tuple(a.labels) != tuple(b.labels):
            raise UsageError(f"the two models have different labels: {list(a.labels)} and {list(b.labels)}",
                             hint="diff two versions of the same classifier")
        y = None
        if data is not None:
            ex = D.read_labelled(data)
            texts, source = [e.text for e in ex], str(data)
            y = D.label_indices(ex, a.labels, source) if all(e.label for e in ex) else None
        else:
            found = P.labelled_split([data_preset, a.manifest.training.get("preset"),
                                      a.manifest.training.get("teacher_preset")], "test", a.labels)
            if found is None:
                raise UsageError("no texts to compare on", hint="pass --data FILE (JSONL {text[,label]} or CSV) "
                                                                 "or --data-preset NAME")
            name, ex, y = found
            texts, source = [e.text for e in ex], f"{name} held-out test split"

        def probs(e) -> np.ndarray:
            return np.concatenate([softmax(e.logits(texts[i:i + batch]).astype(np.float64))
                                   for i in range(0, len(texts), batch)])

        pa, pb = probs(a), probs(b)
    finally:
        a.close()
        b.close()
    la, lb = pa.argmax(1), pb.argmax(1)
    labels = list(a.labels)
    k = len(labels)
    conf = np.zeros((k, k), dtype=int)
    np.add.at(conf, (la, lb), 1)
    differ = np.flatnonzero(la != lb)
    # The disagreements the candidate is surest about first: what a reviewer should look at.
    order = differ[np.argsort(-pb[differ].max(1))][:examples]
    rows = []
    for i in order.tolist():
        row = {"index": i, "text_digest": hashlib.blake2b(texts[i].encode(), digest_size=8).hexdigest(),
               "served": labels[la[i]], "served_score": round(float(pa[i].max()), 4),
               "candidate": labels[lb[i]], "candidate_score": round(float(pb[i].max()), 4)}
        if y is not None:
            row["true"] = labels[y[i]]
        if show_text:
            row["text"] = texts[i]
        rows.append(row)
    report = {"served": a.model_id, "candidate": b.model_id, "data": source, "n": len(texts),
              "agreement": round(float((la == lb).mean()), 4), "disagreements": int(len(differ)),
              "labels": labels, "confusion": {"rows": "served", "columns": "candidate", "matrix": conf.tolist()},
              "examples": rows, "texts_shown": show_text}
    if y is not None:
        report["served_accuracy"] = round(float((la == y).mean()), 4)
        report["candidate_accuracy"] = round(float((lb == y).mean()), 4)
        report["served_macro_f1"] = D.quality(y, la, labels)["macro_f1"]
        report["candidate_macro_f1"] = D.quality(y, lb, labels)["macro_f1"]
    return report


def write_html(report: dict, path: Path) -> Path:
    labels: Sequence[str] = report["labels"]
    m = report["confusion"]["matrix"]
    top = max(max(r) for r in m) or 1
    e = html.escape

    def cell(v: int, diag: bool) -> str:
        shade = int(255 - 180 * v / top)
        color = f"rgb({shade},{shade},255)" if diag else f"rgb(255,{shade},{shade})"
        return f'<td style="background:{color}">{v}</td>'

    head = "".join(f"<th>{e(lb)}</th>" for lb in labels)
    body = "".join(f"<tr><th>{e(labels[i])}</th>" + "".join(cell(v, i == j) for j, v in enumerate(row)) + "</tr>"
                   for i, row in enumerate(m))
    acc = ""
    if "served_accuracy" in report:
        acc = (f"<p>accuracy: served {report['served_accuracy']:.4f}, candidate {report['candidate_accuracy']:.4f}; "
               f"macro-F1: served {report['served_macro_f1']:.4f}, candidate {report['candidate_macro_f1']:.4f}</p>")
    cols = ["index", "text_digest", "served", "served_score", "candidate", "candidate_score"] + \
        (["true"] if report["examples"] and "true" in report["examples"][0] else []) + (["text"] if report["texts_shown"] else [])
    ex = "".join("<tr>" + "".join(f"<td>{e(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in report["examples"])
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>label diff: {e(report['served'])} vs {e(report['candidate'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style>
</head><body><h1>Label diff: {e(report['served'])} (served) vs {e(report['candidate'])} (candidate)</h1>
<p>{report['n']:,} texts ({e(report['data'])}): agreement <b>{report['agreement']:.2%}</b>, {report['disagreements']:,} disagreements.</p>
{acc}<h2>Confusion (rows: served, columns: candidate)</h2><table><tr><th></th>{head}</tr>{body}</table>
<h2>Disagreements (the candidate's surest first{'' if report['texts_shown'] else '; texts hidden: --show-text shows them'})</h2>
<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{ex}</table></body></html>"""
    path.write_text(doc)
    return path
