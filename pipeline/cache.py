"""Prediction caches: in-process LRU, Redis (MGET / pipelined SET EX, circuit breaker), and both tiered.

Keys are a hash of the model id and the normalized text, never the raw text, so Redis holds no user text
and a new model version never reads an old one's answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import unicodedata
from collections import OrderedDict
from typing import Iterable, Mapping, Protocol, Sequence

import orjson

from pipeline import logs
from pipeline.events import Generation, Prediction

log = logs.get("streamlabel.cache")


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def cache_key(model_id: str, text: str) -> str:
    h = hashlib.blake2b(f"{model_id}\x00{normalize(text)}".encode("utf-8"), digest_size=16).hexdigest()
    return f"sl:{model_id}:{h}"


def _pack(p: Prediction | Generation) -> bytes:
    if isinstance(p, Generation):
        return orjson.dumps({"g": p.text, "n": p.tokens, "f": p.finish_reason, "m": p.model})
    if p.stage is not None:
        return orjson.dumps({"l": p.label, "s": p.score, "ps": dict(p.scores), "m": p.model, "st": p.stage})
    return orjson.dumps({"l": p.label, "s": p.score, "ps": dict(p.scores), "m": p.model})


def _unpack(raw: bytes) -> Prediction | Generation | None:
    try:
        d = orjson.loads(raw)
        if "g" in d:
            return Generation(text=str(d["g"]), tokens=int(d["n"]), finish_reason=str(d["f"]), model=d["m"], cached=True)
        return Prediction(label=d["l"], score=float(d["s"]), scores=d["ps"], model=d["m"], cached=True, stage=d.get("st"))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # a damaged entry is a miss, never an error


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
            self._d[k] = p if p.cached else dataclasses.replace(p, cached=True, timings={})
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

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        st = self.state
        if st == "closed":
            return True
        if st == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        if self._opened_at is not None:
            log.info("cache_circuit_closed")
        self._count = 0
        self._opened_at = None
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
    """Redis via redis.asyncio. Every error or timeout is a miss; the breaker stops trying for a while."""

    tier = "redis"

    def __init__(self, url: str, *, ttl_s: int = 86_400, timeout_ms: int = 50, password: str | None = None,
                 tls: bool = False, ca_file: str | None = None, breaker: CircuitBreaker | None = None) -> None:
        import redis.asyncio as aioredis

        kw: dict = {"password": password} if password else {}
        if tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://"):]
        if url.startswith("rediss://") and ca_file:
            kw["ssl_ca_certs"] = ca_file
        self._r = aioredis.from_url(url, socket_timeout=timeout_ms / 1000, socket_connect_timeout=timeout_ms / 1000,
                                    retry_on_timeout=False, health_check_interval=0, **kw)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_ms / 1000
        self.breaker = breaker or CircuitBreaker()
        self.errors = 0

    async def _guard(self, coro):
        if not self.breaker.allow():
            coro.close()
            return None
        try:
            res = await asyncio.wait_for(coro, self.timeout_s * 2)
        except asyncio.CancelledError:
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
        if raw is None:
            return [None] * len(keys)
        return [_unpack(v) if v is not None else None for v in raw]

    async def put_many(self, items: Iterable[tuple[str, Prediction]]) -> None:
        items = list(items)
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
                            breaker=CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s))
    return TieredCache(LocalCache(cfg.local_size), remote, metrics)
