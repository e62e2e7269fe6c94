"""``wanwu bundle``: make and check model bundles."""

from __future__ import annotations

from typing import Any

import click

from scheduler.settings import SPECS

from .common import load_settings, reports_errors


@click.group()
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
    from scheduler.assembly import build_backend

    settings = load_settings(config)
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
    "--idle-ttl",
    "idle_ttl_s",
    type=click.FloatRange(min=0, min_open=True, max=SPECS["idle_ttl_s"].high),
    help="Seconds; this model's TTL (WANWU_IDLE_TTL_S's bounds).",
)
@click.option("--cpu-fallback", is_flag=True, help="Serve on a CPU worker when no GPU has room.")
@click.option("--subsets", type=click.Path(exists=True, dir_okay=False), help='JSON: {"name": [label, ...]}.')
@click.option("--gpu-memory-mb", type=click.IntRange(0), help="Use this estimate instead of the measured one.")
@_bundle_device
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", type=click.Path(dir_okay=False), envvar="WANWU_CONFIG")
@reports_errors
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

    from ..bundles import Spec, create, create_pretrained, summary

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
@reports_errors
def bundle_check(directory: str, device: str | None, as_json: bool, config: str | None) -> None:
    """Check the bundle in DIRECTORY again: its files, then a load and a request in the worker."""
    import json
    from pathlib import Path

    from ..bundles import check, summary

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
