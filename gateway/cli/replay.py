"""``wanwu replay``: play a trace against a live gateway, then compare with the simulator."""

from __future__ import annotations

from typing import Any

import click

from .common import print_table, reports_errors, trace_options, url_option


@click.command()
@trace_options
@url_option
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
@reports_errors
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

    from ..replay import replay_trace

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
    print_table(("", "measured", "predicted"), rows)
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


def _show(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return "-"  # NaN: nothing was served
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.1f}"
    return str(value)
