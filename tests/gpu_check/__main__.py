"""``python -m tests.gpu_check``: see the package docstring."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .options import Options, parse_options, torch_index
from .report import GPU_ONLY, Report, nvml_target, render_summary

if TYPE_CHECKING:
    from .steps import Context


def _progress_printer() -> Callable[[str], None]:
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[gpu-check {time.monotonic() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    return say


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    from . import steps

    say = _progress_printer()
    report = Report("cpu" if opts.cpu else "gpu", opts.to_json(), progress=say)
    work = Path(tempfile.mkdtemp(prefix="wanwu-gpu-check-"))
    # Short: a Unix socket path must fit in 108 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="wgc-", dir="/tmp"))
    ctx = steps.Context(
        opts=opts,
        work=work,
        models_dir=opts.models_dir or work / "models",
        socket_root=sockets,
        env=steps.child_env(os.environ),
        progress=say,
    )
    report.extra["work_dir"] = str(work) + ("" if opts.keep_temp else " (removed)")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a shell started us ignoring it
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if opts.cpu:
        report.note("--cpu: both ResNet-50 bundles run in fp32 on the CPU, so fp16/fp32 ratios compare nothing")
    status = 0
    try:
        if not opts.cpu:
            ctx.torch_index = torch_index(opts.device)
            ctx.nvml_target = nvml_target(os.environ.get("CUDA_VISIBLE_DEVICES"), ctx.torch_index)
        run_steps(report, ctx)
    except KeyboardInterrupt as exc:
        report.note(f"interrupted ({str(exc) or 'Ctrl-C'}); cleaning up")
        status = 130
    finally:
        signal.signal(signal.SIGINT, lambda *_: say("still cleaning up; the gateway and its workers are being stopped"))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup(report, ctx)
        write_report(report, opts.out)
        print(render_summary(report.to_json()))
        say(f"report: {opts.out}")
    if status == 0 and report.failed:
        status = 1
    return status


def run_steps(report: Report, ctx: Context) -> None:
    from . import steps

    opts = ctx.opts
    report.run("env", lambda: steps.env_step(ctx))
    report.run("bundles", lambda: steps.bundles_step(ctx))
    for name, fn in (("nvml", steps.nvml_step), ("throughput", steps.throughput_step)):
        if not _skipped(report, name, opts):
            report.run(name, functools.partial(fn, ctx))
    if "serve" in opts.skip and (opts.cpu or "reap" in opts.skip):
        report.skip("gateway", "neither serve nor reap runs")
    else:
        report.run("gateway", lambda: steps.gateway_step(ctx))
        for name, fn in (("serve", steps.serve_step), ("reap", steps.reap_step)):
            if not _skipped(report, name, opts):
                report.run(name, functools.partial(fn, ctx))
        if ctx.gateway is not None:
            report.run("shutdown", lambda: steps.shutdown_step(ctx))
    if not _skipped(report, "stem", opts):
        report.run("stem", lambda: steps.stem_step(ctx))


def _skipped(report: Report, name: str, opts: Options) -> bool:
    if name in opts.skip:
        report.skip(name, "--skip")
        return True
    if opts.cpu and name in GPU_ONLY and not (name == "reap" and opts.fake_gpu):
        report.skip(name, "--cpu: needs a GPU and NVML")
        return True
    return False


def cleanup(report: Report, ctx: Context) -> None:
    """Stop every gateway still running (and its workers), close NVML, keep the gateway
    logs' tails in the report, remove the temporary directories."""
    for gateway in ctx.gateways:
        try:
            if gateway.process is not None and gateway.process.poll() is None:
                stopped = gateway.stop()
                report.note(f"gateway {gateway.name} stopped at cleanup: {stopped}")
        except Exception as exc:  # noqa: BLE001 - go on cleaning up
            report.note(f"stopping gateway {gateway.name} failed: {type(exc).__name__}: {exc}")
    if report.failed:
        report.extra["gateway_logs"] = {g.name: g.log_tail(6000) for g in ctx.gateways}
    if ctx.nvml is not None:
        ctx.nvml.close()
    shutil.rmtree(ctx.socket_root, ignore_errors=True)
    if not ctx.opts.keep_temp:
        shutil.rmtree(ctx.work, ignore_errors=True)


def write_report(report: Report, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".tmp")
    temp.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    temp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
