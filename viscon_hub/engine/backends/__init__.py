"""Backends behind one small protocol: ``openai:MODEL``, ``openai-batch:MODEL``, ``vllm:MODEL``,
``transformers:MODEL``, and
``sentence-transformers:MODEL`` for the question embeddings of the dedup."""

from viscon_hub.engine.backends.base import Backend, BackendError
from viscon_hub.engine.backends.registry import BACKENDS, make_backend, parse_spec

__all__ = ["BACKENDS", "Backend", "BackendError", "make_backend", "parse_spec"]
