"""The configs of the publishing commands (``export``, ``card``, ``push``/``release``, ``cache``).

They are plain option sets of the functions in ``publish``; a recipe's section of the same name fills
them, and the CLI derives its flags from their fields like every other config.

>>> PushConfig(dataset="viscon", repo="org/name", formats=("llava",)).formats
('llava',)
>>> ExportConfig(dataset="viscon", format="pdf", output="out")
Traceback (most recent call last):
...
viscon_hub.errors.ConfigError: --format: expected one of llava, idefics, messages, llamafactory, captioner; got 'pdf'
"""

from __future__ import annotations

from dataclasses import dataclass

from viscon_hub.build.layout import DEFAULT_MAX_SHARD_SIZE
from viscon_hub.errors import ConfigError
from viscon_hub.recipe import opt, parse_size

EXPORT_FORMATS = ("llava", "idefics", "messages", "llamafactory", "captioner")


def _need(value: str | None, flag: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{flag}: expected a non-empty string; got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportConfig:
    """One config of a built folder written in a trainer's format."""

    dataset: str = opt(help="a folder written by `viscon build`", local=True)
    config: str = opt("leaky", "config to export")
    format: str = opt(
        help="llava, idefics, messages, llamafactory, or captioner (caption-prompt -> caption rows of a "
        "per-image config, --config contextual, for SFT)"
    )
    output: str = opt(help="folder to write the export into", local=True)
    split: str | None = opt(None, "one split only (default: every split)")
    max_shard_size: int = opt(
        DEFAULT_MAX_SHARD_SIZE,
        "largest Parquet shard of the idefics, messages and captioner exports, e.g. 500MB or 200KB",
        size=True,
    )

    def __post_init__(self) -> None:
        _need(self.dataset, "--dataset")
        _need(self.output, "--output")
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}; got {self.format!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CardConfig:
    """Statistics, plots and the dataset card of a built folder."""

    dataset: str = opt("viscon", "a folder written by `viscon build`", local=True)
    repo: str | None = opt(None, "ORG/NAME the card's loading examples name")
    license: str | None = opt(None, "licence id for the front matter")

    def __post_init__(self) -> None:
        _need(self.dataset, "--dataset")


@dataclass(frozen=True, slots=True, kw_only=True)
class PushConfig:
    """A built folder pushed to a Hub dataset repo; ``version`` makes it a release (tag vX.Y.Z)."""

    dataset: str = opt("viscon", "a folder written by `viscon build`", local=True)
    repo: str = opt(help="ORG/NAME of the Hub dataset repo")
    revision: str | None = opt(None, "branch to push to (default main)")
    private: bool = opt(False, "create the repo private")
    formats: tuple[str, ...] = opt(
        (), "also push these exports of each mix: idefics, llava (comma-separated)", sep=","
    )
    dry_run: bool = opt(False, "print what would change; write nothing")
    max_shard_size: int = opt(
        DEFAULT_MAX_SHARD_SIZE,
        "largest Parquet file of a pushed export (--formats idefics), e.g. 500MB",
        size=True,
    )
    version: str | None = opt(None, "X.Y.Z")

    def __post_init__(self) -> None:
        _need(self.dataset, "--dataset")
        _need(self.repo, "--repo")
        formats = tuple(f.strip() for f in self.formats if f.strip())
        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """The generation cache shared through a Hub dataset repo."""

    cache: str = opt("viscon-cache", "local cache folder", local=True)
    repo: str = opt(help="ORG/NAME of the Hub dataset repo holding the cache")
    revision: str | None = opt(None, "branch (default main)")
    private: bool = opt(False, "create the repo private")

    def __post_init__(self) -> None:
        _need(self.cache, "--cache")
        _need(self.repo, "--repo")


__all__ = ["CacheConfig", "CardConfig", "ExportConfig", "PushConfig"]
