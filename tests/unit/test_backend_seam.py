"""The backend seam: what each built-in backend is beyond ``Backend``, and a pool over a
backend that is nothing more (``CoreBackend``): it starts, serves and reports ready
without orphan removal, readiness checks, bundle tools or remote GPUs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.assembly import build_pool, gpu_reader
from scheduler.backends.base import BundleTools, RemoteGpus, RemovesOrphans, ReportsReadiness
from scheduler.backends.docker import DockerBackend
from scheduler.backends.docker_swarm import SwarmBackend
from scheduler.backends.process import ProcessBackend
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import GpuReading
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.unit.fakes import CoreBackend, FakeBackend, FakeClock, make_bundle

OPTIONAL = (RemovesOrphans, ReportsReadiness, BundleTools, RemoteGpus)


@pytest.mark.parametrize(
    ("backend", "protocols"),
    [
        (DockerBackend, {RemovesOrphans, ReportsReadiness, BundleTools}),
        (ProcessBackend, {RemovesOrphans, ReportsReadiness, BundleTools}),
        (SwarmBackend, {RemovesOrphans, ReportsReadiness, BundleTools, RemoteGpus}),
        (FakeBackend, {RemovesOrphans, ReportsReadiness}),
        (CoreBackend, set()),
    ],
)
def test_each_backend_is_what_base_py_says(backend: type, protocols: set[type]) -> None:
    assert {p for p in OPTIONAL if issubclass(backend, p)} == protocols


class Readings:
    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices

    def readings(self) -> list[GpuReading]:
        return [GpuReading(device, 0.0, 1000.0) for device in self.devices]

    def close(self) -> None:
        pass


class RemoteBackend(CoreBackend):
    """A backend whose GPUs are elsewhere, as the swarm's are."""

    def gpu_devices(self) -> tuple[str, ...]:
        return ("n1/GPU-0", "n2/GPU-0")

    def gpu_monitor(self, devices: tuple[str, ...]) -> Readings:
        return Readings(devices)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[tuple[WarmPool, CoreBackend]]:
    make_bundle(tmp_path, "a")
    backend = CoreBackend()
    backend.fake.orphans = ["left-over"]  # never asked for: the backend cannot remove orphans
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path, default_model="a", stem_cells=0)
    pool = WarmPool(backend, ModelCatalog(tmp_path, clock=clock), settings, clock=clock, executor=INLINE)
    assert pool.start(background=False) == []
    yield pool, backend
    pool.shutdown(grace_s=0)


def test_a_pool_over_a_core_backend_serves_and_reports_ready_without_backend_checks(
    core: tuple[WarmPool, CoreBackend],
) -> None:
    pool, backend = core
    assert pool.predict("a", b"x").predictions[0]["label"] == "a:x"
    assert [r.model for r in backend.fake.spawns] == ["a"]
    assert set(pool.readiness()) == {"model", "pool"}
    assert backend.fake.orphans == ["left-over"]


def test_gpu_readings_come_from_nvml_unless_the_backend_reads_remote_gpus() -> None:
    settings, reader = gpu_reader(CoreBackend(), Settings(gpus=("0",)))
    assert isinstance(reader, GpuMonitor) and settings.gpus == ("0",)
    settings, reader = gpu_reader(RemoteBackend(), Settings(backend="swarm", gpus=("auto",)))
    assert settings.gpus == ("n1/GPU-0", "n2/GPU-0")
    assert [r.device for r in reader.readings()] == ["n1/GPU-0", "n2/GPU-0"]


def test_a_backend_without_bundle_tools_serves_without_providing_the_default_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "scheduler.assembly"):
        pool = build_pool(Settings(models_dir=tmp_path, default_model="general"), start=False, backend=CoreBackend())
    try:
        assert "default model general is not available: this backend cannot provide built-in models" in caplog.text
        assert "default model general-embed is not available" in caplog.text
        assert pool.readiness()["model"][0] is False
    finally:
        pool.shutdown(grace_s=0)
