"""GPU memory readings through NVML (the ``pynvml`` module of nvidia-ml-py).

Without configured GPUs nothing is read. If NVML is missing or fails, GPU pressure is
off: the log says so once, and readings are empty until the process restarts.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any, Protocol

from .policy import GpuReading

log = logging.getLogger(__name__)

MB = 2**20


class GpuReader(Protocol):
    """Where the pool's GPU readings come from: NVML here (GpuMonitor), or what a
    backend knows of remote GPUs (the swarm backend's SwarmGpuMonitor)."""

    def readings(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class GpuMonitor:
    def __init__(self, devices: tuple[str, ...], nvml: ModuleType | Any | None = None) -> None:
        self.devices = devices
        self._nvml = nvml
        self._handles: dict[str, Any] | None = None
        self._disabled = not devices
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return not self._disabled

    def _open(self) -> dict[str, Any]:
        if self._handles is not None:
            return self._handles
        nvml = self._nvml
        if nvml is None:
            import pynvml

            nvml = self._nvml = pynvml
        nvml.nvmlInit()
        handles = {}
        for device in self.devices:
            if device.isdigit():
                handles[device] = nvml.nvmlDeviceGetHandleByIndex(int(device))
            else:
                handles[device] = nvml.nvmlDeviceGetHandleByUUID(device)
        self._handles = handles
        return handles

    def readings(self) -> list[GpuReading]:
        """Used and total memory of each configured GPU, in MB; empty when off."""
        if self._disabled:
            return []
        with self._lock:
            try:
                handles = self._open()
                out = []
                for device, handle in handles.items():
                    info = self._nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[union-attr]
                    out.append(GpuReading(device, info.used / MB, info.total / MB))
                return out
            except Exception as exc:  # noqa: BLE001 - ImportError, any NVMLError: NVML is not usable here
                self._disabled = True
                log.warning(
                    "GPU monitor off: NVML is unavailable (%s: %s); GPU-memory reaping and placement are disabled",
                    type(exc).__name__,
                    exc,
                )
                return []

    def close(self) -> None:
        with self._lock:
            if self._handles is not None and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down anyway
                    pass
            self._handles = None
