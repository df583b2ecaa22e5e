"""The generation engine: every model call, cached by content, resumable, on any backend."""

from viscon_hub.engine.backends import Backend, BackendError, make_backend, parse_spec
from viscon_hub.engine.cache import GenerationCache
from viscon_hub.engine.engine import Engine, EngineConfig, RunReport
from viscon_hub.engine.prices import PriceTable
from viscon_hub.engine.request import Completion, Request

__all__ = [
    "Backend",
    "BackendError",
    "Completion",
    "Engine",
    "EngineConfig",
    "GenerationCache",
    "PriceTable",
    "Request",
    "RunReport",
    "make_backend",
    "parse_spec",
]
