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


def photo_tree(root: Path, count: int, seed: int) -> list[Path]:
    """``count`` photo files under ``root`` in nested folders, what a backfill of camera
    pictures walks: each a random crop (half to all of each side) of one of the test
    photos, scaled to a longer side of 256 px to the crop's own (never enlarged), saved
    as JPEG (quality 70-95) or, one in five, PNG. Deterministic for a ``seed``."""
    import random

    rng = random.Random(seed)
    sources = []
    for name in NAMES:
        with Image.open(PHOTOS / name) as image:
            sources.append((ImageOps.exif_transpose(image) or image).convert("RGB"))
    files = []
    for i in range(count):
        source = rng.choice(sources)
        width, height = source.size
        w, h = round(width * rng.uniform(0.5, 1.0)), round(height * rng.uniform(0.5, 1.0))
        x, y = rng.randrange(width - w + 1), rng.randrange(height - h + 1)
        crop = source.crop((x, y, x + w, y + h))
        longer = rng.randint(min(256, max(w, h)), max(w, h))
        crop = crop.resize((max(1, round(w * longer / max(w, h))), max(1, round(h * longer / max(w, h)))))
        fmt = "PNG" if rng.random() < 0.2 else "JPEG"
        path = root / f"{i % 7:02d}" / f"{i % 3}" / f"photo{i:05d}.{'png' if fmt == 'PNG' else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_save(crop, fmt, rng.randint(70, 95)))
        files.append(path)
    return files
