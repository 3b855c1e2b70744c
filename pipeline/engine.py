"""``OnnxEngine``: artifact → tokenized, bucket-padded batches → ONNX Runtime → ``Prediction``s."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from pipeline.errors import ModelError, UsageError
from pipeline.events import Prediction
from pipeline.model.manifest import ModelManifest, load_manifest

BUCKETS = (8, 16, 32, 64, 128, 256, 512)


class Engine(Protocol):
    """What the batcher and worker need from a model."""

    model_id: str
    labels: tuple[str, ...]

    def token_count(self, text: str) -> int: ...

    async def predict(self, texts: Sequence[str]) -> list[Prediction | NoTokens]: ...


@dataclass(frozen=True)
class Encoded:
    arrays: dict[str, np.ndarray]
    lengths: np.ndarray  # real token count per row (before padding)
    content: np.ndarray  # tokens per row that are not special tokens ([CLS], [SEP], …)


class NoTokens(Exception):
    """A text from which the tokenizer produced no content tokens (e.g. only zero-width characters)."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


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
        variant = next((v for v in order if v in manifest.variants), None)
        if variant is None:
            raise ModelError(f"artifact {manifest.model_id} has no variant usable on {providers[0]}")
    return variant, providers


class OnnxEngine:
    """The real engine. Thread-safe for one caller at a time per executor (the batcher serialises calls)."""

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
        self.buckets = tuple(b for b in BUCKETS if b < self.max_length) + (self.max_length,)

        self.tokenizer = Tokenizer.from_file(str(root / manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            self.pad_id = self.tokenizer.token_to_id("<pad>") or 0

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One session, driven by one executor thread: intra-op threads do the parallel work. More threads
        # than cores only adds contention with the event loop and the tokenizer.
        self.threads = threads or max(1, os.cpu_count() or 1)
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ORT's pool threads spin after each op by default: on a small machine that burns the cores the event
        # loop, the Kafka clients and the broker need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(root / v.file), sess_options=opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"onnxruntime could not load {v.file}: {str(exc).splitlines()[0]}",
                             where=str(root), hint="rebuild the artifact or pick another --variant") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._executor = DaemonExecutor("onnx")
        if warmup:
            self.warmup()

    # -- tokenization -------------------------------------------------------------------------------
    def token_count(self, text: str) -> int:
        return min(len(self.tokenizer.encode(text).ids), self.max_length)

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        return self.max_length

    def encode(self, texts: Sequence[str]) -> Encoded:
        encs = self.tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        content = lengths - np.fromiter((sum(e.special_tokens_mask) for e in encs), dtype=np.int64, count=len(encs))
        width = self.bucket(int(lengths.max()) if len(encs) else 1)
        ids = np.full((len(encs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
            types[i, :n] = e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return Encoded({k: arrays[k] for k in self.input_names}, lengths, content)

    # -- inference ----------------------------------------------------------------------------------
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        enc = self.encode(texts)
        return self.session.run(None, enc.arrays)[0].astype(np.float32)

    def predict_sync(self, texts: Sequence[str]) -> list[Prediction | NoTokens]:
        """One ``Prediction`` per text, or ``NoTokens`` for a text the model cannot see at all."""
        t0 = time.perf_counter()
        enc = self.encode(texts) if texts else None
        t1 = time.perf_counter()
        if enc is None:
            return []
        out = self.session.run(None, enc.arrays)[0].astype(np.float32)
        t2 = time.perf_counter()
        probs = softmax(out)
        best = probs.argmax(axis=1)
        timings = {"tokenize": t1 - t0, "infer": t2 - t1}
        labels = self.labels
        return [
            Prediction(
                label=labels[int(b)],
                score=float(p[b]),
                scores={labels[j]: float(p[j]) for j in range(len(labels))},
                model=self.model_id,
                timings=timings,
            ) if n else NoTokens("empty: the tokenizer produced no tokens from this text")
            for p, b, n in zip(probs, best, enc.content)
        ]

    async def predict(self, texts: Sequence[str]) -> list[Prediction | NoTokens]:
        """Run tokenization + inference in the engine's own thread, never on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.predict_sync, list(texts))

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> None:
        """Run every (bucket, batch) shape once so the first real batch does not pay for allocation."""
        for width in self.buckets:
            for bs in batch_sizes:
                arrays = {
                    "input_ids": np.full((bs, width), self.pad_id, dtype=np.int64),
                    "attention_mask": np.ones((bs, width), dtype=np.int64),
                    "token_type_ids": np.zeros((bs, width), dtype=np.int64),
                }
                self.session.run(None, {k: arrays[k] for k in self.input_names})

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class DaemonExecutor(concurrent.futures.Executor):
    """One daemon thread running calls in order.

    Unlike ``ThreadPoolExecutor`` (whose threads the interpreter joins at exit), a call that never returns
    (a hung native kernel) cannot keep the process alive after the worker has stopped on its own timeout.
    """

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("executor is shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((fut, fn, args, kwargs))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 — handed to the caller through the future
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._q.put(None)
        if wait:
            self._thread.join()


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
