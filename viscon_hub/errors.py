"""One exception root for misconfiguration. Bad input is data (a counted drop), never an exception."""

import re


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


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@]*@")
_TOKENS = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{8,})")


def redact(text: object, *, limit: int = 300) -> str:
    """``text`` with URL credentials and token-shaped strings removed, cut to ``limit`` characters.

    >>> redact("cannot open s3://key:secret@bucket/a.jsonl with hf_abcdefghijkl")
    'cannot open s3://bucket/a.jsonl with [redacted]'
    """
    shown = _TOKENS.sub("[redacted]", _USERINFO.sub(r"\1", str(text)))
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
