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


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
