"""The GPU check's pure parts (tests/gpu_check/report.py), its ResNet-50 bundles and
its option parsing; no gateway, no GPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from wanwu_worker.bundle import load_bundle
from wanwu_worker.predictor import Predictor

from scheduler.core import StopWorker
from scheduler.pool import WarmPool
from tests.gpu_check import bundles
from tests.gpu_check import options as cli
from tests.gpu_check.report import (
    MIB,
    Report,
    StepFailed,
    ballast_mb,
    check_lru,
    compare_allocation,
    compare_precisions,
    group_by_time,
    latency_stats,
    nvml_target,
    parse_reaps,
    percentile,
    plan_watermarks,
    render_summary,
)
from tests.gpu_check.requirements import gateway_requirements
from tests.gpu_check.steps import child_env

H200_MIB = 143771.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- statistics ---------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="outside 0-100"):
        percentile([1.0], 101)


def test_latency_stats() -> None:
    stats = latency_stats([10.0, 20.0, 30.0, 40.0, 1000.0])
    assert stats == {"n": 5, "mean": 220.0, "min": 10.0, "p50": 30.0, "p90": 616.0, "p99": 961.6, "max": 1000.0}
    assert latency_stats([])["p50"] is None


# -- the report ---------------------------------------------------------------------------


def test_report_records_ok_failed_partial_and_skipped_steps_and_goes_on() -> None:
    clock = FakeClock()
    lines: list[str] = []
    report = Report("gpu", {"requests": 5}, clock=clock, progress=lines.append)

    def slow() -> dict[str, int]:
        clock.now += 2.5
        return {"x": 1}

    def broken() -> None:
        raise RuntimeError("no NVML")

    def partial() -> None:
        raise StepFailed("fp16 failed", {"models": {"resnet50-fp32": {"ok": True}}})

    assert report.run("env", slow) == {"x": 1}
    assert report.run("nvml", broken) is None
    report.run("serve", partial)
    report.skip("reap", "--skip")
    out = report.to_json()
    assert out["ok"] is False
    assert out["failed_steps"] == ["nvml", "serve"]
    assert list(out["steps"]) == ["env", "nvml", "serve", "reap"]
    assert out["steps"]["env"] == {"status": "ok", "seconds": 2.5, "result": {"x": 1}}
    assert out["steps"]["nvml"]["error"]["type"] == "RuntimeError"
    assert out["steps"]["nvml"]["error"]["message"] == "no NVML"
    assert out["steps"]["serve"]["result"] == {"models": {"resnet50-fp32": {"ok": True}}}
    assert out["steps"]["reap"] == {"status": "skipped", "reason": "--skip"}
    assert report.result("env") == {"x": 1} and report.result("serve") is None
    assert any("nvml: FAILED: RuntimeError: no NVML" in line for line in lines)
    json.dumps(out)  # the whole report is JSON


def test_report_records_an_interrupt_and_passes_it_on() -> None:
    report = Report("cpu", {}, clock=FakeClock())

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report.run("serve", interrupted)
    assert report.steps["serve"]["status"] == "interrupted"
    assert report.failed == ["serve"]


def test_report_with_only_successes_is_ok() -> None:
    report = Report("cpu", {}, clock=FakeClock())
    report.run("env", dict)
    assert report.to_json()["ok"] is True


# -- least recently used first ------------------------------------------------------------


def test_lru_order_passes_when_reaps_follow_last_use() -> None:
    result = check_lru(["w-fp16", "w-demo", "w-fp32"], [["w-fp16"], ["w-demo"], ["w-fp32"]])
    assert result["ok"] and result["problems"] == []


def test_lru_order_accepts_reaps_seen_in_the_same_poll() -> None:
    assert check_lru(["a", "b", "c"], [["b", "a"], ["c"]])["ok"]
    assert check_lru(["a", "b", "c"], [["c", "a", "b"]])["ok"]


def test_lru_order_fails_when_a_more_recently_used_worker_goes_first() -> None:
    result = check_lru(["a", "b", "c"], [["b"], ["a"], ["c"]])
    assert not result["ok"]
    assert any("b went before a" in p for p in result["problems"])


def test_lru_order_fails_when_a_recent_worker_goes_and_an_older_one_stays() -> None:
    result = check_lru(["a", "b", "c"], [["a"], ["c"]])
    assert not result["ok"]
    assert "reaped c while less recently used b stayed" in result["problems"]
    assert "not reaped: b" in result["problems"]


def test_lru_order_fails_on_missing_unknown_and_repeated_reaps() -> None:
    assert check_lru(["a", "b"], [["a"]])["problems"] == ["not reaped: b"]
    assert not check_lru(["a", "b"], [["a"], ["x"], ["b"]])["ok"]
    assert "a worker was reaped twice" in check_lru(["a", "b"], [["a"], ["a"], ["b"]])["problems"]
    assert not check_lru(["a"], [])["ok"]


def test_group_by_time() -> None:
    assert group_by_time([("b", 250.0), ("a", 100.0), ("c", 250.0)]) == [["a"], ["b", "c"]]
    assert group_by_time([]) == []


def test_parse_reaps_reads_the_pools_own_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="scheduler.pool"):
        WarmPool._log_stop(StopWorker("w1", "resnet50-fp16", "gpu_pressure", 12.5))
        WarmPool._log_stop(StopWorker("w2", "demo-shapes", "ttl", 31.0))
        WarmPool._log_stop(StopWorker("w3", "resnet50-fp32", "gpu_pressure", 0.4))
        WarmPool._log_stop(StopWorker("w4", "demo-shapes", "evicted"))
    text = "\n".join(f"2026-01-01 INFO scheduler.pool: {r.getMessage()}" for r in caplog.records)
    assert parse_reaps(text, "gpu_pressure") == [
        {"worker": "w1", "model": "resnet50-fp16", "reason": "gpu_pressure", "idle_s": 12.5},
        {"worker": "w3", "model": "resnet50-fp32", "reason": "gpu_pressure", "idle_s": 0.4},
    ]
    assert [r["worker"] for r in parse_reaps(text)] == ["w1", "w2", "w3"]


# -- GPU memory sizing ----------------------------------------------------------------------


def test_watermarks_leave_room_for_the_workers_and_reap_them_all() -> None:
    high, low = plan_watermarks(H200_MIB, used_mb=600.0)
    assert high == pytest.approx((600 + 8192) / H200_MIB, abs=1e-6)
    assert low == pytest.approx(high - 4096 / H200_MIB, abs=1e-6)
    assert 0 < low < high < 0.95


def test_watermarks_refuse_a_gpu_without_room() -> None:
    with pytest.raises(ValueError, match="no room"):
        plan_watermarks(H200_MIB, used_mb=0.94 * H200_MIB)
    with pytest.raises(ValueError, match="not above 0"):
        plan_watermarks(8000.0, used_mb=0.0, headroom_mb=2000, drop_mb=4000)


def test_ballast_ends_a_margin_above_the_high_watermark() -> None:
    high, _ = plan_watermarks(H200_MIB, used_mb=600.0)
    used = 600.0 + 2600.0  # three workers loaded
    size = ballast_mb(H200_MIB, used, high, margin_mb=512)
    assert used + size == pytest.approx(high * H200_MIB + 512, abs=1)
    assert used + size > high * H200_MIB


def test_ballast_refuses_when_already_above_or_too_big() -> None:
    with pytest.raises(ValueError, match="above the high watermark"):
        ballast_mb(10000.0, 9500.0, 0.9)
    with pytest.raises(ValueError, match="would leave less than 2048 MB"):
        ballast_mb(10000.0, 1000.0, 0.9, margin_mb=512, free_mb=5000.0)


def test_nvml_target_follows_cuda_visible_devices() -> None:
    assert nvml_target(None, 0) == "0"
    assert nvml_target("", 2) == "2"
    assert nvml_target("3,5", 1) == "5"
    assert nvml_target("GPU-abc, GPU-def", 0) == "GPU-abc"
    with pytest.raises(ValueError, match="not among"):
        nvml_target("3", 1)


def test_compare_allocation_in_mib() -> None:
    row = compare_allocation(2**30, 1000 * MIB, 2048 * MIB, 2**30, 2**30 + 2 * MIB)
    assert row == {
        "requested_mib": 1024.0,
        "nvml_delta_mib": 1048.0,
        "torch_allocated_mib": 1024.0,
        "torch_reserved_mib": 1026.0,
        "nvml_minus_reserved_mib": 22.0,
    }


# -- fp16 against fp32, and the summary -----------------------------------------------------------


def _serve(p50: float, p99: float, nvml: float, reserved: float) -> dict[str, Any]:
    return {
        "warm": {"client_ms": {"p50": p50, "p99": p99}, "worker_ms": {"p50": p50 / 2}},
        "memory": {"nvml_process_mib": nvml, "health_gpu_memory_mb": reserved},
    }


def test_compare_precisions() -> None:
    serve = {
        "models": {"resnet50-fp32": _serve(8.0, 12.0, 900.0, 200.0), "resnet50-fp16": _serve(6.0, 9.0, 700.0, 100.0)}
    }
    throughput = {
        "precisions": {
            "fp32": {"batches": [{"batch": 1, "images_per_s": 400.0}, {"batch": 64, "images_per_s": 3000.0}]},
            "fp16": {"batches": [{"batch": 1, "images_per_s": 500.0}, {"batch": 64, "images_per_s": 9000.0}]},
        }
    }
    out = compare_precisions(serve, throughput)
    assert out["warm_p50_ms"] == {"fp32": 8.0, "fp16": 6.0, "fp16_over_fp32": 0.75}
    assert out["worker_p50_ms"] == {"fp32": 4.0, "fp16": 3.0, "fp16_over_fp32": 0.75}
    assert out["nvml_process_mib"]["fp16_over_fp32"] == pytest.approx(0.778)
    assert out["torch_reserved_mb"]["fp16_over_fp32"] == 0.5
    assert out["throughput_images_per_s"]["64"] == {"fp32": 3000.0, "fp16": 9000.0, "fp16_over_fp32": 3.0}
    assert compare_precisions(None, {"precisions": {"fp16": {"skipped": "cpu"}}}) == {}


def test_summary_covers_every_kind_of_step_without_failing() -> None:
    report = Report("gpu", {}, clock=FakeClock())
    report.run(
        "serve",
        lambda: {
            "models": {
                "resnet50-fp32": _serve(8.0, 12.0, 900.0, 200.0)
                | {"cold": {"client_ms": 3000.0, "start": "container"}},
                "resnet50-fp16": {"error": {"message": "spawn failed"}},
            }
        },
    )
    report.run("reap", lambda: {"ballast_mb": 6000, "lru": {"ok": False, "problems": ["b went before a"]}})
    report.run("stem", lambda: {"unexpected": "shape"})
    report.run("nvml", lambda: (_ for _ in ()).throw(RuntimeError("no NVML")))
    report.skip("throughput", "--skip")
    text = render_summary(report.to_json())
    assert "FAILED" in text.splitlines()[0]
    assert "resnet50-fp32: cold 3000 ms (container), warm p50 8.00 / p99 12.0 ms" in text
    assert "resnet50-fp16: FAILED: spawn failed" in text
    assert "LRU order WRONG: b went before a" in text
    assert "nvml       FAILED: RuntimeError: no NVML" in text
    assert "throughput skipped: --skip" in text


# -- bundles ------------------------------------------------------------------------------------


def test_resnet50_has_torchvisions_weight_count() -> None:
    assert sum(p.numel() for p in bundles.resnet50().parameters()) == 25_557_032


def test_resnet_bundles_load_in_the_workers_predictor(tmp_path: Path) -> None:
    small = bundles.ResNet((1, 1, 1, 1), classes=10, width=8)  # the same code at a size a unit test affords
    built = bundles.write_resnet_bundles(tmp_path, input_size=32, max_batch=2, model=small)
    assert set(built) == {"resnet50-fp32", "resnet50-fp16"}
    photo = bundles.photo(size=(96, 64))
    for name, precision in bundles.RESNET.items():
        bundle = load_bundle(tmp_path / name)
        assert (bundle.precision, bundle.input_size, len(bundle.labels)) == (precision, (3, 32, 32), 10)
        assert bundle.batching is not None and bundle.batching.max_batch_size == 2
        predictor = Predictor(bundle, device="cpu", threads=1, preprocess_threads=1)
        assert predictor.health()["precision"] == "fp32"  # fp16 runs as fp32 on the CPU
        [top] = predictor.predict(photo, 1).predictions
        assert top["label"].startswith("class-") and 0 <= top["score"] <= 1
    assert built["resnet50-fp16"]["file_mib"] < built["resnet50-fp32"]["file_mib"]  # saved in half precision
    again = bundles.write_resnet_bundles(tmp_path, input_size=32, max_batch=2, model=small)
    assert all(b.get("reused") for b in again.values())


def test_child_env_drops_wanwu_settings_and_puts_the_project_on_the_path() -> None:
    env = child_env({"WANWU_MAX_WORKERS": "9", "WANWU_WORKER_PYTHON": "/opt/py", "PATH": "/bin", "PYTHONPATH": "/x"})
    assert "WANWU_MAX_WORKERS" not in env
    assert env["WANWU_WORKER_PYTHON"] == "/opt/py" and env["PATH"] == "/bin"
    root = Path(bundles.__file__).resolve().parents[2]
    assert env["PYTHONPATH"].split(":") == [str(root), str(root / "worker_image"), "/x"]


# -- options ------------------------------------------------------------------------------------


def test_cpu_mode_takes_smaller_defaults() -> None:
    opts = cli.parse_options(["--cpu", "--skip", "stem", "--out", "r.json"])
    assert (opts.cpu, opts.device, opts.requests, opts.resnet_input, opts.batches) == (True, "cpu", 30, 64, (1, 4))
    assert opts.skip == frozenset({"stem"})
    gpu = cli.parse_options(["--requests", "50", "--skip", "serve,reap"])
    assert (gpu.device, gpu.requests, gpu.resnet_input, gpu.batches) == ("cuda:0", 50, 224, (1, 16, 64))
    assert gpu.skip == frozenset({"serve", "reap"})


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_options(["--skip", "env"])
    assert "steps that can be skipped are nvml, throughput, serve, reap, stem" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_options(["--device", "gpu0"])
    assert cli.torch_index("cuda:3") == 3 and cli.torch_index("cuda") == 0 and cli.torch_index("1") == 1


def test_gpu_wheels_requirements_are_the_gateways_own(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = [\n  "flask>=3.1",  # why\n  "Pillow>=10",\n  "nvidia_ml_py>=12",\n'
        '  "torch==2.13.0",\n  "requests[socks]>=2.31",\n]\n',
        encoding="utf-8",
    )
    assert gateway_requirements(pyproject) == ["flask>=3.1", "requests[socks]>=2.31"]
    real = gateway_requirements(Path(bundles.__file__).resolve().parents[2] / "pyproject.toml")
    assert "flask>=3.1" in real and not any(r.startswith(("torch", "pillow", "nvidia-ml-py")) for r in real)
