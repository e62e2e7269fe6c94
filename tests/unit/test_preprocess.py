"""Decoding untrusted bytes and preprocessing: every mode, orientation, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from wanwu_worker.errors import InputError
from wanwu_worker.preprocess import decode, resize_and_crop, sniff, to_rgb, to_tensor

from tests.images import encode, png_header_only, truncated_png


def mode_image(mode: str) -> Image.Image:
    base = Image.new("RGB", (40, 30), (200, 30, 30))
    base.paste((30, 30, 200), (20, 0, 40, 30))
    if mode == "P":
        return base.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "I;16":
        return Image.new("I;16", (40, 30), 40000)
    if mode == "I":
        return Image.new("I", (40, 30), 70000)
    if mode == "F":
        return Image.new("F", (40, 30), 0.5)
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    rgb = to_rgb(mode_image(mode))
    assert rgb.mode == "RGB"
    assert rgb.size == (40, 30)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    # 40000/65535 of full scale is about 155 in 8 bits; clipping would give 255.
    assert to_rgb(mode_image("I;16")).getpixel((0, 0)) == (155, 155, 155)


def test_transparency_is_composited_over_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_allowed_formats_decode(fmt: str) -> None:
    image = decode(encode(Image.new("RGB", (33, 21), (10, 200, 10)), fmt))
    assert image.mode == "RGB" and image.size == (33, 21)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    data = encode(Image.new("RGB", (40, 20), (0, 0, 255)), "JPEG", exif=exif.tobytes())
    assert decode(data).size == (20, 40)


def test_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    red, _green, blue = decode(buffer.getvalue()).getpixel((8, 8))
    assert red > 200 and blue < 50


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"hello, this is text and not a picture", "not_an_image"),
        (encode(Image.new("RGB", (8, 8)), "PPM"), "unsupported_format"),
        (png_header_only(100_000, 100_000), "image_too_large"),
    ],
)
def test_bad_input_has_a_code(data: bytes, code: str) -> None:
    with pytest.raises(InputError) as caught:
        decode(data)
    assert caught.value.code == code
    assert caught.value.status == 400


def test_truncated_file_is_corrupt() -> None:
    with pytest.raises(InputError) as caught:
        decode(truncated_png())
    assert caught.value.code == "corrupt_image"


def test_pixel_cap_is_checked_from_the_header() -> None:
    data = encode(Image.new("RGB", (300, 200)))
    assert sniff(data, max_pixels=60_000).size == (300, 200)
    with pytest.raises(InputError, match="300x200 = 60000 pixels; the limit is 59999"):
        sniff(data, max_pixels=59_999)


@pytest.mark.parametrize("size", [(128, 64), (64, 256), (300, 200), (20, 10), (64, 64)])
def test_resize_shorter_side_then_centre_crop(size: tuple[int, int]) -> None:
    assert resize_and_crop(Image.new("RGB", size), 72, (64, 48)).size == (48, 64)


def test_centre_crop_keeps_the_centre() -> None:
    image = Image.new("RGB", (192, 64), (0, 0, 0))
    image.paste((255, 255, 255), (64, 0, 128, 64))  # the middle third is white
    out = resize_and_crop(image, 64, (64, 64))
    assert out.getextrema() == ((255, 255), (255, 255), (255, 255))


def test_to_tensor_normalises_per_channel() -> None:
    image = Image.new("RGB", (2, 3), (255, 0, 51))
    tensor = to_tensor(image, (0.5, 0.5, 0.0), (0.5, 0.25, 0.2))
    assert tensor.shape == (3, 3, 2)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, -2.0, 1.0]))
