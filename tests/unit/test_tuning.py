"""The reporting half of `wanwu tune`, on small hand-built grids with hand-computed answers."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from scheduler.errors import WanwuError
from scheduler.tuning import (
    Point,
    Target,
    TuneError,
    compare_keepalive,
    format_table,
    pareto_front,
    plot,
    recommend,
    rejects,
    report_json,
)


def pt(
    keepalive: str = "fixed",
    n: int = 4,
    ttl: float = 60,
    cold: float = 0.1,
    reject: float = 0.0,
    p50: float = 100.0,
    p99: float = 400.0,
    idle_s: float = 100.0,
    gbh: float = 0.5,
    requests: int = 1000,
) -> Point:
    return Point(keepalive, n, ttl, requests, cold, reject, p50, p99, idle_s, gbh)


# --- pareto_front ---------------------------------------------------------------------


def test_front_drops_points_beaten_on_both_axes_and_sorts_by_idle_cost() -> None:
    a = pt(ttl=60, cold=0.1, gbh=0.5)
    b = pt(ttl=90, cold=0.2, gbh=0.6)  # worse than a on both
    c = pt(ttl=300, cold=0.05, gbh=0.9)  # fewest cold starts
    d = pt(ttl=10, cold=0.3, gbh=0.2)  # cheapest
    assert pareto_front([a, b, c, d]) == [d, a, c]
    assert pareto_front([c, b, d, a]) == [d, a, c]


def test_a_tie_on_one_axis_and_a_win_on_the_other_dominates() -> None:
    a = pt(ttl=60, cold=0.1, gbh=0.5)
    same_cold_dearer = pt(ttl=70, cold=0.1, gbh=0.7)
    same_cost_colder = pt(ttl=80, cold=0.15, gbh=0.5)
    assert pareto_front([same_cold_dearer, a, same_cost_colder]) == [a]


def test_exact_ties_on_both_axes_both_stay() -> None:
    a = pt("fixed", ttl=60, cold=0.1, gbh=0.5)
    twin = pt("adaptive", ttl=30, cold=0.1, gbh=0.5)
    assert set(pareto_front([a, twin])) == {a, twin}


def test_points_over_the_503_bound_are_neither_on_the_front_nor_push_others_off_it() -> None:
    cheap_but_rejecting = pt(n=1, ttl=0, cold=0.4, reject=0.9, gbh=0.0)
    better_but_rejecting = pt(n=2, ttl=30, cold=0.05, reject=0.02, gbh=0.4)  # beats a on both axes
    a = pt(cold=0.1, gbh=0.5)
    points = [a, cheap_but_rejecting, better_but_rejecting]
    assert pareto_front(points) == [a]  # the bound is 1 % unless told
    assert pareto_front(points, max_reject_rate=0.05) == [better_but_rejecting]
    assert pareto_front(points, max_reject_rate=None) == [cheap_but_rejecting, better_but_rejecting]
    assert [rejects(p) for p in points] == [False, True, True]
    assert not rejects(pt(reject=0.01))  # at the bound is within it


def test_when_every_point_rejects_there_is_no_front() -> None:
    assert pareto_front([pt(reject=0.5), pt(ttl=10, reject=0.2, gbh=0.1)]) == []


def test_front_of_nothing_is_empty() -> None:
    assert pareto_front([]) == []


# --- Target and recommend -------------------------------------------------------------

P1 = pt("fixed", n=2, ttl=0, cold=0.9, p99=2000, gbh=0.0)
P2 = pt("fixed", n=2, ttl=30, cold=0.4, p99=900, gbh=0.2)
P3 = pt("fixed", n=2, ttl=120, cold=0.1, p99=450, gbh=0.6)
P4 = pt("adaptive", n=2, ttl=60, cold=0.15, p99=480, gbh=0.4)
P5 = pt("fixed", n=1, ttl=120, cold=0.05, reject=0.05, p99=300, gbh=0.3)  # too many 503s
GRID = [P1, P2, P3, P4, P5]


def test_describe_says_the_limits_then_the_goal() -> None:
    assert Target(max_p99_ms=500).describe() == "p99 <= 500 ms, 503s <= 1%, cheapest idle GB-hours"
    assert (
        Target(max_cold_rate=0.05, max_reject_rate=0.005).describe()
        == "cold starts <= 5%, 503s <= 0.5%, cheapest idle GB-hours"
    )
    assert Target(max_idle_gb_h=0.5).describe() == "503s <= 1%, idle <= 0.5 GB-h, fewest cold starts"


def test_a_negative_limit_is_refused_by_name() -> None:
    with pytest.raises(TuneError, match="max_p99_ms"):
        Target(max_p99_ms=-1)
    assert issubclass(TuneError, WanwuError)


def test_no_limit_but_the_503_rate_picks_the_cheapest_point() -> None:
    point, reason = recommend(GRID, Target())
    assert point == P1
    assert "fixed N=2 TTL 0 s" in reason


def test_a_p99_limit_picks_the_cheapest_point_meeting_it() -> None:
    # P3 and P4 meet p99 <= 500 ms; P5 does too but rejects 5 %.
    point, reason = recommend(GRID, Target(max_p99_ms=500))
    assert point == P4
    assert reason.startswith("adaptive N=2 TTL 60 s is the cheapest of the 2 of 5 points meeting ")
    assert "p99 <= 500 ms, 503s <= 1%" in reason
    assert "\n" not in reason


def test_a_cold_rate_limit_picks_the_cheapest_point_meeting_it() -> None:
    assert recommend(GRID, Target(max_cold_rate=0.12))[0] == P3
    assert recommend(GRID, Target(max_cold_rate=0.2, max_p99_ms=500))[0] == P4


def test_a_looser_503_limit_lets_a_rejecting_point_in() -> None:
    assert recommend(GRID, Target(max_cold_rate=0.06, max_reject_rate=0.1))[0] == P5


def test_an_idle_budget_alone_buys_the_fewest_cold_starts_within_it() -> None:
    # Within 0.5 GB-h and 1 % 503s: P1 (90 %), P2 (40 %), P4 (15 %).
    point, reason = recommend(GRID, Target(max_idle_gb_h=0.5))
    assert point == P4
    assert "fewest cold starts" in reason


def test_an_idle_budget_with_another_limit_is_just_one_more_limit() -> None:
    # p99 <= 1000 ms within 0.5 GB-h: P2 (0.2 GB-h) and P4 (0.4 GB-h); cheapest wins.
    assert recommend(GRID, Target(max_idle_gb_h=0.5, max_p99_ms=1000))[0] == P2


def test_ties_on_cost_and_cold_rate_go_to_fewer_workers_then_shorter_ttl() -> None:
    unbounded = pt(n=0, ttl=10, cold=0.2, gbh=0.1)
    eight_long = pt(n=8, ttl=30, cold=0.2, gbh=0.1)
    eight_short = pt(n=8, ttl=10, cold=0.2, gbh=0.1)
    colder = pt(n=16, ttl=99, cold=0.19, gbh=0.1)
    assert recommend([unbounded, eight_long, eight_short], Target())[0] == eight_short
    assert recommend([unbounded, eight_long], Target())[0] == eight_long
    assert recommend([unbounded, eight_long, colder], Target())[0] == colder


def test_a_point_that_served_nothing_meets_no_latency_limit() -> None:
    served_nothing = pt(p99=math.nan, gbh=0.0)
    assert recommend([served_nothing, P4], Target(max_p99_ms=500))[0] == P4


def test_nothing_meets_names_the_closest_miss_and_why_it_rejects() -> None:
    # Relative misses of cold <= 1 %: P3 9x, P4 14x, P2 39x, P1 89x; P5 4x on cold
    # plus 4x on 503s = 8x, the closest.
    point, reason = recommend(GRID, Target(max_cold_rate=0.01))
    assert point is None
    assert reason == (
        "no point meets cold starts <= 1%, 503s <= 1%; "
        "closest: fixed N=1 TTL 120 s (cold starts 5% > 1%, 503s 5% > 1%); "
        "503s are requests that waited past the queue timeout for a free worker: "
        "try more workers than the grid's largest N=2 (--max-workers), a longer --queue-timeout-s, "
        "or check the profile's times"
    )


def test_when_every_point_rejects_the_closest_is_the_fewest_503s_and_never_a_pick() -> None:
    many = pt(n=8, ttl=600, cold=0.01, reject=0.12, gbh=60)
    more = pt(n=1, ttl=10, cold=0.0, reject=0.97, gbh=0.01)  # cheapest, fewest cold starts: by serving nothing
    point, reason = recommend([more, many], Target())
    assert point is None
    assert "closest: fixed N=8 TTL 600 s (503s 12% > 1%)" in reason
    assert "largest N=8" in reason
    unbounded = pt(n=0, ttl=600, cold=0.01, reject=0.05, gbh=90)
    assert "more workers" not in recommend([unbounded, many], Target())[1]  # N unbounded already


def test_nothing_to_choose_from() -> None:
    point, reason = recommend([], Target())
    assert point is None
    assert "no grid points" in reason


# --- format_table ---------------------------------------------------------------------

R1 = pt("fixed", n=0, ttl=30, cold=0.25, p50=12.5, p99=950, idle_s=10, gbh=0.0125)
R2 = pt("fixed", n=2, ttl=30, cold=0.3, reject=0.02, p50=15, p99=1200, idle_s=20, gbh=0.01)
R3 = pt("adaptive", n=2, ttl=60, cold=0.1, p50=8, p99=400, idle_s=3600, gbh=0.5)
R4 = pt("fixed", n=2, ttl=60, cold=0.3, p50=15, p99=1000, idle_s=40, gbh=0.02)  # beaten by R2


def test_table_sorts_by_policy_then_workers_unbounded_last_then_ttl_and_marks_front_pick_and_rejects() -> None:
    front = pareto_front([R1, R2, R3, R4])
    assert set(front) == {R1, R3}  # R2 rejects 2 % (over the 1 % bound); R4 costs more than R1
    expected = "\n".join(
        [
            "keepalive    N  stems  TTL s  cold %  stem %  503 %  p50 ms  p99 ms  idle w-s  idle GB-h",
            "adaptive     2      0     60   10.00    0.00   0.00     8.0   400.0    3600.0     0.5000  *",
            "fixed        2      0     30   30.00    0.00   2.00    15.0  1200.0      20.0     0.0100  rejects",
            "fixed        2      0     60   30.00    0.00   0.00    15.0  1000.0      40.0     0.0200",
            "fixed      inf      0     30   25.00    0.00   0.00    12.5   950.0      10.0     0.0125  * <- recommended",  # noqa: E501
        ]
    )
    assert format_table([R1, R4, R2, R3], front, R1) == expected
    assert "rejects" not in format_table([R1, R4, R2, R3], front, R1, max_reject_rate=0.05)


def test_table_marks_a_recommended_point_off_the_front_and_shows_fractional_ttl() -> None:
    half = pt(n=1, ttl=2.5, cold=0.5, gbh=0.9)
    table = format_table([R4, half], [R4], half)
    rows = table.splitlines()
    assert rows[1].split()[:4] == ["fixed", "1", "0", "2.5"]
    assert rows[1].endswith("0.9000  <- recommended")
    assert rows[2].endswith("0.0200  *")
    assert "recommended" not in format_table([R4], [R4], None)


def test_table_of_nothing_is_the_header() -> None:
    assert format_table([], [], None).splitlines() == [
        "keepalive  N  stems  TTL s  cold %  stem %  503 %  p50 ms  p99 ms  idle w-s  idle GB-h"
    ]


# --- JSON -----------------------------------------------------------------------------

POINT_KEYS = {
    "keepalive",
    "max_workers",
    "ttl_s",
    "requests",
    "cold_rate",
    "reject_rate",
    "p50_ms",
    "p99_ms",
    "idle_worker_s",
    "idle_gb_h",
    "stem_cells",
    "stem_rate",
}


def test_point_json_has_exactly_its_keys_rounded() -> None:
    point = Point("adaptive", 0, 30.04, 1234, 0.12345678, 0.0000004, 12.34567, 987.65432, 123.456, 0.1234567)
    assert point.to_json() == {
        "keepalive": "adaptive",
        "max_workers": 0,
        "ttl_s": 30.0,
        "requests": 1234,
        "cold_rate": 0.123457,
        "reject_rate": 0.0,
        "p50_ms": 12.346,
        "p99_ms": 987.654,
        "idle_worker_s": 123.5,
        "idle_gb_h": 0.123457,
        "stem_cells": 0,
        "stem_rate": 0.0,
    }


def test_report_flags_the_front_and_carries_the_pick_with_reason_and_target() -> None:
    target = Target(max_p99_ms=500)
    report = report_json([R1, R4, R3], R3, target, "because", {"trace": "day.jsonl", "seed": 7})
    assert set(report) == {"points", "recommended", "trace", "seed"}
    assert [row["pareto"] for row in report["points"]] == [True, False, True]
    assert all(set(row) == POINT_KEYS | {"pareto", "rejects"} for row in report["points"])
    assert report["points"][0]["max_workers"] == 0
    assert set(report["recommended"]) == POINT_KEYS | {"reason", "target"}
    assert report["recommended"]["keepalive"] == "adaptive"
    assert report["recommended"]["reason"] == "because"
    assert report["recommended"]["target"] == "p99 <= 500 ms, 503s <= 1%, cheapest idle GB-hours"
    assert (report["trace"], report["seed"]) == ("day.jsonl", 7)
    json.dumps(report, allow_nan=False)


def test_report_flags_rejecting_points_by_the_targets_bound_and_keeps_them_off_the_front() -> None:
    report = report_json([R1, R2], None, Target(), "nothing")
    assert [(row["pareto"], row["rejects"]) for row in report["points"]] == [(True, False), (False, True)]
    loose = report_json([R1, R2], None, Target(max_reject_rate=0.05), "nothing")
    assert [(row["pareto"], row["rejects"]) for row in loose["points"]] == [(True, False), (True, False)]


def test_report_without_a_pick_says_null() -> None:
    report = report_json([R1], None, Target(), "nothing")
    assert report == {"points": [{**R1.to_json(), "pareto": True, "rejects": False}], "recommended": None}
    assert '"recommended": null' in json.dumps(report)


def test_extra_may_not_replace_the_report() -> None:
    with pytest.raises(ValueError, match="points"):
        report_json([R1], None, Target(), "", {"points": []})


# --- compare_keepalive ----------------------------------------------------------------


def test_each_fixed_ttl_against_the_best_adaptive_point_no_dearer_with_the_same_workers() -> None:
    points = [
        pt("fixed", n=4, ttl=60, cold=0.123, gbh=0.41),
        pt("fixed", n=4, ttl=10, cold=0.3, gbh=0.05),
        pt("fixed", n=2, ttl=60, cold=0.2, gbh=0.3),
        pt("adaptive", n=4, ttl=60, cold=0.081, gbh=0.39),
        pt("adaptive", n=4, ttl=120, cold=0.05, gbh=0.8),  # fewer cold starts, but dearer
        pt("adaptive", n=4, ttl=30, cold=0.1, gbh=0.2),  # cheap enough, more cold starts
        pt("adaptive", n=2, ttl=60, cold=0.25, gbh=0.25),
        pt("adaptive", n=2, ttl=5, cold=0.4, gbh=0.01),  # cheap, but N=2: not for the N=4 rows
    ]
    assert compare_keepalive(points) == [
        "N=2 TTL 60 s fixed: cold 20.0 %, 0.3 GB-h; adaptive (TTL 60 s) 25.0 % at 0.25 GB-h: "
        "5.0 points more cold starts",
        "N=4 TTL 10 s fixed: cold 30.0 %, 0.05 GB-h; no adaptive point is that cheap",
        "N=4 TTL 60 s fixed: cold 12.3 %, 0.41 GB-h; adaptive (TTL 60 s) 8.1 % at 0.39 GB-h: "
        "4.2 points fewer cold starts",
    ]


def test_equal_idle_cost_counts_and_unbounded_reads_inf() -> None:
    points = [pt("fixed", n=0, ttl=30, cold=0.2, gbh=0.5), pt("adaptive", n=0, ttl=45, cold=0.2, gbh=0.5)]
    assert compare_keepalive(points) == [
        "N=inf TTL 30 s fixed: cold 20.0 %, 0.5 GB-h; adaptive (TTL 45 s) 20.0 % at 0.5 GB-h: same cold-start rate"
    ]


def test_compare_lines_name_the_stem_cells_so_two_rows_of_one_n_and_ttl_differ() -> None:
    from dataclasses import replace

    fixed, adaptive = pt("fixed", n=2, ttl=60, cold=0.2, gbh=0.3), pt("adaptive", n=2, ttl=60, cold=0.1, gbh=0.3)
    lines = compare_keepalive([fixed, adaptive, replace(fixed, stem_cells=1), replace(adaptive, stem_cells=1)])
    assert [line.split(" fixed:")[0] for line in lines] == ["N=2 TTL 60 s", "N=2 stems 1 TTL 60 s"]


def test_nothing_to_compare_without_both_policies() -> None:
    assert compare_keepalive([pt("fixed")]) == []
    assert compare_keepalive([pt("adaptive")]) == []


# --- plot -----------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _interactive_backends() -> set[str]:
    try:
        from matplotlib.backends import BackendFilter, backend_registry
    except ImportError:  # matplotlib < 3.9
        from matplotlib import rcsetup

        return {name.lower() for name in rcsetup.interactive_bk}
    return {name.lower() for name in backend_registry.list_builtin(BackendFilter.INTERACTIVE)}


def test_plot_writes_a_png_and_leaves_matplotlib_alone(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    points = [R1, R2, R3, R4, pt("adaptive", n=0, ttl=30, cold=0.2, gbh=0.3)]
    front = pareto_front(points)
    out = tmp_path / "tune.png"

    plot(points, front, R3, out, title="day trace")

    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 0
    width, height = struct.unpack(">II", data[16:24])  # IHDR: 9 x 6 inches at 100 dpi
    assert (width, height) == (900, 600)
    assert [p.name for p in tmp_path.iterdir()] == ["tune.png"]  # no temporary file left
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # drew without pyplot
    assert not matplotlib.is_interactive()
    assert matplotlib.get_backend().lower() not in _interactive_backends()


def test_plot_draws_rejecting_points_hollow_grey_and_off_the_front_line() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

    from scheduler.tuning import _draw

    cheap_rejecting = pt("adaptive", n=1, ttl=10, cold=0.05, reject=0.3, gbh=0.001)
    points = [R1, R2, R3, R4, cheap_rejecting]
    front = pareto_front(points)
    fig = Figure()
    _draw(fig, points, front, R1, "t")
    ax = fig.axes[0]
    drawn = [c for c in ax.collections if isinstance(c, PathCollection)]
    hollow = [c for c in drawn if not len(c.get_facecolors())]  # the rejecting points and the pick's red ring

    def xy(collections: list[PathCollection]) -> set[tuple[float, float]]:
        return {(round(x, 6), round(y, 6)) for c in collections for x, y in c.get_offsets().tolist()}

    grey = [c for c in hollow if tuple(c.get_edgecolors()[0][:3]) == pytest.approx((0.5, 0.5, 0.5), abs=0.01)]
    rejected = xy(grey)
    assert rejected == {(R2.idle_gb_h, 30.0), (cheap_rejecting.idle_gb_h, 5.0)}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend.count("rejects > target (503s > 1%)") == 1 and "Pareto front" in legend
    filled = xy([c for c in drawn if len(c.get_facecolors())])
    assert filled == {(p.idle_gb_h, round(p.cold_rate * 100, 6)) for p in (R1, R3, R4)}  # each point once, in its kind
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
    assert set(line.get_xdata()) == {R1.idle_gb_h, R3.idle_gb_h}  # the front passes no rejecting point


def test_plot_without_a_pick_or_points_still_draws(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot([R1, R2], [], None, str(tmp_path / "a.png"))
    plot([], [], None, tmp_path / "empty.png")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_replaces_an_existing_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "tune.png"
    out.write_bytes(b"old")
    plot([R1], [R1], R1, out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_into_a_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TuneError, match="nope"):
        plot([R1], [R1], None, missing / "tune.png")
    assert not missing.exists()


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(TuneError, match=r"--plot needs matplotlib: pip install 'wanwu\[tune\]'"):
        plot([R1], [R1], None, tmp_path / "tune.png")
    assert not (tmp_path / "tune.png").exists()


def test_an_adaptive_point_that_rejects_is_no_comparison() -> None:
    from dataclasses import replace

    fixed = pt("fixed", n=1, ttl=60, cold=0.5, gbh=10)
    turned_away = replace(pt("adaptive", n=1, ttl=60, cold=0.3, gbh=5), reject_rate=0.068)
    assert compare_keepalive([fixed, turned_away]) == [
        "N=1 TTL 60 s fixed: cold 50.0 %, 10 GB-h; no adaptive point is that cheap"
    ]
    assert "fewer cold starts" in compare_keepalive([fixed, turned_away], max_reject_rate=None)[0]
