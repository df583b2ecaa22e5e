import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from viscon_hub.build.driver import BuildConfig, write_dataset
from viscon_hub.build.layout import ALL_CONFIGS, BUILD_INFO, SPLITS, config_mix, data_path
from viscon_hub.build.merge import MergeConfig
from viscon_hub.errors import ConfigError
from viscon_hub.recipe import from_mapping, to_mapping

ROOT = Path(__file__).resolve().parents[2]


def rows(dataset: Path, config: str, split: str) -> list[dict]:
    return pq.read_table(dataset / data_path(config, split), columns=None).to_pylist()


def test_quickstart_config_defaults():
    cfg = BuildConfig()
    assert cfg.offline and cfg.generate.caption_model == "openai:handwritten-example"
    assert any("data/cache" in c for c in cfg.generate.extra_caches)
    real = from_mapping(BuildConfig, {"prepare": {"source": "docs.jsonl"}})
    gen = real.generate
    assert not real.offline and gen.caption_model == "openai:gpt-4o" and gen.extra_caches == ()
    assert real.configs == ("contextual", "leaky") and len(cfg.configs) == 10
    assert from_mapping(BuildConfig, {"prepare": {"source": "docs.jsonl"}, "offline": True}).offline
    with pytest.raises(ConfigError):
        from_mapping(BuildConfig, {"merge": {"configs": ["leaky", "bogus"]}})
    with pytest.raises(ConfigError):
        from_mapping(BuildConfig, {"merge": {"test_fraction": 1.0}})


def test_the_build_joins_its_stages_through_its_work_folder():
    cfg = from_mapping(
        BuildConfig, {"output": "out", "merge": {"configs": ["leaky"]}, "runner": {"prepare_block_size": 64}}
    )
    assert (cfg.prepare.output, cfg.generate.contexts) == ("out-work/contexts", "out-work/contexts")
    assert cfg.generate.output == "out-work/generations"
    assert cfg.generate.image_store == "out-work/contexts/images"
    assert cfg.generate.context == "contextual" and cfg.generate.engine.offline
    assert cfg.prepare.runner == cfg.generate.runner == cfg.runner
    assert cfg.relevance.engine == cfg.generate.engine
    # The resolved config reads back as itself: what --print-recipe shows is what runs.
    assert from_mapping(BuildConfig, to_mapping(cfg)) == cfg
    # A joint the build owns, set in the recipe to something else, is a one-line error naming it.
    for section, key, value in (
        ("prepare", "output", "elsewhere"),
        ("generate", "contexts", "elsewhere"),
        ("generate", "num_shards", 2),
        ("generate", "context", "non_contextual"),
    ):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: expected it left out.*got"):
            from_mapping(BuildConfig, {section: {key: value}, "merge": {"configs": ["leaky"]}})
    # A generate that writes no records (a dry run, batch files only) cannot feed a merge.
    for flag in ("dry_run", "batch_file_only"):
        with pytest.raises(ConfigError, match=rf"generate\.{flag}: expected false in a build"):
            from_mapping(BuildConfig, {"generate": {flag: True, "caption_model": "openai-batch:gpt-4o"}})
    with pytest.raises(ConfigError, match="generate.engine.offline"):
        from_mapping(BuildConfig, {"offline": False, "generate": {"engine": {"offline": True}}})
    # The engine's offline switch alone also makes the build offline.
    named = {"prepare": {"source": "d.jsonl"}, "generate": {"engine": {"offline": True}}}
    assert from_mapping(BuildConfig, named).offline


def test_every_config_loads_by_name_from_the_parent(quickstart_build, monkeypatch):
    dataset = quickstart_build["dataset"]
    monkeypatch.chdir(dataset.parent)
    for config in ALL_CONFIGS:
        ds = load_dataset("viscon", config)
        assert set(ds) == set(SPLITS), config
        assert ds["train"].num_rows > 0 and ds["test"].num_rows > 0, config
    default = load_dataset("viscon")
    assert default["train"].num_rows == load_dataset("viscon", "leaky")["train"].num_rows
    assert "messages" in default["train"].features and default["train"][0]["image"].size[0] > 0


def test_build_made_no_model_call_and_counts_everything(quickstart_build):
    report = quickstart_build["report"]
    assert report.stages["generate"]["engine"]["calls"] == 0
    assert report.stages["generate"]["engine"]["offline_misses"] == 0
    info = json.loads((quickstart_build["dataset"] / BUILD_INFO).read_text())
    assert info["rows"] == report.rows
    assert info["generation"]["caption_model"] == "openai:handwritten-example"
    assert info["dedup"]["contextual"]["fell_back"] is True  # UAE-Large-V1 cannot load offline
    assert "all-MiniLM-L6-v2" in info["dedup"]["contextual"]["model"]
    assert info["source"] == "viscon-hub:sample/obelics_sample.jsonl"
    assert str(quickstart_build["root"]) not in (quickstart_build["dataset"] / BUILD_INFO).read_text()


def test_config_invariants(quickstart_build):
    dataset = quickstart_build["dataset"]
    per_image = sum(len(rows(dataset, "contextual", s)) for s in SPLITS)
    for config in ALL_CONFIGS:
        all_rows = [r for s in SPLITS for r in rows(dataset, config, s)]
        ids = [r["id"] for r in all_rows]
        assert len(ids) == len(set(ids)), f"duplicate ids in {config}"
        mix = config_mix(config)
        for r in all_rows:
            assert r["image"]["bytes"], config
            if mix is None:
                for item in r["qa_multiple_choice"]:
                    assert item["answer"] in "ABCD" and len(item["answer"]) == 1 and len(item["options"]) == 4
                continue
            types = r["round_types"]
            assert len(r["messages"]) == 2 * len(types)
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * len(types)
            for kind, answer in zip(types, r["messages"][1::2], strict=True):
                if kind == "multiple_choice":
                    assert answer["content"] in {"A", "B", "C", "D"}
            if mix == "leaky":
                assert types[0] == "caption" and len(types) >= 2 and "caption" not in types[1:]
            if mix == "qa_only":
                assert "caption" not in types and types
            if mix == "captions_only":
                assert types == ["caption"]
        if mix == "split":
            by_image = {}
            for r in all_rows:
                by_image.setdefault(r["id"].rsplit("-", 1)[0], []).append(r["round_types"])
            assert all(len(v) == 2 for v in by_image.values())
            assert len(by_image) == per_image
        elif mix is not None:
            assert len(all_rows) == per_image


def test_no_page_in_both_splits_in_any_config(quickstart_build):
    dataset = quickstart_build["dataset"]
    train, test = set(), set()
    for config in ALL_CONFIGS:
        train |= {r["source_url"] for r in rows(dataset, config, "train")}
        test |= {r["source_url"] for r in rows(dataset, config, "test")}
    assert test and train and not (train & test)


def test_leaky_conversation_is_about_its_own_image(quickstart_build):
    dataset = quickstart_build["dataset"]
    contextual = {r["id"]: r for s in SPLITS for r in rows(dataset, "contextual", s)}
    for r in rows(dataset, "leaky", "train"):
        source = contextual[r["id"]]
        assert r["image_sha256"] == source["image_sha256"]
        assert r["messages"][1]["content"] == source["caption"]
        questions = {q["question"] for q in source["qa_freeform"]}
        assert any(m["content"] in questions for m in r["messages"][2::2]) or source["qa_multiple_choice"]


def test_rebuild_is_byte_identical_and_calls_nothing(quickstart_build, tmp_path):
    cfg = quickstart_build["config"]
    out = tmp_path / "again"
    report = write_dataset(
        generations=f"{cfg.work}/generations",
        output=str(out),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=f"{cfg.work}/contexts/images",
    )
    for mode in ("contextual", "non_contextual"):
        assert report.dedup[mode]["engine"]["calls"] == 0, "embeddings come from the cache the second time"
    first = quickstart_build["dataset"]
    for config in ALL_CONFIGS:
        for split in SPLITS:
            assert (first / data_path(config, split)).read_bytes() == (
                out / data_path(config, split)
            ).read_bytes()


def test_subset_of_configs_replaces_an_older_build(quickstart_build, tmp_path):
    cfg = quickstart_build["config"]
    out = tmp_path / "subset"
    shutil.copytree(quickstart_build["dataset"], out)
    write_dataset(
        generations=f"{cfg.work}/generations",
        output=str(out),
        merge=MergeConfig(configs=("leaky", "contextual")),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=f"{cfg.work}/contexts/images",
    )
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["contextual", "leaky"]
    assert "qa_only" not in (out / "README.md").read_text()


def test_builder_reads_the_same_rows_without_a_model(quickstart_build, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from builders.viscon import VisconBuilder

    cfg = quickstart_build["config"]
    builder = VisconBuilder(
        config_name="leaky",
        cache_dir=str(tmp_path / "hf"),
        generations=f"{cfg.work}/generations",
        cache=cfg.generate.cache,
        extra_caches=list(cfg.generate.extra_caches),
        image_store=f"{cfg.work}/contexts/images",
    )
    builder.download_and_prepare()
    built = builder.as_dataset(split="test")
    expected = rows(quickstart_build["dataset"], "leaky", "test")
    assert built.num_rows == len(expected)
    assert [r["messages"] for r in built] == [r["messages"] for r in expected]


def test_builder_refuses_to_embed(quickstart_build, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from builders.viscon import VisconBuilder

    cfg = quickstart_build["config"]
    builder = VisconBuilder(
        config_name="qa_only",
        cache_dir=str(tmp_path / "hf"),
        generations=f"{cfg.work}/generations",
        cache=str(tmp_path / "empty-cache"),
        extra_caches=list(cfg.generate.extra_caches),
        image_store=f"{cfg.work}/contexts/images",
    )
    with pytest.raises(Exception) as info:
        builder.download_and_prepare()
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("viscon build" in m for m in chain), chain


def test_missing_generations_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="viscon generate"):
        write_dataset(generations=str(tmp_path), output=str(tmp_path / "out"), cache=str(tmp_path / "c"))


@pytest.mark.slow
def test_cli_build_with_no_flags(tmp_path):
    import subprocess

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "viscon_hub", "build", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["calls"] == 0 and summary["rows"]["leaky"]["train"] > 0
    assert (tmp_path / "viscon" / "README.md").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "viscon_hub", "build", "--configs", "leaky,nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown config 'nope'" in bad.stderr


@pytest.mark.parametrize("fmt", ["llava", "idefics", "messages", "llamafactory"])
def test_exports_of_the_quickstart_build(quickstart_build, tmp_path, fmt):
    from viscon_hub.publish.exports import export
    from viscon_hub.publish.exports.llava import check_sample

    summary = export(
        dataset=str(quickstart_build["dataset"]), config="leaky", format=fmt, output=str(tmp_path)
    )
    expected = {s: len(rows(quickstart_build["dataset"], "leaky", s)) for s in SPLITS}
    assert summary["rows"] == expected
    if fmt == "llava":
        for split in SPLITS:
            samples = json.loads((tmp_path / f"leaky_{split}.json").read_text())
            assert all(check_sample(s, image_folder=tmp_path / "images") == [] for s in samples)


def test_build_info_is_the_same_for_a_cold_and_a_warm_build(quickstart_build, tmp_path):
    cfg = quickstart_build["config"]
    out = tmp_path / "warm"
    write_dataset(
        generations=f"{cfg.work}/generations",
        output=str(out),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=f"{cfg.work}/contexts/images",
        source="viscon-hub:sample/obelics_sample.jsonl",
        recipe=to_mapping(cfg, portable=True),
    )
    first = json.loads((quickstart_build["dataset"] / BUILD_INFO).read_text())
    assert json.loads((out / BUILD_INFO).read_text()) == first
    assert first["recipe"]["build"]["merge"]["configs"] == list(ALL_CONFIGS)
    usage = first["usage"]["handwritten-example"]
    assert usage["replies"] == 216 and usage["cost_usd"] == 0.0


def test_missing_images_and_dropped_records_are_counted_and_lose_nothing_else(quickstart_build, tmp_path):
    import pyarrow as pa

    cfg = quickstart_build["config"]
    gen = tmp_path / "generations"
    shutil.copytree(f"{cfg.work}/generations", gen)
    store = tmp_path / "images"
    shutil.copytree(f"{cfg.work}/contexts/images", store)
    path = gen / "generations" / "records.parquet"
    table = pq.read_table(path)
    records = table.to_pylist()
    contextual = [r for r in records if r["context_mode"] == "contextual"]
    gone, failed = contextual[0], contextual[1]
    failed["status"], failed["drop_reason"] = "dropped", "qa_freeform_missing_rounds"
    pq.write_table(pa.Table.from_pylist(records, schema=table.schema), path)
    blob = store / "blobs" / gone["image_sha256"][:2] / gone["image_sha256"]
    # Other records may share the image; every record with it is dropped, nothing else is.
    sharing = sum(r["image_sha256"] == gone["image_sha256"] for r in contextual if r is not failed)
    blob.unlink()

    report = write_dataset(
        generations=str(gen),
        output=str(tmp_path / "out"),
        merge=MergeConfig(configs=("contextual", "leaky")),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=str(store),
    )
    assert report.dropped["contextual"] == {"image_missing": sharing, "qa_freeform_missing_rounds": 1}
    expected = len(contextual) - sharing - 1
    assert sum(report.rows["contextual"].values()) == expected
    assert sum(report.rows["leaky"].values()) == expected
    info = json.loads((tmp_path / "out" / BUILD_INFO).read_text())
    assert info["dropped"]["merge"]["contextual"]["image_missing"] == sharing


@pytest.mark.slow
def test_a_build_in_chunks_of_seven_contexts_writes_the_same_bytes(quickstart_build, tmp_path, monkeypatch):
    from viscon_hub.build.driver import build
    from viscon_hub.generate.stages import GenerateConfig

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = BuildConfig(
        output=str(tmp_path / "viscon"),
        work_dir=str(tmp_path / "work"),
        generate=GenerateConfig(cache=str(tmp_path / "cache"), chunk_size=7),
    )
    report = build(config)
    assert report.stages["generate"]["records"] == 72 and report.stages["generate"]["contexts_read"] == 36

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    first = quickstart_build["root"]
    assert files(tmp_path / "viscon") == files(first / "viscon")
    # The intermediate records file too: the chunks leave no trace in it.
    records = "generations/generations/records.parquet"
    assert (tmp_path / "work" / records).read_bytes() == (first / "work" / records).read_bytes()
