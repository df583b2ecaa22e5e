"""Where the project's shipped files are: the ``configs/`` recipes and prompts, and package data."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).parent
PACKAGE_DATA = _PACKAGE / "data"
"""The package's own data: the bundled sample, cache, tokenizer and handwritten replies."""


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
