"""``wanwu doctor``: check what wanwu needs."""

from __future__ import annotations

import sys

import click


@click.command()
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG")
def doctor(config: str | None) -> None:
    """Check what wanwu needs and say how to fix what is missing."""
    from ..doctor import run_checks

    ok = True
    for check in run_checks(config):
        mark = "ok  " if check.ok else "FAIL"
        click.echo(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok:
            ok = False
            click.echo(f"       fix: {check.fix}")
    sys.exit(0 if ok else 1)
