"""Phase 1, prepare: read OBELICS-shaped documents, filter them and extract one context per image.

``readers`` -> ``validate`` -> ``tokens`` -> ``contexts`` -> ``images``, driven by ``driver.prepare``.
The public entry points are loaded on first use, so importing a sub-module (``prepare.images.store``
from a later phase) does not pull in the whole phase.

>>> from viscon_hub.prepare import PrepareConfig
>>> PrepareConfig().max_tokens
2000
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from viscon_hub.resources import lazy_attributes

if TYPE_CHECKING:
    from viscon_hub.prepare.driver import PrepareConfig, PrepareStats, prepare

__all__ = ["PrepareConfig", "PrepareStats", "prepare"]
__getattr__ = lazy_attributes(__name__, "driver", __all__)
