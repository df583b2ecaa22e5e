import json
import multiprocessing
import os
import signal
import time

import pytest

from viscon_hub.engine import Completion, GenerationCache, Request


def key(i: int) -> str:
    return f"{i:064x}"


def test_put_get_and_reopen(tmp_path):
    cache = GenerationCache(tmp_path)
    cache.put(Completion(key=key(1), reply="one", model="m", stage="caption", prompt_tokens=3))
    cache.put(Completion(key=key(2), error="HTTP 400: bad image", error_kind="permanent"))
    cache.put(Completion(key=key(3), error="timeout", error_kind="transient"))
    cache.close()
    again = GenerationCache(tmp_path)
    assert again.get(key(1)).reply == "one" and again.get(key(1)).prompt_tokens == 3
    assert again.get(key(2)).error_kind == "permanent"  # permanent errors are answers too
    assert again.get(key(3)) is None  # transient errors are retried
    assert again.record(key(3)).error == "timeout"
    assert list((tmp_path / "shards").glob("*.parquet")) and not list((tmp_path / "journal").glob("*.jsonl"))


def test_a_hit_is_never_replaced_by_a_later_transient_error(tmp_path):
    cache = GenerationCache(tmp_path)
    cache.put(Completion(key=key(1), reply="good"))
    cache.put(Completion(key=key(1), error="timeout", error_kind="transient"))
    cache.close()
    assert GenerationCache(tmp_path).get(key(1)).reply == "good"


def _writer(root, start, n, ready):
    cache = GenerationCache(root)
    for i in range(start, start + n):
        cache.put(Completion(key=key(i), reply=f"r{i}"))
        if i == start + n // 2:
            ready.set()
    ready.set()
    time.sleep(60)  # killed before it can flush


def test_sigkill_loses_no_stored_reply_and_next_open_folds_the_journal(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_writer, args=(str(tmp_path), 0, 50, ready))
    p.start()
    ready.wait(10)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    cache = GenerationCache(tmp_path)
    assert all(cache.get(key(i)).reply == f"r{i}" for i in range(50))
    # The dead writer's journal became a Parquet shard.
    assert not list((tmp_path / "journal").glob("*.jsonl"))
    assert list((tmp_path / "shards").glob("*.parquet"))


def test_two_live_writers_share_one_cache(tmp_path):
    a, b = GenerationCache(tmp_path), GenerationCache(tmp_path)
    for i in range(20):
        a.put(Completion(key=key(i), reply=f"a{i}"))
        b.put(Completion(key=key(100 + i), reply=f"b{i}"))
    # A third opener must not fold journals whose writers are alive.
    c = GenerationCache(tmp_path)
    assert len(list((tmp_path / "journal").glob("*.jsonl"))) == 2
    assert c.get(key(5)).reply == "a5" and c.get(key(105)).reply == "b5"
    a.close()
    b.close()
    d = GenerationCache(tmp_path)
    assert len(d) == 40


def test_torn_journal_line_is_ignored(tmp_path):
    cache = GenerationCache(tmp_path)
    cache.put(Completion(key=key(1), reply="kept"))
    journal = next((tmp_path / "journal").glob("*.jsonl"))
    with open(journal, "a") as f:
        f.write(json.dumps({"key": key(2), "reply": "torn"})[:20])  # no newline: killed mid-write
    reader = GenerationCache(tmp_path, read_only=True)
    assert reader.get(key(1)).reply == "kept" and reader.get(key(2)) is None
    with pytest.raises(PermissionError):
        reader.put(Completion(key=key(3), reply="x"))
    cache.close()


def test_remote_fsspec_cache_writes_parquet_shards():
    cache = GenerationCache("memory://viscon-cache-test", flush_rows=2)
    for i in range(5):
        cache.put(Completion(key=key(i), reply=str(i)))
    cache.close()
    again = GenerationCache("memory://viscon-cache-test")
    assert [again.get(key(i)).reply for i in range(5)] == ["0", "1", "2", "3", "4"]


def test_request_key_ignores_image_location_and_tracks_content():
    def req(sha, text="describe", version=1, temperature=0.2):
        return Request.create(
            stage="caption_contextual",
            model="gpt-4o",
            template_id="contextual_caption",
            template_version=version,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "sha256": sha}, {"type": "text", "text": text}],
                }
            ],
            sampling={"temperature": temperature},
        )

    a, b = "a" * 64, "b" * 64
    assert req(a).key == req(a).key
    assert req(a).images == (a,)
    assert (
        len(
            {req(a).key, req(b).key, req(a, text="x").key, req(a, version=2).key, req(a, temperature=0.3).key}
        )
        == 5
    )
    with pytest.raises(ValueError, match="sha256"):
        Request.create(
            stage="s",
            model="m",
            template_id="t",
            template_version=1,
            messages=[{"role": "user", "content": [{"type": "image", "url": "http://x"}]}],
            sampling={},
        )


def test_usage_counts_each_stored_reply_once_at_the_rates_used(tmp_path):
    from viscon_hub.engine.prices import PriceTable

    cache = GenerationCache(tmp_path)
    cache.put(Completion(key="a", reply="x", model="m", prompt_tokens=1_000_000, completion_tokens=0))
    cache.put(Completion(key="b", reply="y", model="m", prompt_tokens=0, completion_tokens=500_000))
    prices = PriceTable({"m": (1.0, 2.0)}, batch={"m": (0.5, 1.0)})
    usage = cache.usage(["a", "a", "b", "missing", ""], prices=prices)
    assert usage.to_dict() == {
        "m": {"replies": 2, "prompt_tokens": 1_000_000, "completion_tokens": 500_000, "cost_usd": 2.0}
    }
    assert cache.usage(["a", "b"], prices=prices, batch_models={"m"}).cost_usd == 1.0
