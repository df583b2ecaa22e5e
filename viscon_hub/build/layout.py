"""The built dataset's shape: config names, their ``Features``, the folder layout, split assignment.

Every stage that reads or writes a built dataset (the merge, the ``datasets`` builder, exports,
statistics, the card, the Hub push) takes names and schemas from here, so there is one definition.

A built folder (default ``./viscon``) holds::

    README.md                           front matter ``configs:`` (leaky is the default)
    viscon_build.json                   provenance and counts of the build (see BUILD_INFO)
    <config>/<split>-NNNNN-of-MMMMM.parquet   shards of at most --max-shard-size (default 500MB)

>>> config_mode("non_contextual_leaky"), config_mix("non_contextual_leaky")
('non_contextual', 'leaky')
>>> config_mix("contextual") is None
True
>>> data_path("leaky", "test"), data_path("leaky", "train", 2, 3)
('leaky/test-00000-of-00001.parquet', 'leaky/train-00002-of-00003.parquet')
>>> parse_size("200KB"), parse_size("500MB"), parse_size("1.5GiB")
(200000, 500000000, 1610612736)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from viscon_hub.errors import ConfigError
from viscon_hub.recipe import parse_size

ContextMode = Literal["contextual", "non_contextual"]
PER_IMAGE_CONFIGS = ("contextual", "non_contextual")
MIXES = ("captions_only", "qa_only", "leaky", "split")
NON_CONTEXTUAL_MIXES = tuple(f"non_contextual_{m}" for m in MIXES)
ALL_CONFIGS = PER_IMAGE_CONFIGS + MIXES + NON_CONTEXTUAL_MIXES
DEFAULT_CONFIG = "leaky"
# What ``viscon build --source ...`` writes unless --configs says otherwise: the training mix and the
# per-image record that the card's statistics read. Every config carries its images' bytes (so each
# loads alone); each config more costs about the image bytes again on disk.
DEFAULT_RUN_CONFIGS = ("contextual", "leaky")
SPLITS = ("train", "test")
BUILD_INFO = "viscon_build.json"
DEFAULT_TEST_FRACTION = 0.02
DEFAULT_MAX_SHARD_SIZE = 500_000_000  # as ``datasets.push_to_hub``
ROUND_TYPES = ("caption", "freeform", "multiple_choice")


def config_mode(name: str) -> ContextMode:
    """Which generation run a config is built from."""
    check_config(name)
    return "non_contextual" if name.startswith("non_contextual") else "contextual"


def config_mix(name: str) -> str | None:
    """The mix a config is (``leaky``, ...), or None for the per-image configs."""
    check_config(name)
    if name in PER_IMAGE_CONFIGS:
        return None
    return name.removeprefix("non_contextual_")


def check_config(name: str) -> str:
    """``name`` if it is a config this project builds, else a ConfigError listing them."""
    if name not in ALL_CONFIGS:
        raise ConfigError(f"unknown config {name!r}; expected one of {', '.join(ALL_CONFIGS)}")
    return name


def parse_configs(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``all``, a comma-separated string or a list of names, in canonical order, validated."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"no config named; expected 'all' or some of {', '.join(ALL_CONFIGS)}")
    if "all" in names:
        return ALL_CONFIGS
    for n in names:
        check_config(n)
    return tuple(c for c in ALL_CONFIGS if c in names)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def shard_name(split: str, index: int = 0, count: int = 1) -> str:
    """The file name of shard ``index`` of ``count`` of a split, in any folder of shards (a config's
    folder of a build, an export's ``<config>_<format>`` folder): ``<split>-NNNNN-of-MMMMM.parquet``.

    >>> shard_name("train", 1, 3)
    'train-00001-of-00003.parquet'
    """
    _check_split(split)
    if not 0 <= index < count:
        raise ConfigError(f"shard {index} of {count} does not exist")
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def shard_glob(split: str) -> str:
    """The pattern every shard of a split matches inside its folder (``datasets`` data_files)."""
    return f"{_check_split(split)}-*.parquet"


def data_path(config: str, split: str, index: int = 0, count: int = 1) -> str:
    """Shard ``index`` of ``count`` of a config's split, relative to the dataset folder."""
    name = shard_name(split, index, count)
    return f"{check_config(config)}/{name}"


def data_glob(config: str, split: str) -> str:
    """The pattern every shard of a config's split matches (what the README front matter declares)."""
    pattern = shard_glob(split)
    return f"{check_config(config)}/{pattern}"


_SHARD = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$")


def is_shard(name: str, split: str | None = None) -> bool:
    """Whether a file name is a shard (of ``split``, when given).

    >>> is_shard("test-00000-of-00002.parquet", "test"), is_shard("test-00000-of-00002.parquet", "train")
    (True, False)
    """
    m = _SHARD.match(name)
    return m is not None and (split is None or m["split"] == split)


def shard_files(folder, split: str) -> list[str]:
    """The names of the shards of a split in one folder of shards, in shard order ([] without it)."""
    base = Path(folder)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if is_shard(p.name, split) and p.is_file())


def data_files(folder, config: str, split: str) -> list[str]:
    """The shards of a config's split that exist under ``folder``, relative paths in shard order."""
    return [f"{config}/{name}" for name in shard_files(Path(folder, check_config(config)), split)]


def split_score(page_url: str | None, document_id: str) -> float:
    """A page's position in [0, 1), from the sha256 of its URL (the document id when it has none)."""
    key = (page_url or f"document:{document_id}").encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def assign_splits(pages: dict[str, float], test_fraction: float) -> dict[str, str]:
    """Map page key -> split: pages scoring below ``test_fraction`` are test.

    When that leaves the test split empty and there are at least two pages, the lowest-scoring page
    is test, so that both splits always exist. A page's split depends only on the URL hash and the
    fraction, plus, in that small-data case, on which pages are present.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test fraction must be in [0, 1); got {test_fraction}")
    out = {k: ("test" if s < test_fraction else "train") for k, s in pages.items()}
    if test_fraction > 0 and len(pages) >= 2 and "test" not in out.values():
        out[min(pages, key=lambda k: (pages[k], k))] = "test"
    return out


def per_image_features():
    """Features of ``contextual`` / ``non_contextual``: one row per image, everything generated for it."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "id": Value("string"),
            "image": Image(),
            "image_sha256": Value("string"),
            "width": Value("int32"),
            "height": Value("int32"),
            "source_url": Value("string"),
            "image_url": Value("string"),
            "alt_text": Value("string"),
            "context": Value("string"),
            "context_tokens": Value("int32"),
            "context_mode": Value("string"),
            "caption": Value("string"),
            "caption_relevance_kl": Value("float32"),
            "caption_relevance_pmi": Value("float32"),
            "qa_freeform": List(
                {
                    "question": Value("string"),
                    "answer": Value("string"),
                    "relevance_kl": Value("float32"),
                    "relevance_pmi": Value("float32"),
                }
            ),
            "qa_multiple_choice": List(
                {
                    "question": Value("string"),
                    "options": List(Value("string")),
                    "answer": Value("string"),
                    "relevance_kl": Value("float32"),
                    "relevance_pmi": Value("float32"),
                }
            ),
            "questions_generated": Value("int32"),
            "questions_removed_by_dedup": Value("int32"),
            "caption_model": Value("string"),
            "qa_model": Value("string"),
            "caption_template": Value("string"),
            "qa_freeform_template": Value("string"),
            "qa_multiple_choice_template": Value("string"),
            "provenance": Value("string"),
        }
    )


def mix_features():
    """Features of every mix: one conversation about one image.

    ``messages`` alternate ``user`` / ``assistant``, text only (no image placeholder; exports add the
    one their trainer expects). ``round_types`` names each user/assistant pair: ``caption``,
    ``freeform`` or ``multiple_choice``.
    """
    from datasets import Features, Image, List, Value

    return Features(
        {
            "id": Value("string"),
            "image": Image(),
            "image_sha256": Value("string"),
            "source_url": Value("string"),
            "context_mode": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "round_types": List(Value("string")),
        }
    )


def features_for(config: str):
    """The ``datasets.Features`` of a config's rows."""
    return per_image_features() if config_mix(config) is None else mix_features()


def configs_metadata(configs: Iterable[str], folder=None) -> list[dict]:
    """The ``configs:`` front matter of a built folder: a glob of shards per split, ``leaky`` the default.

    With ``folder``, a split is listed only when it has shards there: ``datasets`` cannot load a
    split without rows, so the build writes no file for one.

    >>> configs_metadata(["leaky"])[0]["data_files"][0]
    {'split': 'train', 'path': 'leaky/train-*.parquet'}
    """
    configs = [check_config(c) for c in configs]
    default = DEFAULT_CONFIG if DEFAULT_CONFIG in configs else configs[0]
    out = []
    for c in configs:
        entry: dict = {
            "config_name": c,
            "data_files": [
                {"split": s, "path": data_glob(c, s)}
                for s in SPLITS
                if folder is None or data_files(folder, c, s)
            ],
        }
        if c == default:
            entry["default"] = True
        out.append(entry)
    return out


def write_minimal_readme(folder, configs: Iterable[str]) -> None:
    """A README whose front matter declares the configs, so ``load_dataset`` reads the folder.

    ``viscon card`` replaces it with the full card (same ``configs:``).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(configs=configs_metadata(configs, folder), tags=["viscon-hub"])
    body = (
        "# VisCon-style visual instruction data\n\n"
        "Built with viscon-hub. Run `viscon card --dataset <this folder>` for the full dataset card.\n"
    )
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    Path(folder, "README.md").write_text(str(card), encoding="utf-8")


__all__ = [
    "ALL_CONFIGS",
    "BUILD_INFO",
    "DEFAULT_CONFIG",
    "DEFAULT_MAX_SHARD_SIZE",
    "DEFAULT_RUN_CONFIGS",
    "DEFAULT_TEST_FRACTION",
    "MIXES",
    "NON_CONTEXTUAL_MIXES",
    "PER_IMAGE_CONFIGS",
    "ROUND_TYPES",
    "SPLITS",
    "assign_splits",
    "check_config",
    "config_mix",
    "config_mode",
    "configs_metadata",
    "data_files",
    "data_glob",
    "data_path",
    "features_for",
    "is_shard",
    "mix_features",
    "parse_configs",
    "parse_size",
    "per_image_features",
    "shard_files",
    "shard_glob",
    "shard_name",
    "split_score",
    "write_minimal_readme",
]
