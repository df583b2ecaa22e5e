import json
import multiprocessing
import os
import signal
import time
import uuid

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


# -- the compact index: records are read from their shard when asked for ---------------------------
def hexkey(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def shard_of(root, *completions):
    """Write ``completions`` as one new shard of the cache at ``root`` (each call: a later shard)."""
    cache = GenerationCache(root)
    cache.put_many(completions)
    cache.close()


def test_precedence_across_shards_and_a_live_journal(tmp_path):
    a, b, c, d, e = (hexkey(x) for x in "abcde")
    shard_of(
        tmp_path,
        Completion(key=a, reply="a1", timestamp=1.0),
        Completion(key=b, error="timeout", error_kind="transient", timestamp=1.0),
        Completion(key=c, reply="c-newest-in-shards", timestamp=5.0),
        Completion(key=e, reply="e-first", timestamp=7.0),
    )
    shard_of(
        tmp_path,
        Completion(key=a, reply="a2", timestamp=2.0),  # a newer hit wins
        Completion(key=b, reply="b-late", timestamp=0.5),  # any hit beats a transient error
        Completion(key=c, reply="c-older", timestamp=3.0),  # an older hit loses
        Completion(key=d, error="first failure", error_kind="transient", timestamp=1.0),
        Completion(key=e, reply="e-second", timestamp=7.0),  # a tie: the later record wins
    )
    shard_of(
        tmp_path,
        Completion(key=a, error="timeout", error_kind="transient", timestamp=9.0),  # never replaces a hit
        Completion(key=d, error="second failure", error_kind="transient", timestamp=9.0),
    )
    live = GenerationCache(tmp_path)  # holds its journal: readers take it as it is
    live.put(Completion(key=c, reply="c-journal", timestamp=10.0))
    live.put(Completion(key=e, error="timeout", error_kind="transient", timestamp=11.0))
    reader = GenerationCache(tmp_path, read_only=True)
    for cache in (reader, live):
        assert cache.get(a).reply == "a2"
        assert cache.get(b).reply == "b-late"
        assert cache.get(c).reply == "c-journal"
        assert cache.get(d) is None and cache.record(d).error == "first failure"
        assert cache.get(e).reply == "e-second"
        assert len(cache) == 5
        assert cache.missing([a, b, c, d, e, hexkey("absent")]) == [d, hexkey("absent")]
    live.close()  # its reply moves from memory into the index and a shard
    assert not live._memory and live.get(c).reply == "c-journal"
    again = GenerationCache(tmp_path)
    assert {k: again.get(k).reply for k in (a, b, c, e)} == {
        a: "a2",
        b: "b-late",
        c: "c-journal",
        e: "e-second",
    }
    assert again.record(d).error == "first failure" and len(again) == 5


def test_keys_sharing_a_digest_or_its_prefix_each_keep_their_reply(tmp_path):
    from viscon_hub.engine.cache import _digest

    x, y, z, w = "0123456789abcdef", "fedcba9876543210", "00112233445566ff", "a" * 16
    first, swapped = x + y + z + w, z + w + x + y  # the 128-bit digest folds halves: these collide
    assert _digest(first) == _digest(swapped)
    prefix_twin = first[:32] + "b" * 32  # the same first half, another digest
    shard_of(tmp_path, Completion(key=first, reply="first"), Completion(key=prefix_twin, reply="twin"))
    shard_of(tmp_path, Completion(key=swapped, reply="swapped"))
    cache = GenerationCache(tmp_path)
    assert len(cache._index) == 3 and len(cache) == 3
    assert cache.get(first).reply == "first"
    assert cache.get(swapped).reply == "swapped"
    assert cache.get(prefix_twin).reply == "twin"
    ghost = z + y + x + w  # a third key with the same digest, never stored
    assert _digest(ghost) == _digest(first) and cache.get(ghost) is None and cache.record(ghost) is None
    assert set(cache.get_many([first, swapped, ghost])) == {first, swapped}
    # A new record for one of them replaces only its own entry, in memory and after a flush.
    cache.put(Completion(key=swapped, reply="swapped-2", timestamp=time.time() + 1))
    cache.put(Completion(key=ghost, reply="ghost"))
    assert len(cache) == 4
    cache.close()
    for c in (cache, GenerationCache(tmp_path)):
        got = {k: c.get(k).reply for k in (first, swapped, ghost, prefix_twin)}
        assert got == {first: "first", swapped: "swapped-2", ghost: "ghost", prefix_twin: "twin"}
        assert len(c) == 4 and sorted(r.reply for r in c) == ["first", "ghost", "swapped-2", "twin"]


def test_decoded_row_groups_are_bounded_and_the_index_is_compact(tmp_path, monkeypatch):
    import viscon_hub.engine.cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_ROW_GROUP_ROWS", 4)
    keys = [hexkey(str(i)) for i in range(100)]
    shard_of(tmp_path, *(Completion(key=k, reply=f"reply {i} " * 50) for i, k in enumerate(keys)))
    cache = GenerationCache(tmp_path, row_groups=3)
    assert len(cache._shards[0].starts) - 1 == 25  # 25 row groups of 4 rows
    for i in (0, 50, 99, 13, 77, 42, 1):
        assert cache.get(keys[i]).reply == f"reply {i} " * 50
        assert len(cache._groups) <= 3
    assert set(cache._groups) == {(0, 19), (0, 10), (0, 0)}  # the three read last
    reads = []
    real = cache._open

    def counting(sid):
        reads.append(sid)
        return real(sid)

    monkeypatch.setattr(cache, "_open", counting)
    assert cache.get(keys[2]).reply == "reply 2 " * 50  # row group 0 is still decoded
    assert reads == []
    # Streaming readers do not push hot row groups out.
    assert len(list(cache)) == 100 and len(cache.get_many(keys)) == 100
    assert set(cache._groups) == {(0, 19), (0, 10), (0, 0)}
    index = cache._index
    per_key = sum(a.nbytes for a in (index.hi, index.lo, index.shard, index.row, index.hit, index.ts)) / 100
    assert per_key <= 40
    with pytest.raises(Exception, match="row_groups"):
        GenerationCache(tmp_path, row_groups=0)


def test_iteration_streams_each_key_once_shard_by_shard_then_memory(tmp_path):
    a, b, c, d = (hexkey(x) for x in "abcd")
    shard_of(tmp_path, Completion(key=a, reply="a-old", timestamp=1.0), Completion(key=b, reply="b"))
    shard_of(
        tmp_path,
        Completion(key=c, error="timeout", error_kind="transient"),
        Completion(key=a, reply="a-new", timestamp=2.0),
    )
    cache = GenerationCache(tmp_path)
    cache.put(Completion(key=d, reply="d"))
    cache.put(Completion(key=b, reply="b-new", timestamp=time.time() + 5))
    it = iter(cache)
    assert next(it).key == c  # a generator: the first shard's rows are all superseded
    assert [(r.key, r.reply, r.error) for r in it] == [
        (a, "a-new", None),
        (d, "d", None),
        (b, "b-new", None),
    ]
    cache.close()


def test_a_damaged_shard_is_skipped_and_the_others_kept(tmp_path, caplog):
    keys = [hexkey(str(i)) for i in range(6)]
    shard_of(tmp_path, *(Completion(key=k, reply=f"r{i}") for i, k in enumerate(keys[:3])))
    (tmp_path / "shards" / "00000000000000000001-bad.parquet").write_bytes(b"PAR1 not parquet at all")
    shard_of(tmp_path, *(Completion(key=k, reply=f"r{i + 3}") for i, k in enumerate(keys[3:])))
    with caplog.at_level("WARNING", logger="viscon_hub.engine.cache"):
        cache = GenerationCache(tmp_path)
    assert "skipping unreadable cache shard" in caplog.text and "bad.parquet" in caplog.text
    assert [cache.get(k).reply for k in keys] == [f"r{i}" for i in range(6)] and len(cache) == 6
    # A shard damaged after it was indexed: its keys read as misses (asked again), never a crash.
    later = sorted((tmp_path / "shards").glob("*.parquet"))[-1]
    cache = GenerationCache(tmp_path)
    later.write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level("WARNING", logger="viscon_hub.engine.cache"):
        assert [cache.get(k) is None for k in keys] == [False] * 3 + [True] * 3
    assert "cannot read cache shard" in caplog.text
    assert cache.missing(keys) == keys[3:] and len(list(cache)) == 3


def test_fallback_layers_answer_what_the_cache_does_not(tmp_path):
    a, b, c = (hexkey(x) for x in "abc")
    shard_of(
        tmp_path / "bundled",
        Completion(key=a, reply="bundled-a", model="m", prompt_tokens=5),
        Completion(key=b, reply="bundled-b", model="m", prompt_tokens=7),
    )
    own = GenerationCache(tmp_path / "own", fallbacks=[tmp_path / "bundled"])
    own.put(Completion(key=a, reply="own-a", model="m", prompt_tokens=1))
    own.put(Completion(key=b, error="timeout", error_kind="transient"))
    own.close()
    for cache in (own, GenerationCache(tmp_path / "own", fallbacks=[tmp_path / "bundled"])):
        assert cache.get(a).reply == "own-a" and cache.get(b).reply == "bundled-b"
        assert cache.record(b).error == "timeout" and cache.get(c) is None
        assert {k: v.reply for k, v in cache.get_many([a, b, c]).items()} == {a: "own-a", b: "bundled-b"}
        assert cache.missing([c, a, b]) == [c]
        assert cache.usage([a, b, c]).to_dict()["m"]["prompt_tokens"] == 1 + 7
        assert len(cache) == 2  # its own keys only, as before


def test_remote_cache_reads_rows_on_demand():
    url = f"memory://viscon-cache-{uuid.uuid4().hex}"
    keys = [hexkey(str(i)) for i in range(7)]
    cache = GenerationCache(url, flush_rows=3)
    for i, k in enumerate(keys):
        cache.put(Completion(key=k, reply=str(i), timestamp=1.0))
    assert len(cache._shards) == 2 and len(cache._memory) == 1  # two flushed shards, one pending
    assert [cache.get(k).reply for k in keys] == [str(i) for i in range(7)]
    cache.put(Completion(key=keys[0], reply="0-new", timestamp=2.0))
    cache.close()
    again = GenerationCache(url)
    assert [again.get(k).reply for k in keys] == ["0-new", *(str(i) for i in range(1, 7))]
    assert len(again) == 7 and sorted(c.reply for c in again) == sorted(["0-new", *map(str, range(1, 7))])
    assert again.missing([*keys, hexkey("x")]) == [hexkey("x")]
