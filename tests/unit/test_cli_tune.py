"""``wanwu tune`` end to end on a small Azure-format trace (the simulator is real)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli import cli
from scheduler.sim import GENERAL_PROFILE


@pytest.fixture
def azure(tmp_path: Path) -> Path:
    """Three functions over 20 minutes: steady, every other minute, and one burst."""
    minutes = 20
    rows = {
        "f" * 64: [2] * minutes,
        "e" * 64: [1 if m % 2 == 0 else 0 for m in range(minutes)],
        "d" * 64: [0] * 10 + [6] + [0] * 9,
    }
    header = "HashFunction,HashApp,HashOwner," + ",".join(f"minute_{m + 1}" for m in range(minutes))
    lines = [header] + [f"{h},{h},{h}," + ",".join(map(str, counts)) for h, counts in rows.items()]
    (tmp_path / "inv.csv").write_text("\n".join(lines) + "\n")
    run_header = "HashFunction,HashApp,HashOwner,Count,Average,Minimum,Maximum," + ",".join(
        f"percentile_Average_{p}" for p in (0, 1, 25, 50, 75, 99, 100)
    )
    run_rows = [f"{h},{h},{h},10,50,10,90,10,10,30,50,70,90,90" for h in rows]
    (tmp_path / "run.csv").write_text("\n".join([run_header, *run_rows]) + "\n")
    mem_header = "HashApp,HashOwner,SampleCount,AverageAllocatedMb"
    (tmp_path / "mem.csv").write_text("\n".join([mem_header, *(f"{h},{h},5,512" for h in rows)]) + "\n")
    return tmp_path


def test_tune_reports_every_point_as_json_and_draws_the_plot(azure: Path, tmp_path: Path) -> None:
    plot = tmp_path / "front.png"
    args = ["tune", str(azure), "--max-workers", "1,2", "--ttl", "10,60", "--json", "--plot", str(plot), "--jobs", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    points = report["points"]
    assert len(points) == 16 and report["requests"] == 56
    assert {(p["keepalive"], p["max_workers"], p["ttl_s"], p["stem_cells"]) for p in points} == {
        (k, n, t, s) for k in ("fixed", "adaptive") for n in (1, 2) for t in (10.0, 60.0) for s in (0, 1)
    }
    keys = {"keepalive", "max_workers", "ttl_s", "cold_rate", "reject_rate", "p50_ms", "p99_ms", "idle_worker_s"}
    assert keys | {"idle_gb_h"} <= set(points[0])
    assert any(p["pareto"] for p in points)
    fixed = {(p["max_workers"], p["ttl_s"]): p for p in points if p["keepalive"] == "fixed" and not p["stem_cells"]}
    stems = {(p["max_workers"], p["ttl_s"]): p for p in points if p["keepalive"] == "fixed" and p["stem_cells"]}
    # A cold start from a stem cell costs the load (GENERAL_PROFILE.load_ms), not the whole start.
    assert stems[(2, 10.0)]["stem_rate"] > 0 and fixed[(2, 10.0)]["stem_rate"] == 0
    assert stems[(2, 10.0)]["p50_ms"] < fixed[(2, 10.0)]["p50_ms"]
    assert stems[(2, 10.0)]["idle_gb_h"] > fixed[(2, 10.0)]["idle_gb_h"]  # and the stem cell waits, holding memory
    assert fixed[(2, 60.0)]["cold_rate"] < fixed[(2, 10.0)]["cold_rate"]  # a longer TTL keeps more warm...
    assert fixed[(2, 60.0)]["idle_gb_h"] > fixed[(2, 10.0)]["idle_gb_h"]  # ...and costs more idle memory
    assert report["recommended"] is not None and "reason" in report["recommended"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_prints_a_table_with_the_front_and_a_recommendation(azure: Path) -> None:
    args = ["tune", str(azure), "--max-workers", "1,2", "--ttl", "30", "--max-p99-ms", "5000"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "keepalive" in result.stdout
    assert "recommended for p99 <= 5000 ms" in result.stdout
    assert "requests/s of wall time" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl", "ten"], "--ttl='ten': expected a number"),
        (["--max-workers", "-1"], "--max-workers='-1': must be > 0"),
        (["--max-workers", "0"], "--max-workers='0': must be > 0"),  # no pool runs unbounded
        (["--ttl", "inf"], "expected a finite number"),
        (["--ttl", "nan"], "expected a finite number"),
        (["--keepalive", "lru"], "must be one of fixed, adaptive"),
        (["--minutes", "5"], "expected A:B"),
    ],
)
def test_bad_options_are_named(azure: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["tune", str(azure), *args])
    assert result.exit_code == 2 and message in result.output


def test_a_trace_with_nothing_left_is_an_error(azure: Path) -> None:
    result = CliRunner().invoke(cli, ["tune", str(azure), "--max-per-day", "1"])
    assert result.exit_code == 1 and "no requests left to replay" in result.output


def test_a_directory_that_is_no_trace_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["tune", str(tmp_path)])
    assert result.exit_code == 1 and "TraceError" in result.output


# --- the profile: the general model's, a bundle's, the trace's own --------------------------


def tune_json(*args: str) -> tuple[dict[str, Any], str]:
    """The JSON report of ``wanwu tune ARGS`` on one warm-friendly point, and its stderr."""
    grid = ["--max-workers", "8", "--ttl", "600", "--keepalive", "fixed", "--stem-cells", "0", "--json", "--jobs", "1"]
    result = CliRunner().invoke(cli, ["tune", *args, *grid])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def only_point(report: dict[str, Any]) -> dict[str, Any]:
    (point,) = report["points"]
    return point


@pytest.fixture
def slow_functions(azure: Path) -> Path:
    """The azure trace with every function running 5 s a request, as run.csv says."""
    header = (azure / "run.csv").read_text().splitlines()[0]
    rows = [f"{h},{h},{h},10,5000,5000,5000," + ",".join(["5000"] * 7) for h in ("f" * 64, "e" * 64, "d" * 64)]
    (azure / "run.csv").write_text("\n".join([header, *rows]) + "\n")
    return azure


def test_with_no_flags_each_function_is_the_general_model(slow_functions: Path) -> None:
    report, stderr = tune_json(str(slow_functions))
    g = GENERAL_PROFILE
    assert report["profile"] == {
        "source": "the general model (make bench, 2 vCPUs)",
        "spawn_ms": g.spawn_ms,
        "load_ms": g.load_ms,
        "infer_ms": g.infer_ms,
        "stop_ms": g.stop_ms,
        "memory_mb": g.memory_mb,
        "stem_memory_mb": g.stem_memory_mb,
        "failure_rate": 0.0,
    }
    point = only_point(report)
    assert point["p50_ms"] == g.infer_ms  # warm requests take the model's own time, not the function's 5 s
    assert point["p99_ms"] == pytest.approx(g.spawn_ms + (g.infer_ms or 0))  # and a cold one its start-up too
    assert "each of the 3 models as the general model" in stderr and f"inference {g.infer_ms:g} ms" in stderr
    # Idle memory is the model's (700 MB), not the functions' host memory (mem.csv: 512 MB).
    by_trace = only_point(tune_json(str(slow_functions), "--memory-mb", "trace")[0])
    assert point["idle_worker_s"] == pytest.approx(by_trace["idle_worker_s"])
    assert point["idle_gb_h"] == pytest.approx(by_trace["idle_gb_h"] * (g.memory_mb or 0) / 512, rel=1e-4)


def test_infer_ms_trace_takes_each_functions_own_durations(slow_functions: Path) -> None:
    report, stderr = tune_json(str(slow_functions), "--infer-ms", "trace")
    assert only_point(report)["p50_ms"] == 5000
    assert report["profile"]["infer_ms"] is None and "inference from the trace" in stderr
    assert "with --infer-ms" in report["profile"]["source"]
    assert only_point(tune_json(str(slow_functions), "--infer-ms", "7.5")[0])["p50_ms"] == 7.5


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "fast", ""])
def test_a_bad_figure_is_named(azure: Path, raw: str) -> None:
    result = CliRunner().invoke(cli, ["tune", str(azure), "--infer-ms", raw])
    assert result.exit_code == 2 and "expected a number >= 0, or 'trace'" in result.output


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A checked bundle without a GPU: load 40 + warm-up 60 ms, 15 ms first, 5 ms after."""
    directory = tmp_path / "net"
    directory.mkdir()
    report = {"ok": True, "name": "net", "load_ms": 40, "warmup_ms": 60, "first_ms": 15, "infer_ms": 5}
    (directory / "bundle_report.json").write_text(json.dumps({**report, "gpu_memory_mb": None}))
    (directory / "model.json").write_text(json.dumps({"name": "net", "gpu_memory_mb": 1024}))
    return directory


@pytest.mark.parametrize("where", ["directory", "report"])
def test_a_bundles_report_is_the_profile(azure: Path, bundle: Path, where: str) -> None:
    path = bundle if where == "directory" else bundle / "bundle_report.json"
    report, stderr = tune_json(str(azure), "--profile", str(path))
    profile = report["profile"]
    assert (profile["load_ms"], profile["infer_ms"], profile["memory_mb"]) == (100, 5, 1024)
    assert profile["spawn_ms"] == GENERAL_PROFILE.runtime_ms + 100
    assert only_point(report)["p50_ms"] == 5
    assert "as bundle net (" in stderr and "GPU memory the bundle's estimate" in stderr


def test_flags_override_the_bundles_report(azure: Path, bundle: Path) -> None:
    report, _ = tune_json(str(azure), "--profile", str(bundle), "--infer-ms", "9", "--spawn-ms", "1000")
    profile = report["profile"]
    assert (profile["infer_ms"], profile["spawn_ms"], profile["load_ms"]) == (9, 1000, 100)
    assert profile["source"].endswith("with --spawn-ms, --infer-ms")
    assert only_point(report)["p50_ms"] == 9


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"load_ms": "fast", "warmup_ms": 1, "first_ms": 1}', "load_ms is 'fast'"),
        ('{"warmup_ms": 1, "first_ms": 1}', "no load_ms"),
        ("[]", "expected a JSON object"),
    ],
)
def test_a_bad_profile_is_a_clean_usage_error(azure: Path, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bundle_report.json"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["tune", str(azure), "--profile", str(path)])
    assert result.exit_code == 2 and "Invalid value for '--profile'" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_a_missing_profile_is_a_clean_usage_error(azure: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["tune", str(azure), "--profile", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(cli, ["tune", str(azure), "--profile", str(tmp_path)])  # a directory, no report
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.fixture
def access_log(tmp_path: Path) -> Path:
    """Two models, each asked every 10 s for 20 minutes; their workers took 300 ms."""
    lines = [
        {"ts": 1000.0 + t, "method": "POST", "model": m, "status": 200, "timing_ms": {"worker": 300.0}}
        for t in range(0, 1200, 10)
        for m in ("a", "b")
    ]
    path = tmp_path / "access.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_an_access_log_keeps_its_own_inference_times(access_log: Path, bundle: Path) -> None:
    report, stderr = tune_json(str(access_log))
    assert only_point(report)["p50_ms"] == 300  # the model's own, as logged
    assert report["profile"]["infer_ms"] is None and report["profile"]["spawn_ms"] == GENERAL_PROFILE.spawn_ms
    assert "(access log)" in stderr and "inference from the trace" in stderr
    assert only_point(report)["idle_gb_h"] > 0  # the general model's memory: a log has none
    assert only_point(tune_json(str(access_log), "--infer-ms", "20")[0])["p50_ms"] == 20
    assert only_point(tune_json(str(access_log), "--profile", str(bundle))[0])["p50_ms"] == 5


# --- points that turn requests away ---------------------------------------------------------


def test_rejecting_points_are_marked_off_the_front_and_never_recommended(azure: Path, tmp_path: Path) -> None:
    # 3 s a request and a 3 s queue: one worker for three models turns requests away; eight do not.
    args = ["tune", str(azure), "--max-workers", "1,8", "--ttl", "10,60", "--stem-cells", "0", "--jobs", "1"]
    args += ["--infer-ms", "3000", "--queue-timeout-s", "3"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rejecting = [p for p in report["points"] if p["rejects"]]
    assert len(rejecting) == 4 and all(p["max_workers"] == 1 and p["reject_rate"] > 0.01 for p in rejecting)
    assert not any(p["pareto"] for p in rejecting)
    assert any(p["pareto"] for p in report["points"])
    assert report["recommended"]["max_workers"] == 8
    # They are cheap: allowed all the 503s they like, they would be on the front.
    anything = json.loads(CliRunner().invoke(cli, [*args, "--json", "--max-reject-rate", "1"]).stdout)
    assert any(p["pareto"] and p["max_workers"] == 1 for p in anything["points"])
    table = CliRunner().invoke(cli, [*args, "--plot", str(tmp_path / "t.png")])
    rows = [line for line in table.stdout.splitlines() if line.split()[:2] in (["fixed", "1"], ["adaptive", "1"])]
    assert rows and all(row.endswith("rejects") for row in rows)
    assert "rejects: more 503s than 1%, off the front and never recommended" in table.stdout
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_when_every_point_rejects_the_closest_is_named_with_a_hint(azure: Path) -> None:
    args = ["tune", str(azure), "--max-workers", "1", "--ttl", "10", "--stem-cells", "0", "--jobs", "1"]
    result = CliRunner().invoke(cli, [*args, "--infer-ms", "3000", "--queue-timeout-s", "1"])
    assert result.exit_code == 0, result.output
    assert "no point meets 503s <= 1%; closest: " in result.stdout
    assert "more workers than the grid's largest N=1 (--max-workers)" in result.stdout
    rows = result.stdout.split("\n\n")[0].splitlines()[1:]
    assert len(rows) == 2 and all(row.endswith("  rejects") for row in rows)  # not on the front, not recommended


def test_a_failure_rate_makes_the_core_try_failed_calls_again(azure: Path) -> None:
    """Calls that crash cost their requests a second call on another worker (and the
    worker a restart): the same grid replayed with failures has more cold starts and a
    slower p99 than without, and the header says what was assumed."""
    clean, _ = tune_json(str(azure), "--infer-ms", "50")
    failing, stderr = tune_json(str(azure), "--infer-ms", "50", "--failure-rate", "0.3")
    assert failing["profile"]["failure_rate"] == 0.3 and clean["profile"]["failure_rate"] == 0.0
    assert failing["profile"]["source"].endswith("with --failure-rate, --infer-ms")
    assert "30% of calls fail and are tried again" in stderr
    before, after = only_point(clean), only_point(failing)
    assert after["cold_rate"] > before["cold_rate"] and after["p99_ms"] > before["p99_ms"]
    result = CliRunner().invoke(cli, ["tune", str(azure), "--failure-rate", "1"])
    assert result.exit_code == 2 and "--failure-rate" in result.output
