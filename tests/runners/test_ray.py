"""`--runner ray` on a local two-CPU Ray cluster against the local OpenAI-compatible server.

The Ray build must write the local runner's bytes, ask nothing twice, and survive a worker killed
mid-run with the same output.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from tests.servers.openai_server import OpenAITestServer
from viscon_hub.build.driver import BuildConfig, build
from viscon_hub.build.layout import ALL_CONFIGS
from viscon_hub.build.merge import MergeConfig
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import ConfigError
from viscon_hub.generate.stages import GenerateConfig
from viscon_hub.runners import RunnerOptions
from viscon_hub.runners.ray import (
    BLOCK_FAILED,
    _failed_generate_block,
    _in_order,
    _map_blocks,
    engine_share,
)

ray = pytest.importorskip("ray")
pytest.importorskip("openai")

CONCURRENCY = 3
WORKERS = 2


def _config(root: Path, name: str, url: str, runner: RunnerOptions) -> BuildConfig:
    return BuildConfig(
        output=str(root / name),
        work_dir=str(root / f"{name}-work"),
        offline=False,
        generate=GenerateConfig(
            cache=str(root / f"{name}-cache"),
            caption_model="openai:viscon-test-vlm",
            qa_model="openai:viscon-test-llm",
            base_url=url,
            engine=EngineConfig(max_concurrency=CONCURRENCY, backoff_base_s=0.01, backoff_max_s=0.05),
        ),
        runner=runner,
        merge=MergeConfig(configs=ALL_CONFIGS),  # both context modes: 216 requests on the sample
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.suffix == ".parquet" or p.name == "viscon_build.json")
    }


@pytest.fixture(scope="module")
def local_build(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    with OpenAITestServer() as server:
        build(_config(root, "local", server.base_url, RunnerOptions()))
    files = _files(root / "local")
    assert len(files) > 3
    return files


def test_ray_build_is_byte_identical_and_asks_nothing_twice(local_build, tmp_path):
    with OpenAITestServer() as server:
        report = build(
            _config(tmp_path, "ray", server.base_url, RunnerOptions(kind="ray", ray_workers=WORKERS))
        )
        stats = server.stats()
    assert stats["total_requests"] == 216 and stats["duplicates"] == []
    assert report.stages["generate"]["engine"]["calls"] == 216
    assert _files(tmp_path / "ray") == local_build
    # The intermediate files are the local runner's too: one contexts part, one records file.
    assert [p.name for p in (tmp_path / "ray-work" / "contexts" / "contexts").iterdir()] == [
        "part-00000-of-00001.parquet"
    ]
    gen_stats = json.loads((tmp_path / "ray-work" / "generations" / "stats.json").read_text())
    assert gen_stats["records"] == 72 and gen_stats["records_ok"] == 72


def _generate_workers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and "_GenerateWorker" in cmdline:
            pids.append(int(proc.name))
    return sorted(pids)


def test_killing_a_worker_mid_run_ends_with_the_same_output(local_build, tmp_path):
    killed: list[int] = []

    def kill_one(server: OpenAITestServer, stop: threading.Event) -> None:
        while not stop.is_set():
            pids = _generate_workers()
            if pids and server.stats()["total_requests"] >= 40:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    with OpenAITestServer(latency_s=0.05) as server:
        stop = threading.Event()
        killer = threading.Thread(target=kill_one, args=(server, stop), daemon=True)
        killer.start()
        try:
            build(_config(tmp_path, "ray", server.base_url, RunnerOptions(kind="ray", ray_workers=WORKERS)))
        finally:
            stop.set()
            killer.join()
        stats = server.stats()
    assert killed, "the run ended before a generate worker could be killed"
    assert stats["total_requests"] < 216 + CONCURRENCY + 1
    # Only what the killed worker had in flight may be asked again.
    assert len(stats["duplicates"]) <= CONCURRENCY
    assert _files(tmp_path / "ray") == local_build


class _FailsOnBlockOne:
    """A stand-in block worker for the test: block 1 raises on every attempt, counted in a file."""

    def __init__(self, attempts: str) -> None:
        self.attempts = Path(attempts)

    def __call__(self, batch: pa.Table) -> pa.Table:
        blocks = batch.column("block").to_pylist()
        if 1 in blocks:
            with self.attempts.open("a") as f:
                f.write("1\n")
            raise RuntimeError("this block always fails")
        return pa.table({"block": blocks, "value": [b * 10 for b in blocks]})


def test_a_block_failing_every_retry_is_skipped_after_its_retries(cluster, tmp_path):
    attempts = tmp_path / "attempts"
    runner = RunnerOptions(kind="ray", ray_workers=2, max_retries=2)
    items = [{"block": i} for i in range(4)]
    results = list(
        _in_order(_map_blocks(runner, items, _FailsOnBlockOne, workers=2, attempts=str(attempts)), 4)
    )
    assert [(i, r and r["value"]) for i, r in results] == [(0, 0), (1, None), (2, 20), (3, 30)]
    assert len(attempts.read_text().split()) == 1 + runner.max_retries


def test_a_failed_block_is_a_counted_drop_per_context_and_mode(tmp_path):
    from viscon_hub.generate.stages import read_contexts
    from viscon_hub.prepare.driver import PrepareConfig, prepare

    prepare(PrepareConfig(output=str(tmp_path / "c"), limit=2, fetch_images=False))
    contexts = read_contexts(str(tmp_path / "c"))
    config = GenerateConfig(contexts=str(tmp_path / "c"), output=str(tmp_path / "g"), context="both")
    records, stats = _failed_generate_block(contexts, config)
    assert len(records) == 2 * len(contexts) > 0
    assert {r["status"] for r in records} == {"dropped"} and {r["drop_reason"] for r in records} == {
        BLOCK_FAILED
    }
    assert stats["dropped"] == {BLOCK_FAILED: len(records)}


def test_in_order_fills_missing_blocks_and_refuses_repeats():
    got = list(_in_order([{"block": 1}, {"block": 3}], 5))
    assert [(i, r is not None) for i, r in got] == [(0, False), (1, True), (2, False), (3, True), (4, False)]
    with pytest.raises(ConfigError, match="twice or out of order"):
        list(_in_order([{"block": 1}, {"block": 0}], 2))


def test_rate_limits_are_for_the_whole_cluster():
    share = engine_share(EngineConfig(requests_per_minute=90, tokens_per_minute=9000, max_concurrency=5), 3)
    assert (share.requests_per_minute, share.tokens_per_minute, share.max_concurrency) == (30, 3000, 5)
    assert engine_share(EngineConfig(), 4).requests_per_minute is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"kind": "spark"}, "--runner must be one of local, ray"),
        ({"ray_workers": 2}, "need --runner ray"),
        ({"kind": "ray", "ray_workers": 0}, "--ray-workers must be >= 1"),
        ({"kind": "ray", "generate_block_size": 0}, "generate_block_size"),
    ],
)
def test_bad_runner_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        RunnerOptions(**kw)
