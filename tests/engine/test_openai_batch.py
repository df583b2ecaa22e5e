"""The openai-batch backend through the engine, against the local server's Files and Batch API."""

import asyncio
import json

import pytest

from tests.engine.conftest import engine_for
from tests.engine.conftest import qa_request as req
from viscon_hub.engine import Engine, GenerationCache, make_backend
from viscon_hub.engine.backends.openai_batch import (
    BatchFilesWritten,
    batch_line,
    ingest_results,
    parse_result_line,
)

pytest.importorskip("openai")


def batch_backend(server, tmp_path, **kw):
    kw.setdefault("poll_interval_s", 0.02)
    return make_backend(
        "openai-batch:viscon-test-llm",
        image_loader=lambda sha: b"",
        base_url=server.base_url,
        api_key="sk-test-secret-123",
        batch_dir=tmp_path / "cache" / "batches",
        **kw,
    )


def online_backend(server):
    return make_backend(
        "openai:viscon-test-llm", image_loader=lambda sha: b"", base_url=server.base_url, api_key="sk-x"
    )


def test_batch_replies_equal_online_replies(server, tmp_path):
    requests = [req(i) for i in range(6)]
    batch = engine_for(tmp_path / "b").run(requests, backend=batch_backend(server, tmp_path / "b"))
    online = engine_for(tmp_path / "o").run(requests, backend=online_backend(server))
    assert all(c.ok for c in batch)
    assert [c.reply for c in batch] == [c.reply for c in online]
    assert [c.prompt_tokens for c in batch] == [c.prompt_tokens for c in online]
    stats = server.batch_stats()
    assert stats["uploads"] == 1 and stats["batches_created"] == 1 and stats["batch_line_counts"] == [6]
    # The output file and the recorded batch stay in the cache folder.
    folder = tmp_path / "b" / "cache" / "batches"
    assert len(list(folder.glob("*.output.jsonl"))) == 1
    (state,) = [json.loads(p.read_text()) for p in (folder / "state").glob("*.json")]
    assert state["status"] == "done" and sorted(state["custom_ids"]) == sorted(r.key for r in requests)
    # A second run is all cache hits: no new upload.
    again = engine_for(tmp_path / "b").run(requests, backend=batch_backend(server, tmp_path / "b"))
    assert all(c.from_cache for c in again) and server.batch_stats()["uploads"] == 1


def test_batch_is_priced_at_batch_rates(server, tmp_path):
    from viscon_hub.engine import PriceTable

    prices = PriceTable({"viscon-test-llm": (2.0, 8.0)}, batch={"viscon-test-llm": (1.0, 4.0)})
    requests = [req(i) for i in range(3)]
    eng_b = Engine(cache=GenerationCache(tmp_path / "b"), prices=prices)
    eng_b.run(requests, backend=batch_backend(server, tmp_path / "bb"))
    eng_o = Engine(cache=GenerationCache(tmp_path / "o"), prices=prices)
    eng_o.run(requests, backend=online_backend(server))
    assert eng_o.report.cost_usd > 0
    assert eng_b.report.cost_usd == pytest.approx(eng_o.report.cost_usd / 2)


def test_killed_mid_poll_resumes_without_a_new_batch(server, tmp_path):
    server.set_batch_plan(hold=True)
    requests = [req(i) for i in range(5)]
    engine = engine_for(tmp_path)

    async def killed() -> None:
        backend = batch_backend(server, tmp_path)
        try:
            await asyncio.wait_for(engine.arun(requests, backend=backend), timeout=1.0)
        finally:
            await backend.aclose()

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(killed())
    held = server.batch_stats()
    assert held["batches_created"] == 1 and held["batch_polls"] >= 2
    assert list(held["batch_status"].values()) == ["in_progress"]
    # A new process (new cache handle, new backend) finds the recorded batch and polls it.
    server.set_batch_plan(hold=False)
    backend = batch_backend(server, tmp_path)
    out = engine_for(tmp_path).run(requests, backend=backend)
    assert all(c.ok for c in out)
    after = server.batch_stats()
    assert after["batches_created"] == 1 and after["uploads"] == 1
    assert backend.counts["batches_resumed"] == 1


def test_expired_batch_resubmits_only_unfinished_requests(server, tmp_path):
    server.set_batch_plan(expire_after=3)
    requests = [req(i) for i in range(7)]
    out = engine_for(tmp_path).run(requests, backend=batch_backend(server, tmp_path))
    assert all(c.ok for c in out)
    stats = server.batch_stats()
    # 3 finished before the first batch expired; the second batch held the 4 others, and so on.
    assert stats["batch_line_counts"] == [7, 4, 1]
    assert list(stats["batch_status"].values()) == ["expired", "expired", "completed"]
    assert len(list((tmp_path / "cache" / "batches").glob("*.error.jsonl"))) == 2


def test_failed_lines_are_resubmitted_and_permanent_ones_stored(server, tmp_path):
    server.set_batch_plan(fail_match="#2")
    requests = [req(i) for i in range(4)]
    engine = engine_for(tmp_path, max_attempts=2)
    out = engine.run(requests, backend=batch_backend(server, tmp_path))
    # "#2" fails every time: after max_attempts it is a transient error; the others succeeded.
    assert [c.ok for c in out] == [True, True, False, True]
    assert server.batch_stats()["batch_line_counts"] == [4, 1]
    assert engine.last_report.transient_errors == 1


def test_oversized_batch_is_split_under_both_limits(server, tmp_path):
    requests = [req(i, text="Write <Human> questions about " + "a long caption " * 30) for i in range(9)]
    backend = batch_backend(server, tmp_path, max_requests=4)
    out = engine_for(tmp_path).run(requests, backend=backend)
    assert all(c.ok for c in out)
    assert server.batch_stats()["batch_line_counts"] == [4, 4, 1]
    # A byte limit that fits two lines splits nine requests into five files, each under the limit.
    one = len(batch_line("viscon-test-llm", requests[0], lambda sha: b""))
    server.reset()
    backend = batch_backend(server, tmp_path / "s", max_bytes=2 * one + 10)
    out = engine_for(tmp_path / "s").run(requests, backend=backend)
    assert all(c.ok for c in out)
    stats = server.batch_stats()
    assert sum(stats["batch_line_counts"][-5:]) == 9 and max(stats["batch_line_counts"][-5:]) == 2
    assert max(stats["upload_bytes"][-5:]) <= 2 * one + 10


def test_a_request_bigger_than_the_limit_is_a_permanent_error(server, tmp_path):
    requests = [req(0), req(1, text="Write <Human> " + "x" * 5000)]
    backend = batch_backend(server, tmp_path, max_bytes=2048)
    out = engine_for(tmp_path).run(requests, backend=backend)
    assert out[0].ok and out[1].error_kind == "permanent" and "batch-max-bytes" in out[1].error
    assert backend.counts["request_over_max_bytes"] == 1


@pytest.mark.parametrize("lie", ["garbled", "no_output"])
def test_lying_server_is_counted_not_a_crash(server, tmp_path, lie):
    server.set_batch_plan(lie=lie)
    requests = [req(i) for i in range(4)]
    backend = batch_backend(server, tmp_path)
    engine = engine_for(tmp_path, max_attempts=2)
    out = engine.run(requests, backend=backend)
    if lie == "garbled":
        # The torn line's request was resubmitted and answered (that batch lied too, differently).
        assert sum(c.ok for c in out) >= 3
        assert backend.counts["result_bad_json"] >= 2 and backend.counts["result_bad_body"] >= 1
        assert backend.counts["result_bad_custom_id"] >= 1 and backend.counts["result_unknown_custom_id"] >= 1
    else:
        assert not any(c.ok for c in out) and backend.counts["unfinished"] == 8
        assert engine.last_report.transient_errors == 4


def test_file_only_writes_vllm_run_batch_files_and_stops(tmp_path):
    backend = make_backend(
        "openai-batch:viscon-test-llm",
        image_loader=lambda sha: b"",
        batch_dir=tmp_path / "batches",
        file_only=True,
        max_requests=2,
    )
    requests = [req(i) for i in range(3)]
    with pytest.raises(BatchFilesWritten) as e:
        engine_for(tmp_path).run(requests, backend=backend)
    assert len(e.value.paths) == 2
    lines = [json.loads(x) for p in e.value.paths for x in open(p, encoding="utf-8")]
    assert [x["custom_id"] for x in lines] == [r.key for r in requests]
    assert {x["url"] for x in lines} == {"/v1/chat/completions"} and lines[0]["body"]["max_tokens"] == 400


def test_ingest_results_file_counts_bad_lines(tmp_path):
    good = {
        "id": "r1",
        "custom_id": req(0).key,
        "response": {
            "status_code": 200,
            "body": {
                "choices": [{"message": {"content": "Hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": "lots", "completion_tokens": 2},
            },
        },
        "error": None,
    }
    rejected = {"custom_id": req(1).key, "response": {"status_code": 400, "body": {}}, "error": None}
    expired = {"custom_id": req(2).key, "response": None, "error": {"code": "batch_expired"}}
    path = tmp_path / "results.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                json.dumps(good).encode(),
                json.dumps(rejected).encode(),
                json.dumps(expired).encode(),
                b"\xff\xfe not json",
                json.dumps({"custom_id": "\ud800", "response": {}}).encode(),
                json.dumps([1, 2]).encode(),
                json.dumps({"custom_id": req(3).key, "response": {"status_code": 200, "body": "x"}}).encode(),
                json.dumps(good)[:40].encode(),
            ]
        )
    )
    cache = GenerationCache(tmp_path / "cache")
    counts = ingest_results(path, cache)
    assert counts["stored"] == 2 and counts["lines"] == 8
    assert counts["dropped_transient"] == 1 and counts["dropped_bad_json"] == 2
    assert counts["dropped_bad_custom_id"] == 1 and counts["dropped_not_an_object"] == 1
    assert counts["dropped_bad_body"] == 1
    hit = cache.get(req(0).key)
    assert hit.reply == "Hi" and hit.prompt_tokens == 0 and hit.completion_tokens == 2
    assert cache.get(req(1).key).error_kind == "permanent" and cache.get(req(2).key) is None


def test_parse_result_line_rejects_wrong_types():
    assert parse_result_line(b"null") == (None, "not_an_object")
    key = "a" * 64
    assert parse_result_line(json.dumps({"custom_id": key, "response": {"status_code": True}})) == (
        None,
        "bad_status_code",
    )
    assert parse_result_line(json.dumps({"custom_id": key, "response": None})) == (None, "no_response")


def test_a_batch_that_never_ends_is_waited_out_not_resubmitted(server, tmp_path):
    server.set_batch_plan(hold=True)
    backend = batch_backend(server, tmp_path, max_wait_s=0.1)
    engine = engine_for(tmp_path, max_attempts=2)
    out = engine.run([req(i) for i in range(3)], backend=backend)
    assert not any(c.ok for c in out) and engine.last_report.transient_errors == 3
    # The second attempt polled the recorded batch again instead of paying for a new one.
    assert server.batch_stats()["batches_created"] == 1 and backend.counts["batches_waited_out"] == 2
    assert backend.counts["batches_resumed"] == 1
