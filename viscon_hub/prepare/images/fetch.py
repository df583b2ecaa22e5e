"""Acquire images from URLs, local paths or embedded bytes: safely, within limits, and only once.

Every source ends as one :class:`ImageResult`: ``ok`` with the SHA-256 of a stored blob, or
``dropped`` with a reason from :data:`DROP_REASONS`. Outcomes are remembered in the
:class:`~viscon_hub.prepare.images.store.ImageStore` index, so a rerun fetches nothing again.

>>> import tempfile
>>> from viscon_hub.records import ImageSource
>>> results = acquire_images_sync(
...     [ImageSource(url="ftp://example.org/a.jpg")],
...     policy=FetchPolicy(),
...     store=ImageStore(tempfile.mkdtemp()),
... )
>>> results[0].status, results[0].reason
('dropped', 'invalid_url')
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http
import logging
import os
import socket
import ssl
import stat
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
from yarl import URL

from viscon_hub.errors import ConfigError, redact
from viscon_hub.prepare.images.check import check_image
from viscon_hub.prepare.images.guard import BlockedAddressError, GuardedResolver, Refusal, check_url
from viscon_hub.prepare.images.policy import FetchPolicy
from viscon_hub.prepare.images.store import ImageStore, IndexRecord, sha256_hex
from viscon_hub.records import ImageSource
from viscon_hub.retry import parse_retry_after

logger = logging.getLogger(__name__)

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Registered codes keep their own reason; anything else (520, 999, ...) shares one, so the set of
# reasons stays closed and countable.
_HTTP_REASONS = {s.value: f"http_{s.value}" for s in http.HTTPStatus if s.value >= 300}

DROP_REASONS: tuple[str, ...] = (
    "invalid_url",
    "blocked_address",
    "too_many_redirects",
    "dns_error",
    "connection_error",
    "ssl_error",
    "timeout",
    "too_large",
    "bad_content_type",
    *sorted(set(_HTTP_REASONS.values())),
    "http_other",
    "missing_file",
    "unreadable_file",
    "unsupported_format",
    "decompression_bomb",
    "too_many_pixels",
    "too_small",
    "too_large_dimensions",
    "bad_aspect_ratio",
    "decode_error",
)

_MAX_ERROR_CHARS = 300


@dataclass(slots=True, kw_only=True)
class ImageResult:
    """The outcome of acquiring one image source.

    ``from_store`` is true when the outcome was remembered from an earlier run; the other fields then
    repeat that run's outcome (including its ``attempts``), so reruns give identical results.

    >>> r = ImageResult(status="dropped", reason="http_404", error="HTTP 404", attempts=1)
    >>> r.ok, r.reason, r.from_store
    (False, 'http_404', False)
    """

    status: Literal["ok", "dropped"]
    reason: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    attempts: int = 0
    from_store: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(slots=True)
class _Outcome:
    """What one attempt (or a whole fetch) produced: bytes, or a drop and whether to retry it."""

    data: bytes | None = None
    reason: str | None = None
    error: str | None = None
    retry: bool = False
    retry_after: float | None = None


def http_reason(status: int) -> str:
    """The drop reason for an HTTP status: ``http_404`` etc., or ``http_other`` for unregistered codes.

    >>> http_reason(410), http_reason(599)
    ('http_410', 'http_other')
    """
    return _HTTP_REASONS.get(status, "http_other")


def _scrub(text: str, url: URL | None) -> str:
    """A message cut short and cleaned of credentials, even where a library echoed them back."""
    secrets = (url.password, url.raw_password, url.user, url.raw_user) if url is not None else ()
    return redact(text, secrets=secrets, limit=_MAX_ERROR_CHARS)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__, getattr(item, "os_error", None)]
    return seen


def _classify(exc: BaseException, url: URL) -> _Outcome:
    """Map a network exception to a drop reason and whether it is worth another attempt."""
    shown = redact(url)
    chain = _chain(exc)
    message = _scrub(f"{type(exc).__name__}: {exc}", url)
    if any(isinstance(e, BlockedAddressError) for e in chain):
        blocked = next(e for e in chain if isinstance(e, BlockedAddressError))
        return _Outcome(reason="blocked_address", error=_scrub(f"{blocked} ({shown})", url))
    if isinstance(exc, aiohttp.InvalidURL):
        return _Outcome(reason="invalid_url", error=message)
    if any(isinstance(e, aiohttp.ClientSSLError | ssl.SSLError) for e in chain):
        return _Outcome(reason="ssl_error", error=message)
    gai = next((e for e in chain if isinstance(e, socket.gaierror)), None)
    if gai is not None:
        # A name that does not exist will not exist in a second; a resolver hiccup might pass.
        transient = gai.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
        return _Outcome(reason="dns_error", error=message, retry=transient)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return _Outcome(reason="timeout", error=message, retry=True)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return _Outcome(reason="connection_error", error=message, retry=True)
    # Malformed responses can surface as other exceptions from the HTTP parser; still bad input.
    return _Outcome(reason="connection_error", error=message)


async def _read_body(resp: aiohttp.ClientResponse, policy: FetchPolicy) -> _Outcome:
    status = resp.status
    if status == 429 or 500 <= status < 600:
        retry_after = parse_retry_after(resp.headers)
        return _Outcome(
            reason=http_reason(status), error=f"HTTP {status}", retry=True, retry_after=retry_after
        )
    if not 200 <= status < 300:
        return _Outcome(reason=http_reason(status), error=f"HTTP {status}")
    ctype = resp.headers.get("Content-Type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime and not (mime.startswith("image/") or mime == "application/octet-stream"):
        return _Outcome(reason="bad_content_type", error=_scrub(f"content type {mime!r}", None))
    declared = resp.content_length
    if declared is not None and declared > policy.max_bytes:
        resp.close()
        return _Outcome(reason="too_large", error=f"Content-Length {declared} > max_bytes {policy.max_bytes}")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        if len(body) + len(chunk) > policy.max_bytes:
            # Close rather than drain: the rest of an oversized body is not worth downloading.
            resp.close()
            return _Outcome(reason="too_large", error=f"body over max_bytes {policy.max_bytes}")
        body += chunk
    return _Outcome(data=bytes(body))


def _refusal(refusal: Refusal | None) -> tuple[str, str]:
    """The reason and message of a refused URL (``check_url`` gives a refusal whenever no URL)."""
    return (refusal.reason, refusal.message) if refusal is not None else ("invalid_url", "URL refused")


async def _attempt(session: aiohttp.ClientSession, url: URL, policy: FetchPolicy) -> _Outcome:
    """One attempt: follow redirects by hand, checking every hop before connecting to it."""
    current = url
    for hop in range(policy.max_redirects + 1):
        if hop:
            checked, refusal = check_url(current, policy=policy)
            if checked is None:
                reason, message = _refusal(refusal)
                return _Outcome(reason=reason, error=f"redirect refused: {message}")
            current = checked
        try:
            async with session.get(current, allow_redirects=False) as resp:
                if resp.status not in _REDIRECT_CODES:
                    return await _read_body(resp, policy)
                location = resp.headers.get("Location")
                if not location:
                    return _Outcome(
                        reason=http_reason(resp.status), error=f"HTTP {resp.status} without Location"
                    )
                try:
                    current = resp.url.join(URL(location))
                except (TypeError, ValueError):
                    return _Outcome(reason="invalid_url", error="unparsable redirect Location")
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 -- every network failure is a drop, see _classify
            return _classify(exc, current)
    return _Outcome(
        reason="too_many_redirects",
        error=f"more than {policy.max_redirects} redirects from {redact(url)}",
    )


async def _fetch_url(
    raw: str,
    *,
    session: aiohttp.ClientSession,
    policy: FetchPolicy,
    limiter: asyncio.Semaphore,
) -> tuple[_Outcome, int]:
    url, refusal = check_url(raw, policy=policy)
    if url is None:
        reason, message = _refusal(refusal)
        return _Outcome(reason=reason, error=message), 0
    backoff = policy.backoff()
    attempt = 0
    while True:
        attempt += 1
        async with limiter:
            try:
                # One clock for the whole attempt, redirects and body included.
                outcome = await asyncio.wait_for(_attempt(session, url, policy), policy.timeout_s)
            except asyncio.TimeoutError:  # distinct from the builtin TimeoutError before 3.11
                outcome = _Outcome(
                    reason="timeout",
                    error=f"no complete response within {policy.timeout_s}s from {redact(url)}",
                    retry=True,
                )
        if outcome.data is not None or not outcome.retry or not backoff.retry(attempt):
            return outcome, attempt
        delay = await backoff.asleep(attempt, outcome.retry_after)
        logger.debug("retried %s after %.2fs (%s)", redact(url), delay, outcome.reason)


def _read_path(path: str, max_bytes: int) -> _Outcome:
    """Read a regular file of at most ``max_bytes``; a FIFO, device or folder is refused, never waited on."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging the run.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return _Outcome(reason="missing_file", error=f"no such file: {path}")
    except OSError as exc:
        return _Outcome(reason="unreadable_file", error=f"{type(exc).__name__} opening {path}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return _Outcome(reason="unreadable_file", error=f"not a regular file: {path}")
        if info.st_size > max_bytes:
            return _Outcome(reason="too_large", error=f"file over max_bytes {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        return _Outcome(reason="unreadable_file", error=f"{type(exc).__name__} reading {path}")
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return _Outcome(reason="too_large", error=f"file over max_bytes {max_bytes}")
    return _Outcome(data=data)


def _source_key(src: ImageSource) -> str:
    if src.kind == "bytes":
        return "sha256:" + sha256_hex(src.data or b"")
    return src.key


# What the store remembers of an outcome: every field of IndexRecord but its key.
_REMEMBERED = tuple(f.name for f in dataclasses.fields(IndexRecord) if f.name != "key")


def _from_record(rec: IndexRecord) -> ImageResult:
    return ImageResult(**{name: getattr(rec, name) for name in _REMEMBERED}, from_store=True)


class _Batch:
    """Shared state of one acquire_images call."""

    def __init__(self, *, policy: FetchPolicy, store: ImageStore) -> None:
        self.policy = policy
        self.store = store
        self.limiter = asyncio.Semaphore(policy.concurrency)
        self.decoding = asyncio.Semaphore(min(policy.concurrency, policy.decode_concurrency))
        self.session: aiohttp.ClientSession | None = None

    async def open_session(self) -> aiohttp.ClientSession:
        policy = self.policy
        connector = aiohttp.TCPConnector(
            limit=policy.concurrency,
            resolver=GuardedResolver(policy=policy),
            ttl_dns_cache=60,
        )
        accept = ",".join(f"image/{fmt}" for fmt in policy.formats) + ",image/*;q=0.8,*/*;q=0.5"
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=policy.timeout_s, connect=policy.connect_timeout_s),
            headers={"User-Agent": policy.user_agent, "Accept": accept},
            # Cookies would make one image's response depend on another's; proxies from the
            # environment would connect to addresses the guard never saw.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self.session

    async def acquire(self, src: ImageSource, key: str) -> ImageResult:
        attempts = 0
        if src.kind == "bytes":
            outcome = _Outcome(data=src.data or b"")
        elif src.kind == "path":
            try:
                outcome = await asyncio.wait_for(
                    asyncio.to_thread(_read_path, src.path or "", self.policy.max_bytes),
                    self.policy.timeout_s,
                )
            except TimeoutError:
                outcome = _Outcome(reason="timeout", error=f"no read within {self.policy.timeout_s}s")
        else:
            session = self.session or await self.open_session()
            outcome, attempts = await _fetch_url(
                src.url or "", session=session, policy=self.policy, limiter=self.limiter
            )
        if outcome.data is None:
            result = ImageResult(
                status="dropped", reason=outcome.reason, error=outcome.error, attempts=attempts
            )
        else:
            async with self.decoding:  # each decode holds up to max_decode_pixels in memory
                result = await asyncio.to_thread(self._keep, outcome.data, attempts)
        if result.reason is not None:
            logger.debug("dropped %s: %s (%s)", redact(key), result.reason, result.error)
        if src.kind != "bytes":
            self.store.record(IndexRecord(key=key, **{name: getattr(result, name) for name in _REMEMBERED}))
        return result

    def _keep(self, data: bytes, attempts: int) -> ImageResult:
        info, reason, message = check_image(data, policy=self.policy)
        if info is None:
            return ImageResult(
                status="dropped", reason=reason, error=_scrub(message or "", None), attempts=attempts
            )
        sha = self.store.put(data)
        return ImageResult(
            status="ok",
            sha256=sha,
            width=info.width,
            height=info.height,
            format=info.format,
            attempts=attempts,
        )


def _check_args(sources: Sequence[ImageSource], policy: FetchPolicy, store: ImageStore) -> None:
    if not isinstance(policy, FetchPolicy):
        raise ConfigError(f"policy: expected a FetchPolicy, got {type(policy).__name__}")
    if not isinstance(store, ImageStore):
        raise ConfigError(f"store: expected an ImageStore, got {type(store).__name__}")
    for i, src in enumerate(sources):
        if not isinstance(src, ImageSource):
            raise ConfigError(
                f"sources[{i}]: expected an ImageSource, got {type(src).__name__}; "
                "filter out text positions (None) before acquiring images"
            )


async def acquire_images(
    sources: Sequence[ImageSource],
    *,
    policy: FetchPolicy,
    store: ImageStore,
    retry_failed: bool = False,
) -> list[ImageResult]:
    """Acquire every source and return one :class:`ImageResult` per source, in input order.

    Sources already in the store's index are not fetched again: good images are served from the
    store (if their blob is still there) and remembered failures are returned as they were, unless
    ``retry_failed`` is set. Duplicate sources in one call are acquired once. Bad input never
    raises; it is a ``dropped`` result with a reason from :data:`DROP_REASONS`.

    >>> import asyncio, tempfile
    >>> from viscon_hub.records import ImageSource
    >>> store = ImageStore(tempfile.mkdtemp())
    >>> [r.reason for r in asyncio.run(acquire_images(
    ...     [ImageSource(url="http://169.254.169.254/latest"), ImageSource(path="/no/such.jpg")],
    ...     policy=FetchPolicy(), store=store))]
    ['blocked_address', 'missing_file']
    """
    _check_args(sources, policy, store)
    started = time.monotonic()
    keys = [_source_key(src) for src in sources]
    by_key: dict[str, ImageResult] = {}
    todo: dict[str, ImageSource] = {}
    for src, key in zip(sources, keys, strict=True):
        if key in by_key or key in todo:
            continue
        rec = None if src.kind == "bytes" else store.lookup(key)
        if rec is not None and (
            (rec.status == "ok" and rec.sha256 is not None and store.exists(rec.sha256))
            or (rec.status == "dropped" and not retry_failed)
        ):
            by_key[key] = _from_record(rec)
        else:
            todo[key] = src

    batch = _Batch(policy=policy, store=store)
    try:
        done = await asyncio.gather(*(batch.acquire(src, key) for key, src in todo.items()))
        by_key.update(zip(todo, done, strict=True))
    finally:
        if batch.session is not None:
            await batch.session.close()
        store.flush()

    results: list[ImageResult] = []
    seen: set[str] = set()
    for key in keys:
        result = by_key[key]
        # Duplicates get their own copy so callers can annotate results without aliasing.
        results.append(dataclasses.replace(result) if key in seen else result)
        seen.add(key)
    _log_summary(results, fetched=len(todo), seconds=time.monotonic() - started)
    return results


def _log_summary(results: list[ImageResult], *, fetched: int, seconds: float) -> None:
    if not results:
        return
    drops = Counter(r.reason for r in results if r.status == "dropped")
    logger.info(
        "images: %d sources, %d ok, %d from store, %d acquired in %.1fs; drops %s",
        len(results),
        sum(r.status == "ok" for r in results),
        sum(r.from_store for r in results),
        fetched,
        seconds,
        dict(sorted(drops.items())),
    )


def acquire_images_sync(
    sources: Sequence[ImageSource],
    *,
    policy: FetchPolicy,
    store: ImageStore,
    retry_failed: bool = False,
) -> list[ImageResult]:
    """:func:`acquire_images` for synchronous callers, from any thread.

    Inside a running event loop (a notebook, an async framework) the work runs on a helper thread
    with its own loop, since that loop cannot be blocked on.

    >>> import tempfile
    >>> from viscon_hub.records import ImageSource
    >>> acquire_images_sync([ImageSource(url="http://10.0.0.1/a.jpg")], policy=FetchPolicy(),
    ...                     store=ImageStore(tempfile.mkdtemp()))[0].reason
    'blocked_address'
    """

    def run() -> list[ImageResult]:
        return asyncio.run(acquire_images(sources, policy=policy, store=store, retry_failed=retry_failed))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="viscon-images") as pool:
        return pool.submit(run).result()


__all__ = ["DROP_REASONS", "ImageResult", "acquire_images", "acquire_images_sync", "http_reason"]
