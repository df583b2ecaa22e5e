"""FetchPolicy validation and the address guard, without any network."""

from __future__ import annotations

import pytest

from viscon_hub.errors import ConfigError
from viscon_hub.images import DROP_REASONS, FetchPolicy
from viscon_hub.images.guard import address_allowed, check_url, is_forbidden, redact


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"backoff_base_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"),
        ({"min_side": 500, "max_side": 400}, "min_side"),
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio"),
        ({"formats": ("jpg",)}, "'jpeg'"),
        ({"formats": "jpeg"}, "formats"),
        ({"formats": ()}, "formats"),
        ({"allowed_networks": ("not-a-net",)}, "allowed_networks"),
        ({"allowed_networks": "127.0.0.1/32"}, "allowed_networks"),
        ({"allow_private": "yes"}, "allow_private"),
        ({"user_agent": " "}, "user_agent"),
    ],
)
def test_policy_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ConfigError, match="expected") as info:
        FetchPolicy(**kwargs)
    assert fragment in str(info.value)


def test_policy_defaults_match_obelics_filters():
    policy = FetchPolicy()
    assert (policy.min_side, policy.max_side, policy.max_aspect_ratio) == (150, 20_000, 2.0)
    assert policy.formats == ("jpeg", "png", "webp")
    assert not policy.allow_private and policy.allowed_networks == ()
    assert "viscon-hub" in policy.user_agent


def test_policy_is_frozen_and_keyword_only():
    policy = FetchPolicy()
    with pytest.raises(AttributeError):
        policy.concurrency = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        FetchPolicy(32)  # type: ignore[misc]


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


def test_drop_reasons_are_a_closed_unique_set():
    assert len(DROP_REASONS) == len(set(DROP_REASONS))
    for reason in ("blocked_address", "http_404", "http_410", "http_429", "http_other", "timeout"):
        assert reason in DROP_REASONS
