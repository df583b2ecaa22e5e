"""IDEFICS2 / the_cauldron export: Parquet with embedded images and user/assistant pairs.

Layout under the output folder (the same layout the Hub push gives the extra config)::

    <config>_idefics/<split>-NNNNN-of-MMMMM.parquet   shards of at most --max-shard-size
        images  list of datasets Image (bytes embedded, path "<sha256>.<ext>")
        texts   list of {user, assistant, source}, one per round; source "viscon/<config>"

As in the_cauldron, the texts hold no image placeholder: IDEFICS2's chat template puts the image
(``{"type": "image"}``) in the first user turn itself. The shards' schema carries datasets' Features,
so ``load_dataset("<output>/<config>_idefics")`` gives back ``Image`` columns.

>>> idefics_data_path("leaky", "train", 1, 2)
'leaky_idefics/train-00001-of-00002.parquet'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from viscon_hub.build.layout import DEFAULT_MAX_SHARD_SIZE, config_mix, shard_name
from viscon_hub.errors import ConfigError
from viscon_hub.publish.exports import Source, embedded_image, rounds, write_parquet_splits

SUFFIX = "_idefics"


def features():
    """The_cauldron's Features: ``images`` (list of Image), ``texts`` (list of {user, assistant, source})."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "images": List(Image()),
            "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")}),
        }
    )


def idefics_config_name(config: str) -> str:
    """The Hub config name of a mix's IDEFICS export.

    >>> idefics_config_name("non_contextual_leaky")
    'non_contextual_leaky_idefics'
    """
    if config_mix(config) is None:
        raise ConfigError(f"config {config!r} is not a mix; only mixes have an IDEFICS export (e.g. leaky)")
    return f"{config}{SUFFIX}"


def idefics_data_path(config: str, split: str, index: int = 0, count: int = 1) -> str:
    """Shard ``index`` of ``count`` of a mix's IDEFICS split, relative to an export folder or a Hub repo.

    >>> idefics_data_path("qa_only", "test")
    'qa_only_idefics/test-00000-of-00001.parquet'
    """
    return f"{idefics_config_name(config)}/{shard_name(split, index, count)}"


def to_row(row: dict[str, Any], *, source: str) -> dict[str, Any]:
    """A the_cauldron row of a mix row.

    >>> to_row({"image": None, "messages": [{"role": "user", "content": "Q?"},
    ...                                    {"role": "assistant", "content": "A."}]}, source="viscon/leaky")
    {'images': [], 'texts': [{'user': 'Q?', 'assistant': 'A.', 'source': 'viscon/leaky'}]}
    """
    image = embedded_image(row.get("image"))
    return {
        "images": [image] if image else [],
        "texts": [{"user": u, "assistant": a, "source": source} for u, a in rounds(row)],
    }


def write(
    source: Source, *, splits: Sequence[str], output: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> dict[str, Any]:
    """Write the shards ``<config>_idefics/<split>-NNNNN-of-MMMMM.parquet``; return the summary part."""
    name = f"viscon/{source.config}"
    return write_parquet_splits(
        source,
        splits=splits,
        output=output,
        features=features(),
        to_row=lambda r: to_row(r, source=name),
        folder=idefics_config_name(source.config),
        max_shard_size=max_shard_size,
    )


__all__ = ["SUFFIX", "features", "idefics_config_name", "idefics_data_path", "to_row", "write"]
