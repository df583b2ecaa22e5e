"""inspect_image: format, size and shape checks before decoding, then a full decode."""

from __future__ import annotations

import pytest
from PIL import Image

from viscon_hub.prepare.images import FetchPolicy, inspect_image
from viscon_hub.prepare.images.check import ImageInfo


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")])
def test_good_images(make_image, fmt, name):
    info, reason = inspect_image(make_image(fmt), policy=FetchPolicy())
    assert reason is None
    assert info == ImageInfo(width=200, height=160, format=name)


@pytest.mark.parametrize(
    ("size", "policy_kwargs", "reason"),
    [
        ((100, 100), {}, "too_small"),
        ((200, 149), {}, "too_small"),
        ((200, 160), {"max_side": 180}, "too_large_dimensions"),
        ((400, 150), {}, "bad_aspect_ratio"),
        ((150, 301), {}, "bad_aspect_ratio"),
        ((300, 150), {}, None),  # exactly 2:1 is allowed
        ((200, 160), {"max_pixels": 1000}, "decompression_bomb"),
        ((200, 160), {"formats": ("png",)}, "unsupported_format"),
    ],
)
def test_policy_limits(make_image, size, policy_kwargs, reason):
    info, got = inspect_image(make_image("JPEG", size), policy=FetchPolicy(**policy_kwargs))
    assert got == reason
    assert (info is None) == (reason is not None)


def test_gif_is_unsupported_by_default(make_image):
    assert inspect_image(make_image("GIF"), policy=FetchPolicy()) == (None, "unsupported_format")


def test_header_claiming_huge_size_is_a_bomb_without_decoding(png_claiming):
    # Pillow itself refuses past twice its limit; this checks that surfaces as our reason.
    assert inspect_image(png_claiming(100_000, 100_000), policy=FetchPolicy())[1] == "decompression_bomb"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_header_just_over_the_limit_is_caught_by_our_check(png_claiming):
    # 10_000 x 10_000 lies between Pillow's warning and error thresholds: only our check stops it.
    assert inspect_image(png_claiming(10_000, 10_000), policy=FetchPolicy())[1] == "decompression_bomb"


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_warning_raised_as_error_is_the_same_reason(png_claiming):
    policy = FetchPolicy(max_pixels=200_000_000)
    assert Image.MAX_IMAGE_PIXELS is not None and policy.max_pixels > Image.MAX_IMAGE_PIXELS
    assert inspect_image(png_claiming(10_000, 10_000), policy=policy)[1] == "decompression_bomb"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 50, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
)
def test_garbage_is_a_decode_error(data):
    assert inspect_image(data, policy=FetchPolicy()) == (None, "decode_error")


def test_truncated_image_fails_on_decode(make_image, png_claiming):
    # The header is fine (so every pre-decode check passes); the pixel data is not.
    data = make_image("JPEG", (400, 300))
    assert inspect_image(data[: len(data) // 2], policy=FetchPolicy()) == (None, "decode_error")
    assert inspect_image(png_claiming(300, 200), policy=FetchPolicy()) == (None, "decode_error")
