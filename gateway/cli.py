"""The ``wanwu`` command line. Commands are thin over library functions; errors print
``Name: message`` and exit 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click
from wanwu_worker.logs import configure as configure_logging

from scheduler.errors import WanwuError
from scheduler.keepalive import POLICIES as KEEPALIVE_POLICIES
from scheduler.settings import Settings

from .client import request_json as _request

if TYPE_CHECKING:  # the simulator and its profiles are imported only by the commands that need them
    from scheduler.profiles import Profile

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
    configure_logging(logging.DEBUG if verbose else logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    "http_threads",
    default=None,
    type=click.IntRange(1, 1024),
    envvar="WANWU_THREADS",
    help="Threads that run requests, each read whole first [WANWU_HTTP_THREADS, default 32].",
)
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG", help="TOML settings file.")
@click.option("--max-workers", type=int, default=None, help="Pool capacity N [WANWU_MAX_WORKERS].")
@click.option("--idle-ttl-s", type=float, default=None, help="Idle seconds before a worker stops [WANWU_IDLE_TTL_S].")
@click.option("--models-dir", default=None, help="Directory of model bundles [WANWU_MODELS_DIR].")
@click.option("--worker-image", default=None, help="Worker image [WANWU_WORKER_IMAGE].")
@click.option("--gpus", default=None, help="GPU ids for workers, e.g. 0,1; empty for CPU [WANWU_GPUS].")
@click.option("--pool-id", default=None, help="Label of this pool's containers [WANWU_POOL_ID].")
@_reports_errors
def serve(host: str, port: int, config: str | None, **flags: Any) -> None:
    """Serve the HTTP API (waitress, one process, threads; gateway/server.py)."""
    from .server import GatewayServer

    settings = _settings(config, **flags)
    logging.getLogger().setLevel(settings.log_level)
    click.echo(
        f"wanwu: serving {settings.default_model} on http://{host}:{port} "
        f"(N={settings.max_workers}, TTL={settings.idle_ttl_s:g} s, image {settings.worker_image})",
        err=True,
    )
    GatewayServer(settings, host, port).run()


def _url_option(func: F) -> F:
    return click.option(
        "--url", default="http://127.0.0.1:8080", show_default=True, envvar="WANWU_URL", help="The gateway's address."
    )(func)


_lang_option = click.option(
    "--lang", default=None, help="Answer in this language, e.g. en [default: the model's own labels]."
)


def _query(**params: object) -> dict[str, object]:
    """Query parameters without the ones left unset."""
    return {key: value for key, value in params.items() if value is not None}


@cli.command()
@_url_option
@click.option(
    "--model", default=None, envvar="WANWU_DEFAULT_MODEL", help="Model name [default: the gateway's default]."
)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, 1000))
@_lang_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file instead of a table.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_reports_errors
def predict(url: str, model: str | None, top_k: int, lang: str | None, as_json: bool, files: tuple[str, ...]) -> None:
    """Classify FILES through a running gateway."""
    import json
    from pathlib import Path

    endpoint = f"{url.rstrip('/')}/v1/models/{model}/predict" if model else f"{url.rstrip('/')}/predict"
    failed = 0
    rows: list[tuple[str, ...]] = []
    for name in files:
        with open(name, "rb") as handle:
            status, body = _request(
                "POST", endpoint, params=_query(top_k=top_k, lang=lang), files={"image": (Path(name).name, handle)}
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


@pool.command("settings")
@_url_option
@click.option("--json", "as_json", is_flag=True)
@_reports_errors
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
        try:
            ttls[model] = None if seconds == "default" else float(seconds)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected MODEL=SECONDS or MODEL=default") from None
        if not model or (ttls[model] is not None and not ttls[model] > 0):  # type: ignore[operator]
            raise click.BadParameter(f"{value!r}: expected MODEL=SECONDS (> 0) or MODEL=default")
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
@_url_option
@click.option("--max-workers", type=click.IntRange(1), default=None, help="Pool capacity N.")
@click.option("--idle-ttl-s", type=click.FloatRange(min=0, min_open=True), default=None, help="Default idle TTL.")
@click.option("--keepalive", type=click.Choice(KEEPALIVE_POLICIES), default=None)
@click.option("--stem-cells", type=click.IntRange(0), default=None, help="Stem cells to keep ready.")
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
@_reports_errors
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


def _numbers(kind: Callable[[str], Any], what: str) -> Callable[[click.Context, click.Parameter, str], list[Any]]:
    """A click callback parsing a comma-separated list, e.g. ``--ttl 10,30,60``."""

    def parse(ctx: click.Context, param: click.Parameter, raw: str) -> list[Any]:
        try:
            values = [kind(item.strip()) for item in raw.split(",") if item.strip()]
        except ValueError:
            raise click.BadParameter(f"{raw!r}: expected {what} separated by commas") from None
        if not values or any(not 0 <= v < float("inf") for v in values):  # also refuses nan and inf
            raise click.BadParameter(f"{raw!r}: expected {what} (>= 0, finite) separated by commas")
        return values

    return parse


def _policies(ctx: click.Context, param: click.Parameter, raw: str) -> list[str]:
    from scheduler.keepalive import POLICIES

    values = [item.strip() for item in raw.split(",") if item.strip()]
    unknown = [v for v in values if v not in POLICIES]
    if not values or unknown:
        raise click.BadParameter(f"{raw!r}: expected some of {', '.join(POLICIES)} separated by commas")
    return values


def _minutes(ctx: click.Context, param: click.Parameter, raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    try:
        first, last = (int(part) for part in raw.split(":"))
    except ValueError:
        raise click.BadParameter(f"{raw!r}: expected A:B, minutes from the trace's start, e.g. 600:660") from None
    if not 0 <= first < last:
        raise click.BadParameter(f"{raw!r}: expected 0 <= A < B")
    return first, last


def _trace_options(func: F) -> F:
    func = click.option("--seed", default=0, show_default=True, help="Seed for spreading a minute's requests.")(func)
    func = click.option(
        "--minutes", callback=_minutes, default=None, help="Only minutes A to B of the trace, e.g. 600:660."
    )(func)
    func = click.option(
        "--max-per-day",
        type=click.FloatRange(min=0),
        default=None,
        help="Keep only models with at most this many requests a day (the low-QPS traffic wanwu is for).",
    )(func)
    return click.argument("trace", type=click.Path(exists=True))(func)


class _ProfileFigure(click.Option):
    """A ``wanwu tune`` option that defaults to the profile's figure: the general model's
    (scheduler.profiles.GENERAL_PROFILE, shown in --help and read only then, so the CLI starts
    without the simulator) or --profile's."""

    def get_help_extra(self, ctx: click.Context) -> Any:
        from scheduler.profiles import GENERAL_PROFILE

        extra = super().get_help_extra(ctx)
        name = self.name or ""
        unit = "MB" if name.endswith("_mb") else "ms"
        extra["default"] = f"{getattr(GENERAL_PROFILE, name):g} {unit}, the general model's; or --profile's"
        return extra


def _figure_or_trace(ctx: click.Context, param: click.Parameter, raw: str | None) -> float | str | None:
    """A number >= 0, or ``trace``: each model's own figure from the trace; None when not given."""
    if raw is None:
        return None
    text = raw.strip().lower()
    if text == "trace":
        return text
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not 0 <= number < float("inf"):  # also refuses nan and inf
        raise click.BadParameter(f"{raw!r}: expected a number >= 0, or 'trace' (each model's own, from the trace)")
    return number


def _bundle_profile(ctx: click.Context, param: click.Parameter, raw: str | None) -> tuple[Profile, str] | None:
    """``--profile PATH``: (the bundle's Profile, where it came from), or None."""
    if raw is None:
        return None
    from scheduler.profiles import load_bundle_profile
    from scheduler.tuning import TuneError

    try:
        return load_bundle_profile(raw)
    except TuneError as exc:
        raise click.BadParameter(str(exc)) from None


_PROFILE_FIGURES = ("spawn_ms", "load_ms", "infer_ms", "stop_ms", "memory_mb", "stem_memory_mb", "failure_rate")


@cli.command()
@_trace_options
@click.option(
    "--max-workers",
    "workers",
    default="1,2,4,8",
    show_default=True,
    callback=_numbers(int, "integers"),
    help="Pool sizes N to try; 0 means unbounded.",
)
@click.option(
    "--ttl",
    default="10,30,60,120,300,600",
    show_default=True,
    callback=_numbers(float, "seconds"),
    help="Idle TTLs to try (the fallback TTL of the adaptive policy).",
)
@click.option(
    "--keepalive", default="fixed,adaptive", show_default=True, callback=_policies, help="Keep-alive policies to try."
)
@click.option(
    "--stem-cells",
    "stems",
    default="0,1",
    show_default=True,
    callback=_numbers(int, "integers"),
    help="Stem cells kept ready, to try (WANWU_STEM_CELLS).",
)
@click.option(
    "--profile",
    "bundle",
    type=click.Path(exists=True),
    callback=_bundle_profile,
    help="A bundle directory or its bundle_report.json (written by wanwu bundle create): its measured load, "
    "warm-up, inference and GPU memory in place of the general model's; flags below still override.",
)
@click.option(
    "--load-ms",
    cls=_ProfileFigure,
    type=click.FloatRange(min=0),
    help="A stem cell's model load and warm-up (a stem cell starts in --spawn-ms less this).",
)
@click.option(
    "--stem-memory-mb",
    cls=_ProfileFigure,
    type=click.FloatRange(min=0),
    help="GPU memory a waiting stem cell holds (the CUDA context).",
)
@click.option(
    "--spawn-ms",
    cls=_ProfileFigure,
    type=click.FloatRange(min=0),
    help="Cold start-up time of a worker (measure yours: make bench, or wanwu replay).",
)
@click.option(
    "--stop-ms",
    cls=_ProfileFigure,
    type=click.FloatRange(min=0),
    help="Time to stop and remove a worker (it holds its slot meanwhile).",
)
@click.option(
    "--infer-ms",
    cls=_ProfileFigure,
    callback=_figure_or_trace,
    metavar="NUMBER|trace",
    help="Every request's inference time; 'trace': each model's own durations from the trace (an Azure "
    "function's run.csv, minutes for some). An access log's default is its own worker times per model.",
)
@click.option(
    "--memory-mb",
    cls=_ProfileFigure,
    callback=_figure_or_trace,
    metavar="NUMBER|trace",
    help="GPU memory a worker holds; 'trace': each model's from the trace (an Azure trace's mem.csv is "
    "its functions' host memory, not a model's GPU memory; an access log has none).",
)
@click.option(
    "--failure-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0, max=1, max_open=True),
    help="The share of worker calls that crash or time out: the core tries such a request once more on "
    "another worker, as the live pool does, so the replay shows what retries cost.",
)
@click.option("--queue-timeout-s", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--queue-max", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--tick-s",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Keep-alive ends noticed only on multiples of this; 0: exact, as the live pool's timer ticks.",
)
@click.option(
    "--max-cold-rate", type=click.FloatRange(0, 1), default=None, help="Target: at most this cold-start rate."
)
@click.option("--max-p99-ms", type=click.FloatRange(min=0), default=None, help="Target: at most this p99 latency.")
@click.option(
    "--max-reject-rate",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Target: at most this 503 rate.",
)
@click.option(
    "--max-idle-gb-h",
    type=click.FloatRange(min=0),
    default=None,
    help="Target: at most this many idle GPU-memory GB-hours (alone: the fewest cold starts within it).",
)
@click.option(
    "--plot", "plot_file", type=click.Path(dir_okay=False), default=None, help="Write a PNG of the trade-off."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--jobs", default=None, type=click.IntRange(min=1), help="Processes [default: the number of CPUs].")
@_reports_errors
def tune(
    trace: str,
    max_per_day: float | None,
    minutes: tuple[int, int] | None,
    seed: int,
    workers: list[int],
    ttl: list[float],
    keepalive: list[str],
    stems: list[int],
    bundle: tuple[Profile, str] | None,
    load_ms: float | None,
    stem_memory_mb: float | None,
    spawn_ms: float | None,
    stop_ms: float | None,
    infer_ms: float | str | None,
    memory_mb: float | str | None,
    failure_rate: float,
    queue_timeout_s: float,
    queue_max: int,
    tick_s: float,
    max_cold_rate: float | None,
    max_p99_ms: float | None,
    max_reject_rate: float,
    max_idle_gb_h: float | None,
    plot_file: str | None,
    as_json: bool,
    jobs: int | None,
) -> None:
    """Replay TRACE through the pool simulator over a grid of N, TTL and keep-alive policy.

    TRACE is a directory in the Azure Functions 2019 format (inv.csv, run.csv, mem.csv)
    or the gateway's JSON access log (WANWU_ACCESS_LOG). Each function of an Azure trace
    is treated as a separate model with one and the same profile: the general model's
    spawn, load, inference and GPU memory (or --profile's), so N workers are shared by
    as many "models" as the trace has functions (50 in the Azure sample), each needing
    its own warm worker. The trace gives when each model is asked for; --infer-ms trace
    and --memory-mb trace take each function's own durations and memory instead. An
    access log's inference times are the model's own and are used unless --infer-ms or
    --profile says otherwise. The stderr header says which profile was used.

    Prints cold-start rate, 503 rate, latency and idle cost for every point, marks the
    Pareto front (cold starts against idle GB-hours, among the points within the 503
    target; the others are marked "rejects") and recommends the cheapest point that
    meets the target.
    """
    import json
    import os
    from pathlib import Path

    from scheduler import tuning
    from scheduler.core import CoreConfig
    from scheduler.profiles import resolve_profile
    from scheduler.sim import Grid, run_grid
    from scheduler.traces import load_trace

    loaded = load_trace(trace, max_per_day=max_per_day, minutes=minutes, seed=seed)
    if not loaded.arrivals:
        raise tuning.TuneError(f"{trace}: no requests left to replay (check --max-per-day and --minutes)")
    target = tuning.Target(max_cold_rate, max_p99_ms, max_reject_rate, max_idle_gb_h)
    access_log = not Path(trace).is_dir()
    figures = {
        "spawn_ms": spawn_ms,
        "load_ms": load_ms,
        "stop_ms": stop_ms,
        "stem_memory_mb": stem_memory_mb,
        "failure_rate": failure_rate or None,
    }
    profile, source = resolve_profile(bundle, access_log, infer_ms, memory_mb, figures)
    if profile.memory_mb is None and not any(p.memory_mb for p in loaded.profiles.values()):
        click.echo("wanwu tune: the trace has no memory figures, so idle GB-hours are 0; pass --memory-mb", err=True)
    grid = Grid(workers, ttl, keepalive, stems)
    base = CoreConfig(capacity=1, default_ttl_s=30, queue_max=queue_max)
    size = len(workers) * len(ttl) * len(keepalive) * len(stems)
    models = len(loaded.models())
    click.echo(
        f"wanwu tune: {len(loaded.arrivals)} requests to {models} models over {loaded.span_s / 3600:.1f} h "
        f"({'access log' if access_log else 'Azure Functions trace'}), {size} points\n"
        f"wanwu tune: each of the {models} models as {source}: {profile.describe()}",
        err=True,
    )
    with click.progressbar(length=size, label="simulating", file=sys.stderr) as bar:
        points, speed = run_grid(
            loaded, grid, profile, base, queue_timeout_s, tick_s or None, seed, jobs or os.cpu_count() or 1, bar.update
        )
    front = tuning.pareto_front(points, max_reject_rate)
    chosen, reason = tuning.recommend(points, target)
    if plot_file:
        tuning.plot(points, front, chosen, plot_file, title=f"wanwu tune: {trace}", max_reject_rate=max_reject_rate)
    if as_json:
        extra = {
            "trace": trace,
            "requests": len(loaded.arrivals),
            "models": len(loaded.models()),
            "profile": {"source": source, **{key: getattr(profile, key) for key in _PROFILE_FIGURES}},
            "simulated_requests_per_s": round(speed),
        }
        click.echo(json.dumps(tuning.report_json(points, chosen, target, reason, extra), ensure_ascii=False))
        return
    click.echo(tuning.format_table(points, front, chosen, max_reject_rate))
    click.echo(
        f"\n* on the Pareto front (no other point within the 503 target has fewer cold starts for less idle "
        f"memory); rejects: more 503s than {max_reject_rate * 100:g}%, off the front and never recommended"
    )
    for line in tuning.compare_keepalive(points, max_reject_rate):
        click.echo(line)
    click.echo(f"\nrecommended for {target.describe()}: {reason}")
    click.echo(f"simulator: {speed:,.0f} requests/s of wall time per process")
    if plot_file:
        click.echo(f"plot: {plot_file}")


@cli.command()
@_trace_options
@_url_option
@click.option(
    "--speedup",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Compress the trace's time by this factor.",
)
@click.option(
    "--model",
    "models",
    default=None,
    help="Model(s) to send to, comma-separated; the trace's functions are spread over them in turn "
    "[default: models the gateway serves keep their names, the rest go to its default model].",
)
@click.option(
    "--stop-ms",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="For the prediction: time to stop and remove a worker.",
)
@click.option(
    "--spawn-ms",
    default=None,
    type=click.FloatRange(min=0),
    help="For the prediction, when no answer came from a new container: its start-up time "
    "[default: the pool's last, or a stem cell's start and load].",
)
@click.option(
    "--concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Most requests in flight at once.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: measured and predicted.")
@_reports_errors
def replay(
    trace: str,
    max_per_day: float | None,
    minutes: tuple[int, int] | None,
    seed: int,
    url: str,
    speedup: float,
    models: str | None,
    stop_ms: float,
    spawn_ms: float | None,
    concurrency: int,
    as_json: bool,
) -> None:
    """Play TRACE against a live gateway in compressed time, then print what was measured
    beside what the simulator predicts for the gateway's own settings."""
    import json

    from .replay import replay_trace

    def say(line: str) -> None:
        click.echo(line, err=True)

    report = replay_trace(
        trace,
        url,
        speedup,
        minutes=minutes,
        max_per_day=max_per_day,
        seed=seed,
        models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
        stop_ms=stop_ms,
        spawn_ms=spawn_ms,
        concurrency=concurrency,
        progress=say,
    )
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    measured, predicted = report["measured"], report["predicted"] or {}
    rows = [
        (key, _show(measured[key]), _show(predicted[key]) if key in predicted else "-")
        for key in ("requests", "cold_starts", "stem_starts", "cold_rate", "reject_rate", "errors", "p50_ms", "p99_ms")
    ]
    _table(("", "measured", "predicted"), rows)
    if measured.get("client_bound"):
        click.echo(
            f"{measured['client_bound']} requests got 429: the replay, one client, had the gateway's "
            "client_max_requests in flight; raise WANWU_CLIENT_MAX_REQUESTS on the gateway for a replay",
            err=True,
        )
    if "note" in report:
        click.echo(f"no prediction: {report['note']}")
        return
    settings, profile = report["settings"], report["profile"]
    click.echo(
        f"slice {report['slice']}, speed-up {report['speedup']:g}x; predicted with N={settings['max_workers']}, "
        f"TTL {settings['idle_ttl_s']:g} s, {settings['keepalive']} keep-alive, "
        f"spawn {profile['spawn_ms']:.0f} ms, inference {profile['infer_ms']:.1f} ms (measured)"
    )


@cli.command()
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSON-lines results; a rerun resumes it. OUT.options.json beside it keeps the --model, --top-k and --lang "
    "its lines were made with; resuming with others is refused (exit 2).",
)
@_url_option
@click.option("--model", default=None, help="Model name [default: the gateway's default].")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@_lang_option
@click.option(
    "--glob",
    default=None,
    help="Only files whose path under SOURCE matches, case-sensitive; '*' also crosses '/': '*.png' is any PNG, "
    "'cams/**/*.jpg' any JPEG under cams [default: image extensions, any case].",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1, 10000),
    help="Images a request (at most the gateway's max_batch_images).",
)
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256), help="Requests in flight.")
@click.option(
    "--timeout",
    "timeout_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may take.",
)
@click.option(
    "--max-retries",
    default=8,
    show_default=True,
    type=click.IntRange(0, 10000),
    help="Retries of an unreachable gateway (then exit 3), of a failed request and of an image's retryable error "
    "(then its files get no line and are left for the next run: exit 4); 503s are retried for ever.",
)
@click.option(
    "--fsync-interval",
    "fsync_interval_s",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between fsyncs of --out (and one at the end).",
)
@click.option(
    "--progress-interval",
    "progress_interval_s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between progress lines when stderr is not a terminal.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@click.option(
    "--nice",
    default=10,
    show_default=True,
    type=click.IntRange(0, 19),
    help="Lower this process's CPU priority, so live traffic on the same host comes first (0: leave it).",
)
@click.option(
    "--summary-json", type=click.Path(dir_okay=False), default=None, help="Write the summary as JSON to this file."
)
@_reports_errors
def backfill(
    source: str,
    out: str,
    url: str,
    model: str | None,
    top_k: int,
    lang: str | None,
    glob: str | None,
    batch_size: int,
    concurrency: int,
    timeout_s: float,
    max_retries: int,
    fsync_interval_s: float,
    progress_interval_s: float,
    quiet: bool,
    nice: int,
    summary_json: str | None,
) -> None:
    """Classify every image under SOURCE (a directory, or a file listing paths) through a
    running gateway at batch priority, one JSON line per file in --out.

    Rerunning the same command resumes: files already in --out are skipped, and a run
    stopped at any moment (Ctrl-C, a crash) leaves no file twice. Files whose transient
    errors outlast --max-retries get no line, so a rerun retries them. Resuming with
    another --model, --top-k or --lang than OUT.options.json records is refused; a --out
    with lines but no OUT.options.json (from an older wanwu) is resumed with a warning,
    and the options given now are recorded.

    Exit status: 0 done, 1 some files got error lines (or the job stopped on an error),
    2 usage errors (other options than --out was made with), 3 the gateway is unreachable,
    4 some files are left for the next run (rerun to retry them) and none got an error
    line (1 wins), 130 interrupted.
    """
    import json
    import os
    import threading

    if nice:
        os.nice(nice)
    from .backfill import RESUME_HINT, Backfill, Options, OptionsMismatch, Reporter, ResultsFile, Source, interrupts
    from .client import GatewayUnreachable

    reporter = Reporter(sys.stderr, show_progress=not quiet, interval_s=progress_interval_s)
    options = Options(url, model, top_k, batch_size, concurrency, timeout_s, max_retries, lang=lang)
    stop = threading.Event()
    try:
        job = Backfill(
            Source.open(source, glob, reporter.say), ResultsFile(out, fsync_interval_s), options, reporter=reporter
        )
        with interrupts(job, stop):
            summary = job.run(stop)
    except OptionsMismatch as exc:
        raise click.UsageError(str(exc)) from exc
    except GatewayUnreachable as exc:
        click.echo(f"wanwu backfill: {exc}", err=True)
        sys.exit(3)
    except KeyboardInterrupt:  # before anything was sent
        click.echo(f"interrupted: {RESUME_HINT}", err=True)
        sys.exit(130)
    for line in summary.describe():
        click.echo(line, err=True)
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as handle:
            json.dump(summary.to_json(), handle, ensure_ascii=False, indent=2)
    if summary.fatal:
        click.echo(f"BackfillError: {summary.fatal}", err=True)
    elif summary.unreachable:
        click.echo(f"wanwu backfill: {summary.unreachable}", err=True)
    elif summary.interrupted:
        click.echo(f"interrupted: {RESUME_HINT}", err=True)
    elif summary.left_for_next_run:
        click.echo(f"incomplete: {summary.left_for_next_run} files left for the next run; {RESUME_HINT}", err=True)
    sys.exit(summary.exit_status)


@cli.group()
def bundle() -> None:
    """Make and check model bundles."""


def _triple(ctx: click.Context, param: click.Parameter, raw: str | None) -> tuple[float, float, float] | None:
    if raw is None:
        return None
    try:
        values = tuple(float(part) for part in raw.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{raw!r}: expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise click.BadParameter(f"{raw!r}: expected three numbers (R, G, B), got {len(values)}")
    return (values[0], values[1], values[2])


def _bundle_backend(config: str | None, device: str | None) -> tuple[Any, str | None]:
    """The configured backend, and the GPU to check on: --device, else the first of
    WANWU_GPUS, else none (the CPU)."""
    from scheduler.backends.factory import build_backend

    settings = _settings(config)
    if device in ("", "cpu"):
        return build_backend(settings), None
    return build_backend(settings), device or (settings.gpus[0] if settings.gpus else None)


_bundle_device = click.option(
    "--device", default=None, help="GPU id to check on, or 'cpu' [default: the first of WANWU_GPUS, else the CPU]."
)


# What `bundle create --pretrained` takes from the general model's build instead of flags.
PRETRAINED_FIXES = (
    "labels",
    "resize",
    "mean",
    "std",
    "precision",
    "max_batch_size",
    "max_wait_ms",
    "idle_ttl_s",
    "cpu_fallback",
    "subsets",
    "gpu_memory_mb",
)


@bundle.command("create")
@click.argument("name")
@click.option(
    "--model",
    "model_file",
    type=click.Path(exists=True, dir_okay=False),
    help="TorchScript (.pt), torch.export program (.pt2) or ONNX (.onnx) file.",
)
@click.option(
    "--pretrained",
    type=click.Choice(["efficientnet-lite0"]),
    help="Instead of --model: rebuild the general model (or, with --task embed, its embedding model) from its "
    "weights package where workers run, with its labels and groups; --format (default onnx) and --input-size "
    "(224, 192, 160 or 128) apply.",
)
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="UTF-8, one label per line (classify).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The bundle directory, named NAME.")
@click.option("--task", type=click.Choice(["classify", "embed"]), default="classify", show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["torchscript", "export", "onnx"]), help="[default: from the suffix]"
)
@click.option("--input-size", default=224, show_default=True, type=click.IntRange(1, 8192), help="Square crop side.")
@click.option("--resize", type=click.IntRange(1, 16384), help="Shorter side before the crop [default: 8/7 of it].")
@click.option("--mean", callback=_triple, help="Per-channel mean [default: ImageNet's].")
@click.option("--std", callback=_triple, help="Per-channel std [default: ImageNet's].")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--max-batch-size", default=1, show_default=True, type=click.IntRange(1, 1024), help="Dynamic batching.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--idle-ttl", "idle_ttl_s", type=click.FloatRange(min=0, min_open=True), help="Seconds; this model's TTL."
)
@click.option("--cpu-fallback", is_flag=True, help="Serve on a CPU worker when no GPU has room.")
@click.option("--subsets", type=click.Path(exists=True, dir_okay=False), help='JSON: {"name": [label, ...]}.')
@click.option("--gpu-memory-mb", type=click.IntRange(0), help="Use this estimate instead of the measured one.")
@_bundle_device
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG")
@_reports_errors
def bundle_create(
    name: str,
    model_file: str | None,
    pretrained: str | None,
    labels: str | None,
    out: str,
    task: str,
    fmt: str | None,
    input_size: int,
    resize: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    precision: str,
    max_batch_size: int,
    max_wait_ms: float,
    idle_ttl_s: float | None,
    cpu_fallback: bool,
    subsets: str | None,
    gpu_memory_mb: int | None,
    device: str | None,
    force: bool,
    config: str | None,
) -> None:
    """Make the bundle NAME from a model file and check it in the worker: it loads, its
    output fits the labels, and its load time and memory are measured (GPU memory on a
    GPU, which becomes the pool's estimate)."""
    from pathlib import Path

    from .bundles import Spec, create, create_pretrained, summary

    if (model_file is None) == (pretrained is None):
        raise click.UsageError("give a model file (--model) or --pretrained, one of the two")
    if pretrained is not None:
        context = click.get_current_context()
        ignored = [
            f"--{name.replace('_', '-')}"
            for name in PRETRAINED_FIXES
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if ignored:
            raise click.UsageError(
                f"{', '.join(ignored)} cannot be given with --pretrained: the general model's bundle fixes them "
                "(only --format, --input-size, --task, --device and --force apply)"
            )
        backend, gpu = _bundle_backend(config, device)
        try:
            report = create_pretrained(
                name,
                Path(out),
                backend,
                gpu,
                fmt=fmt or "onnx",
                input_size=input_size,
                task=task,
                force=force,
                progress=lambda line: click.echo(line, err=True),
            )
        finally:
            backend.close()
        for line in summary(report):
            click.echo(line)
        click.echo(f"wrote {out}")
        return
    assert model_file is not None
    spec = Spec(
        name=name,
        model=Path(model_file),
        labels=Path(labels) if labels else None,
        task=task,
        format=fmt,
        input_size=input_size,
        resize=resize,
        precision=precision,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        idle_ttl_s=idle_ttl_s,
        cpu_fallback=cpu_fallback,
        subsets=Path(subsets) if subsets else None,
        gpu_memory_mb=gpu_memory_mb,
        **({"mean": mean} if mean else {}),
        **({"std": std} if std else {}),
    )
    backend, gpu = _bundle_backend(config, device)
    try:
        report = create(spec, Path(out), backend, gpu, force=force, progress=lambda line: click.echo(line, err=True))
    finally:
        backend.close()
    for line in summary(report):
        click.echo(line)
    click.echo(f"wrote {out}")


@bundle.command("check")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@_bundle_device
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG")
@_reports_errors
def bundle_check(directory: str, device: str | None, as_json: bool, config: str | None) -> None:
    """Check the bundle in DIRECTORY again: its files, then a load and a request in the worker."""
    import json
    from pathlib import Path

    from .bundles import check, summary

    backend, gpu = _bundle_backend(config, device)
    try:
        report = check(Path(directory), backend, gpu, progress=lambda line: click.echo(line, err=True))
    finally:
        backend.close()
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for line in summary(report):
            click.echo(line)


def _show(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return "-"  # NaN: nothing was served
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.1f}"
    return str(value)


def main() -> None:
    cli(prog_name="wanwu")


if __name__ == "__main__":
    main()
