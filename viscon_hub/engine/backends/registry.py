"""Which backend a spec names: ``BACKEND:MODEL`` strings, and the one place backends are built.

Backends import :mod:`viscon_hub.engine.backends.base`; this module imports each backend only when a
spec asks for it (heavy dependencies stay unloaded), so no import runs in a circle.

>>> parse_spec("openai:gpt-4o")
('openai', 'gpt-4o')
>>> parse_spec("vllm:Qwen/Qwen2-VL-7B-Instruct")
('vllm', 'Qwen/Qwen2-VL-7B-Instruct')
"""

from __future__ import annotations

from typing import Any

from viscon_hub.engine.backends.base import Backend, ImageLoader
from viscon_hub.errors import ConfigError

BACKENDS = ("openai", "openai-batch", "vllm", "transformers", "sentence-transformers")


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``BACKEND:MODEL``; the model part may itself contain colons or slashes."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"a model spec is BACKEND:MODEL with BACKEND one of {', '.join(BACKENDS)} "
            f"(e.g. openai:gpt-4o, vllm:Qwen/Qwen2-VL-7B-Instruct); got {spec!r}"
        )
    kind, model = spec.split(":", 1)
    if kind not in BACKENDS:
        raise ConfigError(f"unknown backend {kind!r} in {spec!r}; expected one of {', '.join(BACKENDS)}")
    if not model.strip():
        raise ConfigError(f"model spec {spec!r} names no model after the colon")
    return kind, model


def make_backend(
    spec: str,
    *,
    image_loader: ImageLoader,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    **options: Any,
) -> Backend:
    """Build the backend a spec names; heavy backends are imported only here, with an install hint."""
    kind, model = parse_spec(spec)
    if kind == "openai":
        from viscon_hub.engine.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(
            model, image_loader=image_loader, base_url=base_url, api_key=api_key, timeout_s=timeout_s
        )
    if kind == "openai-batch":
        from viscon_hub.engine.backends.openai_batch import OpenAIBatchBackend

        return OpenAIBatchBackend(
            model,
            image_loader=image_loader,
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            **options,
        )
    if kind == "vllm":
        from viscon_hub.engine.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model, image_loader=image_loader, **options)
    if kind == "sentence-transformers":
        from viscon_hub.engine.backends.embed_backend import SentenceTransformersBackend

        return SentenceTransformersBackend(model, image_loader=image_loader, **options)
    from viscon_hub.engine.backends.transformers_backend import TransformersBackend

    return TransformersBackend(model, image_loader=image_loader, **options)
