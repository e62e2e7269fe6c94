"""``wanwu bundle create|check``: turn a model file into a bundle the pool serves, and
prove it loads.

A bundle is checked where it will run: in the worker image (a one-shot container as
locked down as a worker) or with the process backend's worker interpreter, so the host
needs no torch. The check loads the model, runs the warm-up and one request, compares
the output width with the labels (classify) or records the vector size (embed), and
measures load time, first-request time and peak memory; on a GPU it measures the GPU
memory the worker holds and that becomes ``gpu_memory_mb``, the pool's placement
estimate. Without a GPU nothing can be measured: the estimate is then worked out from
the model file's size and said to be one (``bundle_report.json``).

A bundle is written next to its destination under a hidden name (the catalog skips
those) and renamed into place only once it passed, so a gateway never sees half of one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanwu_worker.bundle import (
    FORMATS,
    MAX_METADATA_BYTES,
    PRECISIONS,
    TASKS,
    Bundle,
    load_bundle,
    read_bundle_file,
    read_labels,
)
from wanwu_worker.errors import BundleError

from scheduler.backends.base import BundleTools
from scheduler.errors import WanwuError

MODEL_FILES = {"torchscript": "model.pt", "export": "model.pt2", "onnx": "model.onnx"}
SUFFIXES = {".pt": "torchscript", ".ts": "torchscript", ".jit": "torchscript", ".pt2": "export", ".onnx": "onnx"}
REPORT = "bundle_report.json"
CHECK_TIMEOUT_S = 600.0
# Without a GPU: the CUDA context and allocator a worker holds before any weights (about
# 500 MB on an H200 with torch 2.13), plus the weights twice (the model and the
# activations and workspace of a batch, a rough rule for CNNs).
CONTEXT_MB = 512
Progress = Callable[[str], None]


class BundleCreateError(WanwuError):
    """A bundle could not be made or did not pass its check."""


@dataclass(frozen=True)
class Spec:
    """What ``wanwu bundle create`` was asked for."""

    name: str
    model: Path
    labels: Path | None
    task: str = "classify"
    format: str | None = None  # from the model file's suffix when None
    input_size: int = 224
    resize: int | None = None  # input_size * 8 / 7 when None (256 for 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    precision: str = "fp32"
    max_batch_size: int = 1
    max_wait_ms: float = 5.0
    idle_ttl_s: float | None = None
    cpu_fallback: bool = False
    subsets: Path | None = None  # a JSON file: {"name": [labels]}
    gpu_memory_mb: int | None = None  # overrides the measurement

    def model_format(self) -> str:
        if self.format is not None:
            if self.format not in FORMATS:
                raise BundleCreateError(f"--format is {self.format!r}; expected one of {', '.join(FORMATS)}")
            return self.format
        fmt = SUFFIXES.get(self.model.suffix.lower())
        if fmt is None:
            known = ", ".join(sorted(SUFFIXES))
            raise BundleCreateError(f"{self.model}: cannot tell the format from its suffix ({known}); pass --format")
        return fmt


def model_json(spec: Spec) -> dict[str, Any]:
    """The bundle's model.json, before the check adds what it measured."""
    if spec.task not in TASKS:
        raise BundleCreateError(f"--task is {spec.task!r}; expected one of {', '.join(TASKS)}")
    if spec.precision not in PRECISIONS:
        raise BundleCreateError(f"--precision is {spec.precision!r}; expected one of {', '.join(PRECISIONS)}")
    resize = spec.resize if spec.resize is not None else round(spec.input_size * 8 / 7)
    config: dict[str, Any] = {
        "name": spec.name,
        "format": spec.model_format(),
        "task": spec.task,
        "input_size": [3, spec.input_size, spec.input_size],
        "resize": resize,
        "crop": [spec.input_size, spec.input_size],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "precision": spec.precision,
        "gpu_memory_mb": spec.gpu_memory_mb or 0,
    }
    if spec.labels is not None:
        config["labels"] = "labels.txt"
    if spec.max_batch_size > 1:
        config["batching"] = {"max_batch_size": spec.max_batch_size, "max_wait_ms": spec.max_wait_ms}
    if spec.idle_ttl_s is not None:
        config["idle_ttl_s"] = spec.idle_ttl_s
    if spec.cpu_fallback:
        config["cpu_fallback"] = True
    if spec.subsets is not None:
        config["subsets"] = _read_subsets(spec.subsets)
    return config


def _read_subsets(path: Path) -> Any:
    """The --subsets file: the user's own path (a link there is followed), read as a
    bundle file is (a regular file, at most model.json's cap)."""
    real = path.resolve()
    try:
        return json.loads(read_bundle_file(real.parent, real.name, MAX_METADATA_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise BundleCreateError(f"{path}: subsets file is missing") from None
    except BundleError as exc:
        raise BundleCreateError(f"{real.parent}/{exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleCreateError(f"{path}: not valid JSON: {exc}") from exc


def _check_destination(name: str, out: Path, force: bool) -> None:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise BundleCreateError(f"the name {name!r} is not a plain directory name (nor hidden)")
    if name != out.name:
        raise BundleCreateError(
            f"the bundle's directory must be named after the model: --out ends in {out.name!r}, the name is {name!r}"
        )
    if out.exists() and not force:
        raise BundleCreateError(f"{out} exists; pass --force to replace it")


def create(
    spec: Spec, out: Path, backend: BundleTools, device: str | None, force: bool = False, progress: Progress = print
) -> dict[str, Any]:
    """Build the bundle ``spec`` describes at ``out``, check it on ``backend`` (on GPU
    ``device`` or the CPU) and return the check's report. Raises BundleCreateError
    naming the file and field at fault; ``out`` is untouched unless it all passed."""
    _check_destination(spec.name, out, force)
    if not spec.model.is_file():
        raise BundleCreateError(f"{spec.model}: model file is missing")
    if spec.labels is None and spec.task == "classify":
        raise BundleCreateError("a classify bundle needs --labels (a UTF-8 file, one label per line)")
    config = model_json(spec)  # before anything is written: argument errors come first
    # --labels is the user's own path: a link there is followed, to a regular file.
    labels = spec.labels.resolve() if spec.labels is not None else None
    if labels is not None:
        try:
            read_labels(labels)
        except BundleError as exc:
            raise BundleCreateError(f"{labels.parent}/{exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=out.parent))
    try:
        progress(f"copying {spec.model} into the bundle")
        shutil.copyfile(spec.model, stage / MODEL_FILES[config["format"]])
        if config["format"] == "onnx":
            for data in onnx_external_data(spec.model):
                shutil.copyfile(data, stage / data.name)
        if labels is not None:
            shutil.copyfile(labels, stage / "labels.txt")
        _write_json(stage / "model.json", config)
        _readable(stage)  # the check runs as the worker's user
        _, report = _checked(stage, backend, device, progress)
        _record(stage, config, report, spec.gpu_memory_mb)
        _readable(stage)
        try:
            _move_into_place(stage, out)
        except OSError as exc:
            raise BundleCreateError(f"cannot move the checked bundle into {out}: {exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


# The input sides the worker package builds the general model for (224 and smaller-input variants).
PRETRAINED_SIZES = (224, 192, 160, 128)
BUILD_TIMEOUT_S = 900.0


def create_pretrained(
    name: str,
    out: Path,
    backend: BundleTools,
    device: str | None,
    fmt: str = "onnx",
    input_size: int = 224,
    task: str = "classify",
    force: bool = False,
    progress: Progress = print,
) -> dict[str, Any]:
    """Rebuild the general model's bundle (``task`` classify, with its groups and
    labels) or its embedding bundle from the weights package, where workers run (the
    worker image, or the worker interpreter), as ``fmt`` for ``input_size``; then check
    it and move it into place like ``create``. Returns the check's report."""
    out = out.resolve()
    _check_destination(name, out, force)
    if fmt not in FORMATS:
        raise BundleCreateError(f"--format is {fmt!r}; expected one of {', '.join(FORMATS)}")
    if input_size not in PRETRAINED_SIZES:
        sizes = ", ".join(map(str, PRETRAINED_SIZES))
        raise BundleCreateError(f"--input-size is {input_size}; EfficientNet-Lite0 is built for {sizes}")
    if task not in TASKS:
        raise BundleCreateError(f"--task is {task!r}; expected one of {', '.join(TASKS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out.parent))
    built = stage / name
    try:
        progress(f"exporting EfficientNet-Lite0 ({task}, {fmt}, {input_size} px) from its weights package")
        arguments = ["--out", str(built), "--name", name, "--task", task, "--format", fmt, "--size", str(input_size)]
        try:
            backend.build_bundle([*arguments, "--embed-out", "-"], stage, BUILD_TIMEOUT_S)
        except WanwuError as exc:
            raise BundleCreateError(str(exc)) from exc
        if built.is_symlink() or not built.is_dir() or any(p.is_symlink() or not p.is_file() for p in built.iterdir()):
            raise BundleCreateError(f"the builder left something other than a bundle of plain files at {built}")
        _readable(built)
        _, report = _checked(built, backend, device, progress)
        config = json.loads(read_bundle_file(built, "model.json", MAX_METADATA_BYTES).decode("utf-8"))
        _record(built, config, report, None)
        _readable(built)
        try:
            _move_into_place(built, out)
        except OSError as exc:
            raise BundleCreateError(f"cannot move the checked bundle into {out}: {exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _move_into_place(stage: Path, out: Path) -> None:
    """Rename the checked bundle to ``out``; an old one there is swapped out in one
    rename (renameat2 RENAME_EXCHANGE where the kernel has it), else moved aside first,
    so a reader sees the old bundle or the new one, and a crash loses neither."""
    if not out.exists():
        stage.rename(out)
        return
    if _exchange(stage, out):
        shutil.rmtree(stage, ignore_errors=True)  # now the old bundle; the new one is live
        return
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(aside)
    try:
        stage.rename(out)
    except OSError:
        aside.rename(out)  # the old bundle back where it was
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(result == 0)


def onnx_external_data(model: Path) -> list[Path]:
    """The files beside an ONNX model that hold its weights (``external_data``: the
    exporters' default for large models, e.g. ``model.onnx.data``); they go into the
    bundle under their own names, which the model refers to."""
    try:
        import onnx
    except ImportError:  # a gateway host without onnx: the exporters' own naming
        guess = model.with_name(model.name + ".data")
        return [guess] if guess.is_file() else []
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - not readable as ONNX: the worker's check will say why
        return []
    found: dict[str, Path] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is None or "/" in location or location.startswith("."):
                raise BundleCreateError(f"{model}: external data {location!r} is not a file beside the model")
            path = model.with_name(location)
            if not path.is_file():
                raise BundleCreateError(f"{model}: its weights file {path} is missing")
            found[location] = path
    return list(found.values())


def check(directory: Path, backend: BundleTools, device: str | None, progress: Progress = print) -> dict[str, Any]:
    """Re-validate the bundle in ``directory``: its files, then a load and a request in
    the worker. Returns the report with ``warnings`` (a GPU estimate below what was
    measured). Raises BundleCreateError if it does not pass."""
    bundle, report = _checked(directory, backend, device, progress)
    declared = bundle.gpu_memory_mb
    measured = report.get("gpu_memory_mb")
    warnings = []
    if isinstance(measured, int) and measured > declared:
        warnings.append(
            f"model.json says gpu_memory_mb {declared} but the worker held {measured} MB: "
            "the pool would place too many workers on one GPU"
        )
    return {**report, "warnings": warnings}


def _checked(
    directory: Path, backend: BundleTools, device: str | None, progress: Progress
) -> tuple[Bundle, dict[str, Any]]:
    """The bundle as validated on this host, and the worker's report on it."""
    try:
        bundle = load_bundle(directory)
    except BundleError as exc:  # it names the file within the bundle; the user wants the directory too
        raise BundleCreateError(f"{directory}/{exc}") from None
    where = f"GPU {device}" if device else "the CPU"
    progress(f"loading the model in the worker on {where} (load, warm-up, one request)")
    started = time.monotonic()
    report = backend.check_bundle(directory, device, CHECK_TIMEOUT_S)
    if not report.get("ok"):
        error = report.get("error") or {}
        raise BundleCreateError(f"the bundle did not pass its check: {error.get('message', report)}")
    progress(f"checked in {time.monotonic() - started:.1f} s")
    return bundle, report


def _record(stage: Path, config: dict[str, Any], report: dict[str, Any], override_mb: int | None) -> None:
    """Put what the check measured into model.json, and the whole check beside it."""
    measured = report.get("gpu_memory_mb")
    if override_mb is not None:
        config["gpu_memory_mb"], method = override_mb, "given with --gpu-memory-mb"
    elif isinstance(measured, int):
        config["gpu_memory_mb"] = measured
        method = str(report.get("gpu_memory_method", "measured on the GPU"))
    else:
        # The model file and any external weights beside it (everything but the metadata).
        metadata = {"model.json", "labels.txt", REPORT}
        size_mb = sum(p.lstat().st_size for p in stage.iterdir() if p.name not in metadata) / 2**20
        config["gpu_memory_mb"] = CONTEXT_MB + math.ceil(2 * size_mb)
        method = (
            f"estimated without a GPU: {CONTEXT_MB} MB of CUDA context plus twice the model's files "
            f"({size_mb:.1f} MB); run `wanwu bundle check` on a GPU host to measure it"
        )
    if config["task"] == "embed":
        config["embedding_dim"] = report.get("embedding_dim") or report.get("outputs")
    _write_json(stage / "model.json", config)
    _write_json(stage / REPORT, {**report, "gpu_memory_mb_method": method, "checked_at": _now()})
    try:
        load_bundle(stage)  # what we wrote must pass the worker's own validation
    except BundleError as exc:
        raise BundleCreateError(str(exc)) from None


def _readable(directory: Path) -> None:
    """Workers (uid 10001 in the image) read the bundle through a read-only mount."""
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        os.chmod(path, 0o644)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def summary(report: dict[str, Any]) -> Sequence[str]:
    """The check's report as lines for a terminal."""
    lines = [
        f"{report.get('name')}: {report.get('format')} {report.get('task')} on {report.get('device')} "
        f"({report.get('precision')})",
    ]
    if report.get("task") == "embed":
        lines.append(f"  vectors of {report.get('embedding_dim')} floats")
    else:
        lines.append(f"  {report.get('labels')} labels, output width {report.get('outputs')}")
    lines.append(
        f"  load {report.get('load_ms')} ms, first request {report.get('first_ms')} ms, "
        f"peak memory {report.get('peak_rss_mb')} MB, max batch {report.get('max_batch_size')}"
    )
    gpu = report.get("gpu_memory_mb")
    lines.append(f"  GPU memory: {gpu} MB ({report.get('gpu_memory_method')})" if gpu is not None else "  no GPU used")
    lines += [f"  warning: {warning}" for warning in report.get("warnings", ())]
    return lines
