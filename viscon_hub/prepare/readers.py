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

import io
import itertools
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from viscon_hub.errors import ConfigError, MissingDependencyError, SourceError, VisconError, redact
from viscon_hub.fsutil import is_local, protocol_of
from viscon_hub.resources import PACKAGE_DATA
from viscon_hub.retry import Backoff

logger = logging.getLogger(__name__)

SAMPLE_PATH = PACKAGE_DATA / "sample" / "obelics_sample.jsonl"
OBELICS_COLUMNS = ("images", "metadata", "general_metadata", "texts")
_FILE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".ndjson", ".jsonl.zst")
_BOM = b"\xef\xbb\xbf"
# A whole-file .json document is read into memory; larger corpora belong in JSON Lines or Parquet.
MAX_JSON_DOCUMENT_BYTES = 256 * 1024 * 1024
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
    _check_codecs(spec.files)
    rows = (
        _hub_rows(spec, num_shards, shard_index)
        if spec.kind == "hub"
        else _file_rows(spec, num_shards, shard_index)
    )
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            break
        yield row


def _check_codecs(files: Iterable[str]) -> None:
    """A compression whose codec is missing is a setup problem, not damage: say so before reading."""
    from fsspec.utils import infer_compression

    for file in files:
        if file.endswith(".zst") and infer_compression(file) is None:
            raise MissingDependencyError(
                f"{redact(file)} is zstd-compressed and the zstandard package is missing; "
                'install it with: pip install "viscon-hub[zstd]"'
            )


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
    """The rows of one file; a file that cannot be opened or read on is one ``unreadable_file`` row.

    Rows read before the damage are kept; the error (redacted) travels in the drop log.
    """
    base = file.rsplit("/", 1)[0] if "/" in file else "."
    index = 0
    try:
        rows = _parquet_rows(file, base) if file.endswith(".parquet") else _json_rows(file, base)
        for row in rows:
            index = row.row + 1
            yield row
    except VisconError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage to one file is data about that file
        logger.warning("unreadable file %s after %d rows: %s", redact(file), index, redact(e))
        yield RawRow(
            data=None,
            source=file,
            row=index,
            base=base,
            error=f"unreadable_file: {type(e).__name__}: {redact(e)}",
        )


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


def _json_rows(file: str, base: str) -> Iterator[RawRow]:
    """JSON Lines, or (``.json``, or text starting with ``[``) one document or a list of them."""
    with fsspec.open(file, "rb", compression="infer") as f:
        head = f.read(4096)
        if head.startswith(_BOM):
            head = head[len(_BOM) :]
        whole_file = head.lstrip().startswith(b"[") or _stem(file).endswith(".json")
        if whole_file:
            body = head + f.read(MAX_JSON_DOCUMENT_BYTES + 1 - len(head))
            if len(body) > MAX_JSON_DOCUMENT_BYTES:
                raise ValueError(
                    f"a whole-file JSON document over {MAX_JSON_DOCUMENT_BYTES} bytes; "
                    "write it as JSON Lines (one document per line) instead"
                )
            parsed, error = _loads(body)
            if error is None:
                for index, data in enumerate(parsed if isinstance(parsed, list) else [parsed]):
                    yield _raw(data, file, index, base)
                return
            if body.lstrip().startswith(b"["):
                yield RawRow(data=None, source=file, row=0, base=base, error=error)
                return
            lines: Iterable[bytes] = io.BytesIO(body)  # not one JSON text: JSON Lines under a .json name
        else:
            lines = itertools.chain(io.BytesIO(head).readlines(), f) if head else f
            lines = _rejoin(lines)
        index = 0
        for line in lines:
            if not line.strip():
                continue
            data, error = _loads(line)
            if error is not None:
                yield RawRow(data=None, source=file, row=index, base=base, error=error)
            else:
                yield _raw(data, file, index, base)
            index += 1


def _rejoin(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of the head buffer and the rest of the stream, with the one line the buffer cut rejoined."""
    pending = b""
    for line in lines:
        if not line.endswith(b"\n"):
            pending += line
            continue
        yield pending + line
        pending = b""
    if pending:
        yield pending


def _stem(file: str) -> str:
    for suffix in (".gz", ".zst", ".bz2", ".xz"):
        if file.endswith(suffix):
            return file[: -len(suffix)]
    return file


def _loads(raw: bytes) -> tuple[Any, str | None]:
    """Decode one JSON text; ``(value, None)`` or ``(None, "reason: detail")``, never an exception."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid_utf8: byte {e.start}"
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid_json: {e.msg}"
    except RecursionError:
        return None, "too_deep: nested beyond what the JSON decoder allows"


def _raw(data: Any, file: str, index: int, base: str) -> RawRow:
    ok = isinstance(data, dict)
    return RawRow(
        data=data if ok else None, source=file, row=index, base=base, error=None if ok else "not_a_mapping"
    )


HUB_STREAM_BACKOFF = Backoff(base_s=2.0, max_s=60.0, max_attempts=6)
"""Retries of a broken Hub stream, each resumed where it stopped; progress resets the count."""


def _transient(e: BaseException) -> bool:
    """A network failure worth resuming after: a dropped connection, a timeout, HTTP 429 or 5xx."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(status, int):
        return status == 429 or status >= 500
    return isinstance(e, (ConnectionError, TimeoutError)) or (
        isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))
    )


def _hub_rows(
    spec: SourceSpec, num_shards: int, shard_index: int, *, backoff: Backoff | None = None
) -> Iterator[RawRow]:
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
    # A stream of millions of rows meets a dropped connection sooner or later: resume from the state
    # after the last row handed out (datasets' resumable IterableDataset) instead of ending the run.
    backoff = backoff or HUB_STREAM_BACKOFF
    index, state, failures = 0, None, 0
    while True:
        if state is not None:
            ds.load_state_dict(state)
        try:
            for data in ds:
                yield RawRow(data=data, source=name, row=index, base=None)
                index += 1
                state, failures = ds.state_dict(), 0
            return
        except Exception as e:
            if not _transient(e):
                raise
            failures += 1
            if not backoff.retry(failures):
                raise SourceError(
                    f"reading {redact(name)} failed after row {index} and {failures} attempts: "
                    f"{redact(str(e), limit=200)}; check the network and run again"
                ) from e
            wait = backoff.delay(failures)
            logger.warning(
                "reading %s broke after row %d (%s); resuming in %.0fs",
                redact(name),
                index,
                type(e).__name__,
                wait,
            )
            time.sleep(wait)
