"""A generator as a classifier (label-constrained decoding), scored: accuracy and macro-F1 on a preset's held-out
test split (a stratified sample of ``--n`` texts), and texts/s on this machine, next to a trained classifier
on the same texts when one is given. Prints JSON.

    python -m producers.bench.choice --generator models/reply-smollm2 --preset sentiment-minilm --n 300 \\
        --instruction "Classify the sentiment of the message." --classifier models/sentiment-minilm
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--instruction", default=None)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--bootstrap", help="also: open-loop steps through Kafka (streamlabel run with generate.labels)")
    ap.add_argument("--rates", default="4,8,16", help="events/s of those steps")
    ap.add_argument("--slo-ms", type=float, default=1000.0)
    ap.add_argument("--step-seconds", type=float, default=15.0)
    a = ap.parse_args()
    from pipeline.generation import GenerativeModel
    from pipeline.generation.choice import ChoiceClassifier
    from pipeline.model import data as D
    from pipeline.model import presets as P

    pre = P.get(a.preset)
    labels = list(pre.labels)
    _, test, y = P.labelled_split([a.preset], "test", labels)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(test), size=min(a.n, len(test)), replace=False))
    texts = [test[i].text for i in pick]
    y = np.asarray(y)[pick]
    clf = ChoiceClassifier(GenerativeModel(a.generator, variant=a.variant, provider="cpu"), labels, a.instruction,
                           calibrate=not a.no_calibrate)
    clf.warmup()
    t0 = time.perf_counter()
    pred = clf.logits(texts).argmax(1)
    took = time.perf_counter() - t0
    out = {"generator": clf.model_id, "variant": clf.variant, "preset": a.preset, "labels": labels,
           "instruction": clf.instruction, "calibrated": clf.bias is not None, "n": len(texts), "label_tokens": [len(s) for s in clf.seqs],
           "choice": {**D.quality(y, pred, labels), "texts_per_s": round(len(texts) / took, 2)},
           "majority_class_accuracy": round(float(np.bincount(y).max() / len(y)), 4)}
    clf.close()
    if a.classifier:
        from pipeline.engine import OnnxEngine

        e = OnnxEngine(a.classifier, provider="cpu")
        t0 = time.perf_counter()
        p2 = np.concatenate([e.logits(texts[i:i + 64]).argmax(1) for i in range(0, len(texts), 64)])
        took = time.perf_counter() - t0
        out["classifier"] = {"model": e.model_id, "variant": e.variant, **D.quality(y, p2, labels),
                             "texts_per_s": round(len(texts) / took, 1)}
        e.close()
    if a.bootstrap:
        import asyncio

        from producers.bench import harness as L

        cfg = L.BenchConfig(bootstrap=a.bootstrap, artifact=a.generator, slo_ms=a.slo_ms, step_seconds=a.step_seconds,
                            max_batch=16, env={"STREAMLABEL_GENERATE__LABELS": json.dumps(labels),
                                               "STREAMLABEL_GENERATE__INSTRUCTION": clf.instruction,
                                               "STREAMLABEL_GENERATE__CALIBRATE": "false" if a.no_calibrate else "true"})
        steps = []
        for r in (float(x) for x in a.rates.split(",")):
            steps.append(asyncio.run(L.run_step(cfg, f"choice@{r:g}", r, progress=lambda m: print(m, file=sys.stderr))))
            if not steps[-1].meets_slo:
                break
        out["kafka"] = {"slo_ms": a.slo_ms, "events_per_s_at_slo": L.knee(steps), "steps": [s.row() for s in steps]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
