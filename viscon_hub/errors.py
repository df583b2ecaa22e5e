"""One exception root for misconfiguration. Bad input is data (a counted drop), never an exception."""

import os
import re
from collections.abc import Iterable


class VisconError(Exception):
    """Base of every error viscon-hub raises on purpose."""


class ConfigError(VisconError, ValueError):
    """A flag, option or recipe value is wrong: the message says what was expected and what arrived."""


class SourceError(VisconError):
    """A source cannot be opened at all (missing file, unknown dataset id)."""


class EndpointError(VisconError):
    """A model endpoint keeps failing (dead, wrong URL, refusing): the run stops instead of paying for nothing."""


class RunFailedError(VisconError):
    """A stage ended without one good record; its outputs and stats are written for inspection."""


class MissingDependencyError(VisconError, ImportError):
    """An optional dependency is not installed; the message carries the pip install line."""


# The whole authority's userinfo, up to its last "@" (a password may hold a raw "@").
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")
_TOKENS = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{8,}|api_[A-Za-z0-9]{24,})")
_SECRET_ENV = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)$")
REDACTED = "[redacted]"


def redact(text: object, *, secrets: Iterable[str | None] = (), limit: int | None = 300) -> str:
    """``text`` without URL credentials, token-shaped strings or any of ``secrets``, cut to ``limit``.

    The one scrubber for logs, error messages, caches and cards. ``secrets`` are known values (an
    API key, a Hub token, a URL's password) removed wherever they appear; ``limit=None`` keeps the
    whole text (a URL that is stored, a card).

    >>> redact("cannot open s3://key:secret@bucket/a.jsonl with hf_abcdefghijkl")
    'cannot open s3://bucket/a.jsonl with [redacted]'
    >>> redact("HTTP 401: bad key my-private-key", secrets=["my-private-key", None, ""])
    'HTTP 401: bad key [redacted]'
    >>> redact("x" * 10, limit=8)
    'xxxxx...'
    """
    shown = str(text)
    # Longest first, so a secret that contains another is removed whole.
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        shown = shown.replace(secret, REDACTED)
    shown = _TOKENS.sub(REDACTED, _USERINFO.sub(r"\1", shown))
    if limit is None or len(shown) <= limit:
        return shown
    return shown[: limit - 3] + "..."


def env_secrets() -> dict[str, str]:
    """Values of environment variables named like secrets (``*TOKEN``, ``*KEY``, ``*SECRET``, ``*PASSWORD``)."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if _SECRET_ENV.search(name.upper()) and len(value) >= 8
    }
