"""``wanwu pool``: look at a running gateway's pool, and change its settings at run time
(``pool set``: its values are checked by the option types and callbacks here)."""

from __future__ import annotations

import sys
from typing import Any

import click

from scheduler.errors import ConfigError
from scheduler.settings import parse

from ..client import request_json as _request
from .common import print_table, reports_errors, setting_option, url_option


@click.group()
def pool() -> None:
    """Look at a running gateway's pool."""


@pool.command("status")
@url_option
@click.option("--json", "as_json", is_flag=True)
@reports_errors
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
        print_table(("worker", "model", "state", "idle s", "age s", "requests", "gpu MB", "device"), rows)
    counters = ", ".join(
        f"{k} {v}" for k, v in {**body["counters"], **{f"reaped:{k}": v for k, v in body["reaps"].items()}}.items()
    )
    click.echo(counters)


@pool.command("settings")
@url_option
@click.option("--json", "as_json", is_flag=True)
@reports_errors
def pool_settings(url: str, as_json: bool) -> None:
    """The settings that change at run time, and the recent changes."""
    import json

    status, body = _request("GET", f"{url.rstrip('/')}/v1/pool/settings", timeout=10)
    if status != 200:
        _fail(status, body)
    if as_json:
        click.echo(json.dumps(body, ensure_ascii=False, indent=2))
        return
    _print_settings(body)


def _fail(status: int, body: Any) -> None:
    """Say what the gateway refused, and exit 1."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    click.echo(f"{status} {error.get('code', '?')}: {error.get('message', body)}", err=True)
    sys.exit(1)


def _print_settings(body: dict[str, Any]) -> None:
    s = body["settings"]
    ttls = ", ".join(f"{m}={t:g} s" for m, t in s["model_ttl_s"].items()) or "none"
    click.echo(
        f"max_workers {s['max_workers']}, idle_ttl_s {s['idle_ttl_s']:g}, keepalive {s['keepalive']}, "
        f"stem_cells {s['stem_cells']}, model TTLs: {ttls}"
    )
    click.echo(f"admin: {body['admin']}; persisted in: {body['state_file'] or '-'}")
    for change in body["changes"][-5:]:
        what = ", ".join(f"{k} {v['old']!r} -> {v['new']!r}" for k, v in change["changed"].items()) or "no change"
        click.echo(f"  {change['at']} {change['who']}: {what}{' (persisted)' if change['persisted'] else ''}")


def _model_ttl(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float | None]:
    ttls: dict[str, float | None] = {}
    for value in values:
        model, _, seconds = value.partition("=")
        if not model or not seconds:
            raise click.BadParameter(f"{value!r}: expected MODEL=SECONDS or MODEL=default")
        try:  # a model's TTL has the default TTL's bounds (the settings table's)
            ttls[model] = None if seconds == "default" else parse("idle_ttl_s", seconds, f"--model-ttl {model}")
        except ConfigError as exc:
            raise click.BadParameter(f"{exc}; expected MODEL=SECONDS or MODEL=default") from None
    return ttls


def _token_in_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:  # any user of this machine sees the command line (ps, /proc) and the shell history
        raise click.BadParameter(
            "the admin token does not go on the command line, where other users see it: "
            "set WANWU_ADMIN_TOKEN, or put it in a file only you can read and give --token-file PATH",
            ctx,
            param,
        )


def _admin_token(token_file: str | None) -> str:
    """The admin token from ``token_file`` (stripped), or else WANWU_ADMIN_TOKEN."""
    import os
    from pathlib import Path

    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise click.BadParameter(f"cannot read {token_file}: {reason}", param_hint="--token-file") from None
        if not token:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--token-file")
        return token
    token = os.environ.get("WANWU_ADMIN_TOKEN", "").strip()
    if not token:
        raise click.UsageError("give the admin token in WANWU_ADMIN_TOKEN or in a file named by --token-file")
    return token


@pool.command("set")
@url_option
@setting_option("max_workers")
@setting_option("idle_ttl_s")
@setting_option("keepalive")
@setting_option("stem_cells")
@click.option(
    "--model-ttl",
    multiple=True,
    callback=_model_ttl,
    metavar="MODEL=SECONDS",
    help="A model's TTL (repeatable); MODEL=default drops the override.",
)
@click.option("--persist", is_flag=True, help="Also keep the change across restarts (the gateway's state file).")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    envvar="WANWU_ADMIN_TOKEN_FILE",
    help="A file holding the gateway's admin token [WANWU_ADMIN_TOKEN_FILE]; else WANWU_ADMIN_TOKEN.",
)
@click.option("--token", hidden=True, expose_value=False, callback=_token_in_argv)
@reports_errors
def pool_set(
    url: str,
    max_workers: int | None,
    idle_ttl_s: float | None,
    keepalive: str | None,
    stem_cells: int | None,
    model_ttl: dict[str, float | None],
    persist: bool,
    token_file: str | None,
) -> None:
    """Change the pool's settings without a restart, e.g. `wanwu pool set --max-workers 3`.

    The admin token comes from the file --token-file names, or else from the
    environment (WANWU_ADMIN_TOKEN), never from the command line."""
    import getpass
    import socket

    token = _admin_token(token_file)

    body: dict[str, Any] = {
        key: value
        for key, value in (
            ("max_workers", max_workers),
            ("idle_ttl_s", idle_ttl_s),
            ("keepalive", keepalive),
            ("stem_cells", stem_cells),
        )
        if value is not None
    }
    if model_ttl:
        body["model_ttl_s"] = model_ttl
    if not body and not persist:
        raise click.UsageError("nothing to change: give at least one setting (or --persist to save the current ones)")
    if persist:
        body["persist"] = True
    headers = {"Authorization": f"Bearer {token}", "X-Wanwu-Operator": f"{getpass.getuser()}@{socket.gethostname()}"}
    status, answer = _request("PATCH", f"{url.rstrip('/')}/v1/pool/settings", json=body, headers=headers, timeout=30)
    if status != 200:
        _fail(status, answer)
    if not answer["changed"]:
        click.echo("no change: the pool already runs with these settings")
    _print_settings(answer)
