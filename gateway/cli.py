"""The ``wanwu`` command line. Commands are thin over library functions; errors print
``Name: message`` and exit 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from scheduler.errors import WanwuError

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
@click.option("--flavor", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, envvar="WANWU_FLAVOR")
@click.option("--tag", default=None, help="Image tag [default: wanwu-worker:FLAVOR].")
@click.option(
    "--base-image",
    default=None,
    envvar="WANWU_BASE_IMAGE",
    help="Base image [default: python:3.11-slim if present, else a debootstrapped bookworm].",
)
@click.option("--no-cache", is_flag=True, help="Rebuild every layer.")
@_reports_errors
def image_build(flavor: str, tag: str | None, base_image: str | None, no_cache: bool) -> None:
    """Build wanwu-worker:FLAVOR without needing a registry."""
    from scheduler.backends.docker_image import build_worker_image

    built = build_worker_image(flavor, tag, base_image, no_cache, progress=lambda line: click.echo(line, err=True))
    click.echo(f"{built.tag}: {built.size_bytes / 1e9:.2f} GB from {built.base_image} in {built.seconds:.1f} s")


def main() -> None:
    cli(prog_name="wanwu")
