"""decode_image: every accepted kind of file becomes the right 8-bit RGB picture; hostile files are refused
with INVALID_ARGUMENT naming the input and the limit, bombs before any pixel is decoded."""

import time

import grpc
import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.image.decoding import ImageLimits, decode_image
from tests import image_files

LIMITS = ImageLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000, max_aspect_ratio=50.0)


def pixels(picture: Image.Image) -> np.ndarray:
    assert picture.mode == "RGB"
    return np.asarray(picture).astype(np.int16)


def close(actual: object, expected: tuple[int, ...], tolerance: int) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, dtype=np.int16) - np.asarray(expected)) <= tolerance))


def refused(data: bytes, limits: ImageLimits = LIMITS, index: int = 3, **options: int) -> str:
    """The message of the InvalidArgument decode_image raises for inputs[index]."""
    with pytest.raises(InvalidArgument) as error:
        decode_image(data, index, limits, **options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"inputs[{index}].image" in error.value.message
    return error.value.message


# --- accepted formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "tolerance"),
    [("PNG", 0), ("BMP", 0), ("JPEG", 12), ("WEBP", 12), ("GIF", 20)],
)
def test_each_format_decodes_to_rgb_of_the_right_size_and_content(fmt: str, tolerance: float) -> None:
    picture = decode_image(image_files.photo("chelsea", fmt), 0, LIMITS)
    assert picture.mode == "RGB"
    assert picture.size == (451, 300)
    error = np.abs(pixels(picture) - image_files.photo_pixels("chelsea")).mean()
    assert error <= tolerance


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
def test_grayscale_and_one_bit_files_become_grey_rgb(fmt: str) -> None:
    for name, size in [("camera", (512, 512)), ("horse", (400, 328))]:
        picture = decode_image(image_files.photo(name, fmt), 0, LIMITS)
        assert picture.size == size
        values = pixels(picture)
        spread = values.max(axis=-1) - values.min(axis=-1)  # WebP has no grey mode: lossy YUV drifts a little
        assert spread.max() <= (8 if fmt == "WEBP" else 0)
        assert np.abs(values - image_files.photo_pixels(name)).mean() <= 12


def test_grayscale_jpeg_decodes_to_the_same_grey_in_all_channels() -> None:
    picture = decode_image(image_files.gray_jpeg(), 0, LIMITS)
    values = pixels(picture)
    assert picture.size == (512, 512)
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 0] == values[..., 2]).all()
    assert np.abs(values - image_files.photo_pixels("camera")).mean() <= 5


def test_exif_orientation_6_is_applied() -> None:
    picture = decode_image(image_files.exif_rotated_jpeg(64, 32), 0, LIMITS)
    assert picture.size == (32, 64)  # stored 64 wide x 32 high, shown 32 wide x 64 high
    assert close(picture.getpixel((28, 4)), image_files.RED, 40)  # stored top-left -> shown top-right
    for corner in [(4, 4), (4, 60), (28, 60)]:
        assert close(picture.getpixel(corner), image_files.BLUE, 40)


@pytest.mark.parametrize("make", [image_files.animated_gif, image_files.animated_webp, image_files.mpo])
def test_animated_and_multi_picture_files_give_their_first_frame(make) -> None:  # type: ignore[no-untyped-def]
    picture = decode_image(make(), 0, LIMITS)
    assert picture.size == (32, 32)
    values = pixels(picture)
    assert close(values, image_files.RED, 3)


def test_rgba_transparency_is_composited_over_white() -> None:
    picture = decode_image(image_files.rgba_png(), 0, LIMITS)
    assert picture.size == (48, 16)
    assert picture.getpixel((8, 8)) == image_files.WHITE  # transparent black -> white, not black
    assert close(picture.getpixel((24, 8)), (255, 127, 127), 1)  # half red over white
    assert picture.getpixel((40, 8)) == image_files.GREEN


def test_palette_transparency_is_composited_over_white() -> None:
    picture = decode_image(image_files.palette_png(), 0, LIMITS)
    assert picture.size == (32, 16)
    assert picture.getpixel((4, 8)) == image_files.WHITE
    assert picture.getpixel((24, 8)) == image_files.RED


@pytest.mark.parametrize(("mode", "opaque"), [("RGB", image_files.RED), ("L", (128, 128, 128))])
def test_a_colour_key_transparency_is_composited_over_white(mode: str, opaque: tuple[int, int, int]) -> None:
    picture = decode_image(image_files.colour_key_png(mode), 0, LIMITS)
    assert picture.getpixel((24, 8)) == opaque
    assert picture.getpixel((4, 8)) == image_files.WHITE


def test_16_bit_grayscale_maps_to_the_matching_8_bit_levels() -> None:
    picture = decode_image(image_files.gray16_png(256, 16), 0, LIMITS)
    assert picture.size == (256, 16)
    row = pixels(picture)[8]
    assert (row[:, 0] == row[:, 1]).all() and (row[:, 0] == row[:, 2]).all()
    assert np.abs(row[:, 0] - np.arange(256)).max() <= 1  # column x holds x * 257 -> grey x
    assert row[0, 0] == 0 and row[255, 0] == 255
    assert 126 <= row[128, 0] <= 130  # the middle stays mid-grey: no saturation, no darkening


def test_a_dark_16_bit_image_stays_dark() -> None:
    picture = decode_image(image_files.dark_gray16_png(200), 0, LIMITS)
    assert close(picture.getpixel((0, 0)), (1, 1, 1), 1)  # 200 / 65535 of full scale


def test_cmyk_jpeg_gives_the_right_rgb_colours() -> None:
    picture = decode_image(image_files.cmyk_jpeg(64), 0, LIMITS)
    assert picture.size == (64, 64)
    centres = [(16, 16), (48, 16), (16, 48), (48, 48)]
    for centre, expected in zip(centres, image_files.CMYK_PATCHES.values(), strict=True):
        assert close(picture.getpixel(centre), expected, 12), (centre, picture.getpixel(centre), expected)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_a_one_pixel_image_decodes(fmt: str) -> None:
    picture = decode_image(image_files.one_pixel(fmt, (200, 100, 50)), 0, LIMITS)
    assert picture.size == (1, 1)
    assert close(picture.getpixel((0, 0)), (200, 100, 50), 12 if fmt in ("JPEG", "WEBP", "GIF") else 0)


def test_the_limits_themselves_are_allowed() -> None:
    data = image_files.photo("chelsea", "PNG")
    exact = ImageLimits(max_bytes=len(data), max_pixels=451 * 300, max_aspect_ratio=451 / 300)
    assert decode_image(data, 0, exact).size == (451, 300)
    assert decode_image(image_files.strip(500, 10), 0, LIMITS).size == (500, 10)  # exactly 50:1


# --- refused files ------------------------------------------------------------------------------------------


def test_empty_bytes_are_refused() -> None:
    message = refused(image_files.empty())
    assert "empty" in message


def test_text_is_not_a_readable_image() -> None:
    message = refused(image_files.not_an_image())
    assert "not a readable image" in message
    assert "JPEG" in message and "PNG" in message


def test_a_truncated_jpeg_is_refused_as_truncated() -> None:
    message = refused(image_files.truncated_jpeg())
    assert "truncated or corrupt" in message


def test_an_unaccepted_format_is_refused() -> None:
    tiff = image_files._save(Image.new("RGB", (8, 8)), "TIFF")
    assert "not a readable image" in refused(tiff)


def test_too_many_bytes_names_the_limit_and_its_variable() -> None:
    limits = ImageLimits(max_bytes=100_000, max_pixels=LIMITS.max_pixels, max_aspect_ratio=50.0)
    data = image_files.larger_than(100_000)
    message = refused(data, limits)
    assert "IMAGE_MAX_IMAGE_BYTES" in message
    assert "100000" in message and str(len(data)) in message


def test_too_many_pixels_names_the_size_the_limit_and_its_variable() -> None:
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=100_000, max_aspect_ratio=50.0)
    message = refused(image_files.photo("chelsea", "JPEG"), limits)
    assert "451x300 = 135300 pixels" in message
    assert "100000" in message and "IMAGE_MAX_IMAGE_PIXELS" in message


def test_a_decompression_bomb_is_refused_from_its_header_quickly() -> None:
    data = image_files.bomb_png(20000, 20000)
    assert len(data) < 100_000  # 400 million pixels in a few tens of KB
    started = time.perf_counter()
    message = refused(data)
    assert time.perf_counter() - started < 0.5  # decoding it would take seconds and 400 MB
    assert "IMAGE_MAX_IMAGE_PIXELS" in message and "40000000" in message


def test_a_bomb_below_pillows_own_threshold_is_refused_by_the_pixel_limit() -> None:
    data = image_files.bomb_png(8000, 8000)  # 64 M pixels: over our 40 M, under Pillow's 89 M warning
    started = time.perf_counter()
    message = refused(data)
    assert time.perf_counter() - started < 0.5
    assert "8000x8000 = 64000000 pixels" in message
    assert "40000000" in message and "IMAGE_MAX_IMAGE_PIXELS" in message


def test_a_pixel_limit_above_pillows_default_is_honoured() -> None:
    limits = ImageLimits(max_bytes=LIMITS.max_bytes, max_pixels=200_000_000, max_aspect_ratio=50.0)
    # 10000 x 10000 = 100 M pixels, within the limit; cut short so that, once past the header checks, it
    # fails fast (and cheaply) as truncated instead of decoding 100 M pixels.
    message = refused(image_files.bomb_png(10000, 10000)[:200], limits)
    assert "truncated or corrupt" in message


def test_a_long_strip_is_refused_by_the_aspect_ratio() -> None:
    message = refused(image_files.strip(20000, 10))
    assert "20000x10" in message
    assert "IMAGE_MAX_ASPECT_RATIO" in message and "50" in message
    tall = ImageLimits(LIMITS.max_bytes, LIMITS.max_pixels, 51.5)
    message = refused(image_files.strip(10, 520), tall)
    assert "10x520" in message and "51.5" in message


# --- the JPEG draft (reduced-scale decoding) ----------------------------------------------------------------


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_when_the_model_needs_little() -> None:
    data = image_files.photo("chelsea", "JPEG", size=(2000, 1500))
    full = decode_image(data, 0, LIMITS)
    assert full.size == (2000, 1500)
    draft = decode_image(data, 0, LIMITS, draft_side=224)
    assert draft.mode == "RGB"
    assert draft.size[0] < 2000 and draft.size[1] < 1500
    assert min(draft.size) >= 2 * 224
    assert abs(draft.size[0] / draft.size[1] - 2000 / 1500) < 0.01
    # the same picture, only smaller
    reference = full.resize(draft.size, Image.Resampling.BOX)
    assert np.abs(pixels(draft) - pixels(reference)).mean() < 4


def test_the_draft_is_skipped_when_the_jpeg_is_not_four_times_larger_or_not_a_jpeg() -> None:
    jpeg = image_files.photo("chelsea", "JPEG", size=(2000, 1500))
    assert decode_image(jpeg, 0, LIMITS, draft_side=400).size == (2000, 1500)  # 1500 < 4 * 400
    png = image_files.photo("chelsea", "PNG", size=(1000, 900))
    assert decode_image(png, 0, LIMITS, draft_side=224).size == (1000, 900)


def test_the_draft_keeps_the_exif_rotation() -> None:
    picture = decode_image(image_files.exif_rotated_jpeg(2000, 1500), 0, LIMITS, draft_side=224)
    width, height = picture.size
    assert width < height and min(picture.size) >= 2 * 224  # rotated: portrait
    assert close(picture.getpixel((width - 10, 10)), image_files.RED, 40)
    assert close(picture.getpixel((10, 10)), image_files.BLUE, 40)
