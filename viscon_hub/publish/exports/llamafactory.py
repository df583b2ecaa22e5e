"""LLaMA-Factory ``sharegpt`` export: JSON per split, an image folder and ``dataset_info.json``.

Layout under the output folder (use it as LLaMA-Factory's ``dataset_dir``)::

    <config>_<split>.json   [{"messages": [{"role": "user"|"assistant", "content"}], "images": [path]}]
    images/<sha256>.<ext>   each image once; ``images`` paths are relative to the output folder
    dataset_info.json       registers each split as viscon_<config>_<split> (like LLaMA-Factory's mllm_demo)

``<image>`` opens the first user message, once, so the number of ``<image>`` tokens equals
``len(images)`` as LLaMA-Factory's multimodal plugins require. An existing ``dataset_info.json`` in
the folder keeps its other entries, so several configs can share one ``dataset_dir``. Train with
``dataset_dir: OUT`` and ``dataset: viscon_leaky_train``.

>>> dataset_name("leaky", "train")
'viscon_leaky_train'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from viscon_hub.errors import ConfigError
from viscon_hub.publish.exports import (
    IMAGE_FOLDER,
    ImageFolder,
    Source,
    Tally,
    atomic_open,
    write_json_splits,
)

DATASET_INFO = "dataset_info.json"
IMAGE_TOKEN = "<image>"


def dataset_name(config: str, split: str) -> str:
    return f"viscon_{config}_{split}"


def dataset_info_entry(file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry of one exported file (the shape of LLaMA-Factory's ``mllm_demo``).

    >>> dataset_info_entry("leaky_train.json")["formatting"]
    'sharegpt'
    """
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    }


def to_sample(row: dict[str, Any], image: str | None) -> dict[str, Any]:
    """A sharegpt sample of a mix row; ``image`` is its name in the image folder, None for text only.

    >>> row = {"messages": [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": "A mug."}]}
    >>> to_sample(row, "ab.jpg")
    {'messages': [{'role': 'user', 'content': '<image>Describe it.'}, {'role': 'assistant', 'content': 'A mug.'}], 'images': ['images/ab.jpg']}
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if image is not None:
        messages[0]["content"] = IMAGE_TOKEN + messages[0]["content"]
    return {"messages": messages, "images": [f"{IMAGE_FOLDER}/{image}"] if image is not None else []}


def write(source: Source, *, splits: Sequence[str], output: Path) -> dict[str, Any]:
    """Write ``<config>_<split>.json`` per split, the images and ``dataset_info.json``; return the summary part."""
    images = ImageFolder(output)
    tally = Tally()
    files = write_json_splits(
        source, splits=splits, output=output, images=images, tally=tally, to_sample=to_sample
    )
    entries = {
        dataset_name(source.config, split): dataset_info_entry(f"{source.config}_{split}.json")
        for split in splits
    }
    _update_dataset_info(output / DATASET_INFO, entries)
    return {
        "files": sorted([*files, DATASET_INFO]),
        **tally.summary(),
        "datasets": sorted(entries),
        "image_folder": IMAGE_FOLDER,
        "images": len(images.names),
        "images_written": images.written,
    }


def _update_dataset_info(path: Path, entries: dict[str, Any]) -> None:
    info: dict[str, Any] = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or remove it, then export again") from e
        if not isinstance(info, dict):
            raise ConfigError(f"{path} holds a {type(info).__name__}; expected a JSON object of datasets")
    # Update in place: other datasets keep their order, so a rerun rewrites the same bytes.
    info.update(entries)
    with atomic_open(path) as f:
        f.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


__all__ = ["DATASET_INFO", "IMAGE_TOKEN", "dataset_info_entry", "dataset_name", "to_sample", "write"]
