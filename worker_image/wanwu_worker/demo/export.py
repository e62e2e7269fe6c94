"""Re-export a TorchScript demo bundle's network as a torch.export program or as ONNX, so
the same network exists in all three bundle formats (for tests and benchmarks).

    python -m wanwu_worker.demo.export --bundle DIR --format export|onnx --out FILE

The network is rebuilt with ``build_model()`` (without its classifier for the embed
bundle) and given the archive's weights; both exports take any batch size. Only
``--format onnx`` needs the onnx and onnxscript packages.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bundle import load_bundle
from ..errors import BundleError
from .train import build_model, features

FORMATS = ("export", "onnx")


def rebuild(bundle_dir: str | Path) -> tuple[nn.Module, tuple[int, int, int]]:
    """The network of a TorchScript demo bundle (classify or embed) as a plain module,
    in eval mode, and the bundle's input size."""
    bundle = load_bundle(bundle_dir)
    if bundle.format != "torchscript":
        raise BundleError(f"{bundle.path}: format is {bundle.format}; re-export from a torchscript bundle")
    state = torch.jit.load(str(bundle.model_file), map_location="cpu").state_dict()
    # The classifier is the only layer with a 2-D weight (convolutions' are 4-D).
    classifier = [value for key, value in state.items() if key.endswith(".weight") and value.dim() == 2]
    net = build_model(classes=classifier[0].shape[0]) if classifier else features(build_model())
    net.load_state_dict(state)
    return net.eval(), bundle.input_size


def _inputs(input_size: tuple[int, int, int], dynamic_batch: bool) -> tuple[torch.Tensor, Any]:
    """An example batch and the dynamic shapes that free its batch dimension."""
    if not dynamic_batch:
        return torch.zeros((1, *input_size)), None
    # An example batch of 2: a batch of 1 would be specialised to exactly 1.
    return torch.zeros((2, *input_size)), ({0: torch.export.Dim("batch", min=1)},)


def export_program(
    net: nn.Module, input_size: tuple[int, int, int], out: str | Path, dynamic_batch: bool = True
) -> None:
    """Write ``net`` as a torch.export program (a bundle's model.pt2)."""
    example, dynamic = _inputs(input_size, dynamic_batch)
    program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
    torch.export.save(program, str(out))


def export_onnx(net: nn.Module, input_size: tuple[int, int, int], out: str | Path, dynamic_batch: bool = True) -> None:
    """Write ``net`` as one ONNX file (a bundle's model.onnx), weights inside it."""
    example, dynamic = _inputs(input_size, dynamic_batch)
    with warnings.catch_warnings():
        # torch's own exporter still uses an API torch deprecates; nothing to act on here.
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        torch.onnx.export(
            net,
            (example,),
            str(out),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=["input"],
            output_names=["output"],
            external_data=False,
            verbose=False,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanwu_worker.demo.export", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a TorchScript demo bundle")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the file to write (model.pt2 or model.onnx)")
    args = parser.parse_args(argv)
    try:
        net, input_size = rebuild(args.bundle)
    except BundleError as exc:
        print(f"wanwu_worker.demo.export: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "export":
        export_program(net, input_size, args.out)
    else:
        export_onnx(net, input_size, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
