"""The shape of a Hugging Face sequence classifier: load one (head-pruned ones too), drop encoder layers, remove
attention heads, save. No training here (``prune.py``, ``train.py`` and ``distil.py`` build on it).

Head-pruned directories are a standard Hugging Face directory plus ``pruned_heads.json`` (layer → heads kept).
The weights have the pruned shapes, so :func:`load_classifier` builds the model from its config, prunes the
same heads and loads the weights strictly. Transformers 5 removed its own ``prune_heads``; this is the same
operation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.errors import ModelError, UsageError

PRUNED_HEADS = "pruned_heads.json"


def _layers(model):
    enc = getattr(model.base_model, "encoder", None)
    layers = getattr(enc, "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0].attention, "self"):
        raise UsageError(f"head pruning supports BERT-family encoders; {type(model).__name__} is not one",
                         hint="drop --prune-heads, or prune layers instead (keep_layers / model distil --student)")
    return layers


def head_count(model) -> list[int]:
    """Heads per layer as the model is now."""
    return [int(layer.attention.self.query.out_features // layer.attention.self.attention_head_size)
            for layer in _layers(model)]


def prune(model, keep: dict[int, Sequence[int]]) -> None:
    """Remove the heads not in ``keep`` (layer → heads kept, original head indices), in place."""
    import torch

    for li, layer in enumerate(_layers(model)):
        att = layer.attention.self
        size = att.attention_head_size
        n = att.query.out_features // size
        kept = sorted(int(h) for h in keep.get(li, keep.get(str(li), range(n))))
        if not kept or max(kept) >= n:
            raise ModelError(f"layer {li} has {n} heads; cannot keep {kept}", hint=f"check {PRUNED_HEADS}")
        if len(kept) == n:
            continue
        idx = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept])
        for name in ("query", "key", "value"):
            setattr(att, name, _slice_linear(getattr(att, name), idx, dim=0))
        out = layer.attention.output
        out.dense = _slice_linear(out.dense, idx, dim=1)
        att.num_attention_heads = len(kept)
        att.all_head_size = len(kept) * size


def _slice_linear(lin, idx, dim: int):
    import torch

    w = lin.weight.detach().index_select(dim, idx).clone()
    b = None if lin.bias is None else (lin.bias.detach()[idx].clone() if dim == 0 else lin.bias.detach().clone())
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def save(model, tok, out: Path, keep: dict[int, Sequence[int]], figures: dict | None = None) -> None:
    """A Hugging Face directory + ``pruned_heads.json``; :func:`load_classifier` reads it back."""
    out = Path(out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / PRUNED_HEADS).write_text(json.dumps({"kept_heads": {str(k): list(v) for k, v in keep.items()},
                                                **(figures or {})}, indent=1))


def kept_heads(model_dir: Path) -> dict[int, list[int]] | None:
    f = Path(model_dir) / PRUNED_HEADS
    if not f.is_file():
        return None
    try:
        return {int(k): [int(h) for h in v] for k, v in json.loads(f.read_text())["kept_heads"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{PRUNED_HEADS} is unreadable ({exc})", where=str(f),
                         hint="rebuild the pruned model; the file maps each layer to the heads it kept") from None


def load_classifier(model_dir: Path, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained``, head-pruned directories and probes included."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.model.probe import is_probe, load_probe

    if is_probe(model_dir):
        return load_probe(model_dir)
    keep = kept_heads(model_dir)
    if keep is None:
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)
    from safetensors.torch import load_file

    cfg_kwargs = {k: v for k, v in kwargs.items() if k != "attn_implementation"}
    config = AutoConfig.from_pretrained(str(model_dir), **cfg_kwargs)
    model = AutoModelForSequenceClassification.from_config(
        config, attn_implementation=kwargs.get("attn_implementation", "eager"))
    prune(model, keep)
    weights = Path(model_dir) / "model.safetensors"
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(f"the pruned weights do not fit the pruned model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})", where=str(weights), hint="rebuild the pruned model")
    return model.eval()


def make_student(base_dir: Path, keep: Sequence[int] | None, labels: Sequence[str], out: Path) -> dict:
    """Save a sequence classifier made of ``base_dir``'s encoder with only layers ``keep`` (and a new head)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
    layers = model.base_model.encoder.layer
    before = len(layers)
    if keep is not None:
        if max(keep) >= before:
            raise UsageError(f"the student keeps layer {max(keep)} but the base model has {before} layers")
        model.base_model.encoder.layer = torch.nn.ModuleList([layers[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    return {"base_layers": before, "kept_layers": list(keep) if keep is not None else list(range(before))}
