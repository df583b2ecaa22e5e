"""ImageStore: content-addressed blobs and an append-only index shared by several writers."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest

from viscon_hub.errors import ConfigError
from viscon_hub.prepare.images import ImageStore
from viscon_hub.prepare.images.store import IndexRecord


def test_put_get_exists(tmp_path):
    store = ImageStore(tmp_path)
    data = b"some image bytes"
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists(sha) and store.get(sha) == data
    assert (tmp_path / "blobs" / sha[:2] / sha).read_bytes() == data
    assert store.put(data) == sha  # idempotent
    assert not store.exists("0" * 64)
    with pytest.raises(FileNotFoundError):
        store.get("0" * 64)


def test_put_leaves_no_temp_files(tmp_path):
    store = ImageStore(tmp_path)
    for i in range(5):
        store.put(b"x" * i)
    names = [name for _, _, files in os.walk(tmp_path / "blobs") for name in files]
    assert len(names) == 5 and not [n for n in names if n.endswith(".tmp")]


def test_bad_sha_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SHA-256"):
        ImageStore(tmp_path).get("../../etc/passwd")


def test_fsspec_memory_store():
    root = f"memory://viscon-image-store-{uuid.uuid4().hex}"
    store = ImageStore(root)
    sha = store.put(b"abc")
    assert store.get(sha) == b"abc"
    store.record(IndexRecord(key="https://example.org/a.jpg", status="dropped", reason="http_404"))
    store.flush()
    store.record(IndexRecord(key="https://example.org/b.jpg", status="ok", sha256=sha, width=1, height=1))
    store.flush()
    again = ImageStore(root)
    assert again.lookup("https://example.org/a.jpg").reason == "http_404"
    assert again.lookup("https://example.org/b.jpg").sha256 == sha


def test_two_writers_merge_into_one_readable_index(tmp_path):
    # Two instances stand in for two processes sharing one store folder.
    first, second = ImageStore(tmp_path), ImageStore(tmp_path)
    sha = first.put(b"image")
    assert second.put(b"image") == sha
    first.record(IndexRecord(key="u1", status="ok", sha256=sha, width=200, height=160, format="png"))
    second.record(IndexRecord(key="u2", status="dropped", reason="http_404", attempts=1))
    first.flush()
    second.flush()
    # The same key from both: a success outranks a failure, whichever file is read last.
    second.record(IndexRecord(key="u1", status="dropped", reason="timeout", attempts=3))
    first.record(IndexRecord(key="u3", status="dropped", reason="timeout", attempts=3))
    second.flush()
    first.flush()

    files = sorted((tmp_path / "index").iterdir())
    assert len(files) == 2 and all(f.suffix == ".jsonl" for f in files)
    merged = ImageStore(tmp_path)
    assert len(merged) == 3
    assert merged.lookup("u1").status == "ok" and merged.lookup("u1").sha256 == sha
    assert merged.lookup("u2").reason == "http_404"
    assert merged.lookup("u3").reason == "timeout"


def test_malformed_index_lines_are_skipped(tmp_path, caplog):
    store = ImageStore(tmp_path)
    store.record(IndexRecord(key="good", status="dropped", reason="http_410"))
    store.flush()
    with open(tmp_path / "index" / "zz-broken.jsonl", "w") as fh:
        fh.write('{"v": 1, "key": "half"\n')
        fh.write("not json\n")
        fh.write(json.dumps({"v": 1, "key": "k", "status": "ok", "sha256": "nope"}) + "\n")
        fh.write(json.dumps({"v": 1, "key": "later", "status": "dropped", "reason": "http_404"}) + "\n")
    with caplog.at_level("WARNING", logger="viscon_hub.prepare.images.store"):
        loaded = ImageStore(tmp_path)
        assert loaded.lookup("good").reason == "http_410"
        assert loaded.lookup("later").reason == "http_404"
        assert loaded.lookup("half") is None and loaded.lookup("k") is None
    assert "3 malformed" in caplog.text


def test_unflushed_records_are_visible_in_process_but_not_on_disk(tmp_path):
    store = ImageStore(tmp_path)
    store.record(IndexRecord(key="u", status="dropped", reason="http_404"))
    assert store.lookup("u") is not None
    assert ImageStore(tmp_path).lookup("u") is None
    store.reload()  # flushes first
    assert store.lookup("u") is not None and ImageStore(tmp_path).lookup("u") is not None
