"""Retrying politely: one backoff (exponential, jittered, a server's ``Retry-After`` first) for every client.

The engine (model calls), the image fetcher and the Hub client each keep their own loop, because
what counts as retryable differs; how long to wait, how many attempts, and how a ``Retry-After``
header is read are decided here.

>>> backoff = Backoff(base_s=1.0, max_s=8.0, max_attempts=4, seed=0)
>>> [round(backoff.delay(n), 2) for n in (1, 2, 3, 4, 5)]
[0.92, 1.76, 2.84, 5.04, 6.05]
>>> backoff.delay(1, retry_after=600.0), backoff.retry(3), backoff.retry(4)
(8.0, True, False)
>>> parse_retry_after({"Retry-After": "2"}), parse_retry_after({"retry-after-ms": "250"})
(2.0, 0.25)
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from viscon_hub.errors import ConfigError


@dataclass(slots=True, kw_only=True)
class Backoff:
    """How long to wait before attempt ``n + 1`` after attempt ``n`` failed, and whether to try again.

    Without a server hint the wait is drawn from ``[c/2, c]`` with ``c = min(max_s, base_s * 2**(n-1))``:
    never zero, and clients that failed together do not come back together. A ``retry_after`` hint is
    obeyed up to ``retry_after_max_s`` (default ``max_s``), plus up to ``retry_after_jitter_s``.
    ``seed`` makes the jitter reproducible.
    """

    base_s: float = 1.0
    max_s: float = 60.0
    max_attempts: int = 5
    retry_after_max_s: float | None = None
    retry_after_jitter_s: float = 0.0
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.base_s <= self.max_s) or not math.isfinite(self.max_s):
            raise ConfigError(
                f"backoff needs 0 <= base <= max (finite); got base={self.base_s}, max={self.max_s}"
            )
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1; got {self.max_attempts}")
        self._rng = random.Random(self.seed)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None and math.isfinite(retry_after):
            cap = self.max_s if self.retry_after_max_s is None else self.retry_after_max_s
            jitter = self._rng.uniform(0, self.retry_after_jitter_s) if self.retry_after_jitter_s else 0.0
            return min(max(0.0, retry_after), cap) + jitter
        ceiling = min(self.max_s, self.base_s * 2 ** (max(1, attempt) - 1))
        return ceiling * (0.5 + self._rng.random() / 2)

    def retry(self, attempt: int) -> bool:
        """Whether failed attempt number ``attempt`` may be followed by another."""
        return attempt < self.max_attempts

    def sleep(self, attempt: int, retry_after: float | None = None) -> float:
        """Wait (blocking) before the next attempt; returns the seconds waited."""
        seconds = self.delay(attempt, retry_after)
        time.sleep(seconds)
        return seconds

    async def asleep(self, attempt: int, retry_after: float | None = None) -> float:
        """Wait (in the event loop) before the next attempt; returns the seconds waited."""
        seconds = self.delay(attempt, retry_after)
        await asyncio.sleep(seconds)
        return seconds


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date.

    Anything else (negative, not a number, a date without a zone, infinity) is no hint at all.

    >>> parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # in the past
    0.0
    >>> parse_retry_after({"Retry-After": "soon"}), parse_retry_after({"Retry-After": "nan"}), parse_retry_after(None)
    (None, None, None)
    """
    if not headers:
        return None
    lowered = {str(k).lower(): v for k, v in headers.items()}
    ms = _seconds(lowered.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    value = lowered.get("retry-after")
    seconds = _seconds(value)
    if seconds is not None or not isinstance(value, str):
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _seconds(value: object) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
