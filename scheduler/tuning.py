"""The reporting half of ``wanwu tune``: tabulate and draw simulated grid points.

The simulator replays a trace once per grid point (keep-alive policy x max workers x
TTL) and hands back one :class:`Point` each; ``scheduler.pareto`` finds the Pareto front
of cold starts against idle GPU memory and recommends the point that meets an operator's
:class:`Target` most cheaply (its names are importable from here as before). This
module is pure apart from :func:`plot`: it shapes the results as a table, JSON,
comparison lines and a PNG, where a point that turns requests away beyond the target is
marked ("rejects") and drawn hollow and grey.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import write_whole
from .pareto import (
    MAX_REJECT_RATE,
    Point,
    Target,
    TuneError,
    _fewest_cold_key,
    _pct,
    _trim,
    _workers_key,
    dominates,
    label,
    pareto_front,
    recommend,
    rejects,
)

# Choosing moved to scheduler.pareto; its public names are importable from here as before.
__all__ = [
    "MAX_REJECT_RATE",
    "Point",
    "Target",
    "TuneError",
    "compare_keepalive",
    "dominates",
    "format_table",
    "label",
    "pareto_front",
    "plot",
    "recommend",
    "rejects",
    "report_json",
]

if TYPE_CHECKING:  # matplotlib is optional: imported for real only inside plot()
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
