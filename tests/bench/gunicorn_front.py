"""The front wanwu had before waitress (gunicorn's gthread worker, one process), kept
only as the benchmark's baseline: ``python -m tests.bench.gunicorn_front --port P``
serves the same app over the same pool, configured from the same WANWU_* variables."""

from __future__ import annotations

import argparse
import atexit
from typing import Any

from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

from gateway.app import create_app
from scheduler.assembly import build_pool
from scheduler.settings import Settings


class GunicornFront(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings = settings
        self.options = {
            "bind": f"{host}:{port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": settings.http_threads,
            "timeout": 0,
            "keepalive": 5,
            "limit_request_line": 8190,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        pool = build_pool(self.settings)
        atexit.register(pool.shutdown)
        return create_app(self.settings, pool)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    GunicornFront(Settings.load(), args.host, args.port).run()


if __name__ == "__main__":
    main()
