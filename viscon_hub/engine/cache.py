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

>>> import tempfile
>>> cache = GenerationCache(tempfile.mkdtemp())
>>> cache.put(Completion(key="k" * 64, reply="hello", model="m", stage="s"))
>>> cache.get("k" * 64).reply
'hello'
>>> cache.close()
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub.engine.prices import PriceTable, Usage
from viscon_hub.engine.request import Completion
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


def _is_hit(c: Completion) -> bool:
    return c.error is None or c.error_kind == "permanent"


class GenerationCache:
    """Content-addressed store of model replies; see the module docstring for the layout."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        read_only: bool = False,
        flush_rows: int = 256,
        fallbacks: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.url = str(url)
        # Read-only layers asked after this cache (a pulled or bundled cache); writes go here only.
        self.fallbacks = [GenerationCache(f, read_only=True) for f in fallbacks]
        self.read_only = read_only
        self.flush_rows = flush_rows
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = is_local(self.fs)
        self._entries: dict[str, Completion] = {}
        self._pending: list[Completion] = []
        self._lock = threading.Lock()
        self._journal = None
        self._journal_path: Path | None = None
        self._owner = uuid.uuid4().hex
        self._lease_dirs: set[str] = set()
        self._load()

    # -- reading -------------------------------------------------------------------------------
    def _load(self) -> None:
        if self.local and not self.read_only:
            self._fold_dead_journals()
        for path in self._shard_paths():
            try:
                with self.fs.open(path, "rb") as f:
                    table = pq.read_table(f)
            except Exception as e:  # noqa: BLE001 - a damaged shard must not hide the others
                logger.warning("skipping unreadable cache shard %s: %s", path, e)
                continue
            for row in table.to_pylist():
                self._remember(_completion(row))
        if self.local:
            for path in sorted(Path(self.root, "journal").glob("*.jsonl")):
                for completion in _read_journal(path):
                    self._remember(completion)

        if not self.read_only:
            self._sweep_leases()

    def _shard_paths(self) -> list[str]:
        pattern = f"{self.root.rstrip('/')}/shards/*.parquet"
        try:
            return sorted(self.fs.glob(pattern))
        except FileNotFoundError:
            return []

    def _remember(self, c: Completion) -> None:
        old = self._entries.get(c.key)
        # A hit is never replaced by a transient error; otherwise the newest record wins.
        if old is None or (_is_hit(c) and (not _is_hit(old) or c.timestamp >= old.timestamp)):
            self._entries[c.key] = c

    def get(self, key: str) -> Completion | None:
        """The stored reply (or permanent error) for ``key``; None when a model must be asked."""
        c = self._entries.get(key)
        if c is not None and _is_hit(c):
            return c
        for layer in self.fallbacks:
            hit = layer.get(key)
            if hit is not None:
                return hit
        return None

    def record(self, key: str) -> Completion | None:
        """Whatever is stored for ``key``, transient errors included."""
        return self._entries.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def usage(
        self, keys: Iterable[str], *, prices: PriceTable | None = None, batch_models: Iterable[str] = ()
    ) -> Usage:
        """What the replies under ``keys`` cost, per model; each key counted once, missing keys skipped."""
        usage = Usage(prices, batch_models=batch_models)
        for key in dict.fromkeys(keys):
            c = self.get(key) if key else None
            if c is not None:
                usage.add(c.model or "unknown", c.prompt_tokens, c.completion_tokens)
        return usage

    def __iter__(self) -> Iterator[Completion]:
        return iter(self._entries.values())

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
        self._write_shard(self._pending)
        self._pending = []
        if self._journal is not None:
            self._close_journal(delete=True)

    def close(self) -> None:
        if not self.read_only:
            self.flush()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_shard(self, completions: list[Completion]) -> None:
        table = pa.Table.from_pylist([_row(c) for c in completions], schema=CACHE_SCHEMA)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        shard_dir = f"{self.root.rstrip('/')}/shards"
        if self.local:
            Path(shard_dir).mkdir(parents=True, exist_ok=True)
            tmp = Path(shard_dir) / f".{name}.tmp"
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, Path(shard_dir) / name)  # atomic: readers see a whole shard or none
        else:
            with self.fs.open(f"{shard_dir}/{name}", "wb") as f:
                pq.write_table(table, f, compression="zstd")

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
