"""The model stages: captions, then free-form and multiple-choice Q&A, all through one engine.

Stages only build requests and parse replies; the engine calls, caches and accounts. Raw replies
live in the cache, so a changed parser re-parses without calling a model, and a changed Q&A prompt
leaves the cached captions valid.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
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
    make_backend,
    parse_spec,
)
from viscon_hub.engine.backends.openai_batch import BatchFilesWritten
from viscon_hub.engine.engine import BUDGET_STOP, OFFLINE_MISS, endpoint_of
from viscon_hub.errors import ConfigError, EndpointError, RunFailedError
from viscon_hub.fsutil import is_local
from viscon_hub.generate.parsers import parse_freeform, parse_multiple_choice
from viscon_hub.generate.prompts import PromptTemplate, context_fields, load_template
from viscon_hub.prepare.images import ImageStore
from viscon_hub.recipe import opt
from viscon_hub.records import GENERATION_SCHEMA, ImageContext
from viscon_hub.resources import cache_alias

logger = logging.getLogger(__name__)

ContextMode = Literal["contextual", "non_contextual"]
CHARS_PER_TOKEN_BOUND = 16
# The merge reads records.parquet one row group at a time: this bounds its memory, whatever the count.
RECORDS_ROW_GROUP = 10_000
CAPTION_TEMPLATES = {"contextual": "contextual_caption", "non_contextual": "non_contextual_caption"}


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateConfig:
    """Everything ``viscon generate`` takes."""

    contexts: str = opt(help="the output folder of `viscon prepare`", local=True)
    output: str = opt(help="folder for generations/records.parquet and stats.json", local=True)
    cache: str = opt("viscon-cache", "cache folder or fsspec URL", local=True)
    extra_caches: tuple[str, ...] = opt(
        (),
        "read-only cache consulted after --cache (repeatable), e.g. a pulled cache or 'bundled'",
        flag="--extra-cache",
        metavar="URL",
    )
    caption_model: str = opt("openai:gpt-4o", "BACKEND:MODEL for captions")
    qa_model: str = opt("openai:gpt-4o", "BACKEND:MODEL for Q&A")
    base_url: str | None = opt(None, "OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    context: Literal["contextual", "non_contextual", "both"] = opt(
        "contextual", "caption with the web context, without it, or both"
    )
    image_store: str | None = opt(None, "image store (default: the one prepare used)", local=True)
    engine: EngineConfig = opt(factory=EngineConfig, help="concurrency, rate limits, retries, budget")
    reasks: int = opt(2, "re-ask with a new seed when a Q&A reply does not parse")
    min_rounds: int = opt(3, "fewest Q&A rounds a reply must hold")
    max_rounds: int = opt(5, "most Q&A rounds kept from a reply")
    limit: int | None = opt(None, "use at most N image contexts")
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_caches", tuple(cache_alias(c) for c in self.extra_caches))
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be >= 0; got {self.limit}")
        if self.batch_max_requests < 1:
            raise ConfigError(f"--batch-max-requests must be >= 1; got {self.batch_max_requests}")
        if self.batch_max_bytes < 1024:
            raise ConfigError(f"--batch-max-bytes must be >= 1024; got {self.batch_max_bytes}")
        if not self.batch_poll_interval_s > 0:
            raise ConfigError(f"--batch-poll-interval must be > 0 seconds; got {self.batch_poll_interval_s}")
        if self.context not in ("contextual", "non_contextual", "both"):
            raise ConfigError(f"--context must be contextual, non_contextual or both; got {self.context!r}")
        parse_spec(self.caption_model)
        parse_spec(self.qa_model)
        if self.reasks < 0:
            raise ConfigError(f"reasks must be >= 0; got {self.reasks}")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ConfigError(f"need 1 <= min_rounds <= max_rounds; got {self.min_rounds}, {self.max_rounds}")
        uses_batch = "openai-batch" in (parse_spec(self.caption_model)[0], parse_spec(self.qa_model)[0])
        if (uses_batch or self.batch_results) and not is_local(fsspec.core.url_to_fs(self.cache)[0]):
            raise ConfigError(
                f"openai-batch and --batch-results keep batch files in the cache folder, which must be "
                f"local; got --cache {self.cache!r}"
            )
        if self.batch_file_only and not uses_batch:
            raise ConfigError("--batch-file-only needs an openai-batch:MODEL caption or Q&A model")

    @property
    def modes(self) -> list[ContextMode]:
        return ["contextual", "non_contextual"] if self.context == "both" else [self.context]  # type: ignore[list-item]


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


def read_contexts(folder: str, *, limit: int | None = None) -> list[ImageContext]:
    """The image contexts that ``viscon prepare`` wrote under ``folder``, in a stable order."""
    fs, root = fsspec.core.url_to_fs(folder)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/contexts/*.parquet"))
    if not paths:
        raise ConfigError(f"--contexts {folder!r} holds no contexts/*.parquet: run `viscon prepare` first")
    out: list[ImageContext] = []
    for path in paths:
        with fs.open(path, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                out.append(ImageContext.from_row(row))
                if limit is not None and len(out) >= limit:
                    return out
    return out


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
    """Caption every image context, then ask for both kinds of Q&A; write records and stats."""
    started = time.monotonic()
    offline = config.engine.offline or config.dry_run
    check_models(config.caption_model, config.qa_model, base_url=config.base_url, offline=offline)
    contexts = read_contexts(config.contexts, limit=config.limit)
    stats = GenerateStats(contexts_read=len(contexts))
    store_url = _image_store_of(config.contexts, config.image_store)
    store = ImageStore(store_url)
    cache = GenerationCache(config.cache, fallbacks=config.extra_caches)
    batch_dir = str(Path(fsspec.core.url_to_fs(config.cache)[1], "batches"))
    for results_file in config.batch_results:
        from viscon_hub.engine.backends.openai_batch import ingest_results

        counts = ingest_results(results_file, cache, index_dir=batch_dir)
        logger.info("ingested %s: %s", results_file, dict(counts))
        for name, n in counts.items():
            stats.batch[f"ingested_{name}"] = stats.batch.get(f"ingested_{name}", 0) + n
    engine = Engine(cache=cache, config=config.engine)
    caption_stages = {
        m: _Stage(load_template(CAPTION_TEMPLATES[m]), config.caption_model) for m in config.modes
    }
    ff_stage = _Stage(load_template("qa_freeform"), config.qa_model)
    mc_stage = _Stage(load_template("qa_multiple_choice"), config.qa_model)

    backends: dict[str, Any] = {}

    def backend(spec: str):
        if config.engine.offline or config.dry_run:
            return None
        if spec not in backends:
            kind = parse_spec(spec)[0]
            options: dict[str, Any] = {}
            if kind == "openai":
                options = {"max_connections": config.engine.max_concurrency}
            elif kind == "openai-batch":
                options = {
                    "batch_dir": batch_dir,
                    "max_requests": config.batch_max_requests,
                    "max_bytes": config.batch_max_bytes,
                    "poll_interval_s": config.batch_poll_interval_s,
                    "file_only": config.batch_file_only,
                }
            backends[spec] = make_backend(
                spec,
                image_loader=store.get,
                base_url=config.base_url,
                timeout_s=config.engine.request_timeout_s,
                **options,
            )
        return backends[spec]

    records: list[dict[str, Any]] = []
    batch_files: list[str] = []
    try:
        for mode in config.modes:
            try:
                records.extend(
                    _run_mode(
                        mode,
                        contexts,
                        config=config,
                        engine=engine,
                        caption_stage=caption_stages[mode],
                        ff_stage=ff_stage,
                        mc_stage=mc_stage,
                        backend=backend,
                        stats=stats,
                        progress=progress,
                    )
                )
            except BatchFilesWritten as e:
                # --batch-file-only: a stage with requests to send wrote them, and this mode stops
                # there (Q&A needs its captions); the other mode may still write its own.
                batch_files.extend(e.paths)
    finally:
        cache.close()
        for b in backends.values():
            _close(b)
            for name, n in getattr(b, "counts", {}).items():
                stats.batch[name] = stats.batch.get(name, 0) + n
    stats.engine = engine.report.to_dict()
    if engine.prices.unpriced:
        stats.engine["unpriced_models"] = sorted(engine.prices.unpriced)
    if config.dry_run:
        stats.plan["total"] = _plan_total(stats.plan)
    elif batch_files:
        stats.batch["batch_files"] = batch_files
    else:
        _write_outputs(config, records, stats, started, image_store=store_url)
        _check_outcome(config, stats, engine, list(backends.values()))
    return stats


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


def _close(backend: Any) -> None:
    import asyncio

    try:
        asyncio.run(backend.aclose())
    except Exception as e:  # noqa: BLE001 - closing must not hide the run's result
        logger.debug("closing backend: %s", e)


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
        caption_batch = parse_spec(config.caption_model)[0] == "openai-batch"
        qa_batch = parse_spec(config.qa_model)[0] == "openai-batch"
        stats.plan[f"{mode}/caption"] = engine.plan(caption_requests, batch_prices=caption_batch)
        cached = [engine.cache.get(r.key) for r in caption_requests]
        ready = [(c, rec) for c, (_, rec) in zip(cached, todo, strict=True) if c is not None and c.ok]
        qa = [ff_stage.request(ff_stage.template.render(caption=c.reply)) for c, _ in ready]
        qa += [mc_stage.request(mc_stage.template.render(caption=c.reply)) for c, _ in ready]
        plan = engine.plan(qa, batch_prices=qa_batch)
        # Captions not cached yet will each need two more Q&A requests once they exist: price them
        # with a caption of the expected length, the mean of the cached ones, else the template's cap.
        pending = len(todo) - len(ready)
        plan["pending_on_uncached_captions"] = 2 * pending
        if ready:
            lengths = [c.completion_tokens or len(c.reply) // 4 for c, _ in ready]
            expected, source = sum(lengths) / len(lengths), "mean_of_cached_captions"
        else:
            expected, source = float(caption_stage.template.sampling.get("max_tokens") or 512), "max_tokens"
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
        stats.plan[f"{mode}/qa"] = plan
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


def _write_outputs(
    config: GenerateConfig,
    records: list[dict[str, Any]],
    stats: GenerateStats,
    started: float,
    *,
    image_store: str,
) -> None:
    stats.records = len(records)
    fs, root = fsspec.core.url_to_fs(config.output)
    fs.makedirs(f"{root}/generations", exist_ok=True)
    table = pa.Table.from_pylist(records, schema=GENERATION_SCHEMA)
    target = f"{root}/generations/records.parquet"
    local = Path(root) if is_local(fs) else None
    if local is not None:
        tmp = local / "generations" / ".records.parquet.tmp"
        pq.write_table(table, tmp, compression="zstd", row_group_size=RECORDS_ROW_GROUP)
        tmp.replace(local / "generations" / "records.parquet")
    else:
        with fs.open(target, "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=RECORDS_ROW_GROUP)
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
    with fs.open(f"{root}/stats.json", "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)


__all__ = ["GENERATION_SCHEMA", "GenerateConfig", "GenerateStats", "generate", "read_contexts"]
