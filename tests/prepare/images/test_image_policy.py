"""FetchPolicy validation and the address guard, without any network."""

from __future__ import annotations

import pytest

from viscon_hub.errors import ConfigError
from viscon_hub.prepare.images import DROP_REASONS, FetchPolicy


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


def test_drop_reasons_are_a_closed_unique_set():
    assert len(DROP_REASONS) == len(set(DROP_REASONS))
    for reason in ("blocked_address", "http_404", "http_410", "http_429", "http_other", "timeout"):
        assert reason in DROP_REASONS
