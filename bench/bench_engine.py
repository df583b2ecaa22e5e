"""Benchmark the engine against a bare AsyncOpenAI loop (aiohttp transport) on a local zero-latency server.

For each concurrency (16, 128, 512 by default) both sides send the same number of distinct requests
to the same server process, interleaved over several repeats; the best rate of each is kept.
Targets: engine >= 0.9x bare at every concurrency; engine at 512 >= 0.8x engine at 16; a replay from
a warm cache >= 5,000 requests/s per core (the replay is single-threaded, so per core = total).

    python bench/bench_engine.py [--requests 2000] [--repeats 2] [--concurrency 16,128,512]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "servers" / "openai_server.py"
MODEL = "viscon-test-llm"


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", "0", "--port-file", str(port_file)])
    for _ in range(400):
        if port_file.exists() and port_file.read_text().strip():
            return proc, f"http://127.0.0.1:{int(port_file.read_text())}/v1"
        time.sleep(0.025)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def messages(i: int, tag: str) -> list[dict]:
    return [{"role": "user", "content": f"Describe item {tag}-{i}: a mug, a lamp and a notebook on a desk."}]


async def bare(base_url: str, n: int, concurrency: int, tag: str) -> float:
    import openai

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="bench", max_retries=0, http_client=openai.DefaultAioHttpClient()
    )
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await client.chat.completions.create(
                model=MODEL, messages=messages(i, tag), temperature=0.0, max_tokens=64
            )
            assert r.choices[0].message.content

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t
    await client.close()
    return n / elapsed


def engine_rate(base_url: str, n: int, concurrency: int, tag: str, cache_dir: str) -> tuple[float, object]:
    from viscon_hub.engine import Engine, EngineConfig, GenerationCache, Request, make_backend

    requests = [
        Request.create(
            stage="bench",
            model=MODEL,
            template_id="bench",
            template_version=1,
            messages=messages(i, tag),
            sampling={"temperature": 0.0, "max_tokens": 64},
        )
        for i in range(n)
    ]
    backend = make_backend(
        f"openai:{MODEL}",
        image_loader=lambda s: b"",
        base_url=base_url,
        api_key="bench",
        max_connections=max(concurrency, 16),
    )
    engine = Engine(cache=GenerationCache(cache_dir), config=EngineConfig(max_concurrency=concurrency))

    async def go() -> float:
        t = time.perf_counter()
        out = await engine.arun(requests, backend=backend)
        elapsed = time.perf_counter() - t
        assert all(c.ok for c in out) and engine.last_report.calls == n
        await backend.aclose()
        return n / elapsed

    return asyncio.run(go()), requests


def replay_rate(cache_dir: str, requests) -> float:
    from viscon_hub.engine import Engine, GenerationCache

    engine = Engine(cache=GenerationCache(cache_dir))
    t = time.perf_counter()
    out = engine.run(requests, backend=None)
    elapsed = time.perf_counter() - t
    assert all(c.from_cache for c in out)
    return len(requests) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", default="16,128,512")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    report: dict = {"requests_per_run": args.requests, "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp))
        try:
            asyncio.run(bare(url, 200, 16, "warmup"))
            engine_rate(url, 200, 16, "warmup", f"{tmp}/cache-warmup")
            last_requests, last_cache = None, None
            for c in levels:
                bare_best, eng_best = 0.0, 0.0
                for rep in range(args.repeats):
                    bare_best = max(bare_best, asyncio.run(bare(url, args.requests, c, f"b{c}-{rep}")))
                    cache_dir = f"{tmp}/cache-{c}-{rep}"
                    rate, last_requests = engine_rate(url, args.requests, c, f"e{c}-{rep}", cache_dir)
                    eng_best = max(eng_best, rate)
                    last_cache = cache_dir
                report["levels"][c] = {
                    "bare_req_per_s": round(bare_best),
                    "engine_req_per_s": round(eng_best),
                    "ratio": round(eng_best / bare_best, 3),
                }
                print(json.dumps({c: report["levels"][c]}), flush=True)
            replay = max(replay_rate(last_cache, last_requests) for _ in range(3))
        finally:
            proc.kill()
            proc.wait()
    lo, hi = min(levels), max(levels)
    report["engine_high_vs_low_concurrency"] = round(
        report["levels"][hi]["engine_req_per_s"] / report["levels"][lo]["engine_req_per_s"], 3
    )
    report["warm_cache_replay_req_per_s"] = round(replay)
    report["targets"] = {
        "ratio": 0.9,
        "engine_high_vs_low_concurrency": 0.8,
        "warm_cache_replay_req_per_s": 5000,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
