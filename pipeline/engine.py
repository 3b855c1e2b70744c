"""``OnnxEngine``: artifact → tokens (once, at admission) → batches padded to their own longest → ONNX Runtime.

A text is tokenized once, by ``tokenize`` (the batcher calls it when the text is admitted, so its exact token
count is known for batch formation); ``infer`` takes those encodings, pads them to the batch's longest
(rounded up to ``PAD_MULTIPLE``) and runs the session. ``predict``/``predict_sync`` do both for callers
that start from text.
"""

from __future__ import annotations

import os
import threading
import time
from itertools import chain
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence

import numpy as np

from pipeline.bound import BoundRunner, Plan
from pipeline.errors import ModelError, NoTokens, UsageError
from pipeline.events import Prediction, Timings
from pipeline.manifest import ModelManifest, load_manifest
from pipeline.runtime import DaemonExecutor, available_providers, no_capture, task_ids, with_cuda_graphs

# Batch width rounding. CPU: none (a batch padded to its exact longest ran 13% faster than rounding to 8 on
# MiniLM INT8, and ORT's CPU kernels take any shape). GPU: multiples of 8 keep the set of shapes small.
PAD_MULTIPLE = {"cpu": 1, "gpu": 8}
DEFAULT_CALL_OVERHEAD_TOKENS = 16.0


class Engine(Protocol):
    """What the batcher, the serving task and the runner need from a classifier (``OnnxEngine``,
    ``CascadeEngine``). A generator (``pipeline/generation``) shares the descriptive half: ``task``,
    ``model_id``, ``variant``, ``providers``, ``threads``, ``sessions``, ``thread_ids``, ``close``."""

    task: str  # the artifact's task: "text-classification" (the serving task is chosen from it)
    model_id: str
    labels: tuple[str, ...]
    variant: str
    providers: list[str]
    threads: int
    sessions: int  # engine calls that may run at once
    thread_ids: set[int]  # the threads whose CPU is the engine's
    call_overhead_tokens: float  # one more call costs this many padded tokens' worth (the batcher's cut)

    def tokenize(self, texts: Sequence[str]) -> list[Tokens]: ...

    def width(self, n: int) -> int:
        """The padded width of a batch whose longest text has ``n`` tokens."""
        ...

    async def infer(self, batch: Sequence[Tokens]) -> list[Prediction | NoTokens]: ...

    def close(self) -> None: ...


class Tokens(NamedTuple):
    """One text's encoding: token ids (special tokens included, truncated) and whether any are content."""

    ids: list[int]
    n: int  # len(ids): the width this text needs
    empty: bool  # the tokenizer produced no content tokens (only [CLS]/[SEP]): the model cannot see it


@dataclass(frozen=True)
class Encoded:
    arrays: dict[str, np.ndarray]
    lengths: np.ndarray  # real token count per row (before padding)
    empty: np.ndarray  # rows with no content token


def choose(manifest: ModelManifest, variant: str | None, provider: str) -> tuple[str, list[str]]:
    """Pick (variant, providers). ``provider`` is auto|cpu|cuda|tensorrt."""
    have = available_providers()
    provider = provider.lower()
    if provider not in ("auto", "cpu", "cuda", "tensorrt"):
        raise UsageError(f"unknown provider '{provider}'", hint="use auto, cpu, cuda or tensorrt")
    gpu = provider in ("cuda", "tensorrt") or (provider == "auto" and "CUDAExecutionProvider" in have)
    if gpu and "CUDAExecutionProvider" not in have:
        raise ModelError(
            f"provider '{provider}' asked for, but this onnxruntime has only {have}",
            hint="install the gpu extra (onnxruntime-gpu) on a CUDA machine, or use --provider cpu",
        )
    if provider == "tensorrt" and "TensorrtExecutionProvider" in have:
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    elif gpu:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    if variant is None:
        order = ("fp16", "fp32") if gpu else ("int8", "fp32")
        # A variant the build could not validate (it could not run it there) is never picked automatically.
        variant = next((v for v in order if v in manifest.variants and manifest.variants[v].validated), None)
        if variant is None:
            unvalidated = [v for v in order if v in manifest.variants]
            raise ModelError(f"artifact {manifest.model_id} has no validated variant usable on {providers[0]}"
                             + (f" ({', '.join(unvalidated)} could not be validated where it was built)" if unvalidated else ""),
                             hint="pass --variant explicitly to run it anyway, or rebuild on a machine that can run it")
    return variant, providers


class OnnxEngine:
    """The real engine. Thread-safe for one caller at a time per executor (the batcher serialises calls)."""

    task = "text-classification"

    def __init__(
        self,
        artifact: str | Path,
        *,
        variant: str | None = None,
        provider: str = "auto",
        threads: int | None = None,
        max_length: int | None = None,
        warmup: bool = True,
        verify: bool = True,
        spin: bool = False,
        sessions: int | None = 1,
        bind: bool | None = None,
        cuda_graph: bool | None = None,
        max_rows: int = 64,
        max_tokens: int | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        root, manifest = load_manifest(artifact, verify=False)
        self.variant, self.providers = choose(manifest, variant, provider)
        v = manifest.variant(self.variant)
        if verify:  # verify only the files this engine loads
            root, manifest = load_manifest(root, verify=True, variants=(self.variant,))
        self.root = root
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.labels = tuple(manifest.labels)
        self.max_length = min(max_length or manifest.max_length, manifest.max_length)

        if self.providers[0] == "CPUExecutionProvider":
            # The engine's intra-op threads already use every core: the tokenizer's own thread pool would only
            # add hand-offs (a 64-text batch: 46 µs CPU per text in parallel vs 31 in one thread, measured
            # here). Off unless the user set it; the tokenizer reads the variable at each call.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = Tokenizer.from_file(str(root / manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            self.pad_id = self.tokenizer.token_to_id("<pad>") or 0
        self.specials = self.tokenizer.num_special_tokens_to_add(False)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ``sessions`` replicas of the session, each driven by its own executor thread, share ``threads``
        # (default: the cores) as intra-op threads. One call at a time per replica: the batcher runs up to
        # ``sessions`` calls at once. More threads than cores only adds contention with the event loop.
        gpu = self.providers[0] != "CPUExecutionProvider"
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.sessions = default_sessions(self.threads, gpu) if sessions is None else max(1, int(sessions))
        self.threads_per_session = max(1, self.threads // self.sessions)
        opts.intra_op_num_threads = self.threads_per_session
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ORT's pool threads spin after each op by default: on a small machine that burns the cores the event
        # loop, the Kafka clients and the broker need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.log_severity_level = 3
        if self.providers[0] != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from pip wheels (nvidia-*): onnxruntime-gpu finds them only once preloaded.
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 — system-wide CUDA libraries are found by the loader instead
                pass
        before = task_ids()
        # The GPU path: bucketed IOBinding runs (pipeline/bound.py), and on CUDA a captured graph per bucket.
        # On by default with CUDA; on CPU only when asked (the tests run it there; ORT's CPU kernels take any
        # shape, and padding to a bucket only adds work).
        self.bind = gpu if bind is None else bool(bind)
        cuda = self.providers[0] == "CUDAExecutionProvider"
        self.cuda_graph = bool(self.bind and cuda and (cuda_graph is None or cuda_graph))
        self.cuda_graph_error: str | None = None  # why the graphs were asked for and not used
        if cuda_graph and not (self.bind and cuda):
            self.cuda_graph_error = "CUDA graphs need the CUDA provider and bucketed IOBinding runs (bind)"
        self._opts = opts
        self.replicas = self._sessions(root / v.file)
        self.session = self.replicas[0]
        if self.providers[0] not in self.session.get_providers():  # onnxruntime falls back to CPU silently
            raise ModelError(f"{self.providers[0]} could not start (the session has only {self.session.get_providers()})",
                             where=str(root), hint="check the CUDA and cuDNN libraries onnxruntime-gpu needs "
                                                   "(pip install 'onnxruntime-gpu[cuda,cudnn]'), or use --provider cpu")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._positions = np.arange(self.max_length)  # pack's row mask: positions < each row's length
        self.host_stats = [[0, 0.0, 0.0] for _ in range(self.sessions)]  # per replica: texts, wall and CPU seconds outside ORT
        self._executors = [DaemonExecutor(f"onnx-{i}") for i in range(self.sessions)]
        self._executor = self._executors[0]
        self._idle = list(range(self.sessions - 1, -1, -1))  # replicas with no call running; replica 0 first
        # The threads this engine runs on (ORT's pools, the executors): their CPU time is the engine's.
        self.thread_ids = (task_ids() - before) | {e.native_id for e in self._executors}
        self.pad_multiple = PAD_MULTIPLE["cpu" if self.providers[0] == "CPUExecutionProvider" else "gpu"]
        self.plan = Plan(max_rows, self.max_length, max_tokens, min_width=max(8, self.pad_multiple)) \
            if self.bind else None
        self._runners()
        # What one more engine call costs, in padded tokens' worth of compute: the batcher's cut between
        # runs of different lengths. Measured by ``warmup``.
        self.call_overhead_tokens = DEFAULT_CALL_OVERHEAD_TOKENS
        if warmup:
            self.warmup()

    def _sessions(self, path: Path) -> list:
        """The session replicas; with CUDA graphs asked for, a session that cannot capture them (a node on the CPU
        provider, an old onnxruntime) is made again without, and ``cuda_graph_error`` says why."""
        import onnxruntime as ort

        def make(providers) -> list:
            try:
                return [ort.InferenceSession(str(path), sess_options=self._opts, providers=providers)
                        for _ in range(self.sessions)]
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ModelError(f"onnxruntime could not load {path.name}: {str(exc).splitlines()[0]}",
                                 where=str(path.parent), hint="rebuild the artifact or pick another --variant") from None

        if self.cuda_graph:
            try:
                return make(with_cuda_graphs(self.providers))
            except ModelError as exc:
                self.cuda_graph, self.cuda_graph_error = False, str(exc)
        return make(self.providers)

    def _runners(self) -> None:
        self._locks = [threading.Lock() for _ in self.replicas]
        device = "cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda"
        self.runners = [BoundRunner(s, self.plan, self.input_names, len(self.labels), self.pad_id, device,
                                    cuda_graph=self.cuda_graph) for s in self.replicas] if self.plan else None
        self._unbound = no_capture() if self.cuda_graph else None  # a plain run on a graph-capturing session

    def _drop_graphs(self, reason: str) -> None:
        """Capturing failed at warm-up: the same sessions without graphs, bucketed IOBinding kept."""
        self.cuda_graph, self.cuda_graph_error = False, reason
        before = task_ids()
        self.replicas = self._sessions(self.root / self.manifest.variant(self.variant).file)
        self.session = self.replicas[0]
        self.thread_ids |= task_ids() - before
        self._runners()

    def run_arrays(self, arrays: dict[str, np.ndarray], replica: int = 0) -> np.ndarray:
        """The session's first output for input arrays as given (no bucket): model tools, the warm-up's timing."""
        return self.replicas[replica].run(None, arrays, self._unbound)[0]

    # -- tokenization -------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[Tokens]:
        """Encode texts once (truncated to ``max_length``); the result travels with each text to ``infer``."""
        specials = self.specials
        out = []
        # encode_batch_fast: the ids without character offsets, which nothing here reads (30 µs CPU per text
        # of ~80 characters vs 38 for encode, measured here). Its thread pool is off on CPU (see __init__).
        encs = self.tokenizer.encode_batch_fast(texts if isinstance(texts, list) else list(texts))
        for e in encs:
            ids = e.ids
            out.append(Tokens(ids, len(ids), len(ids) <= specials))
        return out

    def width(self, n: int) -> int:
        """The padded width of a batch whose longest text has ``n`` tokens."""
        if self.plan is not None:
            return self.plan.width(n)
        m = self.pad_multiple
        return min(self.max_length, -(-max(1, n) // m) * m)

    def pack(self, batch: Sequence[Tokens]) -> Encoded:
        """The batch's input arrays, padded to its own longest text: the ids of all rows in one flat array, placed
        by a length mask (no per-row copies)."""
        rows = len(batch)
        lengths = np.fromiter((t.n for t in batch), dtype=np.int64, count=rows)
        width = self.width(int(lengths.max()) if rows else 1)
        valid = self._positions[:width] < lengths[:, None] if width <= len(self._positions) else \
            np.arange(width) < lengths[:, None]
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        ids[valid] = np.fromiter(chain.from_iterable(t.ids for t in batch), dtype=np.int64, count=int(lengths.sum()))
        arrays = {"input_ids": ids, "attention_mask": valid.astype(np.int64)}
        if "token_type_ids" in self.input_names:
            arrays["token_type_ids"] = np.zeros((rows, width), dtype=np.int64)
        return Encoded({k: arrays[k] for k in self.input_names}, lengths,
                       np.fromiter((t.empty for t in batch), dtype=bool, count=rows))

    def encode(self, texts: Sequence[str]) -> Encoded:
        return self.pack(self.tokenize(texts))

    # -- inference ----------------------------------------------------------------------------------
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.run_arrays(self.encode(texts).arrays).astype(np.float32)

    def infer_sync(self, batch: Sequence[Tokens], replica: int = 0, tokenize_s: float = 0.0) -> list[Prediction | NoTokens]:
        """One ``Prediction`` per encoding, or ``NoTokens`` for a text the model cannot see at all.

        The answers are computed for the whole batch as arrays (softmax, argmax, the chosen score, rounding); what
        is left per text is building its ``Prediction`` from those rows."""
        if not batch:
            return []
        if self.runners is None:  # ORT's own run is safe from several threads at once
            return self._infer(batch, replica, tokenize_s)
        with self._locks[replica]:  # a replica's bucket buffers serve one call at a time (a swap's canary runs
            return self._infer(batch, replica, tokenize_s)  # on another thread than the replica's executor)

    def _infer(self, batch: Sequence[Tokens], replica: int, tokenize_s: float) -> list[Prediction | NoTokens]:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = None
        if self.runners is not None:
            rows = len(batch)
            runner = self.runners[replica]
            lengths = np.fromiter((t.n for t in batch), dtype=np.int64, count=rows)
            flat = np.fromiter(chain.from_iterable(t.ids for t in batch), dtype=np.int64, count=int(lengths.sum()))
            empty = np.fromiter((t.empty for t in batch), dtype=bool, count=rows)
            out = runner.run(flat, lengths)
            if out is not None:
                t2, c2 = time.perf_counter(), time.thread_time()
                t1, c1 = t2 - runner.call[0], c2 - runner.call[1]  # the host time is everything but the ORT call
        if out is None:
            enc = self.pack(batch)
            empty = enc.empty
            t1, c1 = time.perf_counter(), time.thread_time()
            out = self.run_arrays(enc.arrays, replica)
            t2, c2 = time.perf_counter(), time.thread_time()
        answers = self.answers(out, empty, Timings(infer=t2 - t0, tokenize=tokenize_s))
        st = self.host_stats[replica]  # its executor writes it (a canary's call from another thread may race: stats only)
        st[0] += len(batch)
        st[1] += (t1 - t0) + (time.perf_counter() - t2)
        st[2] += (c1 - c0) + (time.thread_time() - c2)
        return answers

    def answers(self, logits: np.ndarray, empty: np.ndarray, timings: Timings) -> list[Prediction | NoTokens]:
        """The batch's answers from its logits, by array operations done in place (softmax, argmax, scores rounded to
        6 decimals), then one ``Prediction`` per row. Few numpy calls on purpose: right after an ONNX Runtime call
        the caches are cold and each call costs ~10-40 µs whatever its size (measured here, MiniLM on CPU)."""
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        best = z.argmax(axis=1).tolist()  # before rounding: two scores equal to 6 decimals keep the model's order
        np.round(z, 6, out=z)
        labels, model = self.labels, self.model_id
        answers: list = [Prediction(labels[b], p[b], dict(zip(labels, p)), model, False, timings)
                         for b, p in zip(best, z.tolist())]
        if empty.any():
            for i in np.flatnonzero(empty).tolist():
                answers[i] = NoTokens("empty: the tokenizer produced no tokens from this text")
        return answers

    def host_us_per_text(self, cpu: bool = False) -> float | None:
        """The engine's host time per text outside the ONNX Runtime call (packing the inputs, building the answers),
        in µs, over every call so far; None before the first. ``cpu``: the engine threads' CPU time for that work
        (what it costs), rather than the wall time (which also counts waiting for a core or the GIL)."""
        texts = sum(st[0] for st in self.host_stats)
        k = 2 if cpu else 1
        return round(sum(st[k] for st in self.host_stats) / texts * 1e6, 2) if texts else None

    def predict_sync(self, texts: Sequence[str]) -> list[Prediction | NoTokens]:
        """Tokenize and infer in one call (the caller's thread)."""
        if not texts:
            return []
        t0 = time.perf_counter()
        toks = self.tokenize(texts)
        return self.infer_sync(toks, tokenize_s=time.perf_counter() - t0)

    async def infer(self, batch: Sequence[Tokens]) -> list[Prediction | NoTokens]:
        """Run inference in the engine's own thread, never on the event loop."""
        idle = self._idle
        if not idle:  # more calls at once than replicas (batching.engine_concurrency set above model.sessions)
            return await self._executor.run(self.infer_sync, list(batch), 0)
        r = idle.pop()
        try:
            return await self._executors[r].run(self.infer_sync, list(batch), r)
        finally:
            idle.append(r)

    async def predict(self, texts: Sequence[str]) -> list[Prediction | NoTokens]:
        """Tokenize and infer in the engine's own thread."""
        return await self._executor.run(self.predict_sync, list(texts))

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> None:
        """Run a spread of shapes once (allocation, kernel choice), then measure the cost of one more call.

        ``call_overhead_tokens`` = (fixed cost of a call) / (cost of one padded token), from a small and a
        larger shape timed here, clamped to [1, 512].
        """
        if self.runners is not None:
            # Every bucket of the plan once per replica, twice with CUDA graphs (ORT captures on its second run of a
            # graph id): no batch in service pays for an allocation, and no capture ever runs beside a call in service.
            every = list(self.plan.buckets.values())
            try:
                for runner in self.runners:
                    runner.warm(every, runs=2 if self.cuda_graph else 1)
            except Exception as exc:  # noqa: BLE001 — onnxruntime's own error types; capturing is an optimisation
                if not self.cuda_graph:
                    raise
                self._drop_graphs(f"capturing a CUDA graph failed: {str(exc).splitlines()[0]}")
                for runner in self.runners:
                    runner.warm(every, runs=1)
        else:
            widths = sorted({self.width(w) for w in (8, 16, 32, 64, self.max_length)})
            for r in range(len(self.replicas)):
                for width in widths:
                    for bs in batch_sizes:
                        self.run_arrays(self._dummy(bs, width), r)
        small, large = (1, self.width(8)), (16, self.width(32))
        t = {}
        for shape in (small, large):
            rows, width = shape
            lengths = np.full(rows, width, dtype=np.int64)
            flat = np.full(rows * width, self.pad_id, dtype=np.int64)
            arrays = self._dummy(*shape)
            best = float("inf")
            for _ in range(6):
                t0 = time.perf_counter()
                if self.runners is None or self.runners[0].run(flat, lengths) is None:
                    self.run_arrays(arrays)
                best = min(best, time.perf_counter() - t0)
            t[shape] = best
        tokens = {s: s[0] * s[1] for s in t}
        per_token = (t[large] - t[small]) / max(1, tokens[large] - tokens[small])
        if per_token > 0:
            fixed = max(0.0, t[small] - tokens[small] * per_token)
            self.call_overhead_tokens = min(512.0, max(1.0, fixed / per_token))

    def _dummy(self, rows: int, width: int) -> dict[str, np.ndarray]:
        arrays = {
            "input_ids": np.full((rows, width), self.pad_id, dtype=np.int64),
            "attention_mask": np.ones((rows, width), dtype=np.int64),
            "token_type_ids": np.zeros((rows, width), dtype=np.int64),
        }
        return {k: arrays[k] for k in self.input_names}

    def close(self) -> None:
        for ex in self._executors:
            ex.shutdown(wait=False, cancel_futures=True)


def default_sessions(threads: int, gpu: bool) -> int:
    """Session replicas when ``model.sessions`` is not set: 1 on a GPU; on CPU 2 when there are 2 threads or more.

    Measured on the 2-core machine, length-sorted batches: two 1-thread sessions in parallel vs one 2-thread
    session, MiniLM-L6 INT8 1.18× at batch 8, 1.11× at 16, 1.01× at 32, 0.94× at 64; the tiny test model
    1.32-2.03×; and at batch 1 a 1-thread call is faster than a 2-thread one (2.2 vs 2.9 ms for MiniLM):
    ORT's intra-op threads synchronise after every operator, which small matrices do not repay.
    """
    return 1 if gpu or threads < 2 else 2


