"""Building a pool: the one place a backend is chosen (``WANWU_BACKEND``) and configured
from the settings, the pool's GPU readings get their source, the default model is
provided, and a ``WarmPool`` is built over them. The gateway, the CLI and ``wanwu
doctor`` receive what this builds and never name a backend themselves.

It lives above ``scheduler/backends/`` (it reads ``Settings`` and builds a ``WarmPool``),
so the backends import neither; it asks a backend what it can do beyond ``Backend``
(providing the default model, remote GPUs) with ``isinstance``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wanwu_worker import contract

from .backends.base import Backend, BuiltinBackend, BundleTools, RemoteGpus
from .backends.limits import ProcessLimits, parse_size
from .errors import ConfigError, UnknownModel, WanwuError
from .gpu import GpuMonitor, GpuReader
from .models import ModelCatalog
from .pool import WarmPool
from .settings import Settings

log = logging.getLogger(__name__)


def worker_environment(settings: Settings) -> dict[str, str]:
    """What every worker is told, whichever backend runs it."""
    return {
        contract.MAX_PIXELS: str(settings.max_pixels),
        contract.MAX_BODY_BYTES: str(settings.max_upload_bytes),
        contract.TORCH_THREADS: str(settings.worker_threads),
    }


def build_backend(settings: Settings) -> BuiltinBackend:
    """The backend ``settings.backend`` names, configured from ``settings``; nothing is
    started and no engine is contacted."""
    if settings.backend == "docker":
        from .backends.docker import DockerBackend
        from .backends.docker_common import ContainerLimits

        limits = ContainerLimits(settings.worker_memory, settings.worker_pids, cpus=settings.worker_cpus or None)
        return DockerBackend(
            settings.worker_image,
            settings.pool_id,
            settings.socket_dir,
            limits,
            settings.spawn_timeout_s,
            environment=worker_environment(settings),
        )
    if settings.backend == "process":
        from .backends.process import ProcessBackend
        from .backends.process_user import parse_worker_user

        try:
            memory = parse_size(settings.worker_memory)
        except ValueError as exc:
            raise ConfigError(f"WANWU_WORKER_MEMORY={settings.worker_memory!r}: {exc}") from None
        return ProcessBackend(
            settings.pool_id,
            settings.socket_dir,
            settings.worker_python,
            ProcessLimits(memory, settings.worker_pids, settings.worker_cpus or None),
            settings.spawn_timeout_s,
            environment=worker_environment(settings),
            worker_uid=parse_worker_user(settings.worker_user),
            models_dir=settings.models_dir,
        )
    if settings.backend == "swarm":
        from .backends.docker_common import ContainerLimits
        from .backends.docker_swarm import SwarmBackend

        limits = ContainerLimits(settings.worker_memory, settings.worker_pids, cpus=settings.worker_cpus or None)
        constraints = tuple(c.strip() for c in settings.swarm_constraints.split(";") if c.strip())
        return SwarmBackend(
            settings.worker_image,
            settings.pool_id,
            settings.swarm_network,
            limits,
            settings.spawn_timeout_s,
            environment=worker_environment(settings),
            constraints=constraints,
            gpu_resource=settings.swarm_gpu_resource,
        )
    raise ConfigError(f"WANWU_BACKEND={settings.backend!r}: expected docker, process or swarm")


# Built-in bundles served beside a built-in default model: its embedding model (the
# same network's pooled features), so /embed works out of the box.
COMPANIONS = {"general": ("general-embed",), "demo-shapes": ("demo-shapes-embed",)}


def build_pool(settings: Settings, start: bool = True, backend: Backend | None = None) -> WarmPool:
    """A WarmPool over the configured backend. The default model's bundle (and its
    COMPANIONS) are provided by the backend (copied out of the worker image, or trained)
    on first use if the models directory lacks them; stem cells are turned off, with a warning, where they could not
    read the models directory."""
    backend = backend or build_backend(settings)
    backend.ping()
    catalog = ModelCatalog(settings.models_dir)
    for name in (settings.default_model, *COMPANIONS.get(settings.default_model, ())):
        try:
            catalog.get(name)
        except UnknownModel:
            _provide_default_model(backend, name, settings.models_dir)
            catalog.refresh()
    problem = backend.stem_problem(settings.models_dir.resolve())
    if problem and settings.stem_cells:  # say it once, and serve without them
        log.warning("%s; serving without stem cells", problem)
        settings = settings.replace(stem_cells=0)
    settings, gpu = gpu_reader(backend, settings)
    pool = WarmPool(backend, catalog, settings, gpu=gpu)
    pool.stem_problem = problem
    if start:
        pool.start()
    return pool


def gpu_reader(backend: Backend, settings: Settings) -> tuple[Settings, GpuReader]:
    """Where the pool's GPU readings come from: NVML on this host, or, for a backend
    whose GPUs are on other hosts (swarm), the backend itself, with ``WANWU_GPUS=auto``
    resolved to the GPUs it advertises. Returns the settings with that resolution."""
    if not isinstance(backend, RemoteGpus):
        return settings, GpuMonitor(settings.gpus)
    if settings.gpus == ("auto",):
        settings = settings.replace(gpus=backend.gpu_devices())
        log.info("GPUs the swarm advertises: %s", ", ".join(settings.gpus) or "none")
    return settings, backend.gpu_monitor(settings.gpus)


def _provide_default_model(backend: Backend, name: str, models_dir: Path) -> None:
    if not isinstance(backend, BundleTools):
        log.warning("default model %s is not available: this backend cannot provide built-in models", name)
        return
    try:
        path = backend.provide_model(name, models_dir)
    except WanwuError as exc:
        log.warning("default model %s is not available: %s", name, exc)
    else:
        log.info("provided the built-in model %s at %s", name, path)
