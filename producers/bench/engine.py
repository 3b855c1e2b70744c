"""Engine-level throughput without Kafka: the ORT ceiling and our engine as the worker drives it.

``streamlabel bench`` uses both before its ladders; ``streamlabel bench --engine-only`` (or
``python -m producers.bench.engine ARTIFACT``) runs only these, on any provider: a GPU machine needs no
broker to say what the model does there. Nothing here imports a Kafka client.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Sequence

import orjson

from producers.synthetic import Generator


def bench_texts(n: int = 2048, seed: int = 1) -> list[str]:
    """The bench's texts: the synthetic ``mixed`` profile (support messages, news, chat)."""
    return [ev.text for _, ev in zip(range(n), Generator("mixed", seed=seed))]


def engine_throughput(artifact: str, texts: Sequence[str], *, variant: str | None, batch: int, seconds: float = 5.0,
                      provider: str = "cpu", cascade_to: str | None = None, threshold: float = 0.9,
                      sessions: int | None = None, stats: dict | None = None, bind: bool | None = None,
                      cuda_graph: bool | None = None) -> float:
    """Our engine as the worker drives it (no Kafka): the texts are admitted in arrival order, in poll-sized
    groups (``MicroBatcher.submit_many``: tokenized once at admission), the batcher forms its runs of similar
    length, the engine pads each to its own longest and runs it on its thread. A backlog, so every engine call
    is as full as the batcher makes it. Same texts, warm-up and session options as ``ceiling_throughput``.
    ``stats``: filled with ``host_us_per_text``, the engine's time per text outside the ONNX Runtime call, and
    ``host_cpu_us_per_text``, the CPU time of that work (the wall time also counts waiting for a core or the GIL)."""
    from pipeline.batcher import MicroBatcher
    from pipeline.engine import OnnxEngine

    texts = list(dict.fromkeys(texts))  # no identical texts in flight: each text costs a real inference
    budget = max(8192, batch * 128)  # the batcher's token budget below; a bucketed engine plans its shapes from it
    eng = OnnxEngine(artifact, variant=variant, provider=provider, sessions=(sessions or 1) if cascade_to else sessions,
                     bind=bind, cuda_graph=cuda_graph, max_rows=batch, max_tokens=budget)
    if cascade_to is not None:  # ``artifact`` first, ``cascade_to`` for the texts it is unsure of (as load_cascade)
        from pipeline.cascade import CascadeEngine

        eng = CascadeEngine(eng, OnnxEngine(cascade_to, variant=variant, provider=provider, sessions=sessions or 1),
                            threshold)
        eng.second_batch = batch

    async def go() -> float:
        b = MicroBatcher(eng, max_batch=batch, max_tokens=budget, concurrency=eng.sessions)
        b.start()
        try:
            await b.submit_many(texts[:batch])
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                await asyncio.gather(*(b.submit_many(texts[i:i + 256]) for i in range(0, len(texts), 256)))
                n += len(texts)
            return n / (time.perf_counter() - t0)
        finally:
            await b.close()

    try:
        rate = asyncio.run(go())
        if stats is not None and hasattr(eng, "host_us_per_text"):  # a cascade: two engines, no one figure
            stats["host_us_per_text"] = eng.host_us_per_text()
            stats["host_cpu_us_per_text"] = eng.host_us_per_text(cpu=True)
            stats.update(bound=eng.plan is not None, buckets=len(eng.plan) if eng.plan else None,
                         cuda_graph=eng.cuda_graph, cuda_graph_error=eng.cuda_graph_error, sessions=eng.sessions)
        return rate
    finally:
        eng.close()


class _NoopEngine:
    """An engine that costs nothing: encodings made up front (no tokenizer) and every answer at once (no thread),
    so a loop through the batcher measures the batcher's own host cost."""

    task = "text-classification"
    model_id = "noop@1"
    labels = ("a", "b")
    variant = "none"
    providers = ["none"]
    threads = sessions = 1
    thread_ids: set = set()
    call_overhead_tokens = 16.0

    def __init__(self, texts: Sequence[str]) -> None:
        from pipeline.engine import Tokens
        from pipeline.events import Prediction, Timings

        self._toks = {t: Tokens([1] * (8 + len(t) % 56), 8 + len(t) % 56, False) for t in texts}
        self._answer = Prediction("a", 1.0, {"a": 1.0, "b": 0.0}, self.model_id, False, Timings(0.0, 0.0))

    def tokenize(self, texts):
        return [self._toks[t] for t in texts]

    def width(self, n: int) -> int:
        return n

    async def infer(self, batch):
        return [self._answer] * len(batch)

    def close(self) -> None:
        pass


def batcher_throughput(texts: Sequence[str], *, batch: int, seconds: float = 3.0, stats: dict | None = None) -> float:
    """The batcher alone (``MicroBatcher`` in front of an engine that costs nothing), driven as
    ``engine_throughput`` drives it: texts/s, and in ``stats`` its CPU per text (``cpu_us_per_text``): the ceiling
    its per-text bookkeeping puts on one event loop, whatever the engine."""
    from pipeline.batcher import MicroBatcher

    texts = list(dict.fromkeys(texts))

    async def go() -> float:
        b = MicroBatcher(_NoopEngine(texts), max_batch=batch, max_tokens=max(8192, batch * 128))
        b.start()
        try:
            await b.submit_many(texts[:batch])
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                await asyncio.gather(*(b.submit_many(texts[i:i + 256]) for i in range(0, len(texts), 256)))
                n += len(texts)
            if stats is not None:
                stats["cpu_us_per_text"] = round((time.process_time() - c0) / n * 1e6, 2)
            return n / (time.perf_counter() - t0)
        finally:
            await b.close()

    return asyncio.run(go())


def ceiling_throughput(artifact: str, texts: Sequence[str], *, variant: str | None, batch: int,
                       seconds: float = 5.0, provider: str = "cpu", io_binding: bool = False,
                       sessions: int | None = None, stats: dict | None = None) -> float:
    """The ORT ceiling: our engine's sessions and tokenizer, no streamlabel batching code, ideal grouping.

    The texts are sorted by token count (once, untimed) and cut into batches of ``batch``, each padded only
    to its own longest text; the timed loop is ``encode_batch`` (padding done by the tokenizer) +
    ``session.run``, the batches in a fixed shuffled order so any prefix of the loop is a fair sample.
    Same artifact file, session options, session replicas (one plain loop per replica, in its own thread)
    and warm-up as ``engine_throughput``. ``sessions=1``: one session with every thread, ORT's usual set-up.
    ``io_binding``: inputs and outputs through an ``IOBinding`` (inputs copied to the device once, logits
    copied back once), the way a GPU caller avoids ORT's own per-run staging. ``stats``: filled with
    ``cpu_us_per_text``, this process's CPU time during the timed loop per text (what a text costs the ceiling).
    """
    import threading

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from pipeline.engine import OnnxEngine

    texts = list(dict.fromkeys(texts))
    eng = OnnxEngine(artifact, variant=variant, provider=provider, sessions=sessions, bind=False, cuda_graph=False)
    try:
        tok = Tokenizer.from_str(eng.tokenizer.to_str())  # a copy: the engine's own keeps no padding
        tok.enable_padding(pad_id=eng.pad_id, pad_token=tok.id_to_token(eng.pad_id) or "[PAD]")
        ordered = sorted(texts, key=lambda t: len(eng.tokenizer.encode(t).ids))
        chunks = [ordered[i:i + batch] for i in range(0, len(ordered) - batch + 1, batch)] or [ordered]
        random.Random(0).shuffle(chunks)
        names = eng.input_names
        out_name = eng.session.get_outputs()[0].name
        device = "cuda" if eng.providers[0] != "CPUExecutionProvider" else "cpu"

        def arrays(chunk: list[str]) -> dict:
            encs = tok.encode_batch(chunk)
            a = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
            return {k: a[k] for k in names}

        def run(chunk: list[str], session) -> int:
            feeds = arrays(chunk)
            if io_binding:
                bind = session.io_binding()
                held = [ort.OrtValue.ortvalue_from_numpy(v, device, 0) for v in feeds.values()]
                for k, v in zip(feeds, held):
                    bind.bind_ortvalue_input(k, v)
                bind.bind_output(out_name, device)
                session.run_with_iobinding(bind)
                return len(bind.copy_outputs_to_cpu()[0])
            return len(session.run(None, feeds)[0])

        replicas = eng.replicas
        for session in replicas:
            run(chunks[0], session)
        done = [0] * len(replicas)
        t0, c0 = time.perf_counter(), time.process_time()

        def loop(k: int) -> None:  # replica k takes every len(replicas)-th batch
            n, i = 0, k
            while time.perf_counter() - t0 < seconds:
                n += run(chunks[i % len(chunks)], replicas[k])
                i += len(replicas)
            done[k] = n

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if stats is not None and sum(done):
            stats["cpu_us_per_text"] = round((time.process_time() - c0) / sum(done) * 1e6, 1)
        return sum(done) / (time.perf_counter() - t0)
    finally:
        eng.close()


def measure(artifact: str, *, variant: str | None, provider: str, batches: Sequence[int], seconds: float,
            io_binding: bool | None = None, say=None) -> dict:
    """Ceiling and engine at each batch size; ``io_binding`` None: also the IO-bound ceiling on a GPU."""
    from pipeline.engine import choose
    from pipeline.runtime import available_providers
    from pipeline.manifest import load_manifest

    texts = bench_texts()
    variant, providers = choose(load_manifest(artifact, verify=False)[1], variant, provider)
    gpu = providers[0] != "CPUExecutionProvider"
    rows = []
    for b in batches:
        row: dict = {"batch": b}
        row["ceiling_msgs_per_s"] = round(ceiling_throughput(artifact, texts, variant=variant, batch=b,
                                                             seconds=seconds, provider=provider), 1)
        if io_binding or (io_binding is None and gpu):
            row["ceiling_iobinding_msgs_per_s"] = round(ceiling_throughput(
                artifact, texts, variant=variant, batch=b, seconds=seconds, provider=provider, io_binding=True), 1)
        stats: dict = {}
        row["engine_msgs_per_s"] = round(engine_throughput(artifact, texts, variant=variant, batch=b,
                                                           seconds=seconds, provider=provider, stats=stats), 1)
        row["engine_host_us_per_text"] = stats.get("host_us_per_text")
        row["engine_host_cpu_us_per_text"] = stats.get("host_cpu_us_per_text")
        if gpu:  # the GPU path: bucketed IOBinding calls, a CUDA graph per bucket, or why not
            row.update(engine_bound=stats.get("bound"), engine_buckets=stats.get("buckets"),
                       engine_cuda_graph=stats.get("cuda_graph"), engine_cuda_graph_error=stats.get("cuda_graph_error"))
        row["engine_vs_ceiling"] = round(row["engine_msgs_per_s"] / row["ceiling_msgs_per_s"], 3)
        bstats: dict = {}
        row["batcher_only_msgs_per_s"] = round(batcher_throughput(texts, batch=b, seconds=min(seconds, 3.0),
                                                                  stats=bstats), 1)
        row["batcher_cpu_us_per_text"] = bstats.get("cpu_us_per_text")
        rows.append(row)
        if say is not None:
            say(f"batch {b}: ceiling {row['ceiling_msgs_per_s']:.0f}/s"
                + (f" (IO binding {row['ceiling_iobinding_msgs_per_s']:.0f}/s)" if "ceiling_iobinding_msgs_per_s" in row else "")
                + f", engine {row['engine_msgs_per_s']:.0f}/s, engine/ceiling {row['engine_vs_ceiling']:.2f}, "
                  f"host time outside ORT {row['engine_host_us_per_text']} µs per text "
                  f"({row['engine_host_cpu_us_per_text']} µs of CPU); the batcher alone "
                  f"{row['batcher_only_msgs_per_s']:.0f}/s ({row['batcher_cpu_us_per_text']} µs of CPU per text)")
    return {"artifact": artifact, "variant": variant, "providers": providers, "available": available_providers(),
            "seconds_per_figure": seconds, "rows": rows, **_gpu_name(gpu)}


def _gpu_name(gpu: bool) -> dict:
    if not gpu:
        return {}
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return {"gpu": out or None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m producers.bench.engine", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--variant", default=None)
    p.add_argument("--provider", default="auto")
    p.add_argument("--batches", default="64", help="comma-separated batch sizes")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args(argv)
    report = measure(a.artifact, variant=a.variant, provider=a.provider,
                     batches=[int(x) for x in a.batches.split(",")], seconds=a.seconds,
                     say=lambda m: print(m, file=sys.stderr, flush=True))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
