"""LLaVA / ShareGPT4V export: a JSON list per split plus an image folder.

Layout under the output folder::

    <config>_<split>.json     [{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]
    images/<sha256>.<ext>     each image once; ``image`` is its path relative to images/

Train with ``--data_path OUT/leaky_train.json --image_folder OUT/images``. LLaVA's
``preprocess_multimodal`` moves an ``<image>`` token to the start of its turn followed by a newline,
so the export writes it there, once, in the first human turn: the conversations are already what
LLaVA would make of them (``preprocess_multimodal(c) == c``).

>>> sample = {"id": "a", "image": "x.jpg", "conversations": [
...     {"from": "human", "value": "<image>\\nWhat is shown?"}, {"from": "gpt", "value": "A mug."}]}
>>> check_sample(sample)
[]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from viscon_hub.publish.exports import ImageFolder, Source, Tally, rounds, write_json_splits

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


def to_sample(row: dict[str, Any], image: str | None) -> dict[str, Any]:
    """A LLaVA sample of a mix row; ``image`` is its path relative to the image folder, None for text only.

    >>> row = {"id": "d-0", "messages": [{"role": "user", "content": "Describe it."},
    ...                                 {"role": "assistant", "content": "A mug."}]}
    >>> to_sample(row, "ab.jpg")["conversations"][0]
    {'from': 'human', 'value': '<image>\\nDescribe it.'}
    """
    conversations = []
    for i, (user, assistant) in enumerate(rounds(row)):
        # preprocess_multimodal strips the turn holding <image>; doing it here keeps the file a fixed point.
        value = f"{IMAGE_TOKEN}\n{user.strip()}" if i == 0 and image is not None else user
        conversations.append({"from": ROLES[0], "value": value})
        conversations.append({"from": ROLES[1], "value": assistant})
    sample: dict[str, Any] = {"id": row["id"]}
    if image is not None:
        sample["image"] = image
    sample["conversations"] = conversations
    return sample


def write(source: Source, *, splits: Sequence[str], output: Path) -> dict[str, Any]:
    """Write ``<config>_<split>.json`` for each split and the images they name; return the summary part."""
    images = ImageFolder(output)
    tally = Tally()
    files = write_json_splits(
        source, splits=splits, output=output, images=images, tally=tally, to_sample=to_sample
    )
    return {
        "files": sorted(files),
        **tally.summary(),
        "image_folder": images.root.name,
        "images": len(images.names),
        "images_written": images.written,
    }


def preprocess_multimodal(conversations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What LLaVA's ``preprocess_multimodal`` makes of a sample's turns (plain ``<image>`` tokens).

    A turn holding ``<image>`` loses every occurrence and is stripped, then gets one ``<image>\\n``
    in front; other turns are unchanged.

    >>> preprocess_multimodal([{"from": "human", "value": "What is this? <image>"}])
    [{'from': 'human', 'value': '<image>\\nWhat is this?'}]
    """
    out = []
    for turn in conversations:
        value = turn["value"]
        if IMAGE_TOKEN in value:
            value = f"{IMAGE_TOKEN}\n{value.replace(IMAGE_TOKEN, '').strip()}".strip()
        out.append({**turn, "value": value})
    return out


def check_sample(sample: Any, *, image_folder: str | Path | None = None) -> list[str]:
    """Problems LLaVA's training code would have with a sample; empty when it is fine.

    The rules (``llava/train/train.py``): turns are ``{"from", "value"}`` alternating ``human`` /
    ``gpt`` from a human turn; a sample with an ``image`` holds exactly one ``<image>`` token, in its
    first human turn; a sample without one holds none (the model would look for image features it was
    not given). With ``image_folder``, the image file must exist there.

    >>> check_sample({"id": "a", "conversations": [{"from": "human", "value": "<image>\\nHi"},
    ...                                          {"from": "gpt", "value": "Hello"}]})
    ['no image but 1 <image> token(s); a text-only sample must hold none']
    """
    if not isinstance(sample, dict):
        return [f"a sample is a JSON object, got {type(sample).__name__}"]
    problems = []
    if not isinstance(sample.get("id"), (str, int)):
        problems.append("no id")
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        return [*problems, "conversations must be a non-empty list of turns"]
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return [*problems, f"turn {i} is not a {{'from', 'value': str}} object"]
        expected = ROLES[i % 2]
        if turn.get("from") != expected:
            problems.append(f"turn {i} is from {turn.get('from')!r}; turns alternate human/gpt from human")
    counts = [t["value"].count(IMAGE_TOKEN) for t in turns]
    image = sample.get("image")
    if "image" in sample:
        if not isinstance(image, str) or not image:
            problems.append("image must be one path (a non-empty string) relative to the image folder")
        if sum(counts) != 1:
            problems.append(f"{sum(counts)} <image> tokens; a sample with an image holds exactly one")
        elif counts[0] != 1:
            problems.append(f"<image> is in turn {counts.index(1)}; it belongs in the first human turn")
        if image_folder is not None and isinstance(image, str) and image:
            if Path(image).is_absolute() or ".." in Path(image).parts:
                problems.append(f"image {image!r} is not a path inside the image folder")
            elif not (Path(image_folder) / image).is_file():
                problems.append(f"image {image!r} not found in {image_folder}")
    elif sum(counts):
        problems.append(f"no image but {sum(counts)} <image> token(s); a text-only sample must hold none")
    return problems


__all__ = ["IMAGE_TOKEN", "check_sample", "preprocess_multimodal", "to_sample", "write"]
