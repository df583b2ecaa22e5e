"""The real openai client, through the engine, against a local server that injects faults."""

import pytest

from tests.engine.conftest import engine_for
from tests.engine.conftest import qa_request as req
from viscon_hub.engine import Engine, EngineConfig, GenerationCache, make_backend
from viscon_hub.errors import ConfigError

pytest.importorskip("openai")


def backend_for(server, timeout_s=5.0):
    return make_backend(
        "openai:viscon-test-llm",
        image_loader=lambda sha: b"",
        base_url=server.base_url,
        api_key="sk-test-secret-123",
        timeout_s=timeout_s,
    )


@pytest.mark.parametrize("kind", ["429", "500", "503", "drop", "garbled", "truncated_json", "timeout"])
def test_transient_faults_are_retried_until_success(server, tmp_path, kind):
    rule = {"kind": kind, "match": "*", "times": 1, "per_fingerprint": True}
    if kind == "429":
        rule["retry_after_s"] = 0.2
    if kind == "timeout":
        rule["delay_s"] = 3.0
    server.set_faults([rule])
    engine = engine_for(tmp_path)
    out = engine.run([req(i) for i in range(4)], backend=backend_for(server, timeout_s=1.0))
    assert all(c.ok and "<Human>" in c.reply for c in out)
    assert all(c.attempts == 2 for c in out)
    assert engine.last_report.retries == 4 and engine.last_report.succeeded == 4
    assert server.stats()["fault_counts"][kind] == 4


def test_retry_after_is_honoured(server, tmp_path):
    import time

    server.set_faults(
        [{"kind": "429", "match": "*", "times": 1, "per_fingerprint": True, "retry_after_s": 0.6}]
    )
    started = time.monotonic()
    out = engine_for(tmp_path).run([req(0)], backend=backend_for(server))
    assert out[0].ok
    # Backoff alone would wait at most 0.05 s here; the server asked for 0.6 s.
    assert time.monotonic() - started >= 0.6


def test_permanent_error_is_stored_and_not_retried(server, tmp_path):
    server.set_faults([{"kind": "400", "match": "#1", "times": None}])
    engine = engine_for(tmp_path)
    out = engine.run([req(0), req(1), req(2)], backend=backend_for(server))
    assert out[0].ok and out[2].ok
    assert out[1].error_kind == "permanent" and out[1].attempts == 1 and "400" in out[1].error
    before = server.stats()["total_requests"]
    # The stored permanent error is an answer: a rerun asks nothing.
    again = engine_for(tmp_path).run([req(0), req(1), req(2)], backend=backend_for(server))
    assert server.stats()["total_requests"] == before
    assert again[1].error_kind == "permanent"


def test_attempts_are_capped_and_the_transient_error_retried_next_run(server, tmp_path):
    server.set_faults([{"kind": "500", "match": "#0", "times": 3}])
    out = engine_for(tmp_path, max_attempts=3).run([req(0), req(1)], backend=backend_for(server))
    assert out[0].error_kind == "transient" and out[0].attempts == 3 and out[1].ok
    # Next run: the transient failure is tried again (the fault is used up) and succeeds.
    again = engine_for(tmp_path, max_attempts=3).run([req(0), req(1)], backend=backend_for(server))
    assert again[0].ok and not again[0].from_cache and again[1].from_cache


def test_warm_cache_makes_zero_requests_and_offline_reports_misses(server, tmp_path):
    requests = [req(i) for i in range(10)]
    engine_for(tmp_path).run(requests, backend=backend_for(server))
    seen = server.stats()["total_requests"]
    warm = engine_for(tmp_path)
    out = warm.run(requests, backend=backend_for(server))
    assert server.stats()["total_requests"] == seen
    assert warm.last_report.cache_hits == 10 and warm.last_report.calls == 0
    offline = engine_for(tmp_path, offline=True)
    out = offline.run(requests + [req(99)], backend=backend_for(server))
    assert [c.ok for c in out] == [True] * 10 + [False]
    assert offline.last_report.offline_misses == 1
    assert server.stats()["total_requests"] == seen


def test_dry_run_plan_counts_without_calling(server, tmp_path):
    requests = [req(i) for i in range(6)]
    engine = engine_for(tmp_path)
    engine.run(requests[:2], backend=backend_for(server))
    seen = server.stats()["total_requests"]
    plan = engine.plan(requests + requests[:1])
    assert plan["requests"] == 7 and plan["unique"] == 6 and plan["cached"] == 2 and plan["to_call"] == 4
    assert plan["estimated_prompt_tokens"] > 0
    assert server.stats()["total_requests"] == seen


def test_usage_and_cost_are_accounted(server, tmp_path):
    from viscon_hub.engine import PriceTable

    engine = Engine(cache=GenerationCache(tmp_path), prices=PriceTable({"viscon-test-llm": (1.0, 2.0)}))
    out = engine.run([req(0), req(1)], backend=backend_for(server))
    report = engine.last_report
    assert report.prompt_tokens == sum(c.prompt_tokens for c in out) > 0
    assert report.cost_usd == pytest.approx((report.prompt_tokens + 2 * report.completion_tokens) / 1e6)
    assert report.by_model["viscon-test-llm"]["calls"] == 2


def test_rate_limit_spaces_requests(server, tmp_path):
    import time

    engine = engine_for(tmp_path, requests_per_minute=120)  # 2 per second, burst of 10
    started = time.monotonic()
    engine.run([req(i) for i in range(13)], backend=backend_for(server))
    assert time.monotonic() - started >= 1.0


def test_missing_key_and_auth_failure_are_clear_errors_without_the_secret(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        make_backend("openai:gpt-4o", image_loader=lambda s: b"")
    server.set_faults([])
    backend = make_backend(
        "openai:viscon-test-llm",
        image_loader=lambda s: b"",
        base_url=server.url + "/nope/v1",
        api_key="sk-very-secret-999",
    )
    with pytest.raises(ConfigError) as info:
        engine_for(tmp_path).run([req(0)], backend=backend)
    assert "sk-very-secret-999" not in str(info.value)
    cache_files = list((tmp_path / "cache").rglob("*"))
    assert not any(b"sk-very-secret-999" in f.read_bytes() for f in cache_files if f.is_file())


def test_bad_specs():
    from viscon_hub.engine import parse_spec

    for bad in ("gpt-4o", "foo:bar", "openai:", ""):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_the_engine_makes_pools_and_closes_its_backends(tmp_path):
    engine = Engine(cache=GenerationCache(tmp_path), config=EngineConfig(request_timeout_s=7.0))
    options = {"image_loader": lambda s: b"", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}
    first = engine.backend("openai:viscon-test-llm", **options)
    assert engine.backend("openai:viscon-test-llm", **options) is first
    assert first.max_batch == 1 and first.price_tier == "standard" and first.timeout_s == 7.0
    other = engine.backend("openai-batch:viscon-test-llm", batch_dir=str(tmp_path / "b"), **options)
    assert other.price_tier == "batch" and engine.backends == [first, other]
    with engine:
        pass
    assert engine.backends == []
    offline = Engine(cache=GenerationCache(tmp_path / "o"), config=EngineConfig(offline=True))
    assert offline.backend("openai:viscon-test-llm", **options) is None and offline.backends == []


def test_a_credential_echoed_in_an_error_never_reaches_the_cache(tmp_path):
    from viscon_hub.engine.backends.base import BackendError, BaseBackend

    class Echoing(BaseBackend):
        name, model = "openai", "viscon-test-llm"

        async def complete(self, request):
            raise BackendError(
                "HTTP 400: bad request from https://bob:hunter22@host/v1 key sk-abcdefghijklmn",
                kind="permanent",
                status=400,
            )

    out = engine_for(tmp_path).run([req(0)], backend=Echoing())
    stored = GenerationCache(tmp_path / "cache").get(out[0].key)
    for text in (out[0].error, stored.error):
        assert "HTTP 400" in text and "hunter22" not in text and "sk-abcdefghijklmn" not in text
