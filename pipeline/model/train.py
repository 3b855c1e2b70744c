"""Fine-tune a Hugging Face encoder with a classification head on labelled text (CPU-friendly). Needs torch."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.model.data import Example, label_indices, quality

ProgressFn = Callable[[str, int, int, dict], None]  # (phase, done, total, info)


def fine_tune(
    base_dir: Path,
    out_dir: Path,
    labels: Sequence[str],
    train: Sequence[Example],
    val: Sequence[Example],
    *,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 8e-5,
    max_length: int = 128,
    seed: int = 0,
    freeze_embeddings: bool = True,
    progress: ProgressFn | None = None,
) -> dict:
    """Train, save a standard ``*ForSequenceClassification`` directory to ``out_dir``; return figures."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.model import structure

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = structure.load_classifier(  # head-pruned directories too
        base_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, attn_implementation="eager",
    )
    if freeze_embeddings:  # half of MiniLM's weights; freezing them halves optimizer work on 2 cores
        for p in model.base_model.embeddings.parameters():
            p.requires_grad = False

    y_train = label_indices(train, labels, "training data")
    texts = [ex.text for ex in train]
    lengths = [len(t) for t in texts]
    rng = random.Random(seed)

    steps_per_epoch = math.ceil(len(texts) / batch_size)
    total = steps_per_epoch * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    step = 0
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        running = 0.0
        for b in length_batches(lengths, batch_size, rng):
            enc = tok([texts[j] for j in b], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out = model(**enc, labels=torch.as_tensor(y_train[b]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss = out.loss.detach().item()
            running = 0.95 * running + 0.05 * loss if step > 1 else loss
            if progress:
                progress("train", step, total, {"epoch": epoch + 1, "loss": round(running, 4)})
        model.eval()
        val_q = evaluate_torch(model, tok, labels, val, max_length)
        history.append({"epoch": epoch + 1, "loss": round(running, 4), "val_accuracy": val_q["accuracy"],
                        "val_macro_f1": val_q["macro_f1"]})
        if progress:
            progress("val", epoch + 1, epochs, history[-1])
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    if (keep := structure.kept_heads(base_dir)) is not None:
        structure.save(model, tok, out_dir, keep)
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "steps": step,
            "train_examples": len(train), "val_examples": len(val), "seconds": round(time.perf_counter() - t0, 1),
            "history": history}


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch's batches of indices: sorted by length inside shuffled pools (little padding, still random)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    pool = batch_size * 50
    out = []
    for i in range(0, len(idx), pool):
        chunk = sorted(idx[i:i + pool], key=lambda j: lengths[j])
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def evaluate_torch(model, tok, labels: Sequence[str], examples: Sequence[Example], max_length: int) -> dict:
    import torch

    if not examples:
        return {"n": 0, "accuracy": 0.0, "macro_f1": 0.0, "per_class_recall": {}}
    y = label_indices(examples, labels, "validation data")
    preds = []
    with torch.no_grad():
        for i in range(0, len(examples), 128):
            enc = tok([e.text for e in examples[i:i + 128]], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1).numpy())
    return quality(y, np.concatenate(preds), labels)
