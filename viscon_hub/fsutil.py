"""Small fsspec helpers shared by the stages."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fsspec


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem, where atomic renames and file locks are available."""
    return protocol_of(fs) in ("file", "local")


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
