"""Hostile content never ends a prepare run: each bad row or file is one counted drop, all else is kept."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import good_row
from tests.prepare.test_readers import write_parquet
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.prepare.readers import read_rows
from viscon_hub.prepare.validate import DROP_REASONS


def kept_urls(out):
    table = pq.read_table(out / "contexts")
    return sorted(set(table.column("page_url").to_pylist()))


def drop_log(out):
    return [json.loads(x) for f in (out / "drops").glob("*.jsonl") for x in f.read_text().splitlines()]


def run(tmp_path, source):
    out = tmp_path / "out"
    stats = prepare(PrepareConfig(source=str(source), output=str(out), fetch_images=False))
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["dropped"] == dict(stats.dropped)
    assert sum(stats.dropped.values()) == len(drop_log(out))
    assert set(stats.dropped) <= set(DROP_REASONS) | {"too_many_tokens"}
    return stats, out


def page(n):
    return f"https://example.org/page-{n}"


def deep(n):
    value = "x"
    for _ in range(n):
        value = [value]
    return value


def test_hostile_lines_in_one_jsonl_file(tmp_path):
    good = [json.dumps(good_row(i)).encode() for i in range(4)]
    surrogate_text = json.dumps(good_row(10)).replace("Intro paragraph", "Intro \\ud800 paragraph")
    surrogate_meta = good_row(11)
    surrogate_meta["general_metadata"] = '{"url": "https://example.org/\\udfff"}'
    nested_line = json.dumps(good_row(12))[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    shallow_nested = {**good_row(13), "general_metadata": json.dumps({"url": "u", "x": deep(200)})}
    nested_meta = {**good_row(14), "metadata": "[" * 100_000}
    bytes_not_bytes = good_row(15)
    bytes_not_bytes["images"][1] = {"bytes": "not bytes", "path": None}
    bytes_int = good_row(16)
    bytes_int["images"][1] = {"bytes": 10_000_000, "path": None}
    path_int = good_row(17)
    path_int["images"][1] = {"bytes": None, "path": 5}
    lines = [
        b"\xef\xbb\xbf" + good[0],  # a BOM before the first row
        surrogate_text.encode(),
        json.dumps(surrogate_meta).encode(),
        good[1],
        b'{"texts": ["caf\xe9"], "images": [null], "metadata": "[null]"}',  # Latin-1, not UTF-8
        b"\xff\xfe\x00garbage",
        nested_line.encode(),
        json.dumps(shallow_nested).encode(),
        json.dumps(nested_meta).encode(),
        good[2],
        json.dumps(bytes_not_bytes).encode(),
        json.dumps(bytes_int).encode(),
        json.dumps(path_int).encode(),
        b"[1, 2]",
        b"null",
        json.dumps({**good_row(18), "texts": ["x" * 4_000_001, None, "end"]}).encode(),
        good[3],
    ]
    src = tmp_path / "hostile.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    stats, out = run(tmp_path, src)
    assert kept_urls(out) == [page(i) for i in range(4)]
    assert stats.documents_read == len(lines)
    assert dict(stats.dropped) == {
        "invalid_unicode": 2,
        "invalid_utf8": 2,
        "too_deep": 3,
        "wrong_type": 3,
        "not_a_mapping": 2,
        "too_large": 1,
    }


def test_damaged_files_among_good_ones(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps(good_row(0)) + "\n" + json.dumps(good_row(1)) + "\n")
    write_parquet(src / "b.parquet", [good_row(2), good_row(3)])
    (src / "c-empty.parquet").write_bytes(b"")
    (src / "d-text.parquet").write_text("this is not parquet")
    whole = (src / "b.parquet").read_bytes()
    (src / "e-truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (src / "f-fake.jsonl.gz").write_bytes(b"not gzip at all" * 10)
    (src / "g-fake.jsonl.zst").write_bytes(b"not zstd either" * 10)
    good_gz = gzip.compress((json.dumps(good_row(4)) + "\n" + json.dumps(good_row(5)) + "\n").encode())
    (src / "h-truncated.jsonl.gz").write_bytes(good_gz[: len(good_gz) - 12])
    with gzip.open(src / "i.jsonl.gz", "wt") as f:
        f.write(json.dumps(good_row(6)) + "\n")
    stats, out = run(tmp_path, src)
    urls = kept_urls(out)
    assert {page(i) for i in (0, 1, 2, 3, 6)} <= set(urls)
    assert stats.dropped["unreadable_file"] == 6
    assert stats.documents_read == len(urls) + sum(stats.dropped.values()) - 6
    unreadable = [d for d in drop_log(out) if d["reason"] == "unreadable_file"]
    assert sorted(d["source"].rsplit("/", 1)[1] for d in unreadable) == [
        "c-empty.parquet",
        "d-text.parquet",
        "e-truncated.parquet",
        "f-fake.jsonl.gz",
        "g-fake.jsonl.zst",
        "h-truncated.jsonl.gz",
    ]
    assert all(d["detail"].startswith("unreadable_file: ") for d in unreadable)


def test_zstd_without_its_codec_names_the_extra(tmp_path, monkeypatch):
    import fsspec.utils

    from viscon_hub.errors import MissingDependencyError

    monkeypatch.setattr(fsspec.utils, "infer_compression", lambda name: None)
    (tmp_path / "a.jsonl.zst").write_bytes(b"x")
    with pytest.raises(MissingDependencyError, match=r"viscon-hub\[zstd\]"):
        list(read_rows(str(tmp_path)))


def test_unreadable_file_error_is_redacted(tmp_path, monkeypatch):
    from viscon_hub.prepare import readers

    def broken(file, base):
        raise OSError("denied for https://user:hunter22@example.org/x with hf_abcdefghijklmnop")
        yield

    monkeypatch.setattr(readers, "_json_rows", broken)
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps(good_row(0)) + "\n")
    (row,) = list(read_rows(str(src)))
    assert row.error.startswith("unreadable_file: OSError")
    assert "hunter22" not in row.error and "hf_abcdefghijklmnop" not in row.error


@pytest.mark.parametrize(
    "body",
    [
        lambda rows: json.dumps(rows[0], indent=2),
        lambda rows: "\ufeff" + json.dumps(rows, indent=2),
        lambda rows: "\n".join(json.dumps(r) for r in rows),
    ],
    ids=["one-pretty-document", "bom-list", "json-lines-named-json"],
)
def test_json_file_holds_one_document_or_a_list(tmp_path, body):
    rows = [good_row(0), good_row(1)]
    src = tmp_path / "doc.json"
    src.write_text(body(rows), encoding="utf-8")
    read = list(read_rows(str(src)))
    assert all(r.error is None for r in read)
    assert len(read) in (1, 2) and read[0].data == rows[0]


def test_broken_json_list_is_one_drop(tmp_path):
    src = tmp_path / "doc.json"
    src.write_text("[" + json.dumps(good_row(0)) + ", {")
    (row,) = list(read_rows(str(src)))
    assert row.error.startswith("invalid_json")


def test_line_cut_by_the_read_buffer_is_rejoined(tmp_path):
    rows = [good_row(i) for i in range(200)]
    for r in rows:
        r["texts"][0] = "long " * 50
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = list(read_rows(str(src)))
    assert [r.data for r in read] == rows


def test_duplicate_documents_are_dropped_and_counted(tmp_path):
    src = tmp_path / "dups.jsonl"
    near = good_row(0)
    near["texts"][0] = "Different intro."  # same URL, other content: a different document
    rows = [good_row(0), good_row(1), good_row(0), near, good_row(0)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats, out = run(tmp_path, src)
    assert stats.dropped == {"duplicate_document": 2}
    table = pq.read_table(out / "contexts")
    ids = table.column("document_id").to_pylist()
    assert len(ids) == len(set(ids)) == 3


def test_parquet_with_image_struct_of_wrong_types(tmp_path):
    struct = pa.struct([("bytes", pa.string()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("images", pa.list_(struct)),
            ("metadata", pa.string()),
            ("general_metadata", pa.string()),
            ("texts", pa.list_(pa.string())),
        ]
    )
    good, bad = good_row(0), good_row(1)
    good["images"][1] = {"bytes": None, "path": "https://example.org/a.jpg"}
    bad["images"][1] = {"bytes": "a string, not bytes", "path": None}
    for r in (good, bad):
        r["images"] = [x if x is not None else None for x in r["images"]]
    src = tmp_path / "structs.parquet"
    pq.write_table(pa.Table.from_pylist([good, bad], schema=schema), src)
    stats, out = run(tmp_path, src)
    assert kept_urls(out) == [page(0)]
    assert stats.dropped == {"wrong_type": 1}


def test_file_name_that_is_not_utf8(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    bad_name = os.fsdecode(b"bad-\xff-name.jsonl")
    (src / bad_name).write_text(json.dumps(good_row(0)) + "\n" + "{broken\n")
    (src / "good.jsonl").write_text(json.dumps(good_row(1)) + "\n")
    stats, out = run(tmp_path, src)
    assert kept_urls(out) == [page(0), page(1)]
    assert stats.dropped == {"invalid_json": 1}
    (drop,) = drop_log(out)
    assert drop["source"].endswith("-name.jsonl")


def test_image_roots_must_be_folders(tmp_path):
    from viscon_hub.errors import ConfigError

    with pytest.raises(ConfigError, match="--image-root"):
        PrepareConfig(output=str(tmp_path), image_roots="/data")
    assert PrepareConfig(output=str(tmp_path), image_roots=["/data"]).image_roots == ("/data",)
