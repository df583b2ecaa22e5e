"""Question dedup (paper §3.4): free-form and multiple-choice questions of one image overlap.

Every question is embedded (``WhereIsAI/UAE-Large-V1`` in the paper; the bundled all-MiniLM-L6-v2
when that model cannot be loaded), the cosine-similarity matrix of each image's questions is
computed, and the most unique questions are kept greedily under a similarity threshold while a
minimum count of each type survives. Embeddings are engine requests (stage ``embed``): all questions
of all images go through one engine run, in whole batches, and land in the generation cache, so a
rebuild embeds nothing twice.

>>> import numpy as np
>>> select_unique(np.eye(3, dtype=np.float32), ["freeform", "freeform", "multiple_choice"],
...               threshold=0.9, min_per_type={})
[0, 1, 2]
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from viscon_hub.engine import Engine, EngineConfig, GenerationCache, RunReport
from viscon_hub.engine.backends import Backend
from viscon_hub.engine.backends.embed_backend import decode_embedding, embed_request
from viscon_hub.errors import ConfigError, MissingDependencyError
from viscon_hub.recipe import opt

logger = logging.getLogger(__name__)

FREEFORM = "freeform"
MULTIPLE_CHOICE = "multiple_choice"
# Questions times dimensions per similarity block: ~64 MB of float32, whatever the model's width.
_BLOCK_FLOATS = 1 << 24


@dataclass(frozen=True, slots=True, kw_only=True)
class DedupConfig:
    """How questions are embedded and which survive.

    ``model`` and ``fallback_model`` are sentence-transformers models: a Hub id, a local folder, or
    ``bundled:all-MiniLM-L6-v2``. The fallback is used (and recorded) when ``model`` cannot be loaded
    and its embeddings are not already cached. ``threshold`` is the cosine similarity at or above
    which a question counts as a near-duplicate of one already kept; 1.0 keeps everything.
    ``batch_size`` is the number of texts per backend call (one ``encode``).

    >>> DedupConfig().threshold, DedupConfig(threshold=0.8).min_freeform
    (0.9, 2)
    """

    model: str = opt(
        "WhereIsAI/UAE-Large-V1", "sentence-transformers model for the question dedup", flag="--dedup-model"
    )
    fallback_model: str | None = opt(
        "bundled:all-MiniLM-L6-v2", "model used (and recorded) when --dedup-model cannot be loaded"
    )
    # On the bundled sample questions with all-MiniLM-L6-v2, repeats score 1.0 and rewordings
    # 0.90-0.95 ("How large / How wide are ball dahlia flowers?" 0.95, "What does the background
    # look like? / What is the background like?" 0.93), while distinct questions about one object
    # mostly stay below 0.90 ("What lies behind the tower? / What is at the top of the tower?" 0.87;
    # one miss: "Where is the raccoon? / Where is the raccoon looking?" 0.93). 0.85 would also drop
    # pairs like the tower one. UAE-Large-V1 could not be measured here (no download); AnglE-style
    # models tend to score same-topic text higher, not lower, so 0.9 errs on keeping a question:
    # the cheaper mistake, with the per-type minimum as a floor anyway.
    threshold: float = opt(
        0.9, "cosine similarity above which a question counts as a near-duplicate", flag="--dedup-threshold"
    )
    min_freeform: int = opt(2, "free-form questions kept per image whatever their similarity")
    min_multiple_choice: int = opt(2, "multiple-choice items kept per image whatever their similarity")
    batch_size: int = opt(256, "texts per embedding call")
    device: str | None = opt(None, "torch device of the embedding model (default: the best available)")

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"dedup model must name a sentence-transformers model; got {self.model!r}")
        if self.fallback_model is not None and (
            not isinstance(self.fallback_model, str) or not self.fallback_model.strip()
        ):
            raise ConfigError(
                f"dedup fallback_model must be a model name or None; got {self.fallback_model!r}"
            )
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not 0.0 < self.threshold <= 1.0
        ):
            raise ConfigError(
                f"--dedup-threshold is a cosine similarity in (0, 1] (1 keeps every question); "
                f"got {self.threshold!r}"
            )
        for name in ("min_freeform", "min_multiple_choice"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"dedup {name} must be an integer >= 0; got {value!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"dedup batch_size must be an integer >= 1; got {self.batch_size!r}")
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ConfigError(
                f"dedup device must be a torch device name (cpu, cuda, cuda:1); got {self.device!r}"
            )


@dataclass(slots=True)
class DedupResult:
    """Which questions survive, per image, and how the dedup went.

    ``keep[i]`` is (kept free-form indices, kept multiple-choice indices) of image ``i``, ascending.
    ``engine`` is the engine's run report (calls, cache hits) for the embeddings.
    """

    keep: list[tuple[list[int], list[int]]]
    model: str
    fell_back: bool = False
    fallback_reason: str | None = None
    threshold: float = 0.0
    images: int = 0
    questions_in: int = 0
    unique_questions: int = 0
    questions_kept: int = 0
    removed: int = 0
    embedding_errors: int = 0
    engine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every figure but ``keep`` (which is per image), JSON-ready."""
        return {name: getattr(self, name) for name in self.__slots__ if name != "keep"}


# -- selection ---------------------------------------------------------------------------------
def _select_block(x: np.ndarray, masks: list[tuple[np.ndarray, int]], threshold: float) -> np.ndarray:
    """The kept mask (b, n) of b images with n questions each; ``x`` is (b, n, d) float32."""
    b, n, _ = x.shape
    if threshold >= 1.0:
        return np.ones((b, n), dtype=bool)
    sims = np.matmul(x, x.transpose(0, 2, 1))
    if n > 1:
        score = (sims.sum(axis=2) - np.diagonal(sims, axis1=1, axis2=2)) / (n - 1)
        # Rounded so that float noise never reorders questions whose scores are equal.
        score = np.round(score, 6)
    else:
        score = np.zeros((b, n), dtype=np.float32)
    order = np.argsort(score, axis=1, kind="stable")  # stable: ties go to the lower index
    rows = np.arange(b)
    kept = np.zeros((b, n), dtype=bool)
    # Greedy in uniqueness order, all b images at once: n vector steps instead of b * n Python ones.
    for t in range(n):
        c = order[:, t]
        blocked = ((sims[rows, c] >= threshold) & kept).any(axis=1)
        kept[rows, c] = ~blocked
    ranked = np.take_along_axis(kept, order, axis=1)
    topped_up = False
    for mask, minimum in masks:
        want = min(minimum, int(mask.sum()))
        if want <= 0:
            continue
        of_type = mask[order]
        need = want - (ranked & of_type).sum(axis=1)
        if not (need > 0).any():
            continue
        dropped = of_type & ~ranked
        ranked |= dropped & (np.cumsum(dropped, axis=1) <= need[:, None])
        topped_up = True
    if topped_up:
        np.put_along_axis(kept, order, ranked, axis=1)
    return kept


def _check_threshold(threshold: float) -> None:
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ConfigError(f"threshold must be a number (a cosine similarity); got {threshold!r}")


def _check_minimum(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"the minimum for {name!r} must be an integer >= 0; got {value!r}")


def select_unique(
    embeddings: np.ndarray,
    types: Sequence[str],
    *,
    threshold: float,
    min_per_type: Mapping[str, int],
) -> list[int]:
    """The questions of one image to keep, as ascending indices into ``embeddings`` (n, d).

    The rule, with ``S = E @ E.T`` the cosine similarities of the L2-normalised rows:

    1. A question's uniqueness score is its mean similarity to the other questions (rounded to 6
       decimals; 0 for a lone question). Questions are visited from the lowest score up, ties by
       index.
    2. A visited question is kept when its similarity to every question kept so far is below
       ``threshold``. A threshold of 1.0 or more keeps every question.
    3. Then each type with a minimum in ``min_per_type`` is topped up to ``min(minimum, questions
       of that type)`` with its dropped questions, in the same visiting order.

    Deterministic: the same vectors give the same indices.

    >>> import numpy as np
    >>> E = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # 0 and 1 are the same
    >>> types = ["freeform", "multiple_choice", "multiple_choice"]
    >>> select_unique(E, types, threshold=0.9, min_per_type={})
    [0, 2]
    >>> select_unique(E, types, threshold=0.9, min_per_type={"multiple_choice": 2})
    [0, 1, 2]
    """
    _check_threshold(threshold)
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != len(types):
        raise ConfigError(
            f"select_unique needs an (n, d) array with one type per row; got shape {x.shape} "
            f"and {len(types)} types"
        )
    if x.shape[0] == 0:
        return []
    kinds = np.asarray(list(types), dtype=object)
    masks = []
    for name, minimum in min_per_type.items():
        _check_minimum(name, minimum)
        masks.append((kinds == name, int(minimum)))
    return np.flatnonzero(_select_block(x[None], masks, float(threshold))[0]).tolist()


def select_per_image(
    embeddings: np.ndarray,
    counts: Sequence[tuple[int, int]],
    *,
    threshold: float,
    min_freeform: int,
    min_multiple_choice: int,
    rows: np.ndarray | None = None,
) -> list[tuple[list[int], list[int]]]:
    """:func:`select_unique` for many images at once, vectorised across images of the same shape.

    ``counts[i]`` is (free-form, multiple-choice) questions of image ``i``; question ``q`` (all images'
    questions in order, each image's free-form first) has the vector ``embeddings[rows[q]]``
    (``rows`` defaults to ``q`` itself; the indirection lets repeated questions share one vector).
    Returns (kept free-form indices, kept multiple-choice indices) per image.

    >>> import numpy as np
    >>> E = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    >>> select_per_image(E, [(1, 2), (1, 0)], threshold=0.9, min_freeform=1, min_multiple_choice=0)
    [([0], [1]), ([0], [])]
    """
    _check_threshold(threshold)
    _check_minimum(FREEFORM, min_freeform)
    _check_minimum(MULTIPLE_CHOICE, min_multiple_choice)
    x = np.asarray(embeddings, dtype=np.float32)
    shape = np.asarray(counts, dtype=np.int64).reshape(-1, 2)
    per_image = shape.sum(axis=1)
    starts = np.zeros(len(shape) + 1, dtype=np.int64)
    np.cumsum(per_image, out=starts[1:])
    total = int(starts[-1])
    rows = np.arange(total) if rows is None else np.asarray(rows, dtype=np.int64)
    if x.ndim != 2 or rows.shape != (total,) or (total and (rows.min() < 0 or rows.max() >= len(x))):
        raise ConfigError(
            f"select_per_image needs an (n, d) array and one row index per question ({total}); "
            f"got shape {x.shape} and {rows.shape[0]} row indices"
        )
    if total == 0:
        return [([], []) for _ in range(len(shape))]
    keep: list = [None] * len(shape)
    shapes, group = np.unique(shape, axis=0, return_inverse=True)
    group = group.reshape(-1)
    width = max(1, x.shape[1])
    for g, (nf, nm) in enumerate(shapes.tolist()):
        n = nf + nm
        images = np.flatnonzero(group == g)
        if n == 0:
            for i in images.tolist():
                keep[i] = ([], [])
            continue
        is_ff = np.arange(n) < nf
        masks = [(is_ff, min_freeform), (~is_ff, min_multiple_choice)]
        step = max(1, _BLOCK_FLOATS // (n * width))
        for s in range(0, len(images), step):
            block = images[s : s + step]
            kept = _select_block(x[rows[starts[block, None] + np.arange(n)]], masks, threshold)
            for i, flags in zip(block.tolist(), kept.tolist()):
                keep[i] = (
                    [j for j in range(nf) if flags[j]],
                    [j - nf for j in range(nf, n) if flags[j]],
                )
    return keep


# -- embedding ---------------------------------------------------------------------------------
def _no_images(sha256: str) -> bytes:
    raise KeyError(sha256)


def _cached_requests(texts: list[str], model: str, cache: GenerationCache) -> list | None:
    """The requests for ``texts`` when the cache answers every one, else None."""
    requests = [embed_request(text, model=model) for text in texts]
    return None if cache.missing(r.key for r in requests) else requests


def _reason(model: str, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0][:300] if lines else type(error).__name__
    return text if model in text else f"{model}: {type(error).__name__}: {text}"


def _choose_model(
    texts: list[str], *, config: DedupConfig, engine: Engine, offline: bool, cache_only: bool
) -> tuple[str, Backend | None, list | None, list[str]]:
    """(model, backend or None, its requests when all cached, reasons the models before it failed).

    Decided before any request is planned, because the model name is part of every cache key. A model
    whose embeddings are all cached needs no loading (a pulled cache from a GPU machine is enough).
    """
    candidates = [config.model]
    if config.fallback_model and config.fallback_model != config.model:
        candidates.append(config.fallback_model)
    reasons: list[str] = []
    missing_dependency: BaseException | None = None
    for model in candidates:
        cached = _cached_requests(texts, model, engine.cache)
        if cached is not None:
            return model, None, cached, reasons
        if cache_only:
            reasons.append(f"{model}: embeddings not in the cache")
            continue
        try:
            # The backend keeps loaded models (and online load failures) for the process.
            backend = engine.backend(
                f"sentence-transformers:{model}",
                image_loader=_no_images,
                device=config.device,
                max_batch=config.batch_size,
                local_files_only=offline,
            )
        except Exception as e:  # noqa: BLE001 - whatever stops a model from loading means "try the next"
            logger.info("question dedup: cannot load %s (%s)", model, e)
            reasons.append(_reason(model, e))
            if isinstance(e, MissingDependencyError):
                missing_dependency = e
            continue
        return model, backend, None, reasons
    detail = "; ".join(reasons)
    if cache_only:
        raise ConfigError(
            f"question embeddings for the dedup are missing from the cache ({detail}); run `viscon build` "
            "first, which computes them into the same cache"
        )
    if missing_dependency is not None:
        raise MissingDependencyError(
            f"no embedding model could be loaded for the question dedup ({detail})"
        ) from missing_dependency
    raise ConfigError(
        f"no embedding model could be loaded for the question dedup ({detail}); name a local folder "
        "or a cached model with --dedup-model"
    )


def _vectors(completions: list, expected: int) -> tuple[np.ndarray, int]:
    """Decoded, renormalised vectors; a failed embedding is a zero row (it blocks and drops nothing)."""
    decoded: list[np.ndarray | None] = []
    for c in completions:
        v = None
        if c.ok:
            try:
                v = decode_embedding(c.reply)
            except ValueError:
                logger.warning("question dedup: unreadable embedding reply for %s", c.key[:12])
        decoded.append(v)
    widths = [v.shape[0] for v in decoded if v is not None]
    dim = max(set(widths), key=widths.count) if widths else 1
    out = np.zeros((expected, dim), dtype=np.float32)
    errors = 0
    for i, v in enumerate(decoded):
        if v is None or v.shape[0] != dim:
            errors += 1
        else:
            out[i] = v
    # float16 storage leaves rows a hair off unit length; renormalise so cosines stay cosines.
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out, errors


_FALLBACKS_SAID: set[tuple[str, str, str]] = set()


def dedup_questions(
    items: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    config: DedupConfig,
    cache: GenerationCache,
    offline: bool = True,
    cache_only: bool = False,
) -> DedupResult:
    """Near-duplicate questions removed per image: ``items[i]`` is image ``i``'s (free-form questions,
    multiple-choice questions).

    All questions of all images go into one engine run; identical texts are embedded once, and every
    embedding is read from and written to ``cache``. ``offline`` forbids downloads (a model must be a
    local folder, bundled, or already in the Hugging Face cache); computing embeddings locally is always
    allowed. ``cache_only`` computes nothing: every embedding must be cached already (the ``datasets``
    builder uses it), else :class:`~viscon_hub.errors.ConfigError`.

    >>> import tempfile
    >>> from viscon_hub.engine import GenerationCache
    >>> cache = GenerationCache(tempfile.mkdtemp())
    >>> items = [(["Who took the photo?", "Where is the spoon?"], ["Who took this photo?"])]
    >>> result = dedup_questions(
    ...     items, config=DedupConfig(model="bundled:all-MiniLM-L6-v2", min_freeform=0,
    ...                               min_multiple_choice=0), cache=cache)
    >>> result.removed, result.model  # one of the two "who took" questions goes
    (1, 'bundled:all-MiniLM-L6-v2')
    """
    started = time.perf_counter()
    counts = [(len(ff), len(mc)) for ff, mc in items]
    total = sum(nf + nm for nf, nm in counts)
    index: dict[str, int] = {}
    rows = np.fromiter(
        (index.setdefault(q, len(index)) for ff, mc in items for q in (*ff, *mc)), dtype=np.int64, count=total
    )
    texts = list(index)
    result = DedupResult(
        keep=[(list(range(nf)), list(range(nm))) for nf, nm in counts],
        model=config.model,
        threshold=config.threshold,
        images=len(counts),
        questions_in=total,
        unique_questions=len(texts),
        questions_kept=total,
        engine=RunReport().to_dict(),
    )
    if not texts:
        return result
    engine = Engine(
        cache=cache,
        # A local model: a failure is a bug or memory, not a rate limit; retry briefly, then report.
        config=EngineConfig(offline=cache_only, max_attempts=3, backoff_base_s=0.5, backoff_max_s=5.0),
    )
    with engine:
        model, backend, requests, reasons = _choose_model(
            texts, config=config, engine=engine, offline=offline, cache_only=cache_only
        )
        if model != config.model:
            result.model, result.fell_back, result.fallback_reason = model, True, reasons[0]
            # Said once per process: the merge dedups batch by batch, mode by mode, with the same outcome.
            warned = (model, config.model, reasons[0])
            level = logging.DEBUG if warned in _FALLBACKS_SAID else logging.WARNING
            _FALLBACKS_SAID.add(warned)
            logger.log(level, "question dedup: using %s instead of %s (%s)", model, config.model, reasons[0])
        if requests is None:
            requests = [embed_request(t, model=model) for t in texts]
        completions = engine.run(requests, backend=backend)
    result.engine = engine.last_report.to_dict()
    vectors, result.embedding_errors = _vectors(completions, len(texts))
    if result.embedding_errors:
        if cache_only:
            raise ConfigError(
                f"{result.embedding_errors} question embeddings for {model} are missing from the cache; "
                "run `viscon build` first, which computes them into the same cache"
            )
        logger.warning(
            "question dedup: %d questions could not be embedded and are kept as they are",
            result.embedding_errors,
        )
    result.keep = select_per_image(
        vectors,
        counts,
        rows=rows,
        threshold=config.threshold,
        min_freeform=config.min_freeform,
        min_multiple_choice=config.min_multiple_choice,
    )
    result.questions_kept = sum(len(ff) + len(mc) for ff, mc in result.keep)
    result.removed = total - result.questions_kept
    logger.info(
        "question dedup with %s: kept %d of %d questions over %d images in %.1fs",
        model,
        result.questions_kept,
        total,
        len(counts),
        time.perf_counter() - started,
    )
    return result
