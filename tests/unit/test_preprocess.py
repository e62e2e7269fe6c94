"""Decoding untrusted bytes and preprocessing: every mode, orientation, bad input."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image, ImageChops, ImageOps, ImageStat, features
from wanwu_worker.errors import InputError
from wanwu_worker.preprocess import (
    CHECK_DRAFT,
    DEFAULT_MAX_PIXELS,
    MAX_ASPECT,
    decode,
    resize_and_crop,
    sniff,
    to_pixels,
    to_rgb,
    to_tensor,
)

from tests.images import encode, png_header_only, truncated_png
from tests.photos import NAMES, PHOTOS, as_format, photo, sideways


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


# --- Real photographs (tests/photos) ---------------------------------------------------


def whole_then_crop(image: Image.Image, resize: int, crop: tuple[int, int]) -> Image.Image:
    """resize_and_crop as it was before long images were bounded: scale the whole image,
    then crop. The reference its output must match."""
    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(crop[1], round(width * scale)), max(crop[0], round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - crop[1]) // 2, (new_h - crop[0]) // 2
    return image.crop((left, top, left + crop[1], top + crop[0]))


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def test_pillow_writes_webp() -> None:
    assert features.check("webp")
    assert Image.open(io.BytesIO(as_format(photo("chelsea.png"), "WEBP"))).format == "WEBP"


def test_every_photo_is_here() -> None:
    assert sorted(p.name for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg")) == sorted(NAMES)
    for name in NAMES:
        with Image.open(PHOTOS / name) as image:
            assert image.mode == "RGB" and image.format == ("PNG" if name.endswith(".png") else "JPEG")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("name", NAMES)
def test_photo_in_each_format_preprocesses(name: str, fmt: str) -> None:
    upright = Image.open(io.BytesIO(photo(name))).convert("RGB")
    data = as_format(photo(name), fmt)
    image = decode(data)
    assert image.mode == "RGB" and image.size == upright.size
    if fmt == "PNG":
        assert image.tobytes() == upright.tobytes()
    else:
        assert mean_difference(image, upright) < 4
    # As a worker does it: a JPEG of 512 px or more on both sides decodes at 1/2 scale.
    model_input = resize_and_crop(decode(data, draft=(256, 256)), 256, (224, 224))
    assert tuple(to_pixels(model_input).shape) == (224, 224, 3)
    assert mean_difference(model_input, resize_and_crop(image, 256, (224, 224))) < 4


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("name", NAMES)
def test_sideways_photo_comes_back_upright(name: str, orientation: int) -> None:
    upright = Image.open(io.BytesIO(photo(name))).convert("RGB")
    data = sideways(photo(name), orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[0x0112] == orientation
    assert stored.size == upright.size[::-1]  # the pixels really lie on their side
    for back in (ImageOps.exif_transpose(stored).convert("RGB"), decode(data)):
        assert back.size == upright.size
        if name.endswith(".png"):
            assert back.tobytes() == upright.tobytes()
        else:  # re-encoded at quality 90
            assert mean_difference(back, upright) < 4
    if upright.size[0] == upright.size[1]:  # astronaut.png: the size alone proves nothing
        assert mean_difference(stored.convert("RGB"), upright) > 20


@pytest.mark.parametrize("name", NAMES)
def test_normal_photos_resize_exactly_as_before(name: str) -> None:
    image = decode(photo(name))
    for resize, crop in ((256, (224, 224)), (72, (64, 48)), (342, (299, 299))):
        assert resize_and_crop(image, resize, crop).tobytes() == whole_then_crop(image, resize, crop).tobytes()


# --- Large JPEGs: the cap is on the decoded size -------------------------------------


def jpeg_header_only(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header is rewritten to declare width x height: cheap to
    send, and huge if a server trusted the header (only the header is ever read here)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 200)), "JPEG"))
    at = 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):  # walk the segments to the frame header
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)  # after length and precision
    return bytes(data)


@pytest.fixture(scope="module")
def phone_jpeg() -> bytes:
    """A 48-megapixel (8000x6000) photo as a phone saves it, quality 85 (about 1.8 MB)."""
    cat = Image.open(io.BytesIO(photo("chelsea.png"))).convert("RGB")
    return encode(cat.resize((8000, 6000), Image.Resampling.BILINEAR), "JPEG", quality=85)


def test_48_megapixel_jpeg_is_answered(phone_jpeg: bytes) -> None:
    assert Image.open(io.BytesIO(phone_jpeg)).size == (8000, 6000)
    with pytest.raises(InputError, match="8000x6000 = 48000000 pixels; the limit is 40000000"):
        decode(phone_jpeg)  # no draft: a full decode, 144 MB, and over the cap
    image = decode(phone_jpeg, draft=(256, 256))  # what a worker does for a 256/224 model
    assert image.mode == "RGB" and image.size == (1000, 750)  # decoded at 1/8 scale
    pixels = to_pixels(resize_and_crop(image, 256, (224, 224)))
    assert tuple(pixels.shape) == (224, 224, 3)
    # The same picture as a small upload gives the same input, near enough.
    small = decode(encode(Image.open(io.BytesIO(phone_jpeg)).reduce(8), "PNG"))
    assert mean_difference(resize_and_crop(small, 256, (224, 224)), resize_and_crop(image, 256, (224, 224))) < 4


def test_gateway_lets_a_48_megapixel_jpeg_through(phone_jpeg: bytes) -> None:
    from gateway.errors import ApiError
    from gateway.inputs import check_image

    check_image(phone_jpeg, DEFAULT_MAX_PIXELS)  # measured as decoded for CHECK_DRAFT: 2000x1500
    assert sniff(phone_jpeg, DEFAULT_MAX_PIXELS, CHECK_DRAFT).size == (2000, 1500)
    with pytest.raises(ApiError) as caught:  # a PNG cannot be decoded smaller: its header counts
        check_image(png_header_only(8000, 6000), DEFAULT_MAX_PIXELS)
    assert (caught.value.status, caught.value.code) == (413, "image_too_large")


@pytest.mark.parametrize(
    ("declared", "draft", "decoded"),
    [
        ((8000, 6000), (256, 256), (1000, 750)),  # 1/8
        ((8000, 6000), (1024, 1024), (2000, 1500)),  # 1/4: 6000 // 1024 = 5
        ((4000, 3000), (1024, 1024), (2000, 1500)),  # 1/2
        ((3000, 2000), (1024, 1024), (3000, 2000)),  # 2000 // 1024 = 1: full size
        ((8001, 6001), (256, 256), (1001, 751)),  # sides round up
        ((300, 200), (256, 256), (300, 200)),
    ],
)
def test_jpeg_draft_size_follows_pillow(
    declared: tuple[int, int], draft: tuple[int, int], decoded: tuple[int, int]
) -> None:
    assert sniff(jpeg_header_only(*declared), draft=draft).size == decoded


def test_jpeg_cap_applies_to_the_decoded_size() -> None:
    cap = 1_000_000
    assert sniff(jpeg_header_only(8000, 8000), cap, draft=(256, 256)).size == (1000, 1000)  # 64 MP declared
    with pytest.raises(InputError, match="image is 4000x4000, decoded at 2000x2000 = 4000000 pixels; the limit is"):
        sniff(jpeg_header_only(4000, 4000), cap, draft=(1024, 1024))
    with pytest.raises(InputError, match="image is 8000x6000 = 48000000 pixels"):
        sniff(png_header_only(8000, 6000), draft=(256, 256))  # other formats: the declared size


def test_jpeg_declared_size_has_a_hard_bound() -> None:
    cap = 1_000_000  # so 64x the cap stays below Pillow's own guard (about 179 MP)
    with pytest.raises(InputError, match="JPEG image is 8001x8000 = 64008000 pixels; the limit is 64000000") as caught:
        sniff(jpeg_header_only(8001, 8000), cap, draft=(1, 1))  # would draft to 1001x1000
    assert caught.value.code == "image_too_large"
    with pytest.raises(InputError) as caught:  # 4.2 gigapixels: Pillow itself refuses it
        decode(jpeg_header_only(65000, 65000), draft=(256, 256))
    assert caught.value.code == "image_too_large"


@pytest.mark.parametrize("draft", [None, (256, 256)])
def test_over_pillows_bomb_warning_is_too_large_not_corrupt(draft: tuple[int, int] | None) -> None:
    # 100 MP is past Pillow's warning (89 MP) but not its error (179 MP); the cap decides.
    with pytest.raises(InputError, match="10000x10000") as caught:
        sniff(png_header_only(10_000, 10_000), draft=draft)
    assert caught.value.code == "image_too_large"
    assert sniff(png_header_only(10_000, 10_000), max_pixels=100_000_000).size == (10_000, 10_000)


def test_a_108_megapixel_jpeg_is_answered() -> None:
    data = jpeg_header_only(12_000, 9_000)  # a 108 MP phone mode, past Pillow's warning
    assert sniff(data, draft=(256, 256)).size == (1500, 1125)
    assert sniff(data, draft=CHECK_DRAFT).size == (1500, 1125)  # 9000 // 1024 = 8: 1/8 too


def test_mpo_is_drafted_like_a_jpeg() -> None:
    # Phones write MPO: a JPEG with more pictures after it. The first one is the photo.
    cat = Image.open(io.BytesIO(photo("chelsea.png"))).convert("RGB").resize((3608, 2400))
    data = encode(cat, "MPO", save_all=True, append_images=[Image.new("RGB", (320, 240))], quality=85)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decode(data, draft=(256, 256))
    assert image.size == (451, 300)  # 1/8 scale
    assert mean_difference(image, cat.reduce(8)) < 4


# --- Every mode and animation gives RGB -----------------------------------------------


def _source() -> Image.Image:
    return Image.open(io.BytesIO(photo("coffee.png"))).convert("RGB").reduce(5)  # 120x80


def _png_palette_alpha() -> bytes:
    rgba = _source().convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return encode(rgba.convert("P"), "PNG")  # tRNS with one alpha per palette entry


def _animated(fmt: str) -> bytes:
    frames = [_source().convert("RGBA"), Image.new("RGBA", (120, 80), (0, 0, 255, 128))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


HOSTILE: dict[str, Callable[[], bytes]] = {
    "L png": lambda: encode(_source().convert("L"), "PNG"),
    "L jpeg": lambda: encode(_source().convert("L"), "JPEG"),
    "CMYK jpeg": lambda: encode(_source().convert("CMYK"), "JPEG"),
    "I;16 png": lambda: encode(_source().convert("L").convert("I").point(lambda v: v * 257).convert("I;16"), "PNG"),
    "P png": lambda: encode(_source().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "P png, transparent index": lambda: encode(_source().convert("P"), "PNG", transparency=0),
    "P png, alpha per entry": _png_palette_alpha,
    "P gif, transparent index": lambda: encode(_source().convert("P"), "GIF", transparency=0),
    "LA png": lambda: encode(_source().convert("LA"), "PNG"),
    "RGBA png": lambda: encode(_source().convert("RGBA"), "PNG"),
    "RGBA webp": lambda: encode(_source().convert("RGBA"), "WEBP"),
    "1 tiff": lambda: encode(_source().convert("1"), "TIFF"),
    "I;16B tiff": lambda: encode(Image.new("I;16B", (120, 80), 40000), "TIFF"),
    "F tiff": lambda: encode(_source().convert("F"), "TIFF"),
    "LAB tiff": lambda: encode(_source().convert("LAB"), "TIFF"),
    "animated gif": lambda: _animated("GIF"),
    "animated webp": lambda: _animated("WEBP"),
    "animated png": lambda: _animated("PNG"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_modes_give_rgb(name: str) -> None:
    data = HOSTILE[name]()
    source = Image.open(io.BytesIO(data))
    image = decode(data, draft=(64, 64))
    assert image.mode == "RGB" and image.size == source.size == (120, 80)
    pixels = to_pixels(resize_and_crop(image, 64, (56, 56)))
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (56, 56, 3)
    if name.startswith("animated"):  # the first frame (the coffee), not the blue second one
        assert getattr(source, "n_frames", 1) == 2
        assert mean_difference(image, _source()) < 12


# --- Extreme aspect ratios: bounded memory -------------------------------------------


@pytest.fixture
def resized_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image Image.resize makes while the test runs."""
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def spy(self: Image.Image, size: tuple[int, int], *args: Any, **kwargs: Any) -> Image.Image:
        sizes.append(tuple(size))  # type: ignore[arg-type]
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return sizes


@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1)])
def test_a_1_by_20000_strip_stays_small(size: tuple[int, int], resized_sizes: list[tuple[int, int]]) -> None:
    strip = Image.new("RGB", size, (255, 0, 0))
    strip.paste((0, 255, 0), (0, 9_990, 1, 10_010) if size[0] == 1 else (9_990, 0, 10_010, 1))  # a green middle
    image = decode(encode(strip, "PNG"), draft=(256, 256))
    out = resize_and_crop(image, 256, (224, 224))
    assert out.size == (224, 224)
    assert out.getextrema() == ((0, 0), (255, 255), (0, 0))  # only the green middle
    # Whole-image scaling would make a 256x5120000 image (3.9 GB). The bound: no image made
    # by resizing is larger than the crop (past MAX_ASPECT the crop is resampled directly).
    assert resized_sizes == [(224, 224)]


@pytest.mark.parametrize("size", [(3000, 150), (150, 3000), (12_345, 37), (5000, 1000), (2001, 100)])
def test_long_images_match_whole_image_scaling(size: tuple[int, int], resized_sizes: list[tuple[int, int]]) -> None:
    panorama = Image.open(io.BytesIO(photo("china.jpg"))).convert("RGB").resize(size)
    expected = whole_then_crop(panorama, 256, (224, 224))
    resized_sizes.clear()
    out = resize_and_crop(panorama, 256, (224, 224))
    assert resized_sizes == [(224, 224)]  # never the whole scaled image
    assert max(ImageChops.difference(out, expected).tobytes()) <= 1  # rounding in the last bit at most


def test_scaled_size_is_bounded_at_any_ratio(resized_sizes: list[tuple[int, int]]) -> None:
    for width in (224, 300, 600, 1023, 1024, 1025, 4096, 40_000):
        resize_and_crop(Image.new("RGB", (width, 256)), 256, (224, 224))
    assert max(max(size) for size in resized_sizes) <= MAX_ASPECT * 256


def test_a_progressive_or_cmyk_jpeg_is_capped_at_its_declared_size() -> None:
    """Reduced-scale decoding saves no memory for a progressive JPEG (every coefficient
    of the full image is kept until the last scan) nor for CMYK: those are capped by
    what they declare, while the same baseline photo is decoded small."""
    picture = Image.new("RGB", (1200, 1000), (100, 120, 140))

    def jpeg(image: Image.Image, **params: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=70, **params)
        return buffer.getvalue()

    cap = 1_000_000  # the picture declares 1.2 MP
    assert decode(jpeg(picture), cap, draft=(256, 256)).size == (600, 500)  # 1/2 scale: at least 256 high
    for data in (jpeg(picture, progressive=True), jpeg(picture.convert("CMYK"))):
        with pytest.raises(InputError) as caught:
            decode(data, cap, draft=(256, 256))
        assert caught.value.code == "image_too_large"
