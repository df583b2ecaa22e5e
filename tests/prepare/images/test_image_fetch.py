"""acquire_images against real local HTTP servers: limits, retries, address guard, store reuse."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import threading
import time

import pytest
from aiohttp import web

from viscon_hub.errors import ConfigError
from viscon_hub.prepare.images import (
    DROP_REASONS,
    FetchPolicy,
    ImageResult,
    acquire_images,
    acquire_images_sync,
)
from viscon_hub.records import ImageSource


def fetch(url: str, *, policy: FetchPolicy, store, **kwargs) -> ImageResult:
    [result] = acquire_images_sync([ImageSource(url=url)], policy=policy, store=store, **kwargs)
    return result


def assert_dropped(result: ImageResult, reason: str) -> None:
    assert result.status == "dropped", result
    assert result.reason == reason, result
    assert reason in DROP_REASONS
    assert result.sha256 is None


# -- good images and the store ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_ok_image_is_stored_and_then_served_from_store(server, policy, store, make_image, fmt, mime):
    data = make_image(fmt)
    url = server.serve(f"/ok.{fmt.lower()}", data, content_type=mime)
    first = fetch(url, policy=policy, store=store)
    assert first.status == "ok" and first.reason is None and first.error is None
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert (first.width, first.height, first.format) == (200, 160, fmt.lower())
    assert first.attempts == 1 and not first.from_store
    assert store.get(first.sha256) == data
    assert server.hits[f"/ok.{fmt.lower()}"] == 1

    second = fetch(url, policy=policy, store=store)
    assert second.from_store
    assert dataclasses.replace(second, from_store=False) == first  # identical apart from provenance
    assert server.hits[f"/ok.{fmt.lower()}"] == 1  # zero new hits


def test_rerun_in_a_new_store_instance_fetches_nothing(server, policy, store, jpeg, tmp_path):
    ok_url = server.serve("/keep.jpg", jpeg)
    dead_url = server.url("/dead.jpg")
    first = acquire_images_sync(
        [ImageSource(url=ok_url), ImageSource(url=dead_url)], policy=policy, store=store
    )
    rerun = acquire_images_sync(
        [ImageSource(url=ok_url), ImageSource(url=dead_url)],
        policy=policy,
        store=type(store)(store.root),  # as a new process would see it
    )
    assert [r.from_store for r in rerun] == [True, True]
    assert [dataclasses.replace(r, from_store=False) for r in rerun] == first
    assert server.hits["/keep.jpg"] == 1 and server.hits["/dead.jpg"] == 1


def test_retry_failed_refetches_remembered_failures(server, policy, store, jpeg, response):
    url = server.sequence("/comes-back.jpg", [response(status=404), response(jpeg)])
    assert_dropped(fetch(url, policy=policy, store=store), "http_404")
    assert fetch(url, policy=policy, store=store).reason == "http_404"
    assert server.hits["/comes-back.jpg"] == 1
    result = fetch(url, policy=policy, store=store, retry_failed=True)
    assert result.status == "ok" and not result.from_store
    assert server.hits["/comes-back.jpg"] == 2


def test_missing_blob_is_fetched_again(server, policy, store, jpeg):
    url = server.serve("/lost.jpg", jpeg)
    first = fetch(url, policy=policy, store=store)
    blob = store.blob_path(first.sha256)
    store.fs.rm(blob)
    again = fetch(url, policy=policy, store=store)
    assert again.status == "ok" and not again.from_store and store.exists(first.sha256)
    assert server.hits["/lost.jpg"] == 2


def test_duplicates_in_one_batch_are_fetched_once(server, policy, store, jpeg):
    url = server.serve("/dup.jpg", jpeg)
    results = acquire_images_sync([ImageSource(url=url)] * 3, policy=policy, store=store)
    assert server.hits["/dup.jpg"] == 1
    assert results[0] == results[1] == results[2] and results[0].status == "ok"
    assert results[0] is not results[1]


def test_results_keep_input_order_and_are_deterministic(server, policy, jpeg, make_image, tmp_path):
    from viscon_hub.prepare.images import ImageStore

    sources = [
        ImageSource(url=server.serve("/a.jpg", jpeg)),
        ImageSource(url=server.url("/missing.jpg")),
        ImageSource(url=server.serve("/b.png", make_image("PNG", (300, 200)), content_type="image/png")),
        ImageSource(url="http://10.0.0.1/x.jpg"),
        ImageSource(data=make_image("WEBP", (160, 160))),
        ImageSource(path=str(tmp_path / "nope.jpg")),
    ]
    runs = [
        acquire_images_sync(sources, policy=policy, store=ImageStore(tmp_path / f"s{i}")) for i in range(2)
    ]
    assert runs[0] == runs[1]
    assert [r.reason for r in runs[0]] == [None, "http_404", None, "blocked_address", None, "missing_file"]
    assert [r.format for r in runs[0]] == ["jpeg", None, "png", None, "webp", None]


# -- local paths and embedded bytes -------------------------------------------------------------------


def test_local_path_and_embedded_bytes(policy, store, jpeg, tmp_path):
    path = tmp_path / "local.jpg"
    path.write_bytes(jpeg)
    results = acquire_images_sync(
        [
            ImageSource(path=str(path)),
            ImageSource(path=str(tmp_path / "absent.jpg")),
            ImageSource(path=str(tmp_path)),
            ImageSource(data=jpeg),
            ImageSource(data=b"\x00garbage"),
        ],
        policy=policy,
        store=store,
    )
    sha = hashlib.sha256(jpeg).hexdigest()
    assert results[0].status == "ok" and results[0].sha256 == sha and results[0].attempts == 0
    assert_dropped(results[1], "missing_file")
    assert_dropped(results[2], "unreadable_file")
    assert results[3].status == "ok" and results[3].sha256 == sha
    assert_dropped(results[4], "decode_error")
    assert store.get(sha) == jpeg
    assert store.lookup("file://" + str(tmp_path / "absent.jpg")).reason == "missing_file"


def test_oversized_local_file(store, jpeg, tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg)
    policy = FetchPolicy(max_bytes=len(jpeg) - 1)
    [result] = acquire_images_sync([ImageSource(path=str(path))], policy=policy, store=store)
    assert_dropped(result, "too_large")


# -- HTTP status codes and retries ----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [(404, "http_404"), (410, "http_410"), (403, "http_403")])
def test_client_errors_are_not_retried(server, policy, store, status, reason, response):
    url = server.add(f"/status-{status}", response(status=status))
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, reason)
    assert result.attempts == 1 and server.hits[f"/status-{status}"] == 1
    assert store.lookup(url).reason == reason


def test_server_error_then_success_is_retried(server, policy, store, jpeg, response):
    url = server.sequence("/flaky.jpg", [response(status=500), response(status=503), response(jpeg)])
    result = fetch(url, policy=policy, store=store)
    assert result.status == "ok" and result.attempts == 3
    assert server.hits["/flaky.jpg"] == 3


def test_persistent_server_error_keeps_the_last_reason(server, policy, store, response):
    url = server.sequence("/down.jpg", [response(status=500), response(status=502)])
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "http_502")
    assert result.attempts == policy.max_attempts == server.hits["/down.jpg"]


def test_unregistered_status_code(server, policy, store, response):
    url = server.add("/weird", response(status=499))
    assert_dropped(fetch(url, policy=policy, store=store), "http_other")


def test_429_retry_after_is_honoured_and_capped(server, store, jpeg, response, policy):
    policy = dataclasses.replace(policy, backoff_max_s=0.3)
    url = server.sequence("/busy.jpg", [response(status=429, headers={"Retry-After": "1"}), response(jpeg)])
    started = time.monotonic()
    result = fetch(url, policy=policy, store=store)
    elapsed = time.monotonic() - started
    assert result.status == "ok" and result.attempts == 2
    # Plain backoff here is at most 0.01 s; waiting ~0.3 s shows Retry-After was read and capped.
    assert 0.28 <= elapsed < 0.9


def test_slow_response_times_out(server, store, jpeg):
    async def slow(request):
        await asyncio.sleep(1.5)
        return web.Response(body=jpeg, content_type="image/jpeg")

    url = server.add("/slow.jpg", slow)
    policy = FetchPolicy(
        allowed_networks=("127.0.0.1/32",),
        timeout_s=0.3,
        max_attempts=2,
        backoff_base_s=0.01,
        backoff_max_s=0.01,
    )
    started = time.monotonic()
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "timeout")
    assert result.attempts == 2 and server.hits["/slow.jpg"] == 2
    assert time.monotonic() - started < 1.2


def test_slow_body_times_out(server, store, jpeg):
    async def trickle(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        await resp.write(jpeg[:100])
        await asyncio.sleep(1.5)
        with contextlib.suppress(ConnectionError):  # the client has long given up
            await resp.write(jpeg[100:])
        return resp

    url = server.add("/trickle.jpg", trickle)
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), timeout_s=0.3, max_attempts=1)
    assert_dropped(fetch(url, policy=policy, store=store), "timeout")


def test_refused_connection(policy, store):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = fetch(f"http://user:s3cr3t@127.0.0.1:{port}/a.jpg", policy=policy, store=store)
    assert_dropped(result, "connection_error")
    assert result.attempts == policy.max_attempts
    assert "s3cr3t" not in (result.error or "") and "user" not in (result.error or "")


# -- body, content type and image checks -----------------------------------------------------------------


def test_oversized_body_with_content_length(server, store, response):
    url = server.add("/big.jpg", response(b"\xff" * 200_000))
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_bytes=50_000)
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "too_large")
    assert "Content-Length" in (result.error or "") and result.attempts == 1


def test_oversized_body_without_content_length(server, store):
    async def chunked(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"\xff" * 10_000)
        return resp

    url = server.add("/stream.jpg", chunked)
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_bytes=50_000)
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "too_large")
    assert "Content-Length" not in (result.error or "") and result.attempts == 1


def test_body_of_exactly_max_bytes_is_fine(server, store, jpeg, response):
    url = server.add("/exact.jpg", response(jpeg))
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_bytes=len(jpeg))
    assert fetch(url, policy=policy, store=store).status == "ok"


@pytest.mark.parametrize("ctype", ["text/html", "text/html; charset=utf-8", "application/json"])
def test_wrong_content_type(server, policy, store, jpeg, ctype):
    url = server.serve("/page", jpeg, content_type=ctype)
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "bad_content_type")
    assert result.attempts == 1


def test_octet_stream_is_accepted(server, policy, store, jpeg):
    url = server.serve("/blob", jpeg, content_type="application/octet-stream")
    assert fetch(url, policy=policy, store=store).status == "ok"


def test_image_checks_apply_to_fetched_bytes(server, policy, store, make_image, png_claiming, jpeg):
    cases = {
        "/corrupt.jpg": (b"\xff\xd8\xff\xe0 definitely not a jpeg", "image/jpeg", "decode_error"),
        "/truncated.jpg": (make_image("JPEG", (400, 300))[:300], "image/jpeg", "decode_error"),
        "/small.jpg": (make_image("JPEG", (100, 100)), "image/jpeg", "too_small"),
        "/wide.jpg": (make_image("JPEG", (450, 160)), "image/jpeg", "bad_aspect_ratio"),
        "/anim.gif": (make_image("GIF"), "image/gif", "unsupported_format"),
        "/bomb.png": (png_claiming(100_000, 100_000), "image/png", "decompression_bomb"),
    }
    for path, (body, ctype, _) in cases.items():
        server.serve(path, body, content_type=ctype)
    results = acquire_images_sync([ImageSource(url=server.url(p)) for p in cases], policy=policy, store=store)
    for result, (_, _, reason) in zip(results, cases.values(), strict=True):
        assert_dropped(result, reason)
        assert result.attempts == 1
    assert not list(store.fs.ls(store._path + "/blobs") if store.fs.exists(store._path + "/blobs") else [])


def test_tiny_max_pixels_is_a_decompression_bomb(server, store, jpeg):
    url = server.serve("/pixels.jpg", jpeg)
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_pixels=1_000)
    assert_dropped(fetch(url, policy=policy, store=store), "decompression_bomb")


# -- redirects and the address guard ------------------------------------------------------------------------


def redirect_to(location: str, status: int = 302):
    async def handler(request):
        return web.Response(status=status, headers={"Location": location})

    return handler


def test_redirect_to_allowed_address_is_followed(server, policy, store, jpeg):
    server.serve("/target.jpg", jpeg)
    url = server.add("/r1", redirect_to("/r2", 301))
    server.add("/r2", redirect_to(server.url("/target.jpg"), 307))
    result = fetch(url, policy=policy, store=store)
    assert result.status == "ok" and result.attempts == 1
    assert server.hits["/r1"] == server.hits["/r2"] == server.hits["/target.jpg"] == 1


def test_redirect_to_forbidden_loopback_is_refused(server, other_server, policy, store, jpeg):
    secret = other_server.serve("/secret.jpg", jpeg)
    url = server.add("/evil-redirect", redirect_to(secret))
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "blocked_address")
    assert result.attempts == 1 and other_server.hits["/secret.jpg"] == 0

    # The second server is reachable: allowing its address explicitly gets the image.
    wider = dataclasses.replace(policy, allowed_networks=("127.0.0.1/32", "127.0.0.2/32"))
    url2 = server.add("/fine-redirect", redirect_to(secret))
    assert fetch(url2, policy=wider, store=store).status == "ok"
    assert other_server.hits["/secret.jpg"] == 1


def test_redirect_to_other_scheme_is_invalid(server, policy, store):
    url = server.add("/to-file", redirect_to("file:///etc/passwd"))
    assert_dropped(fetch(url, policy=policy, store=store), "invalid_url")


def test_redirect_without_location(server, policy, store):
    async def bare(request):
        return web.Response(status=302)

    url = server.add("/bare", bare)
    assert_dropped(fetch(url, policy=policy, store=store), "http_302")


def test_too_many_redirects(server, policy, store):
    url = server.add("/loop", redirect_to("/loop"))
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "too_many_redirects")
    assert result.attempts == 1 and server.hits["/loop"] == policy.max_redirects + 1


def test_hostname_resolving_to_loopback_is_refused_after_dns(server, store, jpeg):
    server.serve("/host.jpg", jpeg)
    url = server.url("/host.jpg", host="localhost")
    nothing_allowed = FetchPolicy(max_attempts=1)
    result = fetch(url, policy=nothing_allowed, store=store)
    assert_dropped(result, "blocked_address")
    assert "localhost" in (result.error or "") and server.hits["/host.jpg"] == 0

    # With the server's address allowed, the same name works (any ::1 answer is filtered out).
    # The store remembers the refusal, so it takes retry_failed to try again under the new policy.
    allowed = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    assert fetch(url, policy=allowed, store=store).reason == "blocked_address"
    assert fetch(url, policy=allowed, store=store, retry_failed=True).status == "ok"
    assert server.hits["/host.jpg"] == 1


@pytest.fixture
def connections(monkeypatch):
    """Every outgoing connect and DNS lookup made while the test runs."""
    calls: list[object] = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def record(original):
        def wrapper(*args, **kwargs):
            calls.append(args[1:] if original is not getaddrinfo else args)
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(socket.socket, "connect", record(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", record(connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", record(getaddrinfo))
    return calls


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.jpg",
        "http://[fd00::1]:8080/a.jpg",
        "http://[::ffff:169.254.169.254]/a.jpg",
        "http://0.0.0.0/a.jpg",
        "http://100.64.0.1/a.jpg",
        "http://167772161/a.jpg",  # 10.0.0.1 in libc's legacy notation
        "http://0xa9.0xfe.0xa9.0xfe/a.jpg",
        "https://192.168.0.1:8443/a.jpg",
    ],
)
def test_private_literals_are_refused_before_any_connection(policy, store, connections, url):
    started = time.monotonic()
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "blocked_address")
    assert result.attempts == 0
    assert connections == []
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "url",
    ["ftp://example.org/a.jpg", "not a url", "http:///a.jpg", "http://[::1/a.jpg", "mailto:a@b.c", ""],
)
def test_invalid_urls(policy, store, connections, url):
    result = fetch(url, policy=policy, store=store)
    assert_dropped(result, "invalid_url")
    assert result.attempts == 0 and connections == []


@pytest.mark.parametrize(
    "url",
    [
        "http://admin:hunter2@10.0.0.1/a.jpg",
        "ftp://admin:hunter2@example.org/a.jpg",
        "http://admin:hunter2@127.0.0.1:{port}/gone.jpg",
        "http://admin:hunter2@127.0.0.1:{port}/page",
    ],
)
def test_credentials_never_appear_in_errors(server, policy, store, jpeg, url, caplog):
    server.serve("/page", jpeg, content_type="text/html")
    url = url.format(port=server.port)
    with caplog.at_level("DEBUG", logger="viscon_hub"):
        result = fetch(url, policy=policy, store=store)
    assert result.status == "dropped" and result.error
    assert "hunter2" not in result.error and "admin" not in result.error
    assert "hunter2" not in caplog.text
    assert "hunter2" not in store.lookup(url).error


# -- API edges ----------------------------------------------------------------------------------------------


def test_sync_wrapper_from_a_thread_and_inside_a_running_loop(server, policy, store, jpeg):
    url = server.serve("/thread.jpg", jpeg)
    out: list[ImageResult] = []
    thread = threading.Thread(target=lambda: out.extend(fetch_all([url], policy, store)))
    thread.start()
    thread.join(10)
    assert out and out[0].status == "ok"

    async def inside_loop():
        return acquire_images_sync([ImageSource(url=url)], policy=policy, store=store)

    [again] = asyncio.run(inside_loop())
    assert again.from_store


def fetch_all(urls, policy, store):
    return acquire_images_sync([ImageSource(url=u) for u in urls], policy=policy, store=store)


def test_async_api_directly(server, policy, store, jpeg):
    url = server.serve("/async.jpg", jpeg)
    [result] = asyncio.run(acquire_images([ImageSource(url=url)], policy=policy, store=store))
    assert result.status == "ok"
    assert asyncio.run(acquire_images([], policy=policy, store=store)) == []


def test_misconfiguration_raises(policy, store):
    with pytest.raises(ConfigError, match="ImageSource"):
        acquire_images_sync([None], policy=policy, store=store)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="FetchPolicy"):
        acquire_images_sync([], policy={"concurrency": 3}, store=store)  # type: ignore[arg-type]


def test_concurrency_is_bounded(server, store, jpeg):
    active = 0
    peak = 0

    async def counted(request):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return web.Response(body=jpeg, content_type="image/jpeg")

    for i in range(12):
        server.add(f"/c{i}.jpg", counted)
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), concurrency=3)
    results = fetch_all([server.url(f"/c{i}.jpg") for i in range(12)], policy, store)
    assert all(r.status == "ok" for r in results)
    assert 1 <= peak <= 3


def test_connection_recorder_sees_real_connections(server, policy, store, jpeg, connections):
    # Control for the "no connection" tests above: the recorder does see an ordinary fetch.
    url = server.serve("/seen.jpg", jpeg)
    assert fetch(url, policy=policy, store=store).status == "ok"
    assert connections
