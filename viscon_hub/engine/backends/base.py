"""The backend protocol, the error type backends raise, and helpers the backends share.

A backend turns requests into completions; the engine owns everything else (cache, concurrency,
rate limits, retries, accounting, creating and closing backends). ``max_batch == 1`` backends are
called once per request with bounded concurrency; larger ``max_batch`` backends (vLLM offline) get
whole batches. Which spec makes which backend lives in :mod:`viscon_hub.engine.backends.registry`,
so this module imports no backend and no backend imports the registry.

>>> image_data_url(bytes([0xFF, 0xD8, 0xFF, 0xE0]))
'data:image/jpeg;base64,/9j/4A=='
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any, Protocol

from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import MissingDependencyError

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
    """What the engine uses of a backend, and nothing more."""

    name: str
    model: str
    max_batch: int
    """Requests per call: 1 means one request per call under the engine's concurrency."""
    price_tier: str
    """``"standard"``, or ``"batch"`` for a provider's batch API (its prices, its own rate limits)."""

    async def complete(self, request: Request) -> Completion: ...

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]: ...

    async def end_loop(self) -> None:
        """Close what is bound to the running event loop (HTTP sessions); the engine calls it per run."""

    async def aclose(self) -> None:
        """Release everything (clients, models); the engine calls it once when it closes."""


class BaseBackend:
    """Defaults for the protocol's optional parts: one request per call, standard prices, nothing to close."""

    name = "backend"
    model = ""
    max_batch = 1
    price_tier = "standard"

    async def complete(self, request: Request) -> Completion:
        raise NotImplementedError

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]:
        return await complete_each(self, requests)

    async def end_loop(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class ThreadedBatchBackend(BaseBackend):
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
