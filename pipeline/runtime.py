"""ONNX Runtime plumbing shared by the engines: providers, the engine thread, CPU accounting, softmax.

Both engines (``pipeline/engine.py`` for classifiers, ``pipeline/generation/`` for generators) run on these;
neither imports the other.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading

import numpy as np


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class DaemonExecutor:
    """One daemon thread running calls in order, each answered through an asyncio future of the caller's loop.

    Unlike ``ThreadPoolExecutor`` (whose threads the interpreter joins at exit), a call that never returns
    (a hung native kernel) cannot keep the process alive after the worker has stopped on its own timeout.
    And the hop is half the CPU of ``loop.run_in_executor`` (55 vs 105 µs per call, both threads, measured
    here), which wraps a ``concurrent.futures.Future`` (a lock and a condition each) in an asyncio one.
    """

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.native_id = self._thread.native_id

    def run(self, fn, /, *args) -> asyncio.Future:
        """``fn(*args)`` on this thread. Cancelling the future does not stop a call already running."""
        if self._closed:
            raise RuntimeError("executor is shut down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((fut, fn, args, loop))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args, loop = item
            if fut.cancelled():  # a read of its state: cancelled before it ran (a timeout, a shutdown)
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 — handed to the caller through the future
                _deliver_threadsafe(loop, fut, None, exc)
            else:
                _deliver_threadsafe(loop, fut, result, None)

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
                if item is not None:  # cancelled on its own loop
                    try:
                        item[3].call_soon_threadsafe(item[0].cancel)
                    except RuntimeError:  # that loop is closed: nobody waits
                        pass
        self._q.put(None)
        if wait:
            self._thread.join()


def _deliver_threadsafe(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result, exc) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, fut, result, exc)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def _deliver(fut: asyncio.Future, result, exc) -> None:
    if fut.done():  # cancelled meanwhile (a timeout, a shutdown)
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def task_ids() -> set[int]:
    """This process's native thread ids (Linux /proc; empty elsewhere)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def thread_cpu_seconds(tids: set[int]) -> float:
    """CPU time (user + system) of these threads of this process so far (Linux; 0.0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended
    return total / tick


def with_cuda_graphs(providers: list[str]) -> list:
    """``providers`` with the CUDA provider's graph capture on (``enable_cuda_graph``): what both engines ask for."""
    return [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" else p
            for p in providers]


def no_capture():
    """Run options for a run of a graph-capturing session that must neither capture nor replay (graph id -1)."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", "-1")
    return ro


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class IdleCpu:
    """The share of the machine's CPU left idle lately (0 to 1; None where it cannot be read): the latest sample
    (``period_s``) or, when that is quieter, the samples before smoothed in, so it falls at once and recovers
    gradually.

    Read from the cgroup when it sets a CPU quota (a container's limit: ``cpu.max`` and ``cpu.stat`` of cgroup v2:
    the container's own use against its limit; other containers on the host are not seen), else from ``/proc/stat``
    (every core of the machine; time stolen by the hypervisor counts as busy). Busy includes the caller's own
    work: a shadow that labels makes the machine busier, and stops sooner. Sampled at most every ``period_s``, so a
    caller may ask on every batch. What a shadow model asks before it takes CPU that the served model, the Kafka
    clients or a broker on the same cores would need."""

    def __init__(self, period_s: float = 0.1, *, proc_stat: str = "/proc/stat",
                 cgroup: str = "/sys/fs/cgroup", clock=None) -> None:
        import time

        self.period_s = period_s
        self._proc, self._cgroup = proc_stat, cgroup
        self._clock = clock or time.monotonic
        self._quota = self._read_quota()  # cores the cgroup may use, or None: the machine's
        self._last = self._read()
        self._t = self._clock()
        self._share: float | None = None

    def _read_quota(self) -> float | None:
        try:
            quota, period = open(os.path.join(self._cgroup, "cpu.max")).read().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            return None

    def _read(self) -> tuple[float, float] | None:
        """(busy, total) in seconds of CPU for the cgroup's quota, in jiffies for the machine; None if unreadable."""
        try:
            if self._quota is not None:
                for line in open(os.path.join(self._cgroup, "cpu.stat")):
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6, self._clock() * self._quota
                return None
            with open(self._proc) as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
            idle = fields[3] + fields[4]  # idle + iowait
            total = sum(fields)
            return total - idle, total
        except (OSError, ValueError, IndexError):
            return None

    @property
    def readable(self) -> bool:
        """Could the CPU figures be read at all (a platform without /proc, a sandbox hiding it)?"""
        return self._last is not None

    def share(self) -> float | None:
        """The idle share now (a sample when the last is ``period_s`` old, smoothed with the ones before)."""
        now = self._clock()
        if now - self._t < self.period_s:
            return self._share
        cur = self._read()
        if cur is not None and self._last is not None and cur[1] > self._last[1]:
            busy = (cur[0] - self._last[0]) / (cur[1] - self._last[1])
            instant = min(1.0, max(0.0, 1.0 - busy))
            # Smoothed, but never above the latest sample: a load that starts shows at the next sample, whatever
            # came before (a shadow must stop at once; it may resume once the quiet has lasted).
            self._share = instant if self._share is None else min(instant, 0.5 * self._share + 0.5 * instant)
        self._last, self._t = cur, now
        return self._share
