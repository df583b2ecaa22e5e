"""The generation cache: append-only Parquet shards on any fsspec URL, keyed by request key.

Layout under the cache root::

    shards/<time>-<uuid>.parquet    immutable, written whole then renamed into place
    journal/<uuid>.jsonl            local caches only: one line per reply, flushed as it arrives,
                                    so a SIGKILL loses nothing that was stored
    leases/<key[:2]>/<key>          local caches only: locked by the process whose call for that key
                                    is in flight; holds the reply once it arrived, so that another
                                    process on the same cache waits for it instead of paying again

A process holds an exclusive lock on its own journal; whoever opens the cache later folds the
journals of dead processes into Parquet shards. Two processes writing one cache never share a file.
Successful replies and permanent errors are hits; transient errors are kept for the record but are
retried by the next run.

Memory stays bounded by the number of keys, not the size of replies: opening a cache reads four
small columns of each shard into a sorted index of 128-bit key digests (where each key's winning row
lives, whether it is a hit, its timestamp: 33 bytes a key), and a reply is read from its shard's row
group when asked for (:meth:`GenerationCache.get_many` reads each row group once for many keys).

>>> import tempfile
>>> cache = GenerationCache(tempfile.mkdtemp())
>>> cache.put(Completion(key="k" * 64, reply="hello", model="m", stage="s"))
>>> cache.get("k" * 64).reply
'hello'
>>> cache.close()
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from viscon_hub.engine.prices import PriceTable, Usage
from viscon_hub.engine.request import Completion
from viscon_hub.errors import ConfigError
from viscon_hub.fsutil import is_local

logger = logging.getLogger(__name__)

CACHE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("stage", pa.string()),
        pa.field("model", pa.string()),
        pa.field("template_id", pa.string()),
        pa.field("template_version", pa.int32()),
        pa.field("reply", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("latency_s", pa.float64()),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("timestamp", pa.float64()),
    ]
)
_COLUMNS = CACHE_SCHEMA.names
_COMPLETION_FIELDS = {f.name for f in fields(Completion)}
# A lease on storage without locks lapses after this long, so a killed holder's key is called again.
REMOTE_LEASE_TTL_S = 900.0
# Rows per Parquet row group in a written shard: a random read decodes one group (~256 KB of
# 1 KB replies, well under a millisecond) instead of a whole shard.
SHARD_ROW_GROUP_ROWS = 256
# What the index reads of a shard, and what usage() reads of a row.
_INDEX_COLUMNS = ("key", "error", "error_kind", "timestamp")
_USAGE_COLUMNS = ("key", "model", "prompt_tokens", "completion_tokens", "error", "error_kind")
_STATUS_COLUMNS = ("key", "error", "error_kind")
# Shards kept open (their Parquet footers parsed) for random reads.
_OPEN_SHARDS = 8
_HEX_KEY = re.compile(r"[0-9a-f]{64}")
# Mixes the low half into the high one, so keys differing only in their low digits spread out.
_MIX = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def _is_hit(c: Completion) -> bool:
    return c.error is None or c.error_kind == "permanent"


def shard_write_options() -> dict:
    """How shards are written (``pq.write_table`` keywords).

    Small row groups: a reply is read by decoding its row group, never the whole shard. No column
    statistics: nothing filters on them, and min/max of every reply column made footers (parsed
    for each open shard) four times larger.
    """
    return {"compression": "zstd", "row_group_size": SHARD_ROW_GROUP_ROWS, "write_statistics": False}


class GenerationCache:
    """Content-addressed store of model replies; see the module docstring for the layout.

    Opening a cache reads only the key, error and timestamp columns of its shards into a
    :class:`_KeyIndex` (about 33 bytes a stored key); a reply is read from its shard when asked for,
    through a small least-recently-used set of decoded row groups (``row_groups`` of them). Replies
    not yet in a shard (this process's, live journals of others, replies found in leases) stay in
    memory until this process writes them into a shard.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        read_only: bool = False,
        flush_rows: int = 256,
        fallbacks: Sequence[str | os.PathLike[str]] = (),
        row_groups: int = 16,
    ) -> None:
        if row_groups < 1:
            raise ConfigError(f"row_groups must be at least 1; got {row_groups}")
        self.url = str(url)
        # Read-only layers asked after this cache (a pulled or bundled cache); writes go here only.
        self.fallbacks = [GenerationCache(f, read_only=True, row_groups=row_groups) for f in fallbacks]
        self.read_only = read_only
        self.flush_rows = flush_rows
        self.row_groups = row_groups
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = is_local(self.fs)
        self._shards: list[_Shard] = []
        self._index = _KeyIndex.empty()
        # The winning record of every key whose winner is in no indexed shard row.
        self._memory: dict[str, Completion] = {}
        self._pending: list[Completion] = []
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # open files and the row-group LRU; taken after _lock
        self._files: OrderedDict[int, tuple[object | None, pq.ParquetFile]] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._broken: set[int] = set()
        self._journal = None
        self._journal_path: Path | None = None
        self._owner = uuid.uuid4().hex
        self._lease_dirs: set[str] = set()
        self._load()

    # -- reading -------------------------------------------------------------------------------
    def _load(self) -> None:
        if self.local and not self.read_only:
            self._fold_dead_journals()
        parts = []
        for path in self._shard_paths():
            try:
                with self.fs.open(path, "rb") as f:
                    shard, part = _index_shard(path, pq.ParquetFile(f), len(self._shards))
            except Exception as e:  # noqa: BLE001 - a damaged shard must not hide the others
                logger.warning("skipping unreadable cache shard %s: %s", path, e)
                continue
            self._shards.append(shard)
            parts.append(part)
        self._index = _KeyIndex.resolve(parts, self._keys_at)
        if self.local:
            for path in sorted(Path(self.root, "journal").glob("*.jsonl")):
                for completion in _read_journal(path):
                    self._remember(completion)

        if not self.read_only:
            self._sweep_leases()

    def _keys_at(self, sids: np.ndarray, rows: np.ndarray) -> list[str]:
        """The full keys at (shard, row) locations, read from each shard's key column once."""
        keys: list[str] = [""] * len(sids)
        order = np.argsort(sids, kind="stable")
        cuts = [0, *(np.flatnonzero(np.diff(sids[order])) + 1).tolist(), len(order)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a == b:
                continue
            which = order[a:b]
            with self.fs.open(self._shards[int(sids[which[0]])].path, "rb") as f:
                column = pq.ParquetFile(f).read(columns=["key"]).column("key")
            for i, k in zip(which.tolist(), column.take(rows[which]).to_pylist(), strict=True):
                keys[i] = k
        return keys

    def _shard_paths(self) -> list[str]:
        pattern = f"{self.root.rstrip('/')}/shards/*.parquet"
        try:
            return sorted(self.fs.glob(pattern))
        except FileNotFoundError:
            return []

    def _remember(self, c: Completion) -> None:
        old = self._memory.get(c.key)
        if old is not None:
            old_hit, old_ts = _is_hit(old), old.timestamp
        else:
            at = self._indexed_at(c.key)
            if at < 0:
                self._memory[c.key] = c
                return
            old_hit, old_ts = bool(self._index.hit[at]), float(self._index.ts[at])
        # A hit is never replaced by a transient error; otherwise the newest record wins.
        if _is_hit(c) and (not old_hit or c.timestamp >= old_ts):
            self._memory[c.key] = c

    def _indexed_at(self, key: str) -> int:
        """The index position holding ``key`` itself (candidate rows read to compare the key), or -1."""
        index = self._index
        for at in index.find(*_digest(key)):
            stored = self._read_row(index, at)
            if stored is not None and stored.key == key:
                return at
        return -1

    def _indexed(self, key: str, *, hits_only: bool) -> Completion | None:
        index = self._index  # one snapshot: a flush swaps in a new index
        for at in index.find(*_digest(key)):
            if hits_only and not index.hit[at]:
                continue  # if it is this key's record, the answer is None anyway
            c = self._read_row(index, at)
            # Equal digests do not make equal keys: only the full key says the row is this key's.
            if c is not None and c.key == key:
                return c
        return None

    def get(self, key: str) -> Completion | None:
        """The stored reply (or permanent error) for ``key``; None when a model must be asked."""
        c = self._memory.get(key)
        if c is None:
            c = self._indexed(key, hits_only=True)
        if c is not None and _is_hit(c):
            return c
        for layer in self.fallbacks:
            hit = layer.get(key)
            if hit is not None:
                return hit
        return None

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """:meth:`get` for many keys at once: the hits only, each shard row group read once."""
        wanted = list(dict.fromkeys(keys))
        found = {k: c for k, c in self._records(wanted, hits_only=True) if _is_hit(c)}
        missing = [k for k in wanted if k not in found]
        for layer in self.fallbacks:
            if not missing:
                break
            more = layer.get_many(missing)
            found.update(more)
            missing = [k for k in missing if k not in more]
        return found

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys :meth:`get` has no answer for (each once, in order); replies are not read."""
        wanted = list(dict.fromkeys(keys))
        found = {k for k, c in self._records(wanted, hits_only=True, columns=_STATUS_COLUMNS) if _is_hit(c)}
        missing = [k for k in wanted if k not in found]
        del found
        for layer in self.fallbacks:
            if not missing:
                break
            missing = layer.missing(missing)
        return missing

    def record(self, key: str) -> Completion | None:
        """Whatever is stored for ``key``, transient errors included."""
        c = self._memory.get(key)
        return c if c is not None else self._indexed(key, hits_only=False)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        extra = sum(1 for k in list(self._memory) if self._indexed_at(k) < 0)
        return len(self._index) + extra

    def usage(
        self, keys: Iterable[str], *, prices: PriceTable | None = None, batch_models: Iterable[str] = ()
    ) -> Usage:
        """What the replies under ``keys`` cost, per model; each key counted once, missing keys skipped."""
        usage = Usage(prices, batch_models=batch_models)
        # Streamed in shard order and only the cost columns read: the merge asks for every key of a build.
        # This cache first, then each fallback layer for the keys still missing.
        missing = [k for k in dict.fromkeys(keys) if k]
        for layer in (self, *self.fallbacks):
            if not missing:
                break
            found: set[str] = set()
            for key, c in layer._records(missing, hits_only=True, columns=_USAGE_COLUMNS):
                if _is_hit(c):
                    found.add(key)
                    usage.add(c.model or "unknown", c.prompt_tokens, c.completion_tokens)
            missing = [k for k in missing if k not in found]
        return usage

    def __iter__(self) -> Iterator[Completion]:
        """Every key's record once: shard by shard (row groups streamed), then those in no shard."""
        index, shards = self._index, list(self._shards)
        for sid, shard in enumerate(shards):
            for group in range(len(shard.starts) - 1):
                table = self._read_group(sid, group, cached=False)
                if table is None:
                    break
                hi, lo = _digests(table.column("key"))
                asked, at = index.find_many(hi, lo)
                rows = np.arange(shard.starts[group], shard.starts[group + 1])
                # A row is yielded when it is where the index says its key's winner lives.
                mine = np.zeros(len(hi), dtype=bool)
                mine[asked[(index.shard[at] == sid) & (index.row[at] == rows[asked])]] = True
                memory = self._memory
                for row in table.take(np.flatnonzero(mine)).to_pylist():
                    if row["key"] not in memory:  # overridden by a newer record not yet in a shard
                        yield _completion(row)
        yield from list(self._memory.values())

    def _records(
        self, keys: list[str], *, hits_only: bool, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[str, Completion]]:
        """(key, record) for the stored ``keys``: in-memory ones first, then in shard row order."""
        rest = []
        for k in keys:
            c = self._memory.get(k)
            if c is not None:
                yield k, c
            else:
                rest.append(k)
        if not rest:
            return
        index = self._index
        hi, lo = _digest_list(rest)
        which, at = index.find_many(hi, lo)
        del hi, lo
        if hits_only:
            which, at = which[index.hit[at]], at[index.hit[at]]
        if not len(at):
            return
        order = np.lexsort((index.row[at], index.shard[at]))
        which, at = which[order], at[order]
        sids, rows = index.shard[at], index.row[at]
        groups = np.empty(len(at), dtype=np.int64)
        shard_cuts = [0, *(np.flatnonzero(np.diff(sids)) + 1).tolist(), len(at)]
        for a, b in zip(shard_cuts[:-1], shard_cuts[1:]):
            starts = self._shards[int(sids[a])].starts
            groups[a:b] = np.searchsorted(starts, rows[a:b], side="right") - 1
        cuts = np.flatnonzero((np.diff(sids) != 0) | (np.diff(groups) != 0)) + 1
        bounds = [0, *cuts.tolist(), len(at)]
        for i, j in zip(bounds[:-1], bounds[1:]):
            if i == j:
                continue
            sid, group = int(sids[i]), int(groups[i])
            table = self._read_group(sid, group, cached=False, columns=columns)
            if table is None:
                continue
            offsets = rows[i:j] - self._shards[sid].starts[group]
            wanted = (rest[w] for w in which[i:j].tolist())
            for k, row in zip(wanted, table.take(offsets).to_pylist(), strict=True):
                if row["key"] == k:  # a digest match only: the full key decides
                    yield k, _completion(row)

    def _read_row(self, index: _KeyIndex, at: int) -> Completion | None:
        sid, row = int(index.shard[at]), int(index.row[at])
        starts = self._shards[sid].starts
        group = int(np.searchsorted(starts, row, side="right")) - 1
        table = self._read_group(sid, group, cached=True)
        if table is None:
            return None
        return _completion(table.slice(row - int(starts[group]), 1).to_pylist()[0])

    def _read_group(
        self, sid: int, group: int, *, cached: bool, columns: Sequence[str] | None = None
    ) -> pa.Table | None:
        """One decoded row group of shard ``sid``; None (logged once) when the shard cannot be read.

        ``cached`` keeps the whole group in the least-recently-used set for the next random reads;
        streaming readers (iteration, bulk look-ups) read past it, so they never evict hot groups.
        """
        with self._read_lock:
            if cached:
                table = self._groups.get((sid, group))
                if table is not None:
                    self._groups.move_to_end((sid, group))
                    return table
            if sid in self._broken:
                return None
            try:
                parquet = self._open(sid)
                names = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
                table = parquet.read_row_group(group, columns=names)
            except Exception as e:  # noqa: BLE001 - a shard damaged after it was indexed: a miss, not a crash
                logger.warning("cannot read cache shard %s: %s", self._shards[sid].path, e)
                self._broken.add(sid)
                self._close_file(sid)
                return None
            if cached:
                self._groups[(sid, group)] = table
                while len(self._groups) > self.row_groups:
                    self._groups.popitem(last=False)
            return table

    def _open(self, sid: int) -> pq.ParquetFile:
        entry = self._files.get(sid)
        if entry is not None:
            self._files.move_to_end(sid)
            return entry[1]
        path = self._shards[sid].path
        if self.local:  # Arrow's own file reads: no Python call per read
            f, parquet = None, pq.ParquetFile(path)
        else:
            f = self.fs.open(path, "rb")
            try:
                parquet = pq.ParquetFile(f)
            except Exception:
                f.close()
                raise
        self._files[sid] = (f, parquet)
        while len(self._files) > _OPEN_SHARDS:
            self._close_file(next(iter(self._files)))
        return parquet

    def _close_file(self, sid: int) -> None:
        entry = self._files.pop(sid, None)
        if entry is not None and entry[0] is not None:
            entry[0].close()

    def _close_files(self) -> None:
        with self._read_lock:
            for sid in list(self._files):
                self._close_file(sid)
            self._groups.clear()

    # -- leases: one call per key across processes --------------------------------------------
    def try_lease(self, key: str) -> Lease | Completion | None:
        """Claim the call for ``key`` across processes sharing this (local) cache.

        Returns a :class:`Lease` to call under, the :class:`Completion` another process stored while
        holding the lease (a hit: do not call), or None while another live process holds it (wait).
        On other fsspec storage, which has no locks, a lease is a file naming its owner and an expiry
        (:data:`REMOTE_LEASE_TTL_S`), read back after writing: best effort, as two processes writing in
        the same instant may both win.
        """
        if self.read_only:
            return Lease(None, None)
        if not self.local:
            return self._try_remote_lease(key)
        folder = os.path.join(self.root, "leases", key[:2])
        if folder not in self._lease_dirs:  # one mkdir per folder, not per call: this is the hot path
            os.makedirs(folder, exist_ok=True)
            self._lease_dirs.add(folder)
        path = os.path.join(folder, key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        body = os.pread(fd, 1 << 24, 0)
        if body.endswith(b"\n"):
            try:
                done = _completion(json.loads(body))
            except (ValueError, TypeError):
                done = None
            if done is not None and done.key == key and _is_hit(done):
                os.close(fd)  # releases the lock
                with self._lock:
                    self._remember(done)
                return done
        return Lease(fd, path, stale=bool(body))

    def _try_remote_lease(self, key: str) -> Lease | Completion | None:
        path = f"{self.root.rstrip('/')}/leases/{key[:2]}/{key}.json"
        held = self._read_remote_lease(path)
        if isinstance(held, Completion):
            if held.key == key and _is_hit(held):
                with self._lock:
                    self._remember(held)
                return held
        elif held is not None and held.get("owner") != self._owner and held.get("expires", 0) > time.time():
            return None
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        claim = {"owner": self._owner, "expires": time.time() + REMOTE_LEASE_TTL_S}
        self.fs.pipe_file(path, json.dumps(claim).encode())
        mine = self._read_remote_lease(path)
        if not isinstance(mine, dict) or mine.get("owner") != self._owner:
            return None  # another process wrote after us: it calls, we wait
        return Lease(None, None, fs=self.fs, remote_path=path)

    def _read_remote_lease(self, path: str) -> dict | Completion | None:
        try:
            body = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return None  # damaged: ignored, never trusted
        if not isinstance(body, dict):
            return None
        if "owner" in body:
            return body
        try:
            return _completion(body)
        except TypeError:
            return None

    def _sweep_leases(self) -> None:
        """Remove unlocked lease files whose reply is stored anyway (left by finished runs)."""
        if not self.local:
            try:
                paths = self.fs.glob(f"{self.root.rstrip('/')}/leases/*/*.json")
            except FileNotFoundError:
                return
            done = [p for p in paths if self.get(p.rsplit("/", 1)[1].removesuffix(".json")) is not None]
            if done:
                self.fs.rm(done)
            return
        folder = Path(self.root, "leases")
        if not folder.is_dir():
            return
        for path in folder.glob("*/*"):
            if self.get(path.name) is None:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)
            except BlockingIOError:
                pass  # in flight in a live process
            finally:
                os.close(fd)

    # -- writing -------------------------------------------------------------------------------
    def put(self, completion: Completion) -> None:
        if self.read_only:
            raise PermissionError(f"cache {self.url} was opened read-only")
        if not completion.timestamp:
            completion.timestamp = time.time()
        with self._lock:
            self._remember(completion)
            self._pending.append(completion)
            if self.local:
                self._journal_write(completion)
            # Local replies are already durable in the journal, so shards there can be larger.
            if len(self._pending) >= (self.flush_rows * 8 if self.local else self.flush_rows):
                self._flush_locked()

    def put_many(self, completions: Iterable[Completion]) -> None:
        for c in completions:
            self.put(c)

    def flush(self) -> None:
        """Write pending replies as one new Parquet shard (and retire this process's journal)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        shard = self._write_shard(pending)
        if self._journal is not None:
            self._close_journal(delete=True)
        self._index_written(shard, pending)

    def _index_written(self, shard: _Shard, written: list[Completion]) -> None:
        """Point the index at the rows just written that are their key's winner; drop them from memory."""
        rows = [i for i, c in enumerate(written) if self._memory.get(c.key) is c]
        if not rows:
            return
        sid = len(self._shards)
        self._shards.append(shard)
        moved = [written[i] for i in rows]
        hi, lo = _digest_list([c.key for c in moved])
        self._index = self._index.upsert(
            hi,
            lo,
            at=np.fromiter((self._indexed_at(c.key) for c in moved), dtype=np.int64, count=len(moved)),
            shard=np.full(len(rows), sid, dtype=np.int32),
            row=np.asarray(rows, dtype=np.int32),
            hit=np.fromiter((_is_hit(c) for c in moved), dtype=bool, count=len(moved)),
            ts=np.fromiter((c.timestamp for c in moved), dtype=np.float64, count=len(moved)),
        )
        for c in moved:
            if self._memory.get(c.key) is c:
                del self._memory[c.key]

    def close(self) -> None:
        if not self.read_only:
            self.flush()
        self._close_files()
        for layer in self.fallbacks:
            layer._close_files()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_shard(self, completions: list[Completion]) -> _Shard:
        table = pa.Table.from_pylist([_row(c) for c in completions], schema=CACHE_SCHEMA)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        shard_dir = f"{self.root.rstrip('/')}/shards"
        written: list[pq.FileMetaData] = []
        options = {**shard_write_options(), "metadata_collector": written}
        if self.local:
            Path(shard_dir).mkdir(parents=True, exist_ok=True)
            tmp = Path(shard_dir) / f".{name}.tmp"
            pq.write_table(table, tmp, **options)
            os.replace(tmp, Path(shard_dir) / name)  # atomic: readers see a whole shard or none
            path = str(Path(shard_dir) / name)
        else:
            path = f"{shard_dir}/{name}"
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, **options)
        return _Shard(path, _row_group_starts(written[0]))

    def _journal_write(self, c: Completion) -> None:
        if self._journal is None:
            folder = Path(self.root, "journal")
            folder.mkdir(parents=True, exist_ok=True)
            self._journal_path = folder / f"{uuid.uuid4().hex}.jsonl"
            self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115
            fcntl.flock(self._journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # One write per line and a flush: after SIGKILL the kernel still holds every completed line.
        self._journal.write(json.dumps(_row(c), ensure_ascii=False) + "\n")
        self._journal.flush()

    def _close_journal(self, *, delete: bool) -> None:
        if self._journal is None:
            return
        if delete and self._journal_path is not None:
            self._journal_path.unlink(missing_ok=True)
        self._journal.close()
        self._journal = None
        self._journal_path = None

    def _fold_dead_journals(self) -> None:
        folder = Path(self.root, "journal")
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.jsonl")):
            try:
                f = open(path, "a+", encoding="utf-8")  # noqa: SIM115
            except FileNotFoundError:
                continue
            with f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                if not path.exists():
                    continue  # another process folded it while we waited
                completions = list(_read_journal(path))
                if completions:
                    self._write_shard(completions)
                path.unlink(missing_ok=True)
                logger.info("folded %d replies from an interrupted run's journal", len(completions))


class Lease:
    """The right to make one call; :meth:`release` with the completion (kept for waiters if a hit)."""

    __slots__ = ("fd", "fs", "path", "remote_path", "stale")

    def __init__(
        self,
        fd: int | None,
        path: str | None,
        *,
        fs=None,
        remote_path: str | None = None,
        stale: bool = False,
    ) -> None:
        self.fd, self.path = fd, path
        self.fs, self.remote_path = fs, remote_path
        self.stale = stale  # the file held something (a damaged or failed record): truncate before writing

    def release(self, completion: Completion | None = None) -> None:
        if self.remote_path is not None:
            self._release_remote(completion)
            return
        if self.fd is None:
            return
        try:
            if completion is not None and _is_hit(completion):
                body = (json.dumps(_row(completion), ensure_ascii=False) + "\n").encode("utf-8", "replace")
                if self.stale:
                    os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, body, 0)
        except OSError as e:  # a waiter then calls itself: a cost, never a wrong answer
            logger.debug("could not record the reply in lease %s: %s", self.path, e)
        finally:
            os.close(self.fd)
            self.fd = None

    def _release_remote(self, completion: Completion | None) -> None:
        path, self.remote_path = self.remote_path, None
        try:
            if completion is not None and _is_hit(completion):
                self.fs.pipe_file(
                    path, json.dumps(_row(completion), ensure_ascii=False).encode("utf-8", "replace")
                )
            else:
                self.fs.rm(path)
        except (OSError, FileNotFoundError) as e:
            logger.debug("could not release lease %s: %s", path, e)


def _row(c: Completion) -> dict:
    # getattr, not dataclasses.asdict: asdict deep-copies every field and sat on the reply hot path.
    return {k: getattr(c, k, None) for k in _COLUMNS}


def _completion(row: dict) -> Completion:
    return Completion(**{k: v for k, v in row.items() if k in _COMPLETION_FIELDS and v is not None})


def _read_journal(path: Path) -> Iterator[Completion]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.endswith("\n"):
                logger.warning("ignoring a torn last line in %s", path)  # killed mid-write
                break
            try:
                yield _completion(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                logger.warning("ignoring a bad line %d in %s: %s", n, path, e)


# -- the compact index ---------------------------------------------------------------------------
class _Shard:
    """A shard file and the first row of each of its row groups (the row count last)."""

    __slots__ = ("path", "starts")

    def __init__(self, path: str, starts: np.ndarray) -> None:
        self.path, self.starts = path, starts


class _KeyIndex:
    """Sorted 128-bit key digests and, for each stored key, where its winning record lives, its
    status and time.

    33 bytes a key: digest (two uint64), shard and row (int32), hit (bool), timestamp (float64). Two
    keys may share a digest (a collision, or keys crafted so): each keeps its own entry, and readers
    compare the full key of every candidate row they read. Never changed in place: :meth:`upsert`
    returns a new index, so a reader holding the old one reads consistent arrays.
    """

    __slots__ = ("hi", "hit", "lo", "row", "shard", "ts")

    def __init__(self, hi, lo, shard, row, hit, ts) -> None:
        self.hi, self.lo, self.shard, self.row, self.hit, self.ts = hi, lo, shard, row, hit, ts

    @classmethod
    def empty(cls) -> _KeyIndex:
        u = np.empty(0, dtype=np.uint64)
        i = np.empty(0, dtype=np.int32)
        return cls(u, u, i, i, np.empty(0, dtype=bool), np.empty(0, dtype=np.float64))

    @classmethod
    def resolve(
        cls,
        parts: list[tuple[np.ndarray, ...]],
        keys_at: Callable[[np.ndarray, np.ndarray], list[str]],
    ) -> _KeyIndex:
        """The index of records given in load order (shard by shard, row by row), one winner a key.

        Folding :meth:`GenerationCache._remember` over records in order keeps, of a key's records,
        the hit with the latest timestamp (the later one on a tie), or the first record when none is
        a hit. Only a digest shared by several records (a key written more than once, or two keys)
        needs that rule: those records are sorted by (hit, timestamp of a hit, load order of a hit or
        its reverse otherwise), which puts each key's winner last, and ``keys_at`` tells their full
        keys apart.
        """
        if not parts:
            return cls.empty()
        hi, lo, shard, row, hit, ts = (np.concatenate(c) for c in zip(*parts, strict=True))
        parts.clear()  # the caller's per-shard arrays: freed before the sort's
        pick = np.lexsort((lo, hi))
        hi, lo = hi[pick], lo[pick]
        n = len(pick)
        first = np.ones(n, dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        keep = np.ones(n, dtype=bool)
        keep[:-1] = first[1:]  # the last record of its digest
        shared = np.flatnonzero(~(first & keep))  # records of a digest with more than one
        keep[shared] = False
        if len(shared):
            group = np.cumsum(first)[shared]
            del first
            loaded = pick[shared]  # the records' places in load order
            hits = hit[loaded]
            # Within a digest, records in precedence order: the winner of each key comes last.
            order = np.lexsort(
                (np.where(hits, loaded, -loaded), np.where(hits, ts[loaded], 0.0), hits, group)
            )
            shared, group, loaded = shared[order], group[order], loaded[order]
            winners: dict[tuple[int, str], int] = {}
            keys = keys_at(shard[loaded], row[loaded])
            for i, g, key in zip(shared.tolist(), group.tolist(), keys, strict=True):
                winners[(g, key)] = i
            keep[list(winners.values())] = True
        pick = pick[keep]
        return cls(hi[keep], lo[keep], shard[pick], row[pick], hit[pick], ts[pick])

    def __len__(self) -> int:
        return len(self.hi)

    def find(self, hi: int, lo: int) -> list[int]:
        """Positions whose digest is (hi, lo): one per stored key with that digest (almost always 0 or 1)."""
        at = int(np.searchsorted(self.hi, np.uint64(hi), side="left"))
        found = []
        while at < len(self.hi) and self.hi[at] == hi:
            if self.lo[at] == lo:
                found.append(at)
            at += 1
        return found

    def find_many(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(i, position) pairs for every position whose digest is (hi[i], lo[i])."""
        if not len(self.hi) or not len(hi):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        start = np.searchsorted(self.hi, hi, side="left")
        end = np.searchsorted(self.hi, hi, side="right")
        single = np.flatnonzero(end - start == 1)
        single = single[self.lo[start[single]] == lo[single]]
        asked, at = [single], [start[single]]
        # Runs of equal first 64 bits: walked one by one (they practically never occur).
        for i in np.flatnonzero(end - start > 1).tolist():
            run = np.arange(start[i], end[i])
            run = run[self.lo[run] == lo[i]]
            asked.append(np.full(len(run), i, dtype=np.int64))
            at.append(run)
        return np.concatenate(asked).astype(np.int64), np.concatenate(at).astype(np.int64)

    def upsert(self, hi, lo, *, at, shard, row, hit, ts) -> _KeyIndex:
        """A new index where the records' keys are at these locations: ``at`` is a key's current
        position, -1 for a key not in the index (the caller applied the precedence rule)."""
        old = at >= 0
        arrays = [a.copy() for a in (self.shard, self.row, self.hit, self.ts)]
        news = (shard, row, hit, ts)
        for a, new in zip(arrays, news, strict=True):
            a[at[old]] = new[old]
        # New keys go in sorted among themselves (np.insert keeps the given order at one position),
        # each at its first-64-bit place; find walks a run of equal prefixes in any order.
        add = np.flatnonzero(~old)
        add = add[np.argsort(hi[add], kind="stable")]
        where = np.searchsorted(self.hi, hi[add], side="left")
        return _KeyIndex(
            np.insert(self.hi, where, hi[add]),
            np.insert(self.lo, where, lo[add]),
            *(np.insert(a, where, new[add]) for a, new in zip(arrays, news, strict=True)),
        )


def _digest(key: str) -> tuple[int, int]:
    """128 bits of ``key``: a sha256 hex key folded in half (all its digits count), else blake2b."""
    if len(key) == 64 and _HEX_KEY.fullmatch(key):
        lo = int(key[16:32], 16) ^ int(key[48:64], 16)
        return int(key[:16], 16) ^ int(key[32:48], 16) ^ ((lo * _MIX) & _U64), lo
    d = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def _digest_list(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    hi = np.empty(len(keys), dtype=np.uint64)
    lo = np.empty(len(keys), dtype=np.uint64)
    for i, k in enumerate(keys):
        hi[i], lo[i] = _digest(k)
    return hi, lo


def _digests(keys: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_digest` of a key column, vectorised for 64-digit lowercase hex keys (sha256 hex)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = keys.cast(pa.string())
    n = len(keys)
    if n == 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32)[keys.offset : keys.offset + n + 1]
    if keys.null_count or not np.all(np.diff(offsets) == 64):
        return _digest_list([k if k is not None else "" for k in keys.to_pylist()])
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(n, 64)
    nibbles = _NIBBLE[data]
    hi = np.zeros(n, dtype=np.uint64)
    lo = np.zeros(n, dtype=np.uint64)
    for j in range(16):
        hi = (hi << np.uint64(4)) | (nibbles[:, j] ^ nibbles[:, 32 + j])
        lo = (lo << np.uint64(4)) | (nibbles[:, 16 + j] ^ nibbles[:, 48 + j])
    hi ^= lo * np.uint64(_MIX)  # wraps modulo 2**64, as _digest's mask does
    odd = np.flatnonzero((nibbles == 255).any(axis=1))
    if len(odd):
        hi[odd], lo[odd] = _digest_list([keys[int(i)].as_py() for i in odd])
    return hi, lo


def _row_group_starts(meta: pq.FileMetaData) -> np.ndarray:
    counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def _index_shard(path: str, parquet: pq.ParquetFile, sid: int) -> tuple[_Shard, tuple[np.ndarray, ...]]:
    """The shard's row groups and its index records (in row order), reading four small columns only."""
    names = parquet.schema_arrow.names
    if "key" not in names:
        raise ValueError(f"no key column; columns are {names}")
    table = parquet.read(columns=[c for c in _INDEX_COLUMNS if c in names])
    n = table.num_rows
    hi, lo = _digests(table.column("key"))
    if "error" in names:
        hit = table.column("error").is_null().to_numpy(zero_copy_only=False)
        if "error_kind" in names:
            permanent = pc.fill_null(pc.equal(table.column("error_kind"), "permanent"), False)
            hit = hit | permanent.to_numpy(zero_copy_only=False)
    else:
        hit = np.ones(n, dtype=bool)
    if "timestamp" in names:
        ts = pc.fill_null(table.column("timestamp").cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
    else:
        ts = np.zeros(n, dtype=np.float64)
    rows = np.arange(n, dtype=np.int32)
    part = (hi, lo, np.full(n, sid, dtype=np.int32), rows, np.asarray(hit, dtype=bool), np.asarray(ts))
    return _Shard(path, _row_group_starts(parquet.metadata)), part
