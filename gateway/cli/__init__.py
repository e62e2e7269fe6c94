"""The ``wanwu`` command line. Commands are thin over library functions; errors print
``Name: message`` and exit 1.

The root group is here; each command (or group of commands) lives in its own module and
is registered below. What several of them share is in :mod:`.common`."""

from __future__ import annotations

import logging

import click
from wanwu_worker.logs import configure as configure_logging

from . import backfill, bundle, doctor, image, pool, predict, replay, serve, tune


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """wanwu (万物识别): image recognition from a warm pool of worker containers."""
    configure_logging(logging.DEBUG if verbose else logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")


for _command in (
    image.image,
    serve.serve,
    predict.predict,
    pool.pool,
    doctor.doctor,
    tune.tune,
    replay.replay,
    backfill.backfill,
    bundle.bundle,
):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="wanwu")
