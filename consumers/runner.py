"""Run classify workers: one in this process, or N processes in one consumer group (``--workers N``)."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import multiprocessing as mp
import os
import signal
import sys
import time

from pipeline import logs
from pipeline.config import Settings

STOP_GRACE_S = 30.0  # after a stop is asked: the drain deadline plus this, then the process exits regardless


async def serve(settings: Settings, *, name: str = "worker-0", engine=None, install_signals: bool = True,
                on_ready=None, max_restarts: int = 20, healthy_after_s: float = 60.0) -> int:
    """Build engine, cache, metrics; run one worker until SIGTERM/SIGINT; returns an exit code.

    A worker that stops with a retriable error (``pipeline/errors.py``: publish not acknowledged, transaction
    failed, a supervised task died) is rebuilt with fresh Kafka clients: a new transactional producer fences the
    old one; uncommitted records are read again. ``max_restarts`` failures in a row (a worker that ran
    ``healthy_after_s`` resets the count) end with exit code 1. A broker that cannot be reached at the first start
    is a configuration error (raised); once a worker has run, an unreachable broker is waited out. Any other
    error that is not retriable ends the run with its exit code (a broken or hung engine: 4).
    """
    from consumers.worker import Worker
    from pipeline.cache import make_cache
    from pipeline.errors import EngineError, KafkaUnreachable, StreamlabelError, UsageError
    from pipeline.metrics import Heartbeat, Metrics
    from pipeline.tasks import load_engine

    log = logs.get("streamlabel.runner").bind(worker=name)
    own_engine = engine is None
    if engine is None:
        from pipeline.swap import starting_version

        engine = load_engine(starting_version(settings.model), settings.generate, settings.batching, settings.backlog)
    log.info("engine_ready", model=engine.model_id, task=engine.task, variant=engine.variant,
             provider=engine.providers[0], threads=engine.threads, sessions=engine.sessions,
             **{k: getattr(engine, k) for k in ("cuda_graph", "cuda_graph_error") if getattr(engine, k, None)})
    metrics = Metrics()
    metrics.track_cpu(engine.thread_ids)
    from pipeline import __version__

    metrics.build_info.labels(__version__, engine.model_id, str(engine.variant), str(engine.providers[0]),
                              engine.task).set(1)
    # Everything loaded so far (modules, the model's Python objects) lives for the whole run: take it out of
    # the collector's reach, so a full collection scans what the stream allocates, not the libraries. Measured
    # on the tiny model at 6,500 events/s: full collections of 37-77 ms every ~2 s before, each a latency spike
    # that a loaded worker needs hundreds of ms to work off.
    gc.collect()
    gc.freeze()
    server = None
    heartbeat = Heartbeat(settings.metrics.liveness_stall_s)
    beating = asyncio.get_running_loop().create_task(heartbeat.run(), name="heartbeat")
    if settings.metrics.port is not None:
        try:
            server, _ = metrics.serve(settings.metrics.port, settings.metrics.host, liveness=heartbeat,
                                      max_connections=settings.metrics.max_connections)
        except OSError as exc:
            log.warning("metrics_port_unavailable", port=settings.metrics.port, error=str(exc))
    cache = make_cache(settings.cache, metrics)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: list = []

    def readiness() -> tuple[bool, dict]:
        """/readyz: the model is loaded and warm (it is, by now), partitions assigned, the broker reachable."""
        w = current[0] if current else None
        checks = {"model_loaded": True, "partitions_assigned": bool(w and w.ready.is_set() and w.assigned()),
                  "kafka_reachable": bool(w and w.kafka_reachable()), "stopping": stopping.is_set()}
        return (checks["partitions_assigned"] and checks["kafka_reachable"] and not checks["stopping"]), checks

    metrics.readiness = readiness

    def request_stop() -> None:
        if install_signals and not stopping.is_set():
            # A stop must end the process: if draining and closing outlive their deadlines by far (a client that
            # ignores cancellation), every thread's stack goes to stderr and the process exits (code 1).
            faulthandler.dump_traceback_later(settings.worker.drain_timeout_s + STOP_GRACE_S, exit=True)
        stopping.set()
        for w in current:
            w.stop()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
    code = 0
    failures = 0
    waits = 0
    has_run = False
    try:
        while not stopping.is_set():
            worker = Worker(settings, engine, cache=cache, metrics=metrics, name=name)
            current[:] = [worker]
            if on_ready is not None:
                on_ready(worker)
            started = time.monotonic()
            try:
                await worker.run()
                break
            except StreamlabelError as exc:
                engine = worker.engine  # a hot swap may have moved it: a restarted worker serves what was served
                if isinstance(exc, KafkaUnreachable):
                    if not has_run:
                        raise  # at the first start: a wrong address or a broker that is not there (exit 2)
                    waits += 1  # once a worker has run, an outage is waited out: not counted towards max_restarts
                    log.warning("restart_waiting_for_kafka", error=exc.render(), attempt=waits, note="retrying")
                elif not exc.retriable:
                    if isinstance(exc, UsageError):
                        raise  # the configuration's to fix: one line from the CLI, exit 2
                    log.error("engine_failed" if isinstance(exc, EngineError) else "worker_stopped",
                              error=exc.render(), exit_code=exc.exit_code, note="exiting: a restart would not help")
                    code = exc.exit_code
                    break
                else:
                    has_run = True
                    failures = 1 if time.monotonic() - started >= healthy_after_s else failures + 1
                    log.error("worker_failed", error=str(exc)[:300], failures_in_a_row=failures,
                              note="restarting with fresh clients; uncommitted records will be re-read")
                    if failures > max_restarts:
                        log.error("worker_gave_up", failures_in_a_row=failures)
                        code = 1
                        break
            if worker.ready.is_set():
                has_run = True
                waits = 0
            try:
                await asyncio.wait_for(stopping.wait(), min(30.0, 0.5 * 2 ** min(max(failures, waits), 6)))
            except asyncio.TimeoutError:
                pass
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            faulthandler.cancel_dump_traceback_later()
        beating.cancel()
        await cache.close()
        if server is not None:
            server.shutdown()
            server.server_close()
        if own_engine:
            (current[0].engine if current else engine).close()
    return code


def _child(settings: Settings, index: int, threads: int | None) -> None:
    from pipeline.errors import StreamlabelError

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
    try:
        code = asyncio.run(serve(settings, name=f"worker-{index}"))
    except StreamlabelError as exc:
        print(f"error: worker-{index}: {exc.render()}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


async def preflight(settings: Settings) -> None:
    """What every worker would check at start, once, before processes are spawned: broker and topics."""
    from pipeline.kafka import check_topics

    t = settings.topics
    await check_topics(settings, {"input": t.input, "output": t.output, "dlq": t.dlq}, create=t.create,
                       partitions=t.partitions, replication_factor=t.replication_factor)


def run_workers(settings: Settings, workers: int) -> int:
    """Start N worker processes (spawned, one engine each); forward SIGTERM/SIGINT; return the worst exit code."""
    asyncio.run(preflight(settings))  # before the model loads: a wrong topic or broker fails in a second
    if workers <= 1:
        return asyncio.run(serve(settings))
    cores = os.cpu_count() or 1
    threads = settings.model.threads or max(1, cores // workers)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(settings, i, threads), name=f"streamlabel-worker-{i}") for i in range(workers)]
    started: list = []

    def forward(sig, _frame):
        for p in started:
            if p.is_alive():
                os.kill(p.pid, sig)

    # Installed before the first child starts: a signal in between must not orphan children.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.start()
        started.append(p)
    for p in procs:
        p.join()
    # A child killed by a signal has a negative exit code: report it as the shell would (128 + signal).
    return max((128 - c if c is not None and c < 0 else (c or 0)) for c in (p.exitcode for p in procs))
