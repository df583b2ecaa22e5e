"""``viscon build``: prepare, generate, dedup and merge into a local dataset folder every config loads from.

The driver only wires the stages: ``prepare`` -> ``generate`` -> ``build.merge.Merger`` (streamed
records, dedup, split assignment, rows) -> ``build.writer.ShardWriter`` (Parquet shards in a staging
folder, swapped in) -> the README front matter and ``viscon_build.json``. The merge reads generation
records only; it never calls a generation model. Every config carries its images' bytes, so
``load_dataset(folder, config)`` decodes them; what that costs on disk is logged (and shown as a
stage line) before anything is written.

>>> cfg = BuildConfig()          # no flags: the bundled sample, the bundled cache, offline
>>> cfg.offline, cfg.caption_model, cfg.source is None
(True, 'openai:handwritten-example', True)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from viscon_hub import __version__
from viscon_hub.build.dedup import DedupConfig
from viscon_hub.build.layout import (
    ALL_CONFIGS,
    BUILD_INFO,
    DEFAULT_CONFIG,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_RUN_CONFIGS,
    DEFAULT_TEST_FRACTION,
    config_mix,
    config_mode,
    features_for,
    parse_configs,
    parse_size,
    write_minimal_readme,
)
from viscon_hub.build.merge import Merger, public_source
from viscon_hub.build.quality import MultipleChoiceQuality
from viscon_hub.build.writer import ShardWriter, fresh_staging, swap_in, write_build_info
from viscon_hub.engine import EngineConfig
from viscon_hub.errors import ConfigError
from viscon_hub.generate.relevance import RelevanceConfig
from viscon_hub.prepare.filters import FilterConfig
from viscon_hub.prepare.images.policy import FetchPolicy
from viscon_hub.recipe import opt, to_mapping
from viscon_hub.resources import cache_alias
from viscon_hub.runners import RunnerOptions, run_generate, run_prepare

logger = logging.getLogger(__name__)

QUICKSTART_MODEL = "openai:handwritten-example"
SAMPLE_SOURCE = "viscon-hub:sample/obelics_sample.jsonl"


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildConfig:
    """Everything ``viscon build`` takes.

    With no source and no models it is the quickstart: the bundled sample, the bundled handwritten
    cache, offline, every config. Naming a source or a model switches to real generation
    (``openai:gpt-4o`` for whatever is not named), online unless ``offline``, and to the configs of
    ``DEFAULT_RUN_CONFIGS`` (``contextual`` and ``leaky``) unless ``configs`` names others.
    """

    source: str | None = opt(None, "documents to build from (default: the bundled sample)")
    revision: str | None = opt(None, "revision of a Hub source dataset")
    output: str = opt("viscon", "dataset folder", local=True)
    work_dir: str | None = opt(None, "intermediate outputs (default OUTPUT-work)", local=True)
    configs: tuple[str, ...] | None = opt(
        None,
        "comma-separated config names, or all (default: all for the bundled sample, contextual,leaky "
        "with --source; each config carries its images' bytes, so each one more costs about the images again)",
        sep=",",
    )
    cache: str = opt("viscon-cache", "cache folder or fsspec URL", local=True)
    extra_caches: tuple[str, ...] = opt(
        (),
        "read-only cache consulted after --cache (repeatable), e.g. a pulled cache or 'bundled'",
        flag="--extra-cache",
        metavar="URL",
    )
    caption_model: str | None = opt(
        None,
        "BACKEND:MODEL for captions (default: openai:gpt-4o; the bundled handwritten example with no --source)",
    )
    qa_model: str | None = opt(
        None,
        "BACKEND:MODEL for Q&A (default: openai:gpt-4o; the bundled handwritten example with no --source)",
    )
    # Where a model was served says nothing of the data: kept out of viscon_build.json like paths.
    base_url: str | None = opt(None, "OpenAI-compatible endpoint (default $OPENAI_BASE_URL)", local=True)
    offline: bool | None = opt(
        None,
        "use only the cache for generations (the default with no --source and no models)",
        off="--online",
    )
    test_fraction: float = opt(DEFAULT_TEST_FRACTION, "share of pages in the test split")
    limit: int | None = opt(None, "read at most N documents")
    reasks: int = opt(2, "re-ask with a new seed when a Q&A reply does not parse")
    dedup: DedupConfig = opt(factory=DedupConfig, help="question dedup by sentence embeddings")
    engine: EngineConfig = opt(factory=EngineConfig, help="concurrency, rate limits, retries, budget")
    conversation_style: str | None = opt(
        None, "conversation template of the mixes (default: the bundled one)"
    )
    max_shard_size: int = opt(
        DEFAULT_MAX_SHARD_SIZE,
        "largest Parquet file per config and split, e.g. 500MB or 200KB (as push_to_hub)",
        size=True,
    )
    multiple_choice: MultipleChoiceQuality = opt(
        factory=MultipleChoiceQuality, help="option shuffle and the length-tell check"
    )
    filters: FilterConfig = opt(factory=FilterConfig, help="offline safety and language filters")
    relevance: RelevanceConfig = opt(factory=RelevanceConfig, help="C3L relevance scores and their threshold")
    fetch: FetchPolicy = opt(factory=FetchPolicy, help="how prepare acquires images")
    runner: RunnerOptions = opt(
        factory=RunnerOptions, help="where the stages run: locally, or on Ray", local=True
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        object.__setattr__(self, "extra_caches", tuple(cache_alias(c) for c in self.extra_caches))
        if self.configs is not None:
            object.__setattr__(self, "configs", parse_configs(self.configs))
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be >= 0; got {self.limit}")
        if self.reasks < 0:
            raise ConfigError(f"--reasks must be >= 0; got {self.reasks}")
        quickstart = self.source is None and self.caption_model is None and self.qa_model is None
        if quickstart:
            from viscon_hub.resources import BUNDLED_CACHE

            object.__setattr__(self, "caption_model", QUICKSTART_MODEL)
            object.__setattr__(self, "qa_model", QUICKSTART_MODEL)
            if str(BUNDLED_CACHE) not in self.extra_caches:
                object.__setattr__(self, "extra_caches", (*self.extra_caches, str(BUNDLED_CACHE)))
            if self.offline is None:
                object.__setattr__(self, "offline", True)
        for name in ("caption_model", "qa_model"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, "openai:gpt-4o")
        if self.offline is None:
            object.__setattr__(self, "offline", False)
        # ``offline`` is the build's one switch; the engine's copy follows it, so the recipe reads true.
        object.__setattr__(self, "engine", replace(self.engine, offline=self.offline))
        if self.configs is None:
            object.__setattr__(self, "configs", ALL_CONFIGS if quickstart else DEFAULT_RUN_CONFIGS)
        if not self.configs:
            raise ConfigError("--configs names no config")
        for c in self.configs:
            config_mode(c)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in [0, 1); got {self.test_fraction}")
        if not self.output:
            raise ConfigError("--output must name a folder")

    @property
    def work(self) -> str:
        return self.work_dir or f"{self.output.rstrip('/')}-work"

    @property
    def modes(self) -> tuple[str, ...]:
        wanted = {config_mode(c) for c in self.configs}
        return tuple(m for m in ("contextual", "non_contextual") if m in wanted)


@dataclass(slots=True)
class BuildReport:
    """Counts of one build: rows per config and split, drops by stage and reason, dedup figures."""

    output: str
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    dedup: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build(config: BuildConfig, *, progress: Callable[[str], None] | None = None) -> BuildReport:
    """Run prepare, generate, then :func:`write_dataset`; intermediate outputs go to ``config.work``."""
    from viscon_hub.generate.stages import GenerateConfig, check_models
    from viscon_hub.prepare.driver import PrepareConfig

    check_models(config.caption_model, config.qa_model, base_url=config.base_url, offline=config.offline)
    work = config.work.rstrip("/")
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    say("prepare")
    prep = run_prepare(
        PrepareConfig(
            source=config.source,
            output=f"{work}/contexts",
            limit=config.limit,
            revision=config.revision,
            filters=config.filters,
            fetch=config.fetch,
        ),
        runner=config.runner,
    )
    if prep.documents_read and not prep.images_kept:
        from viscon_hub.errors import RunFailedError

        reasons = ", ".join(f"{k}: {v}" for k, v in prep.dropped.most_common(3))
        raise RunFailedError(
            f"prepare kept no image context out of {prep.documents_read} documents ({reasons}); "
            f"see {work}/contexts/drops/ for each drop and its reason"
        )
    say("generate")
    gen = run_generate(
        GenerateConfig(
            contexts=f"{work}/contexts",
            output=f"{work}/generations",
            cache=config.cache,
            extra_caches=config.extra_caches,
            caption_model=config.caption_model,
            qa_model=config.qa_model,
            base_url=config.base_url,
            context="both" if len(config.modes) == 2 else config.modes[0],
            image_store=f"{work}/contexts/images",
            reasks=config.reasks,
            engine=replace(config.engine, offline=config.offline),
        ),
        runner=config.runner,
    )
    scored = None
    if config.relevance.model:
        from viscon_hub.generate.relevance import score_generations

        say("relevance")
        scored = score_generations(
            f"{work}/generations",
            config=replace(
                config.relevance,
                base_url=config.relevance.base_url or config.base_url,
                engine=replace(config.engine, offline=config.offline),
            ),
            cache=config.cache,
            extra_caches=config.extra_caches,
            image_store=f"{work}/contexts/images",
        )
    say("merge")
    report = write_dataset(
        generations=f"{work}/generations",
        output=config.output,
        configs=config.configs,
        cache=config.cache,
        extra_caches=config.extra_caches,
        test_fraction=config.test_fraction,
        dedup=config.dedup,
        offline=config.offline,
        conversation_style=config.conversation_style,
        multiple_choice=config.multiple_choice,
        toxic_text=config.filters.toxic_threshold if config.filters.toxic_text else None,
        relevance=config.relevance,
        source=config.source or SAMPLE_SOURCE,
        source_revision=config.revision,
        max_shard_size=config.max_shard_size,
        progress=say,
        recipe=to_mapping(config, portable=True),
    )
    report.stages = {
        "prepare": prep.to_dict(),
        "generate": gen.to_dict(),
        **({"relevance": scored.to_dict()} if scored is not None else {}),
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    return report


def write_dataset(
    *,
    generations: str,
    output: str,
    configs: tuple[str, ...] = ALL_CONFIGS,
    cache: str = "viscon-cache",
    extra_caches: tuple[str, ...] = (),
    test_fraction: float = DEFAULT_TEST_FRACTION,
    dedup: DedupConfig | None = None,
    offline: bool = True,
    conversation_style: str | None = None,
    image_store: str | None = None,
    multiple_choice: MultipleChoiceQuality | None = None,
    toxic_text: float | None = None,
    relevance: RelevanceConfig | None = None,
    source: str | None = None,
    source_revision: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: Callable[[str], None] | None = None,
    recipe: dict[str, Any] | None = None,
) -> BuildReport:
    """Dedup, merge and write every config of ``configs`` from the records under ``generations``.

    ``recipe`` (the resolved ``BuildConfig`` without machine-specific paths) is recorded in
    ``viscon_build.json`` when given.
    """
    merger = Merger(
        generations=generations,
        modes=tuple({config_mode(c) for c in configs}),
        cache=cache,
        extra_caches=extra_caches,
        test_fraction=test_fraction,
        dedup=dedup,
        offline=offline,
        conversation_style=conversation_style,
        image_store=image_store,
        per_image=any(config_mix(c) is None for c in configs),
        multiple_choice=multiple_choice,
        toxic_text=toxic_text,
        relevance=relevance,
    )
    out = Path(output)
    try:
        note = merger.image_cost(configs)
        logger.info("%s", note)
        if progress is not None:
            progress(f"merge: {note}")
        staging = fresh_staging(out)
        writer = ShardWriter(
            staging,
            {c: features_for(c).arrow_schema for c in configs},
            max_shard_size=parse_size(max_shard_size),
        )
        try:
            for config, split, rows in merger.iter_rows(configs):
                writer.add(config, split, rows)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        merger.close()
    swap_in(staging, out, configs)
    # A config without a single row (e.g. no record has Q&A) is reported, not declared.
    empty = [c for c in configs if not sum(writer.counts[c].values())]
    for c in empty:
        logger.warning("config %s has no rows; it is left out of %s", c, out / "README.md")
    configs = tuple(c for c in configs if c not in empty)

    report = BuildReport(
        output=str(out), rows=writer.counts, dropped=merger.dropped(), dedup=merger.dedup_info
    )
    gen_stats = merger.generation_stats
    prepared = _prepare_stats(gen_stats)
    info = {
        "viscon_hub_version": __version__,
        "configs": list(configs),
        "default_config": DEFAULT_CONFIG if DEFAULT_CONFIG in configs else configs[0],
        "rows": report.rows,
        "shards": {c: writer.shards[c] for c in configs},
        "bytes": {c: writer.bytes[c] for c in configs},
        "test_fraction": test_fraction,
        "pages": merger.pages,
        "dropped": {
            "prepare": prepared.get("dropped", {}),
            "merge": report.dropped,
            "generate": gen_stats.get("dropped", {}),
        },
        "filters": {
            **prepared.get("filters", {}),
            **({"toxic_generations": toxic_text} if toxic_text else {}),
        },
        "dedup": merger.dedup_info,
        "conversation_style": merger.style.version,
        "relevance": {
            "min_relevance": merger.relevance_config.min_relevance,
            "on": merger.relevance_config.on,
            **{mode: dict(sorted(c.items())) for mode, c in merger.relevance.items() if c},
        },
        "multiple_choice": {
            "config": asdict(merger.multiple_choice),
            **{
                mode: {k: c[k] for k in ("length_flagged", "length_dropped")}
                for mode, c in merger.quality.items()
            },
        },
        "generation": {
            k: gen_stats.get(k) for k in ("caption_model", "qa_model", "context", "records", "records_ok")
        },
        "source": public_source(source) if source else None,
        "source_revision": source_revision,
        "templates": merger.templates,
        "usage": merger.usage,
        **({"recipe": {"build": recipe}} if recipe is not None else {}),
    }
    write_build_info(out / BUILD_INFO, info)
    write_minimal_readme(out, configs)
    return report


def _prepare_stats(gen_stats: dict[str, Any]) -> dict[str, Any]:
    """The prepare run's stats.json behind a generate run (its drops and filters), or {} when not found."""
    contexts = gen_stats.get("contexts")
    path = Path(contexts) / "stats.json" if isinstance(contexts, str) else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}


__all__ = ["BuildConfig", "BuildReport", "build", "write_dataset"]
