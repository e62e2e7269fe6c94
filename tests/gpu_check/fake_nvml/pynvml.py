"""A stand-in for nvidia-ml-py's ``pynvml`` (``--cpu --fake-gpu``): one GPU whose memory
readings come from the JSON file named by WANWU_GPU_CHECK_FAKE_NVML
(``{"total_mib", "used_mib"}``). The check puts this directory first on the gateway's
PYTHONPATH and raises ``used_mib`` for its ballast, so the pool's GPU-pressure reaping
runs for real on a host without a GPU."""

# ruff: noqa: N802 - the names are pynvml's
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MIB = 2**20


class NVMLError(Exception):
    pass


def _state() -> dict[str, Any]:
    path = os.environ.get("WANWU_GPU_CHECK_FAKE_NVML")
    if not path:
        raise NVMLError("WANWU_GPU_CHECK_FAKE_NVML is not set")
    state: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return state


def nvmlInit() -> None:
    _state()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> str:
    if index != 0:
        raise NVMLError(f"fake NVML has one GPU, not {index}")
    return "fake-0"


def nvmlDeviceGetHandleByUUID(uuid: str) -> str:
    return "fake-0"


def nvmlDeviceGetMemoryInfo(handle: str) -> SimpleNamespace:
    state = _state()
    total, used = int(state["total_mib"] * MIB), int(state["used_mib"] * MIB)
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetComputeRunningProcesses(handle: str) -> list[Any]:
    return []


def nvmlDeviceGetName(handle: str) -> str:
    return "fake GPU (tests/gpu_check/fake_nvml)"


def nvmlDeviceGetUUID(handle: str) -> str:
    return "GPU-00000000-fake"


def nvmlSystemGetDriverVersion() -> str:
    return "fake"


def nvmlSystemGetCudaDriverVersion() -> int:
    return 0
