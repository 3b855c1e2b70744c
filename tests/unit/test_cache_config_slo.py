"""Cache keys and breaker, LocalCache LRU, Settings errors, SLO figures."""

from __future__ import annotations

import pytest

from pipeline.cache import CircuitBreaker, LocalCache, RedisCache, TieredCache, cache_key
from pipeline.config import load_settings
from pipeline.errors import ConfigError
from pipeline.events import Prediction
from pipeline.slo import SloTracker


def P(label="neutral"):
    return Prediction(label, 0.8, {label: 0.8}, "m@1")


def test_cache_key_normalizes_and_hides_text():
    assert cache_key("m@1", "Hello   World") == cache_key("m@1", "hello world")
    assert cache_key("m@1", "hello") != cache_key("m@2", "hello")
    assert "hello" not in cache_key("m@1", "hello")


async def test_local_cache_lru():
    c = LocalCache(size=2)
    await c.put_many([("a", P()), ("b", P())])
    await c.get_many(["a"])
    await c.put_many([("c", P())])
    got = await c.get_many(["a", "b", "c"])
    assert got[0] is not None and got[1] is None and got[2].cached


def test_breaker_opens_probes_and_closes():
    now = [0.0]
    b = CircuitBreaker(failures=2, reset_s=1.0, clock=lambda: now[0])
    assert b.allow()
    b.failure(OSError())
    assert b.state == "closed"
    b.failure(OSError())
    assert b.state == "open" and not b.allow()
    now[0] = 1.5
    assert b.allow() and not b.allow(), "exactly one probe when half-open"
    b.success()
    assert b.state == "closed" and b.allow()


async def test_redis_down_is_a_miss_not_an_error():
    r = RedisCache("redis://127.0.0.1:1/0", timeout_ms=50, breaker=CircuitBreaker(failures=1, reset_s=60))
    t = TieredCache(LocalCache(10), r)
    await t.put_many([("k", P())])
    assert (await t.get_many(["k", "x"]))[0] is not None  # local tier still answers
    assert await r.get_many(["x"]) == [None]
    assert r.breaker.state == "open"
    await r.close()


def test_settings_from_toml_and_env(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[kafka]\nbootstrap_servers = "k:9092"\n[batching]\nmax_batch = 16\n[slo]\nobjective_ms = 50\n')
    s = load_settings(f, env={"STREAMLABEL_BATCHING__MAX_BATCH": "32", "STREAMLABEL_CACHE__REDIS_URL": "none",
                              "STREAMLABEL_CACHE__ENABLED": "false", "OTHER": "x"})
    assert s.kafka.bootstrap_servers == "k:9092" and s.batching.max_batch == 32 and s.slo.objective_ms == 50.0
    assert s.cache.redis_url is None and s.cache.enabled is False
    assert s.model.sessions is None and s.batching.engine_concurrency is None, "unset: the engine's replicas decide"
    zero = load_settings(None, env={"STREAMLABEL_MODEL__SESSIONS": "0", "STREAMLABEL_BATCHING__ENGINE_CONCURRENCY": "0"})
    assert zero.model.sessions == 0 and zero.batching.engine_concurrency == 0  # 0 reads as the default (README)


@pytest.mark.parametrize("toml, env, expect", [
    ("[batching]\nmax_bach = 3\n", {}, "unknown key 'batching.max_bach'"),
    ("[kafak]\n", {}, "unknown section [kafak]"),
    ("", {"STREAMLABEL_BATCHING__MAX_BATCH": "many"}, "STREAMLABEL_BATCHING__MAX_BATCH: 'batching.max_batch' must be an integer"),
    ("[slo]\ntarget = 99\n", {}, "'slo.target' must be between 0 and 1"),
    ("[model]\nprovider = \"gpu\"\n", {}, "'model.provider' is 'gpu'"),
    ("[batching]\nmax_batch = 0\n", {}, "'batching.max_batch' must be positive"),
    ("[model]\nsessions = -2\n", {}, "'model.sessions' must be 0 (the default) or positive"),
    ("[kafka]\nsecurity_protocol = \"SASL_SSL\"\n", {}, "SASL needs"),
    ("not toml [", {}, "not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path, toml, env, expect):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_settings(f, env=env)
    assert expect in str(e.value)


def test_slo_goodput_percentiles_and_burn_rate():
    now = [1000.0]
    s = SloTracker(objective_ms=100, target=0.99, clock=lambda: now[0])
    for _ in range(98):
        s.record_e2e(10)
    s.record_e2e(150)
    s.record_e2e(300)
    snap = s.snapshot()
    assert snap.count == 100 and snap.good == 98 and snap.goodput == 0.98
    assert 9.9 <= snap.p50_ms <= 10.1 and 149 <= snap.p99_ms <= 151 and 299 <= snap.max_ms <= 301
    assert snap.burn_rates["1m"] == pytest.approx(2.0)  # 2% bad against a 1% budget
    now[0] += 120
    assert s.burn_rate(60) == 0.0 and s.burn_rate(300) == pytest.approx(2.0)


def test_e2e_many_equals_one_by_one():
    """Aggregating a batch's repeated latencies gives the same histogram, goodput and burn as recording each."""
    values = [3, 3, 3, 7, 120, 120, 99.5, 100, 100.001, 0, 250, 3]
    a, b = SloTracker(objective_ms=100, clock=lambda: 5.0), SloTracker(objective_ms=100, clock=lambda: 5.0)
    a.record_e2e_many(values)
    for v in values:
        b.record_e2e(v)
    sa, sb = a.snapshot(), b.snapshot()
    assert (sa.count, sa.good, sa.p50_ms, sa.p99_ms, sa.max_ms) == (sb.count, sb.good, sb.p50_ms, sb.p99_ms, sb.max_ms)
    assert sa.good == 8 and sa.burn_rates == sb.burn_rates


def test_batch_histogram_exposes_what_a_prometheus_histogram_does():
    """``observe_many`` (one numpy pass per batch) gives the exposition ``Histogram.observe`` gives per value."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest

    from pipeline.metrics import BatchHistogram

    bounds = (0.001, 0.0025, 0.005, 0.01, 0.1, 1.0)
    values_ms = [0, 1, 1, 2.5, 2.6, 5, 9.99, 10, 10.01, 99, 100, 1000, 1000.5, 7000]
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat_seconds", "doc", buckets=bounds, registry=r1)
    h2 = BatchHistogram("lat_seconds", "doc", buckets=bounds, registry=r2)
    for v in values_ms:
        h1.observe(v / 1000)
    h2.observe_many(values_ms[:5], scale=0.001)
    h2.observe_many(values_ms[5:], scale=0.001)

    def samples(r):
        return sorted(line for line in generate_latest(r).decode().splitlines()
                      if line.startswith("lat_seconds_") and "_created" not in line)

    assert samples(r2) == samples(r1)
    assert 'lat_seconds_bucket{le="0.01"} 8.0' in samples(r2)
