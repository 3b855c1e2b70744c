"""Adaptive fetching: what the worker asks the broker to gather, by arrival rate."""

from __future__ import annotations

import inspect

from pipeline.kafka import fetch_params


def test_light_load_answers_at_once_and_long_polls_when_idle():
    assert fetch_params(0.0, 0.0, 5.0, 100) == (1, 100)
    assert fetch_params(300.0, 120.0, 5.0, 100) == (1, 100)  # 1.5 records per 5 ms: nothing to gather


def test_busy_stream_gathers_what_arrives_within_gather_ms():
    # 2,000 records/s of 150 bytes: 10 records in 5 ms → 1,500 bytes, waiting at most 5 ms
    assert fetch_params(2000.0, 150.0, 5.0, 100) == (1500, 5)
    assert fetch_params(400.0, 100.0, 5.0, 100) == (200, 5)  # exactly two records per gather window


def test_min_bytes_capped_at_one_mib():
    assert fetch_params(1e7, 10_000.0, 5.0, 100) == (1 << 20, 5)


def test_aiokafka_fetcher_still_reads_the_fields_per_request():
    """The worker sets these two attributes of aiokafka's Fetcher; if a new aiokafka renames them the
    adaptation silently stops, so this test says so."""
    from aiokafka.consumer.fetcher import Fetcher

    src = inspect.getsource(Fetcher)
    assert "self._fetch_min_bytes" in src and "self._fetch_max_wait_ms" in src


def test_gathering_is_the_floor_or_half_an_engine_call_and_never_past_a_tenth_of_the_objective():
    from pipeline.kafka import gather_ms

    assert gather_ms(20.0, 0.01, 250.0) == 20.0  # a short engine call: the floor
    assert gather_ms(20.0, 0.08, 250.0) == 25.0  # half an 80 ms call (40 ms), capped at a tenth of 250 ms
    assert gather_ms(20.0, 0.06, 1000.0) == 30.0  # half a 60 ms call
    assert gather_ms(20.0, 1.0, 5000.0) == 50.0  # a long call: at most 50 ms
    assert gather_ms(20.0, 0.0, 100.0) == 10.0  # the default 100 ms objective: 10 ms at most
