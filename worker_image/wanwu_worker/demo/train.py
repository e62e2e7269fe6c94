"""Train the demo model ``demo-shapes`` and write it as a model bundle.

    python -m wanwu_worker.demo.train --out DIR [--embed-out DIR] [--seed 0] [--samples 6000] [--epochs 6]

Beside it (``--embed-out``, by default ``demo-shapes-embed`` next to ``--out``) goes the
embed bundle ``demo-shapes-embed``: the same network without its last layer, answering
its 64 pooled features as an L2-normalised vector.

Training pictures come from ``--seed`` and the held-out check from ``--eval-seed``;
both pass through the same decoding and preprocessing the worker uses. The run fails
(exit 1) if held-out accuracy is below ``--min-accuracy``, so an image build cannot ship
a bad model. Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import load_bundle
from ..preprocess import preprocess
from .shapes import LABELS, samples

log = logging.getLogger(__name__)

NAME = "demo-shapes"
EMBED_NAME = "demo-shapes-embed"
INPUT = 64
CONFIG: dict[str, Any] = {
    "name": NAME,
    "format": "torchscript",
    "task": "classify",
    "input_size": [3, INPUT, INPUT],
    "resize": INPUT,
    "crop": [INPUT, INPUT],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "precision": "fp32",
    "labels": "labels.txt",
    "gpu_memory_mb": 256,
    "batching": {"max_batch_size": 16, "max_wait_ms": 2},
}


# The embed bundle: the same preprocessing and batching; no labels.
EMBED_CONFIG: dict[str, Any] = {
    **{key: value for key, value in CONFIG.items() if key != "labels"},
    "name": EMBED_NAME,
    "task": "embed",
    "embedding_dim": 64,
}


def build_model(classes: int = len(LABELS)) -> nn.Module:
    """A small CNN: four conv blocks and global average pooling (about 70k weights)."""

    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        return [*layers, nn.MaxPool2d(2)] if pool else layers

    return nn.Sequential(
        *block(3, 16, True),
        *block(16, 32, True),
        *block(32, 64, True),
        *block(64, 64, False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def dataset(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` encoded pictures from ``seed``, decoded and preprocessed as served."""
    bundle_like = _Preprocessing()
    items = samples(seed, count)
    inputs = torch.stack([preprocess(s.data, bundle_like) for s in items])  # type: ignore[arg-type]
    labels = torch.tensor([s.label for s in items])
    return inputs, labels


class _Preprocessing:
    """The preprocessing fields of CONFIG, shaped like a Bundle for ``preprocess``."""

    resize = CONFIG["resize"]
    crop = tuple(CONFIG["crop"])
    mean = tuple(CONFIG["mean"])
    std = tuple(CONFIG["std"])


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(chunk).argmax(1) for chunk in inputs.split(256)])
    return float((predicted == labels).float().mean())


def fit(inputs: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, batch: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model()
    steps = epochs * ((len(inputs) + batch - 1) // batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for index in torch.randperm(len(inputs), generator=order).split(batch):
            x = inputs[index]
            if torch.rand((), generator=order) < 0.5:  # mirror: shapes and colours do not care
                x = x.flip(3)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), labels[index])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(index)
        log.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(inputs))
    return model.eval()


def write_bundle(model: nn.Module, out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(out / "model.pt"))
    (out / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (out / "model.json").write_text(json.dumps(CONFIG, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    load_bundle(out)  # what we wrote must pass the worker's own validation


def features(model: nn.Module) -> nn.Module:
    """The trained network without its last layer (the classifier): the pooled features."""
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise TypeError("expected build_model()'s network: a Sequential ending in its classifier")
    return model[:-1]


def write_embed_bundle(model: nn.Module, out: Path, report: dict[str, Any]) -> None:
    """The embed bundle of the trained classifier ``model``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.jit.script(features(model)).save(str(out / "model.pt"))
    (out / "model.json").write_text(json.dumps(EMBED_CONFIG, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    load_bundle(out)


def train(
    out: Path,
    seed: int = 0,
    count: int = 6000,
    epochs: int = 6,
    eval_seed: int = 1,
    eval_count: int = 1200,
    embed_out: Path | None = None,
) -> dict[str, Any]:
    """Train, check on held-out pictures, write the bundle and the embed bundle (at
    ``embed_out``, by default demo-shapes-embed beside ``out``); return the report."""
    started = time.perf_counter()
    inputs, labels = dataset(seed, count)
    data_s = time.perf_counter() - started
    model = fit(inputs, labels, epochs, seed)
    train_s = time.perf_counter() - started - data_s
    held_inputs, held_labels = dataset(eval_seed, eval_count)
    report = {
        "seed": seed,
        "samples": count,
        "epochs": epochs,
        "train_accuracy": round(accuracy(model, inputs, labels), 4),
        "eval_seed": eval_seed,
        "eval_samples": eval_count,
        "eval_accuracy": round(accuracy(model, held_inputs, held_labels), 4),
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_bundle(model, out, report)
    write_embed_bundle(model, embed_out or out.parent / EMBED_NAME, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanwu_worker.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--embed-out", type=Path, default=None, help=f"the embed bundle (default: {EMBED_NAME} beside --out)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=1200)
    parser.add_argument("--min-accuracy", type=float, default=0.97)
    args = parser.parse_args(argv)
    if args.seed == args.eval_seed:
        parser.error("--eval-seed must differ from --seed, or the check is not held out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    report = train(args.out, args.seed, args.samples, args.epochs, args.eval_seed, args.eval_samples, args.embed_out)
    print(json.dumps(report))
    if report["eval_accuracy"] < args.min_accuracy:
        print(f"held-out accuracy {report['eval_accuracy']:.4f} is below {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
