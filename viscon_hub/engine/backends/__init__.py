"""Backends behind one small protocol: ``openai:MODEL``, ``vllm:MODEL``, ``transformers:MODEL``."""

from .base import Backend, BackendError, make_backend, parse_spec

__all__ = ["Backend", "BackendError", "make_backend", "parse_spec"]
