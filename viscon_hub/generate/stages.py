"""The model stages: captions, then free-form and multiple-choice Q&A, all through one engine.

Stages only build requests and parse replies; the engine calls, caches and accounts. Raw replies
live in the cache, so a changed parser re-parses without calling a model, and a changed Q&A prompt
leaves the cached captions valid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub import __version__
from viscon_hub.engine import (
    Engine,
    EngineConfig,
    GenerationCache,
    Request,
    RunReport,
    parse_spec,
)
from viscon_hub.engine.backends.openai_batch import BatchFilesWritten
from viscon_hub.engine.engine import BUDGET_STOP, OFFLINE_MISS, endpoint_of
from viscon_hub.errors import ConfigError, EndpointError, RunFailedError
from viscon_hub.fsutil import is_local, write_shard_stats
from viscon_hub.generate.parsers import parse_freeform, parse_multiple_choice
from viscon_hub.generate.prompts import PromptTemplate, context_fields, load_template
from viscon_hub.prepare.images import ImageStore
from viscon_hub.recipe import opt
from viscon_hub.records import GENERATION_SCHEMA, ImageContext
from viscon_hub.resources import cache_alias
from viscon_hub.runners import RunnerOptions

logger = logging.getLogger(__name__)

ContextMode = Literal["contextual", "non_contextual"]
CHARS_PER_TOKEN_BOUND = 16
# The merge reads records.parquet one row group at a time: this bounds its memory, whatever the count.
RECORDS_ROW_GROUP = 10_000
CAPTION_TEMPLATES = {"contextual": "contextual_caption", "non_contextual": "non_contextual_caption"}


DEFAULT_CHUNK_SIZE = 4096
"""Contexts per chunk: thousands of requests per stage keep the engine's concurrency busy."""

DEFAULT_MODEL = "openai:gpt-4o"
"""The model of every generation stage a run does not name one for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateConfig:
    """Everything ``viscon generate`` takes."""

    contexts: str = opt("viscon-contexts", "the output folder of `viscon prepare`", local=True)
    output: str = opt(
        "viscon-generations", "folder for generations/records.parquet and stats.json", local=True
    )
    cache: str = opt("viscon-cache", "cache folder or fsspec URL", local=True)
    extra_caches: tuple[str, ...] = opt(
        (),
        "read-only cache consulted after --cache (repeatable), e.g. a pulled cache or 'bundled'",
        flag="--extra-cache",
        metavar="URL",
    )
    caption_model: str = opt(None, f"BACKEND:MODEL for captions (default {DEFAULT_MODEL})")  # type: ignore[assignment]
    qa_model: str = opt(None, f"BACKEND:MODEL for Q&A (default {DEFAULT_MODEL})")  # type: ignore[assignment]
    # Where a model was served says nothing of the data: kept out of viscon_build.json like paths.
    base_url: str | None = opt(None, "OpenAI-compatible endpoint (default $OPENAI_BASE_URL)", local=True)
    context: Literal["contextual", "non_contextual", "both"] = opt(
        "contextual", "caption with the web context, without it, or both"
    )
    image_store: str | None = opt(None, "image store (default: the one prepare used)", local=True)
    engine: EngineConfig = opt(factory=EngineConfig, help="concurrency, rate limits, retries, budget")
    reasks: int = opt(2, "re-ask with a new seed when a Q&A reply does not parse")
    min_rounds: int = opt(3, "fewest Q&A rounds a reply must hold")
    max_rounds: int = opt(5, "most Q&A rounds kept from a reply")
    limit: int | None = opt(None, "use at most N image contexts")
    # How many contexts are in memory at once, with their records; the output does not depend on it.
    chunk_size: int = opt(
        DEFAULT_CHUNK_SIZE,
        "contexts captioned and asked for Q&A together before their records are written out",
        local=True,
    )
    dry_run: bool = opt(
        False, "count requests, cache hits, estimated tokens and cost; call nothing, write nothing"
    )
    # openai-batch backends: file limits, polling, files only, results files to ingest first
    batch_max_requests: int = opt(50_000, "openai-batch: requests per batch file (the provider's cap)")
    batch_max_bytes: int = opt(
        200 * 1024 * 1024,
        "openai-batch: bytes per batch file, images included, e.g. 200MiB (the provider's cap)",
        size=True,
    )
    batch_poll_interval_s: float = opt(
        60.0,
        "openai-batch: seconds between polls of a running batch",
        flag="--batch-poll-interval",
        metavar="S",
    )
    batch_file_only: bool = opt(
        False,
        "openai-batch: write the batch JSONL files under CACHE/batches/ and stop (e.g. for vllm run-batch)",
    )
    batch_results: tuple[str, ...] = opt(
        (),
        "store the replies of a batch results file (OpenAI or vllm run-batch output) first (repeatable)",
        metavar="FILE",
        local=True,
    )
    num_shards: int = opt(1, "split the contexts across N jobs (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    shard_index: int = opt(0, "this job's share, 0..N-1 (default: the Slurm array task, else 0)")
    runner: RunnerOptions = opt(
        factory=RunnerOptions, help="where generate runs: locally, or on Ray", local=True
    )

    # Whether a model was named, not left to DEFAULT_MODEL: a build without a source or a named
    # model is the quickstart (the bundled sample and its handwritten replies).
    models_named: bool = field(init=False, default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = self.caption_model is not None or self.qa_model is not None
        object.__setattr__(self, "models_named", named)
        for name in ("caption_model", "qa_model"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, DEFAULT_MODEL)
        object.__setattr__(self, "extra_caches", tuple(cache_alias(c) for c in self.extra_caches))
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be >= 0; got {self.limit}")
        if self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be >= 1; got {self.chunk_size}")
        if self.batch_max_requests < 1:
            raise ConfigError(f"--batch-max-requests must be >= 1; got {self.batch_max_requests}")
        if self.batch_max_bytes < 1024:
            raise ConfigError(f"--batch-max-bytes must be >= 1024; got {self.batch_max_bytes}")
        if not self.batch_poll_interval_s > 0:
            raise ConfigError(f"--batch-poll-interval must be > 0 seconds; got {self.batch_poll_interval_s}")
        check_shard(self.num_shards, self.shard_index)
        if self.context not in ("contextual", "non_contextual", "both"):
            raise ConfigError(f"--context must be contextual, non_contextual or both; got {self.context!r}")
        parse_spec(self.caption_model)
        parse_spec(self.qa_model)
        if self.reasks < 0:
            raise ConfigError(f"reasks must be >= 0; got {self.reasks}")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ConfigError(f"need 1 <= min_rounds <= max_rounds; got {self.min_rounds}, {self.max_rounds}")
        if (self.uses_batch or self.batch_results) and not is_local(fsspec.core.url_to_fs(self.cache)[0]):
            raise ConfigError(
                f"openai-batch and --batch-results keep batch files in the cache folder, which must be "
                f"local; got --cache {self.cache!r}"
            )
        if self.batch_file_only and not self.uses_batch:
            raise ConfigError("--batch-file-only needs an openai-batch:MODEL caption or Q&A model")

    @property
    def modes(self) -> list[ContextMode]:
        return ["contextual", "non_contextual"] if self.context == "both" else [self.context]  # type: ignore[list-item]

    @property
    def shard_name(self) -> str:
        return f"{self.shard_index:05d}-of-{self.num_shards:05d}"

    @property
    def uses_batch(self) -> bool:
        """Whether a stage goes through a provider's batch API (``openai-batch:``)."""
        return "openai-batch" in (parse_spec(self.caption_model)[0], parse_spec(self.qa_model)[0])


def check_shard(num_shards: int, shard_index: int) -> None:
    """Refuse a shard that does not exist, saying which ones do."""
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1; got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(
            f"--shard-index must be in [0, {num_shards - 1}] for --num-shards {num_shards}; got {shard_index}"
        )


def shard_slice(items: list, num_shards: int, shard_index: int) -> list:
    """The contiguous share of ``items`` that shard ``shard_index`` of ``num_shards`` owns.

    Contiguous shares keep record order: shard outputs concatenated in shard order, then stably
    sorted by context mode, are the records of one unsharded run.

    >>> [shard_slice(list(range(5)), 2, i) for i in (0, 1)]
    [[0, 1], [2, 3, 4]]
    """
    start, stop = share_bounds(len(items), num_shards, shard_index)
    return items[start:stop]


def share_bounds(n: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """``(start, stop)`` of the contiguous share of ``n`` items that shard ``shard_index`` owns."""
    return n * shard_index // num_shards, n * (shard_index + 1) // num_shards


@dataclass(slots=True)
class GenerateStats:
    contexts_read: int = 0
    records: int = 0
    records_ok: int = 0
    dropped: Counter = field(default_factory=Counter)
    reasks: int = 0
    qa_truncated_rounds: int = 0
    mc_dropped_items: Counter = field(default_factory=Counter)
    engine: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "contexts_read": self.contexts_read,
            "records": self.records,
            "records_ok": self.records_ok,
            "dropped": dict(sorted(self.dropped.items())),
            "reasks": self.reasks,
            "qa_truncated_rounds": self.qa_truncated_rounds,
            "mc_dropped_items": dict(sorted(self.mc_dropped_items.items())),
            "engine": self.engine,
            "plan": self.plan,
            "batch": self.batch,
        }


def _context_files(folder: str) -> tuple[Any, list[str]]:
    fs, root = fsspec.core.url_to_fs(folder)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/contexts/*.parquet"))
    if not paths:
        raise ConfigError(f"--contexts {folder!r} holds no contexts/*.parquet: run `viscon prepare` first")
    return fs, paths


def count_contexts(folder: str) -> int:
    """How many image contexts ``viscon prepare`` wrote under ``folder``, from the Parquet footers alone."""
    fs, paths = _context_files(folder)
    total = 0
    for path in paths:
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def context_share(folder: str, *, limit: int | None, num_shards: int, shard_index: int) -> tuple[int, int]:
    """``(start, stop)``: the contiguous share of the first ``limit`` contexts that a shard owns.

    Counted from the Parquet footers, so a shard reads only its own rows; the bounds are those of
    :func:`shard_slice` over the whole list.
    """
    n = count_contexts(folder)
    if limit is not None:
        n = min(n, limit)
    return share_bounds(n, num_shards, shard_index)


def iter_contexts(
    folder: str, *, start: int = 0, stop: int | None = None, batch_size: int = 4096
) -> Iterator[list[ImageContext]]:
    """The contexts ``start..stop`` of ``folder`` in the order of :func:`read_contexts`, in lists of
    ``batch_size`` (the last may be shorter).

    Row groups wholly outside the range are skipped from the footers; the rest are read a batch at
    a time, so memory holds about one batch whatever the number of contexts.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    fs, paths = _context_files(folder)
    pending: list[ImageContext] = []
    offset = 0  # index of the first row of the current row group among all contexts
    for path in paths:
        if stop is not None and offset >= stop:
            break
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                first, offset = offset, offset + rows
                if offset <= start:
                    continue
                if stop is not None and first >= stop:
                    break
                at = first
                for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group]):
                    lo = max(start - at, 0)
                    hi = batch.num_rows if stop is None else min(batch.num_rows, stop - at)
                    at += batch.num_rows
                    if lo < hi:
                        pending.extend(ImageContext.from_row(r) for r in batch.slice(lo, hi - lo).to_pylist())
                    while len(pending) >= batch_size:
                        yield pending[:batch_size]
                        pending = pending[batch_size:]
                    if stop is not None and at >= stop:
                        break
    if pending:
        yield pending


def read_contexts(folder: str, *, limit: int | None = None) -> list[ImageContext]:
    """The image contexts that ``viscon prepare`` wrote under ``folder``, in a stable order."""
    return [ctx for batch in iter_contexts(folder, stop=limit) for ctx in batch]


def _image_store_of(folder: str, override: str | None) -> str:
    if override:
        return override
    fs, root = fsspec.core.url_to_fs(folder)
    stats_path = f"{root.rstrip('/')}/stats.json"
    if fs.exists(stats_path):
        with fs.open(stats_path, "r") as f:
            store = json.load(f).get("image_store")
        if store:
            return store
    return folder.rstrip("/") + "/images"


def check_models(*specs: str, base_url: str | None, offline: bool) -> None:
    """Model specs, backend packages and API keys, checked before any work starts.

    >>> check_models("openai:gpt-4o", "vllm:Qwen/Qwen2-VL-2B-Instruct", base_url=None, offline=True)
    """
    from viscon_hub.engine.backends.base import require

    for spec in specs:
        kind, _ = parse_spec(spec)
        if offline or kind != "openai":
            continue  # local backends load their model when they start; that is their check
        require("openai", "openai")
        if not (os.environ.get("OPENAI_API_KEY") or base_url or os.environ.get("OPENAI_BASE_URL")):
            raise ConfigError(
                f"{spec} needs an API key: export OPENAI_API_KEY=..., or pass --base-url "
                "http://HOST:PORT/v1 for a local server, or --offline to use only the cache"
            )


def _check_outcome(config: GenerateConfig, stats: GenerateStats, engine: Engine, backends: list) -> None:
    """Raise when the run produced nothing good, or its calls failed more than the engine allows."""
    where = ", ".join(sorted({endpoint_of(b) for b in backends})) or "the cache"
    report = engine.report
    failed = report.permanent_errors + report.transient_errors
    if stats.records and not stats.records_ok:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped.most_common(3))
        if report.budget_stops:
            fix = (
                f"--max-cost {config.engine.max_cost_usd:g} was reached after {report.succeeded} paid "
                "replies (they stay in the cache); raise --max-cost and run again"
            )
        elif report.offline_misses and not report.calls:
            fix = (
                "the cache holds none of these requests; run without --offline, or add --extra-cache "
                "with a cache that holds them"
            )
        elif engine.last_error:
            fix = f"last error from {where}: {engine.last_error}"
        else:
            fix = f"{where} answered, but every reply was dropped (reasons listed)"
        raise RunFailedError(
            f"no good record out of {stats.records} ({reasons}); {fix}. Stats: {config.output}/stats.json"
        )
    if report.calls and failed / report.calls > config.engine.max_error_rate:
        raise EndpointError(
            f"{failed} of {report.calls} calls to {where} failed (over --max-error-rate "
            f"{config.engine.max_error_rate}); last error: {engine.last_error}. Stats: {config.output}/stats.json"
        )


def _model_name(spec: str) -> str:
    return parse_spec(spec)[1]


class _Stage:
    """One template bound to a model: builds requests, keeps the template's sampling defaults."""

    def __init__(self, template: PromptTemplate, model_spec: str) -> None:
        self.template = template
        self.model = _model_name(model_spec)
        self.label = f"{template.id}@{template.version}"
        # No tokenizer writes more than this many characters per token; a longer reply is not an answer.
        self.max_reply_chars = CHARS_PER_TOKEN_BOUND * int(template.sampling.get("max_tokens") or 512)

    def reply_problem(self, c) -> str | None:
        """``length`` (cut at the token limit) or ``too_long`` (over the stage's bound), else None."""
        if c.finish_reason == "length":
            return "length"
        if len(c.reply) > self.max_reply_chars:
            return "too_long"
        return None

    def request(self, messages: list[dict[str, Any]], *, seed: int | None = None) -> Request:
        sampling = dict(self.template.sampling)
        if seed is not None:
            sampling["seed"] = seed
        return Request.create(
            stage=self.template.stage,
            model=self.model,
            template_id=self.template.id,
            template_version=self.template.version,
            messages=messages,
            sampling=sampling,
        )


def caption_messages(template: PromptTemplate, ctx: ImageContext, mode: ContextMode) -> list[dict[str, Any]]:
    fields = context_fields(ctx) if mode == "contextual" else {}
    messages = template.render(**fields)
    for message in messages:
        if isinstance(message.get("content"), list):
            message["content"] = [
                {"type": "image", "sha256": ctx.image_sha256} if part.get("type") == "image" else part
                for part in message["content"]
            ]
    return messages


def generate(
    config: GenerateConfig, *, progress: Callable[[str, RunReport], None] | None = None
) -> GenerateStats:
    """Caption every image context, then ask for both kinds of Q&A; write records and stats.

    Contexts are read and generated ``chunk_size`` at a time, and each chunk's records go to the
    output file before the next chunk is read, so memory does not grow with the number of contexts.
    With ``num_shards`` > 1 only this shard's contiguous share of the contexts is generated, into
    ``generations/records-I-of-N.parquet``; :func:`read_generations` reads every shard back in order.
    """
    started = time.monotonic()
    offline = config.engine.offline or config.dry_run
    check_models(config.caption_model, config.qa_model, base_url=config.base_url, offline=offline)
    first, stop = context_share(
        config.contexts, limit=config.limit, num_shards=config.num_shards, shard_index=config.shard_index
    )
    # A provider batch is waited for as a whole: one chunk per stage, not one wait per chunk.
    size = max(1, stop - first) if config.uses_batch else config.chunk_size
    chunks = iter_contexts(config.contexts, start=first, stop=stop, batch_size=size)
    store_url = _image_store_of(config.contexts, config.image_store)
    generator = Generator(config=config, image_store=store_url)
    out = None if config.dry_run else RecordsWriter(config)
    try:
        generator.ingest(config.batch_results)
        stats = generator.stream(chunks, write=out.write if out is not None else None, progress=progress)
        backends = generator.engine.backends
        # --batch-file-only wrote requests, not records: nothing is published.
        if out is not None and not stats.batch.get("batch_files"):
            stats.records = out.commit()
    finally:
        if out is not None:
            out.discard()
        generator.close()
    for name, n in generator.batch_counts.items():
        stats.batch[name] = stats.batch.get(name, 0) + n
    if config.dry_run:
        stats.plan["total"] = _plan_total(stats.plan)
    elif not stats.batch.get("batch_files"):
        _write_summary(config, stats, started, image_store=store_url)
        _check_outcome(config, stats, generator.engine, backends)
    return stats


def generate_records(
    contexts: list[ImageContext],
    *,
    config: GenerateConfig,
    image_store: str,
    progress: Callable[[str, RunReport], None] | None = None,
) -> tuple[list[dict[str, Any]], GenerateStats]:
    """The generation records of ``contexts`` (mode by mode, in context order) and their counts."""
    generator = Generator(config=config, image_store=image_store)
    try:
        return generator.run(contexts, progress=progress)
    finally:
        generator.close()


class Generator:
    """One cache, engine and set of backends, reused over many batches of contexts; ``close`` when done.

    A runner keeps one per worker process, so the cache is opened and the clients are made once,
    and a worker's share of the rate limits holds across its blocks. ``make`` builds a backend from
    a spec (the Ray runner sends ``vllm:`` specs to its GPU engine pool through it).
    """

    def __init__(
        self, *, config: GenerateConfig, image_store: str, make: Callable[..., Any] | None = None
    ) -> None:
        self.config = config
        self.make = make
        self.store = ImageStore(image_store)
        self.cache = GenerationCache(config.cache, fallbacks=config.extra_caches)
        self.engine = Engine(cache=self.cache, config=config.engine)
        self.caption_stages = {
            m: _Stage(load_template(CAPTION_TEMPLATES[m]), config.caption_model) for m in config.modes
        }
        self.ff_stage = _Stage(load_template("qa_freeform"), config.qa_model)
        self.mc_stage = _Stage(load_template("qa_multiple_choice"), config.qa_model)
        self.batch_dir = str(Path(fsspec.core.url_to_fs(config.cache)[1], "batches"))
        self.batch_counts: dict[str, int] = {}

    def backend(self, spec: str):
        config = self.config
        if config.dry_run:
            return None
        options: dict[str, Any] = {}
        kind = parse_spec(spec)[0]
        if kind == "openai":
            options = {"max_connections": config.engine.max_concurrency}
        elif kind == "openai-batch":
            options = {
                "batch_dir": self.batch_dir,
                "max_requests": config.batch_max_requests,
                "max_bytes": config.batch_max_bytes,
                "poll_interval_s": config.batch_poll_interval_s,
                "file_only": config.batch_file_only,
            }
        return self.engine.backend(
            spec, image_loader=self.store.get, base_url=config.base_url, make=self.make, **options
        )

    def ingest(self, results_files: tuple[str, ...]) -> None:
        """Store the replies of batch results files (OpenAI or ``vllm run-batch``) in the cache first."""
        from viscon_hub.engine.backends.openai_batch import ingest_results

        for results_file in results_files:
            counts = ingest_results(results_file, self.cache, index_dir=self.batch_dir)
            logger.info("ingested %s: %s", results_file, dict(counts))
            for name, n in counts.items():
                key = f"ingested_{name}"
                self.batch_counts[key] = self.batch_counts.get(key, 0) + n

    def run(
        self, contexts: list[ImageContext], *, progress: Callable[[str, RunReport], None] | None = None
    ) -> tuple[list[dict[str, Any]], GenerateStats]:
        """The records of ``contexts`` (mode by mode, in context order) and the counts of this call alone."""
        records: list[dict[str, Any]] = []
        stats = self.stream([contexts], write=records.extend, progress=progress)
        return records, stats

    def stream(
        self,
        chunks: Iterable[list[ImageContext]],
        *,
        write: Callable[[list[dict[str, Any]]], None] | None,
        progress: Callable[[str, RunReport], None] | None = None,
    ) -> GenerateStats:
        """Generate chunk after chunk; hand each chunk's records, a mode at a time, to ``write``.

        Only one chunk's contexts and records are held at once. The counts (drops, re-asks, the
        engine's report, a dry run's plan) are of all chunks together.
        """
        stats = GenerateStats()
        self.engine.report = RunReport()
        plan = _Plan(self.config.modes)
        batch_files: list[str] = []
        # No chunk at all still runs once, empty: the stats and the plan keep their shape.
        for contexts in _at_least_one(chunks):
            stats.contexts_read += len(contexts)
            for mode in self.config.modes:
                try:
                    records = _run_mode(
                        mode,
                        contexts,
                        config=self.config,
                        engine=self.engine,
                        caption_stage=self.caption_stages[mode],
                        ff_stage=self.ff_stage,
                        mc_stage=self.mc_stage,
                        backend=self.backend,
                        stats=stats,
                        plan=plan,
                        progress=progress,
                    )
                except BatchFilesWritten as e:
                    # --batch-file-only: a stage with requests to send wrote them, and this mode stops
                    # there (Q&A needs its captions); the other mode may still write its own.
                    batch_files.extend(e.paths)
                    continue
                if write is not None and records:
                    write(records)
        if self.config.dry_run:
            stats.plan = plan.finish(
                engine=self.engine,
                caption_stages=self.caption_stages,
                ff_stage=self.ff_stage,
                mc_stage=self.mc_stage,
                qa_batch=parse_spec(self.config.qa_model)[0] == "openai-batch",
            )
        if batch_files:
            stats.batch["batch_files"] = batch_files
        stats.engine = self.engine.report.to_dict()
        if self.engine.prices.unpriced:
            stats.engine["unpriced_models"] = sorted(self.engine.prices.unpriced)
        return stats

    def close(self) -> None:
        """Close the cache and every backend; the batch backends' counts stay in :attr:`batch_counts`."""
        self.cache.close()
        for b in self.engine.backends:
            for name, n in getattr(b, "counts", {}).items():
                self.batch_counts[name] = self.batch_counts.get(name, 0) + n
        self.engine.close()


def _plan_total(plan: dict[str, dict]) -> dict[str, Any]:
    """The dry run's grand total: every stage, plus the Q&A of captions not made yet."""
    stages = [p for p in plan.values() if isinstance(p, dict)]
    return {
        "to_call": sum(p.get("to_call", 0) + p.get("pending_on_uncached_captions", 0) for p in stages),
        "estimated_cost_usd": round(
            sum(p.get("estimated_cost_usd", 0.0) + p.get("pending_estimated_cost_usd", 0.0) for p in stages),
            4,
        ),
    }


def _at_least_one(chunks: Iterable[list[ImageContext]]) -> Iterator[list[ImageContext]]:
    empty = True
    for chunk in chunks:
        empty = False
        yield chunk
    if empty:
        yield []


def _add_counts(total: dict[str, Any], part: dict[str, Any]) -> None:
    for name, value in part.items():
        total[name] = total.get(name, 0) + value


class _Plan:
    """A dry run's plan, summed over chunks. The Q&A of captions not cached yet is priced at the end,
    with the mean length of every cached caption, so chunking does not change the estimate.

    A request repeated in two chunks is counted in each, as two runs of the engine would count it.
    """

    def __init__(self, modes: list[ContextMode]) -> None:
        self.caption: dict[str, dict[str, Any]] = {m: {} for m in modes}
        self.qa: dict[str, dict[str, Any]] = {m: {} for m in modes}
        self.pending = dict.fromkeys(modes, 0)
        self.ready = dict.fromkeys(modes, 0)
        self.ready_tokens = dict.fromkeys(modes, 0)

    def add(
        self,
        mode: ContextMode,
        todo: list[tuple[ImageContext, dict[str, Any]]],
        caption_requests: list[Request],
        *,
        config: GenerateConfig,
        engine: Engine,
        ff_stage: _Stage,
        mc_stage: _Stage,
    ) -> None:
        caption_batch = parse_spec(config.caption_model)[0] == "openai-batch"
        qa_batch = parse_spec(config.qa_model)[0] == "openai-batch"
        _add_counts(self.caption[mode], engine.plan(caption_requests, batch_prices=caption_batch))
        found = engine.cache.get_many(r.key for r in caption_requests)
        cached = [found.get(r.key) for r in caption_requests]
        ready = [c for c in cached if c is not None and c.ok]
        qa = [ff_stage.request(ff_stage.template.render(caption=c.reply)) for c in ready]
        qa += [mc_stage.request(mc_stage.template.render(caption=c.reply)) for c in ready]
        _add_counts(self.qa[mode], engine.plan(qa, batch_prices=qa_batch))
        self.pending[mode] += len(todo) - len(ready)
        self.ready[mode] += len(ready)
        self.ready_tokens[mode] += sum(c.completion_tokens or len(c.reply) // 4 for c in ready)

    def finish(
        self,
        *,
        engine: Engine,
        caption_stages: dict[str, _Stage],
        ff_stage: _Stage,
        mc_stage: _Stage,
        qa_batch: bool,
    ) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for mode, caption in self.caption.items():
            out[f"{mode}/caption"] = _rounded_cost(caption)
            plan = _rounded_cost(self.qa[mode])
            # Captions not cached yet will each need two more Q&A requests once they exist: price them
            # with a caption of the expected length, the mean of the cached ones, else the template's cap.
            pending = self.pending[mode]
            plan["pending_on_uncached_captions"] = 2 * pending
            if self.ready[mode]:
                expected, source = self.ready_tokens[mode] / self.ready[mode], "mean_of_cached_captions"
            else:
                max_tokens = caption_stages[mode].template.sampling.get("max_tokens") or 512
                expected, source = float(max_tokens), "max_tokens"
            plan["expected_caption_tokens"] = round(expected, 1)
            plan["expected_caption_tokens_from"] = source
            pending_cost = 0.0
            if pending:
                for stage in (ff_stage, mc_stage):
                    probe = stage.request(stage.template.render(caption=""))
                    prompt = probe.estimated_prompt_tokens() + round(expected)
                    per = engine.prices.cost(stage.model, prompt, probe.max_tokens // 2, batch=qa_batch)
                    pending_cost += per * pending
            plan["pending_estimated_cost_usd"] = round(pending_cost, 4)
            out[f"{mode}/qa"] = plan
        return out


def _rounded_cost(plan: dict[str, Any]) -> dict[str, Any]:
    out = dict(plan)
    if "estimated_cost_usd" in out:
        out["estimated_cost_usd"] = round(out["estimated_cost_usd"], 4)
    return out


def _run_mode(
    mode: ContextMode,
    contexts: list[ImageContext],
    *,
    config: GenerateConfig,
    engine: Engine,
    caption_stage: _Stage,
    ff_stage: _Stage,
    mc_stage: _Stage,
    backend,
    stats: GenerateStats,
    plan: _Plan,
    progress,
) -> list[dict[str, Any]]:
    records = [_base_record(ctx, mode, caption_stage, ff_stage, mc_stage) for ctx in contexts]
    todo = []
    for ctx, rec in zip(contexts, records, strict=True):
        if not ctx.image_sha256:
            _drop(rec, "no_image", stats)
        else:
            todo.append((ctx, rec))

    caption_requests = [
        caption_stage.request(caption_messages(caption_stage.template, ctx, mode)) for ctx, _ in todo
    ]
    if config.dry_run:
        plan.add(
            mode, todo, caption_requests, config=config, engine=engine, ff_stage=ff_stage, mc_stage=mc_stage
        )
        return []

    captions = engine.run(
        caption_requests,
        backend=backend(config.caption_model),
        progress=(lambda r: progress(f"{mode} captions", r)) if progress else None,
    )
    with_caption = []
    for (_ctx, rec), req, c in zip(todo, caption_requests, captions, strict=True):
        rec["caption_key"] = req.key
        if not c.ok:
            _drop(rec, _error_reason("caption", c), stats)
            continue
        problem = caption_stage.reply_problem(c)
        if problem:
            # A caption cut off mid-sentence would seed Q&A about what it never said: dropped, not re-asked.
            _drop(rec, f"caption_{problem}", stats)
            continue
        caption = c.reply.strip()
        if not caption:
            _drop(rec, "caption_empty", stats)
            continue
        rec["caption"] = caption
        with_caption.append(rec)

    qa_backend = backend(config.qa_model)
    batch_files: list[str] = []
    for stage, kind, parser in (
        (ff_stage, "qa_freeform", parse_freeform),
        (mc_stage, "qa_multiple_choice", parse_multiple_choice),
    ):
        try:
            _qa(
                with_caption,
                stage=stage,
                kind=kind,
                parser=parser,
                config=config,
                engine=engine,
                backend=qa_backend,
                stats=stats,
                progress=progress,
                mode=mode,
            )
        except BatchFilesWritten as e:
            batch_files.extend(e.paths)  # both Q&A kinds get their files before the run stops
    if batch_files:
        raise BatchFilesWritten(batch_files)
    for rec in with_caption:
        if rec["status"] == "pending":
            rec["status"] = "ok"
            stats.records_ok += 1
    return records


def _qa(
    records: list[dict[str, Any]],
    *,
    stage: _Stage,
    kind: str,
    parser,
    config: GenerateConfig,
    engine: Engine,
    backend,
    stats: GenerateStats,
    progress,
    mode: str,
) -> None:
    pending = [r for r in records if r["status"] == "pending"]
    for attempt in range(config.reasks + 1):
        if not pending:
            return
        # A re-ask is a different request (new seed), so it is cached on its own key.
        seed = None if attempt == 0 else attempt
        requests = [stage.request(stage.template.render(caption=r["caption"]), seed=seed) for r in pending]
        replies = engine.run(
            requests,
            backend=backend,
            progress=(lambda rep: progress(f"{mode} {kind}", rep)) if progress else None,
        )
        retry = []
        for rec, req, c in zip(pending, requests, replies, strict=True):
            rec[f"{kind}_key"] = req.key
            if not c.ok:
                _drop(rec, _error_reason(kind, c), stats)
                continue
            problem = stage.reply_problem(c)
            parsed = (
                None
                if problem
                else parser(c.reply, min_rounds=config.min_rounds, max_rounds=config.max_rounds)
            )
            if parsed is None or not parsed.ok:
                if attempt < config.reasks:
                    retry.append(rec)
                    stats.reasks += 1
                else:
                    _drop(rec, f"{kind}_{problem or parsed.reason}", stats)
                continue
            stats.qa_truncated_rounds += parsed.truncated
            for reason, n in (getattr(parsed, "dropped_items", None) or {}).items():
                stats.mc_dropped_items[reason] += n
            if kind == "qa_freeform":
                rec[kind] = [{"question": i.question, "answer": i.answer} for i in parsed.items]
            else:
                rec[kind] = [
                    {"question": i.question, "options": list(i.options), "answer": i.answer}
                    for i in parsed.items
                ]
        pending = retry


def _error_reason(kind: str, c) -> str:
    if c.error == OFFLINE_MISS:
        return f"{kind}_offline_miss"
    if c.error == BUDGET_STOP:
        return f"{kind}_over_budget"
    return f"{kind}_{c.error_kind or 'error'}_error"


def _drop(rec: dict[str, Any], reason: str, stats: GenerateStats) -> None:
    rec["status"] = "dropped"
    rec["drop_reason"] = reason
    stats.dropped[reason] += 1


def _base_record(ctx: ImageContext, mode: str, caption: _Stage, ff: _Stage, mc: _Stage) -> dict[str, Any]:
    row = ctx.to_row()
    row.pop("image_bytes", None)
    row.update(
        context_mode=mode,
        status="pending",
        drop_reason=None,
        caption=None,
        caption_model=caption.model,
        caption_template=caption.label,
        caption_key=None,
        qa_model=ff.model,
        qa_freeform=None,
        qa_freeform_template=ff.label,
        qa_freeform_key=None,
        qa_multiple_choice=None,
        qa_multiple_choice_template=mc.label,
        qa_multiple_choice_key=None,
    )
    return row


class RecordsWriter:
    """Writes one run's (or shard's) ``generations/records*.parquet`` as records come, chunk by chunk.

    The file holds every record of the first context mode, then every record of the next, each in
    context order, in row groups of :data:`RECORDS_ROW_GROUP`: exactly the bytes of writing all the
    records at once, however they arrived. Records of a later mode wait in a staging Parquet of
    their own until the earlier modes are done. Everything is staged (beside the target when the
    output is local, in a temporary folder otherwise) and published by :meth:`commit`.
    """

    def __init__(self, config: GenerateConfig) -> None:
        self.fs, root = fsspec.core.url_to_fs(config.output)
        self.root = root.rstrip("/")
        self.name = f"records-{config.shard_name}.parquet" if config.num_shards > 1 else "records.parquet"
        self.modes = list(config.modes)
        self.local = is_local(self.fs)
        if self.local:
            # Fixed names beside the target: a rerun after a kill overwrites what the killed run left.
            self.staging = Path(self.root) / "generations"
            self.staging.mkdir(parents=True, exist_ok=True)
            self.tmpdir = None
        else:
            self.tmpdir = tempfile.mkdtemp(prefix="viscon-generate-")
            self.staging = Path(self.tmpdir)
        self.path = self.staging / f".{self.name}.tmp"
        self.writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.path, GENERATION_SCHEMA, compression="zstd"
        )
        self.later = {m: self.staging / f".{self.name}.{m}.tmp" for m in self.modes[1:]}
        self.later_writers: dict[str, pq.ParquetWriter] = {}
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        """Add records (any modes; each mode's in context order) after those already written."""
        by_mode: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            by_mode.setdefault(rec["context_mode"], []).append(rec)
        for mode, rows in by_mode.items():
            if mode not in self.modes:
                raise ConfigError(f"a {mode!r} record in a run of context modes {self.modes}")
            table = pa.Table.from_pylist(rows, schema=GENERATION_SCHEMA)
            if mode == self.modes[0]:
                self._add(table)
            else:
                if mode not in self.later_writers:
                    self.later_writers[mode] = pq.ParquetWriter(self.later[mode], GENERATION_SCHEMA)
                self.later_writers[mode].write_table(table)

    def _add(self, table: pa.Table | None, *, last: bool = False) -> None:
        if table is not None and table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        if self.pending_rows < RECORDS_ROW_GROUP and not (last and self.pending_rows):
            return
        # Row groups cut at the same rows as one write of every record would cut them.
        whole = pa.concat_tables(self.pending)
        at = 0
        while whole.num_rows - at >= RECORDS_ROW_GROUP or (last and at < whole.num_rows):
            group = whole.slice(at, RECORDS_ROW_GROUP)
            self.writer.write_table(group, row_group_size=RECORDS_ROW_GROUP)
            at += group.num_rows
        self.rows += at
        rest = whole.slice(at)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def commit(self) -> int:
        """Publish the file; the number of records it holds."""
        for mode in self.modes[1:]:
            writer = self.later_writers.pop(mode, None)
            if writer is None:
                continue
            writer.close()
            for batch in pq.ParquetFile(self.later[mode]).iter_batches(batch_size=RECORDS_ROW_GROUP):
                self._add(pa.Table.from_batches([batch], schema=GENERATION_SCHEMA))
            self.later[mode].unlink()
        self._add(None, last=True)
        if not self.rows:
            # One write of no records makes one empty row group; so does this.
            self.writer.write_table(GENERATION_SCHEMA.empty_table())
        self.writer.close()
        self.writer = None
        target = f"{self.root}/generations/{self.name}"
        if self.local:
            os.replace(self.path, target)  # atomic: a reader never sees half a file
        else:
            self.fs.makedirs(f"{self.root}/generations", exist_ok=True)
            self.fs.put_file(str(self.path), target)
        return self.rows

    def discard(self) -> None:
        """Drop whatever is still staged (after :meth:`commit`, nothing is)."""
        for writer in [self.writer, *self.later_writers.values()]:
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - already failing; the staged files go anyway
                    pass
        self.writer = None
        self.later_writers.clear()
        for path in [self.path, *self.later.values()]:
            path.unlink(missing_ok=True)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _write_summary(config: GenerateConfig, stats: GenerateStats, started: float, *, image_store: str) -> None:
    """``stats.json`` (or this shard's part of it, merged with the parts already written)."""
    summary = {
        **stats.to_dict(),
        "caption_model": config.caption_model,
        "qa_model": config.qa_model,
        "context": config.context,
        "contexts": config.contexts,
        "image_store": image_store,
        "viscon_hub_version": __version__,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    if config.num_shards == 1:
        fs, root = fsspec.core.url_to_fs(config.output)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/stats.json", "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
        return
    write_shard_stats(
        config.output, summary, shard_name=config.shard_name, num_shards=config.num_shards, merge=merge_stats
    )


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed (nested mappings too), elapsed time the longest, other values from the first part.

    >>> merge_stats([{"records": 2, "dropped": {"a": 1}, "context": "both"}, {"records": 3, "dropped": {"b": 1}}])
    {'records': 5, 'dropped': {'a': 1, 'b': 1}, 'context': 'both'}
    """

    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for k, v in b.items():
                out[k] = add(out[k], v) if k in out else v
            return out
        if isinstance(a, bool) or isinstance(b, bool):
            return a
        if isinstance(a, int | float) and isinstance(b, int | float):
            return round(a + b, 6) if isinstance(a + b, float) else a + b
        if isinstance(a, list) and isinstance(b, list):
            return sorted(set(a) | set(b)) if all(isinstance(x, str) for x in a + b) else a
        return a

    merged: dict[str, Any] = {}
    for part in parts:
        elapsed = max(merged.get("elapsed_s", 0.0), part.get("elapsed_s", 0.0))
        merged = add(merged, part) if merged else dict(part)
        if "elapsed_s" in merged:
            merged["elapsed_s"] = elapsed
    return merged


def generation_parts(generations: str) -> list[str]:
    """The records files of a ``viscon generate`` folder: ``records.parquet``, or every shard's part.

    Parts come in shard order; a folder with parts of runs with different ``--num-shards``, or with
    a shard missing, is an error that says which.
    """
    fs, root = fsspec.core.url_to_fs(generations)
    root = root.rstrip("/")
    single = f"{root}/generations/records.parquet"
    parts = sorted(fs.glob(f"{root}/generations/records-*-of-*.parquet"))
    if not parts:
        if not fs.exists(single):
            raise ConfigError(
                f"{generations!r} holds no generations/records.parquet: run `viscon generate` first"
            )
        return [single]
    counts = {p.rsplit("-of-", 1)[1].removesuffix(".parquet") for p in parts}
    if len(counts) != 1:
        raise ConfigError(
            f"{generations!r} holds parts of runs with different --num-shards ({sorted(counts)}); "
            "remove the stale generations/records-*.parquet files and rerun"
        )
    expected = int(counts.pop())
    if len(parts) != expected:
        have = sorted(int(p.rsplit("records-", 1)[1].split("-of-")[0]) for p in parts)
        missing = sorted(set(range(expected)) - set(have))
        raise ConfigError(
            f"{generations!r} holds {len(parts)} of {expected} generation shards; missing shard(s) "
            f"{missing}: run `viscon generate --num-shards {expected} --shard-index I` for each"
        )
    return sorted(parts, key=lambda p: int(p.rsplit("records-", 1)[1].split("-of-")[0]))


def generation_records(generations: str) -> tuple[list[str], dict[str, Any]]:
    """The records files (:func:`generation_parts`) and the stats of a ``viscon generate`` folder."""
    paths = generation_parts(generations)
    fs, root = fsspec.core.url_to_fs(generations)
    stats_path = f"{root.rstrip('/')}/stats.json"
    stats = json.loads(fs.read_text(stats_path)) if fs.exists(stats_path) else {}
    return paths, stats


def read_generations(generations: str, *, columns: list[str] | None = None) -> pa.Table:
    """The records of a ``viscon generate`` folder: ``records.parquet``, or every shard's part in order.

    Shards own contiguous shares of the contexts, so concatenating them in shard order and stably
    sorting by context mode gives exactly the record order of one unsharded run.
    """
    fs, _ = fsspec.core.url_to_fs(generations)
    parts = generation_parts(generations)
    if len(parts) == 1 and parts[0].endswith("/records.parquet"):
        with fs.open(parts[0], "rb") as f:
            return pq.read_table(f, columns=columns)
    wanted = None if columns is None else list(dict.fromkeys([*columns, "context_mode"]))
    tables = []
    for path in parts:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=wanted))
    table = pa.concat_tables(tables)
    modes = table.column("context_mode").to_pylist()
    rank = {"contextual": 0, "non_contextual": 1}
    order = sorted(range(len(modes)), key=lambda i: (rank.get(modes[i], 2), i))
    table = table.take(pa.array(order, type=pa.int64()))
    return table if columns is None else table.select(columns)


__all__ = [
    "GENERATION_SCHEMA",
    "GenerateConfig",
    "GenerateStats",
    "Generator",
    "generate",
    "generate_records",
    "RecordsWriter",
    "context_share",
    "count_contexts",
    "iter_contexts",
    "read_contexts",
    "generation_parts",
    "generation_records",
    "read_generations",
    "shard_slice",
]
