"""Real photographs for tests (see README.md for where each came from and its licence),
and Pillow-only helpers that re-encode them as the variants clients send."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

PHOTOS = Path(__file__).parent
NAMES = (
    "astronaut.png",
    "chelsea.png",
    "china.jpg",
    "coffee.png",
    "flower.jpg",
    "grace_hopper.jpg",
    "motorcycle_left.png",
    "rocket.jpg",
)
ORIENTATION = 0x0112  # the EXIF tag


def photo(name: str) -> bytes:
    """The bytes of photo ``name`` (one of NAMES), as shipped."""
    return (PHOTOS / name).read_bytes()


def _save(image: Image.Image, fmt: str, quality: int, **params: object) -> bytes:
    buffer = io.BytesIO()
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = quality
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def as_format(data: bytes, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """``data`` re-encoded as ``fmt`` ("JPEG", "PNG" or "WEBP"; ``quality`` for the lossy
    two). Only the upright RGB pixels carry over: EXIF, ICC profile and comments do not."""
    with Image.open(io.BytesIO(data)) as image:
        upright = (ImageOps.exif_transpose(image) or image).convert("RGB")
    return _save(upright, fmt, quality)


def sideways(data: bytes, orientation: int = 6, quality: int = 90) -> bytes:
    """``data`` as a camera held sideways writes it: the pixels stored rotated a quarter
    turn, with EXIF Orientation ``orientation`` (6: turn 90° clockwise to view, 8: 90°
    anticlockwise) saying how to turn them back. A decoder that honours the tag
    (PIL.ImageOps.exif_transpose) gets the upright photo back; one that ignores it
    sees it on its side. Same format as ``data`` (JPEG re-encoded at ``quality``)."""
    if orientation not in (6, 8):
        raise ValueError(f"orientation is {orientation}; use 6 or 8")
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or "PNG"
        upright = (ImageOps.exif_transpose(image) or image).convert("RGB")
    # exif_transpose undoes 6 with ROTATE_270 and 8 with ROTATE_90: store the inverse.
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _save(stored, fmt, quality, exif=exif.tobytes())
