"""Distillation: a smaller student learns a teacher artifact's soft labels (plus the hard ones), then goes
through the usual build (export → INT8 → parity → quality gate → manifest, with its lineage).

* **Teacher**: any classifier artifact (its FP32 ONNX variant gives the soft targets, so no teacher weights
  or torch model are needed), e.g. ``models/sentiment-minilm``.
* **Student**: a layer-dropped encoder initialised from the base model's layers, evenly spread
  (``minilm-l3``: MiniLM-L6's layers 0, 2 and 4; ``minilm-l2``: 0 and 3; ``minilm-l6``: all six), with a
  fresh classification head. Dropping layers is structured pruning: unlike unstructured sparsity it does
  speed up ONNX Runtime on CPU, in proportion to the encoder's share of the work.
* **Loss**: ``alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(label)`` on labelled texts, the KL
  term alone on unlabelled ones (replay corpora, synthetic streams): the teacher labels what nobody did.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import UsageError
from pipeline.model.data import Example, label_indices
from pipeline.model.structure import make_student

STUDENTS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    # name → (base, layers kept; None = all)
    "minilm-l6": ("minilm", None),
    "minilm-l3": ("minilm", (0, 2, 4)),
    "minilm-l2": ("minilm", (0, 3)),
    "tiny-l1": ("tiny", (0,)),  # tests: the tiny random BERT with one of its two layers
}


def kl_to_teacher(student_dir: Path, texts: Sequence[str], teacher_logits: np.ndarray, temperature: float = 1.0,
                  max_length: int = 128) -> float:
    """Mean KL(teacher ‖ student) on ``texts`` at ``temperature`` (the figure distillation lowers)."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.model.structure import load_classifier

    tok = AutoTokenizer.from_pretrained(str(student_dir))
    model = load_classifier(student_dir).eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            enc = tok(list(texts[i:i + 128]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            outs.append(model(**enc).logits)
    s = torch.log_softmax(torch.cat(outs) / temperature, -1)
    t = torch.log_softmax(torch.as_tensor(teacher_logits, dtype=torch.float32) / temperature, -1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean"))


def distil_train(student_dir: Path, out: Path, labels: Sequence[str], labelled: Sequence[Example],
                 unlabelled: Sequence[str], soft: np.ndarray, val: Sequence[Example], *, epochs: int = 2,
                 batch_size: int = 32, lr: float = 1e-4, temperature: float = 2.0, alpha: float = 0.7,
                 max_length: int = 128, seed: int = 0,
                 progress: Callable[[str, int, int, dict], None] | None = None) -> dict:
    """Train the student on ``labelled`` + ``unlabelled`` texts against the teacher's logits ``soft`` (same order)."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.model.structure import load_classifier
    from pipeline.model.train import evaluate_torch, length_batches

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(str(student_dir))
    model = load_classifier(student_dir, attn_implementation="eager")
    for p in model.base_model.embeddings.parameters():  # half of MiniLM's weights: frozen, as in fine-tuning
        p.requires_grad = False
    texts = [e.text for e in labelled] + list(unlabelled)
    hard = np.concatenate([label_indices(labelled, labels, "training data"),
                           np.full(len(unlabelled), -100, dtype=np.int64)])
    soft_t = torch.as_tensor(soft, dtype=torch.float32)
    lengths = [len(t) for t in texts]

    total = math.ceil(len(texts) / batch_size) * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
    step, running, history = 0, 0.0, []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for b in length_batches(lengths, batch_size, rng):
            enc = tok([texts[j] for j in b], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits / temperature, -1),
                                            torch.log_softmax(soft_t[b] / temperature, -1),
                                            log_target=True, reduction="batchmean") * temperature ** 2
            y = torch.as_tensor(hard[b])
            loss = alpha * kd + ((1 - alpha) * ce(logits, y) if (y >= 0).any() else 0.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            lv = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
            running = 0.95 * running + 0.05 * lv if step > 1 else lv
            if progress:
                progress("train", step, total, {"epoch": epoch + 1, "loss": round(running, 4)})
        model.eval()
        q = evaluate_torch(model, tok, labels, val, max_length)
        history.append({"epoch": epoch + 1, "loss": round(running, 4), "val_accuracy": q["accuracy"],
                        "val_macro_f1": q["macro_f1"]})
        if progress:
            progress("val", epoch + 1, epochs, history[-1])
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "temperature": temperature, "alpha": alpha,
            "labelled_examples": len(labelled), "unlabelled_texts": len(unlabelled), "steps": step,
            "seconds": round(time.perf_counter() - t0, 1), "history": history}


UNLABELLED = {  # replay corpora a teacher labels for its student (their own labels, if any, are not used)
    "banking77": ("banking77/train.jsonl.gz", "Banking77 support queries, CC BY 4.0"),
    "twitter_financial_news": ("twitter_financial_news/train.jsonl.gz", "finance tweets, MIT; labels unused"),
}


def unlabelled_texts(n: int, seed: int = 0, source: str = "banking77") -> list[str]:
    """``n`` texts nobody labelled for this task, from a replay corpus (``UNLABELLED``)."""
    from pipeline.model.data import REPO_ROOT, read_labelled

    if source not in UNLABELLED:
        raise UsageError(f"unknown unlabelled corpus '{source}'", hint=f"choose one of: {', '.join(UNLABELLED)}")
    texts = [e.text for e in read_labelled(REPO_ROOT / "data" / UNLABELLED[source][0])]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def build_distilled_preset(pre, *, out: Path, name: str | None = None, bench: bool = True, reporter=None):
    """A preset made by distillation: the latest ``OUT/TEACHER`` artifact taught to ``pre.student``."""
    from pipeline.model import presets as P

    root = Path(out) / pre.teacher
    if not (root.is_dir() and any(p.name.isdigit() for p in root.iterdir())):
        t = P.get(pre.teacher)
        raise UsageError(f"preset {pre.name} is distilled from {pre.teacher}, which is not built in {out}",
                         hint=f"build the teacher first: streamlabel model build --preset {pre.teacher} --out {out}"
                              + (f" ({t.minutes})" if t.minutes else ""))
    return distil(teacher=root, student=pre.student, out=out, name=name or pre.name, data_preset=pre.teacher,
                  bench=bench, reporter=reporter, preset_name=pre.name, **pre.distil)


def distil(*, teacher: Path, student: str, out: Path, name: str | None = None, epochs: int = 2,
           temperature: float = 2.0, alpha: float = 0.7, unlabelled: int = 3000, max_examples: int | None = None,
           lr: float = 1e-4, bench: bool = True, data_preset: str | None = None, reporter=None,
           unlabelled_source: str = "banking77", preset_name: str | None = None):
    """``streamlabel model distil``: teacher artifact → student → the usual build. Returns the ``BuildResult``."""
    import json
    import shutil
    import tempfile

    from pipeline.engine import OnnxEngine
    from pipeline.model import presets as P
    from pipeline.model.build import Reporter, build
    from pipeline.model.export import torch_threads
    from pipeline.manifest import load_manifest

    rep = reporter or Reporter()
    t_start = time.perf_counter()
    from pipeline.model import require_train

    require_train("model distil")
    if student not in STUDENTS:
        raise UsageError(f"unknown student '{student}'", hint=f"choose one of: {', '.join(STUDENTS)}")
    troot, tm = load_manifest(teacher, verify=True)
    data_name = data_preset or tm.training.get("preset")
    if not data_name or data_name not in P.PRESETS:
        raise UsageError(f"the teacher {tm.model_id} was not built from a preset, so its training data is unknown",
                         hint="name the preset whose data to distil on with --data-preset (e.g. sentiment-minilm)")
    if tuple(P.get(data_name).labels) != tuple(tm.labels):
        raise UsageError(f"preset {data_name}'s labels {P.get(data_name).labels} differ from the teacher's {tm.labels}")
    pre = P.get(data_name)
    train, val, test = pre.examples()
    if max_examples:
        train, val, test = train[:max_examples], val[: max_examples // 4], test[: max_examples // 4]
    torch_threads()
    work = Path(tempfile.mkdtemp(prefix="streamlabel-distil-"))
    try:
        base_kind, keep = STUDENTS[student]
        if base_kind == "minilm":
            base_dir = P.minilm_dir()
        else:
            base_dir = work / "tiny-base"
            P.build_tiny_hf(base_dir, P.get("tiny"), seed=1)
        extra = unlabelled_texts(unlabelled, source=unlabelled_source) if unlabelled else []
        texts = [e.text for e in train] + extra
        with rep.step(f"teacher {tm.model_id} (fp32) soft labels on {len(texts)} texts "
                      f"({len(train)} labelled, {len(extra)} unlabelled)"):
            eng = OnnxEngine(troot, variant="fp32", provider="cpu", warmup=False)
            soft = np.concatenate([eng.logits(texts[i:i + 64]) for i in range(0, len(texts), 64)])
            eng.close()
        with rep.step(f"student {student}: layers {list(keep) if keep else 'all'} of {base_dir.name}"):
            init = make_student(base_dir, keep, tm.labels, work / "student-init")
        rep.say(f"distilling: {epochs} epochs, temperature {temperature}, alpha {alpha}")
        figures = distil_train(work / "student-init", work / "student", tm.labels, train, extra, soft, val,
                               epochs=epochs, lr=lr, temperature=temperature, alpha=alpha, max_length=tm.max_length,
                               progress=rep.train_progress)
        rep.say(f"[green]✓[/] distilled in {figures['seconds']:.0f} s")
        eval_file = work / "test.jsonl"
        eval_file.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in test))
        lineage = {"teacher": tm.model_id, "teacher_path": str(troot), "student": student, "distillation": figures,
                   "pruning": {"structured": "layers", **init},
                   "data": list(pre.files) + ([f"{UNLABELLED[unlabelled_source][0]} (unlabelled)"] if extra else []),
                   "teacher_preset": data_name, "licence": pre.licence,
                   **({"preset": preset_name} if preset_name else {}),
                   "eval": f"held-out test split of {', '.join(pre.files)}",
                   "base": f"{student}: layers {init['kept_layers']} of {base_dir.name if base_kind != 'minilm' else 'all-MiniLM-L6-v2'}, "
                           f"distilled from {tm.model_id}"}
        res = build(out=out, from_dir=work / "student", name=name or f"{tm.name}-{student}", eval_file=eval_file,
                    max_length=tm.max_length, variants=("fp32", "int8"), bench=bench, reporter=rep, lineage=lineage)
        res.seconds = time.perf_counter() - t_start  # the whole distillation, not only the final build
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)
