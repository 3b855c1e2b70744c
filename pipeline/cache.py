"""Prediction caches: in-process LRU, Redis (MGET / pipelined SET EX, circuit breaker), and both tiered.

Keys are a hash of the model id and the normalized text, never the raw text, so Redis holds no user text
and a new model version never reads an old one's answers. Generated texts (which can quote the input) stay in
the in-process tier unless ``cache.redis_generations`` is set. What Redis returns is checked like any input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import unicodedata
from collections import OrderedDict
from typing import Iterable, Protocol, Sequence

import orjson

from pipeline import logs
from pipeline.events import NO_TIMINGS, Generation, Prediction

log = logs.get("streamlabel.cache")


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def cache_key(model_id: str, text: str) -> str:
    h = hashlib.blake2b(f"{model_id}\x00{normalize(text)}".encode("utf-8"), digest_size=16).hexdigest()
    return f"sl:{model_id}:{h}"


def settings_digest(*parts) -> str:
    """A short digest of the settings an answer depends on (templates, decoding), for cache keys."""
    return hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _pack(p: Prediction | Generation) -> bytes:
    if isinstance(p, Generation):
        return orjson.dumps({"g": p.text, "n": p.tokens, "f": p.finish_reason, "m": p.model})
    if p.stage is not None:
        return orjson.dumps({"l": p.label, "s": p.score, "ps": dict(p.scores), "m": p.model, "st": p.stage})
    return orjson.dumps({"l": p.label, "s": p.score, "ps": dict(p.scores), "m": p.model})


def cacheable(answer: Prediction | Generation) -> bool:
    """Only a normal answer is written back: never a degraded cascade answer (kept because of overload) or a
    generation cut off by its deadline, which would later be served as if they were ordinary."""
    if isinstance(answer, Generation):
        return answer.finish_reason in ("stop", "length")
    return not answer.degraded


_FINISH = ("stop", "length")


def _unpack(raw) -> Prediction | Generation | None:
    """An entry read back, checked field by field: anything else (damaged, foreign, hostile) is None (a miss)."""
    try:
        d = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("m"), str):
        return None
    if "g" in d:
        text, n, finish = d.get("g"), d.get("n"), d.get("f")
        if (isinstance(text, str) and type(n) is int and 0 <= n <= 1_000_000 and finish in _FINISH
                and len(d) == 4):
            return Generation(text=text, tokens=n, finish_reason=finish, model=d["m"], cached=True)
        return None
    label, score, scores, stage = d.get("l"), d.get("s"), d.get("ps"), d.get("st")
    if not (isinstance(label, str) and _prob(score) and isinstance(scores, dict) and scores
            and label in scores and all(isinstance(k, str) and _prob(v) for k, v in scores.items())
            and (stage is None or (type(stage) is int and 0 <= stage <= 8))):
        return None
    return Prediction(label=label, score=float(score), scores=scores, model=d["m"], cached=True, stage=stage)


def _prob(v) -> bool:
    return type(v) in (float, int) and 0.0 <= v <= 1.0  # a NaN fails both comparisons


class Cache(Protocol):
    async def get_many(self, keys: Sequence[str]) -> list[Prediction | None]: ...

    async def put_many(self, items: Iterable[tuple[str, Prediction]]) -> None: ...

    async def close(self) -> None: ...


class NullCache:
    async def get_many(self, keys: Sequence[str]) -> list[Prediction | None]:
        return [None] * len(keys)

    async def put_many(self, items: Iterable[tuple[str, Prediction]]) -> None:
        return None

    async def close(self) -> None:
        return None


class LocalCache:
    """In-process LRU of ``size`` entries."""

    tier = "local"

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._d: OrderedDict[str, Prediction] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> list[Prediction | None]:
        out: list[Prediction | None] = []
        for k in keys:
            p = self._d.get(k)
            if p is not None:
                self._d.move_to_end(k)
            out.append(p)
        return out

    async def put_many(self, items: Iterable[tuple[str, Prediction]]) -> None:
        for k, p in items:
            self._d[k] = p if p.cached else dataclasses.replace(p, cached=True, timings=NO_TIMINGS)
            self._d.move_to_end(k)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    async def close(self) -> None:
        return None


class CircuitBreaker:
    """Closed → (N consecutive failures) → open → (after reset_s) one probe → closed or open again."""

    def __init__(self, failures: int = 3, reset_s: float = 2.0, clock=time.monotonic) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._count = 0
        self._opened_at: float | None = None
        self._probing = False
        self._probe_at = 0.0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        st = self.state
        if st == "closed":
            return True
        # One probe at a time; a probe that never reported back (a bug elsewhere) does not block the next for good.
        if st == "half-open" and (not self._probing or self._clock() - self._probe_at > self.reset_s):
            self._probing = True
            self._probe_at = self._clock()
            return True
        return False

    def success(self) -> None:
        if self._opened_at is not None:
            log.info("cache_circuit_closed")
        self._count = 0
        self._opened_at = None
        self._probing = False

    def abandon(self) -> None:
        """The call ``allow`` let through was cancelled: no answer either way, so the next call may probe."""
        self._probing = False

    def failure(self, exc: BaseException) -> None:
        self._count += 1
        self._probing = False
        if self._opened_at is not None:
            self._opened_at = self._clock()  # the probe failed: stay open for another period
        elif self._count >= self.failures:
            self._opened_at = self._clock()
            log.warning("cache_circuit_open", error=type(exc).__name__, detail=str(exc)[:200],
                        retry_in_s=self.reset_s)


class RedisCache:
    """Redis via redis.asyncio. Every error or timeout is a miss; the breaker stops trying for a while.

    Entries read back are untrusted: one that does not check out is a miss, counted (``invalid``, and
    ``streamlabel_ignored_total{what="cache_entry"}``). Generated texts are written only when ``generations``
    is set (``cache.redis_generations``): by default Redis holds no text that could quote the input.
    """

    tier = "redis"

    def __init__(self, url: str, *, ttl_s: int = 86_400, timeout_ms: int = 50, password: str | None = None,
                 tls: bool = False, ca_file: str | None = None, breaker: CircuitBreaker | None = None,
                 generations: bool = False, metrics=None) -> None:
        from pipeline.redis_client import redis_client

        self._r = redis_client(url, password=password, tls=tls, ca_file=ca_file, timeout_s=timeout_ms / 1000)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_ms / 1000
        self.breaker = breaker or CircuitBreaker()
        self.generations = generations
        self.errors = 0
        self.invalid = 0
        self._invalid_counter = metrics.ignored.labels("cache_entry") if metrics is not None else None

    async def _guard(self, coro):
        if not self.breaker.allow():
            coro.close()
            return None
        try:
            res = await asyncio.wait_for(coro, self.timeout_s * 2)
        except asyncio.CancelledError:
            self.breaker.abandon()  # a probe cut off (revoke, shutdown) must not keep the breaker open for good
            raise
        except Exception as exc:  # connection refused, timeout, auth, protocol: all mean "no cache now"
            self.errors += 1
            self.breaker.failure(exc)
            return None
        self.breaker.success()
        return res

    async def get_many(self, keys: Sequence[str]) -> list[Prediction | None]:
        if not keys:
            return []
        raw = await self._guard(self._r.mget(list(keys)))
        if not isinstance(raw, list) or len(raw) != len(keys):
            return [None] * len(keys)
        out = [_unpack(v) if v is not None else None for v in raw]
        bad = sum(1 for v, p in zip(raw, out) if v is not None and p is None)
        if bad:
            self._count_invalid(bad)
        return out

    def _count_invalid(self, n: int) -> None:
        if not self.invalid:
            log.warning("cache_entry_invalid", entries=n, note="a damaged or foreign Redis entry is a miss; counted in "
                                                                "streamlabel_ignored_total{what=\"cache_entry\"}")
        self.invalid += n
        if self._invalid_counter is not None:
            self._invalid_counter.inc(n)

    async def put_many(self, items: Iterable[tuple[str, Prediction]]) -> None:
        items = [(k, p) for k, p in items if self.generations or not isinstance(p, Generation)]
        if not items:
            return

        async def write():
            async with self._r.pipeline(transaction=False) as pipe:
                for k, p in items:
                    pipe.set(k, _pack(p), ex=self.ttl_s)
                return await pipe.execute()

        await self._guard(write())

    async def ping(self) -> bool:
        return bool(await self._guard(self._r.ping()))

    async def close(self) -> None:
        try:
            await self._r.aclose()
        except Exception:  # closing a dead connection is not an error worth raising
            pass


class TieredCache:
    """L1 ``LocalCache`` in front of ``RedisCache``; Redis hits fill L1."""

    def __init__(self, local: LocalCache, remote: RedisCache | None, metrics=None) -> None:
        self.local = local
        self.remote = remote
        self.metrics = metrics

    def _count(self, tier: str, hits: int, total: int) -> None:
        if self.metrics is not None:
            if hits:
                self.metrics.cache.labels(tier, "hit").inc(hits)
            if total - hits:
                self.metrics.cache.labels(tier, "miss").inc(total - hits)

    async def get_many(self, keys: Sequence[str]) -> list[Prediction | None]:
        out = await self.local.get_many(keys)
        self._count("local", sum(p is not None for p in out), len(keys))
        missing = [i for i, p in enumerate(out) if p is None]
        if missing and self.remote is not None:
            got = await self.remote.get_many([keys[i] for i in missing])
            fill = []
            for i, p in zip(missing, got):
                if p is not None:
                    out[i] = p
                    fill.append((keys[i], p))
            self._count("redis", len(fill), len(missing))
            if fill:
                await self.local.put_many(fill)
        return out

    async def put_many(self, items: Iterable[tuple[str, Prediction]]) -> None:
        items = list(items)
        await self.local.put_many(items)
        if self.remote is not None:
            await self.remote.put_many(items)

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()


def make_cache(cfg, metrics=None) -> Cache:
    """From ``CacheSettings``: tiered (local + Redis), local only, or none."""
    if not cfg.enabled:
        return NullCache()
    remote = None
    if cfg.redis_url:
        remote = RedisCache(cfg.redis_url, ttl_s=cfg.ttl_s, timeout_ms=cfg.timeout_ms, password=cfg.redis_password,
                            tls=cfg.redis_tls, ca_file=cfg.redis_ca_file,
                            breaker=CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s),
                            generations=cfg.redis_generations, metrics=metrics)
    return TieredCache(LocalCache(cfg.local_size), remote, metrics)
