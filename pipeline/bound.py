"""Bucketed IOBinding runs (the GPU engine's path): a batch is padded up to one of a small set of (rows, width)
shapes, its inputs written into that shape's preallocated buffers, and the session run through an ``IOBinding``
bound once per shape, so no run allocates and, on CUDA, a run can replay a captured CUDA graph.

Why buckets: a CUDA graph replays fixed kernels on fixed addresses, so every shape it runs needs its own
buffers and its own graph (``gpu_graph_id``). The grid grows by about 1.5× per step (1, 2, 3, 4, 6, 8, 12, ...),
so a batch is padded by less than 1.5× in each direction, and a shape is only kept if some batch the batcher can
form (rows × longest ≤ its token budget) lands on it. ``plan`` is pure arithmetic and ``BoundRunner`` works on
CPU memory as well, which is how both are tested on a machine without a GPU.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import NamedTuple, Sequence

import numpy as np


def steps(limit: int, start: int = 1) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 × them) from ``start`` up to ``limit``, and
    ``limit`` itself last. ``start`` is rounded up to the grid."""
    out: list[int] = []
    p = 1
    while p <= limit:
        for v in (p, p + p // 2) if p >= 2 else (p,):
            if start <= v < limit:
                out.append(v)
        p *= 2
    out.append(limit)
    return sorted(set(out))


class Bucket(NamedTuple):
    rows: int
    width: int
    graph_id: int  # the CUDA graph this shape replays (1, 2, ...; 0 and -1 are ORT's)


class Plan:
    """The (rows, width) shapes batches are padded to. ``max_rows``: the batcher's ``max_batch``; ``max_tokens``:
    its token budget (rows × padded width); ``min_width``: the narrowest shape (8 on a GPU keeps tensor cores fed)."""

    def __init__(self, max_rows: int, max_length: int, max_tokens: int | None = None, min_width: int = 8) -> None:
        self.rows = steps(max(1, max_rows))
        self.widths = steps(max(1, max_length), start=min(max(1, min_width), max_length))
        self.budget = budget = max_tokens or max_rows * max_length
        self.buckets: dict[tuple[int, int], Bucket] = {}
        prev_r = 0
        for r in self.rows:
            prev_w = 0
            for w in self.widths:
                # Reachable: some batch of more than prev_r rows whose longest text needs more than prev_w tokens
                # fits the budget (a single text always does, whatever its length).
                if prev_r == 0 or (prev_r + 1) * (prev_w + 1) <= budget:
                    self.buckets[(r, w)] = Bucket(r, w, len(self.buckets) + 1)
                prev_w = w
            prev_r = r

    def width(self, n: int) -> int:
        """The padded width of a batch whose longest text needs ``n`` tokens."""
        return self.widths[min(bisect_left(self.widths, max(1, n)), len(self.widths) - 1)]

    def pick(self, rows: int, width: int) -> Bucket | None:
        """The smallest shape that holds ``rows`` × ``width``; None past the grid or the budget (run unbound)."""
        i, j = bisect_left(self.rows, rows), bisect_left(self.widths, width)
        if i == len(self.rows) or j == len(self.widths):
            return None
        return self.buckets.get((self.rows[i], self.widths[j]))

    def __len__(self) -> int:
        return len(self.buckets)


class _Slot:
    """One shape's buffers: host staging arrays, the device values they are copied into, the output, the binding."""

    def __init__(self, session, bucket: Bucket, names: Sequence[str], out_name: str, out_dtype, labels: int,
                 device: str, pad_id: int) -> None:
        import onnxruntime as ort

        r, w = bucket.rows, bucket.width
        self.bucket = bucket
        self.host = {k: np.zeros((r, w), dtype=np.int64) for k in names}
        self.host["input_ids"].fill(pad_id)
        self.on_cpu = device == "cpu"
        # On CPU an OrtValue made from a numpy array shares its memory: writing the staging array is the copy.
        self.values = {k: ort.OrtValue.ortvalue_from_numpy(a, device, 0) for k, a in self.host.items()}
        self.out = ort.OrtValue.ortvalue_from_shape_and_type((r, labels), out_dtype, device, 0)
        self.io = session.io_binding()
        for k, v in self.values.items():
            self.io.bind_ortvalue_input(k, v)
        self.io.bind_ortvalue_output(out_name, self.out)
        self.used = (0, 0)  # the rows and width the last batch wrote (what the next must clear)


class BoundRunner:
    """Runs one session through per-shape IOBindings (one runner per session replica, one call at a time).

    ``run`` takes the batch's flat token ids and per-row lengths and returns the logits of its rows. Padding rows
    get one attention position (an all-masked row is a softmax over nothing); their outputs are dropped."""

    def __init__(self, session, plan: Plan, names: Sequence[str], labels: int, pad_id: int, device: str = "cpu",
                 cuda_graph: bool = False) -> None:
        import onnxruntime as ort

        self.session, self.plan, self.names, self.labels = session, plan, tuple(names), labels
        self.pad_id, self.device, self.cuda_graph = pad_id, device, cuda_graph
        out = session.get_outputs()[0]
        self.out_name = out.name
        self.out_dtype = np.float16 if out.type == "tensor(float16)" else np.float32
        self.slots: dict[tuple[int, int], _Slot] = {}
        self._positions = np.arange(plan.widths[-1])
        self._options: dict[int, object] = {}
        self.call = (0.0, 0.0)  # the last run's ORT call alone: wall and CPU seconds (the engine's host time is the rest)
        self._ort = ort

    def _slot(self, bucket: Bucket) -> _Slot:
        key = (bucket.rows, bucket.width)
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = _Slot(self.session, bucket, self.names, self.out_name, self.out_dtype,
                                        self.labels, self.device, self.pad_id)
        return s

    def _run_options(self, bucket: Bucket):
        """The bucket's graph id (made once per bucket), or None without graphs."""
        if not self.cuda_graph:
            return None
        ro = self._options.get(bucket.graph_id)
        if ro is None:
            ro = self._options[bucket.graph_id] = self._ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(bucket.graph_id))
        return ro

    def run(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """Logits (rows × labels, float32) for a batch given as its concatenated ids and per-row lengths; None
        when no shape holds it (the caller runs it unbound)."""
        rows = len(lengths)
        longest = int(lengths.max()) if rows else 1
        bucket = self.plan.pick(rows, longest)
        if bucket is None:
            return None
        s = self._slot(bucket)
        ids, mask = s.host["input_ids"], s.host["attention_mask"]
        ur, uw = s.used
        # Clear what the previous batch wrote past this one's rows or lengths; the rest is already padding.
        if ur:
            ids[:ur, :uw] = self.pad_id
            mask[:ur, :uw] = 0
        width = bucket.width
        valid = self._positions[:width] < lengths[:, None]
        ids[:rows][valid] = flat
        mask[:rows][valid] = 1
        mask[rows:, 0] = 1  # padding rows: one visible position
        s.used = (rows, longest)
        if not s.on_cpu:
            for k in self.names:
                s.values[k].update_inplace(s.host[k])
        t0, c0 = time.perf_counter(), time.thread_time()
        self.session.run_with_iobinding(s.io, self._run_options(bucket))
        self.call = (time.perf_counter() - t0, time.thread_time() - c0)
        out = s.out.numpy()
        return out[:rows].astype(np.float32)  # a copy: the next run of this shape overwrites the output

    def warm(self, buckets: Sequence[Bucket] | None = None, runs: int = 2) -> int:
        """Allocate and run each shape (default: every one of the plan) ``runs`` times (ORT captures a CUDA graph on
        its second run of a graph id); returns how many."""
        todo = list(self.plan.buckets.values()) if buckets is None else list(buckets)
        for b in todo:
            lengths = np.full(b.rows, b.width, dtype=np.int64)
            flat = np.full(b.rows * b.width, self.pad_id, dtype=np.int64)
            for _ in range(runs):
                self.run(flat, lengths)
        return len(todo)
