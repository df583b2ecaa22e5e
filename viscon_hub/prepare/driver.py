"""The prepare stage: OBELICS-shaped documents in, image contexts (Parquet) and stats out.

read -> validate -> token filter -> context extraction -> image acquisition -> Parquet, one bounded
batch at a time, so memory stays flat however large the corpus.

>>> import tempfile
>>> out = tempfile.mkdtemp()
>>> stats = prepare(PrepareConfig(output=out, limit=3, fetch_images=False))
>>> stats.documents_read
3
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub import __version__
from viscon_hub.errors import ConfigError
from viscon_hub.fsutil import StagingDir, is_local, write_shard_stats
from viscon_hub.prepare.contexts import extract_contexts
from viscon_hub.prepare.filters import FilterConfig, Filters
from viscon_hub.prepare.images import FetchPolicy, ImageStore, acquire_images_sync
from viscon_hub.prepare.readers import RawRow, read_rows, resolve_source
from viscon_hub.prepare.tokens import TokenCounter
from viscon_hub.prepare.validate import parse_row
from viscon_hub.recipe import opt
from viscon_hub.records import IMAGE_CONTEXT_SCHEMA, Document, ImageContext, ImageSource
from viscon_hub.runners import RunnerOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareConfig:
    """Everything ``viscon prepare`` takes; the CLI flags and a YAML recipe fill the same fields."""

    source: str | None = opt(
        None,
        "OBELICS-shaped Parquet/JSONL file, folder, glob or fsspec URL, or a Hub dataset id "
        "(e.g. HuggingFaceM4/OBELICS; prefix hub: to force); default: the bundled sample",
    )
    output: str = opt("viscon-contexts", "output folder or fsspec URL", local=True)
    limit: int | None = opt(None, "read at most N rows (per shard)")
    max_tokens: int = opt(2000, "keep documents of at most N text tokens")
    tokenizer: str | None = opt(
        None,
        "tokenizer.json, a folder with one, or a model id available offline "
        "(default: the bundled LLaMA/Vicuna vocabulary)",
    )
    num_shards: int = opt(1, "split the corpus into N shards (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    shard_index: int = opt(0, "which shard this job runs (0-based)")
    max_images_per_document: int | None = opt(None, "keep at most the first N images of each document")
    fetch_images: bool = opt(True, "acquire images (--no-images: contexts only)", flag="--no-images")
    image_store: str | None = opt(None, "content-addressed image store (default: OUTPUT/images)", local=True)
    fetch: FetchPolicy = opt(factory=FetchPolicy, help="how images are acquired")
    batch_size: int = opt(256, "documents per batch")
    split: str = opt("train", "split of a Hub dataset")
    dataset_config: str | None = opt(None, "config of a Hub dataset")
    revision: str | None = opt(None, "revision of a Hub dataset")
    image_roots: tuple[str, ...] = opt(
        (),
        "also read local images under DIR (repeatable); by default only under each source file's folder",
        flag="--image-root",
        metavar="DIR",
        local=True,
    )
    filters: FilterConfig = opt(factory=FilterConfig, help="offline safety and language filters")
    runner: RunnerOptions = opt(
        factory=RunnerOptions, help="where prepare runs: locally, or on Ray", local=True
    )

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1; got {self.max_tokens}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be >= 0; got {self.limit}")
        if self.num_shards < 1:
            raise ConfigError(f"--num-shards must be >= 1; got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"--shard-index must be in [0, {self.num_shards - 1}] for --num-shards {self.num_shards}; "
                f"got {self.shard_index}"
            )
        if self.max_images_per_document is not None and self.max_images_per_document < 1:
            raise ConfigError(f"--max-images-per-document must be >= 1; got {self.max_images_per_document}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {self.batch_size}")
        if not self.output:
            raise ConfigError("--output must name a folder")
        roots = self.image_roots
        if isinstance(roots, str) or not all(isinstance(r, str) and r for r in roots):
            raise ConfigError(f"image_roots (--image-root) must be a list of folders; got {roots!r}")
        object.__setattr__(self, "image_roots", tuple(roots))

    @property
    def store_url(self) -> str:
        return self.image_store or self.output.rstrip("/") + "/images"

    @property
    def shard_name(self) -> str:
        return f"{self.shard_index:05d}-of-{self.num_shards:05d}"

    @classmethod
    def from_recipe(cls, path: str | os.PathLike[str], **overrides: Any) -> PrepareConfig:
        """The ``prepare`` section of a YAML recipe, then the ``overrides`` that are not None on top."""
        from viscon_hub.recipe import load

        return load(cls, path, "prepare", overrides={k: v for k, v in overrides.items() if v is not None})


@dataclass(slots=True)
class PrepareStats:
    """Counts of one prepare run; ``dropped`` maps a reason to how many rows or images it removed."""

    documents_read: int = 0
    documents_valid: int = 0
    documents_kept: int = 0
    images_seen: int = 0
    images_capped: int = 0
    images_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    text_tokens_kept: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = dict(sorted(self.dropped.items()))
        return d

    @classmethod
    def merge(cls, parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
        total = cls()
        for part in parts:
            for f in fields(cls):
                if f.name == "dropped":
                    total.dropped.update(part.get("dropped", {}))
                else:
                    setattr(total, f.name, getattr(total, f.name) + int(part.get(f.name, 0)))
        return total.to_dict()


def prepare(config: PrepareConfig, *, progress: Callable[[int], None] | None = None) -> PrepareStats:
    """Run the prepare stage; write ``contexts/part-*.parquet``, ``drops/`` and ``stats.json`` under the output."""
    started = time.monotonic()
    spec = resolve_source(
        config.source, split=config.split, config=config.dataset_config, revision=config.revision
    )
    counter = TokenCounter(config.tokenizer)
    store = ImageStore(config.store_url) if config.fetch_images else None
    stats = PrepareStats()
    seen: set[str] = set()
    filters = Filters(config.filters) if config.filters.active else None
    out = _Output(config)
    try:
        for batch in _batched(source_rows(config), config.batch_size):
            contexts = process_batch(
                batch,
                config=config,
                counter=counter,
                stats=stats,
                drops=out.drops,
                seen=seen,
                filters=filters,
            )
            if store is not None:
                contexts = _attach_images(
                    contexts, config=config, store=store, stats=stats, drops=out.drops, filters=filters
                )
            stats.images_kept += len(contexts)
            out.write(contexts)
            if progress is not None:
                progress(len(batch))
        out.commit()
    finally:
        out.close()
    finish(config, stats, spec=spec, tokenizer=counter.spec, started=started)
    return stats


def source_rows(config: PrepareConfig) -> Iterator[RawRow]:
    """The raw rows of this run's source: its ``--limit`` and its shard."""
    return read_rows(
        config.source,
        limit=config.limit,
        num_shards=config.num_shards,
        shard_index=config.shard_index,
        split=config.split,
        config=config.dataset_config,
        revision=config.revision,
    )


def finish(config: PrepareConfig, stats: PrepareStats, *, spec: Any, tokenizer: str, started: float) -> None:
    """Write the run's ``stats.json`` (or its shard's stats file, merged with the others present)."""
    summary = {
        **stats.to_dict(),
        "shard": config.shard_name,
        "source": spec.location if spec.kind == "hub" else (config.source or "sample"),
        "tokenizer": tokenizer,
        "max_tokens": config.max_tokens,
        "filters": config.filters.recipe(),
        "image_store": config.store_url if config.fetch_images else None,
        "viscon_hub_version": __version__,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    _write_stats(config, summary)
    logger.info("prepare: %s", json.dumps(stats.to_dict()))


def process_batch(
    batch: list[RawRow],
    *,
    config: PrepareConfig,
    counter: TokenCounter,
    stats: PrepareStats,
    drops: _DropLog | None = None,
    seen: set[str] | None = None,
    filters: Filters | None = None,
) -> list[ImageContext]:
    """Validate, filter (``filters``), token-filter and extract contexts for one batch of raw rows (no image I/O).

    ``seen`` holds the ids of documents already kept: the same page (URL and content) again is a
    ``duplicate_document`` drop, so that one id never names two rows.
    """
    docs: list[Document] = []
    for raw in batch:
        doc, reason = parse_row(raw, image_roots=config.image_roots)
        if reason != "unreadable_file":  # a damaged file is not a document
            stats.documents_read += 1
        if reason is None and seen is not None:
            if doc.id in seen:
                reason = "duplicate_document"
            else:
                seen.add(doc.id)
        if reason is not None:
            stats.drop(reason)
            if drops is not None:
                drops.add(
                    source=raw.source,
                    row=raw.row,
                    reason=reason,
                    document_id=doc.id if doc is not None else None,
                    detail=raw.error,
                )
            continue
        docs.append(doc)
    stats.documents_valid += len(docs)
    if filters is not None:
        docs = _filter_documents(docs, filters=filters, stats=stats, drops=drops)

    texts = [d.text for d in docs]
    to_count = [i for i, t in enumerate(texts) if not counter.surely_over(t, config.max_tokens)]
    counts = dict(zip(to_count, counter.count([texts[i] for i in to_count])))
    contexts: list[ImageContext] = []
    for i, doc in enumerate(docs):
        n = counts.get(i)
        if n is None or n > config.max_tokens:
            stats.drop("too_many_tokens")
            if drops is not None:
                drops.add(
                    source=doc.source, row=doc.row, reason="too_many_tokens", document_id=doc.id, detail=n
                )
            continue
        doc.text_tokens = n
        stats.documents_kept += 1
        stats.text_tokens_kept += n
        doc_contexts = extract_contexts(doc, max_images=config.max_images_per_document)
        n_images = len(doc.image_positions)
        stats.images_seen += n_images
        if len(doc_contexts) < n_images:
            stats.images_capped += n_images - len(doc_contexts)
            stats.drop("image_over_document_cap", n_images - len(doc_contexts))
        contexts.extend(doc_contexts)
    return contexts


def _filter_documents(
    docs: list[Document], *, filters: Filters, stats: PrepareStats, drops: _DropLog | None
) -> list[Document]:
    kept = []
    for doc in docs:
        reason = filters.document(doc)
        if reason is None:
            kept.append(doc)
            continue
        stats.drop(reason)
        if drops is not None:
            drops.add(source=doc.source, row=doc.row, reason=reason, document_id=doc.id)
    return kept


def _attach_images(
    contexts: list[ImageContext],
    *,
    config: PrepareConfig,
    store: ImageStore,
    stats: PrepareStats,
    drops: _DropLog,
    filters: Filters | None = None,
) -> list[ImageContext]:
    sources = [ImageSource(url=c.image_url, path=c.image_path, data=c.image_bytes) for c in contexts]
    results = acquire_images_sync(sources, policy=config.fetch, store=store)
    kept = []

    def drop(ctx: ImageContext, reason: str, detail: str | None = None) -> None:
        stats.drop(reason)
        drops.add(
            source=ctx.source,
            row=ctx.row,
            reason=reason,
            document_id=ctx.document_id,
            image_index=ctx.image_index,
            detail=detail,
        )

    for ctx, result in zip(contexts, results):
        if result.status != "ok":
            drop(ctx, f"image_{result.reason}", result.error)
            continue
        ctx.image_sha256 = result.sha256
        ctx.width, ctx.height, ctx.image_format = result.width, result.height, result.format
        ctx.image_bytes = None  # the bytes live in the content-addressed store, keyed by image_sha256
        if filters is not None:
            reason = filters.image(ctx, store.get(result.sha256) if filters.needs_bytes else None)
            if reason is not None:
                drop(ctx, reason)
                continue
        kept.append(ctx)
    return kept


class _DropLog:
    """Dropped rows and images, one JSON line each, so a drop is never just a number."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "w", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 - closed by _Output.close

    def add(self, **entry: Any) -> None:
        entry = {k: v for k, v in entry.items() if v is not None}
        self._f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        self._f.close()


class _Output:
    """Writes one shard's Parquet and drop log to a local staging folder; ``commit`` publishes them."""

    def __init__(self, config: PrepareConfig) -> None:
        self.config = config
        self.fs, self.root = fsspec.core.url_to_fs(config.output)
        self.local = is_local(self.fs)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        # Staged beside the target so that the final rename stays on one filesystem.
        self._staging = StagingDir(self.root if self.local else None)
        self.staging = self._staging.path
        self.name = f"part-{config.shard_name}.parquet"
        self.parquet_path = self.staging / self.name
        self.writer = pq.ParquetWriter(self.parquet_path, IMAGE_CONTEXT_SCHEMA, compression="zstd")
        self.drops = _DropLog(self.staging / f"drops-{config.shard_name}.jsonl")
        self._closed = False

    def write(self, contexts: list[ImageContext]) -> None:
        if contexts:
            table = pa.Table.from_pylist([c.to_row() for c in contexts], schema=IMAGE_CONTEXT_SCHEMA)
            self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        self.drops.close()
        self._closed = True
        targets = {
            self.parquet_path: f"{self.root}/contexts/{self.name}",
            self.drops.path: f"{self.root}/drops/{self.drops.path.name}",
        }
        for local, target in targets.items():
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            if self.local:
                os.replace(local, target)  # atomic: a reader never sees half a shard
            else:
                self.fs.put_file(str(local), target)

    def close(self) -> None:
        if not self._closed:
            self.writer.close()
            self.drops.close()
        self._staging.remove()


def _write_stats(config: PrepareConfig, summary: dict[str, Any]) -> None:
    carried = ("source", "tokenizer", "max_tokens", "filters", "image_store")

    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        merged = PrepareStats.merge(parts)
        merged.update({k: summary[k] for k in carried}, viscon_hub_version=__version__)
        return merged

    write_shard_stats(
        config.output, summary, shard_name=config.shard_name, num_shards=config.num_shards, merge=merge
    )


def _batched(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    it = iter(rows)
    while batch := list(islice(it, size)):
        yield batch
