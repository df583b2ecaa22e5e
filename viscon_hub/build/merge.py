"""Generation records -> rows of every config: per-image rows and the conversation mixes.

The caption round gets a user turn drawn from ``configs/conversations.yaml`` (plus, in contextual
mixes, an instruction to bring in the context); Q&A rounds are shuffled; a multiple-choice round
shows the question and options A-D and asks for the letter. Every random choice is seeded from the
sample id and the purpose of the draw, so two builds give identical data and ``leaky`` and
``qa_only`` present the same rounds in the same order.

>>> style = ConversationStyle.load()
>>> rec = {"id": "doc-0", "context_mode": "non_contextual", "caption": "A red mug.",
...        "qa_freeform": [{"question": "What colour is the mug?", "answer": "Red."}],
...        "qa_multiple_choice": []}
>>> [r["round_types"] for r in mix_rows(rec, "leaky", style=style, image=None)]
[['caption', 'freeform']]
>>> [r["id"] for r in mix_rows(rec, "split", style=style, image=None)]
['doc-0-caption', 'doc-0-qa']
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from viscon_hub.resources import PACKAGE_DATA
from viscon_hub.build.layout import MIXES
from viscon_hub.errors import ConfigError
from viscon_hub.resources import config_path

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationStyle:
    """The instruction texts of ``configs/conversations.yaml``."""

    version: int
    caption_instructions: tuple[str, ...]
    context_instructions: tuple[str, ...]
    multiple_choice_instruction: str

    def __post_init__(self) -> None:
        if not self.caption_instructions or not self.context_instructions:
            raise ConfigError(
                "conversations.yaml needs non-empty caption_instructions and context_instructions"
            )
        if not self.multiple_choice_instruction.strip():
            raise ConfigError("conversations.yaml needs a multiple_choice_instruction")

    @classmethod
    def load(cls, path: str | None = None) -> ConversationStyle:
        source = path or config_path("conversations.yaml")
        try:
            with open(source, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            return cls(
                version=int(data["version"]),
                caption_instructions=tuple(str(s) for s in data["caption_instructions"]),
                context_instructions=tuple(str(s) for s in data["context_instructions"]),
                multiple_choice_instruction=str(data["multiple_choice_instruction"]),
            )
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read the conversation style {source}: {e}") from e


def _rng(record: dict[str, Any]) -> random.Random:
    # random.Random seeds a str through sha512: stable across processes and Python versions.
    return random.Random(f"{record['context_mode']}|{record['id']}")


def multiple_choice_turn(item: dict[str, Any], style: ConversationStyle) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, item["options"], strict=True))
    return f"{item['question']}\n{options}\n{style.multiple_choice_instruction}"


def rounds_of(
    record: dict[str, Any], style: ConversationStyle
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(caption round, shuffled Q&A rounds) of a record, each round (type, user turn, assistant turn).

    One generator, seeded by the sample id, draws the caption instruction, then the context
    instruction, then the Q&A order, so every mix of a record shows the same turns.
    """
    rng = _rng(record)
    caption: list[tuple[str, str, str]] = []
    instruction = rng.choice(style.caption_instructions)
    context = rng.choice(style.context_instructions)
    if record.get("caption"):
        if record["context_mode"] == "contextual":
            instruction = f"{instruction} {context}"
        caption = [("caption", instruction, record["caption"])]
    qa = [("freeform", q["question"], q["answer"]) for q in record.get("qa_freeform") or ()]
    for item in record.get("qa_multiple_choice") or ():
        # The parser guarantees this; a record edited by hand must not smuggle in a bad answer.
        if len(item["options"]) != 4 or item["answer"] not in LETTERS:
            raise ValueError(f"multiple-choice item of {record['id']} is not four options with an A-D answer")
        qa.append(("multiple_choice", multiple_choice_turn(item, style), item["answer"]))
    rng.shuffle(qa)
    return caption, qa


def qa_rounds(record: dict[str, Any], style: ConversationStyle) -> list[tuple[str, str, str]]:
    """(round type, user turn, assistant turn) for every kept Q&A item, shuffled with the sample's seed."""
    return rounds_of(record, style)[1]


def _conversation(
    record: dict[str, Any], sample_id: str, rounds: list[tuple[str, str, str]], image: Any
) -> dict[str, Any]:
    messages = []
    for _, user, assistant in rounds:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {
        "id": sample_id,
        "image": image,
        "image_sha256": record.get("image_sha256"),
        "source_url": record.get("page_url"),
        "context_mode": record["context_mode"],
        "messages": messages,
        "round_types": [kind for kind, _, _ in rounds],
    }


def mix_rows(
    record: dict[str, Any],
    mix: str,
    *,
    style: ConversationStyle,
    image: Any,
    rounds: tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]] | None = None,
) -> list[dict[str, Any]]:
    """The rows a mix makes of one record (its Q&A already deduplicated). Empty when it has nothing to say.

    ``captions_only``: the caption round. ``qa_only``: the shuffled Q&A rounds. ``leaky``: the
    caption round, then the shuffled Q&A rounds, in one conversation. ``split``: the caption round
    and the Q&A rounds as two samples, ``<id>-caption`` and ``<id>-qa``. ``rounds`` is
    :func:`rounds_of` of the record, when the caller made it already.
    """
    if mix not in MIXES:
        raise ConfigError(f"unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    caption, qa = rounds if rounds is not None else rounds_of(record, style)
    rid = record["id"]
    if mix == "captions_only":
        return [_conversation(record, rid, caption, image)] if caption else []
    if mix == "qa_only":
        return [_conversation(record, rid, qa, image)] if qa else []
    if mix == "leaky":
        return [_conversation(record, rid, caption + qa, image)] if caption and qa else []
    if not (caption and qa):
        return []
    return [
        _conversation(record, f"{rid}-caption", caption, image),
        _conversation(record, f"{rid}-qa", qa, image),
    ]


PER_IMAGE_KEYS = (
    "image_sha256",
    "width",
    "height",
    "image_url",
    "alt_text",
    "context",
    "context_tokens",
    "context_mode",
    "caption",
    "caption_model",
    "qa_model",
    "caption_template",
    "qa_freeform_template",
    "qa_multiple_choice_template",
    "caption_relevance_kl",
    "caption_relevance_pmi",
)


def per_image_row(record: dict[str, Any], *, image: Any, questions_generated: int) -> dict[str, Any]:
    """The ``contextual`` / ``non_contextual`` row of a record (Q&A already deduplicated)."""
    ff = list(record.get("qa_freeform") or [])
    mc = list(record.get("qa_multiple_choice") or [])
    row = {"id": record["id"], "image": image, "source_url": record.get("page_url")}
    row.update({k: record.get(k) for k in PER_IMAGE_KEYS})
    row.update(
        qa_freeform=ff,
        qa_multiple_choice=mc,
        questions_generated=questions_generated,
        questions_removed_by_dedup=questions_generated - len(ff) - len(mc),
        provenance=_provenance(record),
    )
    return row


def public_source(value: str | None) -> str | None:
    """A source fit to publish: URLs and dataset ids as they are, local paths without their folders.

    >>> public_source("/home/me/obelics/part-3.parquet"), public_source("hf://datasets/a/b/x.parquet")
    ('part-3.parquet', 'hf://datasets/a/b/x.parquet')
    """
    if not value:
        return value
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif "://" in value or not (value.startswith(("/", "./", "../", "~")) or os.path.isabs(value)):
        return value
    path = Path(value)
    try:
        return f"viscon-hub:{path.resolve().relative_to(PACKAGE_DATA.resolve()).as_posix()}"
    except ValueError:
        return path.name


def _provenance(record: dict[str, Any]) -> str:
    value = record.get("provenance")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {"raw": value}
    value = dict(value or {})
    value.update(
        {
            "document_id": record.get("document_id"),
            "image_index": record.get("image_index"),
            "source": public_source(record.get("source")),
            "row": record.get("row"),
            "caption_key": record.get("caption_key"),
            "qa_freeform_key": record.get("qa_freeform_key"),
            "qa_multiple_choice_key": record.get("qa_multiple_choice_key"),
        }
    )
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


__all__ = [
    "ConversationStyle",
    "rounds_of",
    "mix_rows",
    "multiple_choice_turn",
    "per_image_row",
    "qa_rounds",
]
