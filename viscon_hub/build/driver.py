"""``viscon build``: prepare, generate, dedup and merge into a local dataset folder every config loads from.

The driver only wires the stages: ``prepare`` -> ``generate`` -> ``build.merge.Merger`` (streamed
records, dedup, split assignment, rows) -> ``build.writer.ShardWriter`` (Parquet shards in a staging
folder, swapped in) -> the README front matter and ``viscon_build.json``. The merge reads generation
records only; it never calls a generation model. Every config carries its images' bytes, so
``load_dataset(folder, config)`` decodes them; what that costs on disk is logged (and shown as a
stage line) before anything is written.

>>> cfg = BuildConfig()          # no flags: the bundled sample, the bundled cache, offline
>>> cfg.offline, cfg.generate.caption_model, cfg.prepare.source is None, cfg.prepare.output
(True, 'openai:handwritten-example', True, 'viscon-work/contexts')
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from viscon_hub import __version__
from viscon_hub.build.layout import (
    ALL_CONFIGS,
    BUILD_INFO,
    DEFAULT_CONFIG,
    DEFAULT_RUN_CONFIGS,
    config_mix,
    config_mode,
    features_for,
    write_minimal_readme,
)
from viscon_hub.build.merge import MergeConfig, Merger, public_source
from viscon_hub.build.writer import ShardWriter, fresh_staging, swap_in, write_build_info
from viscon_hub.errors import ConfigError
from viscon_hub.generate.relevance import RelevanceConfig
from viscon_hub.generate.stages import GenerateConfig
from viscon_hub.prepare.driver import PrepareConfig
from viscon_hub.recipe import opt, to_mapping
from viscon_hub.runners import RunnerOptions, run_generate, run_prepare

logger = logging.getLogger(__name__)

QUICKSTART_MODEL = "openai:handwritten-example"
SAMPLE_SOURCE = "viscon-hub:sample/obelics_sample.jsonl"


def _default(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _set_by_build(stage: Any, where: str, why: str, **wanted: Any) -> Any:
    """``stage`` with the fields the build decides; one set in the recipe to something else is an error."""
    for name, value in wanted.items():
        given = getattr(stage, name)
        if given != value and given != _default(type(stage), name):
            raise ConfigError(
                f"{where}.{name}: expected it left out, the build sets it ({why}); got {given!r}"
            )
    return replace(stage, **wanted)


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildConfig:
    """Everything ``viscon build`` takes: the stage configs, and what joins them.

    The stages read and write under ``work_dir``: prepare's output is ``WORK/contexts``, which generate
    reads, writing ``WORK/generations``, which the merge reads; both stages run on ``runner``. Those
    fields are the build's to set, so the nested configs here leave them out.

    With no source and no model named it is the quickstart: the bundled sample, the bundled
    handwritten cache, offline, every config. Naming a source or a model switches to real generation
    (``openai:gpt-4o`` for whatever is not named), online unless ``offline``, and to the configs of
    ``DEFAULT_RUN_CONFIGS`` (``contextual`` and ``leaky``) unless ``merge.configs`` names others.
    """

    output: str = opt("viscon", "dataset folder", local=True)
    work_dir: str | None = opt(None, "intermediate outputs (default OUTPUT-work)", local=True)
    offline: bool | None = opt(
        None,
        "use only the cache for generations (the default with no --source and no models)",
        off="--online",
    )
    prepare: PrepareConfig = opt(factory=PrepareConfig, help="documents in, image contexts out")
    generate: GenerateConfig = opt(factory=GenerateConfig, help="captions and Q&A through the cached engine")
    relevance: RelevanceConfig = opt(factory=RelevanceConfig, help="C3L relevance scores and their threshold")
    merge: MergeConfig = opt(factory=MergeConfig, help="dedup, mixes, splits and shards of the dataset")
    runner: RunnerOptions = opt(
        factory=RunnerOptions, help="where the stages run: locally, or on Ray", local=True
    )

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("--output must name a folder")
        gen = self.generate
        # A build merges what generate wrote: a generate that writes no records cannot be part of one.
        for name, instead in (
            ("dry_run", "`viscon prepare`, then `viscon generate --dry-run` for the plan and its cost"),
            (
                "batch_file_only",
                "`viscon generate --batch-file-only`, then give the results files as generate.batch_results",
            ),
        ):
            if getattr(gen, name):
                raise ConfigError(
                    f"generate.{name}: expected false in a build, which needs the replies; use {instead}"
                )
        quickstart = self.prepare.source is None and not gen.models_named
        if quickstart:
            from viscon_hub.resources import BUNDLED_CACHE

            extra = gen.extra_caches
            if str(BUNDLED_CACHE) not in extra:
                extra = (*extra, str(BUNDLED_CACHE))
            gen = replace(gen, caption_model=QUICKSTART_MODEL, qa_model=QUICKSTART_MODEL, extra_caches=extra)
        offline = self.offline
        if offline is None:
            offline = quickstart or gen.engine.offline
        elif gen.engine.offline and not offline:
            raise ConfigError(
                "generate.engine.offline: expected it left out or false with offline: false; got true"
            )
        # ``offline`` is the build's one switch; the engine's copy follows it, so the recipe reads true.
        object.__setattr__(self, "offline", offline)
        if self.merge.configs is None:
            merge = replace(self.merge, configs=ALL_CONFIGS if quickstart else DEFAULT_RUN_CONFIGS)
            object.__setattr__(self, "merge", merge)
        work = self.work
        # The stages of one build join through WORK and run on one runner, over the whole source.
        joins = "from build.output, build.work_dir, build.runner and merge.configs"
        prepare = _set_by_build(
            self.prepare,
            "prepare",
            joins,
            output=f"{work}/contexts",
            runner=self.runner,
            num_shards=1,
            shard_index=0,
        )
        modes = self.modes
        gen = _set_by_build(
            replace(gen, engine=replace(gen.engine, offline=offline)),
            "generate",
            joins,
            contexts=prepare.output,
            output=f"{work}/generations",
            image_store=prepare.store_url,
            context="both" if len(modes) == 2 else modes[0],
            runner=self.runner,
            num_shards=1,
            shard_index=0,
        )
        relevance = _set_by_build(
            self.relevance, "relevance", "the scoring calls share build.generate.engine", engine=gen.engine
        )
        if relevance.base_url is None:
            relevance = replace(relevance, base_url=gen.base_url)
        object.__setattr__(self, "prepare", prepare)
        object.__setattr__(self, "generate", gen)
        object.__setattr__(self, "relevance", relevance)

    @property
    def work(self) -> str:
        return (self.work_dir or f"{self.output.rstrip('/')}-work").rstrip("/")

    @property
    def configs(self) -> tuple[str, ...]:
        return self.merge.names

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
    from viscon_hub.generate.stages import check_models

    gen = config.generate
    check_models(gen.caption_model, gen.qa_model, base_url=gen.base_url, offline=config.offline)
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    say("prepare")
    prep = run_prepare(config.prepare, runner=config.runner)
    if prep.documents_read and not prep.images_kept:
        from viscon_hub.errors import RunFailedError

        reasons = ", ".join(f"{k}: {v}" for k, v in prep.dropped.most_common(3))
        raise RunFailedError(
            f"prepare kept no image context out of {prep.documents_read} documents ({reasons}); "
            f"see {config.prepare.output}/drops/ for each drop and its reason"
        )
    say("generate")
    generated = run_generate(gen, runner=config.runner)
    relevance = config.relevance  # resolved with the build: generate's engine and endpoint
    scored = None
    if relevance.model:
        from viscon_hub.generate.relevance import score_generations

        say("relevance")
        scored = score_generations(
            gen.output,
            config=relevance,
            cache=gen.cache,
            extra_caches=gen.extra_caches,
            image_store=gen.image_store,
        )
    say("merge")
    filters = config.prepare.filters
    report = write_dataset(
        generations=gen.output,
        output=config.output,
        merge=config.merge,
        cache=gen.cache,
        extra_caches=gen.extra_caches,
        offline=config.offline,
        toxic_text=filters.toxic_threshold if filters.toxic_text else None,
        relevance=relevance,
        source=config.prepare.source or SAMPLE_SOURCE,
        source_revision=config.prepare.revision,
        progress=say,
        recipe=to_mapping(config, portable=True),
    )
    report.stages = {
        "prepare": prep.to_dict(),
        "generate": generated.to_dict(),
        **({"relevance": scored.to_dict()} if scored is not None else {}),
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    return report


def write_dataset(
    *,
    generations: str,
    output: str,
    merge: MergeConfig | None = None,
    cache: str = "viscon-cache",
    extra_caches: tuple[str, ...] = (),
    offline: bool = True,
    image_store: str | None = None,
    toxic_text: float | None = None,
    relevance: RelevanceConfig | None = None,
    source: str | None = None,
    source_revision: str | None = None,
    progress: Callable[[str], None] | None = None,
    recipe: dict[str, Any] | None = None,
) -> BuildReport:
    """Dedup, merge and write every config that ``merge`` names from the records under ``generations``.

    ``recipe`` (the resolved ``BuildConfig`` without machine-specific paths) is recorded in
    ``viscon_build.json`` when given.
    """
    merge = merge or MergeConfig()
    configs = merge.names
    merger = Merger(
        generations=generations,
        modes=tuple({config_mode(c) for c in configs}),
        merge=merge,
        cache=cache,
        extra_caches=extra_caches,
        offline=offline,
        image_store=image_store,
        per_image=any(config_mix(c) is None for c in configs),
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
            max_shard_size=merge.max_shard_size,
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
        "test_fraction": merge.test_fraction,
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
