"""A content-addressed image store with an append-only index of every acquisition.

Layout under ``root`` (any fsspec URL; a plain path is a local folder)::

    blobs/<sha[:2]>/<sha>        image bytes, named by their SHA-256
    index/<unique>.jsonl         one JSON line per acquired source key: ok with its blob, or the drop

Every store instance appends to its own uniquely named index file, so several processes can share one
store without locks; loading merges all files.

>>> import tempfile
>>> store = ImageStore(tempfile.mkdtemp())
>>> sha = store.put(b"bytes")
>>> store.get(sha)
b'bytes'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from viscon_hub.errors import ConfigError

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_INDEX_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexRecord:
    """The remembered outcome of acquiring one source key."""

    key: str
    status: Literal["ok", "dropped"]
    reason: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    attempts: int = 0

    @classmethod
    def from_json(cls, obj: Any) -> IndexRecord:
        if not isinstance(obj, dict) or obj.get("v") != _INDEX_VERSION:
            raise ValueError("not an index record of version 1")
        status = obj["status"]
        if status not in ("ok", "dropped") or not isinstance(obj["key"], str):
            raise ValueError(f"bad status or key: {status!r}")
        sha = obj.get("sha256")
        if status == "ok" and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise ValueError("ok record without a valid sha256")
        return cls(
            key=obj["key"],
            status=status,
            reason=obj.get("reason"),
            sha256=sha,
            width=obj.get("width"),
            height=obj.get("height"),
            format=obj.get("format"),
            error=obj.get("error"),
            attempts=int(obj.get("attempts", 0)),
        )

    def to_json(self) -> str:
        return json.dumps({"v": _INDEX_VERSION, **asdict(self)}, ensure_ascii=False, sort_keys=True)


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of ``data``: the name of its blob."""
    return hashlib.sha256(data).hexdigest()


class ImageStore:
    """Image blobs by SHA-256 plus an index from source key (URL or ``file://`` path) to outcome.

    >>> import tempfile
    >>> store = ImageStore(tempfile.mkdtemp())
    >>> store.record(IndexRecord(key="https://example.org/gone.jpg", status="dropped", reason="http_404"))
    >>> store.flush()
    >>> ImageStore(store.root).lookup("https://example.org/gone.jpg").reason
    'http_404'
    """

    def __init__(self, root: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None):
        root_text = os.fspath(root)
        if not root_text:
            raise ConfigError("ImageStore root: expected a folder path or fsspec URL, got ''")
        self.fs, path = fsspec.core.url_to_fs(root_text, **(storage_options or {}))
        self.root = root_text
        self._path = path.rstrip("/") or "/"
        self._local = isinstance(self.fs, LocalFileSystem)
        self._lock = threading.Lock()
        self._index: dict[str, IndexRecord] | None = None
        self._pending: list[IndexRecord] = []
        self._writer_name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._batches = 0

    def __repr__(self) -> str:
        return f"ImageStore({self.root!r})"

    # -- blobs ---------------------------------------------------------------------------------

    def blob_path(self, sha: str) -> str:
        """Where the blob named ``sha`` lives, in the store's filesystem."""
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ConfigError(f"expected a lowercase hex SHA-256 (64 chars), got {sha!r}")
        return f"{self._path}/blobs/{sha[:2]}/{sha}"

    def exists(self, sha: str) -> bool:
        """Whether the blob named ``sha`` is stored."""
        return bool(self.fs.exists(self.blob_path(sha)))

    def get(self, sha: str) -> bytes:
        """The bytes of the blob named ``sha``; ``FileNotFoundError`` if it is not stored."""
        if self._local:
            # The merge reads one blob per row: skip fsspec's per-call path handling locally.
            with open(self.blob_path(sha), "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(self.blob_path(sha)))

    def put(self, data: bytes) -> str:
        """Store ``data`` (once: an existing blob is not rewritten) and return its SHA-256."""
        sha = sha256_hex(data)
        path = self.blob_path(sha)
        if self.fs.exists(path):
            return sha
        folder = path.rsplit("/", 1)[0]
        if self._local:
            # A reader never sees a half-written blob: the name appears only once the bytes are there.
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{sha[:8]}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide blobs from other users of a shared store
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.pipe_file(path, data)
        return sha

    # -- index ---------------------------------------------------------------------------------

    @property
    def _index_dir(self) -> str:
        return f"{self._path}/index"

    def _load(self) -> dict[str, IndexRecord]:
        index: dict[str, IndexRecord] = {}
        try:
            files = sorted(self.fs.glob(f"{self._index_dir}/*.jsonl"))
        except FileNotFoundError:
            files = []
        bad = 0
        for file in files:
            try:
                text = self.fs.cat_file(file).decode("utf-8", errors="replace")
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    rec = IndexRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                old = index.get(rec.key)
                # A success outranks any failure, whichever process wrote last; otherwise last wins.
                if old is None or rec.status == "ok" or old.status != "ok":
                    index[rec.key] = rec
        if bad:
            logger.warning("image index %s: skipped %d malformed line(s)", self.root, bad)
        logger.debug("image index %s: %d keys from %d file(s)", self.root, len(index), len(files))
        return index

    def _ensure_index(self) -> dict[str, IndexRecord]:
        if self._index is None:
            self._index = self._load()
        return self._index

    def lookup(self, key: str) -> IndexRecord | None:
        """The remembered outcome for ``key``, or ``None`` if it was never acquired."""
        with self._lock:
            return self._ensure_index().get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ensure_index())

    def record(self, rec: IndexRecord) -> None:
        """Remember an outcome; it is written to disk on the next :meth:`flush`."""
        with self._lock:
            index = self._ensure_index()
            old = index.get(rec.key)
            if old is None or rec.status == "ok" or old.status != "ok":
                index[rec.key] = rec
            self._pending.append(rec)

    def flush(self) -> None:
        """Append the outcomes recorded since the last flush to this instance's index file."""
        with self._lock:
            if not self._pending:
                return
            payload = "".join(rec.to_json() + "\n" for rec in self._pending).encode("utf-8")
            if self._local:
                os.makedirs(self._index_dir, exist_ok=True)
                with open(f"{self._index_dir}/{self._writer_name}.jsonl", "ab") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                # Object stores cannot append, so each flush is its own uniquely named file.
                self._batches += 1
                self.fs.makedirs(self._index_dir, exist_ok=True)
                name = f"{self._index_dir}/{self._writer_name}-{self._batches:06d}.jsonl"
                self.fs.pipe_file(name, payload)
            self._pending.clear()

    def reload(self) -> None:
        """Flush, then forget the in-memory index so the next lookup sees what other processes wrote."""
        self.flush()
        with self._lock:
            self._index = None
