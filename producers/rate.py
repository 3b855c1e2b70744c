"""Open-loop arrival schedules and a Kafka sender that holds the offered rate (it never waits for answers)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from aiokafka import AIOKafkaProducer

from pipeline import kafka as K
from pipeline.config import KafkaSettings, Settings


def arrivals(rate: float, *, poisson: bool = True, seed: int = 0) -> Iterable[float]:
    """Offsets in seconds from the start: constant spacing or a Poisson process at ``rate`` per second."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        yield t


@dataclass
class SendReport:
    offered_rate: float
    sent: int = 0
    acked: int = 0
    failed: int = 0
    seconds: float = 0.0
    max_behind_s: float = 0.0  # worst lateness of a send against its schedule
    first_ts_ms: int = 0
    first_error: str | None = None  # the first send that was not acknowledged, and why
    stopped: bool = False  # ended early because ``stop`` was set
    warnings: list[str] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def send_at_rate(producer: AIOKafkaProducer, topic: str, records: Iterable[tuple[bytes | None, bytes]], *,
                       rate: float, count: int | None = None, duration_s: float | None = None, poisson: bool = True,
                       seed: int = 0, on_progress: Callable[[SendReport], None] | None = None,
                       stop: asyncio.Event | None = None) -> SendReport:
    """Send ``(key, value)`` records on an open-loop schedule; acks are awaited at the end, not per send.

    Setting ``stop`` ends the schedule at once (Ctrl-C); what was sent is still acknowledged and counted.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    rep = SendReport(offered_rate=rate)
    pending: list[asyncio.Future] = []
    it = iter(records)
    sched = iter(arrivals(rate, poisson=poisson, seed=seed))
    t0 = time.perf_counter()
    last_progress = t0
    while (count is None or rep.sent < count):
        due = next(sched)
        if duration_s is not None and due > duration_s:
            break
        now = time.perf_counter() - t0
        if stop is not None and stop.is_set():
            rep.stopped = True
            break
        if due > now:
            if stop is None:
                await asyncio.sleep(due - now)  # the schedule itself: open-loop arrivals
            else:
                try:
                    await asyncio.wait_for(stop.wait(), due - now)
                    rep.stopped = True
                    break
                except asyncio.TimeoutError:
                    pass  # the schedule itself: open-loop arrivals
        else:
            rep.max_behind_s = max(rep.max_behind_s, now - due)
        try:
            key, value = next(it)
        except StopIteration:
            break
        pending.append(await producer.send(topic, value=value, key=key))
        rep.sent += 1
        if len(pending) >= 5000:
            done = [f for f in pending if f.done()]
            _count(rep, [f.exception() or True for f in done])
            pending = [f for f in pending if not f.done()]
        if on_progress and time.perf_counter() - last_progress > 1.0:
            last_progress = time.perf_counter()
            rep.seconds = last_progress - t0
            on_progress(rep)
    rep.seconds = time.perf_counter() - t0
    _count(rep, await asyncio.gather(*pending, return_exceptions=True))
    if rep.stopped:
        return rep
    # Below ~100 events a Poisson schedule's own spread exceeds 5%: no verdict on so few.
    if rep.sent >= 100 and rep.achieved_rate < 0.95 * rate and (count is None or rep.sent >= (count or 0)):
        rep.warnings.append(f"producer could not keep up: achieved {rep.achieved_rate:.0f}/s of {rate:.0f}/s offered")
    if rep.max_behind_s > 0.25:
        rep.warnings.append(f"producer fell behind its schedule by up to {rep.max_behind_s * 1000:.0f} ms")
    return rep


def _count(rep: SendReport, results) -> None:
    for r in results:
        if isinstance(r, BaseException):
            rep.failed += 1
            if rep.first_error is None:
                rep.first_error = f"{type(r).__name__}: {r}".splitlines()[0][:200]
        else:
            rep.acked += 1


def producer_for_load(s: str | KafkaSettings | Settings, **client_kw) -> AIOKafkaProducer:
    """Batching for load: no linger (batches still form while a request is in flight), idempotent acks=all.

    ``s``: a bootstrap string, ``KafkaSettings`` or ``Settings``; ``pipeline.kafka`` builds the client (security
    and compression, lz4 by default, from the settings).
    """
    return K.producer(s, **{"linger_ms": 0, "max_batch_size": 256 * 1024, **client_kw})
