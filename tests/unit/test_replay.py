"""The parts of ``wanwu replay`` that need no gateway: model mapping, measuring, the profile."""

from __future__ import annotations

import math

import pytest

from gateway.replay import Outcome, ReplayError, assign, live_config, measured, profile_of
from scheduler.traces import ModelProfile, Trace


def outcome(
    status: int = 200, cold: bool = False, latency: float = 10.0, spawn: float = 0.0, start: str = ""
) -> Outcome:
    return Outcome("m", 0.0, status, latency, cold, spawn, 2.0, 0.0, start or ("container" if cold else "warm"))


def test_models_the_gateway_serves_keep_their_names_and_the_rest_are_spread() -> None:
    arrivals = ((0.0, "demo-shapes"), (1.0, "f1"), (2.0, "f2"), (3.0, "f3"))
    trace = Trace(arrivals, {m: ModelProfile(m, 0.0, ((50.0, 1.0),)) for _, m in arrivals}, 3.0, "t")
    mapped = assign(trace, ["x", "y"], frozenset({"demo-shapes"}))
    assert [m for _, m in mapped.arrivals] == ["demo-shapes", "x", "y", "x"]


def test_measured_counts_cold_starts_503s_and_errors() -> None:
    got = measured([outcome(cold=True, latency=2000), outcome(), outcome(503), outcome(0), outcome(502)])
    assert (got["requests"], got["cold_starts"], got["errors"]) == (5, 1, 2)
    assert got["reject_rate"] == pytest.approx(0.2) and got["p99_ms"] == 2000


def test_the_profile_comes_from_the_answers_or_the_given_spawn_time() -> None:
    profile = profile_of([outcome(cold=True, latency=1700, spawn=1600), outcome(latency=12)], stop_ms=300)
    assert profile is not None and profile.spawn_ms == 1600 and profile.infer_ms == pytest.approx(56)
    assert profile_of([outcome(latency=12)], stop_ms=300) is None  # nothing cold: no start-up time
    fallback = profile_of([outcome(latency=12)], stop_ms=300, spawn_ms=1500)
    assert fallback is not None and fallback.spawn_ms == 1500 and fallback.infer_ms == 12
    assert profile_of([outcome(503)], stop_ms=300, spawn_ms=1500) is None  # nothing served
    assert math.isnan(measured([outcome(503)])["p50_ms"])


def test_stem_starts_give_the_load_time_and_the_pool_its_own_start_times() -> None:
    answers = [outcome(cold=True, latency=300, spawn=180, start="stem"), outcome(latency=12)]
    assert profile_of(answers, stop_ms=300) is None  # no container start seen, none known
    profile = profile_of(answers, stop_ms=300, pool_starts={"container": 1900.0, "stem": 1500.0, "load": 170.0})
    assert profile is not None
    assert (profile.spawn_ms, profile.load_ms, profile.stem_spawn_ms) == (1900.0, 180.0, 1500.0)  # measured load wins
    assert measured(answers)["stem_starts"] == 1


def test_with_only_stem_starts_a_container_start_is_a_stem_cell_start_and_a_load() -> None:
    answers = [outcome(cold=True, latency=300, spawn=180, start="stem"), outcome(latency=12)]
    profile = profile_of(answers, stop_ms=300, pool_starts={"stem": 1500.0, "load": 170.0})
    assert profile is not None and profile.spawn_ms == 1500.0 + 180.0
    given = profile_of(answers, stop_ms=300, spawn_ms=2000.0, pool_starts={"container": 1900.0})
    assert given is not None and given.spawn_ms == 2000.0  # what the operator says beats the pool's last


def test_the_live_settings_become_the_pools_own_config_or_an_error_before_any_request() -> None:
    live = {"max_workers": 3, "idle_ttl_s": 20.0, "keepalive": "fixed", "queue_timeout_s": 4.0, "stem_cells": 0}
    live |= {"model_ttl_s": {"a": 7}, "batching": {"a": {"max_batch_size": 4, "max_wait_ms": 10}}}
    config, queue_timeout_s = live_config({"settings": live})
    assert (config.capacity, config.default_ttl_s, config.keepalive, config.stem_cells) == (3, 20.0, "fixed", 0)
    assert (config.model_ttl_s, config.batching, queue_timeout_s) == ({"a": 7.0}, {"a": (4, 0.01)}, 4.0)
    assert config.interactive_reserve_s == 10.0 and config.queue_max == 64  # not reported: the defaults
    with pytest.raises(ReplayError, match=r"reap_interval_s=7200\.0: must be at most 3600"):
        live_config({"settings": {**live, "reap_interval_s": 7200.0}})
