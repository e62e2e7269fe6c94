"""Keep-alive policies on synthetic arrivals: periodic, bursty, sparse."""

from __future__ import annotations

import random

import pytest

from scheduler.keepalive import RANGE_S, AdaptiveKeepAlive, FixedKeepAlive, make


def feed(policy: AdaptiveKeepAlive, times: list[float], model: str = "m") -> None:
    for t in times:
        policy.observe(model, t)


def test_fixed_is_the_ttl_and_never_prewarms() -> None:
    policy = FixedKeepAlive()
    policy.observe("m", 0.0)
    window = policy.window("m", 42.0, 2.0)
    assert (window.prewarm_s, window.keep_s, window.source) == (0.0, 42.0, "ttl")


def test_adaptive_falls_back_to_the_ttl_until_it_has_enough_history() -> None:
    policy = AdaptiveKeepAlive(min_samples=10)
    feed(policy, [i * 60.0 for i in range(10)])  # 9 idle times
    assert policy.window("m", 30.0, 2.0).source == "ttl"
    policy.observe("m", 600.0)  # the 10th
    assert policy.window("m", 30.0, 2.0).source == "histogram"
    assert policy.window("other", 30.0, 2.0).keep_s == 30.0


def test_periodic_arrivals_unload_and_prewarm_just_before_the_next_request() -> None:
    policy = AdaptiveKeepAlive()
    rng = random.Random(1)
    feed(policy, [i * 300.0 + rng.uniform(-5, 5) for i in range(40)])  # every 5 min, +-5 s
    window = policy.window("m", 30.0, 2.0)
    assert window.source == "histogram"
    # Pre-warm a little before the earliest gap (~290 s, less 10 %), keep until past the latest (~310 s).
    assert 0.9 * 250 <= window.prewarm_s <= 290
    assert window.prewarm_s + window.keep_s >= 310
    assert window.prewarm_s + window.keep_s <= 310 * 1.1 * 1.1 + 1


def test_bursty_arrivals_keep_warm_through_the_bursts() -> None:
    policy = AdaptiveKeepAlive()
    times: list[float] = []
    for burst in range(6):  # bursts of 10 requests 2 s apart, an hour between bursts
        times += [burst * 3600.0 + i * 2.0 for i in range(10)]
    feed(policy, times)
    window = policy.window("m", 30.0, 2.0)
    assert window.prewarm_s == 0.0  # the head is the in-burst gap: too short to unload
    assert window.keep_s >= 3600 - 18  # p99 is the gap between bursts


def test_a_prewarm_window_shorter_than_two_start_ups_keeps_the_worker_instead() -> None:
    policy = AdaptiveKeepAlive()
    feed(policy, [i * 20.0 for i in range(30)])
    slow_start = policy.window("m", 30.0, start_s=15.0)
    fast_start = policy.window("m", 30.0, start_s=1.0)
    assert slow_start.prewarm_s == 0.0 and fast_start.prewarm_s > 0
    assert slow_start.keep_s == pytest.approx(fast_start.prewarm_s + fast_start.keep_s)


def test_mostly_out_of_range_idle_times_fall_back_to_the_ttl() -> None:
    policy = AdaptiveKeepAlive()
    feed(policy, [i * (RANGE_S + 100) for i in range(20)])
    assert policy.window("m", 30.0, 2.0).source == "ttl"


def test_describe_and_make() -> None:
    policy = make("adaptive")
    assert isinstance(policy, AdaptiveKeepAlive)
    feed(policy, [i * 100.0 for i in range(12)])
    described = policy.describe()["m"]
    assert described["idle_times"] == 11 and described["source"] == "histogram"
    with pytest.raises(ValueError, match="unknown keep-alive policy 'lru'"):
        make("lru")
