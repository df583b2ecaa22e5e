"""The address guard: which addresses and URLs are refused, and the filtering resolver."""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp
import pytest
from yarl import URL

from viscon_hub.errors import redact
from viscon_hub.prepare.images import FetchPolicy
from viscon_hub.prepare.images.fetch import _classify
from viscon_hub.prepare.images.guard import (
    BlockedAddressError,
    GuardedResolver,
    address_allowed,
    check_url,
    is_forbidden,
)
from viscon_hub.retry import parse_retry_after


@pytest.mark.parametrize(
    "ip",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "127.0.0.1",
        "127.0.0.2",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "2001:db8::1",
        "[::1]",
        "not an ip",
    ],
)
def test_forbidden_addresses(ip):
    assert is_forbidden(ip)


@pytest.mark.parametrize(
    "ip", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses(ip):
    assert not is_forbidden(ip)


def test_allowed_networks_open_only_what_they_name():
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32", "10.1.0.0/16"))
    assert address_allowed("127.0.0.1", policy=policy)
    assert address_allowed("::ffff:127.0.0.1", policy=policy)
    assert address_allowed("10.1.2.3", policy=policy)
    assert not address_allowed("127.0.0.2", policy=policy)
    assert not address_allowed("::1", policy=policy)
    assert not address_allowed("10.2.0.1", policy=policy)
    assert address_allowed("10.2.0.1", policy=FetchPolicy(allow_private=True))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.org/a.jpg", "invalid_url"),
        ("file:///etc/passwd", "invalid_url"),
        ("javascript:alert(1)", "invalid_url"),
        ("example.org/a.jpg", "invalid_url"),
        ("http://", "invalid_url"),
        ("http://[::1", "invalid_url"),
        ("http://example.org:99999/a.jpg", "invalid_url"),
        ("", "invalid_url"),
        ("http://10.0.0.1/a.jpg", "blocked_address"),
        ("http://169.254.169.254/latest/meta-data", "blocked_address"),
        ("http://[::1]:8080/a.jpg", "blocked_address"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "blocked_address"),
        ("http://2130706433/a.jpg", "blocked_address"),  # 127.0.0.1 in libc's legacy notation
        ("http://0x7f.1/a.jpg", "blocked_address"),
        ("HTTP://0.0.0.0/", "blocked_address"),
    ],
)
def test_check_url_refusals(url, reason):
    parsed, refusal = check_url(url, policy=FetchPolicy())
    assert parsed is None and refusal is not None
    assert refusal.reason == reason


def test_check_url_lets_hostnames_through_for_the_resolver():
    parsed, refusal = check_url("https://images.example.org/a.jpg?x=1", policy=FetchPolicy())
    assert refusal is None and parsed is not None and parsed.host == "images.example.org"


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cr3t@example.org/a.jpg",
        "ftp://user:s3cr3t@example.org/a.jpg",
        "http://user:s3cr3t@[::1/a.jpg",
    ],
)
def test_redact_strips_userinfo(url):
    assert "s3cr3t" not in redact(url) and "user" not in redact(url)


def test_refusal_messages_carry_no_credentials():
    for url in ("http://admin:hunter2@10.0.0.1/a.jpg", "gopher://admin:hunter2@example.org/"):
        _, refusal = check_url(url, policy=FetchPolicy())
        assert refusal is not None and "hunter2" not in refusal.message and "admin" not in refusal.message


class StaticResolver(aiohttp.abc.AbstractResolver):
    """Answers every name with fixed addresses, standing in for a DNS server that lies."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [
            {
                "hostname": host,
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


def resolve_with(addresses: list[str], policy: FetchPolicy) -> list[str]:
    resolver = GuardedResolver(policy=policy, inner=StaticResolver(addresses))
    return [r["host"] for r in asyncio.run(resolver.resolve("images.example.org", 80))]


def test_resolver_drops_forbidden_answers():
    answers = ["10.0.0.7", "93.184.216.34", "::1", "2606:4700::1111", "169.254.169.254"]
    assert resolve_with(answers, FetchPolicy()) == ["93.184.216.34", "2606:4700::1111"]


def test_resolver_refuses_a_name_with_only_forbidden_answers():
    with pytest.raises(BlockedAddressError, match=r"images\.example\.org") as info:
        resolve_with(["127.0.0.1", "::ffff:10.0.0.1"], FetchPolicy())
    assert isinstance(info.value, OSError)  # so aiohttp wraps it like any resolver failure


def test_resolver_honours_allowed_networks():
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    assert resolve_with(["127.0.0.1", "::1", "127.0.0.2"], policy) == ["127.0.0.1"]
    assert resolve_with(["127.0.0.2"], FetchPolicy(allow_private=True)) == ["127.0.0.2"]


@pytest.mark.parametrize(("errno", "retry"), [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)])
def test_dns_failures(errno, retry):
    exc = aiohttp.ClientConnectionError("Cannot connect")
    exc.__cause__ = socket.gaierror(errno, "lookup failed")
    outcome = _classify(exc, URL("http://u:pw-secret@gone.example/a.jpg"))
    assert (outcome.reason, outcome.retry) == ("dns_error", retry)


def test_classify_other_failures():
    url = URL("https://example.org/a.jpg")
    blocked = aiohttp.ClientConnectionError("dns")
    blocked.__cause__ = BlockedAddressError("example.org", ["10.0.0.1"])
    assert (_classify(blocked, url).reason, _classify(blocked, url).retry) == ("blocked_address", False)
    ssl_exc = aiohttp.ClientConnectionError("tls")
    ssl_exc.__cause__ = ssl.SSLError("certificate verify failed")
    assert _classify(ssl_exc, url).reason == "ssl_error"
    assert _classify(aiohttp.ServerDisconnectedError(), url).reason == "connection_error"
    assert _classify(asyncio.TimeoutError(), url).retry


def test_retry_after_parsing():
    def _parse_retry_after(value):
        return parse_retry_after({"Retry-After": value} if value is not None else {})

    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after(None) is None and _parse_retry_after("soon") is None
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    # Lies are no hint at all: negative, infinite, not a number, a date without a zone.
    for lie in ("-5", "inf", "nan", "1e999", "Wed, 21 Oct 2015 07:28:00", "\udcff"):
        assert _parse_retry_after(lie) is None
