"""Decode untrusted image bytes and turn them into a model's input tensor.

Decoding is defensive: the format is sniffed from the bytes, the pixel count is checked
from the header before any pixel is decoded, truncated data is an error, and multi-frame
files use their first frame. Only Pillow and torch are used: no torchvision (the CPU
image does not ship it) and no NumPy (Pillow's bytes become a tensor directly; NumPy is
in the image for onnxruntime and the ONNX exporter).

The pixel cap bounds what is decoded, not what a header declares: a JPEG is decoded at
a reduced scale (``Image.draft``, 1/2, 1/4 or 1/8) when the caller names the size it
needs, so a 48-megapixel phone photo decodes to well under a megapixel and is answered.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import InputError

if TYPE_CHECKING:
    import torch

    from .bundle import Bundle

# Formats a client may send. Anything else Pillow can parse (EPS, PSD, ...) is refused:
# some of those run external programs or have had more parser bugs.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000
# JPEG's reduced-size decoding goes down to 1/8 in each direction, 1/64 of the pixels:
# a JPEG header may declare up to this many times the pixel cap (the hard bound on
# declared size), and the cap itself applies to the size it decodes at.
JPEG_DRAFT_FACTOR = 64
# The draft size the gateway checks uploads against. It knows no model's input size, so
# it takes one at least as large as any model's ``resize``: a larger target reduces less,
# so a JPEG the gateway lets through is within the cap on every worker too.
CHECK_DRAFT = (1024, 1024)
# resize_and_crop scales an image whole only while its scaled longer side is at most this
# many times the model's input size; a longer one has only its centre crop resampled.
MAX_ASPECT = 4

ImageFile.LOAD_TRUNCATED_IMAGES = False


def sniff(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open ``data`` lazily (header only) and check it is an allowed format within the
    pixel cap. Raises InputError with codes empty, not_an_image, unsupported_format,
    corrupt_image or image_too_large.

    With ``draft`` (width, height), a JPEG is set to decode at the most reduced of 1/8,
    1/4, 1/2 or full scale that is still at least that size (``Image.draft``); the cap then
    applies to that decoded size, and the declared size may be up to
    ``JPEG_DRAFT_FACTOR`` times the cap. Other formats, or no ``draft``: the cap applies
    to the declared size. The returned image is the one to load."""
    if not data:
        raise InputError("the request body is empty; send the image bytes", code="empty")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning (above ~89 MP) is replaced by the checks below;
            # its error (above twice that) still stops an absurd header here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        raise _classify_unopenable(data) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"image has no pixels ({width}x{height})", code="corrupt_image")
    if draft is None or min(draft) <= 0 or not _drafts_cheaply(image):
        if width * height > max_pixels:
            raise InputError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                code="image_too_large",
            )
        return image
    # A JPEG (or MPO, a phone's JPEG with extra pictures): the cap is on what it decodes to.
    if width * height > max_pixels * JPEG_DRAFT_FACTOR:
        raise InputError(
            f"{image.format} image is {width}x{height} = {width * height} pixels; the limit is "
            f"{max_pixels * JPEG_DRAFT_FACTOR} for JPEG ({max_pixels} once decoded at 1/8 scale)",
            code="image_too_large",
        )
    try:
        image.draft("RGB", draft)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{image.format} image could not be opened: {exc}", code="corrupt_image") from None
    dw, dh = image.size
    if dw * dh > max_pixels:
        raise InputError(
            f"image is {width}x{height}, decoded at {dw}x{dh} = {dw * dh} pixels; the limit is {max_pixels}",
            code="image_too_large",
        )
    return image


def _drafts_cheaply(image: Image.Image) -> bool:
    """Whether a reduced-scale decode of ``image`` also needs memory only for the reduced
    size: a baseline JPEG in colour or grey. A progressive JPEG keeps every coefficient
    of the full image until its last scan (about 2 bytes a pixel a component, 1 GB for
    a 2 MB file declaring 177 MP), and CMYK ones more: their declared size is capped."""
    return (
        isinstance(image, JpegImagePlugin.JpegImageFile)
        and not image.info.get("progressive")
        and not image.info.get("progression")
        and image.mode in ("RGB", "L", "YCbCr")
    )


def _classify_unopenable(data: bytes) -> InputError:
    """Say why ``data`` could not be opened: an image Pillow knows but we refuse, a
    header too large for Pillow's own guard, or not an image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return InputError(f"image is too large: {exc}", code="image_too_large")
    except Exception:  # noqa: BLE001 - any parser failure means "not an image we know"
        return InputError("the body is not a recognised image (JPEG, PNG, GIF, BMP, WebP, TIFF)", code="not_an_image")
    fmt = other.format or "unknown"
    if fmt in FORMATS:
        return InputError(f"{fmt} image could not be opened; it may be corrupt", code="corrupt_image")
    return InputError(f"{fmt} images are not supported; send {', '.join(FORMATS)}", code="unsupported_format")


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` to an upright RGB image (first frame, EXIF orientation applied).

    ``draft`` lets JPEG decode at a reduced scale no smaller than that size, which is
    several times faster for large photos and loses nothing the model would see; the
    pixel cap then applies to that decoded size (see ``sniff``)."""
    # sniff applies the draft. Pillow opens every format at its first frame; no seek(0)
    # here, since seeking an MPO re-reads its header and would undo the draft.
    image = sniff(data, max_pixels, draft)
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # a GIF frame larger than its screen
        raise InputError(f"{image.format} image is too large: {exc}", code="image_too_large") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise InputError(f"{image.format} image could not be decoded: {exc}", code="corrupt_image") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparency is composited over white;
    16- and 32-bit greyscale is scaled to 8 bits rather than clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode.startswith("I;16"):
            image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
        elif mode in ("I", "F"):
            extrema = image.getextrema()  # one band: (min, max) as numbers
            low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
            scale = 255 / (high - low) if high > low else 0
            image = image.point(lambda v: (v - low) * scale).convert("L")
        if (image.mode == "P" and "transparency" in image.info) or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise InputError(f"images in colour mode {mode} are not supported", code="unsupported_mode") from exc


def resize_and_crop(image: Image.Image, resize: int, crop: tuple[int, int]) -> Image.Image:
    """Scale so the shorter side is ``resize`` pixels, then cut the centre ``crop``
    (height, width).

    Memory is bounded whatever the aspect ratio. An image whose scaled longer side would
    pass ``MAX_ASPECT`` times max(resize, crop) (past about 4:1) is not scaled whole: only
    the part of it under the centre crop is resampled, straight to the crop's size, with
    the same scale and alignment. A 1x20000 strip then costs one 224x224 image instead
    of a 256x5120000 one (3.9 GB). Other images are scaled whole, as before."""
    width, height = image.size
    crop_h, crop_w = crop
    scale = resize / min(width, height)
    new_w, new_h = max(crop_w, round(width * scale)), max(crop_h, round(height * scale))
    left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
    if max(new_w, new_h) > MAX_ASPECT * max(resize, crop_h, crop_w):
        # The crop's box in source coordinates, at the whole-image scale (new/old size).
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return image.crop((left, top, left + crop_w, top + crop_h))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 tensor of shape (H, W, 3)."""
    import torch

    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., H, W, 3) as a float tensor (..., 3, H, W), scaled to 0..1 and
    normalised per channel by ``mean`` and ``std`` (3 values each). A whole batch is
    normalised in one pass; one image gives the same numbers alone or in a batch."""
    tensor = pixels.movedim(-1, -3).float().div_(255)
    return tensor.sub_(mean.view(3, 1, 1)).div_(std.view(3, 1, 1))


def to_tensor(image: Image.Image, mean: tuple[float, float, float], std: tuple[float, float, float]) -> torch.Tensor:
    """An RGB image as a normalised float tensor of shape (3, H, W)."""
    import torch

    return normalise(to_pixels(image), torch.tensor(mean), torch.tensor(std))


def preprocess(data: bytes, bundle: Bundle, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Image bytes to the (3, H, W) tensor ``bundle`` expects."""
    image = decode(data, max_pixels, draft=(bundle.resize, bundle.resize))
    return to_tensor(resize_and_crop(image, bundle.resize, bundle.crop), bundle.mean, bundle.std)
