"""``wanwu tune``: replay a trace through the pool simulator over a grid of settings. The
simulator's CoreConfig is built in :func:`tune`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from scheduler.settings import DEFAULTS, Settings

from .common import reports_errors, setting_list, setting_option, trace_options

if TYPE_CHECKING:  # the simulator and its profiles are imported only when the command runs
    from scheduler.profiles import Profile


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


@click.command()
@trace_options
@click.option(
    "--max-workers",
    "workers",
    default="1,2,4,8",
    show_default=True,
    callback=setting_list("max_workers"),
    help="Pool sizes N to try (each within WANWU_MAX_WORKERS' bounds).",
)
@click.option(
    "--ttl",
    default="10,30,60,120,300,600",
    show_default=True,
    callback=setting_list("idle_ttl_s"),
    help="Idle TTLs to try (the fallback TTL of the adaptive policy).",
)
@click.option(
    "--keepalive",
    default="fixed,adaptive",
    show_default=True,
    callback=setting_list("keepalive"),
    help="Keep-alive policies to try.",
)
@click.option(
    "--stem-cells",
    "stems",
    default="0,1",
    show_default=True,
    callback=setting_list("stem_cells"),
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
@setting_option("queue_timeout_s", default=DEFAULTS["queue_timeout_s"], show_default=True)
@setting_option("queue_max", default=DEFAULTS["queue_max"], show_default=True)
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
@reports_errors
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
    # The grid varies N, TTL, keep-alive and stem cells over the settings made here.
    base = CoreConfig.from_settings(
        Settings.load(environ={}, flags={"queue_max": queue_max, "queue_timeout_s": queue_timeout_s})
    )
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
