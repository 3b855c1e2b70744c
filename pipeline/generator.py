"""Generator serving: prompt templates, ``GenerativeModel`` (ONNX Runtime over the builder's graph) and the
``GenerationScheduler`` (iteration-level batching).

Why not ``onnxruntime_genai.Generator``: on CPU its batch is fixed when it starts (rows cannot join or leave
between steps; its continuous-batching ``Engine`` needs CUDA and paged attention). The graph the builder
writes is plain ONNX (``input_ids``, ``attention_mask``, ``past_key_values.*`` → ``logits``, ``present.*``,
with GroupQueryAttention taking each row's length from its attention mask), so the scheduler drives it
with onnxruntime directly and owns the decode batch: rows join and retire between any two steps.

Policy (``GenerationScheduler``)
--------------------------------
* **Admission.** ``submit_many`` takes rendered prompts with their deadlines (epoch seconds) and returns one
  future for all of them. The decode thread tokenizes them; a prompt longer than the model's context (less
  ``max_new_tokens``) fails at once (``EngineFailure``: the worker dead-letters it). An identical prompt
  already waiting or running shares its answer.
* **Order: earliest deadline first.** Waiting prompts are ordered by deadline.
* **Joining between steps.** Before every decode step, waiting prompts are prefilled (their common prefix,
  the template's system part, is computed once and reused) and join the running batch, while it has fewer
  than ``max_batch`` rows and the batch's KV budget (prompt + ``max_new_tokens`` of every row, at most
  ``max_tokens``) allows. At most ``prefill_tokens`` prompt tokens are prefilled per step, so a burst of
  arrivals delays the running rows' next token by a bounded amount.
* **Retiring.** A row finishes with ``finish_reason``: ``stop`` (an end-of-sequence token or a stop string),
  ``length`` (``max_new_tokens``) or ``deadline`` (its deadline passed: it keeps what it has, at least the
  first token). Its slot is free for the next step.
* **KV layout.** One preallocated buffer per layer, shared by the graph's past input and present output
  (I/O binding), so a decode step copies no KV. Rows are right-padded: row *b* holds its ``len[b]`` valid
  positions first; the attention mask marks them and GroupQueryAttention writes each new position at
  ``len[b]``. A joining row's prompt KV is copied into a free slot; a leaving row's slot takes the last row.
* **Failures.** A prompt whose prefill fails is that prompt's ``EngineFailure``. A failing decode step
  means a broken engine (``EngineError``): every waiting and running prompt fails and the worker stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.errors import EngineError, ModelError, UsageError, is_input_failure
from pipeline.events import Event, Generation
from pipeline.model.manifest import ModelManifest, load_manifest


GPU_SLOT_POSITIONS = 1024  # positions per decode slot on a GPU unless generate.max_prompt_tokens says otherwise

# ------------------------------------------------------------------------------------------ templates
@dataclass(frozen=True)
class Template:
    """A prompt built from an event's fields: ``system`` and ``user`` are ``str.format`` strings over
    ``text``, ``source``, ``entity`` and ``label`` (missing fields are empty)."""

    name: str
    system: str
    user: str = "{text}"

    def render(self, text: str, source: str | None = None, entity: str | None = None,
               label: str | None = None) -> tuple[str, str]:
        f = {"text": text, "source": source or "", "entity": entity or "", "label": label or ""}
        return self.system.format(**f), self.user.format(**f)

    def for_event(self, ev: Event) -> tuple[str, str]:
        return self.render(ev.text, ev.source, ev.entity, ev.label)


TEMPLATES: dict[str, Template] = {
    "reply": Template("reply", "You are a customer-support agent. Write a short, polite reply to the customer's message."),
    "summary": Template("summary", "Summarize the text in one short sentence."),
    "explain-label": Template("explain-label", "Explain in one sentence why the message has the given label.",
                              "Message: {text}\nLabel: {label}"),
}


def template_from(name: str, system: str | None = None, user: str | None = None) -> Template:
    """A built-in template (``reply``, ``summary``, ``explain-label``), its parts overridden by config."""
    base = TEMPLATES.get(name)
    if base is None and not (system and user):
        raise UsageError(f"unknown prompt template '{name}'",
                         hint=f"use one of {', '.join(TEMPLATES)}, or set both generate.system and generate.user")
    t = Template(name, system if system is not None else base.system, user if user is not None else base.user)
    try:
        t.render("x")
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"prompt template '{name}' does not format: {exc!r}",
                         hint="use only {text}, {source}, {entity} and {label} as fields; write literal braces as {{ }}") from None
    return t


# ------------------------------------------------------------------------------------------ model
def choose_generation(manifest: ModelManifest, variant: str | None, provider: str) -> tuple[str, list[str]]:
    """Pick (variant, providers) for a generator artifact: CPU → its gate's default (int4/int8), CUDA → fp16."""
    from pipeline.engine import available_providers

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

    def __init__(self, artifact: str | Path, *, variant: str | None = None, provider: str = "auto",
                 threads: int | None = None, verify: bool = True, spin: bool = False, **_ignored) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from pipeline.engine import _task_ids

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
        before = _task_ids()
        v = manifest.variant(self.variant)
        try:
            self.session = ort.InferenceSession(str(root / v.file), sess_options=opts, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 — onnxruntime raises its own types
            raise ModelError(f"onnxruntime could not load {v.file}: {str(exc).splitlines()[0][:300]}", where=str(root),
                             hint="rebuild the artifact or pick another --variant") from None
        if self.providers[0] not in self.session.get_providers():
            raise ModelError(f"{self.providers[0]} could not start (the session has only {self.session.get_providers()})",
                             where=str(root), hint="check CUDA/cuDNN for onnxruntime-gpu, or use --provider cpu")
        self.thread_ids = _task_ids() - before
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self.out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = np.float16 if types.get(self.past_names[0]) == "tensor(float16)" else np.float32
        self.has_next = any(o.name == "next_token" for o in self.session.get_outputs())  # in-graph argmax
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
        outs = self.session.run(self.out_names, {"input_ids": ids, "attention_mask": mask, **past})
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

    def new_batch(self, rows: int, length: int):
        """The decode batch for this provider: host buffers (CPU) or device-resident slots (CUDA)."""
        if self.providers[0] == "CUDAExecutionProvider":
            return DeviceDecodeBatch(self, rows, length)
        return DecodeBatch(self)

    def greedy(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        """Greedy decoding of prompts in one batch (rows retire at end-of-sequence): the gate's path."""
        batch = self.new_batch(len(prompts), max(len(p) for p in prompts) + n + 1)
        outs: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            outs[i] = [batch.join(i, ids, greedy=True)]
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


class DecodeBatch:
    """The running rows' KV in one preallocated buffer per layer, updated in place, and one decode step.

    Row b holds its ``lens[b]`` valid positions first (right padding); the attention mask marks them and
    GroupQueryAttention writes each new position at ``lens[b]``. The step binds the same buffer as the
    graph's past input and present output (ONNX Runtime I/O binding), so a step copies no KV: before this,
    the graph concatenated past and new into a fresh present every step, and every join or leave copied
    the whole batch. A row joins by copying its prompt's KV into the next free slot; a row leaves by moving
    the last row into its slot.
    """

    GROW = 64  # positions added when a row outgrows the buffer

    def __init__(self, model: GenerativeModel) -> None:
        self.m = model
        self.rows: list = []  # the caller's handle per row, in slot order
        self.lens = np.zeros(0, dtype=np.int64)
        self.buf: dict[str, np.ndarray] = {}

    def _shape(self) -> tuple[int, int]:
        if not self.buf:
            return 0, 0
        a = next(iter(self.buf.values()))
        return a.shape[0], a.shape[2]

    def _ensure(self, rows: int, length: int) -> None:
        have_rows, have_len = self._shape()
        if rows <= have_rows and length <= have_len:
            return
        self._resize(max(rows, have_rows), max(have_len, -(-length // self.GROW) * self.GROW))

    def _resize(self, rows: int, length: int) -> None:
        """Buffers of ``rows`` × ``length`` positions, keeping the running rows' KV (their first ``length``)."""
        m = self.m
        have_len = self._shape()[1]
        n = len(self.rows)
        keep = min(have_len, length)
        for name in m.past_names:
            new = np.zeros((rows, m.kv_heads, length, m.head), dtype=m.kv_dtype)
            if name in self.buf and n:
                new[:n, :, :keep] = self.buf[name][:n, :, :keep]
            self.buf[name] = new
        lens = np.zeros(rows, dtype=np.int64)
        lens[:n] = self.lens[:n]
        self.lens = lens

    def _shrink(self) -> None:
        """After rows leave: give memory back once the buffers hold four times what the rows need (a long
        prompt that finished must not make every later batch allocate rows × its length). Empty: freed."""
        n = len(self.rows)
        if not n:
            self.buf, self.lens = {}, np.zeros(0, dtype=np.int64)
            return
        have_rows, have_len = self._shape()
        rows = -(-n // 8) * 8
        length = -(-(int(self.lens[:n].max()) + self.GROW) // self.GROW) * self.GROW  # room to grow in place
        if have_rows * have_len > 4 * rows * length:
            self._resize(rows, length)

    @property
    def nbytes(self) -> int:
        """Bytes the KV buffers hold now."""
        return sum(a.nbytes for a in self.buf.values())

    def admits(self, needs: Sequence[int], need: int, budget: int) -> bool:
        """Would one more row of ``need`` positions keep the buffers (rows × the longest row, right-padded)
        within ``budget`` positions? ``needs``: the running rows' positions (prompt + max new tokens)."""
        return (len(needs) + 1) * max(max(needs, default=0), need) <= budget

    def rebuild(self, keep: Sequence[int], new: Sequence[tuple[object, dict, int]]) -> None:
        """Keep rows ``keep`` (increasing indices into ``rows``) and add ``new`` (handle, KV of batch 1, length)."""
        keep = list(keep)
        n_keep = len(keep)
        kept = set(keep)
        holes = [i for i in range(n_keep) if i not in kept]
        movers = [i for i in keep if i >= n_keep]
        rows = self.rows[:n_keep]
        for hole, mover in zip(holes, movers):
            for arr in self.buf.values():
                arr[hole] = arr[mover]
            self.lens[hole] = self.lens[mover]
            rows[hole] = self.rows[mover]
        self.rows = rows
        if new:
            self._ensure(n_keep + len(new), max(n for _, _, n in new) + 1)
            for j, (handle, kv, n) in enumerate(new):
                slot = n_keep + j
                for name, arr in self.buf.items():
                    arr[slot, :, :n] = kv[name][0, :, :n]
                self.lens[slot] = n
                self.rows.append(handle)

    def join(self, handle, ids: Sequence[int], prefix: tuple[int, ...] = (), greedy: bool = False):
        """Prefill a prompt (reusing ``prefix``'s KV) into a new row; returns its last position's logits
        (``greedy``: the argmax token id)."""
        last, kv = self.m.prefill(ids, prefix)
        self.rebuild(range(len(self.rows)), [(handle, kv, len(ids))])
        return int(last.argmax()) if greedy else last

    def leave(self, indices: Sequence[int]) -> None:
        """Rows ``indices`` (into ``rows``) leave the batch."""
        if indices:
            gone = set(indices)
            self.rebuild([i for i in range(len(self.rows)) if i not in gone], [])
            self._shrink()

    def step(self, tokens: np.ndarray, greedy: bool = False) -> np.ndarray:
        """Feed each row its latest token; returns next-token logits (rows × vocab), or with ``greedy`` the
        argmax token ids (rows)."""
        import onnxruntime as ort

        m = self.m
        n = len(self.rows)
        lens = self.lens[:n]
        width = int(lens.max()) + 1
        self._ensure(n, width)
        io = m.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(tokens.reshape(-1, 1), dtype=np.int64))
        io.bind_cpu_input("attention_mask", (np.arange(width)[None, :] <= lens[:, None]).astype(np.int64))
        ids_out = greedy and m.has_next
        io.bind_output("next_token" if ids_out else "logits")  # output 0; ONNX Runtime allocates it
        if ids_out:
            io.bind_output("logits")
        for name, out in zip(m.past_names, m.out_names[1:]):
            v = ort.OrtValue.ortvalue_from_numpy(self.buf[name][:n])  # a view: the first n slots
            io.bind_ortvalue_input(name, v)
            io.bind_ortvalue_output(out, v)
        m.session.run_with_iobinding(io)
        self.lens[:n] += 1
        out = io.get_outputs()[0].numpy()[:, -1]  # no KV leaves ONNX Runtime
        return out if ids_out or not greedy else out.argmax(axis=1)


class DeviceDecodeBatch:
    """The decode batch on a GPU: the KV stays in device memory, in ``rows`` fixed slots of ``length`` positions.

    Each layer's buffer is bound as both past input and present output (I/O binding by device pointer), so
    no KV crosses PCIe: a joining prompt is prefilled straight into its slot (its rows of the buffer), a
    step moves only token ids and a mask in and logits out. Rows never move: a free slot runs a dummy token
    with length 0 (on a GPU a decode step costs about the same for a few rows or for all of them, it is
    bound by reading the weights). No shared-prefix reuse here (prefill is cheap on a GPU).
    """

    def __init__(self, model: GenerativeModel, rows: int, length: int, device: str = "cuda") -> None:
        import onnxruntime as ort

        self.m = model
        self.device = device  # "cpu" runs the same slot logic in host memory (tests)
        self.slots: list = [None] * rows
        self.length = length
        self.lens = np.zeros(rows, dtype=np.int64)
        self.dtype = model.kv_dtype
        self.item = np.dtype(self.dtype).itemsize
        shape = [rows, model.kv_heads, length, model.head]
        self.buf = {n: ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, 0) for n in model.past_names}
        self.row_bytes = model.kv_heads * length * model.head * self.item

    @property
    def rows(self) -> list:
        return [h for h in self.slots if h is not None]

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.row_bytes * len(self.buf)

    def admits(self, needs: Sequence[int], need: int, budget: int) -> bool:
        """Slots are preallocated: a free slot that fits the row is all it takes (and the sum budget)."""
        return len(needs) < len(self.slots) and need + 1 <= self.length and sum(needs) + need <= budget

    def _bind(self, io, first: int, count: int) -> None:
        m = self.m
        shape = [count, m.kv_heads, self.length, m.head]
        for name, out in zip(m.past_names, m.out_names[1:]):
            ptr = self.buf[name].data_ptr() + first * self.row_bytes
            io.bind_input(name, self.device, 0, self.dtype, shape, ptr)
            io.bind_output(out, self.device, 0, self.dtype, shape, ptr)

    def _outputs(self, io, greedy: bool) -> bool:
        """Bind what leaves the device: the argmax ids (greedy, when the graph has them) or the logits."""
        ids_out = greedy and self.m.has_next
        if ids_out:
            io.bind_output("next_token", "cpu")
            io.bind_output("logits", self.device)  # stays on the device
        else:
            io.bind_output("logits", "cpu")
        return ids_out

    def join(self, handle, ids: Sequence[int], prefix: tuple[int, ...] = (), greedy: bool = False):
        if len(ids) + 1 > self.length:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit a slot of {self.length}")
        slot = self.slots.index(None)
        io = self.m.session.io_binding()
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, len(ids)), dtype=np.int64))
        ids_out = self._outputs(io, greedy)
        self._bind(io, slot, 1)
        self.m.session.run_with_iobinding(io)
        self.slots[slot] = handle
        self.lens[slot] = len(ids)
        out = io.get_outputs()[0].numpy()[0, -1]
        return int(out) if ids_out else int(out.argmax()) if greedy else out

    def leave(self, indices: Sequence[int]) -> None:
        active = [i for i, h in enumerate(self.slots) if h is not None]
        for j in indices:
            self.slots[active[j]] = None
            self.lens[active[j]] = 0

    def step(self, tokens: np.ndarray, greedy: bool = False) -> np.ndarray:
        active = [i for i, h in enumerate(self.slots) if h is not None]
        toks = np.zeros((len(self.slots), 1), dtype=np.int64)
        toks[active, 0] = tokens
        width = int(self.lens.max()) + 1
        io = self.m.session.io_binding()
        io.bind_cpu_input("input_ids", toks)
        io.bind_cpu_input("attention_mask", (np.arange(width)[None, :] <= self.lens[:, None]).astype(np.int64))
        ids_out = self._outputs(io, greedy)
        self._bind(io, 0, len(self.slots))
        self.m.session.run_with_iobinding(io)
        self.lens[active] += 1
        out = io.get_outputs()[0].numpy()[active, -1]
        return out if ids_out or not greedy else out.argmax(axis=1)


# ------------------------------------------------------------------------------------------ scheduler
def prompt_seed(prompt: str) -> int:
    """A sampling seed from the prompt that every process computes alike (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "big")


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class _Seq:
    __slots__ = ("prompt", "ids", "deadline", "order", "enqueued", "admitted", "first_at", "out", "waiters",
                 "finish", "rng", "stop_at")

    def __init__(self, prompt: str, deadline: float, order: int, enqueued: float) -> None:
        self.prompt = prompt
        self.ids: list[int] = []
        self.deadline = deadline
        self.order = order
        self.enqueued = enqueued
        self.admitted = 0.0
        self.first_at = 0.0
        self.out: list[int] = []
        self.waiters: list = []  # (Answers, index)
        self.finish: str | None = None
        self.rng = None
        self.stop_at: int | None = None  # text cut at a stop string


class GenerationScheduler:
    """Iteration-level batching over a ``GenerativeModel`` on its own thread (policy: the module docstring).

    Same surface as ``MicroBatcher`` for the worker: ``start``, ``task``, ``submit_many``, ``call_seconds``,
    ``waiting``, ``close``; answers are ``Generation`` or ``EngineFailure``.
    """

    def __init__(self, model: GenerativeModel, *, max_batch: int = 32, max_tokens: int = 8192, max_new_tokens: int = 32,
                 stop: Sequence[str] = (), sampling: Sampling = Sampling(), prefill_tokens: int = 512,
                 max_prompt_tokens: int | None = None, ignore_eos: bool = False, metrics=None, slo=None,
                 clock=time.time) -> None:
        self.m = model
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_new = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.eos = frozenset() if ignore_eos else model.eos
        self.sampling = sampling
        self.prefill_tokens = prefill_tokens
        self.max_prompt = min(max_prompt_tokens or model.context, model.context - max_new_tokens)
        gpu = model.providers[0] == "CUDAExecutionProvider"
        if gpu and max_prompt_tokens is None:  # device slots are preallocated: keep them to 1,024 positions
            self.max_prompt = min(self.max_prompt, GPU_SLOT_POSITIONS - max_new_tokens)
        if self.max_prompt < 1:
            raise UsageError(f"generate.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the "
                             f"model's context of {model.context} tokens", hint="lower generate.max_new_tokens")
        self.metrics = metrics
        self.slo = slo
        self.clock = clock
        self.broken: EngineError | None = None
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None
        self._waiting: list = []  # heap (deadline, order, seq)
        self._by_prompt: dict[str, _Seq] = {}
        self._order = itertools.count()
        self._prefixes: list[tuple[int, ...]] = []
        self._batch = model.new_batch(max_batch, self.max_prompt + max_new_tokens + 1)
        self._step_s = 0.0
        self.batches = 0  # decode steps
        self.coalesced = 0
        self.late = 0  # finished by their deadline
        self.tokens = 0
        self.generated = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def add_prefix(self, text: str) -> None:
        """A prompt prefix many prompts share (a template's system part): its KV is computed once."""
        ids = tuple(self.m.encode(text)) if text else ()
        # The last token may merge with the user's text: keep a prefix that tokenizes the same inside prompts.
        ids = ids[:-1] if len(ids) > 1 else ids
        if ids and ids not in self._prefixes:
            self._prefixes.append(ids)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, name="generator", daemon=True)
        self._thread.start()
        self.m.thread_ids.add(self._thread.native_id)  # the decode thread's CPU is the engine's

    @property
    def task(self) -> asyncio.Future | None:
        """Resolves only if the decode thread dies (for the owner's supervision)."""
        return self._done

    @property
    def call_seconds(self) -> float:
        """Running average of one decode step."""
        return self._step_s

    def waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch.rows)

    def submit_many(self, prompts: Sequence[str], deadlines: Sequence[float] | None = None) -> asyncio.Future:
        """Queue rendered prompts; one future resolves to their ``Answers`` (or raises ``EngineError``)."""
        from pipeline.batcher import Answers, NO_DEADLINE

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        group = Answers(len(prompts), fut)
        if self.broken is not None:
            fut.set_exception(self.broken)
            return fut
        if not prompts:
            fut.set_result(group)
            return fut
        now = self.clock()
        for i, p in enumerate(prompts):
            self._inbox.append((group, i, p, deadlines[i] if deadlines is not None else now + NO_DEADLINE, now))
        self._wake.set()
        return fut

    async def generate(self, prompts: Sequence[str], deadlines: Sequence[float] | None = None) -> list:
        """Answers for prompts (``Generation`` or ``EngineFailure`` each)."""
        return list((await self.submit_many(prompts, deadlines)).results)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the decode thread (after its current step); fail what has not finished."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, max(0.05, timeout_s))
        leftovers = [s for _, _, s in self._waiting] + [s for s in self._batch.rows]
        while self._inbox:
            g, _, _, _, _ = self._inbox.popleft()
            if not g.future.done():
                g.future.cancel()
        for s in leftovers:
            for g, _ in s.waiters:
                if not g.future.done():
                    g.future.cancel()
        self._waiting.clear()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- the decode thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while not self._closed:
                self._intake()
                if not self._waiting and not self._batch.rows:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._iteration()
        except BaseException as exc:  # noqa: BLE001 — a broken engine: fail everything, tell the owner
            err = exc if isinstance(exc, EngineError) else EngineError(
                f"the generator failed in a decode step ({type(exc).__name__}: {str(exc)[:300]})",
                hint="check the model artifact and the execution provider")
            self.broken = err
            seqs = [s for _, _, s in self._waiting] + list(self._batch.rows)
            self._waiting.clear()
            self._batch = DecodeBatch(self.m)  # empty: nothing runs any more
            self._post(self._fail_all, seqs, err)

    def _intake(self) -> None:
        from pipeline.batcher import EngineFailure

        if not self._inbox:
            return
        new: list[_Seq] = []
        failed: list[tuple[_Seq, EngineFailure]] = []
        while self._inbox:
            group, i, prompt, deadline, enq = self._inbox.popleft()
            s = self._by_prompt.get(prompt)
            if s is not None:
                s.waiters.append((group, i))
                self.coalesced += 1
                continue
            s = _Seq(prompt, deadline, next(self._order), enq)
            s.waiters.append((group, i))
            self._by_prompt[prompt] = s
            new.append(s)
        if not new:
            return
        try:
            encs = self.m.tokenizer.encode_batch([s.prompt for s in new], add_special_tokens=False)
        except BaseException as exc:  # noqa: BLE001 — also a tokenizer panic (pyo3's PanicException is a BaseException)
            if not is_input_failure(exc):
                raise
            encs = []
            for s in new:  # one text the tokenizer fails on must not fail the others
                try:
                    encs.append(self.m.tokenizer.encode(s.prompt, add_special_tokens=False))
                except BaseException as exc1:  # noqa: BLE001
                    if not is_input_failure(exc1):
                        raise
                    encs.append(exc1)
        for s, e in zip(new, encs):
            if isinstance(e, BaseException):
                failed.append((s, EngineFailure(f"tokenizer: {type(e).__name__}: {str(e)[:200]}")))
                continue
            s.ids = e.ids
            if len(s.ids) > self.max_prompt:
                failed.append((s, EngineFailure(
                    f"too long: the prompt is {len(s.ids)} tokens; this model takes at most {self.max_prompt} "
                    f"(context {self.m.context} minus max_new_tokens {self.max_new})")))
                continue
            if self.sampling.do_sample:  # seeded by the prompt's digest: the same draw in every process and restart
                s.rng = np.random.default_rng([self.sampling.seed, prompt_seed(s.prompt)])
            heapq.heappush(self._waiting, (s.deadline, s.order, s))
        if failed:
            for s, _ in failed:
                self._by_prompt.pop(s.prompt, None)
            self._post(self._resolve_many, [(s, f) for s, f in failed])

    def _iteration(self) -> None:
        from pipeline.batcher import EngineFailure

        finished: list[tuple[_Seq, object]] = []
        batch = self._batch
        # 1. Join: prefill waiting prompts (earliest deadline first) into free rows, within the KV budget as the
        #    batch lays it out (on CPU: rows × the longest row, so one long prompt cannot inflate every row).
        needs = [len(r.ids) + self.max_new for r in batch.rows]
        prefilled = 0
        while self._waiting and len(batch.rows) < self.max_batch:
            s = self._waiting[0][2]
            need = len(s.ids) + self.max_new
            if (needs and not batch.admits(needs, need, self.max_tokens)) or prefilled >= self.prefill_tokens:
                break
            heapq.heappop(self._waiting)
            s.admitted = self.clock()
            prefix = next((p for p in self._prefixes if len(s.ids) > len(p) and tuple(s.ids[: len(p)]) == p), ())
            try:
                first = batch.join(s, s.ids, prefix, greedy=not self.sampling.do_sample)
            except Exception as exc:  # noqa: BLE001 — this prompt's failure, not the engine's
                finished.append((s, EngineFailure(f"engine: prefill failed: {type(exc).__name__}: {str(exc)[:200]}")))
                continue
            prefilled += len(s.ids) - len(prefix)
            needs.append(need)
            s.out.append(self._pick(first[None, :], [s])[0] if self.sampling.do_sample else first)
            s.first_at = self.clock()
            if self._finished(s, s.first_at):
                finished.append((s, self._result(s)))
                batch.leave([batch.rows.index(s)])
                needs.pop()
        # 2. Rows whose deadline passed leave with what they have.
        now = self.clock()
        gone = []
        for j, s in enumerate(batch.rows):
            if now >= s.deadline:
                s.finish = "deadline"
                self.late += 1
                finished.append((s, self._result(s)))
                gone.append(j)
        batch.leave(gone)
        # 3. One decode step for every row.
        rows = batch.rows
        if rows:
            t0 = time.perf_counter()
            last = np.asarray([s.out[-1] for s in rows], dtype=np.int64)
            if self.sampling.do_sample:
                nxt = self._pick(batch.step(last), rows)
            else:
                nxt = batch.step(last, greedy=True).tolist()
            took = time.perf_counter() - t0
            self._step_s = took if not self.batches else 0.9 * self._step_s + 0.1 * took
            self.batches += 1
            if self.metrics is not None:
                self.metrics.gen_batch_rows.observe(len(rows))
                self.metrics.gen_occupancy.set(len(rows) / self.max_batch)
            now = self.clock()
            gone = []
            for j, (s, t) in enumerate(zip(rows, nxt)):
                s.out.append(t)
                if self._finished(s, now):
                    finished.append((s, self._result(s)))
                    gone.append(j)
            batch.leave(gone)
        if finished:
            for s, _ in finished:
                self._by_prompt.pop(s.prompt, None)
            self._post(self._resolve_many, finished)

    def _pick(self, logits: np.ndarray, seqs: Sequence[_Seq]) -> list[int]:
        if not self.sampling.do_sample:
            return logits.argmax(axis=1).tolist()
        out = []
        temp = max(1e-4, self.sampling.temperature)
        for row, s in zip(logits.astype(np.float64), seqs):
            z = row / temp
            p = np.exp(z - z.max())
            p /= p.sum()
            if self.sampling.top_p < 1.0:
                order = np.argsort(-p)
                cum = np.cumsum(p[order])
                cut = order[: int(np.searchsorted(cum, self.sampling.top_p)) + 1]
                q = np.zeros_like(p)
                q[cut] = p[cut]
                p = q / q.sum()
            out.append(int(s.rng.choice(len(p), p=p)))
        return out

    def _finished(self, s: _Seq, now: float) -> bool:
        if s.out[-1] in self.eos:
            s.finish = "stop"
            return True
        if self.stop:
            text = self.m.decode_text(s.out)
            hits = [text.find(x) for x in self.stop if x in text]
            if hits:
                s.stop_at = min(hits)
                s.finish = "stop"
                return True
        if len(s.out) >= self.max_new:
            s.finish = "length"
            return True
        if now >= s.deadline:
            s.finish = "deadline"
            self.late += 1
            return True
        return False

    def _result(self, s: _Seq) -> Generation:
        done = self.clock()
        text = self.m.decode_text(s.out)
        if s.stop_at is not None:
            text = text[: s.stop_at]
        n = len(s.out) - (1 if s.out and s.out[-1] in self.eos else 0)  # the end-of-sequence token is not text
        self.tokens += n
        self.generated += 1
        queue, ttft, decode = s.admitted - s.enqueued, s.first_at - s.enqueued, done - s.first_at
        if self.metrics is not None:
            self.metrics.gen_ttft.observe(ttft)
            if n > 1:
                self.metrics.gen_tpot.observe(decode / (n - 1))
            self.metrics.gen_tokens.inc(n)
            self.metrics.gen_finish.labels(s.finish).inc()
        return Generation(text.strip(), n, s.finish or "length", self.m.model_id, False,
                          {"queue": queue, "ttft": ttft, "decode": decode})

    # -- answers (on the event loop) ----------------------------------------------------------------
    def _post(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

    @staticmethod
    def _resolve_many(items) -> None:
        for s, result in items:
            wait = s.admitted - s.enqueued if s.admitted else 0.0
            for g, i in s.waiters:
                if g.future.done():
                    continue
                g.results[i] = result
                g.waits[i] = wait
                g.left -= 1
                if g.left == 0:
                    g.future.set_result(g)

    def _fail_all(self, seqs, err: BaseException) -> None:
        while self._inbox:
            g, _, _, _, _ = self._inbox.popleft()
            if not g.future.done():
                g.future.set_exception(err)
        for s in seqs:
            for g, _ in s.waiters:
                if not g.future.done():
                    g.future.set_exception(err)
        if self._done is not None and not self._done.done():
            self._done.set_exception(err)
