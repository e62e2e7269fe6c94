"""Run the gateway: build the pool over the configured backend and serve the app with
gunicorn.

The pool lives in the process, so gunicorn runs one worker process with threads (the
``gthread`` worker); threads wait in the pool's queue, not in gunicorn's.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from scheduler.backends.factory import build_pool
from scheduler.pool import WarmPool
from scheduler.settings import Settings

from .app import create_app

log = logging.getLogger(__name__)


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
            # gunicorn's most (its default is 4094): room for a ?labels= list of a few
            # hundred labels; a longer one belongs in the bundle as a named subset.
            "limit_request_line": 8190,
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
        pool = build_pool(self.settings)
        self._pool: WarmPool | None = pool
        app = create_app(self.settings, pool)
        atexit.register(self._drain)  # also on exits gunicorn's hook does not see
        return app

    def _drain(self, *_: object) -> None:
        """Runs once gunicorn has stopped accepting and finished in-flight requests:
        stop every worker of this pool."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            log.info("shutting down: removing the pool's workers")
            pool.shutdown()
