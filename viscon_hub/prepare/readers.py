"""Readers: OBELICS-shaped rows from local files, any fsspec URL, or a Hub dataset streamed by ``datasets``.

A reader yields :class:`RawRow` objects, untouched; validation happens in :mod:`viscon_hub.prepare.validate`.
A line that is not JSON at all is still yielded (``data=None`` with its ``error``) so that it is
counted as a drop rather than lost.

>>> from viscon_hub.prepare.readers import read_rows, SAMPLE_PATH
>>> rows = list(read_rows(str(SAMPLE_PATH), limit=2))
>>> len(rows)
2
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from viscon_hub.errors import ConfigError, SourceError
from viscon_hub.fsutil import is_local, protocol_of
from viscon_hub.resources import PACKAGE_DATA

logger = logging.getLogger(__name__)

SAMPLE_PATH = PACKAGE_DATA / "sample" / "obelics_sample.jsonl"
OBELICS_COLUMNS = ("images", "metadata", "general_metadata", "texts")
_FILE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".ndjson", ".jsonl.zst")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(slots=True)
class RawRow:
    """One row as read, before validation; ``base`` resolves relative image paths."""

    data: dict[str, Any] | None
    source: str
    row: int
    base: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceSpec:
    """Where documents come from. ``kind`` is decided from ``location`` by :func:`resolve_source`."""

    kind: str  # "files" | "hub"
    location: str
    files: tuple[str, ...] = ()
    split: str = "train"
    config: str | None = None
    revision: str | None = None


def resolve_source(
    source: str | None, *, split: str = "train", config: str | None = None, revision: str | None = None
) -> SourceSpec:
    """Decide whether ``source`` names files (paths, globs, fsspec URLs) or a Hub dataset id.

    ``hub:ID`` forces the ``datasets`` streaming reader (``ID`` may also be a local dataset folder);
    a bare ``ORG/NAME`` that is not a local path is taken as a Hub dataset id.
    """
    if source is None or source == "sample":
        return SourceSpec(kind="files", location=str(SAMPLE_PATH), files=(str(SAMPLE_PATH),))
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"--source must be a path, glob, URL or dataset id; got {source!r}")
    if source.startswith("hub:"):
        return SourceSpec(kind="hub", location=source[4:], split=split, config=config, revision=revision)
    has_scheme = "://" in source
    if (
        not has_scheme
        and not Path(source).exists()
        and not any(c in source for c in "*?[")
        and _HUB_ID.match(source)
    ):
        return SourceSpec(kind="hub", location=source, split=split, config=config, revision=revision)
    files = _expand_files(source)
    if not files:
        raise SourceError(
            f"no OBELICS files found at {source!r}: expected a .parquet/.jsonl file, a folder or glob of "
            "them, an fsspec URL, or a Hub dataset id such as HuggingFaceM4/OBELICS"
        )
    return SourceSpec(kind="files", location=source, files=tuple(files))


def _expand_files(source: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(source)
    local, protocol = is_local(fs), protocol_of(fs)

    def unstrip(p: str) -> str:
        return p if local else f"{protocol}://{p}"

    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.endswith(_FILE_SUFFIXES))
    elif fs.exists(path):
        found = [path]
    else:
        return []
    return [unstrip(p) for p in found if not fs.isdir(p)]


def read_rows(
    source: str | None,
    *,
    limit: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    split: str = "train",
    config: str | None = None,
    revision: str | None = None,
) -> Iterator[RawRow]:
    """Yield the rows of ``source`` that belong to shard ``shard_index`` of ``num_shards``, at most ``limit``.

    Files are dealt out to shards when there are at least as many files as shards; otherwise rows
    are dealt out round-robin, so every row lands in exactly one shard either way.
    """
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1; got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index must be in [0, {num_shards - 1}]; got {shard_index}")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0; got {limit}")
    spec = resolve_source(source, split=split, config=config, revision=revision)
    rows = (
        _hub_rows(spec, num_shards, shard_index)
        if spec.kind == "hub"
        else _file_rows(spec, num_shards, shard_index)
    )
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            break
        yield row


def _file_rows(spec: SourceSpec, num_shards: int, shard_index: int) -> Iterator[RawRow]:
    files = list(spec.files)
    by_file = len(files) >= num_shards
    if by_file:
        files = files[shard_index::num_shards]
    counter = 0
    for file in files:
        for row in _rows_of_file(file):
            mine = by_file or counter % num_shards == shard_index
            counter += 1
            if mine:
                yield row


def _rows_of_file(file: str) -> Iterator[RawRow]:
    base = file.rsplit("/", 1)[0] if "/" in file else "."
    if file.endswith(".parquet"):
        yield from _parquet_rows(file, base)
    else:
        yield from _jsonl_rows(file, base)


def _parquet_rows(file: str, base: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    with fsspec.open(file, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in OBELICS_COLUMNS if c in pf.schema_arrow.names]
        index = 0
        for batch in pf.iter_batches(batch_size=512, columns=columns):
            for data in batch.to_pylist():
                yield RawRow(data=data, source=file, row=index, base=base)
                index += 1


def _jsonl_rows(file: str, base: str) -> Iterator[RawRow]:
    with fsspec.open(file, "rt", encoding="utf-8", compression="infer") as f:
        first = f.read(1)
        f.seek(0)
        if first == "[":
            # A JSON array of rows: small files only (it is read whole).
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                yield RawRow(data=None, source=file, row=0, base=base, error=f"invalid_json: {e}")
                return
            for index, data in enumerate(items):
                yield RawRow(
                    data=data if isinstance(data, dict) else None,
                    source=file,
                    row=index,
                    base=base,
                    error=None if isinstance(data, dict) else "not_a_mapping",
                )
            return
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRow(data=None, source=file, row=index, base=base, error=f"invalid_json: {e.msg}")
            else:
                ok = isinstance(data, dict)
                yield RawRow(
                    data=data if ok else None,
                    source=file,
                    row=index,
                    base=base,
                    error=None if ok else "not_a_mapping",
                )
            index += 1


def _hub_rows(spec: SourceSpec, num_shards: int, shard_index: int) -> Iterator[RawRow]:
    import datasets
    from datasets.distributed import split_dataset_by_node

    try:
        ds = datasets.load_dataset(
            spec.location, spec.config, split=spec.split, streaming=True, revision=spec.revision
        )
    except FileNotFoundError as e:
        raise SourceError(f"cannot open dataset {spec.location!r} (split {spec.split!r}): {e}") from e
    if num_shards > 1:
        # Whole data files go to nodes when they divide evenly, else rows are dealt out: disjoint either way.
        ds = split_dataset_by_node(ds, rank=shard_index, world_size=num_shards)
    name = f"hub:{spec.location}" + (f"#shard-{shard_index}-of-{num_shards}" if num_shards > 1 else "")
    for index, data in enumerate(ds):
        yield RawRow(data=data, source=name, row=index, base=None)
