"""The reporting half of ``wanwu tune``: choose, tabulate and draw simulated grid points.

The simulator replays a trace once per grid point (keep-alive policy x max workers x
TTL) and hands back one :class:`Point` each. This module is pure apart from
:func:`plot`: it finds the Pareto front of cold starts against idle GPU memory,
recommends the point that meets an operator's :class:`Target` most cheaply, and shapes
the results as a table, JSON, comparison lines and a PNG.

Cost is idle GPU-memory GB-hours (what a warm pool wastes); benefit is fewer cold
starts. Lower is better for both, so the front is the set of points that no other point
beats on both, among the points that keep their 503s within the target: a point that
turns requests away is marked ("rejects"), drawn hollow and grey, and never recommended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WanwuError
from .files import write_whole

if TYPE_CHECKING:  # matplotlib is optional: imported for real only inside plot()
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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


_COLUMNS = (
    "keepalive",
    "N",
    "stems",
    "TTL s",
    "cold %",
    "stem %",
    "503 %",
    "p50 ms",
    "p99 ms",
    "idle w-s",
    "idle GB-h",
    "",
)


def _table_key(p: Point) -> tuple[str, float, int, float]:
    return (p.keepalive, _workers_key(p.max_workers), p.stem_cells, p.ttl_s)


def _row(p: Point, on_front: bool, recommended: bool, rejecting: bool) -> list[str]:
    marks = (
        (["*"] if on_front else []) + (["<- recommended"] if recommended else []) + (["rejects"] if rejecting else [])
    )
    return [
        p.keepalive,
        "inf" if p.max_workers == 0 else str(p.max_workers),
        str(p.stem_cells),
        f"{p.ttl_s:g}",
        f"{p.cold_rate * 100:.2f}",
        f"{p.stem_rate * 100:.2f}",
        f"{p.reject_rate * 100:.2f}",
        f"{p.p50_ms:.1f}",
        f"{p.p99_ms:.1f}",
        f"{p.idle_worker_s:.1f}",
        f"{p.idle_gb_h:.4f}",
        " ".join(marks),
    ]


def format_table(
    points: Sequence[Point],
    front: Sequence[Point],
    recommended: Point | None,
    max_reject_rate: float | None = MAX_REJECT_RATE,
) -> str:
    """A plain-text table of every point, one per line, sorted by keepalive, N (unbounded
    last), then TTL; numbers right-aligned; "*" marks the Pareto front, "<- recommended"
    the recommended point and "rejects" a point over ``max_reject_rate``."""
    on_front = set(front)
    rows = [list(_COLUMNS)]
    rows += [
        _row(p, p in on_front, p == recommended, rejects(p, max_reject_rate)) for p in sorted(points, key=_table_key)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    last = len(_COLUMNS) - 1

    def line(row: list[str]) -> str:
        # Text columns (keepalive, mark) read left to right; numbers line up on the right.
        cells = [c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in rows)


def report_json(
    points: Sequence[Point],
    recommended: Point | None,
    target: Target,
    reason: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report as JSON-ready values: every point (in the given order) with its
    "pareto" flag and "rejects" (over the target's 503 rate), the recommended point with
    reason and target (or None), then ``extra``.

    ``extra`` (trace name, seed, ...) may not replace "points" or "recommended".
    """
    extra = dict(extra or {})
    clash = sorted({"points", "recommended"} & extra.keys())
    if clash:
        raise ValueError(f"extra report keys would replace the report's own: {', '.join(clash)}")
    on_front = set(pareto_front(points, target.max_reject_rate))
    chosen = None
    if recommended is not None:
        chosen = {**recommended.to_json(), "reason": reason, "target": target.describe()}
    return {
        "points": [
            {**p.to_json(), "pareto": p in on_front, "rejects": rejects(p, target.max_reject_rate)} for p in points
        ],
        "recommended": chosen,
        **extra,
    }


def _best_adaptive_within(fixed: Point, adaptive: Sequence[Point], max_reject_rate: float | None) -> Point | None:
    """The adaptive point with the same max_workers, no dearer than ``fixed`` and within
    the 503 target (a point that turns requests away is cheap for that reason), with the
    fewest cold starts."""
    cheap = [
        a
        for a in adaptive
        if (a.max_workers, a.stem_cells) == (fixed.max_workers, fixed.stem_cells)
        and a.idle_gb_h <= fixed.idle_gb_h
        and not rejects(a, max_reject_rate)
    ]
    return min(cheap, key=_fewest_cold_key, default=None)


def _compare_line(fixed: Point, best: Point | None) -> str:
    workers = "inf" if fixed.max_workers == 0 else str(fixed.max_workers)
    stems = f" stems {fixed.stem_cells}" if fixed.stem_cells else ""
    head = (
        f"N={workers}{stems} TTL {_trim(fixed.ttl_s, 1)} s fixed: "
        f"cold {fixed.cold_rate * 100:.1f} %, {_trim(fixed.idle_gb_h, 4)} GB-h"
    )
    if best is None:
        return f"{head}; no adaptive point is that cheap"
    return (
        f"{head}; adaptive (TTL {_trim(best.ttl_s, 1)} s) {best.cold_rate * 100:.1f} % "
        f"at {_trim(best.idle_gb_h, 4)} GB-h: {_verdict(fixed.cold_rate - best.cold_rate)}"
    )


def _verdict(fewer: float) -> str:
    """The cold-rate gain of adaptive over fixed, in percentage points to one decimal."""
    points = round(fewer * 100, 1)
    if points > 0:
        return f"{points:.1f} points fewer cold starts"
    if points < 0:
        return f"{-points:.1f} points more cold starts"
    return "same cold-start rate"


def compare_keepalive(points: Sequence[Point], max_reject_rate: float | None = MAX_REJECT_RATE) -> list[str]:
    """One line per fixed-TTL point saying how the adaptive policy does at equal or
    lower idle cost and the same max_workers: its best (fewest cold starts) such point
    and the cold-rate difference in percentage points.

    Empty when the grid has no adaptive points (nothing to compare). Fixed points come
    in table order: N (unbounded last), then TTL.
    """
    adaptive = [p for p in points if p.keepalive == "adaptive"]
    if not adaptive:
        return []
    fixed = sorted((p for p in points if p.keepalive == "fixed"), key=_table_key)
    return [_compare_line(f, _best_adaptive_within(f, adaptive, max_reject_rate)) for f in fixed]


_MARKERS = {"fixed": "s", "adaptive": "o"}
_SPARE_MARKERS = "^vD<>P*X"


def plot(
    points: Sequence[Point],
    front: Sequence[Point],
    recommended: Point | None,
    path: str | Path,
    title: str = "",
    max_reject_rate: float | None = MAX_REJECT_RATE,
) -> None:
    """Draw cold-start rate (%) against idle GPU-memory GB-hours as a PNG at ``path``.

    One marker per keepalive policy, one colour per max_workers, the Pareto front as a
    step line, the recommended point circled and annotated; points over
    ``max_reject_rate`` hollow and grey ("rejects > target"). Renders with Agg on a bare
    ``Figure`` (never pyplot), so the process's matplotlib backend is left alone. Writes
    a temporary file beside ``path`` and renames it over, so a reader never sees half a
    PNG. Raises TuneError when matplotlib is missing or the directory does not exist.
    """
    try:
        import matplotlib  # noqa: F401  # checked first: the optional dependency itself
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise TuneError("--plot needs matplotlib: pip install 'wanwu[tune]'") from exc
    path = Path(path)
    if not path.parent.is_dir():
        raise TuneError(f"cannot write plot {path}: directory {path.parent} does not exist")
    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    _draw(fig, points, front, recommended, title, max_reject_rate)
    try:
        write_whole(path, lambda partial: fig.savefig(partial, format="png", dpi=100))
    except OSError as exc:
        raise TuneError(f"cannot write plot {path}: {exc}") from exc


def _draw(
    fig: Figure,
    points: Sequence[Point],
    front: Sequence[Point],
    recommended: Point | None,
    title: str,
    max_reject_rate: float | None = MAX_REJECT_RATE,
) -> None:
    ax = fig.add_subplot()
    policies = sorted({p.keepalive for p in points})
    markers = {k: _MARKERS.get(k, _SPARE_MARKERS[i % len(_SPARE_MARKERS)]) for i, k in enumerate(policies)}
    serving = [p for p in points if not rejects(p, max_reject_rate)]
    sizes = sorted({p.max_workers for p in serving}, key=_workers_key)
    colours = {n: f"C{i % 10}" for i, n in enumerate(sizes)}
    for policy in policies:
        for n in sizes:
            group = [p for p in serving if p.keepalive == policy and p.max_workers == n]
            if group:
                ax.scatter(
                    [p.idle_gb_h for p in group],
                    [p.cold_rate * 100 for p in group],
                    marker=markers[policy],
                    color=colours[n],
                    label=f"{policy} N={'inf' if n == 0 else n}",
                    alpha=0.8,
                )
    _draw_rejecting([p for p in points if rejects(p, max_reject_rate)], ax, markers, max_reject_rate)
    if front:
        # Between two front points the best cold rate affordable is the cheaper one's.
        ordered = sorted(front, key=lambda p: (p.idle_gb_h, p.cold_rate))
        xs, ys = [p.idle_gb_h for p in ordered], [p.cold_rate * 100 for p in ordered]
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="Pareto front")
    if recommended is not None:
        xy = (recommended.idle_gb_h, recommended.cold_rate * 100)
        ax.scatter([xy[0]], [xy[1]], s=300, facecolors="none", edgecolors="red", linewidths=2)
        ax.annotate(
            f"recommended: {label(recommended)}",
            xy=xy,
            xytext=(15, 15),
            textcoords="offset points",
            color="red",
            arrowprops={"arrowstyle": "->", "color": "red"},
        )
    ax.set_xlabel("idle GPU memory (GB-hours)")
    ax.set_ylabel("cold-start rate (%)")
    ax.set_title(title or "wanwu tune: cold starts against idle GPU memory")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(loc="best", fontsize="small")


def _draw_rejecting(points: Sequence[Point], ax: Axes, markers: Mapping[str, str], bound: float | None) -> None:
    """Points over the 503 bound: hollow grey markers (their policy's shape) under one
    legend entry, so a cheap corner that only turns requests away does not read as a deal."""
    text = f"rejects > target (503s > {_pct(bound or 0.0)})"
    for i, policy in enumerate(sorted({p.keepalive for p in points})):
        group = [p for p in points if p.keepalive == policy]
        ax.scatter(
            [p.idle_gb_h for p in group],
            [p.cold_rate * 100 for p in group],
            marker=markers[policy],
            facecolors="none",
            edgecolors="grey",
            label=text if i == 0 else "_nolegend_",
        )
