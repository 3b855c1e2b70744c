"""Hugging Face classifier → ONNX graphs: export, transformer fusions, INT8 dynamic, FP16. Needs the train extra."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import ModelError
from pipeline.model.structure import PRUNED_HEADS as PRUNED

OPSET = 17
_GENERIC = "LABEL_"


@dataclass
class HfClassifier:
    model: object  # transformers PreTrainedModel, eval mode
    tokenizer: object  # transformers fast tokenizer
    labels: tuple[str, ...]
    model_type: str
    num_heads: int  # 0: layers differ (head-pruned); the optimizer reads each attention's heads from the graph
    hidden_size: int
    source: str


def load_hf_classifier(model_dir: str | Path, labels: Sequence[str] | None = None) -> HfClassifier:
    """Load a fine-tuned sequence classifier; errors say what is wrong with the directory."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not d.is_dir():
        raise ModelError("model directory does not exist", where=str(d),
                         hint="pass a Hugging Face model directory (config.json, weights, tokenizer)")
    if not cfg_path.is_file():
        raise ModelError("no config.json: this is not a Hugging Face model directory", where=str(d),
                         hint="save the model with model.save_pretrained(DIR) and the tokenizer beside it")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ModelError(f"config.json is not valid JSON ({exc})", where=str(cfg_path)) from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(
            f"not a sequence classifier (architectures: {archs or 'none'})",
            where=str(d),
            hint="fine-tune an AutoModelForSequenceClassification first, or use a --preset",
        )
    head_labels = [cfg.get("id2label", {}).get(str(i)) for i in range(len(cfg.get("id2label", {})))]
    n_head = len(head_labels) or int(cfg.get("num_labels", 0) or 0)
    if labels:
        labels = tuple(labels)
        if n_head and len(labels) != n_head:
            raise ModelError(
                f"--labels names {len(labels)} labels but the model's head has {n_head} outputs",
                where=str(d),
                hint=f"give exactly {n_head} comma-separated names, in the head's output order",
            )
    else:
        if not head_labels or any(lbl is None or str(lbl).startswith(_GENERIC) for lbl in head_labels):
            raise ModelError(
                f"the model's labels are generic ({head_labels}); their names are unknown",
                where=str(d),
                hint="name them in output order with --labels a,b,c",
            )
        labels = tuple(head_labels)

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # eager attention exports to the plain MatMul/Softmax pattern that ORT's optimizer fuses.
        from pipeline.model.structure import load_classifier

        model = load_classifier(d, attn_implementation="eager")  # head-pruned directories too
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as exc:  # transformers raises OSError/ValueError/… with long texts
        raise ModelError(f"transformers could not load it: {str(exc).splitlines()[0]}", where=str(d),
                         hint="check that weights and tokenizer files are complete") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError("the tokenizer has no fast (Rust) version", where=str(d),
                         hint="save a tokenizer.json with the model (tokenizers library)")
    model.eval()
    torch.set_grad_enabled(False)
    c = model.config
    return HfClassifier(
        model=model,
        tokenizer=tok,
        labels=tuple(labels),
        model_type=c.model_type,
        num_heads=0 if (d / PRUNED).is_file() else int(getattr(c, "num_attention_heads", getattr(c, "n_heads", 0)) or 0),
        hidden_size=0 if (d / PRUNED).is_file() else int(getattr(c, "hidden_size", getattr(c, "dim", 0)) or 0),
        source=str(d),
    )


def input_names(clf: HfClassifier) -> list[str]:
    import inspect

    params = inspect.signature(clf.model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and clf.model_type not in ("roberta", "xlm-roberta", "distilbert"):
        names.append("token_type_ids")
    return names


def torch_logits(clf: HfClassifier, texts: Sequence[str], max_length: int, batch: int = 64) -> np.ndarray:
    import torch

    names = input_names(clf)
    outs = []
    for i in range(0, len(texts), batch):
        enc = clf.tokenizer(list(texts[i:i + batch]), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt", return_token_type_ids="token_type_ids" in names)
        with torch.no_grad():
            outs.append(clf.model(**{k: enc[k] for k in names if k in enc}).logits.float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, len(clf.labels)), np.float32)


def export_onnx(clf: HfClassifier, path: Path) -> list[str]:
    """One graph: encoder + pooling + head, dynamic batch and sequence axes, output ``logits``."""
    import torch

    names = input_names(clf)
    enc = clf.tokenizer(["streamlabel export sample", "a second, longer sample sentence"], padding=True,
                        return_tensors="pt", return_token_type_ids="token_type_ids" in names)
    args = tuple(enc[k] for k in names)
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(clf.model, args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return names


def optimize(raw: Path, out: Path, clf: HfClassifier) -> dict:
    """ORT's transformer optimizer (attention/LayerNorm/GELU fusions); returns the fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = "bert" if clf.model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "electra") else clf.model_type
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    if clf.num_heads == 0:  # head-pruned: per-layer counts come from the graph; the optimizer warns about each one
        quiet.setLevel(logging.ERROR)
    try:
        opt = optimize_model(str(raw), model_type=model_type, num_heads=clf.num_heads, hidden_size=clf.hidden_size,
                             opt_level=1, use_gpu=False, only_onnxruntime=False)
    finally:
        quiet.setLevel(level)
    opt.save_model_to_file(str(out))
    stats = opt.get_fused_operator_statistics()
    return {k: int(v) for k, v in stats.items() if v}


def quantize_int8(fp32: Path, out: Path) -> None:
    """Dynamic INT8 for CPU: MatMul and fused Attention weights per-channel; embeddings stay FP32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about pre-processing that the optimizer already did
    try:
        # Fused ops (Attention, SkipLayerNormalization) carry no shape information, so the quantizer is told
        # the element type of their outputs instead of guessing.
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Attention"],
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def to_fp16(fp32_optimized: Path, out: Path) -> None:
    """FP16 for GPU, inputs/outputs kept as int64/float32 so callers do not change."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(onnx.load(str(fp32_optimized)))
    m.convert_float_to_float16(keep_io_types=True)
    m.save_model_to_file(str(out))


def break_variant(path: Path, n_labels: int) -> None:
    """Deliberately damage a variant so the quality gate can be shown refusing it.

    Appends a Gather that rotates the logits by one label: every prediction moves to the next label, whatever
    the model (and whatever the variant's weight format).
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [f"{out}__unbroken" if o == out else o for o in node.output]
    idx = numpy_helper.from_array(np.roll(np.arange(n_labels, dtype=np.int64), -1), f"{out}__rotation")
    m.graph.initializer.append(idx)
    m.graph.node.append(helper.make_node("Gather", [f"{out}__unbroken", idx.name], [out], axis=1, name="broken_on_purpose"))
    onnx.save(m, str(path))


def torch_threads() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


def pin_head_counts(path: Path) -> int:
    """Write each attention's head count into its Q/K/V reshapes (where the export left -1); returns how many.

    Transformers reshapes Q, K and V to ``(batch, sequence, -1, head_size)``. ORT's optimizer reads the head
    count of each attention from that shape (or takes one count for the whole model); in a head-pruned model
    layers differ, so the count is pinned per reshape from its projection's width: ``out_features // head_size``.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def const(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        n = producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    pinned = 0
    for node in list(g.node):
        if node.op_type != "Reshape":
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        heads, size = const(concat.input[2]), const(concat.input[3])
        if heads is None or size is None or heads.size != 1 or size.size != 1 or int(heads.ravel()[0]) != -1:
            continue
        src = producer.get(node.input[0])
        if src is not None and src.op_type == "Add":  # projection bias
            src = next((producer[i] for i in src.input if i in producer and producer[i].op_type == "MatMul"), None)
        if src is None or src.op_type != "MatMul" or src.input[1] not in inits:
            continue
        width = int(numpy_helper.to_array(inits[src.input[1]]).shape[-1])
        name = f"streamlabel_pinned_heads_{pinned}"  # unique even where the exporter left nodes unnamed
        g.initializer.append(numpy_helper.from_array(np.asarray([width // int(size.ravel()[0])], dtype=heads.dtype), name))
        concat.input[2] = name
        pinned += 1
    onnx.save(m, str(path))
    return pinned
