"""The check's options: ``python -m tests.gpu_check --help``. No torch here, so that
``--help`` and bad options answer at once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import gpu_check

from .report import SKIPPABLE


@dataclass(frozen=True)
class Options:
    out: Path
    cpu: bool
    device: str
    requests: int
    skip: frozenset[str]
    keep_temp: bool
    models_dir: Path | None
    resnet_input: int
    batches: tuple[int, ...]
    max_batch: int
    alloc_gib: tuple[float, ...]
    ready_timeout_s: float
    reap_timeout_s: float
    fake_gpu: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            key: (str(value) if isinstance(value, Path) else sorted(value) if isinstance(value, frozenset) else value)
            for key, value in self.__dict__.items()
        }


CPU_DEFAULTS: dict[str, Any] = {"requests": 30, "resnet_input": 64, "batches": "1,4", "max_batch": 4}
GPU_DEFAULTS: dict[str, Any] = {"requests": 200, "resnet_input": 224, "batches": "1,16,64", "max_batch": 16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.gpu_check",
        description=(gpu_check.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See tests/gpu_check/__init__.py for the steps and the offline install on the GPU machine.",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="JSON report [gpu-check.json]")
    parser.add_argument("--device", default="cuda:0", help="cuda:N or N: the GPU to check [cuda:0]")
    parser.add_argument("--cpu", action="store_true", help="the whole flow on the CPU; NVML and ballast steps skipped")
    parser.add_argument("--requests", type=int, default=None, help="warm requests per bundle [200; --cpu: 30]")
    parser.add_argument(
        "--skip", action="append", default=[], metavar="STEP", help=f"skip a step: {', '.join(SKIPPABLE)} (repeatable)"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the work directory (bundles, gateway logs)")
    parser.add_argument("--models-dir", type=Path, default=None, help="build bundles here and reuse matching ones")
    parser.add_argument("--resnet-input", type=int, default=None, help="ResNet-50 input side [224; --cpu: 64]")
    parser.add_argument("--batches", default=None, help="in-process batch sizes [1,16,64; --cpu: 1,4]")
    parser.add_argument("--max-batch", type=int, default=None, help="the ResNet bundles' max_batch_size [16; --cpu: 4]")
    parser.add_argument("--alloc-gib", default="1,4,16", help="sizes the nvml step allocates [1,4,16]")
    parser.add_argument(
        "--fake-gpu",
        action="store_true",
        help="with --cpu: a fake NVML (tests/gpu_check/fake_nvml) for the gateway and the check, so the reap "
        "step runs against the real pool on a host without a GPU (the ballast is a number in its state file)",
    )
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for the gateway to get ready")
    parser.add_argument("--reap-timeout", type=float, default=60.0, help="seconds to wait for the pressure reaps")
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = CPU_DEFAULTS if args.cpu else GPU_DEFAULTS
    skip = {s.strip() for item in args.skip for s in item.split(",") if s.strip()}
    unknown = sorted(skip - set(SKIPPABLE))
    if unknown:
        parser.error(f"--skip {', '.join(unknown)}: steps that can be skipped are {', '.join(SKIPPABLE)}")
    try:
        batches = tuple(int(b) for b in (args.batches or str(defaults["batches"])).split(","))
        alloc = tuple(float(g) for g in args.alloc_gib.split(","))
    except ValueError as exc:
        parser.error(f"--batches / --alloc-gib: {exc}")
    requests = args.requests if args.requests is not None else int(defaults["requests"])
    if requests < 1 or any(b < 1 for b in batches):
        parser.error("--requests and --batches must be positive")
    if args.fake_gpu and not args.cpu:
        parser.error("--fake-gpu goes with --cpu")
    if not args.cpu:
        try:
            torch_index(args.device)
        except ValueError as exc:
            parser.error(str(exc))
    resnet_input = args.resnet_input or int(defaults["resnet_input"])
    if resnet_input < 32:
        parser.error("--resnet-input must be at least 32 (ResNet-50 halves it five times)")
    return Options(
        out=args.out,
        cpu=args.cpu,
        device="cpu" if args.cpu else args.device,
        requests=requests,
        skip=frozenset(skip),
        keep_temp=args.keep_temp,
        models_dir=args.models_dir,
        resnet_input=resnet_input,
        batches=batches,
        max_batch=args.max_batch or int(defaults["max_batch"]),
        alloc_gib=alloc,
        ready_timeout_s=args.ready_timeout,
        reap_timeout_s=args.reap_timeout,
        fake_gpu=args.fake_gpu,
    )


def torch_index(device: str) -> int:
    text = device.removeprefix("cuda").lstrip(":") or "0"
    if not text.isdigit():
        raise ValueError(f"--device {device!r}: expected cuda:N or N")
    return int(text)
