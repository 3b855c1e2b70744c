"""Run classify workers: one in this process, or N processes in one consumer group (``--workers N``)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import sys

from pipeline import logs
from pipeline.config import Settings


async def serve(settings: Settings, *, name: str = "worker-0", engine=None, install_signals: bool = True,
                on_ready=None, max_restarts: int = 20) -> int:
    """Build engine, cache, metrics; run one worker until SIGTERM/SIGINT; returns an exit code."""
    from consumers.worker import Worker, WorkerError
    from pipeline.cache import make_cache
    from pipeline.engine import OnnxEngine
    from pipeline.metrics import Metrics

    log = logs.get("streamlabel.runner").bind(worker=name)
    m = settings.model
    own_engine = engine is None
    if engine is None:
        engine = OnnxEngine(m.path, variant=m.variant, provider=m.provider, threads=m.threads, max_length=m.max_length)
    log.info("engine_ready", model=engine.model_id, variant=engine.variant, provider=engine.providers[0],
             threads=getattr(engine, "threads", None))
    metrics = Metrics()
    server = None
    if settings.metrics.port is not None:
        try:
            server, _ = metrics.serve(settings.metrics.port, settings.metrics.host)
        except OSError as exc:
            log.warning("metrics_port_unavailable", port=settings.metrics.port, error=str(exc))
    cache = make_cache(settings.cache, metrics)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: list = []

    def request_stop() -> None:
        stopping.set()
        for w in current:
            w.stop()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
    code = 0
    restarts = 0
    try:
        while not stopping.is_set():
            # A failed worker (publish not acknowledged, transaction failed) is rebuilt with fresh Kafka
            # clients: a new transactional producer fences the old one; uncommitted records are re-read.
            worker = Worker(settings, engine, cache=cache, metrics=metrics, name=name)
            current[:] = [worker]
            if on_ready is not None:
                on_ready(worker)
            try:
                await worker.run()
                break
            except WorkerError as exc:
                restarts += 1
                log.error("worker_failed", error=str(exc)[:300], restart=restarts,
                          note="uncommitted records will be re-read")
                if restarts > max_restarts:
                    code = 1
                    break
                try:
                    await asyncio.wait_for(stopping.wait(), min(30.0, 0.5 * 2 ** min(restarts, 6)))
                except asyncio.TimeoutError:
                    pass
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await cache.close()
        if server is not None:
            server.shutdown()
        if own_engine:
            engine.close()
    return code


def _child(settings: Settings, index: int, threads: int | None) -> None:
    logs.configure(settings.log.level, settings.log.format)
    if threads is not None:
        settings = settings.replace(model={"threads": threads})
    port = settings.metrics.port
    if port is not None:
        settings = settings.replace(metrics={"port": port + index})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(serve(settings, name=f"worker-{index}")))


def run_workers(settings: Settings, workers: int) -> int:
    """Start N worker processes (spawned, one engine each); forward SIGTERM/SIGINT; return the worst exit code."""
    if workers <= 1:
        return asyncio.run(serve(settings))
    cores = os.cpu_count() or 1
    threads = settings.model.threads or max(1, cores // workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(settings, i, threads), name=f"streamlabel-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()

    def forward(sig, _frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)
