"""Failpoints: named places in the data path where a fault test makes something go wrong on the Nth pass.

Armed only by configuration (``worker.failpoint = "after_inference:200"``, several separated by commas);
unarmed, ``hit`` is one dict lookup. Points and what they do on the Nth hit:

- kill the process (SIGKILL): ``after_poll`` (records taken, nothing done), ``after_inference`` (labels
  computed, nothing published), ``after_publish`` (outputs acknowledged, offsets not committed),
  ``in_transaction`` (exactly-once: outputs sent inside an open transaction).
- ``txn_fail``: the Nth transaction commit fails (raises ``InjectedFault``, handled like a broker error), once
  per process, so the restarted worker goes on.
- ``engine_fail``: from the Nth engine call on, every call raises (a broken engine).
- ``engine_hang``: the Nth engine call never returns (a hung engine).
- ``handler_stall``: the Nth batch handler ignores cancellation and waits ``stall_s`` before it publishes
  (a zombie that outlives its partition's revoke deadline).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

KILL_POINTS = ("after_poll", "after_inference", "after_publish", "in_transaction")
POINTS = KILL_POINTS + ("txn_fail", "engine_fail", "engine_hang", "handler_stall")

_fired: set[str] = set()  # one-shot points already fired in this process (survive in-process restarts)


class InjectedFault(Exception):
    """Raised by a failpoint to stand for a failure of the real thing (a transaction, an engine call)."""


class Failpoints:
    def __init__(self, spec: str | None, stall_s: float = 30.0) -> None:
        self.armed: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.stall_s = stall_s
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            name, _, n = part.strip().partition(":")
            if name not in POINTS:
                raise ValueError(f"unknown failpoint {name!r}; points are {', '.join(POINTS)}")
            self.armed[name] = int(n or 1)

    def __bool__(self) -> bool:
        return bool(self.armed)

    def _nth(self, name: str) -> bool:
        if name not in self.armed:
            return False
        self.hits[name] = self.hits.get(name, 0) + 1
        return self.hits[name] >= self.armed[name]

    def hit(self, name: str) -> None:
        """Kill points kill; ``txn_fail`` raises ``InjectedFault`` once per process."""
        if not self._nth(name):
            return
        if name in KILL_POINTS:
            os.kill(os.getpid(), signal.SIGKILL)
        elif name == "txn_fail" and name not in _fired:
            _fired.add(name)
            raise InjectedFault("failpoint txn_fail: the transaction commit failed")

    async def stall(self, name: str = "handler_stall") -> None:
        """A handler that ignores cancellation for ``stall_s`` seconds (once per process)."""
        if not self._nth(name) or name in _fired:
            return
        _fired.add(name)
        pause = asyncio.ensure_future(asyncio.sleep(self.stall_s))
        while not pause.done():
            try:
                await asyncio.shield(pause)
            except asyncio.CancelledError:
                continue  # a zombie: the cancel is ignored

    def wrap_engine(self, engine):
        """The engine, or a wrapper that fails or hangs as the engine failpoints say."""
        if "engine_fail" not in self.armed and "engine_hang" not in self.armed:
            return engine
        return _FaultyEngine(engine, self)


class _FaultyEngine:
    def __init__(self, inner, fp: Failpoints) -> None:
        self._inner = inner
        self._fp = fp
        self._calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def infer(self, batch):
        await self._fault()
        return await self._inner.infer(batch)

    async def predict(self, texts):
        await self._fault()
        return await self._inner.predict(texts)

    async def _fault(self) -> None:
        self._calls += 1
        fail_at = self._fp.armed.get("engine_fail")
        if fail_at is not None and self._calls >= fail_at:
            raise InjectedFault("failpoint engine_fail: the engine raised")
        hang_at = self._fp.armed.get("engine_hang")
        if hang_at is not None and self._calls == hang_at:
            # Block a thread for good, as a hung native call would; the awaiting coroutine can be cancelled.
            executor = getattr(self._inner, "_executor", None)
            if executor is not None:  # the engine's own thread, as a hung kernel would hold it
                await executor.run(threading.Event().wait)
            else:
                await asyncio.get_running_loop().run_in_executor(None, threading.Event().wait)
