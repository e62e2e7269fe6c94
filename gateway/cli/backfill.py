"""``wanwu backfill``: classify a whole directory through a running gateway, resumably."""

from __future__ import annotations

import sys

import click

from .common import lang_option, reports_errors, url_option


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSON-lines results; a rerun resumes it. OUT.options.json beside it keeps the --model, --top-k and --lang "
    "its lines were made with; resuming with others is refused (exit 2).",
)
@url_option
@click.option("--model", default=None, help="Model name [default: the gateway's default].")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@lang_option
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
@reports_errors
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
    from ..backfill import RESUME_HINT, Backfill, Options, OptionsMismatch, Reporter, ResultsFile, Source, interrupts
    from ..client import GatewayUnreachable

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
