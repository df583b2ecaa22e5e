"""Slurm job arrays without Ray: generate shards (from flags or the array's env) merge to one run's bytes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers.openai_server import OpenAITestServer
from viscon_hub.build.driver import write_dataset
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import ConfigError
from viscon_hub.generate.stages import GenerateConfig, generate, read_generations
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.runners.slurm import resolve_shard

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    out = tmp_path_factory.mktemp("contexts")
    prepare(PrepareConfig(output=str(out)))
    return str(out)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-logged")
    for name in (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
    ):
        monkeypatch.delenv(name, raising=False)


def _config(contexts, out, cache, url, **kw):
    return GenerateConfig(
        contexts=contexts,
        output=str(out),
        cache=str(cache),
        caption_model="openai:viscon-test-vlm",
        qa_model="openai:viscon-test-llm",
        base_url=url,
        context="both",
        engine=EngineConfig(max_concurrency=8, backoff_base_s=0.01, backoff_max_s=0.05),
        **kw,
    )


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "viscon_hub", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.suffix == ".parquet" or p.name == "viscon_build.json")
    }


def test_two_shards_merge_to_the_bytes_of_one_run(contexts, tmp_path):
    with OpenAITestServer() as server:
        generate(_config(contexts, tmp_path / "one", tmp_path / "cache1", server.base_url))
        # Shard 0 as a Slurm array task would run it: no shard flags, the array's env instead.
        result = _cli(
            "generate",
            "--contexts",
            contexts,
            "--output",
            str(tmp_path / "sharded"),
            "--cache",
            str(tmp_path / "cache2"),
            "--caption-model",
            "openai:viscon-test-vlm",
            "--qa-model",
            "openai:viscon-test-llm",
            "--base-url",
            server.base_url,
            "--context",
            "both",
            "--no-progress",
            env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
        )
        assert result.returncode == 0, result.stderr
        with pytest.raises(ConfigError, match=r"1 of 2 generation shards; missing shard\(s\) \[1\]"):
            read_generations(str(tmp_path / "sharded"))
        generate(
            _config(
                contexts,
                tmp_path / "sharded",
                tmp_path / "cache2",
                server.base_url,
                num_shards=2,
                shard_index=1,
            )
        )
    parts = sorted(p.name for p in (tmp_path / "sharded" / "generations").iterdir())
    assert parts == ["records-00000-of-00002.parquet", "records-00001-of-00002.parquet"]
    one = read_generations(str(tmp_path / "one"))
    both = read_generations(str(tmp_path / "sharded"))
    assert one.num_rows == 72 and both.equals(one)
    for name, gen, cache in (("a", "one", "cache1"), ("b", "sharded", "cache2")):
        write_dataset(
            generations=str(tmp_path / gen),
            output=str(tmp_path / name),
            cache=str(tmp_path / cache),
            offline=False,
        )
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) > 3 and a == b


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ((3, 2), {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 2)),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}, (8, 5)),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"},
            (8, 6),
        ),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"},
            (3, 2),
        ),
        ((4, None), {"SLURM_ARRAY_TASK_ID": "3"}, (4, 3)),
        ((None, None), {}, (1, 0)),
        ((4, None), {}, (4, 0)),
    ],
)
def test_resolve_shard(flags, env, expected):
    assert resolve_shard(*flags, env=env) == expected


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ((None, 1), {}, "--shard-index 1 needs --num-shards"),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "x1", "SLURM_ARRAY_TASK_COUNT": "2"},
            r"\$SLURM_ARRAY_TASK_ID must be an integer",
        ),
        ((None, None), {"SLURM_ARRAY_TASK_ID": "2"}, "pass --num-shards N"),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"},
            r"shard index 4 .* not in \[0, 3\]",
        ),
    ],
)
def test_bad_shard_sources_are_clear_errors(flags, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve_shard(*flags, env=env)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--num-shards", "2", "--shard-index", "2"], {}, "--shard-index must be in [0, 1]"),
        (["--shard-index", "1"], {}, "--shard-index must be in [0, 0] for --num-shards 1"),
        (["--num-shards", "0"], {}, "--num-shards"),
        ([], {"SLURM_ARRAY_TASK_ID": "oops"}, "$SLURM_ARRAY_TASK_ID must be an integer"),
    ],
)
def test_cli_bad_shard_flags(args, env, message, contexts, tmp_path):
    for command in (
        ["generate", "--contexts", contexts, "--output", str(tmp_path / "g"), "--offline"],
        ["prepare", "--output", str(tmp_path / "p"), "--no-images"],
    ):
        result = _cli(*command, *args, env=env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_generate_config_refuses_a_missing_shard(contexts, tmp_path):
    with pytest.raises(ConfigError, match=r"--shard-index must be in \[0, 2\]"):
        GenerateConfig(contexts=contexts, output=str(tmp_path), num_shards=3, shard_index=3)
