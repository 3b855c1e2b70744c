"""Run a worker in-process against real services and read its topics back."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess

import orjson

from consumers.worker import Worker
from pipeline.cache import make_cache
from pipeline.config import Settings
from pipeline.metrics import Metrics
from producers.topics import ensure_topics, read_until


def settings_for(kafka, names, *, redis_url: str | None = None, **sections) -> Settings:
    base = Settings().replace(
        kafka={"bootstrap_servers": kafka.bootstrap, "group_id": names.group, "session_timeout_ms": 6000},
        topics={"input": names.input, "output": names.output, "dlq": names.dlq},
        cache={"enabled": True, "redis_url": redis_url, "timeout_ms": 100, "breaker_reset_s": 0.5},
        metrics={"port": None, "summary_interval_s": 5},
        worker={"commit_interval_ms": 100},
    )
    return base.replace(**sections) if sections else base


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, engine, *, name: str = "w0", metrics: Metrics | None = None):
    await ensure_topics(settings.kafka.bootstrap_servers, [settings.topics.input, settings.topics.output, settings.topics.dlq])
    metrics = metrics or Metrics()
    cache = make_cache(settings.cache, metrics)
    w = Worker(settings, engine, cache=cache, metrics=metrics, name=name)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(_ready(w, task), 60)
        yield w
    finally:
        w.stop()
        try:
            await asyncio.wait_for(task, 60)
        finally:
            await cache.close()


async def _ready(w: Worker, task: asyncio.Task) -> None:
    ready = asyncio.create_task(w.ready.wait())
    done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the worker's error
    ready.cancel()


async def read_labels(bootstrap: str, topic: str, want_ids: set[str], timeout: float = 60) -> list:
    def done(recs):
        return want_ids <= {orjson.loads(r.value)["id"] for r in recs}

    return await read_until(bootstrap, [topic], done, timeout)


def ids_of(records) -> list[str]:
    return [orjson.loads(r.value)["id"] for r in records]


async def process_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """A child process's exit code, or None if it did not exit within ``timeout`` (then it is killed, so no waiting
    thread is left behind to hold up the event loop's shutdown)."""
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        return None
