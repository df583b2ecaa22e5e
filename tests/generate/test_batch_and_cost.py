"""`viscon generate` with openai-batch models, batch files for vllm run-batch, dry-run cost, --max-cost."""

import json

import pyarrow.parquet as pq
import pytest

from tests.generate.conftest import generate_config
from tests.servers.openai_server import fingerprint, make_reply
from viscon_hub.cli import main
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import RunFailedError
from viscon_hub.generate.stages import generate

pytest.importorskip("openai")

IGNORED = {"caption_model", "qa_model"}  # equal anyway: both runs name the same models


def config(contexts, server, tmp_path, backend="openai", **kw):
    return generate_config(contexts, server, tmp_path, backend=backend, batch_poll_interval_s=0.02, **kw)


def records(tmp_path):
    return pq.read_table(tmp_path / "gen" / "generations" / "records.parquet").to_pylist()


def test_batch_run_equals_online_run(contexts, server, tmp_path):
    online = generate(config(contexts, server, tmp_path / "o", limit=6))
    batch = generate(config(contexts, server, tmp_path / "b", "openai-batch", limit=6))
    assert records(tmp_path / "o") == records(tmp_path / "b")
    assert batch.records_ok == online.records_ok == 6
    # One batch per stage: captions, free-form, multiple-choice.
    assert server.batch_stats()["batch_line_counts"] == [6, 6, 6]
    assert batch.batch["batches_submitted"] == 3 and batch.batch["batches_completed"] == 3


def _vllm_run_batch(path, out_path):
    """What `vllm run-batch` does with a batch file, answered by the test server's reply function."""
    from tests.servers.openai_server import _parse_request

    with open(out_path, "a", encoding="utf-8") as out:
        for line in open(path, encoding="utf-8"):
            item = json.loads(line)
            reply = make_reply(fingerprint(item["body"]), _parse_request(item["body"]))
            response = {"status_code": 200, "request_id": "vllm-1", "body": json.loads(reply.body)}
            out.write(
                json.dumps(
                    {"id": "vllm-1", "custom_id": item["custom_id"], "response": response, "error": None}
                )
            )
            out.write("\n")


def test_file_only_then_results_ingestion_matches_online(contexts, server, tmp_path, capsys):
    generate(config(contexts, server, tmp_path / "o", limit=4))
    common = ["--contexts", contexts, "--output", str(tmp_path / "gen"), "--cache", str(tmp_path / "cache")]
    models = ["--caption-model", "openai-batch:viscon-test-vlm", "--qa-model", "openai-batch:viscon-test-llm"]
    args = ["generate", *common, *models, "--limit", "4", "--no-progress"]
    results = tmp_path / "results.jsonl"
    # Round 1 writes caption files; round 2 ingests captions and writes both Q&A files; round 3 ingests.
    for expected_files in (1, 2):
        extra = ["--batch-results", str(results)] if results.exists() else []
        assert main([*args, "--batch-file-only", *extra]) == 0
        written = json.loads(capsys.readouterr().out)["batch"]["batch_files"]
        assert len(written) == expected_files
        for path in written:
            _vllm_run_batch(path, results)
    assert main([*args, "--offline", "--batch-results", str(results)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records_ok"] == 4 and summary["offline_misses"] == 0 and summary["calls"] == 0
    assert records(tmp_path) == records(tmp_path / "o")
    assert server.batch_stats()["uploads"] == 0  # nothing was sent to a provider


def test_dry_run_prices_qa_of_uncached_captions(contexts, server, tmp_path, monkeypatch):
    from viscon_hub.engine import PriceTable

    monkeypatch.setattr(
        PriceTable,
        "load",
        classmethod(
            lambda cls, path=None: cls({"viscon-test-vlm": (2.0, 8.0), "viscon-test-llm": (1.0, 4.0)})
        ),
    )
    cold = generate(config(contexts, server, tmp_path, limit=4, dry_run=True)).plan
    qa = cold["contextual/qa"]
    assert qa["expected_caption_tokens_from"] == "max_tokens" and qa["pending_on_uncached_captions"] == 8
    assert qa["pending_estimated_cost_usd"] > 0
    total = cold["total"]["estimated_cost_usd"]
    assert total == pytest.approx(
        cold["contextual/caption"]["estimated_cost_usd"] + qa["pending_estimated_cost_usd"], abs=2e-4
    )
    # With two captions cached, their mean length prices the other two captions' Q&A.
    generate(config(contexts, server, tmp_path, limit=2))
    warm = generate(config(contexts, server, tmp_path, limit=4, dry_run=True)).plan["contextual/qa"]
    assert warm["expected_caption_tokens_from"] == "mean_of_cached_captions"
    assert warm["pending_on_uncached_captions"] == 4 and 0 < warm["expected_caption_tokens"]


def test_max_cost_stops_before_spending_past_it(contexts, server, tmp_path, monkeypatch):
    from viscon_hub.engine import PriceTable

    monkeypatch.setattr(
        PriceTable,
        "load",
        classmethod(
            lambda cls, path=None: cls(
                {"viscon-test-vlm": (1000.0, 1000.0), "viscon-test-llm": (1000.0, 1000.0)}
            )
        ),
    )
    budget = 3.0  # a few captions' worth at these prices
    engine = EngineConfig(max_concurrency=4, max_cost_usd=budget)
    # The budget runs out before any image has its caption and both Q&A kinds: a run with no good
    # record fails, and says which budget stopped it.
    with pytest.raises(RunFailedError, match="--max-cost 3 was reached"):
        generate(config(contexts, server, tmp_path, limit=8, engine=engine))
    stats = json.loads((tmp_path / "gen" / "stats.json").read_text())
    assert 0 < stats["engine"]["cost_usd"] <= budget
    assert stats["engine"]["budget_stops"] > 0
    assert stats["dropped"]["caption_over_budget"] > 0
    # What was paid for is stored: a rerun with a larger budget calls only what is missing.
    before = server.stats()["total_requests"]
    rerun = generate(config(contexts, server, tmp_path, limit=8, engine=EngineConfig(max_concurrency=4)))
    assert rerun.engine["cache_hits"] >= stats["engine"]["succeeded"]
    assert server.stats()["total_requests"] - before == rerun.engine["calls"]


def _http(url, body=None):
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data)) as r:
        return json.load(r)


def test_sigkill_mid_poll_then_resume_submits_no_new_caption_batch(contexts, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.generate.test_stages import _start_server_process

    proc, url = _start_server_process(tmp_path, latency=0.0)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    cmd = [sys.executable, "-m", "viscon_hub", "generate", "--contexts", contexts, "--limit", "5"]
    cmd += ["--output", str(tmp_path / "gen"), "--cache", str(tmp_path / "cache"), "--no-progress"]
    cmd += ["--caption-model", "openai-batch:viscon-test-vlm", "--qa-model", "openai-batch:viscon-test-llm"]
    cmd += ["--base-url", url + "/v1", "--batch-poll-interval", "0.05"]
    try:
        _http(url + "/_batch_plan", {"hold": True})
        client = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while _http(url + "/_batch_stats")["batch_polls"] < 3:
            assert client.poll() is None, client.stderr.read().decode()
            time.sleep(0.05)
        client.send_signal(signal.SIGKILL)
        client.wait()
        assert _http(url + "/_batch_stats")["batches_created"] == 1
        _http(url + "/_batch_plan", {"hold": False})
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        stats = _http(url + "/_batch_stats")
        # The caption batch was polled to its end, not sent again; then one batch per Q&A kind.
        assert stats["uploads"] == 3 and stats["batch_line_counts"] == [5, 5, 5]
        assert json.loads(resumed.stdout)["records_ok"] == 5
    finally:
        proc.kill()
        proc.wait()


def test_dry_run_prices_batch_models_at_batch_rates(contexts, tmp_path, monkeypatch):
    from viscon_hub.engine import PriceTable

    table = {"viscon-test-vlm": (2.0, 8.0), "viscon-test-llm": (1.0, 4.0)}
    half = {m: (p / 2, c / 2) for m, (p, c) in table.items()}
    monkeypatch.setattr(PriceTable, "load", classmethod(lambda cls, path=None: cls(table, batch=half)))
    online = generate(config(contexts, None, tmp_path / "o", limit=3, dry_run=True)).plan["total"]
    batch = generate(config(contexts, None, tmp_path / "b", "openai-batch", limit=3, dry_run=True)).plan[
        "total"
    ]
    assert online["to_call"] == batch["to_call"] == 9
    assert batch["estimated_cost_usd"] == pytest.approx(online["estimated_cost_usd"] / 2, abs=2e-4)
