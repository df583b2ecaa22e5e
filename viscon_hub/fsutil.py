"""Small fsspec helpers shared by the stages."""

from __future__ import annotations

import fsspec


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem, where atomic renames and file locks are available."""
    return protocol_of(fs) in ("file", "local")
