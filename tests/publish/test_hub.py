"""Round trips through the real huggingface_hub and datasets clients, against a local Hub-protocol server."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from viscon_hub.build.layout import ALL_CONFIGS, MIXES, SPLITS
from viscon_hub.cli import main
from viscon_hub.errors import ConfigError
from viscon_hub.publish.hub import MAX_FILES_PER_COMMIT, cache_pull, cache_push, push, release

REPO = "viscon-org/viscon"


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr("viscon_hub.publish.hub.BACKOFF_BASE_S", 0.01)


@pytest.fixture
def dataset(quickstart_build, tmp_path):
    """A private copy of the quickstart build, with its card."""
    from viscon_hub.publish.card import write_card

    folder = tmp_path / "viscon"
    shutil.copytree(quickstart_build["dataset"], folder)
    write_card(folder, repo_id=REPO)
    return folder


def _load(repo, config, **kwargs):
    from datasets import load_dataset

    return load_dataset(repo, config, **kwargs)


def test_push_then_every_config_loads_from_the_hub(hub_server, dataset):
    report = push(dataset=dataset, repo=REPO)
    files = len(report.added)
    assert files > 20 and not report.deleted
    assert len(report.commits) == math.ceil(files / MAX_FILES_PER_COMMIT)
    local = {
        c: {s: _load(str(dataset), c)[s].num_rows for s in SPLITS} for c in ("leaky", "contextual", "split")
    }
    for config in ALL_CONFIGS:
        ds = _load(REPO, config)
        assert set(ds) == set(SPLITS), config
        if config in local:
            assert {s: ds[s].num_rows for s in SPLITS} == local[config]
    leaky = _load(REPO, "leaky")["train"][0]
    assert leaky["image"].size[0] > 0 and leaky["round_types"][0] == "caption"
    default = _load(REPO, None)
    assert default["train"].num_rows == local["leaky"]["train"]
    remote = hub_server.files(REPO, "main")
    assert "README.md" in remote and any(p.startswith("plots/") and p.endswith(".png") for p in remote)


def test_pushing_the_same_data_again_changes_nothing(hub_server, dataset):
    first = push(dataset=dataset, repo=REPO)
    commits = len(hub_server.commits(REPO, "main"))
    again = push(dataset=dataset, repo=REPO)
    assert again.commits == [] and again.added == [] and again.unchanged == len(first.added)
    assert len(hub_server.commits(REPO, "main")) == commits


def test_push_to_a_branch_and_private_repo(hub_server, dataset):
    report = push(dataset=dataset, repo="viscon-org/private", revision="draft", private=True)
    assert report.commits
    ds = _load("viscon-org/private", "qa_only", revision="draft")
    assert ds["train"].num_rows > 0


def test_commits_retry_429_and_412(hub_server, dataset):
    hub_server.set_faults(["429", "412"])
    report = push(dataset=dataset, repo=REPO)
    assert report.retries >= 2 and report.commits
    assert _load(REPO, "leaky")["train"].num_rows > 0


def test_release_tags_the_revision_and_refuses_an_existing_version(hub_server, dataset, capsys):
    plan = release(dataset=dataset, repo=REPO, version="1.0.0", dry_run=True)
    assert plan.dry_run and plan.added and not plan.commits and plan.tag == "v1.0.0"
    assert hub_server.commits(REPO, "main") in ([], None) or not hub_server.files(REPO, "main")
    report = release(dataset=dataset, repo=REPO, version="1.0.0")
    assert report.tag == "v1.0.0"
    tagged = _load(REPO, "leaky", revision="v1.0.0")
    assert tagged["test"].num_rows > 0
    with pytest.raises(ConfigError, match="already has a release v1.0.0"):
        release(dataset=dataset, repo=REPO, version="1.0.0")
    assert main(["release", "--dataset", str(dataset), "--repo", REPO, "--version", "1.0.0"]) == 2
    assert "already has a release" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="X.Y.Z"):
        release(dataset=dataset, repo=REPO, version="latest")


def test_push_with_idefics_and_llava_exports(hub_server, dataset):
    push(dataset=dataset, repo=REPO, formats=("idefics", "llava"))
    for mix in MIXES:
        ds = _load(REPO, f"{mix}_idefics")
        row = ds["train"][0]
        assert row["images"] and all("<image>" not in t["user"] for t in row["texts"])
    remote = hub_server.files(REPO, "main")
    assert "llava/leaky/images.tar" in remote and "llava/leaky/leaky_train.json" in remote
    samples = json.loads(remote["llava/leaky/leaky_train.json"])
    assert samples[0]["conversations"][0]["value"].startswith("<image>\n")
    readme = remote["README.md"].decode()
    assert "leaky_idefics" in readme and "images.tar" in readme
    with pytest.raises(ConfigError, match="--formats"):
        push(dataset=dataset, repo=REPO, formats=("parquet",))


def test_push_uploads_idefics_shards_and_a_later_push_removes_stale_ones(hub_server, dataset):
    flags = ["--formats", "idefics", "--max-shard-size", "200KB"]
    assert main(["push", "--dataset", str(dataset), "--repo", REPO, *flags]) == 0
    remote = hub_server.files(REPO, "main")
    sharded = sorted(p for p in remote if p.startswith("leaky_idefics/"))
    train = [p for p in sharded if p.startswith("leaky_idefics/train-")]
    assert len(train) >= 3 and train[-1].endswith(f"-of-{len(train):05d}.parquet")
    readme = remote["README.md"].decode()
    assert "path: leaky_idefics/train-*.parquet" in readme
    ds = _load(REPO, "leaky_idefics")
    local = _load(str(dataset), "leaky")
    assert {s: ds[s].num_rows for s in ds} == {s: local[s].num_rows for s in SPLITS}
    assert ds["train"][0]["images"][0].size == local["train"][0]["image"].size
    # One shard per split now: the shards of the first push are deleted, not left beside them.
    again = push(dataset=dataset, repo=REPO, formats=("idefics",))
    remote = hub_server.files(REPO, "main")
    assert sorted(p for p in remote if p.startswith("leaky_idefics/")) == [
        "leaky_idefics/test-00000-of-00001.parquet",
        "leaky_idefics/train-00000-of-00001.parquet",
    ]
    assert set(sharded) - set(remote) <= set(again.deleted)
    assert _load(REPO, "leaky_idefics")["train"].num_rows == local["train"].num_rows


def test_cache_round_trip_rebuilds_with_zero_calls(hub_server, quickstart_build, tmp_path, monkeypatch):
    from viscon_hub.build.driver import BuildConfig, build
    from viscon_hub.build.merge import MergeConfig
    from viscon_hub.generate.stages import GenerateConfig
    from viscon_hub.resources import BUNDLED_CACHE

    # A cache that holds real entries: the generations of the quickstart, as a team would have made them.
    made = tmp_path / "made-cache"
    shutil.copytree(BUNDLED_CACHE, made)
    shutil.copytree(
        Path(quickstart_build["config"].generate.cache) / "shards", made / "shards", dirs_exist_ok=True
    )
    pushed = cache_push(cache=str(made), repo="viscon-org/cache")
    assert pushed.commits and len(pushed.added) == len(list((made / "shards").glob("*.parquet")))
    assert cache_push(cache=str(made), repo="viscon-org/cache").commits == []

    pulled = tmp_path / "pulled"
    counts = cache_pull(cache=str(pulled), repo="viscon-org/cache")
    assert counts["shards_pulled"] == len(pushed.added)
    assert cache_pull(cache=str(pulled), repo="viscon-org/cache")["shards_pulled"] == 0

    def rebuild(cache: str, extra: tuple[str, ...], name: str):
        config = BuildConfig(
            generate=GenerateConfig(
                caption_model="openai:handwritten-example",
                qa_model="openai:handwritten-example",
                cache=cache,
                extra_caches=extra,
            ),
            merge=MergeConfig(configs=ALL_CONFIGS),  # naming models makes a real run: contextual,leaky
            offline=True,
            output=str(tmp_path / name),
            work_dir=str(tmp_path / f"{name}-work"),
        )
        return build(config)

    report = rebuild(str(pulled), (), "from-pulled")
    engine = report.stages["generate"]["engine"]
    assert engine["calls"] == 0 and engine["offline_misses"] == 0 and engine["cache_hits"] == 216
    assert all(d["engine"]["calls"] == 0 for d in report.dedup.values()), "embeddings came with the cache"
    first = quickstart_build["dataset"] / "leaky" / "train-00000-of-00001.parquet"
    assert (
        tmp_path / "from-pulled" / "leaky" / "train-00000-of-00001.parquet"
    ).read_bytes() == first.read_bytes()

    # The engine also reads a cache straight from the Hub.
    direct = rebuild(str(tmp_path / "empty-cache"), ("hf://datasets/viscon-org/cache",), "from-hf")
    assert direct.stages["generate"]["engine"]["offline_misses"] == 0
    assert direct.stages["generate"]["engine"]["calls"] == 0


def test_no_token_in_logs_cards_or_errors(hub_server, dataset, caplog, capsys, tmp_path):
    import os

    token = os.environ["HF_TOKEN"]
    caplog.set_level(logging.DEBUG)
    assert main(["push", "--dataset", str(dataset), "--repo", REPO]) == 0
    hub_server.set_faults(["500"] * 10)
    assert main(["push", "--dataset", str(dataset), "--repo", "viscon-org/other"]) == 2
    out = capsys.readouterr()
    texts = [out.out, out.err, caplog.text]
    texts += [p.read_text(errors="ignore") for p in dataset.rglob("*") if p.suffix in (".md", ".json")]
    texts += [v.decode(errors="ignore") for v in hub_server.files(REPO, "main").values()]
    assert not any(token in t for t in texts)
    assert "error" in out.err


def test_bad_repo_and_incomplete_dataset(hub_server, tmp_path):
    with pytest.raises(ConfigError, match="ORG/NAME"):
        push(dataset=tmp_path, repo="no-slash")
    with pytest.raises(ConfigError, match="viscon build"):
        push(dataset=tmp_path, repo=REPO)


def test_cache_cli(hub_server, tmp_path, capsys):
    from viscon_hub.resources import BUNDLED_CACHE

    cache = tmp_path / "cache"
    shutil.copytree(BUNDLED_CACHE, cache)
    assert main(["cache", "push", "--cache", str(cache), "--repo", "viscon-org/c"]) == 0
    assert json.loads(capsys.readouterr().out)["commits"] == 1
    assert main(["cache", "pull", "--cache", str(tmp_path / "pulled"), "--repo", "viscon-org/c"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_pulled"] == 1
    assert main(["cache", "push", "--cache", str(tmp_path / "missing"), "--repo", "viscon-org/c"]) == 2
    assert "not a local cache folder" in capsys.readouterr().err


def test_module_level_client_helpers_reach_the_local_hub(hub_server):
    from huggingface_hub import DatasetCard, create_repo

    create_repo("viscon-org/card-only", repo_type="dataset")
    DatasetCard("---\nlicense: mit\n---\n\n# card\n").push_to_hub("viscon-org/card-only")
    assert b"license: mit" in hub_server.files("viscon-org/card-only")["README.md"]
