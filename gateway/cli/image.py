"""``wanwu image``: build the worker image (or the gateway's own)."""

from __future__ import annotations

import click

from .common import reports_errors


@click.group()
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
@reports_errors
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
