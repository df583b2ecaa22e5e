"""Benchmark the Ray runner: the same build with 1 and 2 Ray workers against a server with latency.

Each request waits ``--latency`` seconds at the local OpenAI-compatible server, so generation is
bound by requests in flight; every worker runs ``--per-worker-concurrency`` of them. Two workers
should then generate about twice as fast as one. Each run starts from a fresh cache; the generate
stage is timed from the build's own stage lines (prepare and the merge run on the driver either
way). Target: ratio (2 workers / 1 worker, generate requests per second) >= 1.8.

    python bench/bench_ray.py [--latency 0.3] [--per-worker-concurrency 2] [--block-size 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "servers" / "openai_server.py"


def start_server(tmp: Path, latency: float) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", "0", "--port-file", str(port_file), "--latency", str(latency)]
    )
    for _ in range(400):
        if port_file.exists() and port_file.read_text().strip():
            return proc, f"http://127.0.0.1:{int(port_file.read_text())}/v1"
        time.sleep(0.025)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def one_build(tmp: Path, name: str, url: str, *, workers: int, concurrency: int, block_size: int) -> dict:
    from viscon_hub.build.driver import BuildConfig, build
    from viscon_hub.engine import EngineConfig
    from viscon_hub.generate.stages import GenerateConfig
    from viscon_hub.runners import RunnerOptions

    marks: dict[str, float] = {}
    config = BuildConfig(
        output=str(tmp / name),
        work_dir=str(tmp / f"{name}-work"),
        offline=False,
        generate=GenerateConfig(
            cache=str(tmp / f"{name}-cache"),
            caption_model="openai:viscon-test-vlm",
            qa_model="openai:viscon-test-llm",
            base_url=url,
            engine=EngineConfig(max_concurrency=concurrency),
        ),
        runner=RunnerOptions(kind="ray", ray_workers=workers, generate_block_size=block_size),
    )
    started = time.perf_counter()
    report = build(config, progress=lambda stage: marks.setdefault(stage, time.perf_counter()))
    total = time.perf_counter() - started
    calls = report.stages["generate"]["engine"]["calls"]
    generate_s = marks["merge"] - marks["generate"]
    return {
        "workers": workers,
        "calls": calls,
        "generate_s": round(generate_s, 2),
        "build_s": round(total, 2),
        "requests_per_s": round(calls / generate_s, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--per-worker-concurrency", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=2, help="image contexts per Ray block")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("OPENAI_API_KEY", "bench")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server, url = start_server(tmp, args.latency)
        try:
            runs = [
                one_build(
                    tmp,
                    f"w{w}",
                    url,
                    workers=w,
                    concurrency=args.per_worker_concurrency,
                    block_size=args.block_size,
                )
                for w in (1, 2)
            ]
            same = all(
                (tmp / "w1" / p.relative_to(tmp / "w2")).read_bytes() == p.read_bytes()
                for p in (tmp / "w2").rglob("*.parquet")
            )
        finally:
            server.kill()
            server.wait()
    ratio = runs[1]["requests_per_s"] / runs[0]["requests_per_s"]
    print(
        json.dumps(
            {
                "latency_s": args.latency,
                "per_worker_concurrency": args.per_worker_concurrency,
                "runs": runs,
                "same_bytes": same,
                "ratio_2_over_1": round(ratio, 2),
                "target": 1.8,
            }
        )
    )
    return 0 if ratio >= 1.8 and same else 1


if __name__ == "__main__":
    sys.exit(main())
