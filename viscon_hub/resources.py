"""Where the project's shipped files are: the ``configs/`` recipes and prompts, and package data."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).parent
PACKAGE_DATA = _PACKAGE / "data"
"""The package's own data: the bundled sample, cache, tokenizer and handwritten replies."""
HANDWRITTEN = PACKAGE_DATA / "handwritten" / "sample_generations.jsonl"
"""Handwritten stand-ins for model output on the bundled sample (``scripts/build_bundled_cache.py`` reads it)."""
BUNDLED_CACHE = PACKAGE_DATA / "cache"
"""The generation cache built from :data:`HANDWRITTEN`, which the offline quickstart reads."""
HANDWRITTEN_MODEL = "handwritten-example"
"""The model name of the bundled cache's entries: never a real model's name."""


def configs_dir() -> Path | None:
    """``$VISCON_CONFIGS``, else the configs shipped in the package, else the repository's ``configs/``."""
    env = os.environ.get("VISCON_CONFIGS")
    for candidate in (Path(env) if env else None, _PACKAGE / "_configs", _PACKAGE.parent / "configs"):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


def config_path(name: str) -> Path | None:
    root = configs_dir()
    return root / name if root is not None else None


def lazy_attributes(package: str, module: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that loads ``names`` from ``package.module`` on first use.

    A phase package re-exports its entry points this way, so importing one of its sub-modules from a
    later phase does not import the whole phase.
    """
    wanted = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in wanted:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def cache_alias(url: str) -> str:
    """``bundled`` names the handwritten cache shipped for the bundled sample; other URLs are themselves.

    >>> cache_alias("bundled").endswith("cache"), cache_alias("s3://b/c")
    (True, 's3://b/c')
    """
    return str(PACKAGE_DATA / "cache") if url == "bundled" else url
