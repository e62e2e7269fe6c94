"""Generate pictures of a red, green or blue circle or square on a noisy background.

Everything is drawn from one ``random.Random``, so a seed fixes the whole data set.
Pictures vary in size, aspect, background tint, noise, shape size, position, rotation
(squares) and encoding (JPEG at several qualities, or PNG). The shape always lies inside
the centre square that the model's centre crop keeps.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

LABELS = ("红色圆形", "红色方形", "绿色圆形", "绿色方形", "蓝色圆形", "蓝色方形")
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")


def label_index(colour: str, shape: str) -> int:
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclass(frozen=True)
class Sample:
    data: bytes
    label: int
    format: str
    size: tuple[int, int]


def _noise_background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A grey-ish tinted background with blotches and per-pixel grain. The noise comes
    from ``rng.randbytes`` (Pillow's own noise is unseeded) and is shaped by lookup
    tables, so a picture costs well under a millisecond."""
    base = rng.randint(50, 210)
    tint = [max(0, min(255, base + rng.randint(-30, 30))) for _ in range(3)]
    grain, blotch = rng.uniform(0, 0.45), rng.uniform(0, 0.35)
    grid = (max(2, width // 8), max(2, height // 8))
    coarse = Image.frombytes("L", grid, rng.randbytes(grid[0] * grid[1])).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    fine = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    layers = []
    for band, t in zip(fine.split(), tint, strict=True):
        mixed = Image.blend(
            band.point(lambda v: 128 + (v - 128) * grain), coarse.point(lambda v: 128 + (v - 128) * blotch), 0.5
        )
        layers.append(mixed.point(lambda v, t=t: max(0, min(255, t + 2 * (v - 128)))))
    return Image.merge("RGB", layers)


def _colour(rng: random.Random, name: str) -> tuple[int, int, int]:
    strong, weak = rng.randint(170, 255), (rng.randint(0, 90), rng.randint(0, 90))
    if name == "red":
        return (strong, weak[0], weak[1])
    if name == "green":
        return (weak[0], strong, weak[1])
    return (weak[0], weak[1], strong)


def render(rng: random.Random, colour: str, shape: str) -> Image.Image:
    """One RGB picture of ``colour`` ``shape``."""
    side = rng.randint(40, 224)
    aspect = rng.uniform(0.75, 1.33)
    width, height = (side, max(24, round(side / aspect))) if aspect >= 1 else (max(24, round(side * aspect)), side)
    image = _noise_background(rng, width, height)
    visible = min(width, height)
    vx, vy = (width - visible) / 2, (height - visible) / 2
    size = rng.uniform(0.22, 0.6) * visible
    radius = size / 2
    reach = radius * (math.sqrt(2) if shape == "square" else 1)
    margin = min(reach, visible / 2)
    cx = vx + rng.uniform(margin, visible - margin)
    cy = vy + rng.uniform(margin, visible - margin)
    draw = ImageDraw.Draw(image)
    fill = _colour(rng, colour)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        angle = math.radians(rng.uniform(-20, 20))
        corners = [(-radius, -radius), (radius, -radius), (radius, radius), (-radius, radius)]
        draw.polygon(
            [
                (cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in corners
            ],
            fill=fill,
        )
    return image


def sample(rng: random.Random) -> Sample:
    """One labelled, encoded picture (JPEG or PNG bytes)."""
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    image = render(rng, colour, shape)
    buffer = io.BytesIO()
    if rng.random() < 0.6:
        image.save(buffer, "JPEG", quality=rng.randint(45, 95))
        fmt = "JPEG"
    else:
        image.save(buffer, "PNG", compress_level=1)
        fmt = "PNG"
    return Sample(buffer.getvalue(), label_index(colour, shape), fmt, image.size)


def samples(seed: int, count: int) -> list[Sample]:
    rng = random.Random(seed)
    return [sample(rng) for _ in range(count)]
