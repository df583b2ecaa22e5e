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
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar

from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import ConfigError, MissingDependencyError

ImageLoader = Callable[[str], bytes]
T = TypeVar("T")


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


class LoadedModels:
    """Loaded models kept for the process, so a second backend for the same weights does not load them again.

    A build makes an engine (and its backends) per stage and per run, often for the same weights. At
    most ``capacity`` entries are kept, the least recently used dropped first (backends still holding
    a dropped model keep it alive until they close). ``get`` is thread-safe: while one thread loads a
    key, others asking for it wait for that load; different keys load in parallel. A failed load is
    not kept, so the next ``get`` tries again.

    >>> models = LoadedModels(capacity=1)
    >>> weights = models.get("a", lambda: ["weights of a"])
    >>> models.get("a", lambda: ["loaded again"]) is weights
    True
    >>> models.get("b", lambda: ["weights of b"])
    ['weights of b']
    >>> "a" in models, len(models)
    (False, 1)
    """

    def __init__(self, *, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"LoadedModels capacity must be >= 1; got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._loading: set[Hashable] = set()
        self._changed = threading.Condition()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The model kept under ``key``, loaded with ``load()`` (outside the lock) when absent."""
        with self._changed:
            while key in self._loading:
                self._changed.wait()
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            self._loading.add(key)
        try:
            model = load()
        except BaseException:
            with self._changed:
                self._loading.discard(key)
                self._changed.notify_all()  # a waiter takes its own turn at loading
            raise
        with self._changed:
            self._loading.discard(key)
            self._entries[key] = model
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            self._changed.notify_all()
        return model

    def __contains__(self, key: Hashable) -> bool:
        with self._changed:
            return key in self._entries

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)


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
