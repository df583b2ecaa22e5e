"""Phase 3, build: question dedup, the merge into conversations, and the dataset layout on disk.

``dedup`` -> ``merge`` -> the Parquet writer, named by ``layout``, driven by ``driver.build``. The
``datasets`` builder imports the merge, never the driver. The public entry points are loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viscon_hub.build.driver import BuildConfig, BuildReport, build

__all__ = ["BuildConfig", "BuildReport", "build"]


def __getattr__(name: str):
    if name in __all__:
        from viscon_hub.build import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
