"""Pictures for tests: the demo classes, every Pillow mode, and malformed files."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

from PIL import Image
from wanwu_worker.demo.shapes import COLOURS, LABELS, SHAPES, label_index, render


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def demo_images(seed: int = 20261121, fmt: str = "PNG") -> dict[str, bytes]:
    """One encoded picture of each demo class, keyed by its expected label."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for colour in COLOURS:
        for shape in SHAPES:
            out[LABELS[label_index(colour, shape)]] = encode(render(rng, colour, shape), fmt)
    return out


def demo_tree(root: Path, count: int, seed: int) -> dict[str, str]:
    """``count`` demo pictures under ``root`` in nested folders, PNG and JPEG (what a
    backfill walks); returns the expected label of each, keyed by its path relative to ``root``."""
    rng = random.Random(seed)
    expected: dict[str, str] = {}
    for i in range(count):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        fmt = "PNG" if i % 3 else "JPEG"
        relative = f"part-{i % 4}/{i // 50:02d}/img-{i:05d}.{'png' if fmt == 'PNG' else 'jpg'}"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(render(rng, colour, shape), fmt))
        expected[relative] = LABELS[label_index(colour, shape)]
    return expected


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with one tiny IDAT: cheap to
    send, ruinous to decode if a server trusted the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = encode(Image.new("RGB", (64, 64), (200, 10, 10)).effect_spread(3))
    return data[: len(data) // 2]
