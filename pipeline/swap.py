"""Hot swap: a worker follows a model name directory and switches to a new version without a gap.

The reference that moves is the name directory ``model.path`` points at (``models/sentiment-minilm``), with
``model.follow = true``: the version served is the one its ``current`` file names (a version number), else
its highest numbered version. Publishing a build (``model build`` writes ``N+1/`` when it is complete) or
writing ``current`` moves it; rollback is writing the old number into ``current``.

Every ``model.follow_interval_s`` each worker process looks. When the target differs from what it serves, the
candidate is prepared in a thread while the old version keeps serving: its manifest and files are verified
(sha256), its quality gate must have passed, it must be a classifier with the same labels and tokenizer as
the one served (texts already admitted were tokenized by it; a new tokenizer or label set means a restart),
it is loaded and warmed up, and it must answer the worker's recent texts (a canary; its agreement with the
served model on them is logged). Then the scheduler switches engines between two engine calls: calls
already running finish on the old version, every later call runs on the new one. No partition is revoked,
nothing is re-read, so no record is lost or answered twice (exactly-once included); each output names the
version that answered it. A candidate that fails any step is refused, counted and logged, and is not tried
again until the target changes; the old version keeps serving. The old engine is closed once the calls it
was running have had their timeout.

Canary: a ``canary`` file in the name directory (``VERSION SHARE``, e.g. ``5 0.1``) has that share of keys
answered by that version, chosen by a stable hash of the record key (the event id when there is none), so a
customer's messages stay on one model. The candidate goes through the same checks; the share can move while
running (edit the file); removing the file ends the canary.

Shadow: a ``shadow`` file in the name directory (``VERSION``) has that version label the same texts off the
critical path, behind its own batcher: the served answers are published without waiting for it, and its
answers are only compared (``Shadow``: agreement, per-class confusion, its latency, as metrics). It is dropped,
counted, for a batch that arrives while the served model or the machine is busy (``pipeline/shadow.py`` lists the
guards); on CPU it gets half the cores, one session and short calls (docs/model-changes.md, "A shadow").

Not followed: cascades (``model.cascade``) and generators (the decode batch holds the model's KV cache).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from pathlib import Path
from typing import Callable

from pipeline.errors import ModelError, StreamlabelError
from pipeline.manifest import MANIFEST, load_manifest

CURRENT = "current"  # in a name directory: the version to serve, as a number
CANARY = "canary"  # in a name directory: "VERSION SHARE", a share of keys answered by that version


SHADOW = "shadow"  # in a name directory: a version that labels the same texts off the critical path


def key_share(key: bytes) -> float:
    """Where a key falls in [0, 1): a stable hash (the same key, the same place, in every process and run)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


def read_canary(name_dir: str | Path) -> tuple[Path, float] | None:
    """The canary the name directory asks for: (version directory, share of keys), or None."""
    f = Path(name_dir) / CANARY
    if not f.is_file():
        return None
    parts = f.read_text().split()
    try:
        version, share = parts[0], float(parts[1])
        if not version.isdigit() or not 0.0 <= share <= 1.0:
            raise ValueError
    except (IndexError, ValueError):
        raise ModelError(f"{CANARY} holds {' '.join(parts)[:60]!r}, not 'VERSION SHARE'", where=str(f),
                         hint="e.g. `echo '5 0.1' > canary`: version 5 answers 10% of the keys") from None
    return Path(name_dir) / version, share


def target_version(name_dir: str | Path) -> Path | None:
    """The version directory a name directory points at now: ``current``'s, else the highest numbered one."""
    root = Path(name_dir)
    pointer = root / CURRENT
    if pointer.is_file():
        text = pointer.read_text().strip()
        if not re.fullmatch(r"\d+", text):
            raise ModelError(f"{CURRENT} holds {text[:40]!r}, not a version number", where=str(pointer),
                             hint="write the number of a version directory, e.g. `echo 3 > current`")
        return root / text
    versions = [c for c in root.iterdir() if c.is_dir() and re.fullmatch(r"\d+", c.name) and (c / MANIFEST).is_file()]
    return max(versions, key=lambda c: int(c.name)) if versions else None


def starting_version(m):
    """The ``[model]`` settings a worker starts on: with ``follow``, the version the name directory points at now
    (``current``, else the newest), so a worker started after a rollback serves the rolled-back version from its
    first record, and never loads one version only to switch at its first look. Otherwise, or when ``current`` is
    unreadable or names no published version (the follower then logs why at its first look), ``m`` as it is."""
    import dataclasses

    if not m.follow or m.cascade:
        return m
    try:
        target = target_version(m.path) if Path(m.path).is_dir() else None
    except (OSError, ModelError):  # `current` unreadable (half written?): start as before; the follower says why
        return m
    if target is None or not (target / MANIFEST).is_file():  # names no published version: likewise
        return m
    return dataclasses.replace(m, path=str(target))


class Refused(StreamlabelError):
    """A candidate version that may not serve (the reason says why)."""


class ModelFollower:
    """One worker's follower: polls the name directory, prepares a candidate, asks the task to switch."""

    def __init__(self, settings, task, *, metrics=None, log=None, load: Callable | None = None,
                 on_switch: Callable | None = None, wrap: Callable = lambda engine: engine) -> None:
        from pipeline.tasks import load_engine

        self.s = settings
        self.task = task
        self.metrics = metrics
        self.log = log
        self.load = load or (lambda m: load_engine(m, settings.generate, settings.batching, settings.backlog))
        self.on_switch = on_switch
        self.wrap = wrap  # the worker's failpoint wrapper
        self.root = Path(settings.model.path)
        self.recent: deque[str] = deque(maxlen=256)  # the worker appends texts it served: the canary's
        self.serving = Path(task.engine.root) if hasattr(task.engine, "root") else None
        self.refused: dict[str, str] = {}  # version dir → reason (not tried again until the target moves)
        self.switches = 0
        self.canary_dir: Path | None = None
        self.shadow_dir: Path | None = None

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.model_swaps.labels(result).inc()

    async def run(self) -> None:
        interval = self.s.model.follow_interval_s
        while True:
            await asyncio.sleep(interval)  # polling a directory: the file system pushes nothing portable
            await self.check()

    async def check(self) -> str | None:
        """Look once; switch if the target moved and the candidate passes. Returns what happened, if anything."""
        try:
            target = await asyncio.to_thread(target_version, self.root)
        except (OSError, ModelError) as exc:
            reason = exc.render() if isinstance(exc, StreamlabelError) else str(exc)
            if self.refused.get("pointer") != reason:
                self.refused["pointer"] = reason
                self._count("refused")
                self._warn("model_target_unreadable", reason)
            return None
        self.refused.pop("pointer", None)
        await self._canary()
        await self._shadow()
        if target is None or (self.serving is not None and target.resolve() == self.serving.resolve()):
            return None
        key = str(target.resolve())
        if key in self.refused:
            return None
        t0 = time.monotonic()
        try:
            engine, agreement = await asyncio.to_thread(self._prepare, target, list(self.recent))
        except Exception as exc:  # noqa: BLE001 — any failure refuses the candidate; the old version serves on
            reason = exc.render() if isinstance(exc, StreamlabelError) else f"{type(exc).__name__}: {exc}"
            self.refused[key] = reason
            self._count("refused")
            self._warn("model_refused", reason, candidate=str(target))
            return "refused"
        old = self.task.swap(self.wrap(engine))
        self.serving = target
        self.switches += 1
        self._count("switched")
        if self.on_switch is not None:
            self.on_switch(getattr(old, "_inner", old), engine)
        if self.log is not None:
            self.log.info("model_switched", old=getattr(old, "model_id", None), new=engine.model_id,
                          prepared_s=round(time.monotonic() - t0, 2), canary_texts=len(self.recent),
                          canary_agreement=agreement)
        # Calls already running on the old engine finish (each within the batcher's engine timeout) before it closes.
        asyncio.get_running_loop().call_later(self.s.batching.engine_timeout_s + 5, old.close)
        return "switched"

    async def _canary(self) -> None:
        """Start, move or end the canary the ``canary`` file asks for."""
        try:
            want = await asyncio.to_thread(read_canary, self.root)
        except (OSError, ModelError) as exc:
            reason = exc.render() if isinstance(exc, StreamlabelError) else str(exc)
            if self.refused.get("canary-file") != reason:
                self.refused["canary-file"] = reason
                self._warn("model_canary_unreadable", reason)
            return
        self.refused.pop("canary-file", None)
        task = self.task
        if want is None:
            if task.canary is not None:
                old = task.set_canary(None, 0.0, linger_s=self.s.batching.engine_timeout_s + 2)
                if self.log is not None:
                    self.log.info("model_canary_ended", canary=old.model_id)
                asyncio.get_running_loop().call_later(self.s.batching.engine_timeout_s + 5, old.close)
            return
        target, share = want
        if task.canary is not None and self.canary_dir is not None and target.resolve() == self.canary_dir.resolve():
            if share != task.canary_share:
                task.canary_share = share
                if self.log is not None:
                    self.log.info("model_canary_share", canary=task.canary.model_id, share=share)
            return
        key = "canary:" + str(target.resolve())
        if key in self.refused:
            return
        try:
            engine, agreement = await asyncio.to_thread(self._prepare, target, list(self.recent))
        except Exception as exc:  # noqa: BLE001 — a refused canary: the served version answers every key
            reason = exc.render() if isinstance(exc, StreamlabelError) else f"{type(exc).__name__}: {exc}"
            self.refused[key] = reason
            self._count("refused")
            self._warn("model_canary_refused", reason, candidate=str(target))
            return
        old = task.set_canary(self.wrap(engine), share)
        self.canary_dir = target
        self._count("canary")
        if self.log is not None:
            self.log.info("model_canary_started", canary=engine.model_id, share=share, canary_agreement=agreement)
        if old is not None:
            asyncio.get_running_loop().call_later(self.s.batching.engine_timeout_s + 5, old.close)

    async def _shadow(self) -> None:
        """Start, change or end the shadow the ``shadow`` file asks for."""
        f = self.root / SHADOW
        try:
            text = (await asyncio.to_thread(f.read_text)).strip() if f.is_file() else None
        except OSError:
            text = None
        task = self.task
        if text is None:
            if task.shadow is not None:
                old = task.set_shadow(None, linger_s=self.s.batching.engine_timeout_s + 2)
                if self.log is not None:
                    self.log.info("model_shadow_ended", shadow=old.engine.model_id, agreement=old.agreement,
                                  dropped=old.dropped)
                asyncio.get_running_loop().call_later(self.s.batching.engine_timeout_s + 5, old.engine.close)
            return
        if text.isdigit():
            target = self.root / text
        else:  # another artifact: a version or name directory (e.g. a generator served by generate.labels)
            try:
                from pipeline.manifest import resolve_artifact_dir

                target = resolve_artifact_dir(text)
            except ModelError as exc:
                if self.refused.get("shadow-file") != text:
                    self.refused["shadow-file"] = text
                    self._warn("model_shadow_unreadable", f"{SHADOW} holds {text[:80]!r}: {exc.render()}")
                return
        if task.shadow is not None and self.shadow_dir is not None and target.resolve() == self.shadow_dir.resolve():
            return
        key = "shadow:" + str(target.resolve())
        if key in self.refused:
            return
        try:
            engine, agreement = await asyncio.to_thread(self._prepare, target, list(self.recent), True)
        except Exception as exc:  # noqa: BLE001 — a refused shadow: nothing changes
            reason = exc.render() if isinstance(exc, StreamlabelError) else f"{type(exc).__name__}: {exc}"
            self.refused[key] = reason
            self._count("refused")
            self._warn("model_shadow_refused", reason, candidate=str(target))
            return
        old = task.set_shadow(engine, metrics=self.metrics, linger_s=self.s.batching.engine_timeout_s + 2)
        self.shadow_dir = target
        self._count("shadow")
        if self.log is not None:
            self.log.info("model_shadow_started", shadow=engine.model_id, canary_agreement=agreement)
        if old is not None:
            asyncio.get_running_loop().call_later(self.s.batching.engine_timeout_s + 5, old.engine.close)

    def _warn(self, event: str, reason: str, **kw) -> None:
        if self.log is not None:
            self.log.warning(event, reason=reason, serving=self.task.model_id, note="the served version keeps serving",
                             **kw)

    def _prepare(self, target: Path, recent: list[str], shadow: bool = False):
        """In a thread: verify, check, load, warm up and canary the candidate. (engine, agreement) or raises.
        A shadow may be a generator served as a classifier (``generate.labels``) and may tokenize differently:
        it is handed texts, never tokens."""
        served = self.task.engine
        _, manifest = load_manifest(target, verify=True)  # every file against its sha256
        choice = shadow and manifest.task == "text-generation" and bool(self.s.generate.labels)
        if manifest.task != "text-classification" and not choice:
            raise Refused(f"{manifest.model_id} is a {manifest.task} model; only classifiers are swapped while running",
                          hint="restart the workers to serve it (a generator can shadow with generate.labels set)")
        gate = manifest.gate or {}
        if gate and not gate.get("passed", False):
            raise Refused(f"{manifest.model_id} did not pass its quality gate", hint="rebuild it, or serve another version")
        labels = tuple(self.s.generate.labels) if choice else tuple(manifest.labels)
        if labels != tuple(served.labels):
            raise Refused(f"{manifest.model_id} has labels {list(labels)}, the served model {list(served.labels)}",
                          hint="a new label set needs a restart of the workers (outputs change shape)")
        if not shadow and manifest.tokenizer_sha256 != served.manifest.tokenizer_sha256:
            raise Refused(f"{manifest.model_id} has another tokenizer than the served model",
                          hint="restart the workers to serve it (texts in flight were tokenized by the old one)")
        import dataclasses

        m = self.s.model
        if shadow and m.provider != "cuda":
            # A shadow on CPU gets half the cores and one session: the served model keeps the rest (measured on 2
            # cores at 400 events/s: with every core the shadow took the served p99 from 102 to 937 ms).
            import os

            m = dataclasses.replace(m, threads=max(1, (os.cpu_count() or 2) // 2), sessions=1)
        # No CUDA graphs for an engine loaded beside a serving one: ONNX Runtime captures in the global mode, which
        # other threads' CUDA calls (the served engine's) would break. It runs its buckets as plain calls.
        engine = self.load(_at(dataclasses.replace(m, cuda_graph=False), target))
        try:
            if recent:
                new = engine.predict_sync(recent)
                old = served.predict_sync(recent)
                agree = [a.label == b.label for a, b in zip(new, old) if hasattr(a, "label") and hasattr(b, "label")]
                agreement = round(sum(agree) / len(agree), 4) if agree else None
            else:
                engine.predict_sync(["canary"])
                agreement = None
        except BaseException:
            engine.close()
            raise
        return engine, agreement


def _at(m, target: Path):
    import dataclasses

    return dataclasses.replace(m, path=str(target))
