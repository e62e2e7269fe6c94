"""``wanwu tune`` end to end on a small Azure-format trace (the simulator is real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import cli


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
    # A cold start from a stem cell costs the load (150 ms), not the whole start (1700 ms).
    assert stems[(2, 10.0)]["stem_rate"] > 0 and fixed[(2, 10.0)]["stem_rate"] == 0
    assert stems[(2, 10.0)]["p50_ms"] < fixed[(2, 10.0)]["p50_ms"]
    assert stems[(2, 10.0)]["idle_gb_h"] > fixed[(2, 10.0)]["idle_gb_h"]  # and the stem cell waits, holding memory
    assert fixed[(2, 60.0)]["cold_rate"] < fixed[(2, 10.0)]["cold_rate"]  # a longer TTL keeps more warm...
    assert fixed[(2, 60.0)]["idle_gb_h"] > fixed[(2, 10.0)]["idle_gb_h"]  # ...and costs more idle memory
    assert report["recommended"] is not None and "reason" in report["recommended"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_prints_a_table_with_the_front_and_a_recommendation(azure: Path) -> None:
    args = ["tune", str(azure), "--max-workers", "0,1", "--ttl", "30", "--max-p99-ms", "5000"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "keepalive" in result.stdout and "inf" in result.stdout
    assert "recommended for p99 <= 5000 ms" in result.stdout
    assert "requests/s of wall time" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl", "ten"], "'ten': expected seconds separated by commas"),
        (["--max-workers", "-1"], "expected integers (>= 0, finite)"),
        (["--ttl", "inf"], "expected seconds (>= 0, finite)"),
        (["--ttl", "nan"], "expected seconds (>= 0, finite)"),
        (["--keepalive", "lru"], "expected some of fixed, adaptive"),
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
