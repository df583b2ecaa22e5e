"""Statistics and plots of a built dataset folder, the figures the dataset card shows.

:func:`compute_stats` reads the Parquet files of a folder written by ``viscon build`` a batch at a
time, only the columns it needs (never the image bytes), plus ``viscon_build.json``; it returns a
JSON-ready dict with sorted keys and rounded floats, so the same data always gives the same dict.
:func:`write_plots` draws that dict as PNG files under ``plots/``; it reads nothing else, so the
plots of a ``stats.json`` are the plots of the data it was computed from.

Per-image figures (context tokens, caption/context overlap, Q&A counts, lengths, image sizes, word
frequencies) come from the ``contextual`` config, or from ``non_contextual`` when the build has no
contextual one (``primary_config`` says which). When both exist, ``non_contextual_baseline`` holds
the same headline figures for the non-contextual captions.

Caption/context word overlap (the paper's Figure 5b), per per-image row::

    words(t)    = lowercased maximal runs of letters/digits (an apostrophe inside a word is kept,
                  so "don't" is one word), minus STOPWORDS and one-character words
    C           = words(caption), a list (repeats count)
    K           = {stem(w) for w in words(context)}, the context with <image>/<another-image> removed
    overlap     = |{i : stem(C[i]) in K}| / |C|        (rows whose caption has no word are left out)

``stem`` is the Snowball English stemmer. A caption whose every word occurs in its context has
overlap 1.0; one that shares no word stem with it has 0.0.

>>> overlap_ratio("The red cups, and a spoon!", "Cups of red coffee; one spoon.")
1.0
>>> content_words("The café's cups don't leak")
["café's", 'cups', 'leak']
"""

from __future__ import annotations

import json
import logging
import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from viscon_hub.build.layout import ALL_CONFIGS, BUILD_INFO, PER_IMAGE_CONFIGS, SPLITS, data_files
from viscon_hub.errors import ConfigError, MissingDependencyError
from viscon_hub.records import IMAGE_PLACEHOLDER, OTHER_IMAGE_PLACEHOLDER
from viscon_hub.resources import HANDWRITTEN_MODEL

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
PLOTS_DIR = "plots"
STATS_VERSION = 1
WORDCLOUD_WORDS = 200
BATCH_ROWS = 512
_DIGITS = 4
_CARD_EXTRA = "pip install 'viscon-hub[card]'"

# Our own list of English function words: articles, pronouns, auxiliaries, prepositions,
# conjunctions, common adverbs and their contractions. Content words a caption shares with its page
# ("red", "museum", "one") are deliberately not in it.
STOPWORDS: frozenset[str] = frozenset(
    """
    a about above across after afterwards again against all almost alone along already also although
    always am among amongst an and another any anybody anyhow anyone anything anyway anywhere are
    aren't around as at be became because become becomes becoming been before beforehand behind being
    below beside besides between beyond both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't done down during each either else elsewhere enough etc even ever every
    everybody everyone everything everywhere few for from further had hadn't has hasn't have haven't
    having he he'd he'll he's her here here's hers herself him himself his how how's however i i'd i'll
    i'm i've if in indeed into is isn't it it's its itself just least less let's many may me might mine
    more moreover most mostly much must mustn't my myself namely neither never nevertheless no nobody
    none nor not nothing now nowhere of off often on once only onto or other others otherwise ought our
    ours ourselves out over own per perhaps quite rather really same shall shan't she she'd she'll
    she's should shouldn't since so some somebody somehow someone something sometimes somewhat
    somewhere still such than that that's the their theirs them themselves then thence there there's
    thereafter thereby therefore therein these they they'd they'll they're they've this those though
    through throughout thus to together too toward towards under unless until up upon us very via was
    wasn't we we'd we'll we're we've were weren't what what's whatever when when's whenever where
    where's whereas wherever whether which while who who's whoever whole whom whose why why's will with
    within without won't would wouldn't yet you you'd you'll you're you've your yours yourself
    yourselves
    """.split()
)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_PLACEHOLDERS = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(OTHER_IMAGE_PLACEHOLDER)}")


def words(text: str | None) -> list[str]:
    """Lowercased word tokens: runs of letters/digits, an inner apostrophe kept ("don't").

    >>> words("Hello, World! It's 1920.")
    ['hello', 'world', "it's", '1920']
    """
    if not text:
        return []
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def content_words(text: str | None) -> list[str]:
    """:func:`words` without :data:`STOPWORDS` and one-character words."""
    return [w for w in words(text) if len(w) > 1 and w not in STOPWORDS]


class Stemmer:
    """Snowball English stems, memoised: a vocabulary is small next to the number of words stemmed."""

    def __init__(self) -> None:
        try:
            import snowballstemmer
        except ImportError as e:
            raise MissingDependencyError(f"word overlap needs snowballstemmer: {_CARD_EXTRA}") from e
        self._stemmer = snowballstemmer.stemmer("english")
        self._memo: dict[str, str] = {}

    def __call__(self, word: str) -> str:
        stem = self._memo.get(word)
        if stem is None:
            stem = self._memo[word] = self._stemmer.stemWord(word)
        return stem


def overlap_ratio(
    caption: str | None, context: str | None, *, stemmer: Stemmer | None = None
) -> float | None:
    """Share of the caption's content words whose stem occurs in the context (see the module doc).

    None when the caption has no content word.

    >>> overlap_ratio("Running dogs", "A dog runs.")
    1.0
    >>> overlap_ratio("A blue kite", "A red car") == 0.0
    True
    """
    stem = stemmer or Stemmer()
    cap = content_words(caption)
    if not cap:
        return None
    ctx = {stem(w) for w in set(content_words(_PLACEHOLDERS.sub(" ", context or "")))}
    return sum(1 for w in cap if stem(w) in ctx) / len(cap)


def compute_stats(dataset_dir: str | Path) -> dict[str, Any]:
    """Statistics of a built dataset folder (see the module doc); JSON-ready, deterministic.

    Top-level keys: ``answer_length``, ``caption_length``, ``caption_word_frequencies``, ``configs``,
    ``context_tokens``, ``dedup``, ``dropped``, ``generation``, ``image_sizes``, ``multiple_choice``,
    ``non_contextual_baseline``, ``overlap``, ``primary_config``, ``provenance``, ``qa_counts``,
    ``stats_version``, ``usage``. A figure that the folder cannot give (no per-image config, no build
    info) is None or empty, never made up.

    >>> stats = compute_stats("viscon")                      # doctest: +SKIP
    >>> stats["context_tokens"]["mean"], stats["qa_counts"]["mode"]  # doctest: +SKIP
    (652.3, '4+4')
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a folder; expected one written by `viscon build`")
    info = _build_info(root)
    rows = _rows(root)
    if not rows:
        raise ConfigError(
            f"{str(root)!r} holds no config files (<config>/<split>-NNNNN-of-MMMMM.parquet); "
            "run `viscon build` first"
        )
    present = [c for c in PER_IMAGE_CONFIGS if c in rows]
    primary = present[0] if present else None
    stemmer = Stemmer()
    scans = {c: _scan_per_image(root, c, stemmer=stemmer, frequencies=c == primary) for c in present}
    main = scans.get(primary)

    stats: dict[str, Any] = {
        "stats_version": STATS_VERSION,
        "primary_config": primary,
        "configs": rows,
        "context_tokens": main.context_tokens() if main else None,
        "overlap": main.overlap() if main else None,
        "qa_counts": main.qa_counts() if main else None,
        "caption_length": main.caption_length() if main else None,
        "answer_length": main.answer_length() if main else None,
        "image_sizes": main.image_sizes() if main else None,
        "caption_word_frequencies": main.frequencies() if main else {},
        "non_contextual_baseline": (
            scans["non_contextual"].headline()
            if primary == "contextual" and "non_contextual" in scans
            else None
        ),
        "dedup": _dedup(scans, info),
        "multiple_choice": _multiple_choice(root, rows, info, stemmer=stemmer),
        "relevance": _relevance(root, present, info),
        "dropped": info.get("dropped") or {},
        "generation": info.get("generation") or {},
        "usage": _usage(info),
        "provenance": _provenance(info, scans),
    }
    # A JSON round trip gives one canonical shape (lists, str keys), so write_plots draws the same
    # pictures from this dict as from a stats.json read back later.
    return json.loads(_dumps(stats))


def write_stats(stats: dict[str, Any], dataset_dir: str | Path) -> str:
    """Write ``stats`` as ``DIR/stats.json`` (sorted keys, trailing newline); return the path written.

    >>> write_stats(compute_stats("viscon"), "viscon")   # doctest: +SKIP
    'viscon/stats.json'
    """
    path = Path(dataset_dir) / STATS_FILE
    path.write_text(_dumps(stats), encoding="utf-8")
    return str(path)


def _dumps(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


# --- reading ------------------------------------------------------------------------------------


def _build_info(root: Path) -> dict[str, Any]:
    path = root / BUILD_INFO
    if not path.is_file():
        logger.warning("%s has no %s: provenance, drops and costs are left empty", root, BUILD_INFO)
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _rows(root: Path) -> dict[str, dict[str, int]]:
    """Rows per config and split from the Parquet footers (no data read)."""
    out: dict[str, dict[str, int]] = {}
    for c in ALL_CONFIGS:
        counts = {
            s: sum(pq.ParquetFile(root / f).metadata.num_rows for f in data_files(root, c, s))
            for s in _splits(root, c)
        }
        if counts:
            out[c] = {**counts, "total": sum(counts.values())}
    return out


def _splits(root: Path, config: str) -> list[str]:
    return [s for s in SPLITS if data_files(root, config, s)]


def iter_batches(root: str | Path, config: str, columns: Iterable[str]) -> Iterator[dict[str, list]]:
    """Column-wise Python batches of a config over every split present, reading only ``columns``.

    >>> for batch in iter_batches("viscon", "contextual", ["caption"]):  # doctest: +SKIP
    ...     print(len(batch["caption"]))
    """
    root = Path(root)
    columns = list(columns)
    for split in _splits(root, config):
        for path in data_files(root, config, split):
            pf = pq.ParquetFile(root / path)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                yield {name: batch.column(name).to_pylist() for name in columns}


_PER_IMAGE_COLUMNS = (
    "context",
    "context_tokens",
    "caption",
    "qa_freeform",
    "qa_multiple_choice",
    "width",
    "height",
    "questions_generated",
    "questions_removed_by_dedup",
    "caption_model",
    "qa_model",
)


class _PerImage:
    """Running tallies over one per-image config; numbers are kept, texts are not."""

    def __init__(self, config: str) -> None:
        self.config = config
        self.rows = 0
        # Typed arrays: a million rows of figures stay a few megabytes, not Python objects.
        self.token_counts = array("q")
        self.overlaps = array("d")
        self.no_caption_words = 0
        self.caption_words = array("q")
        self.answer_words = array("q")
        self.patterns: Counter[str] = Counter()
        self.freeform: Counter[int] = Counter()
        self.multiple_choice: Counter[int] = Counter()
        self.widths = array("q")
        self.heights = array("q")
        self.generated = 0
        self.removed = 0
        self.kept = 0
        self.caption_models: Counter[str] = Counter()
        self.qa_models: Counter[str] = Counter()
        self.words: Counter[str] = Counter()

    def add(self, b: dict[str, list], *, stemmer: Stemmer, frequencies: bool) -> None:
        for i, caption in enumerate(b["caption"]):
            self.rows += 1
            tokens = b["context_tokens"][i]
            # -1 marks a document whose token count is unknown; it is no figure of the data.
            if tokens is not None and tokens >= 0:
                self.token_counts.append(tokens)
            ratio = overlap_ratio(caption, b["context"][i], stemmer=stemmer)
            if ratio is None:
                self.no_caption_words += 1
            else:
                self.overlaps.append(ratio)
            self.caption_words.append(len((caption or "").split()))
            ff = b["qa_freeform"][i] or []
            mc = b["qa_multiple_choice"][i] or []
            self.patterns[f"{len(ff)}+{len(mc)}"] += 1
            self.freeform[len(ff)] += 1
            self.multiple_choice[len(mc)] += 1
            self.answer_words.extend(len((qa.get("answer") or "").split()) for qa in ff)
            w, h = b["width"][i], b["height"][i]
            if w and h and w > 0 and h > 0:
                self.widths.append(w)
                self.heights.append(h)
            self.generated += b["questions_generated"][i] or 0
            self.removed += b["questions_removed_by_dedup"][i] or 0
            self.kept += len(ff) + len(mc)
            self.caption_models[b["caption_model"][i] or "unknown"] += 1
            self.qa_models[b["qa_model"][i] or "unknown"] += 1
            if frequencies:
                self.words.update(content_words(caption))

    def context_tokens(self) -> dict[str, Any] | None:
        values = np.asarray(self.token_counts, dtype=np.int64)
        if not values.size:
            return None
        return {
            "config": self.config,
            "unit": "LLaMA/Vicuna tokenizer tokens of the document text, one value per image row",
            **_summary(values),
            "histogram": _histogram(values, _int_edges(values)),
        }

    def overlap(self) -> dict[str, Any] | None:
        values = np.asarray(self.overlaps, dtype=np.float64)
        if not values.size:
            return None
        return {
            "config": self.config,
            "definition": (
                "share of the caption's words (lowercased, stopwords and 1-character words removed, "
                "repeats counted) whose Snowball stem occurs among the stems of the context's words "
                "(<image> placeholders removed); rows whose caption has no such word are left out"
            ),
            **_summary(values),
            "rows_without_caption_words": self.no_caption_words,
            "histogram": _histogram(values, [round(i * 0.05, 2) for i in range(21)]),
        }

    def qa_counts(self) -> dict[str, Any]:
        n = max(self.rows, 1)
        mode = (
            min(self.patterns.items(), key=lambda kv: (-kv[1], _pattern_key(kv[0])))[0]
            if self.patterns
            else None
        )
        return {
            "config": self.config,
            "per_sample": dict(self.patterns),
            "mode": mode,
            "mode_share": _round(self.patterns[mode] / n) if mode else None,
            "freeform": {str(k): v for k, v in self.freeform.items()},
            "multiple_choice": {str(k): v for k, v in self.multiple_choice.items()},
            "freeform_mean": _round(sum(k * v for k, v in self.freeform.items()) / n),
            "multiple_choice_mean": _round(sum(k * v for k, v in self.multiple_choice.items()) / n),
            "rounds_total": sum(k * v for k, v in self.freeform.items())
            + sum(k * v for k, v in self.multiple_choice.items()),
        }

    def caption_length(self) -> dict[str, Any] | None:
        values = np.asarray(self.caption_words, dtype=np.int64)
        if not values.size:
            return None
        return {
            "config": self.config,
            "unit": "words (whitespace-separated)",
            **_summary(values),
            "histogram": _histogram(values, _int_edges(values)),
        }

    def answer_length(self) -> dict[str, Any] | None:
        values = np.asarray(self.answer_words, dtype=np.int64)
        if not values.size:
            return None
        return {
            "config": self.config,
            "unit": "words (whitespace-separated) of free-form answers; multiple-choice answers are one letter",
            **_summary(values),
            "histogram": _histogram(values, _int_edges(values)),
        }

    def image_sizes(self) -> dict[str, Any] | None:
        if not self.widths:
            return None
        w = np.asarray(self.widths, dtype=np.int64)
        h = np.asarray(self.heights, dtype=np.int64)
        mp = w * h / 1e6
        w_edges, h_edges = _int_edges(w, target=20), _int_edges(h, target=20)
        grid = np.histogram2d(w, h, bins=[w_edges, h_edges])[0].astype(np.int64)
        return {
            "config": self.config,
            "width": _summary(w),
            "height": _summary(h),
            "megapixels": {**_summary(mp), "histogram": _histogram(mp, _float_edges(mp))},
            "aspect_ratio": _summary(w / h),
            # Binned rather than listed: a scatter of 100K points would not fit in stats.json.
            "width_height_histogram": {
                "width_edges": w_edges,
                "height_edges": h_edges,
                "counts": grid.tolist(),
            },
        }

    def frequencies(self) -> dict[str, int]:
        top = sorted(self.words.items(), key=lambda kv: (-kv[1], kv[0]))[:WORDCLOUD_WORDS]
        return dict(top)

    def headline(self) -> dict[str, Any]:
        """The few figures compared between contextual and non-contextual captions."""
        cap = self.caption_length()
        ov = self.overlap()
        ans = self.answer_length()
        qa = self.qa_counts()
        return {
            "config": self.config,
            "rows": self.rows,
            "caption_words_mean": cap["mean"] if cap else None,
            "overlap_mean": ov["mean"] if ov else None,
            "answer_words_mean": ans["mean"] if ans else None,
            "qa_mode": qa["mode"],
        }


def _scan_per_image(root: Path, config: str, *, stemmer: Stemmer, frequencies: bool) -> _PerImage:
    scan = _PerImage(config)
    for batch in iter_batches(root, config, _PER_IMAGE_COLUMNS):
        scan.add(batch, stemmer=stemmer, frequencies=frequencies)
    return scan


def _pattern_key(pattern: str) -> tuple[int, ...]:
    return tuple(int(p) for p in pattern.split("+"))


# --- numbers ------------------------------------------------------------------------------------


def _round(x: float) -> float:
    return round(float(x), _DIGITS)


def _summary(values: np.ndarray) -> dict[str, Any]:
    integer = np.issubdtype(values.dtype, np.integer)

    def cast(x: Any) -> Any:
        return int(x) if integer else _round(x)

    return {
        "count": int(values.size),
        "mean": _round(values.mean()),
        "median": _round(np.median(values)),
        "min": cast(values.min()),
        "max": cast(values.max()),
        "p90": _round(np.percentile(values, 90)),
    }


def _histogram(values: np.ndarray, edges: list[float]) -> dict[str, list]:
    counts = np.histogram(values, bins=np.asarray(edges, dtype=np.float64))[0]
    return {"edges": edges, "counts": [int(c) for c in counts]}


def _nice(step: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``step``."""
    if step <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(step))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= step:
            return m * power
    return 10 * power


def _int_edges(values: np.ndarray, *, target: int = 30) -> list[int]:
    """Edges from 0 with a round integer width, about ``target`` bins, the maximum inside the last."""
    top = int(values.max())
    width = max(1, int(math.ceil(_nice(top / target))))
    return list(range(0, (top // width + 2) * width, width))


def _float_edges(values: np.ndarray, *, target: int = 20) -> list[float]:
    top = float(values.max())
    width = _nice(top / target) if top > 0 else 1.0
    n = int(math.floor(top / width)) + 2
    return [_round(i * width) for i in range(n)]


# --- from viscon_build.json ---------------------------------------------------------------------


def _multiple_choice(
    root: Path, rows: dict[str, dict[str, int]], info: dict[str, Any], *, stemmer: Stemmer
) -> dict[str, Any]:
    """Per config: the three tells of multiple-choice items (see ``build/quality.py``) and the merge's repair.

    Per-image configs are read from ``qa_multiple_choice``; mixes from their multiple-choice user turns
    and the letter answering each, so a figure describes the rows a trainer sees.
    """
    from viscon_hub.build.quality import MultipleChoiceAudit, MultipleChoiceQuality, parse_turn

    repair = dict(info.get("multiple_choice") or {})
    ratio = (repair.get("config") or {}).get("longest_ratio") or MultipleChoiceQuality().longest_ratio

    def stems(text: str) -> set[str]:
        return {stemmer(w) for w in content_words(text)}

    out: dict[str, Any] = {}
    for config in rows:
        audit = MultipleChoiceAudit(words=stems, ratio=ratio)
        if config in PER_IMAGE_CONFIGS:
            for b in iter_batches(root, config, ["qa_multiple_choice"]):
                for items in b["qa_multiple_choice"]:
                    for item in items or ():
                        audit.add(item["question"], list(item["options"]), item["answer"])
        else:
            for b in iter_batches(root, config, ["messages", "round_types"]):
                for messages, kinds in zip(b["messages"], b["round_types"], strict=True):
                    for i, kind in enumerate(kinds or ()):
                        parsed = parse_turn(messages[2 * i]["content"]) if kind == "multiple_choice" else None
                        if parsed is not None:
                            audit.add(parsed[0], parsed[1], messages[2 * i + 1]["content"].strip())
        if audit.items:
            out[config] = audit.to_dict()
    return {"configs": out, "repair": repair}


def _relevance(root: Path, configs: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """C3L relevance scores (``generate/relevance.py``) per context mode and round type, from the per-image configs.

    ``groups`` holds a summary of each score per ``<config>/<round type>``; ``histograms`` one shared
    set of edges per score and the counts of every group over it, so the groups plot on one axis.
    """
    # Packed doubles, 8 bytes a score: a million images' rounds fit where lists of floats would not.
    values: dict[str, dict[str, array]] = {}
    for config in configs:
        names = set(
            pq.ParquetFile(root / data_files(root, config, _splits(root, config)[0])[0]).schema_arrow.names
        )
        if "caption_relevance_kl" not in names:
            continue
        columns = ["caption_relevance_kl", "caption_relevance_pmi", "qa_freeform", "qa_multiple_choice"]
        for b in iter_batches(root, config, columns):
            for i in range(len(b["qa_freeform"])):
                rounds = [("caption", b["caption_relevance_kl"][i], b["caption_relevance_pmi"][i])]
                for kind in ("freeform", "multiple_choice"):
                    rounds += [
                        (kind, qa.get("relevance_kl"), qa.get("relevance_pmi"))
                        for qa in b[f"qa_{kind}"][i] or ()
                    ]
                for kind, kl, pmi in rounds:
                    if kl is None or pmi is None:
                        continue
                    group = values.setdefault(f"{config}/{kind}", {"kl": array("d"), "pmi": array("d")})
                    group["kl"].append(kl)
                    group["pmi"].append(pmi)
    out: dict[str, Any] = {"groups": {}, "histograms": {}, "build": info.get("relevance") or {}}
    if not values:
        return out
    for score in ("kl", "pmi"):
        every = np.concatenate([np.frombuffer(g[score], dtype=np.float64) for g in values.values()])
        edges = _signed_edges(every)
        out["histograms"][score] = {
            "edges": edges,
            "counts": {
                name: _histogram(np.frombuffer(g[score], dtype=np.float64), edges)["counts"]
                for name, g in sorted(values.items())
            },
        }
    out["groups"] = {
        name: {score: _summary(np.frombuffer(g[score], dtype=np.float64)) for score in ("kl", "pmi")}
        for name, g in sorted(values.items())
    }
    return out


def _signed_edges(values: np.ndarray, *, target: int = 20) -> list[float]:
    """Round-width edges covering ``values`` (negative ones too), about ``target`` bins."""
    lo, hi = float(values.min()), float(values.max())
    width = _nice((hi - lo) / target) if hi > lo else 1.0
    start = math.floor(lo / width)
    n = int(math.floor(hi / width)) - start + 2
    return [_round((start + i) * width) for i in range(n)]


def _dedup(scans: dict[str, _PerImage], info: dict[str, Any]) -> dict[str, Any]:
    per_image = {
        c: {
            "images": s.rows,
            "questions_generated": s.generated,
            "questions_removed": s.removed,
            "questions_kept": s.kept,
            "removed_rate": _round(s.removed / s.generated) if s.generated else None,
        }
        for c, s in scans.items()
    }
    build = info.get("dedup") or {}
    return {"per_image": per_image, "build": build}


def _usage(info: dict[str, Any]) -> dict[str, Any]:
    by_model = info.get("usage") or {}
    total = {"replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    for u in by_model.values():
        for k in total:
            total[k] += u.get(k) or 0
    total["cost_usd"] = round(total["cost_usd"], 6)
    return {"by_model": by_model, "total": total}


def _provenance(info: dict[str, Any], scans: dict[str, _PerImage]) -> dict[str, Any]:
    generation = info.get("generation") or {}
    dedup_models = sorted({d.get("model") for d in (info.get("dedup") or {}).values() if d.get("model")})
    row_models = {
        c: {"caption_model": dict(s.caption_models), "qa_model": dict(s.qa_models)} for c, s in scans.items()
    }
    names = [generation.get("caption_model"), generation.get("qa_model"), *(info.get("usage") or {})]
    for m in row_models.values():
        names += [*m["caption_model"], *m["qa_model"]]
    handwritten = any(n and n.split(":")[-1] == HANDWRITTEN_MODEL for n in names)
    return {
        "caption_model": generation.get("caption_model"),
        "qa_model": generation.get("qa_model"),
        "dedup_models": dedup_models,
        "models_in_rows": row_models,
        "handwritten_example": handwritten,
        "templates": info.get("templates") or [],
        "conversation_style": info.get("conversation_style"),
        "viscon_hub_version": info.get("viscon_hub_version"),
        "source": info.get("source"),
        "source_revision": info.get("source_revision"),
        "configs": info.get("configs") or [],
        "default_config": info.get("default_config"),
        "rows_build": info.get("rows") or {},
        "pages": info.get("pages") or {},
        "test_fraction": info.get("test_fraction"),
        "filters": info.get("filters") or {},
    }


# --- plots --------------------------------------------------------------------------------------

PLOT_FILES = {
    "context_tokens": "context_tokens.png",
    "overlap": "caption_context_overlap.png",
    "qa_counts": "qa_counts.png",
    "caption_length": "caption_length.png",
    "answer_length": "answer_length.png",
    "image_sizes": "image_sizes.png",
    "wordcloud": "caption_wordcloud.png",
}
# Drawn only when the build scored relevance (``--relevance-model``).
OPTIONAL_PLOT_FILES = {"relevance": "relevance.png"}
_SIZE = (6.4, 4.0)
_DPI = 100
_COLOR = "#4C72B0"
_ACCENT = "#C44E52"


def write_plots(stats: dict[str, Any], dataset_dir: str | Path) -> list[str]:
    """Draw ``stats`` as PNG files under ``DIR/plots/``; return their paths relative to ``DIR``.

    A plot whose figure is missing (e.g. no contextual config) is not drawn. The same stats give
    byte-identical files: fixed sizes and dpi, no software/date metadata, a seeded word cloud.

    >>> write_plots(compute_stats("viscon"), "viscon")   # doctest: +SKIP
    ['plots/context_tokens.png', 'plots/caption_context_overlap.png', ...]
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(f"plots need matplotlib: {_CARD_EXTRA}") from e
    import matplotlib

    out = Path(dataset_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig: Figure, key: str) -> None:
        FigureCanvasAgg(fig)
        name = {**PLOT_FILES, **OPTIONAL_PLOT_FILES}[key]
        fig.savefig(out / name, format="png", dpi=_DPI, metadata={"Software": None})
        written.append(f"{PLOTS_DIR}/{name}")

    # rc_context: the caller's matplotlib settings must neither change our PNGs nor be changed by us.
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9}):
        ct = stats.get("context_tokens")
        if ct:
            fig = _hist_figure(
                Figure(figsize=_SIZE),
                ct["histogram"],
                title=f"Context length ({ct['config']})",
                xlabel="tokens in the context",
                lines={"mean": ct["mean"], "median": ct["median"]},
            )
            save(fig, "context_tokens")
        ov = stats.get("overlap")
        if ov:
            fig = _hist_figure(
                Figure(figsize=_SIZE),
                ov["histogram"],
                title="Caption/context word overlap",
                xlabel="share of caption words found in the context (stemmed, no stopwords)",
                lines={"mean": ov["mean"]},
            )
            save(fig, "overlap")
        qa = stats.get("qa_counts")
        if qa and qa["per_sample"]:
            fig = Figure(figsize=(8.0, 3.6))
            for ax, key, title in zip(
                fig.subplots(1, 2, sharey=True),
                ("freeform", "multiple_choice"),
                ("Free-form Q&A per sample", "Multiple-choice Q&A per sample"),
            ):
                counts = {int(k): v for k, v in qa[key].items()}
                xs = list(range(0, max(counts) + 1))
                ax.bar(xs, [counts.get(x, 0) for x in xs], color=_COLOR)
                ax.set_xticks(xs)
                ax.set_title(title)
                ax.set_xlabel("pairs kept after dedup")
            fig.axes[0].set_ylabel("samples")
            fig.tight_layout()
            save(fig, "qa_counts")
        for key, what in (("caption_length", "Caption length"), ("answer_length", "Free-form answer length")):
            s = stats.get(key)
            if s:
                fig = _hist_figure(
                    Figure(figsize=_SIZE),
                    s["histogram"],
                    title=f"{what} ({s['config']})",
                    xlabel="words",
                    lines={"mean": s["mean"], "median": s["median"]},
                )
                save(fig, key)
        sizes = stats.get("image_sizes")
        if sizes:
            fig = Figure(figsize=(9.0, 3.8))
            ax1, ax2 = fig.subplots(1, 2)
            grid = sizes["width_height_histogram"]
            counts = np.asarray(grid["counts"], dtype=np.float64).T
            masked = np.ma.masked_equal(counts, 0)
            mesh = ax1.pcolormesh(grid["width_edges"], grid["height_edges"], masked, cmap="viridis")
            fig.colorbar(mesh, ax=ax1, label="images")
            ax1.set_xlabel("width (px)")
            ax1.set_ylabel("height (px)")
            ax1.set_title("Image sizes")
            _bars(ax2, sizes["megapixels"]["histogram"])
            ax2.set_xlabel("megapixels")
            ax2.set_ylabel("images")
            ax2.set_title("Image area")
            fig.tight_layout()
            save(fig, "image_sizes")
        rel = (stats.get("relevance") or {}).get("histograms")
        if rel:
            fig = Figure(figsize=(9.0, 3.8))
            for ax, score, xlabel in zip(
                fig.subplots(1, 2),
                ("kl", "pmi"),
                ("mean KL per answer token (nats)", "log P(answer | image) - log P(answer)"),
            ):
                hist = rel[score]
                for name, counts in hist["counts"].items():
                    ax.stairs(counts, hist["edges"], label=name.replace("/", ", "), linewidth=1.2)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("rounds")
            fig.axes[0].set_title("C3L relevance: KL")
            fig.axes[1].set_title("C3L relevance: PMI")
            fig.axes[1].legend(frameon=False, fontsize=7)
            fig.tight_layout()
            save(fig, "relevance")
        freqs = stats.get("caption_word_frequencies")
        if freqs:
            image = _wordcloud(freqs)
            path = out / PLOT_FILES["wordcloud"]
            # PIL writes no time or software chunk: the file depends on the pixels only.
            image.save(path, format="PNG", optimize=False)
            written.append(f"{PLOTS_DIR}/{PLOT_FILES['wordcloud']}")
    return written


def _bars(ax: Any, hist: dict[str, list]) -> None:
    edges = hist["edges"]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(
        edges[:-1], hist["counts"], width=widths, align="edge", color=_COLOR, edgecolor="white", linewidth=0.5
    )


def _hist_figure(fig: Any, hist: dict[str, list], *, title: str, xlabel: str, lines: dict[str, float]) -> Any:
    ax = fig.subplots()
    _bars(ax, hist)
    for (label, x), style in zip(lines.items(), ("-", "--")):
        ax.axvline(x, color=_ACCENT, linestyle=style, linewidth=1.2, label=f"{label} {x:g}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def _wordcloud(freqs: dict[str, int]) -> Any:
    try:
        from wordcloud import WordCloud
    except ImportError as e:
        raise MissingDependencyError(f"the caption word cloud needs wordcloud: {_CARD_EXTRA}") from e
    ordered = dict(sorted(freqs.items(), key=lambda kv: (-kv[1], kv[0])))
    cloud = WordCloud(
        width=800,
        height=400,
        background_color="white",
        random_state=0,
        stopwords=set(STOPWORDS),
        collocations=False,
        max_words=WORDCLOUD_WORDS,
        prefer_horizontal=0.9,
    )
    return cloud.generate_from_frequencies(ordered).to_image()


__all__ = [
    "HANDWRITTEN_MODEL",
    "PLOTS_DIR",
    "PLOT_FILES",
    "STATS_FILE",
    "STOPWORDS",
    "Stemmer",
    "compute_stats",
    "content_words",
    "iter_batches",
    "overlap_ratio",
    "words",
    "write_plots",
    "write_stats",
]
