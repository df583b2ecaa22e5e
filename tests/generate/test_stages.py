"""`viscon generate` end to end: the real openai client against the local fault-injecting server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.generate.conftest import generate_config
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import ConfigError, RunFailedError
from viscon_hub.generate.stages import GenerateConfig, generate

pytest.importorskip("openai")
SERVER_SCRIPT = Path(__file__).parents[1] / "servers" / "openai_server.py"


def config(contexts, server, tmp_path, **kw):
    return generate_config(contexts, server, tmp_path, **kw)


def records(tmp_path):
    return pq.read_table(tmp_path / "gen" / "generations" / "records.parquet").to_pylist()


def test_generate_captions_and_both_qa_kinds(contexts, server, tmp_path):
    stats = generate(config(contexts, server, tmp_path, limit=5, context="both"))
    rows = records(tmp_path)
    assert len(rows) == 10 and stats.records_ok == 10
    assert {r["context_mode"] for r in rows} == {"contextual", "non_contextual"}
    for r in rows:
        assert r["status"] == "ok" and r["caption"]
        assert 3 <= len(r["qa_freeform"]) <= 5
        assert 3 <= len(r["qa_multiple_choice"]) <= 5
        for item in r["qa_multiple_choice"]:
            assert item["answer"] in "ABCD" and len(item["options"]) == 4
        assert r["caption_template"].startswith(("contextual_caption@", "non_contextual_caption@"))
    # Contextual and non-contextual captions of one image are different requests.
    assert len({r["caption_key"] for r in rows}) == 10
    assert stats.engine["calls"] == 30
    on_disk = json.loads((tmp_path / "gen" / "stats.json").read_text())
    assert on_disk["records_ok"] == 10 and on_disk["engine"]["calls"] == 30


def test_warm_cache_second_run_makes_zero_requests(contexts, server, tmp_path):
    generate(config(contexts, server, tmp_path, limit=4))
    first = records(tmp_path)
    seen = server.stats()["total_requests"]
    stats = generate(config(contexts, server, tmp_path, limit=4))
    assert server.stats()["total_requests"] == seen
    assert stats.engine["calls"] == 0 and stats.engine["cache_hits"] == 12
    assert records(tmp_path) == first


def test_garbled_qa_reply_is_reasked_with_a_new_seed(contexts, server, tmp_path):
    server.set_faults([{"kind": "garbled_content", "match": "<Options>", "times": 2}])
    stats = generate(config(contexts, server, tmp_path, limit=3))
    assert stats.reasks == 2 and stats.records_ok == 3
    assert all(len(r["qa_multiple_choice"]) >= 3 for r in records(tmp_path))


def test_unparsable_reply_without_reasks_is_a_counted_drop(contexts, server, tmp_path):
    server.set_faults([{"kind": "truncated_content", "match": "<Human>", "times": 1}])
    stats = generate(config(contexts, server, tmp_path, limit=3, reasks=0))
    rows = records(tmp_path)
    dropped = [r for r in rows if r["status"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["drop_reason"].startswith("qa_")
    assert sum(stats.dropped.values()) == 1 and stats.records_ok == 2
    # The raw reply stays in the cache: the parser can be changed without calling the model again.
    from viscon_hub.engine import GenerationCache

    cache = GenerationCache(tmp_path / "cache", read_only=True)
    key = dropped[0]["qa_freeform_key"] or dropped[0]["qa_multiple_choice_key"]
    assert cache.get(key).reply


def test_permanent_caption_error_drops_only_that_image(contexts, server, tmp_path):
    server.set_faults([{"kind": "400", "match": "*", "times": 1}])
    stats = generate(config(contexts, server, tmp_path, limit=4))
    assert stats.dropped == {"caption_permanent_error": 1} and stats.records_ok == 3


def test_offline_reports_misses_and_dry_run_calls_nothing(contexts, server, tmp_path):
    with pytest.raises(RunFailedError, match="--offline"):
        generate(config(contexts, server, tmp_path, limit=3, engine=EngineConfig(offline=True)))
    on_disk = json.loads((tmp_path / "gen" / "stats.json").read_text())
    assert on_disk["dropped"] == {"caption_offline_miss": 3}
    assert server.stats()["total_requests"] == 0
    generate(config(contexts, server, tmp_path, limit=2))
    seen = server.stats()["total_requests"]
    plan = generate(config(contexts, server, tmp_path, limit=3, dry_run=True)).plan
    assert plan["contextual/caption"]["cached"] == 2 and plan["contextual/caption"]["to_call"] == 1
    assert plan["contextual/qa"]["cached"] == 4 and plan["contextual/qa"]["pending_on_uncached_captions"] == 2
    assert server.stats()["total_requests"] == seen


def test_bad_generate_config(contexts, tmp_path):
    with pytest.raises(ConfigError, match="--context"):
        GenerateConfig(contexts=contexts, output=str(tmp_path), context="sideways")
    with pytest.raises(ConfigError, match="BACKEND:MODEL"):
        GenerateConfig(contexts=contexts, output=str(tmp_path), caption_model="gpt-4o")
    with pytest.raises(ConfigError, match="viscon prepare"):
        generate(
            GenerateConfig(
                contexts=str(tmp_path / "empty"),
                output=str(tmp_path / "o"),
                engine=EngineConfig(offline=True),
            )
        )


def _start_server_process(tmp_path, latency):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVER_SCRIPT),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--latency",
            str(latency),
        ]
    )
    for _ in range(200):
        if port_file.exists() and port_file.read_text().strip():
            break
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"


def _stats(url):
    import urllib.request

    with urllib.request.urlopen(url + "/_stats") as r:
        return json.load(r)


def _generate_cmd(contexts, out, cache, url, concurrency):
    return [
        sys.executable,
        "-m",
        "viscon_hub",
        "generate",
        "--contexts",
        contexts,
        "--output",
        str(out),
        "--cache",
        str(cache),
        "--caption-model",
        "openai:viscon-test-vlm",
        "--qa-model",
        "openai:viscon-test-llm",
        "--base-url",
        url + "/v1",
        "--context",
        "both",
        "--max-concurrency",
        str(concurrency),
        "--no-progress",
    ]


def test_sigkill_half_way_then_resume_repeats_no_stored_call(contexts, tmp_path):
    concurrency = 2
    proc, url = _start_server_process(tmp_path, latency=0.02)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    try:
        # In chunks of 5 contexts: the kill lands with some chunks' records already in the staged file.
        cmd = [
            *_generate_cmd(contexts, tmp_path / "run", tmp_path / "cache", url, concurrency),
            "--chunk-size",
            "5",
        ]
        client = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while _stats(url)["total_requests"] < 60:
            assert client.poll() is None, client.stderr.read().decode()
            time.sleep(0.01)
        client.send_signal(signal.SIGKILL)
        client.wait()
        time.sleep(0.3)  # let requests that were in flight reach the server
        before = _stats(url)["fingerprints"]
        assert 60 <= len(before) < 216
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        after = _stats(url)
        repeated = {fp for fp, n in after["fingerprint_counts"].items() if n > 1}
        # Only requests in flight when the process died (at most `concurrency`) may be asked again.
        assert len(repeated) <= concurrency
        assert repeated <= set(before[-concurrency:])
        # An uninterrupted run on a fresh cache gives the same output.
        full = subprocess.run(
            _generate_cmd(contexts, tmp_path / "full", tmp_path / "cache2", url, 8),
            env=env,
            capture_output=True,
            text=True,
        )
        assert full.returncode == 0, full.stderr
        a = pq.read_table(tmp_path / "run" / "generations" / "records.parquet")
        b = pq.read_table(tmp_path / "full" / "generations" / "records.parquet")
        assert a.num_rows == 72 and a.equals(b)
        assert sorted(p.name for p in (tmp_path / "run" / "generations").iterdir()) == ["records.parquet"]
    finally:
        proc.kill()
        proc.wait()
