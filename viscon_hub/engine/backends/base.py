"""The backend protocol, the spec strings that choose a backend, and the error type backends raise.

A backend turns requests into completions; the engine owns everything else (cache, concurrency,
rate limits, retries, accounting). ``max_batch == 1`` backends are called once per request with
bounded concurrency; larger ``max_batch`` backends (vLLM offline) get whole batches.

>>> parse_spec("openai:gpt-4o")
('openai', 'gpt-4o')
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any, Protocol

from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import ConfigError, MissingDependencyError

BACKENDS = ("openai", "openai-batch", "vllm", "transformers", "sentence-transformers")
ImageLoader = Callable[[str], bytes]


class BackendError(Exception):
    """A failed call. ``kind`` says whether trying again can help; ``retry_after`` is the server's hint."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = "transient",
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.status = status


class Backend(Protocol):
    name: str
    model: str
    max_batch: int

    async def complete(self, request: Request) -> Completion: ...

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]: ...

    async def aclose(self) -> None: ...


class ThreadedBatchBackend:
    """For backends whose work is one blocking call per batch (vLLM, sentence-transformers).

    Subclasses define ``_run(requests) -> list[Completion | BackendError]``; it runs in a worker
    thread so the event loop stays free, and a single request is a batch of one.
    """

    def _run(self, requests: list[Request]) -> list[Completion | BackendError]:
        raise NotImplementedError

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]:
        return await asyncio.to_thread(self._run, requests)

    async def complete(self, request: Request) -> Completion:
        out = (await self.complete_batch([request]))[0]
        if isinstance(out, BackendError):
            raise out
        return out


async def complete_each(backend: Backend, requests: list[Request]) -> list[Completion | BackendError]:
    """``complete_batch`` for backends that take one request at a time."""
    out: list[Completion | BackendError] = []
    for r in requests:
        try:
            out.append(await backend.complete(r))
        except BackendError as e:
            out.append(e)
    return out


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


def require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"this backend needs {module!r}: pip install 'viscon-hub[{extra}]' ({e})"
        ) from e


def image_data_url(data: bytes) -> str:
    """A base64 data URL with the MIME type sniffed from the bytes."""
    if data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    else:
        mime = "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(request: Request, image_loader: ImageLoader) -> list[dict[str, Any]]:
    """Request messages in the OpenAI chat format: image parts become base64 data URLs."""
    out = []
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    parts.append(
                        {
                            "type": "image_url",
                            "image_url": {"url": image_data_url(image_loader(part["sha256"]))},
                        }
                    )
                else:
                    parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out
