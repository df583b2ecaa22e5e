"""C3L relevance of every generated round: does the answer need the image? (METHOD.md, seed 002)

For each round of each usable generation record (the caption, every free-form and multiple-choice
item) one scoring request goes through the engine and its cache (``engine/scoring.py``): the VLM
scores the answer under teacher forcing with the image and without it, giving

``kl``   the mean over answer tokens of KL(P(. | image, question, prefix) || P(. | question, prefix))
``pmi``  log P(answer | image, question) - log P(answer | question)

A rerun computes nothing (the scores are cached replies). The caption round is asked
:data:`CAPTION_QUESTION`; a multiple-choice round is the question with its four options, answered
with the right option's text rather than its letter, so the score does not change when the merge
shuffles the options. Scores land in ``generations/relevance.parquet`` (one row per round); the merge
attaches them to the per-image rows and drops Q&A rounds under ``--min-relevance`` (:func:`attach_scores`).

>>> rec = {"id": "d-0", "context_mode": "contextual", "caption": "A cat.",
...        "qa_freeform": [{"question": "What animal?", "answer": "A cat."}],
...        "qa_multiple_choice": [{"question": "Colour?", "options": ["Red", "Tan", "Grey", "Blue"], "answer": "C"}]}
>>> [(kind, i, answer) for kind, i, _, answer in rounds_to_score(rec)]
[('caption', 0, 'A cat.'), ('freeform', 0, 'A cat.'), ('multiple_choice', 0, 'Grey')]
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub.engine import Engine, EngineConfig, GenerationCache, Request
from viscon_hub.engine.engine import OFFLINE_MISS
from viscon_hub.engine.scoring import SCORE_KIND, parse_scores
from viscon_hub.errors import ConfigError
from viscon_hub.recipe import opt

logger = logging.getLogger(__name__)

STAGE = "relevance"
TEMPLATE_VERSION = 1
CAPTION_QUESTION = "Describe this image in detail."
RELEVANCE_FILE = "relevance.parquet"
ROUND_KINDS = ("caption", "freeform", "multiple_choice")
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("context_mode", pa.string()),
        ("round", pa.string()),
        ("index", pa.int32()),
        ("kl", pa.float64()),
        ("pmi", pa.float64()),
        ("key", pa.string()),
    ]
)
_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True, slots=True, kw_only=True)
class RelevanceConfig:
    """The scoring model and how the merge uses the scores.

    ``model`` is ``transformers:<path or id>`` (a local VLM) or ``openai:<model>`` with ``base_url``
    pointing at a vLLM server (it must answer ``prompt_logprobs``). ``min_relevance`` drops Q&A rounds
    whose score ``on`` (``kl`` or ``pmi``) is below it; rounds without a score are kept and counted.
    """

    model: str | None = opt(
        None,
        "score every round's C3L relevance with this VLM: transformers:PATH, or openai:MODEL on a "
        "vLLM server (--base-url; it must answer prompt_logprobs)",
        flag="--relevance-model",
    )
    base_url: str | None = opt(
        None, "endpoint of the scoring server (default: the generation one)", local=True
    )
    top_logprobs: int = opt(20, "log-probabilities per token the server returns (vLLM allows 20)")
    min_relevance: float | None = opt(None, "drop Q&A rounds whose relevance is below this")
    on: Literal["kl", "pmi"] = opt("kl", "the score --min-relevance reads", flag="--relevance-on")
    engine: EngineConfig = opt(factory=EngineConfig, help="engine limits of the scoring calls")

    def __post_init__(self) -> None:
        if self.on not in ("kl", "pmi"):
            raise ConfigError(f"--relevance-on must be kl or pmi; got {self.on!r}")
        if not 1 <= self.top_logprobs <= 20:
            raise ConfigError(f"top_logprobs must be in [1, 20] (vLLM's limit); got {self.top_logprobs}")
        if self.model is not None and ":" not in self.model:
            raise ConfigError(
                f"--relevance-model is BACKEND:MODEL (transformers:... or openai:...); got {self.model!r}"
            )


def rounds_to_score(record: dict[str, Any]) -> list[tuple[str, int, str, str]]:
    """(round kind, index, question, answer) of every round of a record worth a score."""
    out: list[tuple[str, int, str, str]] = []
    if record.get("caption"):
        out.append(("caption", 0, CAPTION_QUESTION, record["caption"]))
    for i, qa in enumerate(record.get("qa_freeform") or ()):
        if qa.get("question") and qa.get("answer"):
            out.append(("freeform", i, qa["question"], qa["answer"]))
    for i, item in enumerate(record.get("qa_multiple_choice") or ()):
        options = list(item.get("options") or ())
        if len(options) != 4 or item.get("answer") not in _LETTERS:
            continue
        shown = "\n".join(sorted(str(o) for o in options))  # order-free: the merge reshuffles them
        out.append(
            (
                "multiple_choice",
                i,
                f"{item['question']}\n{shown}",
                str(options[_LETTERS.index(item["answer"])]),
            )
        )
    return out


def relevance_request(
    *, model: str, image_sha256: str, question: str, answer: str, top_logprobs: int = 20
) -> Request:
    """The scoring request of one round: the image and the question, then the answer to score."""
    return Request.create(
        stage=STAGE,
        model=model,
        template_id=STAGE,
        template_version=TEMPLATE_VERSION,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image", "sha256": image_sha256}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": answer},
        ],
        sampling={"score": SCORE_KIND, "prompt_logprobs": top_logprobs, "temperature": 0.0},
    )


@dataclass(slots=True)
class RelevanceReport:
    rounds: int = 0
    scored: int = 0
    failed: Counter = field(default_factory=Counter)
    engine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "scored": self.scored,
            "failed": dict(self.failed),
            "engine": self.engine,
        }


def score_records(
    records: list[dict[str, Any]], *, config: RelevanceConfig, engine: Engine, backend: Any
) -> tuple[list[dict[str, Any]], RelevanceReport]:
    """One row per scored round of the usable ``records`` (see :data:`SCHEMA`), and the counts."""
    if config.model is None:
        raise ConfigError("the relevance stage needs --relevance-model (transformers:... or openai:...)")
    model = config.model.split(":", 1)[1]
    todo: list[tuple[dict[str, Any], str, int, Request]] = []
    for r in records:
        if r.get("status", "ok") != "ok" or not r.get("image_sha256"):
            continue
        for kind, i, question, answer in rounds_to_score(r):
            req = relevance_request(
                model=model,
                image_sha256=r["image_sha256"],
                question=question,
                answer=answer,
                top_logprobs=config.top_logprobs,
            )
            todo.append((r, kind, i, req))
    report = RelevanceReport(rounds=len(todo))
    completions = engine.run([t[3] for t in todo], backend=backend)
    rows = []
    for (r, kind, i, req), c in zip(todo, completions, strict=True):
        scores = parse_scores(c.reply) if c.ok else None
        if scores is None:
            report.failed[c.error_kind or ("offline_miss" if c.error == OFFLINE_MISS else "bad_reply")] += 1
            continue
        report.scored += 1
        rows.append(
            {
                "id": r["id"],
                "context_mode": r["context_mode"],
                "round": kind,
                "index": i,
                **scores,
                "key": req.key,
            }
        )
    report.engine = engine.report.to_dict()
    return rows, report


SCORE_BATCH = 2048
"""Records scored per engine run: the stage's memory is one batch of records and its score rows."""


def score_generations(
    generations: str,
    *,
    config: RelevanceConfig,
    cache: str = "viscon-cache",
    extra_caches: tuple[str, ...] = (),
    image_store: str | None = None,
    batch_size: int = SCORE_BATCH,
) -> RelevanceReport:
    """Score every round of ``GENERATIONS/generations/records*.parquet``, a batch of records at a
    time; write ``generations/relevance.parquet`` (staged, renamed into place when complete)."""

    from viscon_hub.generate.stages import generation_records
    from viscon_hub.prepare.images import ImageStore

    root = Path(generations)
    paths, stats = generation_records(generations)
    store = ImageStore(image_store or stats.get("image_store") or f"{generations}/images")
    columns = ["id", "context_mode", "status", "image_sha256", "caption", "qa_freeform", "qa_multiple_choice"]
    engine = Engine(cache=GenerationCache(cache, fallbacks=extra_caches), config=config.engine)
    out = root / "generations" / RELEVANCE_FILE
    tmp = out.with_suffix(".tmp")
    report = RelevanceReport()
    try:
        backend = engine.backend(config.model or "", image_loader=store.get, base_url=config.base_url)
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for path in paths:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
                    rows, part = score_records(
                        batch.to_pylist(), config=config, engine=engine, backend=backend
                    )
                    report.rounds += part.rounds
                    report.scored += part.scored
                    report.failed.update(part.failed)
                    if rows:
                        writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
        report.engine = engine.report.to_dict()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        engine.cache.close()
        engine.close()
    tmp.replace(out)
    logger.info("relevance: %s", report.to_dict())
    return report


class Scores:
    """The scores of ``relevance.parquet`` for lookups by record, in compact arrays.

    Per record (one run of consecutive rows) it keeps a 128-bit digest of its (context mode, id) and
    where its rows start; per round the kind, index and the two scores: about 22 bytes a round, where
    nested Python dicts took about 500, so the merge can hold the scores of a million images.
    ``get((mode, id))`` is what :func:`attach_scores` takes.

    >>> s = Scores.from_batches([[{"context_mode": "contextual", "id": "d-0", "round": "caption",
    ...                            "index": 0, "kl": 0.25, "pmi": 1.5}]])
    >>> s.get(("contextual", "d-0")), s.get(("contextual", "d-1")), len(s)
    ({('caption', 0): {'kl': 0.25, 'pmi': 1.5}}, {}, 1)
    """

    __slots__ = ("_count", "_hi", "_index", "_kind", "_kl", "_lo", "_pmi", "_start")

    _COLUMNS = ("id", "context_mode", "round", "index", "kl", "pmi")

    def __init__(self, batches: Iterable[pa.RecordBatch], total: int) -> None:
        import pyarrow.compute as pc

        self._kind = np.empty(total, dtype=np.int8)
        self._index = np.empty(total, dtype=np.int16)
        self._kl = np.empty(total, dtype=np.float64)
        self._pmi = np.empty(total, dtype=np.float64)
        hi: list[int] = []
        lo: list[int] = []
        start: list[int] = []
        at, last = 0, None
        kinds = pa.array(ROUND_KINDS)
        for b in batches:
            n = b.num_rows
            kind = pc.index_in(b.column("round"), value_set=kinds).fill_null(-1)
            self._kind[at : at + n] = kind.to_numpy(zero_copy_only=False)
            self._index[at : at + n] = b.column("index").fill_null(-1).to_numpy(zero_copy_only=False)
            self._kl[at : at + n] = b.column("kl").to_numpy(zero_copy_only=False)
            self._pmi[at : at + n] = b.column("pmi").to_numpy(zero_copy_only=False)
            # A record's rounds are consecutive rows: one digest per run of rows.
            for i, key in enumerate(zip(b.column("context_mode").to_pylist(), b.column("id").to_pylist())):
                if key != last:
                    last = key
                    h, low = self._digest(*key)
                    hi.append(h)
                    lo.append(low)
                    start.append(at + i)
            at += n
        starts = np.array([*start, at], dtype=np.int64)
        count = np.diff(starts).astype(np.int32)
        hi_a, lo_a = np.array(hi, dtype=np.uint64), np.array(lo, dtype=np.uint64)
        order = np.lexsort((lo_a, hi_a))
        self._hi, self._lo = hi_a[order], lo_a[order]
        self._start, self._count = starts[:-1][order], count[order]

    @staticmethod
    def _digest(mode: str, record_id: str) -> tuple[int, int]:
        text = f"{mode}\x00{record_id}".encode("utf-8", "surrogatepass")
        d = hashlib.blake2b(text, digest_size=16).digest()
        return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")

    @classmethod
    def from_batches(cls, batches: Iterable[list[dict[str, Any]]]) -> Scores:
        """From batches of ``relevance.parquet`` rows as dicts."""
        tables = [pa.Table.from_pylist(b, schema=SCHEMA) for b in batches if b]
        return cls((rb for t in tables for rb in t.to_batches()), sum(t.num_rows for t in tables))

    @classmethod
    def from_file(cls, path: str | Path) -> Scores:
        f = pq.ParquetFile(path)
        return cls(f.iter_batches(columns=list(cls._COLUMNS)), f.metadata.num_rows)

    def __len__(self) -> int:
        return len(self._kind)

    def get(
        self, key: tuple[str, str], default: Any = None
    ) -> dict[tuple[str, int], dict[str, float | None]]:
        """``{(round, index): {"kl", "pmi"}}`` of the record ``(context_mode, id)``; ``default`` (or {})
        when it has no score."""
        h, low = self._digest(*key)
        first = int(np.searchsorted(self._hi, np.uint64(h), side="left"))
        last = int(np.searchsorted(self._hi, np.uint64(h), side="right"))
        out: dict[tuple[str, int], dict[str, float | None]] = {}
        for r in range(first, last):
            if int(self._lo[r]) != low:
                continue
            begin = int(self._start[r])
            for i in range(begin, begin + int(self._count[r])):
                if self._kind[i] < 0:
                    continue
                kl, pmi = float(self._kl[i]), float(self._pmi[i])
                out[(ROUND_KINDS[self._kind[i]], int(self._index[i]))] = {
                    "kl": None if math.isnan(kl) else kl,
                    "pmi": None if math.isnan(pmi) else pmi,
                }
        return out if out or default is None else default


def read_scores(generations: str) -> Scores:
    """The scores of ``relevance.parquet``, read a row group at a time (empty when the file is absent)."""
    path = Path(generations) / "generations" / RELEVANCE_FILE
    if not path.is_file():
        return Scores.from_batches([])
    return Scores.from_file(path)


def attach_scores(
    record: dict[str, Any],
    scores: dict[tuple[str, int], dict[str, float]],
    *,
    min_relevance: float | None = None,
    on: str = "kl",
) -> tuple[dict[str, Any], Counter[str]]:
    """The record with ``relevance_kl`` / ``relevance_pmi`` on each Q&A item and on the caption, Q&A
    items under ``min_relevance`` (score ``on``) left out; counts ``relevance_dropped`` and ``relevance_unscored``.

    Run on the generated records, before the dedup renumbers the items.

    >>> rec = {"caption": "A cat.", "qa_freeform": [{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}]}
    >>> s = {("caption", 0): {"kl": 0.3, "pmi": 2.0}, ("freeform", 0): {"kl": 0.01, "pmi": -1.0}}
    >>> out, counts = attach_scores(rec, s, min_relevance=0.1)
    >>> [qa["question"] for qa in out["qa_freeform"]], out["caption_relevance_kl"], dict(counts)
    (['Q2'], 0.3, {'relevance_dropped': 1, 'relevance_unscored': 1})
    """
    counts: Counter[str] = Counter()
    out = dict(record)
    cap = scores.get(("caption", 0)) or {}
    out["caption_relevance_kl"] = cap.get("kl")
    out["caption_relevance_pmi"] = cap.get("pmi")
    for field_name, kind in (("qa_freeform", "freeform"), ("qa_multiple_choice", "multiple_choice")):
        kept = []
        for i, item in enumerate(record.get(field_name) or ()):
            s = scores.get((kind, i))
            if s is None:
                counts["relevance_unscored"] += 1
            elif min_relevance is not None and s[on] < min_relevance:
                counts["relevance_dropped"] += 1
                continue
            kept.append({**item, "relevance_kl": s and s["kl"], "relevance_pmi": s and s["pmi"]})
        out[field_name] = kept
    return out, counts


__all__ = [
    "CAPTION_QUESTION",
    "RELEVANCE_FILE",
    "RelevanceConfig",
    "RelevanceReport",
    "attach_scores",
    "read_scores",
    "relevance_request",
    "rounds_to_score",
    "score_generations",
    "score_records",
]
