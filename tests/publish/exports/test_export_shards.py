"""Parquet exports as shards of at most --max-shard-size: names, loading, atomic reruns, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from viscon_hub.build.layout import SPLITS, shard_files, shard_name
from viscon_hub.errors import ConfigError
from viscon_hub.publish.exports import PARQUET_FORMATS, export

SMALL = "60KB"  # a few quickstart images per shard: several shards per split
CONFIG_OF = {"idefics": "leaky", "messages": "leaky", "captioner": "contextual"}


def folder_of(fmt: str) -> str:
    return f"{CONFIG_OF[fmt]}_{fmt}"


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def load_folder(folder: Path):
    from datasets import load_dataset

    return load_dataset(str(folder))


def arrow_rows(ds) -> list[dict]:
    """The stored rows (image bytes, not decoded images), to compare two loads exactly."""
    return ds.with_format("arrow")[:].to_pylist()


@pytest.fixture(scope="module")
def dataset(quickstart_build) -> Path:
    return quickstart_build["dataset"]


@pytest.fixture(scope="module")
def one_shard(dataset, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each Parquet format exported with the default shard size (one shard per split here)."""
    out = tmp_path_factory.mktemp("one")
    return {
        fmt: (out / fmt, export(dataset=dataset, config=CONFIG_OF[fmt], format=fmt, output=out / fmt))
        for fmt in PARQUET_FORMATS
    }


@pytest.mark.parametrize("fmt", PARQUET_FORMATS)
def test_a_small_size_gives_several_shards_that_load_as_one(dataset, one_shard, tmp_path, fmt):
    whole_out, whole = one_shard[fmt]
    name = folder_of(fmt)
    assert whole["files"] == [f"{name}/{shard_name(s)}" for s in ("test", "train")]

    out = tmp_path / fmt
    summary = export(dataset=dataset, config=CONFIG_OF[fmt], format=fmt, output=out, max_shard_size=SMALL)
    assert summary["rows"] == whole["rows"] and summary["skipped"] == whole["skipped"]
    # The summary names every file written, and nothing else is left in the output.
    assert summary["files"] == files_under(out)
    for split in SPLITS:
        names = shard_files(out / name, split)
        assert names == [shard_name(split, i, len(names)) for i in range(len(names))]
        if summary["rows"][split] > 1:
            assert len(names) > 1, (split, names)
        for n in names:
            # A shard closes before a row group would take it past the size; one group may be alone.
            pf = pq.ParquetFile(out / name / n)
            assert pf.metadata.num_row_groups == 1 or (out / name / n).stat().st_size <= 60_000 * 1.1, n
    assert len(shard_files(out / name, "train")) >= 3

    from datasets import Image, List

    sharded, single = load_folder(out / name), load_folder(whole_out / name)
    assert set(sharded) == set(single) == {s for s in SPLITS if summary["rows"][s]}
    for split in sharded:
        assert sharded[split].features["images"] == List(Image())
        assert sharded[split].num_rows == summary["rows"][split]
        assert arrow_rows(sharded[split]) == arrow_rows(single[split])  # same rows, same order
    assert sharded["train"][0]["images"][0].size[0] > 0


def test_rerunning_replaces_every_older_shard(dataset, tmp_path):
    out, name = tmp_path / "idefics", "leaky_idefics"
    many = export(dataset=dataset, config="leaky", format="idefics", output=out, max_shard_size=SMALL)
    assert len(shard_files(out / name, "train")) >= 3
    # Fewer, larger shards: no "-of-" file of the first run survives.
    one = export(dataset=dataset, config="leaky", format="idefics", output=out)
    assert files_under(out) == one["files"] == [f"{name}/{shard_name(s)}" for s in ("test", "train")]
    # And back: the single files are replaced by the shards.
    again = export(dataset=dataset, config="leaky", format="idefics", output=out, max_shard_size=SMALL)
    assert files_under(out) == again["files"] == many["files"]


def test_one_split_rerun_keeps_the_other_splits_shards(dataset, tmp_path):
    out, name = tmp_path / "messages", "leaky_messages"
    export(dataset=dataset, config="leaky", format="messages", output=out, max_shard_size=SMALL)
    train = shard_files(out / name, "train")
    train_bytes = {n: (out / name / n).read_bytes() for n in train}
    summary = export(dataset=dataset, config="leaky", format="messages", output=out, split="test")
    assert summary["files"] == [f"{name}/{shard_name('test')}"]
    assert shard_files(out / name, "test") == [shard_name("test")]
    assert {n: (out / name / n).read_bytes() for n in shard_files(out / name, "train")} == train_bytes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_failed_export_leaves_the_previous_one_whole(dataset, tmp_path, monkeypatch):
    from viscon_hub.publish.exports import idefics

    out, name = tmp_path / "idefics", "leaky_idefics"
    export(dataset=dataset, config="leaky", format="idefics", output=out)
    before = {f: (out / f).read_bytes() for f in files_under(out)}
    calls = {"n": 0}
    real = idefics.to_row

    def failing(row, *, source):
        calls["n"] += 1
        if calls["n"] > 25:  # after several shards of the new run were written
            raise RuntimeError("killed")
        return real(row, source=source)

    monkeypatch.setattr(idefics, "to_row", failing)
    with pytest.raises(RuntimeError, match="killed"):
        export(dataset=dataset, config="leaky", format="idefics", output=out, max_shard_size=SMALL)
    assert {f: (out / f).read_bytes() for f in files_under(out)} == before
    assert [p.name for p in out.iterdir()] == [name]  # no staging folder left behind


def test_what_a_killed_export_left_is_cleared_by_the_next(dataset, tmp_path):
    out, name = tmp_path / "captioner", "contextual_captioner"
    # A process killed mid-export (no cleanup ran): a partial shard in staging, the old folder moved aside.
    (out / f".{name}.staging" / name).mkdir(parents=True)
    (out / f".{name}.staging" / name / "train-00003.partial").write_bytes(b"PAR1 half")
    (out / f".{name}.old").mkdir()
    (out / f".{name}.old" / shard_name("train", 0, 7)).write_bytes(b"old")
    summary = export(
        dataset=dataset, config="contextual", format="captioner", output=out, max_shard_size=SMALL
    )
    assert files_under(out) == summary["files"] and all(f.startswith(f"{name}/") for f in summary["files"])


def test_json_exports_stay_one_file_per_split(dataset, tmp_path):
    summary = export(dataset=dataset, config="leaky", format="llava", output=tmp_path, max_shard_size="1KB")
    assert [f for f in summary["files"] if f.endswith(".json")] == ["leaky_test.json", "leaky_train.json"]


@pytest.mark.parametrize("bad", ["ten", "0", "-5MB", "12 parsecs", 0])
def test_a_bad_size_is_refused_before_anything_is_written(dataset, tmp_path, bad):
    with pytest.raises(ConfigError, match="size"):
        export(dataset=dataset, config="leaky", format="idefics", output=tmp_path / "x", max_shard_size=bad)
    assert not (tmp_path / "x").exists()


def test_cli_max_shard_size(dataset, tmp_path, capsys):
    from viscon_hub.cli import main

    argv = ["export", "--dataset", str(dataset), "--config", "leaky", "--format", "messages"]
    assert main([*argv, "--output", str(tmp_path / "a"), "--max-shard-size", SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len([f for f in summary["files"] if "/train-" in f]) >= 3
    assert files_under(tmp_path / "a") == summary["files"]
    assert main([*argv, "--output", str(tmp_path / "b"), "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the size 'lots'" in err and "500MB" in err
    assert not (tmp_path / "b").exists()
    shutil.rmtree(tmp_path / "a")
