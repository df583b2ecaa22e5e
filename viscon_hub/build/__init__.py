"""Phase 3, build: question dedup, the merge into conversations, and the dataset layout on disk.

``dedup`` -> ``merge`` -> the Parquet writer, named by ``layout``, driven by ``driver.build``. The
``datasets`` builder imports the merge, never the driver. The public entry points are loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from viscon_hub.resources import lazy_attributes

if TYPE_CHECKING:
    from viscon_hub.build.driver import BuildConfig, BuildReport, build

__all__ = ["BuildConfig", "BuildReport", "build"]
__getattr__ = lazy_attributes(__name__, "driver", __all__)
