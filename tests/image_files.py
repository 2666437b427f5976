"""Image files generated in memory (Pillow / numpy / scikit-image), shared by the unit and integration tests.

Every function returns the bytes of one file and is deterministic and quick (well under a second); results
are cached, so calling one twice is free. Nothing here is committed as a binary file.
"""

import io
import struct
import zlib
from functools import lru_cache

import numpy as np
import skimage.data
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _picture(name: str) -> Image.Image:
    """`skimage.data.<name>()` as a Pillow image: bool -> 0/255, floats (0..1) and 16-bit -> 8-bit."""
    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        array = np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise ValueError(f"skimage.data.{name}() is {array.shape}, not a picture")
    return Image.fromarray(array)


@lru_cache(maxsize=64)
def photo(name: str = "chelsea", fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    """A scikit-image sample photo (`skimage.data.<name>`) as a JPEG/PNG/WEBP/GIF/BMP file, optionally resized to
    `size` (width, height)."""
    image = _picture(name)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if fmt.upper() in ("JPEG", "MPO") and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    options: dict[str, object] = {"quality": 90} if fmt.upper() in ("JPEG", "WEBP") else {}
    return _save(image, fmt.upper(), **options)


def photo_pixels(name: str = "chelsea", size: tuple[int, int] | None = None) -> np.ndarray:
    """The RGB pixels (H, W, 3) that `photo(name, ..., size)` encodes, to compare a decoded picture with."""
    image = _picture(name)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"))


# --- files that must be refused -----------------------------------------------------------------------------


def not_an_image() -> bytes:
    """Plain text, not an image file."""
    return b"hello, this is text"


def empty() -> bytes:
    """Zero bytes."""
    return b""


@lru_cache(maxsize=8)
def truncated_jpeg() -> bytes:
    """The first half of a valid JPEG (chelsea): the header reads, the pixel data stops early."""
    data = photo("chelsea", "JPEG")
    return data[: len(data) // 2]


@lru_cache(maxsize=8)
def noise_png(side: int = 256, seed: int = 0) -> bytes:
    """A valid side x side RGB PNG of random noise (incompressible: about 3 * side**2 bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), "PNG", compress_level=1)


def larger_than(limit: int) -> bytes:
    """A valid PNG (random noise) of more than `limit` bytes."""
    side = int(np.ceil(np.sqrt(limit / 3))) + 8
    data = noise_png(side)
    assert len(data) > limit
    return data


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@lru_cache(maxsize=8)
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A decompression bomb: a valid, all-black 1-bit PNG whose header says width x height (default 400
    million pixels) in a few tens of KB. Written chunk by chunk, so generating it takes ~0.1 s and no big image."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed all-zero bits
    rows_per_chunk = max(1, (1 << 20) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_chunk):
        parts.append(compressor.compress(row * min(rows_per_chunk, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=8)
def strip(width: int = 20000, height: int = 10) -> bytes:
    """A width x height grey PNG strip (default 2000:1, far past any sane aspect-ratio limit)."""
    return _save(Image.new("L", (width, height), 128), "PNG")


# --- odd but acceptable files -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def one_pixel(fmt: str = "PNG", colour: tuple[int, int, int] = (200, 100, 50)) -> bytes:
    """A 1x1 RGB image of `colour`."""
    return _save(Image.new("RGB", (1, 1), colour), fmt)


CMYK_PATCHES = {  # CMYK ink -> the RGB it should decode to; quadrants TL, TR, BL, BR of cmyk_jpeg()
    (255, 0, 0, 0): (0, 255, 255),
    (0, 255, 0, 0): (255, 0, 255),
    (0, 0, 255, 0): (255, 255, 0),
    (0, 0, 0, 255): (0, 0, 0),
}


@lru_cache(maxsize=8)
def cmyk_jpeg(side: int = 64) -> bytes:
    """A CMYK JPEG of four quadrants, pure cyan, magenta, yellow (top-left, top-right, bottom-left) and black
    (bottom-right); see CMYK_PATCHES."""
    image = Image.new("CMYK", (side, side))
    half = side // 2
    for (x, y), ink in zip([(0, 0), (half, 0), (0, half), (half, half)], CMYK_PATCHES, strict=True):
        image.paste(ink, (x, y, x + half, y + half))
    return _save(image, "JPEG", quality=95)


@lru_cache(maxsize=8)
def gray16_png(width: int = 256, height: int = 16) -> bytes:
    """A 16-bit grayscale PNG (mode I;16): a left-to-right gradient 0..65535, so column x of a 256-wide one is
    x * 257 and should decode to grey level x (a wrong scaling saturates or blackens it)."""
    row = np.rint(np.linspace(0, 65535, width)).astype(np.uint16)
    return _save(Image.fromarray(np.tile(row, (height, 1))), "PNG")


@lru_cache(maxsize=8)
def dark_gray16_png(level: int = 200, side: int = 16) -> bytes:
    """A 16-bit grayscale PNG filled with `level` out of 65535: nearly black (should decode to grey ~level/257)."""
    return _save(Image.fromarray(np.full((side, side), level, dtype=np.uint16)), "PNG")


ANIMATION_COLOURS = (RED, GREEN, BLUE)


@lru_cache(maxsize=8)
def animated_gif(side: int = 32) -> bytes:
    """An animated GIF of three solid frames: red, then green, then blue (ANIMATION_COLOURS)."""
    frames = [Image.new("RGB", (side, side), colour) for colour in ANIMATION_COLOURS]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@lru_cache(maxsize=8)
def animated_webp(side: int = 32) -> bytes:
    """An animated WebP of three solid frames: red, then green, then blue (ANIMATION_COLOURS)."""
    frames = [Image.new("RGB", (side, side), colour) for colour in ANIMATION_COLOURS]
    return _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)


@lru_cache(maxsize=8)
def mpo(side: int = 32) -> bytes:
    """A camera-style MPO (multi-picture JPEG) of two frames: red, then blue."""
    frames = [Image.new("RGB", (side, side), colour) for colour in (RED, BLUE)]
    return _save(frames[0], "MPO", save_all=True, append_images=frames[1:])


@lru_cache(maxsize=8)
def rgba_png() -> bytes:
    """A 48x16 RGBA PNG of three 16-px vertical bands: fully transparent black, half-transparent red
    (alpha 128), opaque green."""
    pixels = np.zeros((16, 48, 4), dtype=np.uint8)
    pixels[:, 16:32] = (255, 0, 0, 128)
    pixels[:, 32:] = (0, 255, 0, 255)
    return _save(Image.fromarray(pixels, "RGBA"), "PNG")


@lru_cache(maxsize=8)
def palette_png() -> bytes:
    """A 32x16 palette PNG with transparency: left half palette entry 0 (black, marked transparent), right
    half entry 1 (opaque red)."""
    image = Image.new("P", (32, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
    image.paste(1, (16, 0, 32, 16))
    return _save(image, "PNG", transparency=0)


@lru_cache(maxsize=8)
def colour_key_png(mode: str = "RGB") -> bytes:
    """A 32x16 RGB (or L) PNG with a tRNS colour key: left half the key colour (black, so transparent), right
    half opaque red (grey 128 for L)."""
    image = Image.new(mode, (32, 16), 0)
    image.paste(RED if mode == "RGB" else 128, (16, 0, 32, 16))
    return _save(image, "PNG", transparency=(0, 0, 0) if mode == "RGB" else 0)


@lru_cache(maxsize=8)
def gray_jpeg() -> bytes:
    """A grayscale (mode L, one component) JPEG: skimage's 512x512 `camera`."""
    return photo("camera", "JPEG")


@lru_cache(maxsize=8)
def exif_rotated_jpeg(width: int = 64, height: int = 32) -> bytes:
    """A width x height JPEG, blue with a red (height/2)-square in its top-left corner, tagged EXIF
    orientation 6 ("rotate 90 degrees clockwise to display"): shown upright it is height x width with the red
    square in the TOP-RIGHT corner."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, height // 2, height // 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return _save(image, "JPEG", quality=95, exif=exif.tobytes())


def bmp() -> bytes:
    """A BMP of chelsea (451x300 RGB)."""
    return photo("chelsea", "BMP")


def webp() -> bytes:
    """A lossy WebP of chelsea (451x300 RGB)."""
    return photo("chelsea", "WEBP")
