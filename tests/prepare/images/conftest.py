"""Fixtures for the image tests: real HTTP servers on loopback, tiny generated images, a temp store."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from PIL import Image

from viscon_hub.prepare.images import FetchPolicy, ImageStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LocalServer:
    """An aiohttp server on its own thread and loop; tests register handlers per path and count hits."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.routes: dict[str, Handler] = {}
        self.hits: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not found")
        return await handler(request)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> LocalServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset(self) -> None:
        self.routes.clear()
        self.hits.clear()

    def url(self, path: str, *, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def add(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def serve(
        self,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "image/jpeg",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Always answer ``path`` with this response; returns its URL."""

        async def handler(request: web.Request) -> web.StreamResponse:
            # Set as a raw header so values with parameters ("text/html; charset=utf-8") pass as given.
            return web.Response(
                status=status, body=body, headers={"Content-Type": content_type, **(headers or {})}
            )

        return self.add(path, handler)

    def sequence(self, path: str, handlers: list[Handler]) -> str:
        """Answer the n-th request with the n-th handler (the last one repeats)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            n = self.hits[request.path] - 1
            return await handlers[min(n, len(handlers) - 1)](request)

        return self.add(path, handler)


def response(
    body: bytes = b"", *, status: int = 200, content_type: str = "image/jpeg", headers=None
) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)

    return handler


@pytest.fixture(scope="session")
def _server_main() -> Iterator[LocalServer]:
    server = LocalServer("127.0.0.1").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _server_other() -> Iterator[LocalServer]:
    # 127.0.0.2 is loopback too (Linux routes all of 127/8 to lo) but is not in the tests' allow-list.
    server = LocalServer("127.0.0.2").start()
    yield server
    server.stop()


@pytest.fixture
def server(_server_main: LocalServer) -> Iterator[LocalServer]:
    _server_main.reset()
    yield _server_main
    _server_main.reset()


@pytest.fixture
def other_server(_server_other: LocalServer) -> Iterator[LocalServer]:
    _server_other.reset()
    yield _server_other
    _server_other.reset()


@pytest.fixture
def policy() -> FetchPolicy:
    """Only the main test server's address is allowed; retries and timeouts are kept short."""
    return FetchPolicy(
        allowed_networks=("127.0.0.1/32",),
        timeout_s=3.0,
        connect_timeout_s=1.0,
        max_attempts=3,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        max_redirects=3,
    )


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def make_image(fmt: str = "JPEG", size: tuple[int, int] = (200, 160), color=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def jpeg() -> bytes:
    return make_image("JPEG")


@pytest.fixture(name="make_image")
def _make_image() -> Callable[..., bytes]:
    return make_image


@pytest.fixture(name="png_claiming")
def _png_claiming() -> Callable[[int, int], bytes]:
    return png_claiming


@pytest.fixture(name="response")
def _response() -> Callable[..., Handler]:
    return response
