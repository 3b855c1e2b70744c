"""Structured pruning of attention heads (BERT-family encoders), then fine-tuning to recover.

Unstructured sparsity (zeroed weights) does not speed ONNX Runtime up on CPU; removing whole heads does: each
removed head takes ``head_size`` rows out of the layer's query, key and value projections and as many columns
out of its output projection, so the exported graph has smaller MatMuls and fewer attention heads.

* **Importance** (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): a gate of 1.0 on every
  head's output; a head's importance is the mean |∂loss/∂gate| over labelled examples, normalised per layer.
* **Choice**: the least important heads across all layers go first (a global ranking), keeping at least one
  head in every layer.
* **Saved as**: a standard Hugging Face directory plus ``pruned_heads.json`` (``pipeline/model/structure.py``
  removes the heads, saves and loads such directories).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import UsageError
from pipeline.model.structure import (  # noqa: F401 — the structure operations, used here and re-exported
    PRUNED_HEADS,
    _layers,
    head_count,
    kept_heads,
    load_classifier,
    prune,
    save,
)


def head_importance(model, tok, texts: Sequence[str], y: np.ndarray, max_length: int, batch_size: int = 32) -> np.ndarray:
    """[layers, heads] importance: mean |∂loss/∂gate| per head (gates of 1.0 on each head's output)."""
    import torch

    layers = _layers(model)
    heads = head_count(model)
    gates = [torch.ones(h, requires_grad=True) for h in heads]
    sums = [torch.zeros(h) for h in heads]  # Σ over batches of |∂loss/∂gate|, not the signed sum
    hooks = []
    for layer, gate in zip(layers, gates):
        size = layer.attention.self.attention_head_size

        def pre(module, args, gate=gate, size=size):  # the heads' concatenated output, before the output projection
            return (args[0] * gate.repeat_interleave(size),) + tuple(args[1:])

        hooks.append(layer.attention.output.dense.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()  # no dropout: importance of the function the model computes
    try:
        with torch.enable_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
                out = model(**enc, labels=torch.as_tensor(y[i:i + batch_size]))
                out.loss.backward()
                for gate, acc in zip(gates, sums):
                    acc += gate.grad.abs()
                    gate.grad = None
                model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    width = max(heads)
    imp = np.full((len(heads), width), np.nan)
    for li, acc in enumerate(sums):
        v = acc.numpy().astype(np.float64)
        norm = np.linalg.norm(v)
        imp[li, :heads[li]] = v / norm if norm > 0 else v
    return imp


def choose_heads(importance: np.ndarray, fraction: float) -> dict[int, list[int]]:
    """Heads to keep per layer after removing ``fraction`` of all heads, least important first (≥ 1 per layer)."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--prune-heads must be a fraction between 0 and 1 (share of heads removed), got {fraction}")
    present = [(li, h) for li in range(importance.shape[0]) for h in range(importance.shape[1])
               if not np.isnan(importance[li, h])]
    n_remove = int(round(fraction * len(present)))
    order = sorted(present, key=lambda lh: (importance[lh], lh))  # ties: lower index first, deterministic
    keep = {li: set(h for l2, h in present if l2 == li) for li in range(importance.shape[0])}
    removed = 0
    for li, h in order:
        if removed >= n_remove:
            break
        if len(keep[li]) > 1:
            keep[li].discard(h)
            removed += 1
    return {li: sorted(hs) for li, hs in keep.items()}


def prune_and_recover(hf_dir: Path, out: Path, labels: Sequence[str], train, val, *, fraction: float,
                      max_length: int, importance_examples: int = 512, epochs: int = 1, lr: float = 5e-5,
                      progress=None) -> dict:
    """Importance on training examples → remove ``fraction`` of heads → fine-tune to recover → ``out``."""
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from pipeline.model.data import label_indices
    from pipeline.model.train import fine_tune

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = load_classifier(hf_dir, attn_implementation="eager")
    before = head_count(model)
    sample = list(train[:importance_examples])
    imp = head_importance(model, tok, [e.text for e in sample], label_indices(sample, labels, "training data"),
                          max_length)
    keep = choose_heads(imp, fraction)
    prune(model, keep)
    after = head_count(model)
    with tempfile.TemporaryDirectory(prefix="streamlabel-pruned-") as tmp:
        save(model, tok, Path(tmp), keep)
        del model
        torch.set_grad_enabled(True)  # load_hf_classifier turns gradients off process-wide
        recovery = fine_tune(Path(tmp), out, labels, train, val, epochs=epochs, lr=lr, max_length=max_length,
                             progress=progress)
    figures = {"structured": "heads", "fraction": fraction, "heads_before": sum(before), "heads_after": sum(after),
               "heads_per_layer": after, "importance": "mean |dloss/dgate| (Michel et al. 2019), "
               f"{len(sample)} training examples",
               "kept_heads": {str(k): v for k, v in keep.items()}, "recovery": recovery}
    return figures
