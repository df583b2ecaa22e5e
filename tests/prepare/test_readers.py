import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import good_row, write_jsonl
from viscon_hub.errors import ConfigError, SourceError
from viscon_hub.prepare.readers import SAMPLE_PATH, read_rows, resolve_source


def write_parquet(path, rows):
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("images", pa.list_(pa.string())),
                ("metadata", pa.string()),
                ("general_metadata", pa.string()),
                ("texts", pa.list_(pa.string())),
            ]
        ),
    )
    pq.write_table(table, path)
    return path


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_parquet(folder / "a.parquet", [good_row(i) for i in range(0, 5)])
    write_jsonl(folder / "b.jsonl", [good_row(i) for i in range(5, 9)])
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        for i in range(9, 12):
            f.write(json.dumps(good_row(i)) + "\n")
    return folder


def urls(rows):
    return [json.loads(r.data["general_metadata"])["url"] for r in rows]


def test_folder_of_parquet_jsonl_and_gzip(corpus):
    rows = list(read_rows(str(corpus)))
    assert urls(rows) == [f"https://example.org/page-{i}" for i in range(12)]
    assert rows[0].source.endswith("a.parquet") and rows[0].row == 0
    assert rows[5].source.endswith("b.jsonl") and rows[5].base == str(corpus)


def test_glob_and_single_file_and_fsspec_url(corpus):
    assert len(list(read_rows(str(corpus / "*.jsonl*")))) == 7
    assert len(list(read_rows(str(corpus / "a.parquet")))) == 5
    assert len(list(read_rows(f"file://{corpus}/b.jsonl"))) == 4


def test_memory_filesystem_url():
    import fsspec

    with fsspec.open("memory://corpus/x.jsonl", "w") as f:
        f.write(json.dumps(good_row(1)) + "\n")
    rows = list(read_rows("memory://corpus/x.jsonl"))
    assert len(rows) == 1 and rows[0].source == "memory:///corpus/x.jsonl"


def test_limit(corpus):
    assert len(list(read_rows(str(corpus), limit=3))) == 3
    assert list(read_rows(str(corpus), limit=0)) == []


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_shards_are_disjoint_and_cover_everything(corpus, num_shards):
    seen = []
    for i in range(num_shards):
        seen.extend(urls(read_rows(str(corpus), num_shards=num_shards, shard_index=i)))
    assert sorted(seen) == sorted(urls(read_rows(str(corpus))))


def test_bad_sharding_flags(corpus):
    with pytest.raises(ConfigError, match="--shard-index"):
        list(read_rows(str(corpus), num_shards=2, shard_index=2))
    with pytest.raises(ConfigError, match="--num-shards"):
        list(read_rows(str(corpus), num_shards=0))


def test_undecodable_lines_are_yielded_as_errors(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [good_row(0), "{broken", "[1, 2]", good_row(1)])
    rows = list(read_rows(str(path)))
    assert [r.error.split(":")[0] if r.error else None for r in rows] == [
        None,
        "invalid_json",
        "not_a_mapping",
        None,
    ]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no OBELICS files"):
        list(read_rows(str(tmp_path / "nothing-here.parquet")))


def test_source_resolution():
    assert resolve_source(None).files == (str(SAMPLE_PATH),)
    assert resolve_source("HuggingFaceM4/OBELICS").kind == "hub"
    assert resolve_source("hub:some/local-folder").kind == "hub"
    with pytest.raises(ConfigError):
        resolve_source("  ")


def test_hub_streaming_reader_with_datasets(corpus, tmp_path):
    # The datasets streaming path, on a local dataset folder (no Hub is reachable in tests).
    folder = tmp_path / "hubds" / "data"
    folder.mkdir(parents=True)
    write_parquet(folder / "train-00000-of-00002.parquet", [good_row(i) for i in range(0, 6)])
    write_parquet(folder / "train-00001-of-00002.parquet", [good_row(i) for i in range(6, 10)])
    rows = list(read_rows(f"hub:{tmp_path / 'hubds'}"))
    assert sorted(urls(rows)) == sorted(f"https://example.org/page-{i}" for i in range(10))
    assert rows[0].source.startswith("hub:")
    halves = [urls(read_rows(f"hub:{tmp_path / 'hubds'}", num_shards=2, shard_index=i)) for i in range(2)]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(urls(rows))
    assert len(list(read_rows(f"hub:{tmp_path / 'hubds'}", limit=4))) == 4


def _flaky_parquet(monkeypatch, *, fail_at: int, times: int):
    """Make the datasets Parquet reader raise ConnectionError at its ``fail_at``-th table, ``times`` times."""
    import importlib

    module = importlib.import_module("datasets.packaged_modules.parquet.parquet")
    original = module.Parquet._generate_tables
    seen = {"tables": 0, "failed": 0}

    def flaky(self, *args, **kwargs):
        for item in original(self, *args, **kwargs):
            seen["tables"] += 1
            if seen["tables"] == fail_at and seen["failed"] < times:
                seen["failed"] += 1
                seen["tables"] -= 1
                raise ConnectionError("connection reset by peer")
            yield item

    monkeypatch.setattr(module.Parquet, "_generate_tables", flaky)
    return seen


def _hub_folder(tmp_path):
    folder = tmp_path / "hubds" / "data"
    folder.mkdir(parents=True)
    for part, rows in enumerate((range(0, 6), range(6, 10))):
        write_parquet(folder / f"train-0000{part}-of-00002.parquet", [good_row(i) for i in rows])
    return f"hub:{tmp_path / 'hubds'}"


def test_a_broken_hub_stream_resumes_where_it_stopped(tmp_path, monkeypatch):
    from viscon_hub.prepare import readers
    from viscon_hub.retry import Backoff

    monkeypatch.setattr(readers, "HUB_STREAM_BACKOFF", Backoff(base_s=0.0, max_s=0.0, max_attempts=3))
    source = _hub_folder(tmp_path)
    expected = urls(read_rows(source))
    seen = _flaky_parquet(monkeypatch, fail_at=2, times=2)  # the second file breaks, twice
    rows = list(read_rows(source))
    assert seen["failed"] == 2
    assert urls(rows) == expected, "every row once, in order, after two resumptions"
    assert [r.row for r in rows] == list(range(10))


def test_a_hub_stream_that_keeps_breaking_is_one_clear_error(tmp_path, monkeypatch):
    from viscon_hub.errors import SourceError
    from viscon_hub.prepare import readers
    from viscon_hub.retry import Backoff

    monkeypatch.setattr(readers, "HUB_STREAM_BACKOFF", Backoff(base_s=0.0, max_s=0.0, max_attempts=3))
    source = _hub_folder(tmp_path)
    _flaky_parquet(monkeypatch, fail_at=2, times=99)
    got = []
    with pytest.raises(SourceError, match=r"failed after row 6 and 3 attempts: connection reset.*run again"):
        got.extend(read_rows(source))
    assert len(got) == 6, "the rows read before the break were handed out once"
