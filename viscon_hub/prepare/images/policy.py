"""How images are fetched and which ones are kept: one frozen, validated policy.

>>> policy = FetchPolicy(concurrency=8, allowed_networks=("127.0.0.1/32",))
>>> policy.max_aspect_ratio
2.0
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from viscon_hub import __version__
from viscon_hub.errors import ConfigError
from viscon_hub.recipe import opt
from viscon_hub.retry import Backoff

# Pillow's format ids, lowercased; kept here so a typo fails at config time, not as a drop per image.
KNOWN_FORMATS = frozenset(
    {"avif", "bmp", "gif", "ico", "jpeg", "jpeg2000", "png", "ppm", "qoi", "tga", "tiff", "webp"}
)
_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff", "jp2": "jpeg2000"}

DEFAULT_USER_AGENT = f"viscon-hub/{__version__} (image fetcher for research datasets)"


def _fail(name: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"FetchPolicy.{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchPolicy:
    """Limits for acquiring images: network behaviour, safety guards and OBELICS's image filters.

    Private, loopback, link-local and other non-public addresses are refused unless
    ``allow_private`` is set or the address lies in ``allowed_networks`` (CIDRs or single IPs).

    >>> FetchPolicy(timeout_s=5.0).timeout_s
    5.0
    >>> FetchPolicy(max_attempts=0)
    Traceback (most recent call last):
    ...
    viscon_hub.errors.ConfigError: FetchPolicy.max_attempts: expected an int >= 1, got 0
    """

    concurrency: int = opt(32, "image downloads in flight")
    timeout_s: float = opt(20.0, "seconds per image download attempt", flag="--timeout")
    connect_timeout_s: float = 10.0
    max_attempts: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    max_bytes: int = 20_000_000
    max_pixels: int = 89_478_485
    # Pixels one check may decode at full size (~48 MB as RGB); a larger JPEG is checked by a reduced
    # decode, a larger image of another format is refused. ``decode_concurrency`` checks run at once.
    max_decode_pixels: int = 16_000_000
    decode_concurrency: int = 4
    min_side: int = 150
    max_side: int = 20_000
    max_aspect_ratio: float = 2.0
    formats: tuple[str, ...] = ("jpeg", "png", "webp")
    max_redirects: int = 5
    allow_private: bool = opt(
        False,
        "allow image URLs on private, loopback and link-local addresses (off by default)",
        flag="--allow-private-urls",
    )
    allowed_networks: tuple[str, ...] = ()
    user_agent: str = DEFAULT_USER_AGENT

    def __post_init__(self) -> None:
        for name, low in (
            ("concurrency", 1),
            ("max_attempts", 1),
            ("max_bytes", 1),
            ("max_pixels", 1),
            ("max_decode_pixels", 1),
            ("decode_concurrency", 1),
            ("min_side", 1),
            ("max_side", 1),
            ("max_redirects", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _fail(name, f"an int >= {low}", value)
        for name, positive in (
            ("timeout_s", True),
            ("connect_timeout_s", True),
            ("backoff_base_s", False),
            ("backoff_max_s", False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
            if not ok:
                raise _fail(name, "a finite number " + ("> 0" if positive else ">= 0"), value)
        if self.backoff_max_s < self.backoff_base_s:
            raise _fail("backoff_max_s", f">= backoff_base_s ({self.backoff_base_s})", self.backoff_max_s)
        if self.min_side > self.max_side:
            raise _fail("min_side", f"<= max_side ({self.max_side})", self.min_side)
        ratio = self.max_aspect_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 1.0:
            raise _fail("max_aspect_ratio", "a number >= 1.0 (long side / short side)", ratio)
        if not isinstance(self.allow_private, bool):
            raise _fail("allow_private", "a bool", self.allow_private)
        self._check_formats()
        self._check_networks()
        if not isinstance(self.user_agent, str) or not self.user_agent.strip():
            raise _fail("user_agent", "a non-empty string", self.user_agent)

    def backoff(self) -> Backoff:
        """The retry schedule of one URL: a server's ``Retry-After`` is obeyed up to ``backoff_max_s``."""
        return Backoff(base_s=self.backoff_base_s, max_s=self.backoff_max_s, max_attempts=self.max_attempts)

    def _check_formats(self) -> None:
        formats = self.formats
        if isinstance(formats, str) or not isinstance(formats, tuple) or not formats:
            raise _fail("formats", 'a non-empty tuple such as ("jpeg", "png")', formats)
        for fmt in formats:
            if fmt in _FORMAT_ALIASES:
                raise _fail("formats", f"Pillow's format name {_FORMAT_ALIASES[fmt]!r}", fmt)
            if fmt not in KNOWN_FORMATS:
                raise _fail("formats", f"lowercase names from {sorted(KNOWN_FORMATS)}", fmt)

    def _check_networks(self) -> None:
        nets = self.allowed_networks
        if isinstance(nets, str) or not isinstance(nets, tuple):
            raise _fail("allowed_networks", 'a tuple of CIDRs such as ("127.0.0.1/32",)', nets)
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except (TypeError, ValueError):
                raise _fail("allowed_networks", "CIDRs or single IP addresses", net) from None
