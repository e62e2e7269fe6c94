"""Decode untrusted image bytes and turn them into a model's input tensor.

Decoding is defensive: the format is sniffed from the bytes, the pixel count is checked
from the header before any pixel is decoded, truncated data is an error, and multi-frame
files use their first frame. Only Pillow and torch are used (no torchvision, no numpy),
so the CPU image stays small.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError

if TYPE_CHECKING:
    import torch

    from .bundle import Bundle

# Formats a client may send. Anything else Pillow can parse (EPS, PSD, ...) is refused:
# some of those run external programs or have had more parser bugs.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False


def sniff(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` lazily (header only) and check it is an allowed format within the
    pixel cap. Raises InputError with codes empty, not_an_image, unsupported_format or
    image_too_large."""
    if not data:
        raise InputError("the request body is empty; send the image bytes", code="empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        OSError,
        ValueError,
        SyntaxError,
    ):
        raise _classify_unopenable(data) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"image has no pixels ({width}x{height})", code="corrupt_image")
    if width * height > max_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            code="image_too_large",
        )
    return image


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
    several times faster for large photos and loses nothing the model would see."""
    image = sniff(data, max_pixels)
    if draft is not None and image.format == "JPEG":
        image.draft("RGB", draft)
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"{image.format} image could not be decoded: {exc}", code="corrupt_image") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Transparency is composited over white;
    16- and 32-bit greyscale is scaled to 8 bits rather than clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
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
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise InputError(f"images in colour mode {mode} are not supported", code="unsupported_mode") from exc


def resize_and_crop(image: Image.Image, resize: int, crop: tuple[int, int]) -> Image.Image:
    """Scale so the shorter side is ``resize`` pixels, then cut the centre ``crop``
    (height, width)."""
    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(crop[1], round(width * scale)), max(crop[0], round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - crop[1]) // 2, (new_h - crop[0]) // 2
    return image.crop((left, top, left + crop[1], top + crop[0]))


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
