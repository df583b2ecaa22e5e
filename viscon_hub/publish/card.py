"""The dataset card of a built folder: front matter, statistics, plots, datasheet, limitations.

``make_card`` renders ``dataset_cards/card_template.md`` (with ``dataset_cards/datasheet.md``
rendered first and handed in as ``datasheet``) through ``huggingface_hub.DatasetCard.from_template``;
the front matter is a ``DatasetCardData`` whose ``configs:`` is exactly
``viscon_hub.build.layout.configs_metadata`` of the configs in the folder, so ``load_dataset(DIR,
"leaky")`` keeps working once the card replaces the build's minimal README. ``write_card`` also
computes the statistics (``stats.json``) and draws ``plots/``.

The card holds no timestamp, no absolute path and no secret: the same folder gives the same bytes.

Hub exports (see :func:`viscon_hub.publish.hub.stage_push`) are described with two optional arguments:

``extra_configs``
    more ``configs:`` entries, appended after the built ones, each ``{"config_name": str,
    "data_files": [{"split": str, "path": str}, ...]}`` (no ``default``; ``leaky`` stays the
    default); a path may be a glob such as ``leaky_idefics/train-*.parquet``, as a push of a
    sharded export declares it. A name may not repeat a built config.
``exports``
    ``{"formats": ["idefics", "llava"], "idefics_configs": ["leaky_idefics", ...],
    "llava": {"leaky": ["leaky_train.json", "leaky_test.json", "images.tar"], ...},
    "notes": "optional extra Markdown"}``; every key is optional. The card then gets a
    "Trainer formats" section: the IDEFICS configs to load by name, and for LLaVA the JSON files and
    image archive under ``llava/<config>/``.

>>> card = make_card("viscon", repo_id="org/viscon")            # doctest: +SKIP
>>> card.data.configs[0]["config_name"], card.data.license       # doctest: +SKIP
('contextual', 'cc-by-4.0')
>>> write_card("viscon")["files"][:2]                           # doctest: +SKIP
['README.md', 'stats.json']
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from viscon_hub.build.layout import (
    ALL_CONFIGS,
    BUILD_INFO,
    DEFAULT_CONFIG,
    PER_IMAGE_CONFIGS,
    SPLITS,
    config_mix,
    config_mode,
    configs_metadata,
    mix_features,
    per_image_features,
)
from viscon_hub.errors import ConfigError, env_secrets, redact
from viscon_hub.publish.stats import (
    OPTIONAL_PLOT_FILES,
    PLOT_FILES,
    PLOTS_DIR,
    compute_stats,
    write_plots,
    write_stats,
)

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "cc-by-4.0"  # OBELICS's licence; images keep their own
DEFAULT_PRETTY_NAME = "VisCon-style contextual visual conversations"
OBELICS = "HuggingFaceM4/OBELICS"
CARD_FILE = "README.md"
TASK_CATEGORIES = ["visual-question-answering", "image-to-text"]
TAGS = ["viscon-hub", "visual-instruction-tuning", "multimodal", "synthetic", "obelics"]
_PACKAGE = Path(__file__).resolve().parents[1]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXPORT_KEYS = ("formats", "idefics_configs", "llava", "notes")

# The figures of the VisCon-100K paper (appendix B and section 3) the card compares a build with.
PAPER = {
    "documents": "45K",
    "images": "100K",
    "context_tokens_mean": 871.58,
    "context_tokens_median": 781,
    "overlap_mean": 0.24,
    "qa_mode": "4+4",
    "caption_model": "GPT-4V",
    "qa_model": "OpenChat 3.5 (7B)",
    "dedup_model": "WhereIsAI/UAE-Large-V1 (AnglE)",
}

# Hub size buckets: (upper bound exclusive, label).
_SIZE_BUCKETS = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)

# What one row of each mix is; the per-image configs are described in the template.
MIX_DESCRIPTIONS = {
    "captions_only": "one conversation: a caption instruction and the caption",
    "qa_only": "one conversation of the kept, shuffled Q&A rounds (no caption)",
    "leaky": "one conversation: the caption round, then the shuffled Q&A rounds (VisCon-100K's mix)",
    "split": "the non-leaky control: the caption round and the Q&A rounds of an image as two rows "
    "(`<id>-caption`, `<id>-qa`)",
}
PER_IMAGE_DESCRIPTION = {
    "contextual": "one image with everything generated for it with its web context (caption, Q&A, context, "
    "provenance)",
    "non_contextual": "the same images, generated from the image alone (the paper's non-contextual baseline)",
}

# (type, description) of every column; a test checks these against dataset.py's Features.
PER_IMAGE_FIELDS = {
    "id": ("string", "`<document id>-<image index>`, unique per image"),
    "image": ("Image", "the image, bytes embedded in the Parquet file"),
    "image_sha256": ("string", "sha256 of the image bytes"),
    "width": ("int32", "image width in pixels"),
    "height": ("int32", "image height in pixels"),
    "source_url": ("string", "URL of the web page the image comes from"),
    "image_url": ("string", "URL the image was fetched from (null when it came with the source)"),
    "alt_text": ("string", "the image's alt-text on the page, when it had one"),
    "context": ("string", "the page text, `<image>` where this image stands, `<another-image>` for others"),
    "context_tokens": ("int32", "tokens of the page text under the LLaMA/Vicuna tokenizer (-1: unknown)"),
    "context_mode": ("string", "`contextual` or `non_contextual`: whether the caption model saw the context"),
    "caption": ("string", "the generated detailed caption"),
    "caption_relevance_kl": (
        "float32",
        "C3L relevance of the caption: mean per-token KL between the scorer's answer distributions with "
        "and without the image (null: not scored)",
    ),
    "caption_relevance_pmi": (
        "float32",
        "log P(caption | image) - log P(caption) under the scorer (null: not scored)",
    ),
    "qa_freeform": (
        "list of {question, answer, relevance_kl, relevance_pmi}",
        "free-form Q&A kept after dedup, with their C3L relevance scores (null: not scored)",
    ),
    "qa_multiple_choice": (
        "list of {question, options[4], answer, relevance_kl, relevance_pmi}",
        "multiple-choice Q&A kept after dedup; `answer` is the letter A-D; relevance scores as above",
    ),
    "questions_generated": ("int32", "free-form plus multiple-choice questions before dedup"),
    "questions_removed_by_dedup": ("int32", "questions the dedup removed"),
    "caption_model": ("string", "model that wrote the caption"),
    "qa_model": ("string", "model that wrote the Q&A"),
    "caption_template": ("string", "caption prompt template and version (`name@version`)"),
    "qa_freeform_template": ("string", "free-form Q&A prompt template and version"),
    "qa_multiple_choice_template": ("string", "multiple-choice Q&A prompt template and version"),
    "provenance": ("string", "JSON: source row, image metadata, WARC location, cache keys of the replies"),
}
MIX_FIELDS = {
    "id": ("string", "the image's id (`split` adds `-caption` / `-qa`)"),
    "image": ("Image", "the image, bytes embedded"),
    "image_sha256": ("string", "sha256 of the image bytes"),
    "source_url": ("string", "URL of the web page the image comes from"),
    "context_mode": ("string", "`contextual` or `non_contextual`"),
    "messages": (
        "list of {role, content}",
        "alternating `user` / `assistant` turns, text only (no image placeholder)",
    ),
    "round_types": ("list of string", "per user/assistant pair: `caption`, `freeform` or `multiple_choice`"),
}


def templates_dir() -> Path:
    """``$VISCON_CARD_TEMPLATES``, else the templates shipped in the package, else the repository's."""
    env = os.environ.get("VISCON_CARD_TEMPLATES")
    for candidate in (Path(env) if env else None, _PACKAGE / "_cards", _PACKAGE.parent / "dataset_cards"):
        if candidate is not None and (candidate / "card_template.md").is_file():
            return candidate
    raise ConfigError(
        "no dataset card templates found (card_template.md); expected them in dataset_cards/ of the "
        "viscon-hub checkout, or point VISCON_CARD_TEMPLATES at a folder holding them"
    )


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` rows.

    >>> size_category(36), size_category(1000), size_category(100_000)
    ('n<1K', '1K<n<10K', '100K<n<1M')
    """
    for bound, label in _SIZE_BUCKETS:
        if n < bound:
            return label
    return "n>1T"


def source_dataset_id(source: str | None) -> str | None:
    """The Hub dataset id a build's ``source`` names, or None (files, URLs, the bundled sample).

    >>> source_dataset_id("HuggingFaceM4/OBELICS"), source_dataset_id("hf://datasets/a/b@main/x.parquet")
    ('HuggingFaceM4/OBELICS', 'a/b')
    >>> source_dataset_id("viscon-hub:sample/obelics_sample.jsonl") is None
    True
    """
    if not source:
        return None
    if source.startswith("hub:"):
        source = source[4:]
    if source.startswith("hf://datasets/"):
        parts = source[len("hf://datasets/") :].split("/")
        if len(parts) >= 2:
            return f"{parts[0]}/{parts[1].split('@', 1)[0]}"
        return None
    if "://" not in source and ":" not in source and _HUB_ID.match(source):
        return source
    return None


def make_card(
    dataset_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    extra_configs: list[dict[str, Any]] | None = None,
    exports: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
):
    """The ``huggingface_hub.DatasetCard`` of a built folder (nothing is written).

    ``repo_id`` names the repo in the loading examples (``ORG/NAME`` when None). ``license``
    defaults to the build's (``viscon_build.json``), else ``cc-by-4.0``. ``stats`` is
    :func:`viscon_hub.publish.stats.compute_stats` of the folder when already computed. Plots are linked
    when ``DIR/plots/`` holds them (:func:`write_card` draws them first).

    >>> card = make_card("viscon", repo_id="org/viscon", license="cc-by-4.0")  # doctest: +SKIP
    >>> card.data.configs[-1]["config_name"]                                   # doctest: +SKIP
    'non_contextual_split'
    """
    from huggingface_hub import DatasetCard

    data, variables = card_inputs(
        dataset_dir,
        repo_id=repo_id,
        license=license,
        pretty_name=pretty_name,
        extra_configs=extra_configs,
        exports=exports,
        stats=stats,
    )
    templates = templates_dir()
    variables["datasheet"] = _render(templates / "datasheet.md", variables)
    card = DatasetCard.from_template(data, template_path=str(templates / "card_template.md"), **variables)
    return DatasetCard(_scrub(_tidy(str(card))))


def card_inputs(
    dataset_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    extra_configs: list[dict[str, Any]] | None = None,
    exports: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The ``DatasetCardData`` and the template variables :func:`make_card` renders (see dataset_cards/README.md).

    >>> data, variables = card_inputs("viscon")        # doctest: +SKIP
    >>> variables["default_config"], data.license      # doctest: +SKIP
    ('leaky', 'cc-by-4.0')
    """
    root = Path(dataset_dir)
    stats = stats if stats is not None else compute_stats(root)
    info = _build_info(root)
    built = [c for c in ALL_CONFIGS if c in stats["configs"]]
    if not built:
        raise ConfigError(f"{str(root)!r} holds no config files; run `viscon build` first")
    extra = _check_extra_configs(extra_configs, built)
    exports = _check_exports(exports)
    provenance = stats["provenance"]
    handwritten = bool(provenance.get("handwritten_example"))
    source = _public_url(provenance.get("source"))
    hub_source = source_dataset_id(source)
    sample = bool(source and source.startswith("viscon-hub:sample/"))
    license = license or info.get("license") or DEFAULT_LICENSE
    default = DEFAULT_CONFIG if DEFAULT_CONFIG in built else built[0]
    primary = stats.get("primary_config")
    images = stats["configs"][primary]["total"] if primary else None
    pretty = pretty_name or DEFAULT_PRETTY_NAME + (
        " (handwritten examples, not for training)" if handwritten else ""
    )

    data = _card_data(
        root,
        built=built,
        extra=extra,
        license=license,
        pretty_name=pretty,
        rows=stats["configs"][default]["total"],
        source_datasets=[hub_source] if hub_source else (["original"] if sample else [OBELICS]),
        handwritten=handwritten,
    )
    variables = {
        "pretty_name": pretty,
        "repo_id": repo_id or "ORG/NAME",
        "repo_given": repo_id is not None,
        "license": license,
        "license_from_build": bool(info.get("license")) and license == info.get("license"),
        "handwritten": handwritten,
        "source": source,
        "source_revision": provenance.get("source_revision"),
        "hub_source": hub_source,
        "sample_source": sample,
        "default_config": default,
        "images": images,
        "configs": _config_rows(built, stats, default),
        "extra_configs": [
            {"name": e["config_name"], "splits": ", ".join(f["split"] for f in e["data_files"])}
            for e in extra
        ],
        "exports": exports,
        "per_image_fields": _fields(per_image_features(), PER_IMAGE_FIELDS),
        "mix_fields": _fields(mix_features(), MIX_FIELDS),
        "has_per_image": any(c in PER_IMAGE_CONFIGS for c in built),
        "has_mixes": any(config_mix(c) is not None for c in built),
        "stats": stats,
        "plots": _plots(root),
        "paper": PAPER,
        "usage": _usage_rows(stats["usage"]),
        "build_cost": _build_cost(stats["usage"], provenance),
        "dedup": _dedup_rows(stats["dedup"]),
        "drops": _drop_rows(stats["dropped"]),
        "provenance": provenance,
        "dedup_fell_back": any(d.get("fell_back") for d in stats["dedup"]["build"].values()),
        "viscon_hub_version": provenance.get("viscon_hub_version") or _version(),
    }
    return data, variables


def write_card(
    dataset_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    extra_configs: list[dict[str, Any]] | None = None,
    exports: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute the statistics, write ``stats.json``, ``plots/*.png`` and the card as ``README.md``.

    Returns a summary: the headline figures, the licence, the size category and the files written
    (relative to the folder). ``viscon card --dataset DIR [--repo ORG/NAME] [--license L]`` calls it.

    >>> summary = write_card("viscon", repo_id="org/viscon")   # doctest: +SKIP
    >>> summary["headline"]["qa_mode"]                        # doctest: +SKIP
    '4+4'
    """
    root = Path(dataset_dir)
    stats = compute_stats(root)
    write_stats(stats, root)
    plots = write_plots(stats, root)
    card = make_card(
        root,
        repo_id=repo_id,
        license=license,
        pretty_name=pretty_name,
        extra_configs=extra_configs,
        exports=exports,
        stats=stats,
    )
    (root / CARD_FILE).write_text(str(card), encoding="utf-8")
    return {
        "dataset": str(root),
        "files": [CARD_FILE, "stats.json", *plots],
        "license": card.data.license,
        "size_categories": card.data.size_categories,
        "configs": [c["config_name"] for c in card.data.configs],
        "handwritten_example": bool(stats["provenance"].get("handwritten_example")),
        "headline": headline(stats),
    }


def headline(stats: dict[str, Any]) -> dict[str, Any]:
    """The few figures a summary line shows (None where the build cannot tell)."""
    ct, ov, qa = stats.get("context_tokens"), stats.get("overlap"), stats.get("qa_counts")
    primary = stats.get("primary_config")
    dedup = stats["dedup"]["per_image"].get(primary) if primary else None
    return {
        "primary_config": primary,
        "images": stats["configs"][primary]["total"] if primary else None,
        "context_tokens_mean": ct["mean"] if ct else None,
        "context_tokens_median": ct["median"] if ct else None,
        "overlap_mean": ov["mean"] if ov else None,
        "qa_mode": qa["mode"] if qa else None,
        "qa_mode_share": qa["mode_share"] if qa else None,
        "dedup_removed_rate": dedup["removed_rate"] if dedup else None,
        "cost_usd": stats["usage"]["total"]["cost_usd"],
    }


# --- front matter -------------------------------------------------------------------------------


def _card_data(
    root: Path,
    *,
    built: list[str],
    extra: list[dict[str, Any]],
    license: str,
    pretty_name: str,
    rows: int,
    source_datasets: list[str],
    handwritten: bool,
):
    from huggingface_hub import DatasetCardData

    tags = [*TAGS, "handwritten-example"] if handwritten else list(TAGS)
    return DatasetCardData(
        language=["en"],
        license=license,
        pretty_name=pretty_name,
        task_categories=list(TASK_CATEGORIES),
        size_categories=[size_category(rows)],
        source_datasets=source_datasets,
        annotations_creators=["other"] if handwritten else ["machine-generated"],
        language_creators=["found", "other" if handwritten else "machine-generated"],
        multilinguality=["monolingual"],
        tags=tags,
        # Exactly what the build declared, so `load_dataset(DIR, name)` reads the same files.
        configs=configs_metadata(built, root) + extra,
    )


def _check_extra_configs(extra: list[dict[str, Any]] | None, built: list[str]) -> list[dict[str, Any]]:
    out = []
    seen = set(built)
    for entry in extra or []:
        name = entry.get("config_name") if isinstance(entry, dict) else None
        files = entry.get("data_files") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not isinstance(files, list) or not files:
            raise ConfigError(
                "each extra config must be {'config_name': str, 'data_files': [{'split', 'path'}, ...]}; "
                f"got {entry!r}"
            )
        if name in seen:
            raise ConfigError(f"extra config {name!r} repeats a config name; choose another name")
        if entry.get("default"):
            raise ConfigError(
                f"extra config {name!r} asks to be the default; {DEFAULT_CONFIG!r} stays the default"
            )
        for f in files:
            if not (
                isinstance(f, dict) and isinstance(f.get("split"), str) and isinstance(f.get("path"), str)
            ):
                raise ConfigError(
                    f"data_files of extra config {name!r} must be {{'split', 'path'}} dicts; got {f!r}"
                )
        seen.add(name)
        out.append(
            {"config_name": name, "data_files": [{"split": f["split"], "path": f["path"]} for f in files]}
        )
    return out


def _check_exports(exports: dict[str, Any] | None) -> dict[str, Any] | None:
    if not exports:
        return None
    unknown = sorted(set(exports) - set(_EXPORT_KEYS))
    if unknown:
        raise ConfigError(f"exports takes the keys {', '.join(_EXPORT_KEYS)}; got also {', '.join(unknown)}")
    llava = exports.get("llava") or {}
    if not isinstance(llava, dict):
        raise ConfigError(f"exports['llava'] must map a config to its file names; got {llava!r}")
    return {
        "formats": sorted(exports.get("formats") or []),
        "idefics_configs": list(exports.get("idefics_configs") or []),
        "llava": {c: sorted(llava[c]) for c in sorted(llava)},
        "notes": exports.get("notes") or "",
    }


# --- body variables -----------------------------------------------------------------------------


def _build_info(root: Path) -> dict[str, Any]:
    path = root / BUILD_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _config_rows(built: list[str], stats: dict[str, Any], default: str) -> list[dict[str, Any]]:
    rows = []
    for c in built:
        counts = stats["configs"][c]
        mix = config_mix(c)
        rows.append(
            {
                "name": c,
                "default": c == default,
                "mode": config_mode(c),
                "kind": "per-image" if mix is None else "mix",
                "description": PER_IMAGE_DESCRIPTION[c] if mix is None else MIX_DESCRIPTIONS[mix],
                "splits": {s: counts.get(s, 0) for s in SPLITS},
                "total": counts["total"],
            }
        )
    return rows


def _fields(features: Any, described: dict[str, tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": n, "type": described[n][0], "description": described[n][1]} for n in features]


def _plots(root: Path) -> dict[str, str]:
    """Relative links of the plots present, keyed like :data:`viscon_hub.publish.stats.PLOT_FILES`."""
    files = {**PLOT_FILES, **OPTIONAL_PLOT_FILES}
    return {k: f"{PLOTS_DIR}/{f}" for k, f in files.items() if (root / PLOTS_DIR / f).is_file()}


def _build_cost(usage: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """What generating the published rows cost: the usage tokens at the rates of the backends used
    (Batch API rates for models the build called through ``openai-batch``)."""
    from viscon_hub.engine.prices import Usage, batch_models

    bill = Usage(batch_models=batch_models([provenance.get("caption_model"), provenance.get("qa_model")]))
    for m, u in usage["by_model"].items():
        bill.add(m, u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0)
    return {"usd": round(bill.cost_usd, 4), "batch_models": sorted(bill.batch_models)}


def _usage_rows(usage: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": m, **u} for m, u in sorted(usage["by_model"].items())]


def _dedup_rows(dedup: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for mode in sorted(set(dedup["per_image"]) | set(dedup["build"])):
        per = dedup["per_image"].get(mode) or {}
        b = dedup["build"].get(mode) or {}
        rows.append(
            {
                "mode": mode,
                "generated": per.get("questions_generated", b.get("questions_in")),
                "removed": per.get("questions_removed", b.get("removed")),
                "kept": per.get("questions_kept", b.get("questions_kept")),
                "rate": per.get("removed_rate"),
                "model": b.get("model"),
                "threshold": b.get("threshold"),
                "fell_back": bool(b.get("fell_back")),
            }
        )
    return rows


def _drop_rows(dropped: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for stage in sorted(dropped):
        for where, value in sorted((dropped[stage] or {}).items()):
            if isinstance(value, dict):
                rows += [
                    {"stage": stage, "where": where, "reason": r, "count": n}
                    for r, n in sorted(value.items())
                ]
            else:
                rows.append({"stage": stage, "where": "", "reason": where, "count": value})
    return rows


def _version() -> str:
    from viscon_hub import __version__

    return __version__


def _render(path: Path, variables: dict[str, Any]) -> str:
    """A sub-template (the datasheet) with the card's variables; undefined names are errors here."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(path.name).render(**variables)


# --- hygiene ------------------------------------------------------------------------------------


def _public_url(value: str | None) -> str | None:
    """A source URL without credentials or query string (signed URLs carry secrets there)."""
    if not value or "://" not in value:
        return value
    parts = urlsplit(value)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _scrub(text: str) -> str:
    """Anything that looks like a token, and the value of any secret-named variable, as [redacted]."""
    secrets = env_secrets()
    for name, value in secrets.items():
        if value in text:
            logger.warning("a secret from $%s was about to enter the card; it is redacted", name)
    return redact(text, secrets=secrets.values(), limit=None)


def _tidy(text: str) -> str:
    """Blank-line runs left by template tags collapsed; one trailing newline."""
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip("\n") + "\n"


__all__ = [
    "DEFAULT_LICENSE",
    "card_inputs",
    "PAPER",
    "headline",
    "make_card",
    "size_category",
    "source_dataset_id",
    "templates_dir",
    "write_card",
]
