"""``viscon build``: prepare, generate, dedup and merge into a local dataset folder every config loads from.

The merge reads generation records only; it never calls a generation model. Question embeddings for
the dedup go through the same engine cache as the generations, so a rebuild computes nothing twice.
Rows are written in record order, a fixed number per Parquet row group, with no timestamps: two
builds of the same records give byte-identical Parquet.

>>> cfg = BuildConfig()          # no flags: the bundled sample, the bundled cache, offline
>>> cfg.offline, cfg.caption_model, cfg.source is None
(True, 'openai:handwritten-example', True)
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub import __version__
from viscon_hub.build.dedup import DedupConfig, dedup_questions
from viscon_hub.build.layout import (
    ALL_CONFIGS,
    BUILD_INFO,
    DEFAULT_CONFIG,
    DEFAULT_TEST_FRACTION,
    SPLITS,
    assign_splits,
    config_mix,
    config_mode,
    data_path,
    features_for,
    split_score,
    write_minimal_readme,
)
from viscon_hub.build.merge import ConversationStyle, mix_rows, per_image_row, public_source, rounds_of
from viscon_hub.engine import EngineConfig, GenerationCache
from viscon_hub.errors import ConfigError
from viscon_hub.prepare.images import ImageStore
from viscon_hub.runners import RunnerOptions, run_generate, run_prepare

logger = logging.getLogger(__name__)

QUICKSTART_MODEL = "openai:handwritten-example"
SAMPLE_SOURCE = "viscon-hub:sample/obelics_sample.jsonl"
ROW_GROUP = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildConfig:
    """Everything ``viscon build`` takes.

    With no source and no models it is the quickstart: the bundled sample, the bundled handwritten
    cache, offline. Naming a source or a model switches to real generation (``openai:gpt-4o`` for
    whatever is not named), online unless ``offline``.
    """

    source: str | None = None
    revision: str | None = None
    output: str = "viscon"
    work_dir: str | None = None
    configs: tuple[str, ...] = ALL_CONFIGS
    cache: str = "viscon-cache"
    extra_caches: tuple[str, ...] = ()
    caption_model: str | None = None
    qa_model: str | None = None
    base_url: str | None = None
    offline: bool | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    limit: int | None = None
    reasks: int = 2
    dedup: DedupConfig = field(default_factory=DedupConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    conversation_style: str | None = None
    runner: RunnerOptions = field(default_factory=RunnerOptions)

    def __post_init__(self) -> None:
        quickstart = self.source is None and self.caption_model is None and self.qa_model is None
        if quickstart:
            from viscon_hub.generate.handwritten import BUNDLED_CACHE

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
    from viscon_hub.generate.stages import GenerateConfig
    from viscon_hub.prepare.driver import PrepareConfig

    work = config.work.rstrip("/")
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    say("prepare")
    prep = run_prepare(
        PrepareConfig(
            source=config.source, output=f"{work}/contexts", limit=config.limit, revision=config.revision
        ),
        runner=config.runner,
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
        source=config.source or SAMPLE_SOURCE,
        source_revision=config.revision,
    )
    report.stages = {
        "prepare": prep.to_dict(),
        "generate": gen.to_dict(),
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    return report


MIX_COLUMNS = (
    "id",
    "document_id",
    "page_url",
    "context_mode",
    "status",
    "drop_reason",
    "caption",
    "qa_freeform",
    "qa_multiple_choice",
    "image_sha256",
    "image_format",
    "caption_template",
    "qa_freeform_template",
    "qa_multiple_choice_template",
    "caption_key",
    "qa_freeform_key",
    "qa_multiple_choice_key",
)


def read_records(
    generations: str, *, columns: tuple[str, ...] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The generation records (all columns, or ``columns``) and the stats of a ``viscon generate`` folder.

    A sharded generate's parts are all read, in the record order of one unsharded run.
    """
    from viscon_hub.generate.stages import read_generations

    table = read_generations(generations, columns=list(columns) if columns else None)
    stats_path = Path(generations) / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return table.to_pylist(), stats


class Merger:
    """Generation records, deduplicated and assigned to splits, ready to be turned into config rows.

    ``cache_only`` answers question embeddings from the cache alone (the ``datasets`` builder uses it:
    a builder never runs a model); a miss is then an error that says to run ``viscon build``.
    """

    def __init__(
        self,
        *,
        generations: str,
        modes: tuple[str, ...] = ("contextual", "non_contextual"),
        cache: str = "viscon-cache",
        extra_caches: tuple[str, ...] = (),
        test_fraction: float = DEFAULT_TEST_FRACTION,
        dedup: DedupConfig | None = None,
        offline: bool = True,
        cache_only: bool = False,
        conversation_style: str | None = None,
        image_store: str | None = None,
        per_image: bool = True,
    ) -> None:
        self.dedup_config = dedup or DedupConfig()
        self.style = ConversationStyle.load(conversation_style)
        self.test_fraction = test_fraction
        # Mixes need no page text: leaving the big columns unread halves the merge's time and memory.
        records, self.generation_stats = read_records(generations, columns=None if per_image else MIX_COLUMNS)
        self.store = ImageStore(
            image_store or self.generation_stats.get("image_store") or f"{generations}/images"
        )
        self.templates = _templates(records)
        # Every config of one page lands in one split: the split is a function of the page alone.
        pages = {_page_key(r): split_score(r.get("page_url"), r["document_id"]) for r in records}
        self.page_split = assign_splits(pages, test_fraction)
        self.drops: Counter[str] = Counter()
        self.ok: dict[str, list[dict[str, Any]]] = {m: [] for m in sorted(modes)}
        for r in records:
            if r["context_mode"] not in self.ok:
                continue
            if r["status"] != "ok":
                self.drops[f"{r['context_mode']}/{r.get('drop_reason') or 'dropped'}"] += 1
                continue
            self.ok[r["context_mode"]].append(r)
        self.generated: dict[tuple[str, str], int] = {}
        self.dedup_info: dict[str, Any] = {}
        cache_obj = GenerationCache(cache, fallbacks=extra_caches)
        try:
            self.usage = _usage(records, cache_obj)
            for mode, recs in self.ok.items():
                self._dedup(mode, recs, cache_obj, offline=offline, cache_only=cache_only)
        finally:
            cache_obj.close()

    def _dedup(self, mode: str, recs: list[dict[str, Any]], cache: GenerationCache, **flags: bool) -> None:
        items = [
            (
                [q["question"] for q in r["qa_freeform"] or []],
                [q["question"] for q in r["qa_multiple_choice"] or []],
            )
            for r in recs
        ]
        result = dedup_questions(items, config=self.dedup_config, cache=cache, **flags)
        for r, (ff, mc), (keep_ff, keep_mc) in zip(recs, items, result.keep, strict=True):
            self.generated[(mode, r["id"])] = len(ff) + len(mc)
            r["qa_freeform"] = [r["qa_freeform"][i] for i in keep_ff]
            r["qa_multiple_choice"] = [r["qa_multiple_choice"][i] for i in keep_mc]
        self.dedup_info[mode] = result.to_dict()

    def split_of(self, record: dict[str, Any]) -> str:
        return self.page_split[_page_key(record)]

    def iter_rows(self, configs: tuple[str, ...]) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        """(config, split, rows) per record and config, in record order; images read once per record."""
        for mode, recs in self.ok.items():
            mode_configs = [c for c in configs if config_mode(c) == mode]
            if not mode_configs:
                continue
            for r in recs:
                sha = r.get("image_sha256")
                try:
                    data = self.store.get(sha) if sha else None
                except FileNotFoundError:
                    data = None
                if data is None:
                    self.drops[f"{mode}/image_missing"] += 1
                    continue
                image = {"bytes": data, "path": f"{sha}.{_ext(r)}"}
                split = self.split_of(r)
                rounds = rounds_of(r, self.style)
                for c in mode_configs:
                    mix = config_mix(c)
                    if mix is None:
                        generated = self.generated[(mode, r["id"])]
                        rows = [per_image_row(r, image=image, questions_generated=generated)]
                    else:
                        rows = mix_rows(r, mix, style=self.style, image=image, rounds=rounds)
                        if not rows:
                            self.drops[f"{c}/nothing_to_say"] += 1
                    yield c, split, rows


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
    source: str | None = None,
    source_revision: str | None = None,
) -> BuildReport:
    """Dedup, merge and write every config of ``configs`` from the records under ``generations``."""
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
    )
    out = Path(output)
    staging = out / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    writers = _Writers(staging, configs)
    try:
        for config, split, rows in merger.iter_rows(configs):
            writers.add(config, split, rows)
        writers.close()
    except BaseException:
        writers.abort()
        raise
    _swap_in(staging, out, configs)
    # A config without a single row (e.g. no record has Q&A) is reported, not declared.
    empty = [c for c in configs if not sum(writers.counts[c].values())]
    for c in empty:
        logger.warning("config %s has no rows; it is left out of %s", c, out / "README.md")
    configs = tuple(c for c in configs if c not in empty)

    report = BuildReport(
        output=str(out), rows=writers.counts, dropped=_nest(merger.drops), dedup=merger.dedup_info
    )
    gen_stats = merger.generation_stats
    splits = list(merger.page_split.values())
    info = {
        "viscon_hub_version": __version__,
        "configs": list(configs),
        "default_config": DEFAULT_CONFIG if DEFAULT_CONFIG in configs else configs[0],
        "rows": report.rows,
        "test_fraction": test_fraction,
        "pages": {s: splits.count(s) for s in SPLITS},
        "dropped": {"merge": report.dropped, "generate": gen_stats.get("dropped", {})},
        "dedup": merger.dedup_info,
        "conversation_style": merger.style.version,
        "generation": {
            k: gen_stats.get(k) for k in ("caption_model", "qa_model", "context", "records", "records_ok")
        },
        "source": public_source(source) if source else None,
        "source_revision": source_revision,
        "templates": merger.templates,
        "usage": merger.usage,
    }
    (out / BUILD_INFO).write_text(json.dumps(_stable(info), indent=2, sort_keys=True) + "\n")
    write_minimal_readme(out, configs)
    return report


def _stable(info: dict[str, Any]) -> dict[str, Any]:
    """Keep only figures of the data, not of the run (timings, calls vs cache hits): a cold and a warm
    build of the same records write the same file. What a run called is in its own report."""
    info = copy.deepcopy(info)
    for d in (info.get("dedup") or {}).values():
        if isinstance(d, dict) and isinstance(d.get("engine"), dict):
            d["engine"] = {k: d["engine"][k] for k in ("requests", "unique") if k in d["engine"]}
    return info


def _usage(records: list[dict[str, Any]], cache: GenerationCache) -> dict[str, dict[str, Any]]:
    """Tokens and estimated cost per model of the stored replies behind ``records``.

    Read from the cache rather than from a run's report, so a rebuild from a warm cache still shows
    what the data cost to generate.
    """
    from viscon_hub.engine.prices import PriceTable

    prices = PriceTable.load()
    out: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for r in records:
        for field_name in ("caption_key", "qa_freeform_key", "qa_multiple_choice_key"):
            key = r.get(field_name)
            if not key or key in seen:
                continue
            seen.add(key)
            c = cache.get(key)
            if c is None:
                continue
            u = out.setdefault(
                c.model or "unknown",
                {"replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0},
            )
            u["replies"] += 1
            u["prompt_tokens"] += c.prompt_tokens
            u["completion_tokens"] += c.completion_tokens
            u["cost_usd"] += prices.cost(c.model, c.prompt_tokens, c.completion_tokens)
    for u in out.values():
        u["cost_usd"] = round(u["cost_usd"], 6)
    return dict(sorted(out.items()))


def _templates(records: list[dict[str, Any]]) -> list[str]:
    names = set()
    for r in records:
        for k in ("caption_template", "qa_freeform_template", "qa_multiple_choice_template"):
            if r.get(k):
                names.add(r[k])
    return sorted(names)


def _page_key(r: dict[str, Any]) -> str:
    return r.get("page_url") or f"document:{r['document_id']}"


def _ext(r: dict[str, Any]) -> str:
    fmt = (r.get("image_format") or "jpeg").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _nest(counter: Counter[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, n in sorted(counter.items()):
        where, reason = key.split("/", 1)
        out.setdefault(where, {})[reason] = n
    return out


class _Writers:
    """One Parquet writer per config and split, in a staging folder; row groups of fixed size."""

    def __init__(self, root: Path, configs: tuple[str, ...]) -> None:
        self.root = root
        self.configs = configs
        self.schemas = {c: features_for(c).arrow_schema for c in configs}
        self.buffers: dict[tuple[str, str], list[dict[str, Any]]] = {
            (c, s): [] for c in configs for s in SPLITS
        }
        self.writers: dict[tuple[str, str], pq.ParquetWriter] = {}
        self.counts: dict[str, dict[str, int]] = {c: dict.fromkeys(SPLITS, 0) for c in configs}

    def add(self, config: str, split: str, rows: list[dict[str, Any]]) -> None:
        buf = self.buffers[(config, split)]
        buf.extend(rows)
        self.counts[config][split] += len(rows)
        if len(buf) >= ROW_GROUP:
            self._flush(config, split)

    def _writer(self, config: str, split: str) -> pq.ParquetWriter:
        w = self.writers.get((config, split))
        if w is None:
            path = self.root / data_path(config, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            w = pq.ParquetWriter(path, self.schemas[config], compression="zstd", write_statistics=False)
            self.writers[(config, split)] = w
        return w

    def _flush(self, config: str, split: str) -> None:
        buf = self.buffers[(config, split)]
        while buf:
            rows, buf[:] = buf[:ROW_GROUP], buf[ROW_GROUP:]
            table = pa.Table.from_pylist(rows, schema=self.schemas[config])
            self._writer(config, split).write_table(table, row_group_size=ROW_GROUP)

    def close(self) -> None:
        for config in self.configs:
            for split in SPLITS:
                self._flush(config, split)
                # A split without rows gets no file (datasets cannot load one); the README omits it.
                w = self.writers.get((config, split))
                if w is not None:
                    w.close()

    def abort(self) -> None:
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already failing; the staging folder is discarded
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _swap_in(staging: Path, out: Path, configs: tuple[str, ...]) -> None:
    """Move each config folder into place; configs of an older build that this one lacks are removed."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ALL_CONFIGS:
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        if name in configs and (staging / name).exists():
            (staging / name).replace(target)
    shutil.rmtree(staging, ignore_errors=True)


__all__ = ["BuildConfig", "BuildReport", "Merger", "build", "read_records", "write_dataset"]
