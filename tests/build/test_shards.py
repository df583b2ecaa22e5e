"""Sharded builds (``--max-shard-size``) and records the merge cannot use."""

import json
import shutil
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from viscon_hub.build.driver import write_dataset
from viscon_hub.build.layout import ALL_CONFIGS, BUILD_INFO, SPLITS, data_files, parse_size
from viscon_hub.build.merge import MergeConfig
from viscon_hub.errors import ConfigError

REPO = "viscon-org/sharded"


def _sharded(quickstart_build, out, size="200KB"):
    cfg = quickstart_build["config"]
    return write_dataset(
        generations=f"{cfg.work}/generations",
        output=str(out),
        merge=replace(cfg.merge, configs=ALL_CONFIGS, max_shard_size=size),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        source="viscon-hub:sample/obelics_sample.jsonl",
    )


@pytest.fixture(scope="module")
def sharded(quickstart_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "viscon"
    report = _sharded(quickstart_build, out)
    return {"dataset": out, "report": report}


def test_every_config_is_several_shards_under_the_limit(sharded):
    root = sharded["dataset"]
    info = json.loads((root / BUILD_INFO).read_text())
    for config in ALL_CONFIGS:
        files = [f for s in SPLITS for f in data_files(root, config, s)]
        assert len(files) >= 3, (config, files)
        for s in SPLITS:
            names = data_files(root, config, s)
            assert names == [f"{config}/{s}-{i:05d}-of-{len(names):05d}.parquet" for i in range(len(names))]
            assert info["shards"][config][s] == len(names)
        for f in files:
            pf = pq.ParquetFile(root / f)
            # A shard holds at least one row group; a second one is added only while it fits.
            assert pf.metadata.num_row_groups == 1 or (root / f).stat().st_size <= 200_000 * 1.1, f
            assert all(pf.metadata.row_group(i).num_rows <= 100 for i in range(pf.metadata.num_row_groups))
    front = (root / "README.md").read_text()
    assert "path: leaky/train-*.parquet" in front


def test_sharded_configs_load_with_the_rows_of_an_unsharded_build(sharded, quickstart_build):
    assert sharded["report"].rows == quickstart_build["report"].rows
    for config in ALL_CONFIGS:
        ds = load_dataset(str(sharded["dataset"]), config)
        assert {s: ds[s].num_rows for s in SPLITS} == quickstart_build["report"].rows[config], config
    leaky = load_dataset(str(sharded["dataset"]), "leaky")["train"]
    unsharded = load_dataset(str(quickstart_build["dataset"]), "leaky")["train"]
    assert leaky["id"] == unsharded["id"] and leaky[0]["image"].size == unsharded[0]["image"].size


def test_sharded_rebuild_is_byte_identical(sharded, quickstart_build, tmp_path):
    again = tmp_path / "viscon"
    _sharded(quickstart_build, again)
    first = sorted(p.relative_to(sharded["dataset"]) for p in sharded["dataset"].rglob("*.parquet"))
    second = sorted(p.relative_to(again) for p in again.rglob("*.parquet"))
    assert first == second
    for rel in first:
        assert (sharded["dataset"] / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_exports_stats_and_card_read_every_shard(sharded, quickstart_build, tmp_path):
    from viscon_hub.publish.card import write_card
    from viscon_hub.publish.exports import export
    from viscon_hub.publish.stats import compute_stats

    root = tmp_path / "viscon"
    shutil.copytree(sharded["dataset"], root)
    rows = quickstart_build["report"].rows
    for fmt in ("llava", "messages"):
        summary = export(dataset=str(root), config="leaky", format=fmt, output=str(tmp_path / fmt))
        assert summary["rows"] == rows["leaky"], fmt
    stats = compute_stats(root)
    assert {c: {s: v[s] for s in SPLITS} for c, v in stats["configs"].items()} == rows
    write_card(root, repo_id=REPO)
    card = (root / "README.md").read_text()
    assert "path: contextual/test-*.parquet" in card
    ds = load_dataset(str(root), "split")
    assert {s: ds[s].num_rows for s in SPLITS} == rows["split"]


def test_push_uploads_every_shard_and_the_hub_loads_them(sharded, quickstart_build, hub_server, tmp_path):
    from viscon_hub.publish.card import write_card
    from viscon_hub.publish.hub import push

    root = tmp_path / "viscon"
    shutil.copytree(sharded["dataset"], root)
    write_card(root, repo_id=REPO)
    push(dataset=root, repo=REPO)
    remote = hub_server.files(REPO, "main")
    local = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))
    assert [p for p in sorted(remote) if p.endswith(".parquet")] == local
    ds = load_dataset(REPO, "leaky")
    assert {s: ds[s].num_rows for s in SPLITS} == quickstart_build["report"].rows["leaky"]


def test_a_missing_shard_stops_a_push(sharded, tmp_path):
    from viscon_hub.publish.hub import stage_push

    root = tmp_path / "viscon"
    shutil.copytree(sharded["dataset"], root)
    (root / data_files(root, "leaky", "train")[1]).unlink()
    with pytest.raises(ConfigError, match="leaky/train"):
        stage_push(root, tmp_path / "staging", repo=REPO)


def test_shard_sizes_are_read_or_refused():
    assert parse_size("200KB") == 200_000 and parse_size(" 2 MiB ") == 2 * 2**20 and parse_size(1234) == 1234
    for bad in ("", "12 parsecs", "-5MB", "0", "MB"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_unusable_records_are_counted_drops_and_lose_nothing_else(quickstart_build, tmp_path):
    cfg = quickstart_build["config"]
    gen = tmp_path / "generations"
    shutil.copytree(f"{cfg.work}/generations", gen)
    path = gen / "generations" / "records.parquet"
    table = pq.read_table(path)
    records = table.to_pylist()
    contextual = [r for r in records if r["context_mode"] == "contextual"]
    bad_mc, bad_sha, no_id = contextual[0], contextual[1], contextual[2]
    bad_mc["qa_multiple_choice"] = [{"question": "Which?", "options": ["a", "b", "c"], "answer": "Z"}]
    bad_sha["image_sha256"] = "../../etc/passwd"
    no_id["id"] = ""
    pq.write_table(pa.Table.from_pylist(records, schema=table.schema), path)

    report = write_dataset(
        generations=str(gen),
        output=str(tmp_path / "out"),
        merge=MergeConfig(configs=("contextual", "leaky")),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=f"{cfg.work}/contexts/images",
    )
    assert report.dropped["contextual"] == {"unreadable_record": 2, "image_missing": 1}
    expected = len(contextual) - 3
    assert sum(report.rows["contextual"].values()) == expected
    assert sum(report.rows["leaky"].values()) == expected


def test_an_unreadable_row_group_is_counted_and_the_others_are_merged(quickstart_build, tmp_path):
    cfg = quickstart_build["config"]
    gen = tmp_path / "generations"
    shutil.copytree(f"{cfg.work}/generations", gen)
    path = gen / "generations" / "records.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=8, compression="none")
    meta = pq.ParquetFile(path).metadata
    # Overwrite the middle of the second row group's first column chunk with garbage.
    col = meta.row_group(1).column(0)
    start = col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
    lost = meta.row_group(1).num_rows

    report = write_dataset(
        generations=str(gen),
        output=str(tmp_path / "out"),
        merge=MergeConfig(configs=("contextual", "non_contextual")),
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=f"{cfg.work}/contexts/images",
    )
    assert report.dropped["records"] == {"unreadable_row_group": lost}
    ok = sum(r["status"] == "ok" for r in table.to_pylist())
    assert sum(sum(v.values()) for v in report.rows.values()) == ok - lost
