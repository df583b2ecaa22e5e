"""Decide whether image bytes are a usable image, reading the header before decoding any pixels.

>>> import io
>>> from PIL import Image, UnidentifiedImageError
>>> buf = io.BytesIO()
>>> Image.new("RGB", (200, 160)).save(buf, format="PNG")
>>> inspect_image(buf.getvalue(), policy=FetchPolicy())
(ImageInfo(width=200, height=160, format='png'), None)
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from viscon_hub.prepare.images.policy import FetchPolicy

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Pillow reports some camera JPEGs as MPO (a JPEG with extra frames); the first frame is a plain JPEG.
_FORMAT_NAMES = {"mpo": "jpeg"}


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What a decoded image looks like: pixel size and Pillow's format name, lowercased."""

    width: int
    height: int
    format: str


def _drop(reason: str, message: str) -> tuple[None, str, str]:
    return None, reason, message


def inspect_image(data: bytes, *, policy: FetchPolicy) -> tuple[ImageInfo | None, str | None]:
    """Check ``data`` against the policy's format, size and shape limits, then decode it fully.

    Returns ``(info, None)`` for a usable image or ``(None, reason)``, where reason is one of
    ``unsupported_format``, ``decompression_bomb``, ``too_many_pixels``, ``too_small``, ``too_large_dimensions``,
    ``bad_aspect_ratio`` or ``decode_error``. Never raises for bad bytes.

    >>> inspect_image(b"not an image", policy=FetchPolicy())
    (None, 'decode_error')
    """
    info, reason, _ = check_image(data, policy=policy)
    return info, reason


def check_image(data: bytes, *, policy: FetchPolicy) -> tuple[ImageInfo | None, str | None, str | None]:
    """:func:`inspect_image` plus a short message saying what was wrong, for error columns.

    >>> check_image(b"", policy=FetchPolicy())[1:]
    ('decode_error', 'not a recognised image')
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            fmt = _FORMAT_NAMES.get(fmt, fmt)
            if fmt not in policy.formats:
                return _drop("unsupported_format", f"format {fmt or 'unknown'!r}")
            width, height = img.size
            # The header's claim is checked before load(): decoding is where a bomb does its damage.
            if width * height > policy.max_pixels:
                return _drop("decompression_bomb", f"{width}x{height} > {policy.max_pixels} px")
            if min(width, height) < policy.min_side:
                return _drop("too_small", f"{width}x{height}")
            if max(width, height) > policy.max_side:
                return _drop("too_large_dimensions", f"{width}x{height}")
            if max(width, height) > policy.max_aspect_ratio * min(width, height):
                return _drop("bad_aspect_ratio", f"{width}x{height}")
            if width * height > policy.max_decode_pixels:
                if fmt != "jpeg":
                    return _drop(
                        "too_many_pixels",
                        f"{width}x{height} > max_decode_pixels {policy.max_decode_pixels} (a recipe may raise it)",
                    )
                # Measuring needs no full-size pixels: JPEG decodes at 1/2..1/8 scale for a fraction of
                # the memory, and a damaged stream still fails.
                scale = math.ceil(math.sqrt(width * height / policy.max_decode_pixels))
                img.draft("RGB", (max(1, width // scale), max(1, height // scale)))
                img.load()
                if img.width * img.height > policy.max_decode_pixels:
                    return _drop("too_many_pixels", f"{width}x{height} does not decode within the budget")
                return ImageInfo(width=width, height=height, format=fmt), None, None
            img.load()
            if img.size != (width, height):
                return _drop("decode_error", f"size changed on decode to {img.size}")
            return ImageInfo(width=width, height=height, format=fmt), None, None
    # Pillow raises the error itself past twice its own limit; the warning (below that) only becomes
    # an exception under a "-W error" filter, and our own pixel check has already caught that case
    # whenever max_pixels <= Image.MAX_IMAGE_PIXELS, as by default.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _drop("decompression_bomb", str(exc))
    # Hostile bytes can make a decoder raise almost anything; all of it is bad input, not a crash.
    except UnidentifiedImageError:
        return _drop("decode_error", "not a recognised image")
    except Exception as exc:  # noqa: BLE001
        # Object addresses in messages would make identical inputs give different results.
        return _drop("decode_error", _ADDRESS.sub("", f"{type(exc).__name__}: {exc}"))
