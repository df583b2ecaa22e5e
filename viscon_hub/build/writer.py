"""Rows of every config -> Parquet shards in a staging folder, then swapped into the dataset folder.

Each config and split is written as it comes, one shard at a time, to
``<config>/<split>-NNNNN-of-MMMMM.parquet`` (the count is known, and the names given, when the split
is closed). A shard closes before the next row group would take it past ``max_shard_size`` (or
after :data:`MAX_GROUPS_PER_SHARD` row groups, which only rows without big images reach). A row
group holds at most :data:`ROW_GROUP` rows (the Hub's viewer pages through row groups; with images a
hundred rows is a few MB) and at most a quarter of a shard's bytes. The writer keeps no timestamps
and sizes every cut from the data alone, so two builds of the same rows give byte-identical files.

Pages are cut by content (pyarrow's ``use_content_defined_chunking``), so that a rebuild with a few
rows changed keeps its other pages byte for byte and the Hub's Xet storage uploads only what changed.

>>> import random, tempfile, pyarrow as pa
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> w = ShardWriter(root / ".staging", {"t": pa.schema([("id", pa.string()), ("blob", pa.binary())])},
...                 max_shard_size=3000, row_bytes=lambda r: len(r["blob"]))
>>> for i in range(6):
...     w.add("t", "train", [{"id": str(i), "blob": random.Random(i).randbytes(1000)}])
>>> w.close(); sorted(p.name for p in (root / ".staging" / "t").iterdir())
['train-00000-of-00003.parquet', 'train-00001-of-00003.parquet', 'train-00002-of-00003.parquet']
>>> w.counts["t"]["train"], w.shards["t"]["train"]
(6, 3)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub.build.layout import ALL_CONFIGS, DEFAULT_MAX_SHARD_SIZE, SPLITS, is_shard, shard_name

logger = logging.getLogger(__name__)

ROW_GROUP = 100
# A Parquet writer keeps every row group's metadata until the footer is written: with small rows a
# shard also closes after this many row groups, so that memory stays bounded whatever the row count.
MAX_GROUPS_PER_SHARD = 200
# Pages cut by content, so that a rebuild pushed again shares its unchanged pages on the Hub.
CONTENT_DEFINED_CHUNKING = True
# Text of one row, for sizing cuts before anything is encoded; images are counted by their bytes.
ROW_TEXT_BYTES = 1024


def image_row_bytes(row: dict[str, Any]) -> int:
    """A row's size for cutting row groups and shards: the bytes of its ``image`` (a built config) or
    of its ``images`` (the Parquet exports) plus an allowance for its text.

    >>> image_row_bytes({"image": {"bytes": b"12345"}}), image_row_bytes({"images": [{"bytes": b"12"}] * 2})
    (1029, 1028)
    """
    images = row.get("images")
    images = [*images, row.get("image")] if isinstance(images, list) else [row.get("image")]
    data = sum(len(im.get("bytes") or b"") for im in images if isinstance(im, dict))
    return data + ROW_TEXT_BYTES


class _Open:
    """The shard being written for one config and split."""

    __slots__ = ("index", "sink", "writer", "groups")

    def __init__(self, index: int, sink: pa.NativeFile, writer: pq.ParquetWriter) -> None:
        self.index = index
        self.sink = sink
        self.writer = writer
        self.groups = 0


class ShardWriter:
    """Parquet shards per config and split under ``root`` (a staging folder), written as rows arrive.

    ``schemas`` maps config -> Arrow schema; ``row_bytes`` sizes a row before it is encoded.
    ``counts[config][split]`` is rows written, ``shards[config][split]`` files written,
    ``bytes[config]`` the bytes of a config's files once closed.
    """

    def __init__(
        self,
        root: Path,
        schemas: dict[str, pa.Schema],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        row_group: int = ROW_GROUP,
        row_bytes: Callable[[dict[str, Any]], int] = image_row_bytes,
        content_defined_chunking: bool | None = None,
    ) -> None:
        self.root = Path(root)
        self.schemas = schemas
        self.max_shard_size = max_shard_size
        self.row_group = row_group
        self.group_bytes = max(1, max_shard_size // 4)
        self.row_bytes = row_bytes
        self.cdc = CONTENT_DEFINED_CHUNKING if content_defined_chunking is None else content_defined_chunking
        keys = [(c, s) for c in schemas for s in SPLITS]
        self.buffers: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in keys}
        self.buffered_bytes: dict[tuple[str, str], int] = dict.fromkeys(keys, 0)
        self.open: dict[tuple[str, str], _Open] = {}
        self.counts: dict[str, dict[str, int]] = {c: dict.fromkeys(SPLITS, 0) for c in schemas}
        self.shards: dict[str, dict[str, int]] = {c: dict.fromkeys(SPLITS, 0) for c in schemas}
        self.bytes: dict[str, int] = dict.fromkeys(schemas, 0)

    def add(self, config: str, split: str, rows: Iterable[dict[str, Any]]) -> None:
        key = (config, split)
        buf = self.buffers[key]
        for row in rows:
            buf.append(row)
            self.buffered_bytes[key] += self.row_bytes(row)
            self.counts[config][split] += 1
            if len(buf) >= self.row_group or self.buffered_bytes[key] >= self.group_bytes:
                self._write_group(key)

    def _partial(self, key: tuple[str, str], index: int) -> Path:
        config, split = key
        return self.root / config / f"{split}-{index:05d}.partial"

    def _write_group(self, key: tuple[str, str]) -> None:
        rows = self.buffers[key]
        if not rows:
            return
        size = self.buffered_bytes[key]
        shard = self.open.get(key)
        if (
            shard is not None
            and shard.groups
            and (shard.sink.tell() + size > self.max_shard_size or shard.groups >= MAX_GROUPS_PER_SHARD)
        ):
            self._close_shard(key)
            shard = None
        if shard is None:
            index = self.shards[key[0]][key[1]]
            path = self._partial(key, index)
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = pa.OSFile(str(path), "wb")
            options: dict[str, Any] = {"use_content_defined_chunking": True} if self.cdc else {}
            writer = pq.ParquetWriter(
                sink, self.schemas[key[0]], compression="zstd", write_statistics=False, **options
            )
            shard = self.open[key] = _Open(index, sink, writer)
            self.shards[key[0]][key[1]] += 1
        table = pa.Table.from_pylist(rows, schema=self.schemas[key[0]])
        shard.writer.write_table(table, row_group_size=len(rows))
        shard.groups += 1
        rows.clear()
        self.buffered_bytes[key] = 0

    def _close_shard(self, key: tuple[str, str]) -> None:
        shard = self.open.pop(key)
        shard.writer.close()
        shard.sink.close()

    def close(self) -> None:
        """Flush every buffer, close every shard and give each its final ``-NNNNN-of-MMMMM`` name.

        A split without rows gets no file (``datasets`` cannot load one); the README omits it.
        """
        for key in self.buffers:
            self._write_group(key)
            if key in self.open:
                self._close_shard(key)
            config, split = key
            count = self.shards[config][split]
            for i in range(count):
                final = self.root / config / shard_name(split, i, count)
                self._partial(key, i).replace(final)
                self.bytes[config] += final.stat().st_size

    def abort(self) -> None:
        for shard in self.open.values():
            try:
                shard.writer.close()
                shard.sink.close()
            except Exception:  # noqa: BLE001 - already failing; the staging folder is discarded
                pass
        self.open.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def write_build_info(path: Path, info: dict[str, Any]) -> None:
    """``viscon_build.json`` with only figures of the data, not of the run (timings, calls vs cache
    hits): a cold and a warm build of the same records write the same file. What a run called is in
    its own report."""
    info = copy.deepcopy(info)
    for d in (info.get("dedup") or {}).values():
        if isinstance(d, dict) and isinstance(d.get("engine"), dict):
            d["engine"] = {k: d["engine"][k] for k in ("requests", "unique") if k in d["engine"]}
    Path(path).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def fresh_staging(out: Path) -> Path:
    """An empty ``.staging`` folder inside ``out`` (what an interrupted build left there is removed)."""
    staging = Path(out) / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, out: Path, configs: Iterable[str]) -> None:
    """Move each config folder into place; configs of an older build that this one lacks are removed."""
    configs = set(configs)
    out.mkdir(parents=True, exist_ok=True)
    for name in ALL_CONFIGS:
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        if name in configs and (staging / name).exists():
            (staging / name).replace(target)
    shutil.rmtree(staging, ignore_errors=True)


def replace_splits(new: Path, target: Path, splits: Iterable[str]) -> None:
    """Make the folder of shards ``new`` the folder ``target``, in two renames.

    ``target`` ends with exactly the shards of ``splits`` that ``new`` holds (none from an earlier
    run with another shard count survive), while its other files, e.g. the shards of a split not
    written this time, are carried over (hard links). A run killed between the renames leaves
    ``target`` missing, never a half file or a mix of two runs' shards; the old folder is then under
    ``.<name>.old`` beside it, which the next run removes. A ``target`` left empty is removed.
    """
    splits = set(splits)
    new.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        for p in target.iterdir():
            if p.is_file() and not any(is_shard(p.name, s) for s in splits) and not (new / p.name).exists():
                try:
                    os.link(p, new / p.name)
                except OSError:
                    shutil.copy2(p, new / p.name)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.replace(old)
    new.replace(target)
    shutil.rmtree(old, ignore_errors=True)
    if not any(target.iterdir()):
        target.rmdir()


__all__ = [
    "ROW_GROUP",
    "ShardWriter",
    "fresh_staging",
    "image_row_bytes",
    "replace_splits",
    "swap_in",
    "write_build_info",
]
