"""The generation engine: every model call, cached by content, resumable, on any backend."""

from .backends import Backend, BackendError, make_backend, parse_spec
from .cache import GenerationCache
from .engine import Engine, EngineConfig, RunReport
from .prices import PriceTable
from .request import Completion, Request

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
