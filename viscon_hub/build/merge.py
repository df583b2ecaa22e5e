"""Generation records -> rows of every config: per-image rows and the conversation mixes.

:class:`Merger` is the whole merge stage: it streams ``generations/records.parquet`` in batches,
deduplicates each image's questions (embeddings through the engine cache), assigns every page to a
split by the hash of its URL, and yields the rows of each config as it goes; memory does not grow
with the number of records. ``build.writer`` writes what it yields; ``build.driver`` wires the two.

The caption round gets a user turn drawn from ``configs/conversations.yaml`` (plus, in contextual
mixes, an instruction to bring in the context); Q&A rounds are shuffled; a multiple-choice round
shows the question and options A-D and asks for the letter. Every random choice is seeded from the
sample id and the purpose of the draw, so two builds give identical data and ``leaky`` and
``qa_only`` present the same rounds in the same order.

>>> style = ConversationStyle.load()
>>> rec = {"id": "doc-0", "context_mode": "non_contextual", "caption": "A red mug.",
...        "qa_freeform": [{"question": "What colour is the mug?", "answer": "Red."}],
...        "qa_multiple_choice": []}
>>> [r["round_types"] for r in mix_rows(rec, "leaky", style=style, image=None)]
[['caption', 'freeform']]
>>> [r["id"] for r in mix_rows(rec, "split", style=style, image=None)]
['doc-0-caption', 'doc-0-qa']
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from viscon_hub.build.dedup import DedupConfig, dedup_questions
from viscon_hub.build.layout import (
    ALL_CONFIGS,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_TEST_FRACTION,
    MIXES,
    config_mix,
    config_mode,
    parse_configs,
    parse_size,
)
from viscon_hub.build.quality import MultipleChoiceQuality, repair_multiple_choice
from viscon_hub.errors import ConfigError
from viscon_hub.generate.relevance import RelevanceConfig, attach_scores, read_scores
from viscon_hub.generate.stages import generation_records
from viscon_hub.prepare.filters import drop_toxic_records
from viscon_hub.recipe import opt
from viscon_hub.records import (
    GENERATION_COLUMNS,
    GENERATION_KEY_COLUMNS,
    GENERATION_TEMPLATE_COLUMNS,
)
from viscon_hub.resources import PACKAGE_DATA, config_path

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeConfig:
    """How generation records become the rows of each config: which configs, the test split, the
    question dedup, the multiple-choice checks, the conversation template and the shard size.

    ``configs`` left unset is every config here; ``viscon build`` chooses by its run (all for the
    bundled sample, ``contextual,leaky`` for a real source).

    >>> MergeConfig(configs="leaky,contextual", max_shard_size="200KB").configs
    ('contextual', 'leaky')
    >>> MergeConfig(test_fraction=1.0)
    Traceback (most recent call last):
    ...
    viscon_hub.errors.ConfigError: --test-fraction must be in [0, 1); got 1.0
    """

    configs: tuple[str, ...] | None = opt(
        None,
        "comma-separated config names, or all (default: all for the bundled sample, contextual,leaky "
        "with --source; each config carries its images' bytes, so each one more costs about the images again)",
        sep=",",
    )
    test_fraction: float = opt(DEFAULT_TEST_FRACTION, "share of pages in the test split")
    dedup: DedupConfig = opt(factory=DedupConfig, help="question dedup by sentence embeddings")
    multiple_choice: MultipleChoiceQuality = opt(
        factory=MultipleChoiceQuality, help="option shuffle and the length-tell check"
    )
    conversation_style: str | None = opt(
        None, "conversation template of the mixes (default: the bundled one)"
    )
    max_shard_size: int = opt(
        DEFAULT_MAX_SHARD_SIZE,
        "largest Parquet file per config and split, e.g. 500MB or 200KB (as push_to_hub)",
        size=True,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        if self.configs is not None:
            object.__setattr__(self, "configs", parse_configs(self.configs))
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in [0, 1); got {self.test_fraction}")

    @property
    def names(self) -> tuple[str, ...]:
        """The configs to write: ``configs``, or every one when unset."""
        return self.configs or ALL_CONFIGS


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationStyle:
    """The instruction texts of ``configs/conversations.yaml``."""

    version: int
    caption_instructions: tuple[str, ...]
    context_instructions: tuple[str, ...]
    multiple_choice_instruction: str

    def __post_init__(self) -> None:
        if not self.caption_instructions or not self.context_instructions:
            raise ConfigError(
                "conversations.yaml needs non-empty caption_instructions and context_instructions"
            )
        if not self.multiple_choice_instruction.strip():
            raise ConfigError("conversations.yaml needs a multiple_choice_instruction")

    @classmethod
    def load(cls, path: str | None = None) -> ConversationStyle:
        source = path or config_path("conversations.yaml")
        try:
            with open(source, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            return cls(
                version=int(data["version"]),
                caption_instructions=tuple(str(s) for s in data["caption_instructions"]),
                context_instructions=tuple(str(s) for s in data["context_instructions"]),
                multiple_choice_instruction=str(data["multiple_choice_instruction"]),
            )
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read the conversation style {source}: {e}") from e


def _rng(record: dict[str, Any]) -> random.Random:
    # random.Random seeds a str through sha512: stable across processes and Python versions.
    return random.Random(f"{record['context_mode']}|{record['id']}")


def multiple_choice_turn(item: dict[str, Any], style: ConversationStyle) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, item["options"], strict=True))
    return f"{item['question']}\n{options}\n{style.multiple_choice_instruction}"


def rounds_of(
    record: dict[str, Any], style: ConversationStyle
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(caption round, shuffled Q&A rounds) of a record, each round (type, user turn, assistant turn).

    One generator, seeded by the sample id, draws the caption instruction, then the context
    instruction, then the Q&A order, so every mix of a record shows the same turns.
    """
    rng = _rng(record)
    caption: list[tuple[str, str, str]] = []
    instruction = rng.choice(style.caption_instructions)
    context = rng.choice(style.context_instructions)
    if record.get("caption"):
        if record["context_mode"] == "contextual":
            instruction = f"{instruction} {context}"
        caption = [("caption", instruction, record["caption"])]
    qa = [("freeform", q["question"], q["answer"]) for q in record.get("qa_freeform") or ()]
    for item in record.get("qa_multiple_choice") or ():
        # The parser guarantees this; a record edited by hand must not smuggle in a bad answer.
        if len(item["options"]) != 4 or item["answer"] not in LETTERS:
            raise ValueError(f"multiple-choice item of {record['id']} is not four options with an A-D answer")
        qa.append(("multiple_choice", multiple_choice_turn(item, style), item["answer"]))
    rng.shuffle(qa)
    return caption, qa


def qa_rounds(record: dict[str, Any], style: ConversationStyle) -> list[tuple[str, str, str]]:
    """(round type, user turn, assistant turn) for every kept Q&A item, shuffled with the sample's seed."""
    return rounds_of(record, style)[1]


def _conversation(
    record: dict[str, Any], sample_id: str, rounds: list[tuple[str, str, str]], image: Any
) -> dict[str, Any]:
    messages = []
    for _, user, assistant in rounds:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {
        "id": sample_id,
        "image": image,
        "image_sha256": record.get("image_sha256"),
        "source_url": record.get("page_url"),
        "context_mode": record["context_mode"],
        "messages": messages,
        "round_types": [kind for kind, _, _ in rounds],
    }


def mix_rows(
    record: dict[str, Any],
    mix: str,
    *,
    style: ConversationStyle,
    image: Any,
    rounds: tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]] | None = None,
) -> list[dict[str, Any]]:
    """The rows a mix makes of one record (its Q&A already deduplicated). Empty when it has nothing to say.

    ``captions_only``: the caption round. ``qa_only``: the shuffled Q&A rounds. ``leaky``: the
    caption round, then the shuffled Q&A rounds, in one conversation. ``split``: the caption round
    and the Q&A rounds as two samples, ``<id>-caption`` and ``<id>-qa``. ``rounds`` is
    :func:`rounds_of` of the record, when the caller made it already.
    """
    if mix not in MIXES:
        raise ConfigError(f"unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    caption, qa = rounds if rounds is not None else rounds_of(record, style)
    rid = record["id"]
    if mix == "captions_only":
        return [_conversation(record, rid, caption, image)] if caption else []
    if mix == "qa_only":
        return [_conversation(record, rid, qa, image)] if qa else []
    if mix == "leaky":
        return [_conversation(record, rid, caption + qa, image)] if caption and qa else []
    if not (caption and qa):
        return []
    return [
        _conversation(record, f"{rid}-caption", caption, image),
        _conversation(record, f"{rid}-qa", qa, image),
    ]


# Generation columns a per-image row shows as they are (the rest are reshaped or kept back).
PER_IMAGE_KEYS = tuple(
    c
    for c in GENERATION_COLUMNS
    if c
    in {
        "image_sha256",
        "width",
        "height",
        "image_url",
        "alt_text",
        "context",
        "context_tokens",
        "context_mode",
        "caption",
        "caption_model",
        "qa_model",
        *GENERATION_TEMPLATE_COLUMNS,
    }
) + ("caption_relevance_kl", "caption_relevance_pmi")  # from generate.relevance, when scored
# What the mixes read: the page, the mode and status, the caption and Q&A, the image; never the
# page text, which only the per-image configs show.
MIX_COLUMNS = tuple(
    c
    for c in GENERATION_COLUMNS
    if c
    in {
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
    }
)
# What the first pass reads: pages for the splits, templates and cache keys for the card and costs.
SCAN_COLUMNS = tuple(
    c
    for c in GENERATION_COLUMNS
    if c in {"document_id", "page_url", "context_mode", "status", "image_sha256"}
    or c in GENERATION_TEMPLATE_COLUMNS
    or c in GENERATION_KEY_COLUMNS
)


def per_image_row(record: dict[str, Any], *, image: Any, questions_generated: int) -> dict[str, Any]:
    """The ``contextual`` / ``non_contextual`` row of a record (Q&A already deduplicated)."""
    ff = list(record.get("qa_freeform") or [])
    mc = list(record.get("qa_multiple_choice") or [])
    row = {"id": record["id"], "image": image, "source_url": record.get("page_url")}
    row.update({k: record.get(k) for k in PER_IMAGE_KEYS})
    row.update(
        qa_freeform=ff,
        qa_multiple_choice=mc,
        questions_generated=questions_generated,
        questions_removed_by_dedup=questions_generated - len(ff) - len(mc),
        provenance=_provenance(record),
    )
    return row


def public_source(value: str | None) -> str | None:
    """A source fit to publish: URLs and dataset ids as they are, local paths without their folders.

    >>> public_source("/home/me/obelics/part-3.parquet"), public_source("hf://datasets/a/b/x.parquet")
    ('part-3.parquet', 'hf://datasets/a/b/x.parquet')
    """
    if not value:
        return value
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value or not (value.startswith(("/", "./", "../", "~")) or os.path.isabs(value)):
        return value
    path = Path(value)
    try:
        return f"viscon-hub:{path.resolve().relative_to(PACKAGE_DATA.resolve()).as_posix()}"
    except ValueError:
        return path.name


def _provenance(record: dict[str, Any]) -> str:
    value = record.get("provenance")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {"raw": value}
    value = dict(value or {})
    value.update(
        {
            "document_id": record.get("document_id"),
            "image_index": record.get("image_index"),
            "source": public_source(record.get("source")),
            "row": record.get("row"),
            "caption_key": record.get("caption_key"),
            "qa_freeform_key": record.get("qa_freeform_key"),
            "qa_multiple_choice_key": record.get("qa_multiple_choice_key"),
        }
    )
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


READ_BATCH = 2048  # records per batch: the unit of reading, dedup and row making


def iter_record_batches(
    paths: list[str] | str | Path,
    columns: tuple[str, ...] | None,
    drops: Counter[str],
    batch_size: int = READ_BATCH,
) -> Iterator[list[dict[str, Any]]]:
    """Lists of at most ``batch_size`` generation records, one row group read at a time.

    Several files are the parts of a sharded ``viscon generate``: each holds its share of the
    contexts mode by mode, so they are read mode by mode, part after part, which is the record order
    of one unsharded run. A row group that cannot be read (a damaged file) is counted in ``drops`` by
    its rows, under ``records/unreadable_row_group``; the others are still read.
    """
    if isinstance(paths, str | Path):
        paths = [str(paths)]
    if len(paths) == 1:
        chunks = _file_batches(paths[0], columns, drops, batch_size, mode=None)
    else:
        chunks = (
            chunk
            for n, mode in enumerate(("contextual", "non_contextual"))
            for path in paths
            for chunk in _file_batches(path, columns, drops if n == 0 else Counter(), batch_size, mode=mode)
        )
    # Batches of exactly ``batch_size`` records in record order, whatever the files' row groups: the
    # per-batch dedup figures are then the same for one records file and for its shards.
    pending: list[dict[str, Any]] = []
    for chunk in chunks:
        pending.extend(chunk)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if pending:
        yield pending


def _file_batches(
    path: str, columns: tuple[str, ...] | None, drops: Counter[str], batch_size: int, *, mode: str | None
) -> Iterator[list[dict[str, Any]]]:
    import fsspec
    import pyarrow.compute as pc

    fs, local = fsspec.core.url_to_fs(path)
    with fs.open(local, "rb") as f, pq.ParquetFile(f) as pf:
        names = set(pf.schema_arrow.names)
        wanted = [c for c in columns or GENERATION_COLUMNS if c in names]
        if mode is not None and "context_mode" not in wanted:
            wanted.append("context_mode")
        for i in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(i, columns=wanted)
            except (OSError, pa.ArrowException) as e:
                n = pf.metadata.row_group(i).num_rows
                logger.warning("row group %d of %s is unreadable (%s): %d records dropped", i, path, e, n)
                drops["records/unreadable_row_group"] += n
                continue
            if mode is not None:
                table = table.filter(pc.equal(table["context_mode"], mode))
            for batch in table.to_batches(max_chunksize=batch_size):
                yield batch.to_pylist()
            del table


class PageSplits:
    """Page -> split from the sha256 of its URL, learnt in one pass that keeps O(1) per page.

    A page scoring below the test fraction is test. When none does (and there are two pages or
    more), the lowest-scoring page is test, as :func:`~viscon_hub.build.layout.assign_splits` does.
    Page scores are kept as 8-byte integers to count pages per split, never the URLs.
    """

    def __init__(self, test_fraction: float) -> None:
        self.test_fraction = test_fraction
        self.cut = int(test_fraction * 2**64)
        self._scores: list[np.ndarray] = []
        self._pending: list[int] = []
        self.lowest: tuple[int, str] | None = None
        self.forced: str | None = None

    @staticmethod
    def score(key: str) -> int:
        import hashlib

        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")

    def add(self, key: str) -> None:
        s = self.score(key)
        self._pending.append(s)
        if len(self._pending) >= 65536:
            self._compact()
        if self.lowest is None or (s, key) < self.lowest:
            self.lowest = (s, key)

    def _compact(self) -> None:
        if self._pending:
            self._scores.append(np.unique(np.array(self._pending, dtype=np.uint64)))
            self._pending = []
        if len(self._scores) > 1:
            self._scores = [np.unique(np.concatenate(self._scores))]

    def finish(self) -> dict[str, int]:
        """Close the pass; return pages per split."""
        self._compact()
        scores = self._scores[0] if self._scores else np.zeros(0, dtype=np.uint64)
        test = int((scores < np.uint64(self.cut)).sum()) if self.test_fraction > 0 else 0
        if self.test_fraction > 0 and len(scores) >= 2 and test == 0 and self.lowest is not None:
            self.forced, test = self.lowest[1], 1
        self._scores = [scores]
        return {"train": len(scores) - test, "test": test}

    def split(self, key: str) -> str:
        if key == self.forced or self.score(key) < self.cut:
            return "test"
        return "train"


class Merger:
    """Generation records, deduplicated and assigned to splits, streamed as the rows of each config.

    The constructor makes one light pass (pages, templates, costs); :meth:`iter_rows` reads the
    records again a batch at a time, dedups each batch's questions and yields rows as it goes, so
    memory is one batch plus what a page split and the cache keys need. ``cache_only`` answers
    question embeddings from the cache alone (the ``datasets`` builder uses it: a builder never runs
    a model); a miss is then an error that says to run ``viscon build``. ``drops`` counts every
    record left out, by mode (or config) and reason.
    """

    def __init__(
        self,
        *,
        generations: str,
        modes: tuple[str, ...] = ("contextual", "non_contextual"),
        merge: MergeConfig | None = None,
        cache: str = "viscon-cache",
        extra_caches: tuple[str, ...] = (),
        offline: bool = True,
        cache_only: bool = False,
        image_store: str | None = None,
        per_image: bool = True,
        batch_size: int = READ_BATCH,
        toxic_text: float | None = None,
        relevance: RelevanceConfig | None = None,
    ) -> None:
        from viscon_hub.prepare.filters import ToxicText
        from viscon_hub.prepare.images import ImageStore

        self.relevance_config = relevance or RelevanceConfig()
        self.scores = read_scores(generations)
        if self.relevance_config.min_relevance is not None and not self.scores:
            raise ConfigError(
                f"--min-relevance needs relevance scores, and {generations!r} has none: "
                "add --relevance-model (transformers:... or openai:... on a vLLM server)"
            )
        self.relevance: dict[str, Counter[str]] = {m: Counter() for m in sorted(modes)}
        merge = merge or MergeConfig()
        self.multiple_choice = merge.multiple_choice
        self.quality: dict[str, Counter[str]] = {m: Counter() for m in sorted(modes)}
        self.toxic = ToxicText(threshold=toxic_text) if toxic_text is not None else None

        self.dedup_config = merge.dedup
        self.style = ConversationStyle.load(merge.conversation_style)
        self.test_fraction = merge.test_fraction
        self.modes = tuple(sorted(modes))
        self.offline, self.cache_only = offline, cache_only
        self.cache_url, self.extra_caches = cache, tuple(extra_caches)
        self.batch_size = batch_size
        self.paths, self.generation_stats = generation_records(generations)
        # Mixes need no page text: leaving the big columns unread halves the merge's time and memory.
        self.columns = None if per_image else MIX_COLUMNS
        self.store = ImageStore(
            image_store or self.generation_stats.get("image_store") or f"{generations}/images"
        )
        self.drops: Counter[str] = Counter()
        self.dedup_info: dict[str, Any] = {}
        self._cache = None
        self._scan(merge.test_fraction)

    # -- the first pass ----------------------------------------------------------------------------
    def _scan(self, test_fraction: float) -> None:
        self.splits = PageSplits(test_fraction)
        templates: set[str] = set()
        # A reply shared by two records (the same request) is paid once.
        keys: set[str] = set()
        self.ok_records = dict.fromkeys(self.modes, 0)
        self.image_sample: list[str] = []
        cache = self.cache()
        scan_drops: Counter[str] = Counter()
        for batch in iter_record_batches(self.paths, SCAN_COLUMNS, scan_drops, self.batch_size):
            for r in batch:
                if not r.get("document_id"):
                    continue  # counted when the rows are made
                self.splits.add(page_key(r))
                templates.update(r[k] for k in GENERATION_TEMPLATE_COLUMNS if r.get(k))
                if r.get("context_mode") in self.ok_records and r.get("status") == "ok":
                    self.ok_records[r["context_mode"]] += 1
                    if len(self.image_sample) < 256 and r.get("image_sha256"):
                        self.image_sample.append(r["image_sha256"])
                keys.update(k for k in (r.get(name) for name in GENERATION_KEY_COLUMNS) if k)
        self.usage = cache.usage(keys).to_dict()
        del keys
        self.templates = sorted(templates)
        self.pages = self.splits.finish()

    def cache(self):
        """The engine cache (opened on first use, kept open until :meth:`close`)."""
        if self._cache is None:
            from viscon_hub.engine import GenerationCache

            self._cache = GenerationCache(self.cache_url, fallbacks=self.extra_caches)
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def image_bytes_estimate(self) -> int:
        """Mean size of a stored image, from up to 256 of them (0 when none can be read)."""
        sizes = []
        for sha in self.image_sample:
            try:
                sizes.append(len(self.store.get(sha)))
            except (OSError, ConfigError):  # missing, or not a sha256: counted when rows are made
                continue
        return int(sum(sizes) / len(sizes)) if sizes else 0

    def image_cost(self, configs: tuple[str, ...]) -> str:
        """One line on what the images will cost on disk, said before anything is written.

        Every config carries the bytes of its rows' images; ``split`` shows each twice, but Parquet's
        dictionary encoding stores a repeat within a row group once. Estimated from the ok records
        per mode and the mean size of a sample of stored images.
        """
        mean = self.image_bytes_estimate()
        # Both modes are made from the same image contexts: the larger one stands for the images.
        images = max(self.ok_records.get(config_mode(c), 0) for c in configs)
        once = images * mean
        total = sum(self.ok_records.get(config_mode(c), 0) for c in configs) * mean
        ratio = total / once if once else 0.0
        return (
            f"{len(configs)} configs carry image bytes: about {total / 1e6:.1f} MB of images on disk "
            f"({ratio:.1f}x the {once / 1e6:.1f} MB of {images} images once): each config costs the images "
            "again (a real run builds --configs contextual,leaky unless told otherwise)"
        )

    def dropped(self) -> dict[str, dict[str, int]]:
        """:attr:`drops` as {where: {reason: count}}, sorted."""
        out: dict[str, dict[str, int]] = {}
        for key, n in sorted(self.drops.items()):
            where, reason = key.split("/", 1)
            out.setdefault(where, {})[reason] = n
        return out

    def split_of(self, record: dict[str, Any]) -> str:
        return self.splits.split(page_key(record))

    # -- the second pass -----------------------------------------------------------------------
    def _dedup(self, mode: str, recs: list[dict[str, Any]]) -> dict[str, int]:
        """Dedup a batch's questions in place; return questions generated per record id."""
        items = [
            (
                [q["question"] for q in r["qa_freeform"] or []],
                [q["question"] for q in r["qa_multiple_choice"] or []],
            )
            for r in recs
        ]
        result = dedup_questions(
            items,
            config=self.dedup_config,
            cache=self.cache(),
            offline=self.offline,
            cache_only=self.cache_only,
        )
        generated = {}
        for r, (ff, mc), (keep_ff, keep_mc) in zip(recs, items, result.keep, strict=True):
            generated[r["id"]] = len(ff) + len(mc)
            r["qa_freeform"] = [r["qa_freeform"][i] for i in keep_ff]
            r["qa_multiple_choice"] = [r["qa_multiple_choice"][i] for i in keep_mc]
        self.dedup_info[mode] = _add_dedup(self.dedup_info.get(mode), result.to_dict())
        return generated

    def iter_rows(self, configs: tuple[str, ...]) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        """(config, split, rows) per record and config, in record order; images read once per record."""
        by_mode = {m: [c for c in configs if config_mode(c) == m] for m in self.modes}
        by_mode = {m: cs for m, cs in by_mode.items() if cs}
        self.dedup_info = {}
        for batch in iter_record_batches(self.paths, self.columns, self.drops, self.batch_size):
            for mode, mode_configs in by_mode.items():
                ok = []
                for r in batch:
                    if r.get("context_mode") != mode:
                        continue
                    reason = _unusable(r)
                    if reason:
                        self.drops[f"{mode}/{reason}"] += 1
                        continue
                    if self.scores:
                        r, counts = attach_scores(
                            r,
                            self.scores.get((mode, r["id"]), {}),
                            min_relevance=self.relevance_config.min_relevance,
                            on=self.relevance_config.on,
                        )
                        self.relevance[mode].update(counts)
                    ok.append(r)
                if self.toxic is not None and ok:
                    ok, n = drop_toxic_records(ok, self.toxic)
                    if n:
                        self.drops[f"{mode}/toxic_text"] += n
                generated = self._dedup(mode, ok) if ok else {}
                for r in ok:
                    yield from self._rows(r, mode, mode_configs, generated[r["id"]])
        for mode in by_mode:
            if mode not in self.dedup_info:  # no record with Q&A: the figures of an empty dedup
                self.dedup_info[mode] = dedup_questions(
                    [], config=self.dedup_config, cache=self.cache(), offline=self.offline
                ).to_dict()

    def _rows(
        self, r: dict[str, Any], mode: str, mode_configs: list[str], generated: int
    ) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        sha = r.get("image_sha256")
        try:
            data = self.store.get(sha) if sha else None
        except (OSError, ValueError, ConfigError):  # a missing blob, or a sha256 that names none
            data = None
        if data is None:
            self.drops[f"{mode}/image_missing"] += 1
            return
        image = {"bytes": data, "path": f"{sha}.{_ext(r)}"}
        try:
            split = self.split_of(r)
            r, flags = repair_multiple_choice(r, self.multiple_choice)
            self.quality[mode].update(flags)
            rounds = rounds_of(r, self.style)
            made = []
            for c in mode_configs:
                mix = config_mix(c)
                if mix is None:
                    made.append((c, [per_image_row(r, image=image, questions_generated=generated)]))
                else:
                    made.append((c, mix_rows(r, mix, style=self.style, image=image, rounds=rounds)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            logger.debug("record %r cannot be merged: %s", r.get("id"), e)
            self.drops[f"{mode}/unreadable_record"] += 1
            return
        for c, rows in made:
            if not rows and config_mix(c) is not None:
                self.drops[f"{c}/nothing_to_say"] += 1
            yield c, split, rows


def page_key(r: dict[str, Any]) -> str:
    return r.get("page_url") or f"document:{r['document_id']}"


def _unusable(r: dict[str, Any]) -> str | None:
    """Why a record of its mode cannot be merged, or None."""
    if r.get("status") != "ok":
        return r.get("drop_reason") or "dropped"
    if not isinstance(r.get("id"), str) or not r["id"] or not r.get("document_id"):
        return "unreadable_record"
    for name in ("qa_freeform", "qa_multiple_choice"):
        items = r.get(name)
        if items is not None and not all(
            isinstance(q, dict) and isinstance(q.get("question"), str) for q in items
        ):
            return "unreadable_record"
    return None


def _ext(r: dict[str, Any]) -> str:
    fmt = (r.get("image_format") or "jpeg").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _add_dedup(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Dedup figures of two batches as one: counts add up, the model and fallback are the first's."""
    if total is None:
        return part
    for k in ("images", "questions_in", "unique_questions", "questions_kept", "removed", "embedding_errors"):
        total[k] = total.get(k, 0) + part.get(k, 0)
    if part.get("fell_back") and not total.get("fell_back"):
        total.update(fell_back=True, fallback_reason=part.get("fallback_reason"), model=part.get("model"))
    engine, more = total.setdefault("engine", {}), part.get("engine") or {}
    for k, v in more.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            engine[k] = round(engine.get(k, 0) + v, 6)
        elif isinstance(v, dict):
            into = engine.setdefault(k, {})
            for model, figures in v.items():
                slot = into.setdefault(model, {})
                for fk, fv in figures.items():
                    slot[fk] = round(slot.get(fk, 0) + fv, 6)
    return total


__all__ = [
    "MIX_COLUMNS",
    "Merger",
    "PageSplits",
    "iter_record_batches",
    "generation_records",
    "ConversationStyle",
    "rounds_of",
    "mix_rows",
    "multiple_choice_turn",
    "per_image_row",
    "qa_rounds",
]
