"""Keep-alive policies on synthetic arrivals: periodic, bursty, sparse."""

from __future__ import annotations

import random

import pytest

from scheduler.keepalive import RANGE_S, AdaptiveKeepAlive, FixedKeepAlive, HybridKeepAlive, make


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


def test_adaptive_falls_back_until_its_history_spans_ten_ttls() -> None:
    policy = AdaptiveKeepAlive()
    feed(policy, [i * 2.0 for i in range(100)])  # 99 idle times, but only 198 s of history
    assert policy.window("m", 30.0, 2.0).source == "ttl"  # gaps over 30 s have had no room to show
    assert policy.window("m", 10.0, 2.0).source == "histogram"  # 198 s covers ten 10 s TTLs


@pytest.mark.parametrize("policy", [AdaptiveKeepAlive(), HybridKeepAlive()], ids=["adaptive", "hybrid"])
def test_periodic_arrivals_unload_and_prewarm_just_before_the_next_request(policy: AdaptiveKeepAlive) -> None:
    rng = random.Random(1)
    feed(policy, [i * 300.0 + rng.uniform(-5, 5) for i in range(40)])  # every 5 min, +-5 s
    window = policy.window("m", 30.0, 2.0)
    assert window.source == "histogram"
    # Pre-warm a little before the earliest gap (~290 s, less 10 %), keep until past the latest (~310 s).
    assert 0.9 * 250 <= window.prewarm_s <= 290
    assert window.prewarm_s + window.keep_s >= 310
    assert window.prewarm_s + window.keep_s <= 310 * 1.1 * 1.1 + 1


def bursts() -> list[float]:
    times: list[float] = []
    for burst in range(6):  # bursts of 10 requests 2 s apart, an hour between bursts
        times += [burst * 3600.0 + i * 2.0 for i in range(10)]
    return times


def test_hybrid_keeps_warm_through_bursts_and_the_gaps_between() -> None:
    policy = HybridKeepAlive()
    feed(policy, bursts())
    window = policy.window("m", 30.0, 2.0)
    assert window.prewarm_s == 0.0  # the head is the in-burst gap: too short to unload
    assert window.keep_s >= 3600 - 18  # p99 is the gap between bursts


@pytest.mark.parametrize(("ttl", "keeps_the_hour"), [(30.0, False), (7200.0, True)])
def test_adaptive_weighs_an_hour_of_idle_against_one_cold_start_at_the_ttls_price(
    ttl: float, keeps_the_hour: bool
) -> None:
    policy = AdaptiveKeepAlive()
    feed(policy, bursts())
    window = policy.window("m", ttl, 2.0)
    assert window.prewarm_s == 0.0  # in-burst requests come 2 s apart: no time to unload
    assert (window.keep_s >= 3582) is keeps_the_hour
    assert window.keep_s >= 2.0  # the burst itself stays warm


def expected_cost(gaps: list[float], prewarm: float, keep: float, ttl: float, start: float) -> float:
    """Idle seconds + ttl x cold starts over ``gaps``, straight from the definition."""
    cost = 0.0
    for gap in gaps:
        if gap < prewarm or gap > prewarm + keep:
            cost += ttl
        if gap >= prewarm:
            cost += (min(gap, prewarm + keep) - prewarm) + (start if prewarm > 0 else 0.0)
    return cost


@pytest.mark.parametrize("seed", range(8))
def test_adaptive_is_never_costlier_than_the_fixed_ttl_on_its_own_history(seed: int) -> None:
    rng = random.Random(seed)
    shape = rng.choice(["exponential", "periodic", "bimodal"])
    gaps = []
    for _ in range(200):
        if shape == "exponential":
            gaps.append(rng.expovariate(1 / rng.choice([20, 120, 900])))
        elif shape == "periodic":
            gaps.append(300 + rng.uniform(-10, 10))
        else:
            gaps.append(rng.choice([rng.uniform(0.5, 3), rng.uniform(1800, 2400)]))
    policy = AdaptiveKeepAlive()
    feed(policy, [sum(gaps[:i]) for i in range(len(gaps) + 1)])
    for ttl in (10.0, 60.0, 600.0):
        window = policy.window("m", ttl, 2.0)
        ours = expected_cost(gaps, window.prewarm_s, window.keep_s, ttl, 2.0)
        fixed = expected_cost(gaps, 0.0, ttl, ttl, 2.0)
        assert ours <= fixed * 1.001, (shape, ttl, window)


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
    assert policy.describe()["m"]["source"] == "ttl"  # nothing asked for a window yet
    policy.window("m", 30.0, 2.0)
    described = policy.describe()["m"]
    assert described["idle_times"] == 11 and described["source"] == "histogram"
    with pytest.raises(ValueError, match="unknown keep-alive policy 'lru'"):
        make("lru")
