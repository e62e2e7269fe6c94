"""The GPU monitor against a fake NVML module (the real one needs a GPU)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from scheduler.gpu import GpuMonitor
from scheduler.policy import GpuReading

MB = 2**20


class FakeNvml:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.inits = 0
        self.shutdowns = 0
        self.used = {0: 1000 * MB, 1: 500 * MB}

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        self.inits += 1
        if self.fail:
            raise self.fail

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:  # noqa: N802
        return {"GPU-aaaa": 1}[uuid]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=self.used[handle], total=8000 * MB)


def test_no_gpus_configured_reads_nothing() -> None:
    nvml = FakeNvml()
    monitor = GpuMonitor((), nvml=nvml)
    assert monitor.readings() == [] and not monitor.enabled and nvml.inits == 0


def test_readings_by_index_and_uuid() -> None:
    nvml = FakeNvml()
    monitor = GpuMonitor(("0", "GPU-aaaa"), nvml=nvml)
    assert monitor.readings() == [GpuReading("0", 1000, 8000), GpuReading("GPU-aaaa", 500, 8000)]
    nvml.used[0] = 7500 * MB
    assert monitor.readings()[0].fraction == pytest.approx(0.9375)
    assert nvml.inits == 1  # initialised once
    monitor.close()
    assert nvml.shutdowns == 1


def test_nvml_failure_turns_pressure_off_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml(fail=RuntimeError("NVML Shared Library Not Found"))
    monitor = GpuMonitor(("0",), nvml=nvml)
    with caplog.at_level(logging.WARNING, logger="scheduler.gpu"):
        assert monitor.readings() == []
        assert monitor.readings() == []
    assert not monitor.enabled
    assert [r.message for r in caplog.records].count(
        "GPU monitor off: NVML is unavailable (RuntimeError: NVML Shared Library Not Found); "
        "GPU-memory reaping and placement are disabled"
    ) == 1


def test_real_pynvml_without_a_driver_is_handled() -> None:
    # This machine has nvidia-ml-py but no NVIDIA driver: the monitor must say so, not raise.
    monitor = GpuMonitor(("0",))
    readings = monitor.readings()
    assert readings == [] or all(r.total_mb > 0 for r in readings)
