"""Run the gateway: build the Docker-backed pool and serve the app with gunicorn.

The pool lives in the process, so gunicorn runs one worker process with threads (the
``gthread`` worker); threads wait in the pool's queue, not in gunicorn's.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from scheduler.backends.docker import ContainerLimits, DockerBackend, stem_mount_problem
from scheduler.backends.docker_image import export_builtin_model
from scheduler.errors import ImageBuildError, UnknownModel
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings

log = logging.getLogger(__name__)


def build_pool(settings: Settings, start: bool = True) -> WarmPool:
    """A WarmPool over Docker for ``settings``. The default model's bundle is copied
    out of the worker image on first use if the models directory lacks it."""
    backend = DockerBackend(
        settings.worker_image,
        settings.pool_id,
        settings.socket_dir,
        ContainerLimits(memory=settings.worker_memory, pids=settings.worker_pids, cpus=settings.worker_cpus or None),
        settings.spawn_timeout_s,
        environment={
            "WANWU_MAX_PIXELS": str(settings.max_pixels),
            "WANWU_MAX_BODY_BYTES": str(settings.max_upload_bytes),
        },
    )
    backend.ping()
    catalog = ModelCatalog(settings.models_dir)
    try:
        catalog.get(settings.default_model)
    except UnknownModel:
        try:
            path = export_builtin_model(settings.worker_image, settings.default_model, settings.models_dir)
            log.info("copied the built-in model %s from %s to %s", settings.default_model, settings.worker_image, path)
            catalog.refresh()
        except ImageBuildError as exc:
            log.warning("default model %s is not available: %s", settings.default_model, exc)
    if settings.stem_cells:
        problem = stem_mount_problem(settings.models_dir.resolve())
        if problem:  # say it once, and serve with containers only
            log.warning("%s; serving without stem cells", problem)
            settings = settings.replace(stem_cells=0)
    pool = WarmPool(backend, catalog, settings)
    if start:
        pool.start()
    return pool


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """gunicorn serving ``create_app`` in one process with ``threads`` threads."""

    def __init__(self, settings: Settings, host: str, port: int, threads: int) -> None:
        self.settings = settings
        self.options = {
            "bind": f"{host}:{port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 0,  # requests are bounded by the pool's own timeouts
            "graceful_timeout": int(settings.shutdown_grace_s) + 5,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "worker_exit": lambda server, worker: self._drain(),
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from .app import create_app

        app = create_app(self.settings)
        self._pool = app.extensions["wanwu"].pool
        atexit.register(self._drain)  # also on exits gunicorn's hook does not see
        return app

    def _drain(self, *_: object) -> None:
        """Runs once gunicorn has stopped accepting and finished in-flight requests:
        stop every worker container of this pool."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            log.info("shutting down: removing the pool's workers")
            pool.shutdown()
