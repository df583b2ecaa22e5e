"""TRL messages export: Parquet with embedded images and typed content blocks.

Layout under the output folder::

    <config>_messages/<split>-NNNNN-of-MMMMM.parquet   shards of at most --max-shard-size
        images    list of datasets Image (bytes embedded, path "<sha256>.<ext>")
        messages  list of {role, content: list of {type, text}}

The first user message opens with ``{"type": "image"}``, once per image (so image blocks ==
``len(images)``, the count ``trl.data_utils.prepare_multimodal_messages`` checks); every other block
is ``{"type": "text", "text": ...}``. Arrow stores one struct for both kinds, so an image block reads
back as ``{"type": "image", "text": None}``. TRL counts a block as a placeholder when it has no
``"image"`` key, which holds for these, and fills it with the image; a block struct that also had an
``image`` field would read back as ``image: None`` and count as already filled, which is why the
struct is exactly ``{type, text}``. (``trl.trainer.utils.remove_none_values`` drops the ``None``
texts for chat templates that test ``"text" in block``.)

>>> to_messages([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], images=1)[0]
{'role': 'user', 'content': [{'type': 'image', 'text': None}, {'type': 'text', 'text': 'Q?'}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from viscon_hub.build.layout import DEFAULT_MAX_SHARD_SIZE, config_mix, shard_name
from viscon_hub.errors import ConfigError
from viscon_hub.publish.exports import Source, embedded_image, write_parquet_splits

SUFFIX = "_messages"


def features():
    """``images`` (list of Image) and ``messages`` (list of {role, content: list of {type, text}})."""
    from datasets import Features, Image, List, Value

    block = {"type": Value("string"), "text": Value("string")}
    return Features(
        {"images": List(Image()), "messages": List({"role": Value("string"), "content": List(block)})}
    )


def messages_folder(config: str) -> str:
    """The folder of a mix's TRL messages shards, relative to the export folder."""
    if config_mix(config) is None:
        raise ConfigError(f"config {config!r} is not a mix; export a mix such as leaky")
    return f"{config}{SUFFIX}"


def messages_data_path(config: str, split: str, index: int = 0, count: int = 1) -> str:
    """Shard ``index`` of ``count`` of a mix's TRL messages split, relative to the export folder.

    >>> messages_data_path("leaky", "train")
    'leaky_messages/train-00000-of-00001.parquet'
    """
    return f"{messages_folder(config)}/{shard_name(split, index, count)}"


def to_messages(messages: Sequence[dict[str, Any]], *, images: int) -> list[dict[str, Any]]:
    """Text-only ``{role, content: str}`` messages as TRL content blocks, ``images`` image blocks first."""
    out = []
    first_user = True
    for m in messages:
        content: list[dict[str, Any]] = []
        if m["role"] == "user" and first_user:
            content.extend({"type": "image", "text": None} for _ in range(images))
            first_user = False
        content.append({"type": "text", "text": m["content"]})
        out.append({"role": m["role"], "content": content})
    return out


def to_row(row: dict[str, Any]) -> dict[str, Any]:
    """A TRL row of a mix row: one embedded image (none for a row without one) and its messages."""
    image = embedded_image(row.get("image"))
    images = [image] if image else []
    return {"images": images, "messages": to_messages(row["messages"], images=len(images))}


def write(
    source: Source, *, splits: Sequence[str], output: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> dict[str, Any]:
    """Write the shards ``<config>_messages/<split>-NNNNN-of-MMMMM.parquet``; return the summary part."""
    return write_parquet_splits(
        source,
        splits=splits,
        output=output,
        features=features(),
        to_row=to_row,
        folder=messages_folder(source.config),
        max_shard_size=max_shard_size,
    )


__all__ = ["SUFFIX", "features", "messages_data_path", "messages_folder", "to_messages", "to_row", "write"]
