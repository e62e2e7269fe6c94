"""The synthetic many-model traces of ``tests/bench/scale.py``."""

from __future__ import annotations

import pytest

from scheduler.traces import ModelProfile, Trace
from tests.bench.scale import JITTER_S, SPEED, replicated, scale_speed


def sample() -> Trace:
    """Three models over 100 s: a arrives every second, b every 10 s, c once at 95 s."""
    arrivals = sorted(
        [(float(t), "a") for t in range(100)] + [(float(t), "b") for t in range(0, 100, 10)] + [(95.0, "c")]
    )
    profiles = {name: ModelProfile(name, 100.0, ((0.0, 10.0), (100.0, 20.0))) for name in "abc"}
    return Trace(tuple(arrivals), profiles, 100.0, "unit")


def test_one_copy_is_the_trace_with_its_arrivals_jittered() -> None:
    trace = sample()
    one = replicated(trace, 1)
    assert one.span_s == 100.0 and sorted(one.models()) == ["a", "b", "c"]
    assert len(one.arrivals) == len(trace.arrivals)
    moved = [
        abs(x[0] - y[0])
        for x, y in zip(
            sorted(one.arrivals, key=lambda a: (a[1], a[0])),
            sorted(trace.arrivals, key=lambda a: (a[1], a[0])),
            strict=True,
        )
    ]
    assert max(moved) <= JITTER_S and any(m > 0 for m in moved)


def test_copies_are_the_spans_windows_side_by_side_under_new_names_thinned_and_with_scaled_durations() -> None:
    trace = sample()
    ten = replicated(trace, 10, seed=3)
    assert ten.span_s == 10.0  # ten windows of 10 s, played at once
    # Every function of every copy arrives: c, once at 95 s, in the last window and once in each other.
    assert set(ten.models()) == {f"{name}~{k}" for name in "abc" for k in range(10)}
    per_copy = {k: sum(1 for _, name in ten.arrivals if name == f"a~{k}") for k in range(10)}
    assert set(per_copy.values()) == {10}  # a keeps its own rate: one a second in every window
    assert sum(1 for _, name in ten.arrivals if name.startswith("b~")) == 10
    assert all(0.0 <= t <= 10.0 for t, _ in ten.arrivals) and list(ten.arrivals) == sorted(ten.arrivals)
    c9 = [t for t, name in ten.arrivals if name == "c~9"]
    assert len(c9) == 1 and abs(c9[0] - 5.0) <= JITTER_S  # its own arrival, moved to its window's start
    factors = {round(ten.profiles[f"a~{k}"].duration_ms[0][1] / 10.0, 6) for k in range(10)}
    assert len(factors) > 1 and all(SPEED[0] <= f <= SPEED[1] for f in factors)
    assert replicated(trace, 10, seed=3) == ten  # seeded: the same trace every run
    thinned = replicated(trace, 2, thin=5)
    assert thinned.span_s == 50.0 and sum(1 for _, name in thinned.arrivals if name.startswith("a~")) == 20
    with pytest.raises(ValueError, match="copies is 0"):
        replicated(trace, 0)


def test_scale_speed_reports_a_rate_per_scale_and_their_ratio() -> None:
    result = scale_speed(sample(), scales=(1, 5))
    assert [row["models"] for row in result["rows"]] == [3, 15]
    assert [row["requests"] for row in result["rows"]] == [111, 100 + 10 + 5]  # a and b at their rate, c once each
    assert all(row["events"] >= 2 * row["requests"] and row["peak_workers"] >= 1 for row in result["rows"])
    assert all(row["requests_per_s"] > 0 for row in result["rows"])
    rates = [row["requests_per_s"] for row in result["rows"]]
    assert result["largest_over_smallest"] == round(rates[1] / rates[0], 2)
