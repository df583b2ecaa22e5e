"""The one backoff: jittered exponential waits, a server's Retry-After first (capped), attempt counts."""

import asyncio

import pytest

from viscon_hub.errors import ConfigError, redact
from viscon_hub.retry import Backoff, parse_retry_after


def test_waits_double_within_their_jitter_and_stop_at_the_cap():
    backoff = Backoff(base_s=1.0, max_s=10.0, max_attempts=6, seed=1)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        waits = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered: clients that failed together come back apart


def test_the_same_seed_gives_the_same_waits():
    a, b = Backoff(seed=7), Backoff(seed=7)
    assert [a.delay(n) for n in range(1, 6)] == [b.delay(n) for n in range(1, 6)]


def test_retry_after_wins_and_is_capped():
    backoff = Backoff(base_s=1.0, max_s=8.0, retry_after_max_s=30.0)
    assert backoff.delay(1, retry_after=20.0) == 20.0
    assert backoff.delay(1, retry_after=3600.0) == 30.0
    assert Backoff(max_s=8.0).delay(1, retry_after=3600.0) == 8.0  # no separate cap: max_s
    jittered = Backoff(retry_after_max_s=5.0, retry_after_jitter_s=0.05, seed=0)
    assert 2.0 <= jittered.delay(1, retry_after=2.0) <= 2.05
    assert 0.5 <= backoff.delay(1, retry_after=float("nan")) <= 1.0  # a lie is no hint


def test_attempt_counter():
    backoff = Backoff(max_attempts=3)
    assert [backoff.retry(n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    assert not Backoff(max_attempts=1).retry(1)


def test_sleeps_wait_what_they_report():
    backoff = Backoff(base_s=0.0, max_s=0.0)
    assert backoff.sleep(1) == 0.0
    assert asyncio.run(backoff.asleep(2, retry_after=0.0)) == 0.0


@pytest.mark.parametrize("bad", [{"base_s": -1.0}, {"base_s": 2.0, "max_s": 1.0}, {"max_attempts": 0}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        Backoff(**bad)


def test_retry_after_headers():
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "9"}) == 9.0
    assert parse_retry_after({"Retry-After": "Fri, 31 Dec 1999 23:59:59 GMT"}) == 0.0
    for lie in ("", " ", "-1", "inf", "nan", "soon", "Fri, 31 Dec 1999 23:59:59", "\udcff", "9" * 400):
        assert parse_retry_after({"Retry-After": lie}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_redact_takes_known_secrets_urls_and_token_shapes():
    text = "GET https://bob:pa@ss@host/x with key abc123secret and hf_abcdefghijkl and sk-abcdefghijkl"
    shown = redact(text, secrets=["abc123secret", "", None], limit=None)
    for secret in ("bob", "pa@ss", "abc123secret", "hf_abcdefghijkl", "sk-abcdefghijkl"):
        assert secret not in shown
    assert shown.startswith("GET https://host/x")
    assert redact("a" * 1000).endswith("...") and len(redact("a" * 1000)) == 300
    assert redact("\udcff token hf_abcdefghijkl") == "\udcff token [redacted]"
