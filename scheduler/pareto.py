"""Choosing among ``wanwu tune``'s simulated grid points: the Pareto front of cold
starts against idle GPU memory, and the point that meets an operator's :class:`Target`
most cheaply. Pure: no I/O.

The simulator replays a trace once per grid point (keep-alive policy x max workers x
TTL) and hands back one :class:`Point` each. Cost is idle GPU-memory GB-hours (what a
warm pool wastes); benefit is fewer cold starts. Lower is better for both, so the front
is the set of points that no other point beats on both, among the points that keep their
503s within the target: a point that turns requests away beyond it (:func:`rejects`) is
left off the front and never recommended. ``scheduler.tuning`` tabulates and draws the
results and re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import WanwuError

# The 503 rate a point may have and still count (on the front, as a recommendation).
MAX_REJECT_RATE = 0.01


class TuneError(WanwuError):
    """``wanwu tune`` cannot do what was asked (a missing optional dependency, a bad path)."""


@dataclass(frozen=True)
class Point:
    """One grid point's simulated outcome."""

    keepalive: str  # "fixed" | "adaptive"
    max_workers: int  # 0 means unbounded
    ttl_s: float
    requests: int
    cold_rate: float  # cold starts / requests
    reject_rate: float  # 503s / requests
    p50_ms: float  # latency of served requests including queueing and cold starts
    p99_ms: float
    idle_worker_s: float  # worker-seconds spent idle
    idle_gb_h: float  # idle GPU-memory GB-hours
    stem_cells: int = 0  # stem cells kept ready
    stem_rate: float = 0.0  # cold starts a stem cell served (loading the model only) / requests

    def to_json(self) -> dict[str, Any]:
        """The point as JSON-ready values, rounded to what the simulation can resolve."""
        return {
            "keepalive": self.keepalive,
            "max_workers": self.max_workers,
            "ttl_s": round(self.ttl_s, 1),
            "requests": self.requests,
            "cold_rate": round(self.cold_rate, 6),
            "reject_rate": round(self.reject_rate, 6),
            "p50_ms": _finite(self.p50_ms, 3),  # NaN (nothing served) is no JSON: null
            "p99_ms": _finite(self.p99_ms, 3),
            "idle_worker_s": round(self.idle_worker_s, 1),
            "idle_gb_h": round(self.idle_gb_h, 6),
            "stem_cells": self.stem_cells,
            "stem_rate": round(self.stem_rate, 6),
        }


def _finite(value: float, decimals: int) -> float | None:
    return round(value, decimals) if math.isfinite(value) else None


def _trim(value: float, decimals: int) -> str:
    """``value`` with at most ``decimals`` decimals and no trailing zeros (0.5, 500, 6.12)."""
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _pct(rate: float) -> str:
    return f"{_trim(rate * 100, 2)}%"


def _ms(value: float) -> str:
    return f"{_trim(value, 1)} ms"


def _gbh(value: float) -> str:
    return f"{_trim(value, 4)} GB-h"


@dataclass(frozen=True)
class _Limit:
    """One upper bound of a target, able to say how far a point misses it."""

    what: str
    metric: Callable[[Point], float]
    bound: float
    # Smallest denominator for the relative miss, so a limit of 0 still ranks misses.
    floor: float
    show: Callable[[float], str]

    def met(self, point: Point) -> bool:
        return self.metric(point) <= self.bound  # NaN (nothing served) never meets a limit

    def excess(self, point: Point) -> float:
        """How far past the bound the point is, relative to the bound; 0 when met."""
        value = self.metric(point)
        if math.isnan(value):
            return math.inf
        return max(0.0, value - self.bound) / max(self.bound, self.floor)

    def miss(self, point: Point) -> str:
        return f"{self.what} {self.show(self.metric(point))} > {self.show(self.bound)}"


@dataclass(frozen=True)
class Target:
    """What the operator asks for; None means no limit."""

    max_cold_rate: float | None = None
    max_p99_ms: float | None = None
    max_reject_rate: float = MAX_REJECT_RATE
    max_idle_gb_h: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_cold_rate", "max_p99_ms", "max_reject_rate", "max_idle_gb_h"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # `not >=` also rejects NaN
                raise TuneError(f"target {name}={value!r}: must be >= 0")

    @property
    def budget_only(self) -> bool:
        """An idle budget and no latency or cold-start limit: spend the budget on cold starts."""
        return self.max_idle_gb_h is not None and self.max_cold_rate is None and self.max_p99_ms is None

    def _limits(self) -> list[_Limit]:
        """Every bound a recommended point must meet; the 503 rate is always bounded."""
        limits: list[_Limit] = []
        if self.max_cold_rate is not None:
            limits.append(_Limit("cold starts", lambda p: p.cold_rate, self.max_cold_rate, 1e-3, _pct))
        if self.max_p99_ms is not None:
            limits.append(_Limit("p99", lambda p: p.p99_ms, self.max_p99_ms, 1.0, _ms))
        limits.append(_Limit("503s", lambda p: p.reject_rate, self.max_reject_rate, 1e-3, _pct))
        if self.max_idle_gb_h is not None:
            limits.append(_Limit("idle", lambda p: p.idle_gb_h, self.max_idle_gb_h, 1e-4, _gbh))
        return limits

    def describe_limits(self) -> str:
        """The bounds alone, e.g. "p99 <= 500 ms, 503s <= 1%"."""
        return ", ".join(f"{limit.what} <= {limit.show(limit.bound)}" for limit in self._limits())

    def describe(self) -> str:
        """The target in words, e.g. "p99 <= 500 ms, 503s <= 1%, cheapest idle GB-hours"."""
        goal = "fewest cold starts" if self.budget_only else "cheapest idle GB-hours"
        return f"{self.describe_limits()}, {goal}"


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` is no worse than ``b`` on cold starts and idle cost, and better on one."""
    no_worse = a.cold_rate <= b.cold_rate and a.idle_gb_h <= b.idle_gb_h
    return no_worse and (a.cold_rate < b.cold_rate or a.idle_gb_h < b.idle_gb_h)


def rejects(point: Point, max_reject_rate: float | None = MAX_REJECT_RATE) -> bool:
    """Whether ``point`` turns away more requests (503s) than ``max_reject_rate`` allows
    (None: any rate is allowed)."""
    return max_reject_rate is not None and point.reject_rate > max_reject_rate


def pareto_front(points: Sequence[Point], max_reject_rate: float | None = MAX_REJECT_RATE) -> list[Point]:
    """Points within the 503 bound that no other such point beats on both cold_rate and
    idle_gb_h.

    Lower is better for both; a point that ties on one and is strictly better on the
    other dominates, so exact duplicates both stay. Sorted by idle_gb_h ascending (then
    cold_rate). Points over ``max_reject_rate`` are left out, neither on the front nor
    able to push a point off it: a rejected request is neither a cold start nor kept
    warm for, so a point that turns requests away looks cheap on both axes precisely
    because it does not serve them. (Counting rejects as a third axis would not help: the
    cheapest rejecting point would stay on a three-axis front.) None: every point is
    eligible. Quadratic, which a grid of a few hundred points does not notice.
    """
    eligible = [p for p in points if not rejects(p, max_reject_rate)]
    front = [p for p in eligible if not any(dominates(q, p) for q in eligible)]
    return sorted(front, key=lambda p: (p.idle_gb_h, p.cold_rate))


def _workers_key(max_workers: int) -> float:
    # 0 means unbounded: more workers than any bound, so it sorts last.
    return math.inf if max_workers == 0 else max_workers


def _cheapest_key(p: Point) -> tuple[float, float, float, float, str]:
    return (p.idle_gb_h, p.cold_rate, _workers_key(p.max_workers), p.ttl_s, p.keepalive)


def _fewest_cold_key(p: Point) -> tuple[float, float, float, float, str]:
    return (p.cold_rate, p.idle_gb_h, _workers_key(p.max_workers), p.ttl_s, p.keepalive)


def label(point: Point) -> str:
    """A point's settings in words, e.g. "adaptive N=4 TTL 60 s"."""
    workers = "inf" if point.max_workers == 0 else str(point.max_workers)
    stems = f" stems {point.stem_cells}" if point.stem_cells else ""
    return f"{point.keepalive} N={workers}{stems} TTL {_trim(point.ttl_s, 1)} s"


def recommend(points: Sequence[Point], target: Target) -> tuple[Point | None, str]:
    """The cheapest point meeting every limit of ``target``, and a one-line reason.

    Cheapest: least idle_gb_h, then lowest cold_rate, then fewest workers (unbounded
    last), then shortest TTL. With an idle budget and no cold-start or p99 limit, the
    lowest cold_rate within the budget (then the same order). When nothing meets the
    target: None, and a reason naming the closest miss (the smallest sum of relative
    excesses over the missed limits), what it misses by, and where it misses the 503
    limit, what would help.
    """
    if not points:
        return None, "no grid points to choose from"
    limits = target._limits()
    meeting = [p for p in points if all(limit.met(p) for limit in limits)]
    order = _fewest_cold_key if target.budget_only else _cheapest_key
    if not meeting:
        closest = min(points, key=lambda p: (sum(limit.excess(p) for limit in limits), order(p)))
        misses = ", ".join(limit.miss(closest) for limit in limits if not limit.met(closest))
        why = _why_rejects(points) if rejects(closest, target.max_reject_rate) else ""
        return None, f"no point meets {target.describe_limits()}; closest: {label(closest)} ({misses}){why}"
    best = min(meeting, key=order)
    how = "has the fewest cold starts" if target.budget_only else "is the cheapest"
    facts = f"{_gbh(best.idle_gb_h)} idle, cold {_pct(best.cold_rate)}, p99 {_ms(best.p99_ms)}"
    count = f"{len(meeting)} of {len(points)} points"
    return best, f"{label(best)} {how} of the {count} meeting {target.describe_limits()}: {facts}"


def _why_rejects(points: Sequence[Point]) -> str:
    """Why a point turns requests away, and what to try."""
    largest = max((p.max_workers for p in points), key=_workers_key)
    more = "" if largest == 0 else f"more workers than the grid's largest N={largest} (--max-workers), "
    return (
        "; 503s are requests that waited past the queue timeout for a free worker: "
        f"try {more}a longer --queue-timeout-s, or check the profile's times"
    )
