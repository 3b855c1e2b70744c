"""``GenerativeModel``: a causal LM artifact on ONNX Runtime: tokenizer, prompt format, prefill and one decode step.

Why not ``onnxruntime_genai.Generator``: on CPU its batch is fixed when it starts (rows cannot join or leave
between steps; its continuous-batching ``Engine`` needs CUDA and paged attention). The graph the builder
writes is plain ONNX (``input_ids``, ``attention_mask``, ``past_key_values.*`` → ``logits``, ``present.*``,
with GroupQueryAttention taking each row's length from its attention mask), so the scheduler drives it
with onnxruntime directly and owns the decode batch (``pipeline/generation/kv.py``).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.errors import ModelError, UsageError
from pipeline.manifest import ModelManifest, load_manifest
from pipeline.generation.kv import DecodeBatch, DeviceDecodeBatch
from pipeline.runtime import available_providers, no_capture, task_ids, with_cuda_graphs


def choose_generation(manifest: ModelManifest, variant: str | None, provider: str) -> tuple[str, list[str]]:
    """Pick (variant, providers) for a generator artifact: CPU → its gate's default (int4/int8), CUDA → fp16."""
    provider = provider.lower()
    if provider not in ("auto", "cpu", "cuda", "tensorrt"):
        raise UsageError(f"unknown provider '{provider}'", hint="use auto, cpu or cuda")
    have = available_providers()
    gpu = provider in ("cuda", "tensorrt") or (provider == "auto" and "CUDAExecutionProvider" in have
                                                and "fp16" in manifest.variants)
    if gpu and "CUDAExecutionProvider" not in have:
        raise ModelError(f"provider '{provider}' asked for, but this onnxruntime has only {have}",
                         hint="install the gpu extra (onnxruntime-gpu) on a CUDA machine, or use --provider cpu")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    if variant is None:
        if gpu:
            order = ["fp16", "fp32"]
        else:
            default = manifest.generation.get("default_cpu_variant")
            order = ([default] if default else []) + ["int4", "int8", "fp32"]
        variant = next((v for v in order if v in manifest.variants
                        and (manifest.variants[v].validated or gpu)), None)
        if variant is None:
            raise ModelError(f"artifact {manifest.model_id} has no validated variant for {providers[0]}",
                             hint="rebuild it with a CPU variant (--variants int4,int8) or pass --variant")
    else:
        manifest.variant(variant)
    return variant, providers


class GenerativeModel:
    """A causal LM artifact on ONNX Runtime: tokenizer, prompt format, prefill and one decode step."""

    task = "text-generation"
    labels: tuple[str, ...] = ()
    sessions = 1  # one session; the scheduler's decode thread drives it

    def __init__(self, artifact: str | Path, *, variant: str | None = None, provider: str = "auto",
                 threads: int | None = None, verify: bool = True, spin: bool = False, cuda_graph: bool | None = None,
                 **_ignored) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer


        root, manifest = load_manifest(artifact, verify=False)
        if manifest.task != "text-generation":
            raise ModelError(f"artifact {manifest.model_id} is a {manifest.task} model, not a generator", where=str(root))
        self.variant, self.providers = choose_generation(manifest, variant, provider)
        if verify:
            root, manifest = load_manifest(root, verify=True, variants=(self.variant,))
        self.root, self.manifest, self.model_id = root, manifest, manifest.model_id
        g = manifest.generation
        self.fmt: str = g["prompt_format"]
        self.eos = frozenset(int(t) for t in g["eos_token_ids"])
        self.context = int(g["context_length"])
        self.layers, self.kv_heads, self.head = int(g["num_layers"]), int(g["num_kv_heads"]), int(g["head_size"])
        self.tokenizer = Tokenizer.from_file(str(root / manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads = threads or max(1, os.cpu_count() or 1)
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.log_severity_level = 3
        if self.providers[0] != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 — system CUDA libraries are found by the loader instead
                pass
        before = task_ids()
        v = manifest.variant(self.variant)
        # On CUDA the decode step replays a captured CUDA graph per row bucket (kv.DeviceDecodeBatch); every other
        # run of the session (prefill, the gate's calls) says so with graph id -1, never capturing.
        cuda = self.providers[0] == "CUDAExecutionProvider"
        self.cuda_graph = cuda and cuda_graph is not False
        self.cuda_graph_error: str | None = None if cuda or not cuda_graph else "CUDA graphs need the CUDA provider"
        self.plain_run = None  # run options for a run that must not capture (set with cuda_graph)
        self._graph_ids = itertools.count(1)  # 0 and -1 are ONNX Runtime's own

        def load(providers):
            try:
                return ort.InferenceSession(str(root / v.file), sess_options=opts, providers=providers)
            except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own types
                raise ModelError(f"onnxruntime could not load {v.file}: {str(exc).splitlines()[0][:300]}",
                                 where=str(root), hint="rebuild the artifact or pick another --variant") from None

        self._load = load
        if self.cuda_graph:
            try:
                self.session = load(with_cuda_graphs(self.providers))
                self.plain_run = no_capture()
            except ModelError as exc:
                self.cuda_graph, self.cuda_graph_error = False, str(exc)
        if not self.cuda_graph:
            self.session = load(self.providers)
        if self.providers[0] not in self.session.get_providers():
            raise ModelError(f"{self.providers[0]} could not start (the session has only {self.session.get_providers()})",
                             where=str(root), hint="check CUDA/cuDNN for onnxruntime-gpu, or use --provider cpu")
        self.thread_ids = task_ids() - before
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self.out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = np.float16 if types.get(self.past_names[0]) == "tensor(float16)" else np.float32
        self.has_next = any(o.name == "next_token" for o in self.session.get_outputs())  # in-graph argmax
        # Each row's last position only (pipeline/model/generative.py: add_next_token), or every position.
        self.last_only = next(o.shape[1] for o in self.session.get_outputs() if o.name == "logits") == 1
        self._prefix_cache: dict[tuple[int, ...], dict[str, np.ndarray]] = {}

    # -- text ---------------------------------------------------------------------------------------
    def render(self, system: str, user: str) -> str:
        return self.fmt.format(system=system, user=user)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def encode_prompt(self, system: str, user: str) -> list[int]:
        return self.encode(self.render(system, user))

    def prefix_of(self, system: str) -> str:
        """The part of every prompt of this system message that comes before the user's text."""
        return self.fmt[: self.fmt.index("{user}")].format(system=system) if "{user}" in self.fmt else ""

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos], skip_special_tokens=True)

    # -- graph --------------------------------------------------------------------------------------
    def empty_past(self, rows: int) -> dict[str, np.ndarray]:
        z = np.zeros((rows, self.kv_heads, 0, self.head), dtype=self.kv_dtype)
        return {n: z for n in self.past_names}

    def forward(self, ids: np.ndarray, mask: np.ndarray, past: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        outs = self.session.run(self.out_names, {"input_ids": ids, "attention_mask": mask, **past}, self.plain_run)
        return outs[0], dict(zip(self.past_names, outs[1:]))

    def prefix_past(self, prefix: tuple[int, ...]) -> dict[str, np.ndarray]:
        """KV of a shared prompt prefix (a template's system part), computed once per prefix."""
        past = self._prefix_cache.get(prefix)
        if past is None:
            ids = np.asarray([prefix], dtype=np.int64)
            _, past = self.forward(ids, np.ones_like(ids), self.empty_past(1))
            if len(self._prefix_cache) >= 16:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            self._prefix_cache[prefix] = past
        return past

    def prefill(self, ids: Sequence[int], prefix: tuple[int, ...] = ()) -> tuple[np.ndarray, dict]:
        """One prompt (batch 1): logits of its last position and its KV. Reuses ``prefix``'s KV when it applies."""
        if prefix and len(ids) > len(prefix) and tuple(ids[: len(prefix)]) == prefix:
            past = self.prefix_past(prefix)
            rest = np.asarray([ids[len(prefix):]], dtype=np.int64)
        else:
            past = self.empty_past(1)
            rest = np.asarray([ids], dtype=np.int64)
        logits, present = self.forward(rest, np.ones((1, len(ids)), dtype=np.int64), past)
        return logits[0, -1], present

    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, dict]:
        """Prompts in one call, right-padded, no past: each one's last-position logits (k × vocab) and the KV
        of all of them (batch k, the longest prompt's length; row j valid up to ``len(prompts[j])``).

        GroupQueryAttention's first-prompt path takes each row's length from its mask, so a padded row computes
        exactly what it would alone. It has no batched path over a shared past (ONNX Runtime: "batch_size must
        be 1 when sequence_length > 1 and past context is given"), so a template's prefix is not reused here.
        """
        k = len(prompts)
        lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=k)
        width = int(lens.max())
        valid = np.arange(width)[None, :] < lens[:, None]
        ids = np.zeros((k, width), dtype=np.int64)
        ids[valid] = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
        logits, present = self.forward(ids, valid.astype(np.int64), self.empty_past(k))
        return (logits[:, -1] if self.last_only else logits[np.arange(k), lens - 1]), present

    def drop_graphs(self, reason: str) -> None:
        """A capture failed: the session made again without CUDA graphs (a failed capture may leave the old one's
        stream unusable); ``cuda_graph_error`` says why. Callers rebind what they bound to the old session."""
        self.cuda_graph, self.cuda_graph_error, self.plain_run = False, reason, None
        self.session = self._load(self.providers)

    def graph_id(self) -> int:
        """A CUDA graph id not yet used in this session."""
        return next(self._graph_ids)

    def new_batch(self, rows: int, length: int, capture: bool = False):
        """The decode batch for this provider: host buffers (CPU) or device-resident slots (CUDA; ``capture``: its
        decode steps as CUDA graphs, for a batch that lives as long as the scheduler)."""
        if self.providers[0] == "CUDAExecutionProvider":
            return DeviceDecodeBatch(self, rows, length, capture=capture)
        return DecodeBatch(self)

    def greedy(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Greedy decoding of prompts in one batch (rows retire at end-of-sequence): the gate's path."""
        batch = self.new_batch(len(prompts), max(len(p) for p in prompts) + n + 1)
        outs = {i: [t] for i, t in enumerate(batch.join_many(list(enumerate(prompts)), greedy=True))}
        batch.leave([j for j, r in enumerate(batch.rows) if outs[r][-1] in self.eos or n <= 1])
        while batch.rows:
            nxt = batch.step(np.asarray([outs[r][-1] for r in batch.rows], dtype=np.int64), greedy=True)
            done = []
            for j, (r, t) in enumerate(zip(batch.rows, nxt.tolist())):
                outs[r].append(int(t))
                if t in self.eos or len(outs[r]) >= n:
                    done.append(j)
            batch.leave(done)
        return [outs[i] for i in range(len(prompts))]

    def speed(self, rows: int = 16, past_len: int = 64, steps: int = 4) -> dict:
        """Decode tokens/s at ``rows`` rows (past of ``past_len``) and prefill tokens/s for one 64-token prompt."""
        batch = DecodeBatch(self)
        kv = {n: np.zeros((1, self.kv_heads, past_len, self.head), dtype=self.kv_dtype) for n in self.past_names}
        batch.rebuild([], [(i, kv, past_len) for i in range(rows)])
        toks = np.zeros(rows, dtype=np.int64)
        batch.step(toks, greedy=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            batch.step(toks, greedy=True)
        decode = rows * steps / (time.perf_counter() - t0)
        ids = [1] * 64
        self.prefill(ids)
        t0 = time.perf_counter()
        self.prefill(ids)
        prefill = 64 / (time.perf_counter() - t0)
        return {f"decode_tokens_per_s_batch_{rows}": round(decode, 1), "prefill_tokens_per_s": round(prefill, 1)}

    def close(self) -> None:
        self._prefix_cache.clear()
