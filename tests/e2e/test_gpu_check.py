"""The GPU check (``python -m tests.gpu_check``) run end to end in its CPU mode with a
fake NVML: a process-backed gateway serves three bundles, GPU-memory pressure from a
ballast reaps its idle workers least recently used first, and it shuts down clean. On a
GPU machine the same script runs with real NVML (see tests/gpu_check/__init__.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.workerprocs import worker_processes

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_every_step_on_the_cpu_and_reaps_lru_first(tmp_path: Path) -> None:
    report_path = tmp_path / "gpu-check.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.gpu_check", "--cpu", "--fake-gpu", "--out", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["failed_steps"] == []
    steps = report["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "env": "ok",
        "bundles": "ok",
        "nvml": "skipped",  # needs a real GPU
        "throughput": "ok",
        "gateway": "ok",
        "serve": "ok",
        "reap": "ok",
        "shutdown": "ok",
        "stem": "ok",
    }
    reap = steps["reap"]["result"]
    assert reap["lru"]["ok"] and reap["reaps_after"]["gpu_pressure"] == 3
    assert [w["worker"] for w in reap["expected_order"]] == [group[0] for group in reap["lru_log"]["observed"]]
    assert steps["shutdown"]["result"]["leftover"] == [] and not steps["shutdown"]["result"]["killed_gateway"]
    assert worker_processes() == []
    assert "wanwu GPU check (cpu mode): OK" in run.stdout
