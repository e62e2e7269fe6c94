"""The ``wanwu`` command line. Commands are thin over library functions; errors print
``Name: message`` and exit 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from scheduler.errors import WanwuError
from scheduler.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


def _reports_errors(func: F) -> F:
    """Turn wanwu's own errors into ``Name: message`` and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WanwuError as exc:
            click.echo(f"{type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """wanwu (万物识别): image recognition from a warm pool of worker containers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.group()
def image() -> None:
    """Build the worker image."""


@image.command("build")
@click.option(
    "--target",
    type=click.Choice(["worker", "gateway"]),
    default="worker",
    show_default=True,
    help="The worker image, or the gateway's own image for docker compose.",
)
@click.option(
    "--flavor",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    envvar="WANWU_FLAVOR",
    help="Worker flavour.",
)
@click.option("--tag", default=None, help="Image tag [default: wanwu-worker:FLAVOR or wanwu-gateway:latest].")
@click.option(
    "--base-image",
    default=None,
    envvar="WANWU_BASE_IMAGE",
    help="Base image [default: python:3.11-slim if present, else a debootstrapped bookworm].",
)
@click.option("--no-cache", is_flag=True, help="Rebuild every layer.")
@_reports_errors
def image_build(target: str, flavor: str, tag: str | None, base_image: str | None, no_cache: bool) -> None:
    """Build wanwu-worker:FLAVOR (or the gateway image) without needing a registry."""
    from scheduler.backends.docker_image import build_gateway_image, build_worker_image

    def say(line: str) -> None:
        click.echo(line, err=True)

    if target == "gateway":
        built = build_gateway_image(tag or "wanwu-gateway:latest", base_image, no_cache, progress=say)
    else:
        built = build_worker_image(flavor, tag, base_image, no_cache, progress=say)
    click.echo(f"{built.tag}: {built.size_bytes / 1e9:.2f} GB from {built.base_image} in {built.seconds:.1f} s")


def _settings(config: str | None, **flags: Any) -> Settings:
    return Settings.load(config_file=config, flags=flags)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="WANWU_HOST")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), envvar="WANWU_PORT")
@click.option(
    "--threads",
    default=32,
    show_default=True,
    type=click.IntRange(1, 1024),
    envvar="WANWU_THREADS",
    help="Request threads; requests beyond the pool's capacity wait in its queue.",
)
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG", help="TOML settings file.")
@click.option("--max-workers", type=int, default=None, help="Pool capacity N [WANWU_MAX_WORKERS].")
@click.option("--idle-ttl-s", type=float, default=None, help="Idle seconds before a worker stops [WANWU_IDLE_TTL_S].")
@click.option("--models-dir", default=None, help="Directory of model bundles [WANWU_MODELS_DIR].")
@click.option("--worker-image", default=None, help="Worker image [WANWU_WORKER_IMAGE].")
@click.option("--gpus", default=None, help="GPU ids for workers, e.g. 0,1; empty for CPU [WANWU_GPUS].")
@click.option("--pool-id", default=None, help="Label of this pool's containers [WANWU_POOL_ID].")
@_reports_errors
def serve(host: str, port: int, threads: int, config: str | None, **flags: Any) -> None:
    """Serve the HTTP API (gunicorn, one process, threads)."""
    from .server import GatewayServer

    settings = _settings(config, **flags)
    logging.getLogger().setLevel(settings.log_level)
    click.echo(
        f"wanwu: serving {settings.default_model} on http://{host}:{port} "
        f"(N={settings.max_workers}, TTL={settings.idle_ttl_s:g} s, image {settings.worker_image})",
        err=True,
    )
    GatewayServer(settings, host, port, threads).run()


def _url_option(func: F) -> F:
    return click.option(
        "--url", default="http://127.0.0.1:8080", show_default=True, envvar="WANWU_URL", help="The gateway's address."
    )(func)


def _request(method: str, url: str, **kwargs: Any) -> Any:
    import requests

    try:
        response = requests.request(method, url, timeout=kwargs.pop("timeout", 120), **kwargs)
    except requests.RequestException as exc:
        raise GatewayUnreachable(f"cannot reach {url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        raise GatewayUnreachable(f"{url} answered {response.status_code} without JSON: {response.text[:200]}") from None
    return response.status_code, body


class GatewayUnreachable(WanwuError):
    """The gateway did not answer, or not with JSON."""


@cli.command()
@_url_option
@click.option(
    "--model", default=None, envvar="WANWU_DEFAULT_MODEL", help="Model name [default: the gateway's default]."
)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file instead of a table.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_reports_errors
def predict(url: str, model: str | None, top_k: int, as_json: bool, files: tuple[str, ...]) -> None:
    """Classify FILES through a running gateway."""
    import json
    from pathlib import Path

    endpoint = f"{url.rstrip('/')}/v1/models/{model}/predict" if model else f"{url.rstrip('/')}/predict"
    failed = 0
    rows: list[tuple[str, ...]] = []
    for name in files:
        with open(name, "rb") as handle:
            status, body = _request(
                "POST", endpoint, params={"top_k": top_k}, files={"image": (Path(name).name, handle)}
            )
        if as_json:
            click.echo(json.dumps({"file": name, "status": status, **body}, ensure_ascii=False))
        if status != 200:
            failed += 1
            error = body.get("error", {})
            rows.append((name, f"{error.get('code', status)}: {error.get('message', '')}", "", "", ""))
            continue
        top = body["predictions"][0]
        cold = "cold" if body.get("cold_start") else ("cached" if body.get("cached") else "warm")
        rows.append((name, top["label"], f"{top['score']:.3f}", cold, f"{body['timing_ms']['total']:.1f}"))
    if not as_json:
        _table(("file", "label", "score", "start", "ms"), rows)
    if failed:
        sys.exit(1)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    import unicodedata

    def width(text: str) -> int:  # CJK labels take two columns
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    widths = [max([width(h)] + [width(r[i]) for r in rows]) for i, h in enumerate(header)]
    for row in (header, *rows):
        click.echo("  ".join(cell + " " * (w - width(cell)) for cell, w in zip(row, widths, strict=True)).rstrip())


@cli.group()
def pool() -> None:
    """Look at a running gateway's pool."""


@pool.command("status")
@_url_option
@click.option("--json", "as_json", is_flag=True)
@_reports_errors
def pool_status(url: str, as_json: bool) -> None:
    """Workers, queue and counters of the pool."""
    import json

    _, body = _request("GET", f"{url.rstrip('/')}/v1/pool", timeout=10)
    if as_json:
        click.echo(json.dumps(body, ensure_ascii=False, indent=2))
        return
    workers = body["workers"]
    click.echo(f"{len(workers)}/{body['capacity']} workers, {body['queue_depth']} waiting")
    rows = [
        (
            w["id"],
            w["model"],
            w["state"],
            "-" if w["idle_s"] is None else f"{w['idle_s']:.1f}",
            f"{w['age_s']:.0f}",
            str(w["requests"]),
            f"{w['gpu_mb']:.0f}",
            w["device"] or "cpu",
        )
        for w in workers
    ]
    if rows:
        _table(("worker", "model", "state", "idle s", "age s", "requests", "gpu MB", "device"), rows)
    counters = ", ".join(
        f"{k} {v}" for k, v in {**body["counters"], **{f"reaped:{k}": v for k, v in body["reaps"].items()}}.items()
    )
    click.echo(counters)


@cli.command()
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG")
def doctor(config: str | None) -> None:
    """Check what wanwu needs and say how to fix what is missing."""
    from .doctor import run_checks

    ok = True
    for check in run_checks(config):
        mark = "ok  " if check.ok else "FAIL"
        click.echo(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok:
            ok = False
            click.echo(f"       fix: {check.fix}")
    sys.exit(0 if ok else 1)


def main() -> None:
    cli(prog_name="wanwu")


if __name__ == "__main__":
    main()
