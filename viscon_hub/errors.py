"""One exception root for misconfiguration. Bad input is data (a counted drop), never an exception."""


class VisconError(Exception):
    """Base of every error viscon-hub raises on purpose."""


class ConfigError(VisconError, ValueError):
    """A flag, option or recipe value is wrong: the message says what was expected and what arrived."""


class SourceError(VisconError):
    """A source cannot be opened at all (missing file, unknown dataset id)."""


class MissingDependencyError(VisconError, ImportError):
    """An optional dependency is not installed; the message carries the pip install line."""
