"""`viscon generate` in chunks: contexts read a chunk at a time, records streamed to one file.

However the contexts are chunked or sharded, the records file holds the bytes of one write of every
record, and the counts are those of one pass.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.generate.conftest import generate_config
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import ConfigError
from viscon_hub.generate import stages
from viscon_hub.generate.stages import (
    GenerateConfig,
    context_share,
    count_contexts,
    generate,
    iter_contexts,
    read_contexts,
    read_generations,
    shard_slice,
)
from viscon_hub.records import IMAGE_CONTEXT_SCHEMA

pytest.importorskip("openai")

# Figures of the run, not of the data: they may differ between any two runs.
RUN_FIGURES = ("elapsed_s",)


def config(contexts, server, out, **kw):
    kw.setdefault("context", "both")
    return generate_config(contexts, server, out, **kw)


def summary(out) -> dict:
    stats = json.loads((out / "gen" / "stats.json").read_text())
    for name in RUN_FIGURES:
        stats.pop(name)
        stats["engine"].pop(name)
    return stats


def records_bytes(out) -> bytes:
    return (out / "gen" / "generations" / "records.parquet").read_bytes()


def test_chunks_of_seven_write_the_bytes_and_counts_of_the_default(contexts, server, tmp_path):
    # Fresh caches: every chunk calls the server, so the engine's counts are summed over chunks.
    whole = generate(config(contexts, server, tmp_path / "whole"))
    chunked = generate(config(contexts, server, tmp_path / "chunked", chunk_size=7))
    assert whole.records == chunked.records == 72 and chunked.contexts_read == 36
    assert records_bytes(tmp_path / "chunked") == records_bytes(tmp_path / "whole")
    assert summary(tmp_path / "chunked") == summary(tmp_path / "whole")
    assert chunked.engine["calls"] == 216
    rows = pq.read_table(tmp_path / "chunked" / "gen" / "generations" / "records.parquet")
    modes = rows.column("context_mode").to_pylist()
    assert modes == ["contextual"] * 36 + ["non_contextual"] * 36, "one mode's records, then the next's"
    # Nothing staged is left beside the file.
    assert [p.name for p in (tmp_path / "chunked" / "gen" / "generations").iterdir()] == ["records.parquet"]


def test_row_groups_are_cut_as_one_write_would_cut_them(contexts, server, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "RECORDS_ROW_GROUP", 10)
    generate(config(contexts, server, tmp_path, chunk_size=7, limit=23))
    path = tmp_path / "gen" / "generations" / "records.parquet"
    meta = pq.ParquetFile(path).metadata
    # 23 contextual records then 23 non-contextual: groups run across the chunks and the modes.
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 10, 10, 10, 6]
    # The bytes of writing every record at once, as generate did before it streamed.
    table = pa.Table.from_pylist(pq.read_table(path).to_pylist(), schema=stages.GENERATION_SCHEMA)
    again = tmp_path / "again.parquet"
    pq.write_table(table, again, compression="zstd", row_group_size=10)
    assert path.read_bytes() == again.read_bytes()


def test_shards_in_chunks_concatenate_to_one_run(contexts, server, tmp_path):
    generate(config(contexts, server, tmp_path / "one"))
    for i in range(3):
        generate(config(contexts, server, tmp_path / "sharded", chunk_size=5, num_shards=3, shard_index=i))
    one = read_generations(str(tmp_path / "one" / "gen"))
    sharded = read_generations(str(tmp_path / "sharded" / "gen"))
    assert one.num_rows == 72 and sharded.equals(one)
    stats = json.loads((tmp_path / "sharded" / "gen" / "stats.json").read_text())
    assert stats["contexts_read"] == 36 and stats["records"] == 72 and stats["records_ok"] == 72


def test_limit_is_the_first_contexts_whatever_the_chunks(contexts, server, tmp_path):
    stats = generate(config(contexts, server, tmp_path, chunk_size=4, limit=9, context="contextual"))
    assert stats.contexts_read == 9 and stats.records == 9
    ids = pq.read_table(tmp_path / "gen" / "generations" / "records.parquet").column("id").to_pylist()
    assert ids == [c.id for c in read_contexts(contexts)[:9]]


def test_a_dry_run_in_chunks_plans_what_one_pass_plans(contexts, server, tmp_path):
    # Some captions cached, some not: both the cached counts and the pending Q&A are summed.
    generate(config(contexts, server, tmp_path, limit=10))
    whole = generate(config(contexts, server, tmp_path, dry_run=True)).plan
    chunked = generate(config(contexts, server, tmp_path, dry_run=True, chunk_size=3)).plan
    assert chunked == whole
    assert whole["contextual/caption"]["cached"] == 10 and whole["contextual/caption"]["to_call"] == 26
    assert whole["contextual/qa"]["pending_on_uncached_captions"] == 52


def test_an_empty_share_writes_an_empty_file(contexts, server, tmp_path):
    stats = generate(config(contexts, server, tmp_path, limit=0, engine=EngineConfig(offline=True)))
    assert stats.contexts_read == 0 and stats.records == 0
    table = pq.read_table(tmp_path / "gen" / "generations" / "records.parquet")
    assert table.num_rows == 0 and table.schema.equals(stages.GENERATION_SCHEMA)


def test_bad_chunk_size(contexts, tmp_path):
    with pytest.raises(ConfigError, match="--chunk-size must be >= 1; got 0"):
        GenerateConfig(contexts=contexts, output=str(tmp_path), chunk_size=0)


def _context_rows(start: int, n: int) -> pa.Table:
    rows = [
        {
            "id": f"c{i:04d}",
            "document_id": f"d{i // 3}",
            "image_index": i % 3,
            "context": f"text {i}",
            "context_tokens": 2,
        }
        for i in range(start, start + n)
    ]
    return pa.Table.from_pylist(rows, schema=IMAGE_CONTEXT_SCHEMA)


@pytest.fixture(scope="module")
def many_parts(tmp_path_factory):
    """Three context files of uneven row groups (and one empty file), 47 contexts in all."""
    root = tmp_path_factory.mktemp("parts")
    (root / "contexts").mkdir()
    at = 0
    for name, groups in (("part-a", [5, 1, 9]), ("part-b", []), ("part-c", [13]), ("part-d", [4, 4, 11])):
        with pq.ParquetWriter(root / "contexts" / f"{name}.parquet", IMAGE_CONTEXT_SCHEMA) as writer:
            for n in groups:
                writer.write_table(_context_rows(at, n))
                at += n
    return str(root)


@pytest.mark.parametrize("limit", [None, 0, 1, 14, 46, 47, 100])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_a_share_read_lazily_is_the_slice_of_the_whole(many_parts, limit, num_shards):
    everything = read_contexts(many_parts, limit=limit)
    assert count_contexts(many_parts) == 47
    assert [c.id for c in everything] == [f"c{i:04d}" for i in range(min(47, 47 if limit is None else limit))]
    for index in range(num_shards):
        want = [c.id for c in shard_slice(everything, num_shards, index)]
        start, stop = context_share(many_parts, limit=limit, num_shards=num_shards, shard_index=index)
        for size in (1, 4, 6, 100):
            batches = list(iter_contexts(many_parts, start=start, stop=stop, batch_size=size))
            assert [c.id for b in batches for c in b] == want
            assert all(len(b) == size for b in batches[:-1]) and all(0 < len(b) <= size for b in batches)
