"""Benchmark the engine against a bare AsyncOpenAI loop (aiohttp transport) on a local zero-latency server.

For each concurrency (16, 128, 512 by default) both sides send the same number of distinct requests
to the same server process, interleaved over several repeats; the best rate of each is kept, and so
is the least client CPU time (this process's user + system seconds, per 1,000 requests: what the
engine costs on a shared machine, where wall-clock rates swing with the neighbours).
With ``--busy`` a subprocess burns one core throughout, so the ratio is measured on a busy machine.
Targets: engine >= 0.9x bare at every concurrency, busy or not; engine CPU <= 1.2x bare CPU;
engine at 512 >= 0.8x engine at 16; a replay from a warm cache >= 5,000 requests/s per core (the
replay is single-threaded, so per core = total).

    python bench/bench_engine.py [--requests 2000] [--repeats 2] [--concurrency 16,128,512] [--busy]
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

    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    await client.close()
    return n / elapsed, cpu * 1000 / n


def engine_rate(
    base_url: str, n: int, concurrency: int, tag: str, cache_dir: str
) -> tuple[float, float, object]:
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

    async def go() -> tuple[float, float]:
        t, cpu = time.perf_counter(), time.process_time()
        out = await engine.arun(requests, backend=backend)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
        assert all(c.ok for c in out) and engine.last_report.calls == n
        await backend.aclose()
        return n / elapsed, cpu * 1000 / n

    rate, cpu = asyncio.run(go())
    engine.cache.close()
    return rate, cpu, requests


def replay_rate(cache_dir: str, requests) -> float:
    from viscon_hub.engine import Engine, GenerationCache

    engine = Engine(cache=GenerationCache(cache_dir))
    t = time.perf_counter()
    out = engine.run(requests, backend=None)
    elapsed = time.perf_counter() - t
    assert all(c.from_cache for c in out)
    return len(requests) / elapsed


def profile(url: str, n: int, concurrency: int, cache_dir: str, out: str) -> None:
    """A cProfile of one engine run (read it with ``python -m pstats OUT``)."""
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    engine_rate(url, n, concurrency, "profile", cache_dir)
    prof.disable()
    prof.dump_stats(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", default="16,128,512")
    parser.add_argument("--busy", action="store_true", help="burn one core in a subprocess meanwhile")
    parser.add_argument("--profile", default=None, help="write a cProfile of one engine run here")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    report: dict = {"requests_per_run": args.requests, "busy": args.busy, "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp))
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
        try:
            asyncio.run(bare(url, 200, 16, "warmup"))
            engine_rate(url, 200, 16, "warmup", f"{tmp}/cache-warmup")
            if args.profile:
                profile(url, args.requests, levels[0], f"{tmp}/cache-profile", args.profile)
            last_requests, last_cache = None, None
            for c in levels:
                bare_best, eng_best = 0.0, 0.0
                bare_cpu, eng_cpu = float("inf"), float("inf")
                for rep in range(args.repeats):
                    rate, cpu = asyncio.run(bare(url, args.requests, c, f"b{c}-{rep}"))
                    bare_best, bare_cpu = max(bare_best, rate), min(bare_cpu, cpu)
                    cache_dir = f"{tmp}/cache-{c}-{rep}"
                    rate, cpu, last_requests = engine_rate(url, args.requests, c, f"e{c}-{rep}", cache_dir)
                    eng_best, eng_cpu = max(eng_best, rate), min(eng_cpu, cpu)
                    last_cache = cache_dir
                report["levels"][c] = {
                    "bare_req_per_s": round(bare_best),
                    "engine_req_per_s": round(eng_best),
                    "ratio": round(eng_best / bare_best, 3),
                    "bare_cpu_s_per_1000": round(bare_cpu, 3),
                    "engine_cpu_s_per_1000": round(eng_cpu, 3),
                    "cpu_ratio": round(eng_cpu / bare_cpu, 3),
                }
                print(json.dumps({c: report["levels"][c]}), flush=True)
            replay = max(replay_rate(last_cache, last_requests) for _ in range(3))
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
            proc.kill()
            proc.wait()
    lo, hi = min(levels), max(levels)
    report["engine_high_vs_low_concurrency"] = round(
        report["levels"][hi]["engine_req_per_s"] / report["levels"][lo]["engine_req_per_s"], 3
    )
    report["warm_cache_replay_req_per_s"] = round(replay)
    report["targets"] = {
        "ratio": 0.9,
        "cpu_ratio": 1.2,
        "engine_high_vs_low_concurrency": 0.8,
        "warm_cache_replay_req_per_s": 5000,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
