"""Small fsspec helpers shared by the stages."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

# A staging folder with no owner file yet is only that young: mkdtemp and the lock are one step apart.
_UNOWNED_GRACE_S = 600.0


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem, where atomic renames and file locks are available."""
    return protocol_of(fs) in ("file", "local")


class StagingDir:
    """A private folder for one writer, locked while its process lives, beside the outputs it feeds.

    Opening one first removes the staging folders under ``root`` that a killed writer left (their
    lock is free), so a rerun after a SIGKILL leaves nothing behind; another live writer's folder
    (a concurrent shard) is left alone. ``root`` None stages in the system temp folder.

    >>> root = Path(tempfile.mkdtemp())
    >>> live = StagingDir(root)
    >>> dead = root / ".staging-dead"; (dead / "half.parquet").parent.mkdir(); _ = (dead / ".owner").write_text("")
    >>> other = StagingDir(root)           # sweeps the dead one, keeps the live one
    >>> sorted(p.name == live.path.name for p in root.iterdir()), dead.exists()
    ([False, True], False)
    >>> live.remove(); other.remove(); list(root.iterdir())
    []
    """

    PREFIX = ".staging-"

    def __init__(self, root: str | Path | None) -> None:
        if root is not None:
            sweep_dead_staging(Path(root))
        self.path = Path(tempfile.mkdtemp(prefix=self.PREFIX, dir=root))
        self._owner = open(self.path / ".owner", "w")  # noqa: SIM115 - held open for the writer's life
        fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def remove(self) -> None:
        """Delete the folder (what was not moved out of it is dropped) and give up the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if not self._owner.closed:
            self._owner.close()


def sweep_dead_staging(root: Path) -> int:
    """Remove the ``.staging-*`` folders under ``root`` whose writer is gone; how many were removed."""
    removed = 0
    for folder in sorted(root.glob(StagingDir.PREFIX + "*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        owner = folder / ".owner"
        try:
            if not owner.exists():
                if time.time() - folder.stat().st_mtime < _UNOWNED_GRACE_S:
                    continue
            else:
                with open(owner, "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer holds it
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s, left by a writer that was stopped", folder)
        removed += 1
    return removed


def write_shard_stats(
    output: str,
    summary: dict[str, Any],
    *,
    shard_name: str,
    num_shards: int,
    merge: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> None:
    """Write one shard's ``stats/shard-NAME.json``, then ``stats.json`` as ``merge`` of every shard file
    present (plus ``num_shards`` and ``shards_done``).

    Any shard may finish last; the merge is idempotent, so each shard rewrites it.
    """
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(f"{root}/stats", exist_ok=True)
    with fs.open(f"{root}/stats/shard-{shard_name}.json", "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    parts = []
    for path in sorted(fs.glob(f"{root}/stats/shard-*-of-{num_shards:05d}.json")):
        with fs.open(path, "r") as f:
            parts.append(json.load(f))
    merged = merge(parts)
    merged.update(num_shards=num_shards, shards_done=len(parts))
    with fs.open(f"{root}/stats.json", "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
