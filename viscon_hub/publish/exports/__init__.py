"""Exports: one mix of a built dataset, rewritten in the format a training codebase reads.

``export`` reads the shards ``<dataset>/<config>/<split>-NNNNN-of-MMMMM.parquet`` a batch at a time and
hands the rows to one format module:

=============  ==========================================================================  ===========
format         writes (under ``output``)                                                   trainer
=============  ==========================================================================  ===========
llava          ``<config>_<split>.json`` + ``images/<sha256>.<ext>``                       LLaVA
idefics        ``<config>_idefics/<split>-NNNNN-of-MMMMM.parquet`` (images embedded)        IDEFICS2
messages       ``<config>_messages/<split>-NNNNN-of-MMMMM.parquet`` (images embedded)       TRL
llamafactory   ``<config>_<split>.json`` + ``images/`` + ``dataset_info.json``               LLaMA-Factory
captioner      ``<config>_captioner/<split>-NNNNN-of-MMMMM.parquet`` (a per-image config)   TRL SFT
=============  ==========================================================================  ===========

The Parquet formats write shards of at most ``max_shard_size`` bytes (default 500MB, as a build and
``push_to_hub``), named like a build's, so ``load_dataset("<output>/<config>_idefics")`` loads
the splits with their ``Image`` features and a Hub push uploads them as they are. A split without
rows gets no shard. The JSON formats write one file per split, which is what their trainers read.

Every file is a pure function of the input rows: no absolute path, no timestamp, so two exports of
one build are byte-identical. A row a trainer would choke on (a literal ``<image>`` in its text,
turns that do not alternate) is skipped and counted under ``skipped`` in the summary, not raised.

>>> FORMATS
('llava', 'idefics', 'messages', 'llamafactory', 'captioner')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow.parquet as pq

from viscon_hub.build.layout import (
    DEFAULT_MAX_SHARD_SIZE,
    MIXES,
    NON_CONTEXTUAL_MIXES,
    PER_IMAGE_CONFIGS,
    SPLITS,
    check_config,
    data_files,
    data_glob,
    parse_size,
    shard_name,
)
from viscon_hub.build.writer import ShardWriter, replace_splits
from viscon_hub.errors import ConfigError

logger = logging.getLogger(__name__)

Format = Literal["llava", "idefics", "messages", "llamafactory", "captioner"]
FORMATS: tuple[str, ...] = ("llava", "idefics", "messages", "llamafactory", "captioner")
# The formats written as Parquet shards (the others are JSON files a trainer reads whole).
PARQUET_FORMATS: tuple[str, ...] = ("idefics", "messages", "captioner")
# Image datasets use 100-row Parquet row groups (the datasets default for images): a batch of rows
# with embedded images stays a few tens of MB in memory.
BATCH_ROWS = 100
# Placeholders trainers count against the images they were given (LLaVA and IDEFICS: <image>;
# LLaMA-Factory also <video>, <audio>). Text that already holds one would break that count.
PLACEHOLDERS = ("<image>", "<video>", "<audio>")
IMAGE_FOLDER = "images"
_READ_COLUMNS = ("id", "image", "messages")
_EXT = re.compile(r"[a-z0-9]{1,5}")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def export(
    *,
    dataset: str | os.PathLike[str],
    config: str = "leaky",
    format: str,
    output: str | os.PathLike[str],
    split: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Write one mix of a built dataset folder in a trainer's format; return a summary.

    ``max_shard_size`` (bytes, or a size such as ``200KB``) bounds each Parquet shard of the
    Parquet formats; the JSON formats ignore it.

    The summary holds ``format``, ``config``, ``splits``, ``files`` (paths relative to ``output``,
    every shard of the Parquet formats),
    ``rows`` written per split, ``skipped`` rows per reason and, for the formats with an image folder,
    ``images`` (distinct image files referenced).

    >>> summary = export(dataset="viscon", config="leaky", format="llava", output="viscon-llava")  # doctest: +SKIP
    >>> summary["files"]  # doctest: +SKIP
    ['leaky_test.json', 'leaky_train.json']
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    max_shard_size = parse_size(max_shard_size)
    root = Path(dataset)
    if format == "captioner":
        from viscon_hub.publish.exports import captioner

        splits = _check_source(root, config, split, per_image=True, columns=captioner.COLUMNS)
    else:
        splits = _check_source(root, config, split)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export output {out} is a file; expected a folder (it is created if missing)")
    if out.resolve() == root.resolve():
        raise ConfigError(f"export output {out} is the dataset folder itself; name another folder")
    out.mkdir(parents=True, exist_ok=True)
    source = Source(root, config)

    if format == "llava":
        from viscon_hub.publish.exports import llava as module
    elif format == "idefics":
        from viscon_hub.publish.exports import idefics as module
    elif format == "messages":
        from viscon_hub.publish.exports import messages as module
    elif format == "captioner":
        from viscon_hub.publish.exports import captioner as module
    else:
        from viscon_hub.publish.exports import llamafactory as module
    options = {"max_shard_size": max_shard_size} if format in PARQUET_FORMATS else {}
    result = module.write(source, splits=splits, output=out, **options)
    summary = {"format": format, "config": config, "splits": list(splits), **result}
    logger.info("exported %s as %s: %s", config, format, summary["rows"])
    return summary


def _check_source(
    root: Path, config: str, split: str | None, *, per_image: bool = False, columns=_READ_COLUMNS
) -> tuple[str, ...]:
    if per_image and config not in PER_IMAGE_CONFIGS:
        raise ConfigError(
            f"the captioner export reads one row per image: --config one of {', '.join(PER_IMAGE_CONFIGS)}; "
            f"got {config!r}"
        )
    if config in PER_IMAGE_CONFIGS and not per_image:
        raise ConfigError(
            f"config {config!r} holds one row per image, not conversations; "
            f"export a mix such as leaky (one of {', '.join(MIXES + NON_CONTEXTUAL_MIXES)})"
        )
    check_config(config)
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} (or none for all)")
    if not root.is_dir():
        raise ConfigError(
            f"dataset folder {root} does not exist; expected a folder written by `viscon build`"
        )
    splits = (split,) if split else SPLITS
    missing = [data_glob(config, s) for s in splits if not data_files(root, config, s)]
    if missing:
        kinds = PER_IMAGE_CONFIGS if per_image else MIXES + NON_CONTEXTUAL_MIXES
        found = [c for c in kinds if data_files(root, c, splits[0])]
        raise ConfigError(
            f"{root} has no {', '.join(missing)}; mixes found there: {', '.join(found) or 'none'}. "
            f"Build it with `viscon build --configs {config}` or export one of those"
        )
    for path in (f for s in splits for f in data_files(root, config, s)):
        names = set(pq.read_schema(root / path).names)
        lacking = [c for c in columns if c not in names]
        if lacking:
            raise ConfigError(
                f"{root / path} is not a viscon {'per-image config' if per_image else 'mix'}: "
                f"expected columns {', '.join(columns)}, found {', '.join(sorted(names))}"
            )
    return splits


class Source:
    """The rows of one config of a built folder, read a batch at a time.

    >>> next(Source("viscon", "leaky").batches("train"))[0]["messages"][0]["role"]  # doctest: +SKIP
    'user'
    """

    def __init__(self, root: str | os.PathLike[str], config: str):
        self.root = Path(root)
        self.config = config

    def batches(self, split: str, columns: Sequence[str] = _READ_COLUMNS) -> Iterator[list[dict[str, Any]]]:
        """Lists of at most ``BATCH_ROWS`` rows (``id``, ``image``, ``messages``), shard after shard."""
        for path in data_files(self.root, self.config, split):
            with pq.ParquetFile(self.root / path) as f:
                for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
                    yield batch.to_pylist()


def skip_reason(row: dict[str, Any]) -> str | None:
    """Why a trainer could not take this row as it is, or None when it can.

    >>> skip_reason({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]})
    >>> skip_reason({"messages": [{"role": "user", "content": "Where is <image>?"}, {"role": "assistant", "content": "."}]})
    'placeholder_in_text'
    """
    messages = row.get("messages") or []
    if not messages or len(messages) % 2:
        return "not_user_assistant_pairs"
    for i, m in enumerate(messages):
        if m.get("role") != ("user", "assistant")[i % 2] or not isinstance(m.get("content"), str):
            return "not_user_assistant_pairs"
        if any(p in m["content"] for p in PLACEHOLDERS):
            return "placeholder_in_text"
    return None


def rounds(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a row that passed ``skip_reason``."""
    messages = row["messages"]
    return [(u["content"], a["content"]) for u, a in zip(messages[::2], messages[1::2])]


def image_name(image: dict[str, Any] | None) -> str | None:
    """``<sha256 of the bytes>.<ext>``: the file name (and embedded path) of an image, None without bytes.

    The extension comes from the stored path when it has a plain one, else from the bytes.

    >>> image_name({"bytes": b"\\x89PNG\\r\\n\\x1a\\nrest", "path": None})[-4:]
    '.png'
    """
    if not image or not image.get("bytes"):
        return None
    data = image["bytes"]
    ext = Path(image.get("path") or "").suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg"}.get(ext, ext)
    if not _EXT.fullmatch(ext):
        ext = _sniff(data)
    return f"{hashlib.sha256(data).hexdigest()}.{ext}"


def _sniff(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def embedded_image(image: dict[str, Any] | None) -> dict[str, Any] | None:
    """The image as a datasets ``Image`` value with its bytes and a portable relative path."""
    name = image_name(image)
    return {"bytes": image["bytes"], "path": name} if name else None


class ImageFolder:
    """Writes each image once, by content name, into ``<output>/images``.

    Files already there are trusted: their name is the hash of their content, so a second export
    (or another config exported into the same folder) reuses them.
    """

    def __init__(self, output: Path):
        self.root = output / IMAGE_FOLDER
        # The folder exists even when no row has an image, so --image_folder and tar always find it.
        self.root.mkdir(parents=True, exist_ok=True)
        self.names: set[str] = set()
        self.written = 0

    def add(self, image: dict[str, Any] | None) -> str | None:
        """Store an image; return its name relative to the folder (None for a row without an image)."""
        name = image_name(image)
        if name is None or name in self.names:
            return name
        self.names.add(name)
        path = self.root / name
        if not path.is_file():
            with atomic_open(path, "wb") as f:
                f.write(image["bytes"])
            self.written += 1
        return name


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write, renamed into place only on success.

    An interrupted export leaves no half-written file under a final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """``open(path, mode)`` through ``atomic_path``; text is UTF-8 with ``\\n`` line ends."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f


class JsonListWriter:
    """Streams a JSON list, one compact element per line, so a large split never sits in memory."""

    def __init__(self, f: IO[str]):
        self.f = f
        self.count = 0

    def add(self, item: Any) -> None:
        self.f.write(",\n" if self.count else "[\n")
        self.f.write(json.dumps(item, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.f.write("\n]\n" if self.count else "[]\n")


def write_json_splits(
    source: Source, *, splits, output: Path, images: ImageFolder, tally: Tally, to_sample
) -> list[str]:
    """One ``<config>_<split>.json`` list per split, ``to_sample(row, image path)`` per kept row; the names."""
    files = []
    for split in splits:
        name = f"{source.config}_{split}.json"
        with atomic_open(output / name) as f:
            writer = JsonListWriter(f)
            for batch in source.batches(split):
                for row in batch:
                    if tally.keep(row):
                        writer.add(to_sample(row, images.add(row["image"])))
            writer.close()
        tally.rows[split] = writer.count
        files.append(name)
    return files


def write_parquet_splits(
    source: Source, *, splits, output: Path, features, to_row, folder: str, max_shard_size: int
) -> dict[str, Any]:
    """``<folder>/<split>-NNNNN-of-MMMMM.parquet`` shards of ``to_row(row)`` per kept row; the summary part."""
    tally = Tally()

    def rows(split: str) -> Iterator[list[dict[str, Any]]]:
        for batch in source.batches(split):
            yield [to_row(r) for r in batch if tally.keep(r)]

    counts, files = write_parquet(
        output, folder, features, {s: rows(s) for s in splits}, max_shard_size=max_shard_size
    )
    tally.rows.update(counts)
    return {"files": files, **tally.summary()}


def write_parquet(
    output: Path,
    folder: str,
    features: Any,
    splits: dict[str, Iterable[list[dict[str, Any]]]],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> tuple[dict[str, int], list[str]]:
    """Write each split's row batches as shards ``<folder>/<split>-NNNNN-of-MMMMM.parquet`` of at most
    ``max_shard_size`` bytes under ``output``; return rows per split and the files (relative, sorted).

    The build's :class:`~viscon_hub.build.writer.ShardWriter` cuts the shards (one batch in memory at
    a time) in ``<output>/.<folder>.staging``; the finished folder then replaces ``<output>/<folder>``
    (:func:`~viscon_hub.build.writer.replace_splits`), so shards of an earlier export of these splits
    never outlive it and a killed export leaves no half file under a final name. The schema carries
    ``features``, so datasets restores ``Image`` columns. A split without rows gets no file, as in a
    build: ``load_dataset`` on the folder fails on a Parquet file of 0 rows.
    """
    staging = output / f".{folder}.staging"
    if staging.exists():
        shutil.rmtree(staging)  # what a killed export left
    writer = ShardWriter(staging, {folder: features.arrow_schema}, max_shard_size=max_shard_size)
    try:
        for split, batches in splits.items():
            for rows in batches:
                writer.add(folder, split, rows)
        writer.close()
        replace_splits(staging / folder, output / folder, splits)
    finally:
        writer.abort()  # closes what is still open and removes the staging folder
    counts = {s: writer.counts[folder][s] for s in splits}
    shards = writer.shards[folder]
    files = sorted(f"{folder}/{shard_name(s, i, shards[s])}" for s in splits for i in range(shards[s]))
    return counts, files


class Tally:
    """Rows written per split and rows skipped per reason, as the summary reports them."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.skipped: Counter[str] = Counter()

    def keep(self, row: dict[str, Any]) -> bool:
        reason = skip_reason(row)
        if reason is None:
            return True
        self.skipped[reason] += 1
        logger.debug("skipping %s: %s", row.get("id"), reason)
        return False

    def summary(self) -> dict[str, Any]:
        return {"rows": dict(self.rows), "skipped": dict(sorted(self.skipped.items()))}


__all__ = [
    "BATCH_ROWS",
    "FORMATS",
    "IMAGE_FOLDER",
    "PARQUET_FORMATS",
    "PLACEHOLDERS",
    "ImageFolder",
    "Source",
    "Tally",
    "embedded_image",
    "export",
    "image_name",
    "rounds",
    "skip_reason",
]
