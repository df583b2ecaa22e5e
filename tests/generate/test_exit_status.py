"""Exit status means something: a dead endpoint, an empty offline cache or a missing key fail fast and clearly."""

import json

import pytest

from tests.generate.conftest import generate_config
from tests.servers.openai_server import OpenAITestServer
from viscon_hub.cli import main
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import ConfigError, EndpointError, RunFailedError
from viscon_hub.generate.stages import generate

pytest.importorskip("openai")
DEAD = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, every connection is refused


def gen_args(contexts, tmp_path, *extra):
    return [
        "generate",
        "--contexts",
        contexts,
        "--output",
        str(tmp_path / "gen"),
        "--cache",
        str(tmp_path / "cache"),
        "--caption-model",
        "openai:viscon-test-vlm",
        "--qa-model",
        "openai:viscon-test-llm",
        *extra,
    ]


def error_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 <= len(err) <= 2, err
    assert not any("Traceback" in line for line in err)
    return err


def test_dead_endpoint_fails_with_one_line_naming_it(contexts, tmp_path, capsys):
    rc = main(gen_args(contexts, tmp_path, "--base-url", DEAD, "--no-progress"))
    assert rc != 0
    (line,) = error_lines(capsys)
    assert "127.0.0.1:9" in line and "cannot connect" in line
    assert "--max-error-rate" in line


def test_offline_with_an_empty_cache_fails(contexts, tmp_path, capsys):
    rc = main(gen_args(contexts, tmp_path, "--offline", "--no-progress"))
    assert rc != 0
    (line,) = error_lines(capsys)
    assert "no good record" in line and "--offline" in line
    assert json.loads((tmp_path / "gen" / "stats.json").read_text())["records_ok"] == 0


def test_missing_api_key_is_refused_before_any_work(contexts, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    rc = main(gen_args(contexts, tmp_path, "--no-progress"))
    assert rc != 0
    (line,) = error_lines(capsys)
    assert "OPENAI_API_KEY" in line
    assert not (tmp_path / "gen").exists() and not (tmp_path / "cache").exists()


def test_build_checks_models_before_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    work = tmp_path / "work"
    rc = main(
        [
            "build",
            "--caption-model",
            "openai:gpt-4o",
            "--output",
            str(tmp_path / "o"),
            "--work-dir",
            str(work),
        ]
    )
    assert rc != 0 and "OPENAI_API_KEY" in error_lines(capsys)[0]
    assert not work.exists()
    rc = main(["build", "--caption-model", "gpt4o", "--output", str(tmp_path / "o"), "--work-dir", str(work)])
    assert rc != 0 and "BACKEND:MODEL" in error_lines(capsys)[0]
    assert not work.exists()


@pytest.mark.parametrize("value", ["-0.1", "1.5", "lots"])
def test_bad_max_error_rate(value, contexts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rc = main(gen_args(contexts, tmp_path, "--max-error-rate", value))
        raise SystemExit(rc)
    assert e.value.code != 0


def run(contexts, tmp_path, server, **engine):
    fast = EngineConfig(max_concurrency=4, backoff_base_s=0.01, backoff_max_s=0.02, **engine)
    return generate(generate_config(contexts, server, tmp_path, limit=6, engine=fast))


def test_always_failing_server_trips_the_breaker(contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with OpenAITestServer(faults=[{"kind": "500", "times": None}]) as server:
        with pytest.raises(EndpointError, match="last error: HTTP 500") as e:
            run(contexts, tmp_path, server, error_window=5)
        assert server.base_url in str(e.value)
        # It stopped within the first window, not after every retry of every request.
        assert server.stats()["total_requests"] < 6 * 5


def test_a_few_failures_under_the_rate_pass(contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with OpenAITestServer(faults=[{"kind": "500", "times": 2}]) as server:
        stats = run(contexts, tmp_path, server, error_window=10)
    assert stats.records_ok == 6


def test_rate_limits_do_not_count_as_failures(contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with OpenAITestServer(faults=[{"kind": "429", "retry_after_s": 0.01, "times": 8}]) as server:
        stats = run(contexts, tmp_path, server, error_window=4, max_attempts=10)
    assert stats.records_ok == 6


def test_permanent_failures_over_the_rate_fail_the_run(contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with OpenAITestServer(faults=[{"kind": "400", "match": "<Options>", "times": None}]) as server:
        with pytest.raises((EndpointError, RunFailedError)) as e:
            run(contexts, tmp_path, server, error_window=50, max_error_rate=0.2)
    assert "HTTP 400" in str(e.value)


def test_engine_config_bounds():
    with pytest.raises(ConfigError, match="--max-error-rate"):
        EngineConfig(max_error_rate=2)
    with pytest.raises(ConfigError, match="--request-timeout"):
        EngineConfig(request_timeout_s=0)


def test_build_against_a_dead_endpoint_fails_fast(tmp_path, capsys):
    from viscon_hub.prepare.readers import SAMPLE_PATH

    args = ["build", "--source", str(SAMPLE_PATH), "--base-url", DEAD, "--output", str(tmp_path / "o")]
    assert main([*args, "--cache", str(tmp_path / "cache"), "--no-progress"]) == 2
    (line,) = error_lines(capsys)
    assert "127.0.0.1:9" in line
    assert not (tmp_path / "o").exists()


def test_build_whose_prepare_keeps_nothing_fails(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"not": "a document"}\n[1]\n')
    args = ["build", "--source", str(src), "--offline", "--output", str(tmp_path / "o")]
    assert main([*args, "--cache", str(tmp_path / "cache"), "--no-progress"]) == 2
    (line,) = error_lines(capsys)
    assert "prepare kept no image context out of 2 documents" in line and "missing_column: 1" in line
