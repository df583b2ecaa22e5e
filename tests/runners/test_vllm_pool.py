"""vLLM through Ray without a GPU: the engine pool, the worker backend and the driver wiring.

The engine itself is a stand-in class defined here and handed to the pool (never part of the
product); it answers like the local OpenAI-compatible test server, so the replies parse.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.servers.openai_server import _parse_request, fingerprint, make_reply
from viscon_hub.errors import ConfigError
from viscon_hub.generate.stages import GenerateConfig, read_generations
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.runners import RunnerOptions
from viscon_hub.runners.ray import _start_vllm_pools, generate_on_ray
from viscon_hub.runners.vllm_pool import VLLMPool

pytest.importorskip("ray")


class StandInLLM:
    """``vllm.LLM``'s ``chat`` shape; logs which process served each conversation."""

    def __init__(self, model: str, log: str) -> None:
        self.model = model
        self.log = Path(log)

    def chat(self, conversations, params, use_tqdm=False):
        out = []
        for conv, p in zip(conversations, params, strict=True):
            body = {"model": self.model, "messages": conv, "max_tokens": p["max_tokens"], "seed": p["seed"]}
            parsed = _parse_request(body)
            reply = make_reply(fingerprint(body), parsed)
            out.append(
                SimpleNamespace(
                    prompt_token_ids=[0] * parsed.prompt_tokens,
                    outputs=[
                        SimpleNamespace(
                            text=reply.content,
                            finish_reason=reply.finish_reason,
                            token_ids=[0] * (len(reply.content) // 4 + 1),
                        )
                    ],
                )
            )
        with self.log.open("a") as f:
            f.write(f"{self.model} {os.getpid()} {len(conversations)}\n")
        return out


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    out = tmp_path_factory.mktemp("contexts")
    prepare(PrepareConfig(output=str(out), limit=4))
    return str(out)


def test_vllm_models_run_on_the_engine_pool_and_the_cache_spares_the_gpus(cluster, contexts, tmp_path):
    log = tmp_path / "served.log"
    pools = {
        m: VLLMPool.start(
            m,
            engines=2,
            gpus_per_engine=0,
            llm_options={"log": str(log)},
            llm_class=StandInLLM,
            sampling_class=dict,
        )
        for m in ("stand-in-vlm", "stand-in-llm")
    }
    config = GenerateConfig(
        contexts=contexts,
        output=str(tmp_path / "gen"),
        cache=str(tmp_path / "cache"),
        caption_model="vllm:stand-in-vlm",
        qa_model="vllm:stand-in-llm",
    )
    runner = RunnerOptions(kind="ray", ray_workers=2, generate_block_size=2)
    try:
        stats = generate_on_ray(config, runner=runner, vllm_pools=pools)
        n = stats.contexts_read
        assert n > 2 and stats.records_ok == n and stats.engine["calls"] == 3 * n
        served = [line.split() for line in log.read_text().splitlines()]
        assert sum(int(k) for _, _, k in served) == 3 * n
        # Both engines of each pool did work: the pool is used as a pool.
        for model in pools:
            assert len({pid for m, pid, _ in served if m == model}) == 2
        records = read_generations(str(tmp_path / "gen")).to_pylist()
        assert {r["caption_model"] for r in records} == {"stand-in-vlm"}
        assert all(r["qa_freeform"] and r["qa_multiple_choice"] for r in records)
        log.unlink()
        again = generate_on_ray(config, runner=runner, vllm_pools=pools)
        assert again.engine["calls"] == 0 and again.engine["cache_hits"] == 3 * n and not log.exists()
    finally:
        for pool in pools.values():
            pool.stop()


def test_vllm_on_a_cluster_without_gpus_is_a_clear_error(cluster, contexts, tmp_path):
    config = GenerateConfig(contexts=contexts, output=str(tmp_path), caption_model="vllm:some/model")
    with pytest.raises(ConfigError, match="the cluster has 0"):
        _start_vllm_pools(config, RunnerOptions(kind="ray"))
    # Offline runs call no model, so they need no engine either.
    from dataclasses import replace

    from viscon_hub.engine import EngineConfig

    assert (
        _start_vllm_pools(replace(config, engine=EngineConfig(offline=True)), RunnerOptions(kind="ray")) == {}
    )


def test_engines_per_gpu():
    assert VLLMPool.engines_for(8) == 8 and VLLMPool.engines_for(3, gpus_per_engine=2) == 1
    with pytest.raises(ConfigError, match="need GPUs"):
        VLLMPool.engines_for(1, gpus_per_engine=2)
