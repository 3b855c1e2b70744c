"""The decode batch: the running rows' KV cache, in host memory (CPU) or in fixed device slots (CUDA)."""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipeline.bound import steps

if TYPE_CHECKING:
    from pipeline.generation.model import GenerativeModel

GPU_SLOT_POSITIONS = 1024  # positions per decode slot on a GPU unless generate.max_prompt_tokens says otherwise


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
        self._pending_rows = 0  # reserve() before the first row

    def _shape(self) -> tuple[int, int]:
        if not self.buf:
            return 0, 0
        a = next(iter(self.buf.values()))
        return a.shape[0], a.shape[2]

    def _ensure(self, rows: int, length: int) -> None:
        have_rows, have_len = self._shape()
        if rows <= have_rows and length <= have_len:
            return
        # Rows grow by half again at least (a burst joining one by one copied every row's KV at each join:
        # 64 joins of SmolLM2 moved about 12 GB), positions by GROW.
        grown = max(rows, -(-have_rows * 3 // 2 // 8) * 8, self._pending_rows) if rows > have_rows else have_rows
        self._pending_rows = 0
        self._resize(grown, max(have_len, -(-length // self.GROW) * self.GROW))

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

    batched = False  # join_many: one prefill call for all prompts (True) or one per prompt, reusing the prefix

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows before they join (a burst: the scheduler knows how many wait), so the buffers
        are not copied over again each time a few more join."""
        if rows > self._shape()[0] and self.buf:
            self._resize(-(-rows // 8) * 8, self._shape()[1])
        elif not self.buf:
            self._pending_rows = rows


    def join(self, handle, ids: Sequence[int], prefix: tuple[int, ...] = (), greedy: bool = False):
        """Prefill a prompt (reusing ``prefix``'s KV) into a new row; returns its last position's logits
        (``greedy``: the argmax token id)."""
        return self.join_many([(handle, ids)], prefix, greedy)[0]

    def join_many(self, items: Sequence[tuple[object, Sequence[int]]], prefix: tuple[int, ...] = (),
                  greedy: bool = False) -> list:
        """Prefill prompts ``(handle, ids)`` into new rows, in one buffer update; each one's last logits (or
        argmax id with ``greedy``). On CPU prefill is compute-bound, so by default each prompt is prefilled
        alone over its template prefix's KV (SmolLM2, 64 prompts of ~50 tokens sharing 27: 2.1 s against
        4.8 s for one padded call that recomputes the prefix); ``batched`` makes it one call."""
        if not items:
            return []
        if self.batched:
            last, kv = self.m.prefill_many([ids for _, ids in items])
            new = [(h, {n: a[j:j + 1] for n, a in kv.items()}, len(ids)) for j, (h, ids) in enumerate(items)]
        else:
            done = [self.m.prefill(ids, prefix) for _, ids in items]
            last = [d[0] for d in done]
            new = [(h, d[1], len(ids)) for (h, ids), d in zip(items, done)]
        self.rebuild(range(len(self.rows)), new)
        return [int(x.argmax()) if greedy else x for x in last]

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
        m.session.run_with_iobinding(io, m.plain_run)
        self.lens[:n] += 1
        out = io.get_outputs()[0].numpy()[:, -1]  # no KV leaves ONNX Runtime
        return out if ids_out or not greedy else out.argmax(axis=1)


class DeviceDecodeBatch:
    """The decode batch on a GPU: the KV stays in device memory, in ``rows`` fixed slots of ``length`` positions.

    Each layer's buffer is bound as both past input and present output (I/O binding by device pointer), so
    no KV crosses PCIe: a joining prompt is prefilled straight into its slot (its rows of the buffer), a
    step moves only token ids and a mask in and logits out. Rows never move: a step runs the first ``k`` slots,
    ``k`` the smallest row bucket (1, 2, 3, 4, 6, 8, 12, ...) past the highest busy slot (joining prompts take
    the lowest free slots), and a free slot among them runs a dummy token with length 0 (on a GPU a decode
    step costs about the same for a few rows more, it is bound by reading the weights). Each bucket's step
    has fixed shapes (the mask spans the whole slot) and preallocated inputs and outputs, so on CUDA it is a
    captured graph (``capture``). No shared-prefix reuse here (prefill is cheap on a GPU).
    """

    batched = True  # join_many prefills a run of free slots in one call

    def __init__(self, model: GenerativeModel, rows: int, length: int, device: str = "cuda", capture: bool = False,
                 fixed: bool = False) -> None:
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
        self.grid = steps(rows)  # row buckets of the decode step (1, 2, 3, 4, 6, 8, 12, ... rows)
        self._steps: dict[int, _Step] = {}
        self._positions = np.arange(length)
        # Graphs for a long-lived batch only (the scheduler's): ONNX Runtime keeps a session's captured graphs for
        # its lifetime, so a batch made for one call (the gate's ``greedy``) runs plain steps.
        self.graphs = bool(capture and model.cuda_graph and device != "cpu")
        # The fixed-shape step (row buckets, the mask spanning the whole slot) is what a graph needs; without graphs
        # the step is as before, the mask as wide as the longest row (``fixed`` runs the graph's path anyway: tests).
        self.fixed = self.graphs or fixed
        if self.graphs:
            self.capture()

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
        return self.join_many([(handle, ids)], prefix, greedy)[0]

    def reserve(self, rows: int) -> None:
        """Slots are preallocated."""

    def runs(self, k: int) -> list[tuple[int, int]]:
        """Where ``k`` joining prompts go: (first slot, count) runs of consecutive free slots, in slot order,
        ``k`` slots in all. A run is one prefill call whose KV lands straight in its slots."""
        out: list[tuple[int, int]] = []
        start = None
        for i, h in enumerate([*self.slots, 0]):  # a sentinel closes the last run
            if h is None and start is None:
                start = i
            elif h is not None and start is not None:
                take = min(i - start, k - sum(c for _, c in out))
                if take:
                    out.append((start, take))
                start = None
        if sum(c for _, c in out) < k:
            raise ValueError(f"{k} prompts to join, {sum(c for _, c in out)} free slots")
        return out

    def join_many(self, items: Sequence[tuple[object, Sequence[int]]], prefix: tuple[int, ...] = (),
                  greedy: bool = False) -> list:
        """Prefill prompts into free slots: one call per run of consecutive free slots (right-padded; each row's
        length from its mask), the KV written in place. No prefix reuse (on a GPU the batch is the saving)."""
        for _, ids in items:
            if len(ids) + 1 > self.length:
                raise ValueError(f"prompt of {len(ids)} tokens does not fit a slot of {self.length}")
        out: list = []
        at = 0
        for first, count in self.runs(len(items)):
            part = items[at:at + count]
            at += count
            lens = np.fromiter((len(ids) for _, ids in part), dtype=np.int64, count=count)
            width = int(lens.max())
            valid = np.arange(width)[None, :] < lens[:, None]
            toks = np.zeros((count, width), dtype=np.int64)
            toks[valid] = np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in part])
            io = self.m.session.io_binding()
            io.bind_cpu_input("input_ids", toks)
            io.bind_cpu_input("attention_mask", valid.astype(np.int64))
            ids_out = self._outputs(io, greedy)
            self._bind(io, first, count)
            self.m.session.run_with_iobinding(io, self.m.plain_run)
            for j, (h, _) in enumerate(part):
                self.slots[first + j] = h
            self.lens[first:first + count] = lens
            res = io.get_outputs()[0].numpy()
            res = res[:, -1] if self.m.last_only else res[np.arange(count), lens - 1]
            out += [int(r) for r in res] if ids_out else [int(r.argmax()) for r in res] if greedy else list(res)
        return out

    def leave(self, indices: Sequence[int]) -> None:
        active = [i for i, h in enumerate(self.slots) if h is not None]
        for j in indices:
            self.slots[active[j]] = None
            self.lens[active[j]] = 0

    def step(self, tokens: np.ndarray, greedy: bool = False) -> np.ndarray:
        """One decode step of the busy slots. With ``fixed`` (CUDA graphs): on the first ``k`` slots, ``k`` the
        smallest row bucket past the highest busy one, with shapes fixed per bucket (the mask spans the whole slot),
        so on CUDA it replays a graph. Otherwise every slot, the mask as wide as the longest row."""
        active = [i for i, h in enumerate(self.slots) if h is not None]
        if not self.fixed:
            return self._step_plain(active, tokens, greedy)
        k = self.grid[bisect_left(self.grid, active[-1] + 1)]
        s = self._step_of(k)
        s.toks[:, 0] = 0
        s.toks[active, 0] = tokens
        np.less_equal(self._positions, self.lens[:k, None], out=s.visible)
        s.mask[:] = s.visible
        s.feed()
        self.m.session.run_with_iobinding(s.io, s.options)
        self.lens[active] += 1
        ids_out = greedy and self.m.has_next
        out = (s.next if ids_out else s.logits).numpy()[active, -1]
        return out if ids_out or not greedy else out.argmax(axis=1)

    def _step_plain(self, active: list[int], tokens: np.ndarray, greedy: bool) -> np.ndarray:
        toks = np.zeros((len(self.slots), 1), dtype=np.int64)
        toks[active, 0] = tokens
        width = int(self.lens.max()) + 1
        io = self.m.session.io_binding()
        io.bind_cpu_input("input_ids", toks)
        io.bind_cpu_input("attention_mask", (np.arange(width)[None, :] <= self.lens[:, None]).astype(np.int64))
        ids_out = self._outputs(io, greedy)
        self._bind(io, 0, len(self.slots))
        self.m.session.run_with_iobinding(io, self.m.plain_run)
        self.lens[active] += 1
        out = io.get_outputs()[0].numpy()[active, -1]
        return out if ids_out or not greedy else out.argmax(axis=1)

    def _step_of(self, k: int) -> "_Step":
        s = self._steps.get(k)
        if s is None:
            s = self._steps[k] = _Step(self, k, self.m.graph_id() if self.graphs else None)
        return s

    def capture(self) -> None:
        """Run each row bucket's step twice with every slot free (ONNX Runtime captures a graph on its second run
        of a graph id), so no step in service captures. A free slot's step writes its position 0, which a
        joining prompt's prefill overwrites. If capturing fails, the graphs are off for this model and the
        steps run as plain calls of the same shapes on a session made again without graphs (``m.cuda_graph_error``
        says why)."""
        if any(h is not None for h in self.slots):
            raise ValueError("capture runs on an empty batch")
        if not self.fixed:
            raise ValueError("capture runs the fixed-shape steps (a batch made with capture or fixed)")
        try:
            for k in self.grid:
                s = self._step_of(k)
                s.mask[:] = 0
                s.mask[:, 0] = 1
                s.toks[:] = 0
                for _ in range(2):
                    s.feed()
                    self.m.session.run_with_iobinding(s.io, s.options)
        except Exception as exc:  # noqa: BLE001 — onnxruntime's own error types; graphs are an optimisation
            self.m.drop_graphs(f"capturing the decode step failed: {str(exc).splitlines()[0]}")
            self.graphs = False
            self._steps.clear()  # bound to the old session: made again, on the new one, at first use


class _Step:
    """One row bucket's decode step: its inputs and outputs preallocated (on the device, fed from host staging
    arrays), bound once with the first ``k`` slots of the KV, and run under its own graph id."""

    def __init__(self, batch: DeviceDecodeBatch, k: int, graph_id: int | None) -> None:
        import onnxruntime as ort

        m, dev = batch.m, batch.device
        self.on_cpu = dev == "cpu"
        self.toks = np.zeros((k, 1), dtype=np.int64)
        self.mask = np.zeros((k, batch.length), dtype=np.int64)
        self.visible = np.zeros((k, batch.length), dtype=bool)
        self.v_toks = ort.OrtValue.ortvalue_from_numpy(self.toks, dev, 0)  # on CPU: the same memory
        self.v_mask = ort.OrtValue.ortvalue_from_numpy(self.mask, dev, 0)
        logits = next(o for o in m.session.get_outputs() if o.name == "logits")
        ldtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((k, 1, int(logits.shape[-1])), ldtype, dev, 0)
        self.next = ort.OrtValue.ortvalue_from_shape_and_type((k, 1), np.int64, dev, 0) if m.has_next else None
        self.io = io = m.session.io_binding()
        io.bind_ortvalue_input("input_ids", self.v_toks)
        io.bind_ortvalue_input("attention_mask", self.v_mask)
        io.bind_ortvalue_output("logits", self.logits)
        if self.next is not None:
            io.bind_ortvalue_output("next_token", self.next)
        batch._bind(io, 0, k)
        self.options = m.plain_run
        if graph_id is not None:  # unique in the session for its lifetime: an id replays the buffers it was captured on
            self.options = ort.RunOptions()
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def feed(self) -> None:
        if not self.on_cpu:
            self.v_toks.update_inplace(self.toks)
            self.v_mask.update_inplace(self.mask)
