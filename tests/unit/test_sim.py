"""The simulator: hand-computed runs, and the same commands as the live shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scheduler.core import CoreConfig
from scheduler.policy import STEM
from scheduler.sim import (
    GENERAL_PROFILE,
    Grid,
    Profile,
    bundle_profile,
    load_bundle_profile,
    percentile,
    run_grid,
    simulate,
)
from scheduler.traces import ModelProfile, Trace
from scheduler.tuning import TuneError


def trace(*arrivals: tuple[float, str], memory_mb: float = 1024.0, duration_ms: float = 100.0) -> Trace:
    models = {m for _, m in arrivals}
    profiles = {m: ModelProfile(m, memory_mb, ((50.0, duration_ms),)) for m in models}
    return Trace(tuple(arrivals), profiles, max(t for t, _ in arrivals), "test")


def test_a_cold_a_warm_and_a_cold_again_after_the_ttl() -> None:
    result = simulate(
        trace((0, "a"), (10, "a"), (100, "a")),
        CoreConfig(capacity=2, default_ttl_s=30),
        Profile(spawn_ms=2000, stop_ms=500, infer_ms=100),
    )
    assert (result.requests, result.served, result.cold_starts, result.rejected) == (3, 3, 2, 0)
    assert sorted(result.latencies_ms) == pytest.approx([100, 2100, 2100])
    # Idle: 2.1 -> 10 (7.9 s), 10.1 -> 40.1 (30 s), 102.1 -> 132.1 (30 s), at 1 GB each.
    assert result.idle_worker_s == pytest.approx(67.9, abs=1e-3)
    metrics = result.metrics()
    assert metrics["cold_rate"] == pytest.approx(2 / 3)
    assert metrics["idle_gb_h"] == pytest.approx(67.9 / 3600, abs=1e-6)
    assert metrics["p50_ms"] == pytest.approx(2100)


def test_the_trace_durations_are_used_unless_overridden() -> None:
    result = simulate(trace((0, "a"), (5, "a"), duration_ms=700), CoreConfig(2, 30), Profile(spawn_ms=0))
    assert sorted(result.latencies_ms) == pytest.approx([700, 700])


def test_requests_that_wait_past_their_deadline_are_rejected() -> None:
    result = simulate(
        trace((0, "a"), (0.1, "b"), duration_ms=5000),
        CoreConfig(capacity=1, default_ttl_s=30),
        Profile(spawn_ms=1000, stop_ms=0),
        queue_timeout_s=1.5,
    )
    assert (result.served, result.rejected) == (1, 1)
    assert result.metrics()["reject_rate"] == 0.5


def test_eviction_costs_the_stop_before_the_start() -> None:
    result = simulate(
        trace((0, "a"), (10, "b")),
        CoreConfig(capacity=1, default_ttl_s=300),
        Profile(spawn_ms=1000, stop_ms=400, infer_ms=0),
    )
    assert sorted(result.latencies_ms) == pytest.approx([1000, 1400])
    assert result.peak_workers == 1


def test_the_tick_interval_delays_reaping_like_the_live_reaper() -> None:
    exact = simulate(trace((0, "a"), (31.5, "a")), CoreConfig(1, 30), Profile(spawn_ms=0, infer_ms=0))
    ticked = simulate(trace((0, "a"), (31.5, "a")), CoreConfig(1, 30), Profile(spawn_ms=0, infer_ms=0), tick_s=5)
    assert (exact.cold_starts, ticked.cold_starts) == (2, 1)  # the 5 s reaper has not run by 31.5 s


def test_adaptive_prewarming_turns_periodic_cold_starts_warm() -> None:
    periodic = trace(*[(i * 600.0, "a") for i in range(40)])
    config = CoreConfig(capacity=2, default_ttl_s=30)
    fixed = simulate(periodic, config, Profile(spawn_ms=2000, infer_ms=100))
    adaptive = simulate(periodic, CoreConfig(2, 30, keepalive="adaptive"), Profile(spawn_ms=2000, infer_ms=100))
    assert fixed.cold_starts == 40  # every request outlives a 30 s TTL
    assert adaptive.cold_starts <= 12 and adaptive.prewarms >= 28
    assert adaptive.idle_worker_s < 40 * 600 * 0.2  # it does not keep the worker all the time


def test_percentile_is_nearest_rank() -> None:
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([1, 2, 3, 4], 0.99) == 4
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_the_grid_gives_a_point_per_setting_in_order() -> None:
    grid = Grid(max_workers=(1, 0), ttl_s=(10, 60), keepalive=("fixed",))
    points, speed = run_grid(trace((0, "a"), (30, "a"), (31, "b")), grid, Profile(spawn_ms=1000, infer_ms=10))
    assert [(p.max_workers, p.ttl_s) for p in points] == [(1, 10), (1, 60), (0, 10), (0, 60)]
    assert points[0].cold_rate == 1.0 and points[1].cold_rate == pytest.approx(2 / 3)
    assert speed > 0
    parallel, _ = run_grid(trace((0, "a"), (30, "a"), (31, "b")), grid, Profile(spawn_ms=1000, infer_ms=10), jobs=2)
    assert parallel == points


# -- profiles: the general model's, and a bundle's own check --------------------------------------


def test_the_general_profile_fixes_every_figure_and_says_them() -> None:
    g = GENERAL_PROFILE
    assert g.infer_ms is not None and g.memory_mb is not None  # nothing is left to a trace
    assert g.runtime_ms == g.spawn_ms - g.load_ms > 0 and g.spawn_s(STEM) == pytest.approx(g.runtime_ms / 1000)
    described = Profile(spawn_ms=2300, load_ms=130, infer_ms=20, stop_ms=300, memory_mb=700).describe()
    assert described == "spawn 2300 ms, stem load 130 ms, inference 20 ms, stop 300 ms, worker 700 MB, stem cell 500 MB"
    assert "inference from the trace" in Profile().describe() and "worker memory from the trace" in Profile().describe()


def test_the_general_profile_sets_every_requests_time_whatever_the_trace_says() -> None:
    result = simulate(trace((0, "a"), (5, "a"), duration_ms=60_000), CoreConfig(2, 30), GENERAL_PROFILE)
    infer = GENERAL_PROFILE.infer_ms or 0.0
    assert sorted(result.latencies_ms) == pytest.approx([infer, GENERAL_PROFILE.spawn_ms + infer])  # warm, cold


REPORT = {"ok": True, "name": "net", "load_ms": 40.0, "warmup_ms": 60.0, "first_ms": 15.0, "gpu_memory_mb": None}


def test_a_bundles_check_replaces_the_models_part_of_the_profile() -> None:
    profile = bundle_profile({**REPORT, "infer_ms": 5}, estimate_mb=900)
    assert profile.load_ms == 100  # load + warm-up
    assert profile.spawn_ms == GENERAL_PROFILE.runtime_ms + 100  # the container and runtime start stays
    assert profile.infer_ms == 5 and profile.memory_mb == 900  # no GPU measured it: the bundle's estimate
    assert (profile.stop_ms, profile.stem_memory_mb) == (GENERAL_PROFILE.stop_ms, GENERAL_PROFILE.stem_memory_mb)
    assert bundle_profile(REPORT).infer_ms == 15  # an older check: its first request
    assert bundle_profile({**REPORT, "gpu_memory_mb": 713}, estimate_mb=900).memory_mb == 713  # measured wins
    assert bundle_profile(REPORT).memory_mb == GENERAL_PROFILE.memory_mb  # nothing better known


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"load_ms": None}, "no load_ms"),
        ({"first_ms": "fast"}, "first_ms is 'fast'"),
        ({"warmup_ms": -1}, "warmup_ms is -1"),
        ({"infer_ms": True}, "infer_ms is True"),
        ({"gpu_memory_mb": float("nan")}, "gpu_memory_mb is nan"),
        ({"ok": False, "error": {"code": "bad_bundle"}}, "failed its check"),
    ],
)
def test_a_report_that_is_no_check_is_refused_by_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(TuneError, match=message):
        bundle_profile({**REPORT, **change})


def test_a_bundle_directory_or_its_report_file_both_load(tmp_path: Path) -> None:
    (tmp_path / "bundle_report.json").write_text(json.dumps(REPORT))
    (tmp_path / "model.json").write_text(json.dumps({"name": "net", "gpu_memory_mb": 549}))
    by_dir, source = load_bundle_profile(tmp_path)
    by_file, _ = load_bundle_profile(tmp_path / "bundle_report.json")
    assert by_dir == by_file and by_dir.memory_mb == 549 and by_dir.load_ms == 100
    assert source.startswith("bundle net (") and "the bundle's estimate" in source


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "no such file"), ("{", "not JSON"), ("[1, 2]", "expected a JSON object, got list"), ("{}", "no load_ms")],
)
def test_a_bad_report_file_is_named(tmp_path: Path, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / "bundle_report.json").write_text(text)
    with pytest.raises(TuneError, match=message) as caught:
        load_bundle_profile(tmp_path)
    assert str(tmp_path / "bundle_report.json") in str(caught.value)
