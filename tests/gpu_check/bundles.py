"""The bundles the GPU check serves: the demo model, trained by its own recipe, and a
ResNet-50 with random weights (for timing and memory only) in fp32 and fp16.

The ResNet-50 is written here in plain torch.nn, laid out as torchvision's
``resnet50`` (25,557,032 weights for 1000 classes), because the CPU image and this
host have no torchvision.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn
from wanwu_worker.bundle import Bundle, load_bundle

from .report import MIB

DEMO = "demo-shapes"
RESNET = {"resnet50-fp32": "fp32", "resnet50-fp16": "fp16"}
# Placement estimates (model.json gpu_memory_mb): CUDA context, weights and activations
# of a batch of 16, generously; the check reports what the workers really hold.
GPU_ESTIMATE_MB = {"fp32": 1200, "fp16": 900}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's v1.5) -> 1x1 with 4x the width, plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        result: torch.Tensor = self.relu(out + identity)
        return result


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        stages: list[nn.Module] = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            stage = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def resnet50(classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), classes)


def calibrate(model: nn.Module, input_size: int, seed: int = 0, batches: int = 2, batch: int = 8) -> nn.Module:
    """Set the BatchNorm statistics from random inputs, so that activations stay in
    range through fifty random layers (fp16 would overflow otherwise); return it in
    eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, input_size, input_size, generator=generator))
    return model.eval()


def resnet_config(name: str, precision: str, input_size: int, max_batch: int) -> dict[str, Any]:
    return {
        "name": name,
        "format": "torchscript",
        "task": "classify",
        "input_size": [3, input_size, input_size],
        "resize": round(input_size * 256 / 224),
        "crop": [input_size, input_size],
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "precision": precision,
        "labels": "labels.txt",
        "gpu_memory_mb": GPU_ESTIMATE_MB[precision],
        "batching": {"max_batch_size": max_batch, "max_wait_ms": 2},
    }


def write_resnet_bundles(
    models_dir: Path,
    input_size: int = 224,
    max_batch: int = 16,
    seed: int = 0,
    model: nn.Module | None = None,
    names: Mapping[str, str] = RESNET,
) -> dict[str, dict[str, Any]]:
    """Write the ResNet-50 bundles (one network, its weights saved as fp32 and as fp16)
    under ``models_dir``, reusing bundles already there that match; return what each is."""
    out: dict[str, dict[str, Any]] = {}
    todo = {}
    for name, precision in names.items():
        config = resnet_config(name, precision, input_size, max_batch)
        existing = _matching(models_dir / name, config)
        if existing is not None:
            out[name] = existing
        else:
            todo[name] = (precision, config)
    if not todo:
        return out
    started = time.perf_counter()
    torch.manual_seed(seed)
    net = calibrate(model if model is not None else resnet50(), input_size, seed)
    weights = sum(p.numel() for p in net.parameters())
    build_s = time.perf_counter() - started
    labels = "".join(f"class-{i:04d}\n" for i in range(net.fc.out_features if isinstance(net, ResNet) else 1000))
    for name, (precision, config) in todo.items():
        started = time.perf_counter()
        directory = models_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        variant = net.half() if precision == "fp16" else net.float()
        torch.jit.script(variant).save(str(directory / "model.pt"))  # type: ignore[no-untyped-call]
        (directory / "labels.txt").write_text(labels, encoding="utf-8")
        (directory / "model.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        load_bundle(directory)  # what we wrote must pass the worker's own validation
        out[name] = _describe(directory, config) | {
            "weights": weights,
            "build_s": round(build_s + time.perf_counter() - started, 2),
        }
    net.float()
    return out


def _matching(directory: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The bundle in ``directory`` if its model.json is ``config`` and it validates."""
    try:
        if json.loads((directory / "model.json").read_text(encoding="utf-8")) != dict(config):
            return None
        load_bundle(directory)
    except Exception:  # noqa: BLE001 - anything wrong with it: build it again
        return None
    return _describe(directory, config) | {"reused": True}


def _describe(directory: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "path": str(directory),
        "precision": config["precision"],
        "input_size": config["input_size"],
        "gpu_memory_mb": config["gpu_memory_mb"],
        "batching": config.get("batching"),
        "file_mib": round((directory / "model.pt").stat().st_size / MIB, 1),
    }


def write_demo_bundle(
    models_dir: Path, env: Mapping[str, str], quick: bool = False, python: str = sys.executable, timeout: float = 1800
) -> dict[str, Any]:
    """Train ``demo-shapes`` into ``models_dir`` with the demo's own recipe
    (``python -m wanwu_worker.demo.train --seed 0 --eval-seed 1``), unless a valid one
    is there. ``quick``: fewer pictures and epochs, and no accuracy floor (CPU mode)."""
    directory = models_dir / DEMO
    try:
        bundle = load_bundle(directory)
        report = json.loads((directory / "train_report.json").read_text(encoding="utf-8"))
        return _describe_demo(bundle) | {"reused": True, "train_report": report}
    except Exception:  # noqa: BLE001 - not there or not valid: train it
        pass
    args = [python, "-m", "wanwu_worker.demo.train", "--out", str(directory), "--seed", "0", "--eval-seed", "1"]
    if quick:
        args += ["--samples", "900", "--epochs", "2", "--eval-samples", "150", "--min-accuracy", "0"]
    started = time.perf_counter()
    done = subprocess.run(args, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[1:4])} exited with {done.returncode}: {done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return _describe_demo(load_bundle(directory)) | {
        "train_s": round(time.perf_counter() - started, 1),
        "train_report": json.loads(lines[-1]) if lines else None,
        "command": " ".join(args[1:]),
    }


def _describe_demo(bundle: Bundle) -> dict[str, Any]:
    return {
        "path": str(bundle.path),
        "precision": bundle.precision,
        "input_size": list(bundle.input_size),
        "gpu_memory_mb": bundle.gpu_memory_mb,
        "batching": None if bundle.batching is None else bundle.batching.__dict__,
        "file_mib": round(bundle.model_file.stat().st_size / MIB, 3),
    }


def photo(seed: int = 7, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    """A photo-sized JPEG of random shapes and noise: decoding and resizing cost what a
    real upload costs, unlike a flat picture."""
    rng = random.Random(seed)
    image = Image.effect_noise(size, 40).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        w, h = rng.randrange(20, 200), rng.randrange(20, 200)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def worker_env(base: Mapping[str, str], root: Path) -> dict[str, str]:
    """``base`` with the repository and ``worker_image`` first on PYTHONPATH, so that
    ``gateway``, ``scheduler`` and ``wanwu_worker`` import whether or not the project is
    installed (``pip install -e .`` is not needed on the GPU machine)."""
    paths = [str(root), str(root / "worker_image")]
    if base.get("PYTHONPATH"):
        paths.append(base["PYTHONPATH"])
    return {**base, "PYTHONPATH": os.pathsep.join(paths)}
