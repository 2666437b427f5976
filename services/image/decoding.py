"""Decoding untrusted image bytes into RGB pictures, with limits checked before the pixels are decoded.

Accepted: JPEG (and camera MPO), PNG, WebP, GIF and BMP; animated files give their first frame. EXIF
orientation is applied; grayscale, palette, CMYK, 16-bit and transparent images become plain 8-bit RGB
(transparency composited over white). Everything else is INVALID_ARGUMENT naming the input and the limit.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidArgument

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # camera MPO files open as JPEG
# Pillow's own decompression-bomb cap (89.5 M pixels) would override a higher IMAGE_MAX_IMAGE_PIXELS;
# decode_image checks the configured limit from the header instead, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float


def header_pixels(data: bytes) -> int:
    """Width x height as the file's header states it (nothing is decoded); 0 when it has none readable."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
    except Exception:  # whatever the file is, decoding it reports what is wrong; the estimate only says 0
        return 0
    return int(width) * int(height)


def decode_image(data: bytes, index: int, limits: ImageLimits, draft_side: int = 0) -> Image.Image:
    """The RGB picture in `data` (inputs[`index`] in messages).

    `draft_side`: the shortest side the model's transform needs; a JPEG at least four times larger is
    decoded at a reduced scale (DCT scaling, still at least twice that side), which is much faster.
    """
    field = f"inputs[{index}].image"
    if not data:
        raise InvalidArgument(
            f"is empty (0 bytes); send the bytes of a {', '.join(FORMATS)} file", field=field
        )
    if len(data) > limits.max_bytes:
        raise InvalidArgument(
            f"is {len(data)} bytes; the limit is {limits.max_bytes} (IMAGE_MAX_IMAGE_BYTES): "
            "send a smaller or more compressed image",
            field=field,
        )
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InvalidArgument(
            f"is not a readable image ({type(error).__name__}); send a {', '.join(FORMATS)} file", field=field
        ) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels "
            "(IMAGE_MAX_IMAGE_PIXELS): send a downscaled image",
            field=field,
        )
    if width < 1 or height < 1 or max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InvalidArgument(
            f"is {width}x{height}; the longest side may be at most {limits.max_aspect_ratio:g} times "
            "the shortest (IMAGE_MAX_ASPECT_RATIO): crop it first",
            field=field,
        )
    if draft_side and image.format in ("JPEG", "MPO") and min(width, height) >= 4 * draft_side:
        scale = 2 * draft_side / min(width, height)
        image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
    try:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidArgument(
            f"could not be decoded ({type(error).__name__}: {error}); the file is truncated or corrupt",
            field=field,
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, whatever the file's mode."""
    if "transparency" in image.info and image.mode in ("L", "RGB"):
        image = image.convert("RGBA")  # a PNG colour key: that colour is transparent
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return Image.fromarray(_16_to_8_bit(np.asarray(image)), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _16_to_8_bit(values: np.ndarray) -> np.ndarray:
    """16-bit grayscale samples (the only integer mode the accepted formats give) scaled to 0..255."""
    return np.clip(np.rint(values.astype(np.float32) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
