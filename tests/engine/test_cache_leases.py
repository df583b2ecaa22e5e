"""Two processes on one cache: a request in flight in one is not sent again by the other."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.servers.openai_server import OpenAITestServer
from viscon_hub.engine import GenerationCache
from viscon_hub.engine.request import Completion

pytest.importorskip("openai")

WORKER = textwrap.dedent(
    """
    import json, sys
    from viscon_hub.engine import Engine, EngineConfig, GenerationCache, Request, make_backend

    base_url, cache, n, order = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    reqs = [
        Request.create(stage="qa_freeform", model="viscon-test-llm", template_id="t", template_version=1,
                       messages=[{"role": "user", "content": f"Write <Human> questions #{i}"}],
                       sampling={"max_tokens": 200})
        for i in range(n)
    ]
    if order == "reversed":
        reqs.reverse()
    backend = make_backend("openai:viscon-test-llm", image_loader=lambda s: b"", base_url=base_url,
                           api_key="sk-test")
    engine = Engine(cache=GenerationCache(cache), config=EngineConfig(max_concurrency=4))
    out = engine.run(reqs, backend=backend)
    engine.cache.close()
    print(json.dumps({"ok": sum(c.ok for c in out), "calls": engine.report.calls,
                      "waited_hits": engine.report.cache_hits}))
    """
)


def test_two_processes_pay_once_per_request(tmp_path):
    n = 24
    with OpenAITestServer(latency_s=0.05) as server:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, server.base_url, str(tmp_path / "cache"), str(n), order],
                stdout=subprocess.PIPE,
                text=True,
            )
            for order in ("forward", "reversed")
        ]
        results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        stats = server.stats()
    assert all(r["ok"] == n for r in results)
    # Every request reached the server exactly once, whichever process sent it.
    assert stats["total_requests"] == n
    assert sum(r["calls"] for r in results) == n
    assert sum(r["waited_hits"] for r in results) == n
    # The next open finds every reply and sweeps the lease files of finished calls.
    cache = GenerationCache(tmp_path / "cache")
    assert len(cache) == n
    assert list((tmp_path / "cache" / "leases").glob("*/*")) == []


def test_lease_of_a_dead_holder_is_taken_over_and_a_held_one_waits(tmp_path):
    a = GenerationCache(tmp_path)
    key = "ab" + "c" * 62
    lease = a.try_lease(key)
    b = GenerationCache(tmp_path)
    assert b.try_lease(key) is None  # held (by another open file here, another process in practice)
    lease.release(Completion(key=key, reply="the reply", model="m", stage="s", timestamp=1.0))
    got = b.try_lease(key)
    assert isinstance(got, Completion) and got.reply == "the reply"
    # A holder that failed transiently leaves nothing: the next one calls.
    other = "cd" + "e" * 62
    a.try_lease(other).release(Completion(key=other, error="HTTP 500", error_kind="transient"))
    again = b.try_lease(other)
    assert again is not None and not isinstance(again, Completion)
    again.release()
    # A damaged lease file is ignored, not trusted.
    (tmp_path / "leases" / "cd" / other).write_text('{"key": "not it", "reply": "x"}\n')
    taken = b.try_lease(other)
    assert not isinstance(taken, Completion)
    taken.release()


def test_leases_on_storage_without_locks(monkeypatch):
    import uuid

    from viscon_hub.engine import cache as cache_module

    url = f"memory://leases-{uuid.uuid4().hex}"
    a, b = GenerationCache(url), GenerationCache(url)
    key = "ab" + "c" * 62
    lease = a.try_lease(key)
    assert lease is not None and not isinstance(lease, Completion)
    assert b.try_lease(key) is None  # a's claim has not lapsed
    lease.release(Completion(key=key, reply="the reply", model="m", stage="s", timestamp=1.0))
    got = b.try_lease(key)
    assert isinstance(got, Completion) and got.reply == "the reply"
    # A claim past its expiry (a killed holder) is taken over.
    other = "cd" + "e" * 62
    monkeypatch.setattr(cache_module, "REMOTE_LEASE_TTL_S", -1.0)
    assert a.try_lease(other) is not None
    third = GenerationCache(url)
    assert b.try_lease(other) is not None
    # Finished leases are swept by the next open once the reply is in a shard.
    a.put(got)
    a.flush()
    GenerationCache(url)
    assert not third.fs.exists(f"{third.root}/leases/ab/{key}.json")
