"""Trace loading: Azure Functions 2019 directories and gateway access logs, with small
synthetic files; plus the real 50-function sample, checked against its own CSV sums."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from scheduler.errors import WanwuError
from scheduler.traces import ModelProfile, Trace, TraceError, load_trace

# The 50-function Azure sample kept in the repository (credit and licence in its README.md).
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure2019-sample50"
PCTS = (0.0, 1.0, 25.0, 50.0, 75.0, 99.0, 100.0)
RUN_HEADER = [
    "HashFunction", "HashApp", "HashOwner", "Count", "Average", "Minimum", "Maximum",
    *(f"percentile_Average_{p}" for p in (0, 1, 25, 50, 75, 99, 100)),
]  # fmt: skip
MEM_HEADER = ["HashApp", "HashOwner", "SampleCount", "AverageAllocatedMb", "AverageAllocatedMb_pct50"]


def fn(prefix: str) -> str:
    """A 64-character hash starting with ``prefix``."""
    return prefix.ljust(64, "0")


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)
    return path


def write_inv(directory: Path, rows: list[tuple[str, str, list[Any]]]) -> Path:
    """inv.csv with as many minute columns as the first row has counts."""
    directory.mkdir(exist_ok=True)
    minutes = len(rows[0][2])
    header = ["HashFunction", "HashApp", "HashOwner", *(f"minute_{m}" for m in range(1, minutes + 1))]
    write_csv(directory / "inv.csv", header, [[h, app, "owner", *counts] for h, app, counts in rows])
    return directory


def write_run(directory: Path, rows: list[tuple[str, float, list[Any]]]) -> None:
    """run.csv rows: (function hash, Average, the 7 percentile values)."""
    write_csv(directory / "run.csv", RUN_HEADER, [[h, "app", "o", 1, avg, 0, 0, *pcts] for h, avg, pcts in rows])


def write_mem(directory: Path, rows: list[tuple[str, Any]]) -> None:
    write_csv(directory / "mem.csv", MEM_HEADER, [[app, "o", 1, mb, mb] for app, mb in rows])


def per_minute(trace: Trace) -> Counter[tuple[str, int]]:
    return Counter((name, int(t // 60)) for t, name in trace.arrivals)


def expected_per_minute(counts: dict[str, list[int]]) -> Counter[tuple[str, int]]:
    return Counter({(name, m): n for name, row in counts.items() for m, n in enumerate(row) if n})


# --- Azure: arrivals ------------------------------------------------------------------


def test_each_invocation_lands_in_its_minute(tmp_path: Path) -> None:
    counts = {"fn-aaaaaaaa": [2, 0, 3, 1], "fn-bbbbbbbb": [0, 5, 0, 1]}
    d = write_inv(tmp_path / "t", [(fn("aaaaaaaa"), "app1", [2, 0, 3, 1]), (fn("bbbbbbbb"), "app2", [0, 5, 0, 1])])
    trace = load_trace(d)
    assert per_minute(trace) == expected_per_minute(counts)
    times = [t for t, _ in trace.arrivals]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 240
    assert trace.span_s == 240.0
    assert trace.models() == ["fn-aaaaaaaa", "fn-bbbbbbbb"]  # a arrives in minute 0, b not before minute 1
    assert set(trace.profiles) == {"fn-aaaaaaaa", "fn-bbbbbbbb"}
    assert trace.source == str(d)


def test_draws_follow_the_seeded_stream_in_file_order(tmp_path: Path) -> None:
    # a: 1 in minute 0; b: 1 in minute 0 and 1 in minute 1. Draw order: a0, b0, b1.
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1, 0]), (fn("bb"), "x", [1, 1])])
    rng = random.Random(7)
    u = [rng.random() for _ in range(3)]
    expected = sorted([(60 * u[0], "fn-aa000000"), (60 * u[1], "fn-bb000000"), (60 + 60 * u[2], "fn-bb000000")])
    assert list(load_trace(d, seed=7).arrivals) == expected


def test_same_seed_same_trace_other_seed_other_times(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [5, 7, 0, 3])])
    assert load_trace(d, seed=3).arrivals == load_trace(d, seed=3).arrivals
    assert load_trace(d, seed=3).arrivals != load_trace(d, seed=4).arrivals


def test_duplicate_rows_add_up(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1, 0, 2]), (fn("cc"), "x", [0, 1, 0]), (fn("aa"), "x", [0, 2, 1])])
    trace = load_trace(d)
    assert per_minute(trace) == expected_per_minute({"fn-aa000000": [1, 2, 3], "fn-cc000000": [0, 1, 0]})
    assert sorted(trace.profiles) == ["fn-aa000000", "fn-cc000000"]


def test_names_take_more_characters_only_where_they_collide(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("abcdef012"), "x", [1]), (fn("abcdef013"), "x", [1]), (fn("ff"), "x", [1])])
    assert sorted(load_trace(d).profiles) == ["fn-abcdef012", "fn-abcdef013", "fn-ff000000"]


def test_the_minute_columns_set_the_span(tmp_path: Path) -> None:
    assert load_trace(write_inv(tmp_path / "three", [(fn("aa"), "x", [1, 1, 1])])).span_s == 180.0
    longer = load_trace(write_inv(tmp_path / "long", [(fn("aa"), "x", [0] * 1999 + [4])]))
    assert longer.span_s == 2000 * 60.0
    assert per_minute(longer) == Counter({("fn-aa000000", 1999): 4})


def test_max_per_day_uses_the_days_the_file_covers(tmp_path: Path) -> None:
    # 720 minutes = half a day: a's 6 invocations are 12 a day, b's 5 are 10 a day.
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [6] + [0] * 719), (fn("bb"), "x", [0] * 719 + [5])])
    assert load_trace(d, max_per_day=11).models() == ["fn-bb000000"]
    assert set(load_trace(d, max_per_day=11).profiles) == {"fn-bb000000"}
    assert load_trace(d, max_per_day=12).models() == ["fn-aa000000", "fn-bb000000"]
    assert load_trace(d, max_per_day=9.9).arrivals == ()


def test_filters_do_not_shift_the_random_stream(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [9, 9, 9, 9]), (fn("bb"), "x", [1, 0, 1, 1])])
    full = load_trace(d, seed=5)
    only_b = load_trace(d, seed=5, max_per_day=2000)  # b: 3 in 4 minutes = 1080 a day; a: 12960 a day
    assert only_b.arrivals == tuple(a for a in full.arrivals if a[1] == "fn-bb000000")


def test_minutes_keep_a_rebased_window(tmp_path: Path) -> None:
    counts = [2, 3, 4, 5]
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", counts)])
    part = load_trace(d, minutes=(1, 3), seed=2)
    assert per_minute(part) == Counter({("fn-aa000000", 0): 3, ("fn-aa000000", 1): 4})
    assert part.span_s == 120.0
    full = load_trace(d, seed=2)
    assert part.arrivals == full.window(60, 180).arrivals
    assert [t + 60 for t, _ in part.arrivals] == pytest.approx([t for t, _ in full.arrivals[2:9]])


@pytest.mark.parametrize("minutes", [(2, 2), (3, 1), (-1, 2), (0, 5)])
def test_minutes_out_of_range(tmp_path: Path, minutes: tuple[int, int]) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1, 1, 1, 1])])
    with pytest.raises(TraceError, match=r"minutes=.*<= 4") as e:
        load_trace(d, minutes=minutes)
    assert str(d) in str(e.value)


# --- Azure: profiles ------------------------------------------------------------------


def test_profiles_from_run_and_mem(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "app-a", [1]), (fn("bb"), "app-b", [1]), (fn("cc"), "app-c", [1])])
    write_run(
        d,
        [
            (fn("aa"), 100, [10, 11, 20, 30, 40, 90, 100]),
            (fn("cc"), 300, [5, 5, 5, 5, 5, 5, 5]),
            (fn("dd"), 250, [1, 2, 3, 4, 5, 6, 7]),  # not invoked: counts only towards the median
        ],
    )
    write_mem(d, [("app-a", 512), ("app-c", 100), ("app-z", 300), ("app-y", 1000)])
    profiles = load_trace(d).profiles
    a, b, c = profiles["fn-aa000000"], profiles["fn-bb000000"], profiles["fn-cc000000"]
    points = ((0.0, 10.0), (1.0, 11.0), (25.0, 20.0), (50.0, 30.0), (75.0, 40.0), (99.0, 90.0), (100.0, 100.0))
    assert a == ModelProfile("fn-aa000000", 512.0, points)
    assert b.duration_ms == ((50.0, 250.0),)  # median of the Averages 100, 300, 250
    assert b.memory_mb == 406.0  # median of the apps' 512, 100, 300, 1000
    assert c.memory_mb == 100.0 and c.sample_ms(0.3) == 5.0


def test_a_percentile_dip_is_flattened(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1])])
    write_run(d, [(fn("aa"), 20, [10, 11, 20, 19, 40, 90, 100])])
    assert [ms for _, ms in load_trace(d).profiles["fn-aa000000"].duration_ms] == [10, 11, 20, 20, 40, 90, 100]


def test_missing_run_and_mem_warn_and_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1])])
    with caplog.at_level(logging.WARNING, logger="scheduler.traces"):
        profile = load_trace(d).profiles["fn-aa000000"]
    assert profile.duration_ms == ((50.0, 0.0),) and profile.memory_mb == 0.0
    assert "run.csv" in caplog.text and "mem.csv" in caplog.text


# --- Azure: errors --------------------------------------------------------------------


def test_a_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"no such file or directory.*inv\.csv.*JSON-lines") as e:
        load_trace(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_a_directory_without_inv_csv(tmp_path: Path) -> None:
    write_mem(tmp_path, [("x", 1)])
    with pytest.raises(TraceError, match=r"no inv\.csv") as e:
        load_trace(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert isinstance(e.value, WanwuError)


INV2 = ["HashFunction", "HashApp", "minute_1", "minute_2"]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["HashApp", "minute_1"], [["x", "1"]], r"inv\.csv: missing column\(s\) HashFunction"),
        (["HashFunction", "HashApp", "HashOwner"], [["f", "x", "o"]], r"inv\.csv: missing columns minute_1"),
        (["HashFunction", "HashApp", "minute_1", "minute_3"], [["f", "x", "1", "1"]], r"minute_1\.\.minute_2 without"),
        (INV2, [["f", "x", "1", "1"], ["g", "x", "1", "1.5"]], r"inv\.csv, line 3: minute_2='1\.5'"),
        (INV2, [["f", "x", "two", "1"]], r"inv\.csv, line 2: minute_1='two'"),
        (INV2, [["f", "x", "1", "-1"]], r"inv\.csv, line 2: minute_2='-1'"),
        (INV2, [["f", "x", "1", ""]], r"inv\.csv, line 2: minute_2=''"),
        (INV2, [["f", "x", "1"]], r"inv\.csv, line 2: 3 fields, the header has 4"),
        (["HashFunction", "HashApp", "minute_1"], [["", "x", "1"]], r"inv\.csv, line 2: empty HashFunction"),
    ],
)
def test_bad_inv_csv(tmp_path: Path, header: list[str], rows: list[list[Any]], message: str) -> None:
    write_csv(tmp_path / "inv.csv", header, rows)
    with pytest.raises(TraceError, match=message) as e:
        load_trace(tmp_path)
    assert str(tmp_path / "inv.csv") in str(e.value)


def test_an_empty_inv_csv(tmp_path: Path) -> None:
    (tmp_path / "inv.csv").write_text("")
    with pytest.raises(TraceError, match=r"inv\.csv: empty file"):
        load_trace(tmp_path)


def test_bad_run_csv(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1])])
    write_run(d, [(fn("aa"), 10, [1, 2, 3, 4, 5, 6, 7]), (fn("bb"), 10, [1, 2, "fast", 4, 5, 6, 7])])
    with pytest.raises(TraceError, match=r"run\.csv, line 3: percentile_Average_25='fast'"):
        load_trace(d)
    write_csv(d / "run.csv", RUN_HEADER[:-1], [[fn("aa"), "x", "o", 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(TraceError, match=r"run\.csv: missing column\(s\) percentile_Average_100"):
        load_trace(d)


def test_bad_mem_csv(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1])])
    write_mem(d, [("x", "-3")])
    with pytest.raises(TraceError, match=r"mem\.csv, line 2: AverageAllocatedMb='-3'"):
        load_trace(d)


def test_max_per_day_must_not_be_negative(tmp_path: Path) -> None:
    d = write_inv(tmp_path / "t", [(fn("aa"), "x", [1])])
    with pytest.raises(TraceError, match="max_per_day must be >= 0"):
        load_trace(d, max_per_day=-1)


# --- profiles -------------------------------------------------------------------------


def test_sample_ms_interpolates_between_points() -> None:
    p = ModelProfile("m", 0.0, ((0.0, 10.0), (50.0, 20.0), (100.0, 40.0)))
    assert [p.sample_ms(u) for u in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx([10, 15, 20, 30, 40])


def test_sample_ms_is_flat_beyond_the_ends_and_for_one_point() -> None:
    p = ModelProfile("m", 0.0, ((25.0, 10.0), (75.0, 30.0)))
    assert [p.sample_ms(u) for u in (0.0, 0.1, 0.5, 0.9, 1.0)] == pytest.approx([10, 10, 20, 30, 30])
    one = ModelProfile("m", 0.0, ((50.0, 7.0),))
    assert {one.sample_ms(u) for u in (0.0, 0.3, 1.0)} == {7.0}
    with pytest.raises(TraceError, match=r"quantile 1.5 is outside \[0, 1\]"):
        p.sample_ms(1.5)


def test_mean_ms_integrates_the_inverse_cdf() -> None:
    assert ModelProfile("m", 0.0, ((0.0, 10.0), (100.0, 30.0))).mean_ms == pytest.approx(20.0)
    # flat 10 below the 25th, linear 10..30 up to the 75th, flat 30 above: 2.5 + 10 + 7.5
    assert ModelProfile("m", 0.0, ((25.0, 10.0), (75.0, 30.0))).mean_ms == pytest.approx(20.0)
    assert ModelProfile("m", 0.0, ((0.0, 0.0), (50.0, 0.0), (100.0, 100.0))).mean_ms == pytest.approx(25.0)
    assert ModelProfile("m", 0.0, ((99.0, 8.0),)).mean_ms == pytest.approx(8.0)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ((), "at least one point"),
        (((50.0, 1.0), (50.0, 2.0)), "percentiles must increase"),
        (((0.0, 1.0), (101.0, 2.0)), "percentiles must increase"),
        (((0.0, 3.0), (100.0, 2.0)), "non-decreasing"),
        (((0.0, -1.0),), ">= 0"),
    ],
)
def test_bad_profiles(points: tuple[tuple[float, float], ...], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        ModelProfile("m", 0.0, points)


# --- trace operations -----------------------------------------------------------------


def small_trace() -> Trace:
    profiles = {m: ModelProfile(m, mb, ((50.0, mb),)) for m, mb in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))}
    return Trace(((0.5, "a"), (1.0, "b"), (2.0, "a"), (3.5, "c")), profiles, 4.0, "small")


def test_models_in_order_of_first_arrival() -> None:
    trace = small_trace()
    assert trace.models() == ["a", "b", "c"]
    assert trace.mapped({"a": "z"}).models() == ["z", "b", "c"]


def test_window() -> None:
    trace = small_trace()
    part = trace.window(1.0, 3.5)
    assert part.arrivals == ((0.0, "b"), (1.0, "a"))
    assert part.span_s == 2.5 and part.profiles == trace.profiles and part.source == "small"
    assert trace.window(10.0, 20.0).arrivals == () and trace.window(10.0, 20.0).span_s == 10.0
    with pytest.raises(TraceError, match="small: a window must start before it ends"):
        trace.window(2.0, 2.0)


def test_compressed() -> None:
    trace = small_trace()
    fast = trace.compressed(2.0)
    assert fast.arrivals == ((0.25, "a"), (0.5, "b"), (1.0, "a"), (1.75, "c"))
    assert fast.span_s == 2.0 and fast.profiles == trace.profiles
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TraceError, match="small: speedup must be a positive number"):
            trace.compressed(bad)


def test_mapped_merges_with_the_first_arrivals_profile() -> None:
    trace = small_trace()
    merged = trace.mapped({"b": "a", "c": "z"})
    assert merged.arrivals == ((0.5, "a"), (1.0, "a"), (2.0, "a"), (3.5, "z"))
    assert merged.profiles["a"] == ModelProfile("a", 1.0, ((50.0, 1.0),))
    assert merged.profiles["z"] == ModelProfile("z", 3.0, ((50.0, 3.0),))  # renamed with its model
    assert set(merged.profiles) == {"a", "z", "d"}
    # Onto an existing name: a arrives before b, so b's profile gives way to a's.
    assert trace.mapped({"a": "b"}).profiles["b"] == ModelProfile("b", 1.0, ((50.0, 1.0),))


def test_profiles_are_read_only_copies() -> None:
    given = {"a": ModelProfile("a", 0.0, ((50.0, 1.0),))}
    trace = Trace(((0.0, "a"),), given, 1.0, "t")
    given.clear()
    assert list(trace.profiles) == ["a"]
    with pytest.raises(TypeError):
        trace.profiles["b"] = ModelProfile("b", 0.0, ((50.0, 1.0),))  # type: ignore[index]


# --- the gateway's access log ---------------------------------------------------------


def entry(ts: float, model: str | None = "m", **extra: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"ts": ts, "request_id": "r", "method": "POST", "path": f"/v1/models/{model}/predict"}
    line.update(status=200, model=model, cold_start=False, cached=False)
    line["timing_ms"] = {"queue": 0.1, "spawn": 0.0, "worker": extra.pop("worker", 1.0), "total": 4.0}
    line.update(extra)
    return line


def write_log(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_log_keeps_posts_that_reached_the_pool(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "access.jsonl",
        [
            entry(990.0, method="GET", path="/healthz"),  # earlier, but not a prediction
            entry(1000.0, "a"),
            "",
            entry(1005.5, None),
            entry(1003.0, ""),
            entry(1002.25, "b"),
            entry(1010.0, "a", cached=True),  # answered from the result cache
            entry(1011.0, "zzz", status=404),  # refused at the edge: no such model
            entry(1012.0, "a", status=415),  # refused at the edge: not an image
            entry(1009.0, "a", status=503),  # the pool had no worker in time: demand all the same
            entry(1004.0, "b", method="GET"),
        ],
    )
    trace = load_trace(log)
    assert trace.arrivals == ((0.0, "a"), (2.25, "b"), (9.0, "a"))
    assert trace.span_s == 9.0 and trace.source == str(log)
    assert set(trace.profiles) == {"a", "b"}


def test_log_span_is_at_least_a_second(tmp_path: Path) -> None:
    trace = load_trace(write_log(tmp_path / "l.jsonl", [entry(5.0), entry(5.25)]))
    assert trace.span_s == 1.0 and trace.arrivals == ((0.0, "m"), (0.25, "m"))


def test_log_durations_from_fresh_answers(tmp_path: Path) -> None:
    fresh = [entry(float(i), "a", worker=float(101 - i)) for i in range(101)]  # worker times 1..101
    others = [
        entry(200.0, "a", cached=True, worker=1000.0),
        entry(201.0, "a", status=500, worker=5000.0),
        entry(202.0, "b", status=502, worker=7.0),  # b never answered fresh
        entry(203.0, "c", status=503),
    ]
    profiles = load_trace(write_log(tmp_path / "l.jsonl", fresh + others)).profiles
    # With 1..101, the p-th percentile (linear between order statistics) is 1 + p.
    assert profiles["a"] == ModelProfile("a", 0.0, tuple((p, 1.0 + p) for p in PCTS))
    assert profiles["b"].duration_ms == ((50.0, 51.0),)  # the median of every fresh worker time
    assert profiles["c"].duration_ms == ((50.0, 51.0),)
    assert profiles["a"].memory_mb == 0.0


def test_log_percentiles_interpolate(tmp_path: Path) -> None:
    profiles = load_trace(write_log(tmp_path / "l.jsonl", [entry(0.0, worker=10.0), entry(1.0, worker=20.0)])).profiles
    points = profiles["m"].duration_ms
    assert [p for p, _ in points] == list(PCTS)
    assert [ms for _, ms in points] == pytest.approx([10.0 + p / 10 for p in PCTS])


def test_log_without_fresh_answers_has_zero_durations(tmp_path: Path) -> None:
    trace = load_trace(write_log(tmp_path / "l.jsonl", [entry(0.0, cached=True), entry(3.0, status=502)]))
    assert trace.profiles["m"].duration_ms == ((50.0, 0.0),)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r"line 3: not JSON"),
        ("[1, 2]", r"line 3: expected a JSON object, got list"),
        ('"text"', r"line 3: expected a JSON object, got str"),
        (json.dumps(entry(0.0) | {"ts": "noon"}), r"line 3: \"ts\" must be a number of seconds, got 'noon'"),
        (json.dumps({k: v for k, v in entry(0.0).items() if k != "ts"}), r"line 3: \"ts\" must be a number"),
    ],
)
def test_log_bad_lines_name_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    log = write_log(tmp_path / "l.jsonl", [entry(0.0), "   ", bad, entry(1.0)])
    with pytest.raises(TraceError, match=message) as e:
        load_trace(log)
    assert str(log) in str(e.value)


def test_a_csv_file_is_not_a_log(tmp_path: Path) -> None:
    write_inv(tmp_path, [(fn("aa"), "x", [1])])
    with pytest.raises(TraceError, match=r"inv\.csv, line 1: not JSON.*Azure Functions trace directory"):
        load_trace(tmp_path / "inv.csv")


def test_log_with_no_usable_line(tmp_path: Path) -> None:
    for lines in ([entry(0.0, method="GET")], ["", "  "], [entry(1.0, None)]):
        with pytest.raises(TraceError, match="no usable line"):
            load_trace(write_log(tmp_path / "l.jsonl", lines))


def test_log_max_per_day_counts_a_short_log_as_a_day(tmp_path: Path) -> None:
    lines = [entry(float(i), "a") for i in range(5)] + [entry(10.0, "b"), entry(11.0, "b")]
    log = write_log(tmp_path / "l.jsonl", lines)
    assert load_trace(log, max_per_day=2).models() == ["b"]
    assert load_trace(log, max_per_day=5).models() == ["a", "b"]


def test_log_max_per_day_over_two_days(tmp_path: Path) -> None:
    day = 86400.0
    lines = [entry(0.0, "b"), *(entry(day * i / 2, "a") for i in range(1, 5)), entry(2 * day, "a")]  # a: 5 in 2 days
    log = write_log(tmp_path / "l.jsonl", lines)
    assert load_trace(log, max_per_day=2.5).models() == ["b", "a"]
    trace = load_trace(log, max_per_day=2.4)
    assert trace.models() == ["b"] and trace.span_s == 2 * day  # the span stays the log's


def test_log_minutes(tmp_path: Path) -> None:
    log = write_log(tmp_path / "l.jsonl", [entry(t) for t in (100.0, 130.0, 161.0, 225.0, 290.0)])
    part = load_trace(log, minutes=(1, 3))
    assert part.arrivals == ((1.0, "m"), (65.0, "m")) and part.span_s == 120.0
    assert load_trace(log, minutes=(3, 4)).arrivals == ((10.0, "m"),)  # 290 - 100 = 190 s, in minute 3
    with pytest.raises(TraceError, match=r"minutes=\(0, 5\) must satisfy 0 <= A < B <= 4"):
        load_trace(log, minutes=(0, 5))


# --- the real sample ------------------------------------------------------------------


def test_the_azure_sample_totals() -> None:
    with (SAMPLE / "inv.csv").open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    totals = {"fn-" + row[0][:8]: sum(map(int, row[3:])) for row in rows}
    assert len(totals) == 50 and sum(totals.values()) == 561_869

    full = load_trace(SAMPLE)
    assert len(full.arrivals) == 561_869 and full.span_s == 86400.0
    assert Counter(name for _, name in full.arrivals) == Counter(totals)
    assert len(full.profiles) == 50

    low = load_trace(SAMPLE, max_per_day=1440)
    assert len(low.models()) == 38 and len(low.arrivals) == 5755
    assert Counter(name for _, name in low.arrivals) == Counter({k: n for k, n in totals.items() if n <= 1440})
    counts = {"fn-" + row[0][:8]: [int(c) for c in row[3:]] for row in rows}
    assert per_minute(low) == expected_per_minute({k: counts[k] for k in low.profiles})

    with (SAMPLE / "run.csv").open(newline="") as f:
        first = next(csv.DictReader(f))
    profile = full.profiles["fn-" + first["HashFunction"][:8]]
    assert profile.duration_ms[-1] == (100.0, float(first["percentile_Average_100"]))
    assert profile.duration_ms[3] == (50.0, float(first["percentile_Average_50"]))
