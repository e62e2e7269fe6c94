"""``wanwu serve``: the HTTP API. Its flags become settings here, through
:func:`.common.load_settings`."""

from __future__ import annotations

import logging
from typing import Any

import click

from .common import load_settings, reports_errors, setting_option


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="WANWU_HOST")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), envvar="WANWU_PORT")
@setting_option("http_threads", "--threads", "http_threads", envvar="WANWU_THREADS")
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG", help="TOML settings file.")
@setting_option("max_workers")
@setting_option("idle_ttl_s")
@setting_option("models_dir")
@setting_option("worker_image")
@setting_option("gpus")
@setting_option("pool_id")
@reports_errors
def serve(host: str, port: int, config: str | None, **flags: Any) -> None:
    """Serve the HTTP API (waitress, one process, threads; gateway/server.py)."""
    from ..server import GatewayServer

    settings = load_settings(config, **flags)
    logging.getLogger().setLevel(settings.log_level)
    click.echo(
        f"wanwu: serving {settings.default_model} on http://{host}:{port} "
        f"(N={settings.max_workers}, TTL={settings.idle_ttl_s:g} s, image {settings.worker_image})",
        err=True,
    )
    GatewayServer(settings, host, port).run()
