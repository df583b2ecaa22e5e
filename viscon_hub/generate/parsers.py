"""Parsers for Q&A replies written with the literal identifiers ``<Human>``, ``<Assistant>`` and ``<Options>``.

They never raise on model output: a reply either parses, or fails with one of
:data:`PARSE_DROP_REASONS`. Identifiers are matched case-insensitively, with an optional colon and
optional Markdown bold around them.

>>> r = parse_freeform("<Human> Q1?\\n<Assistant> A1.\\n<Human> Q2?\\n<Assistant> A2.\\n<Human> Q3?\\n<Assistant> A3.")
>>> r.ok, len(r.items), r.items[0].question
(True, 3, 'Q1?')
>>> parse_freeform("no identifiers here").reason
'no_identifiers'
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

PARSE_DROP_REASONS = (
    "no_identifiers",
    "unpaired_rounds",
    "empty_turn",
    "too_few_rounds",
    "bad_options",
    "bad_answer",
)
LETTERS = ("A", "B", "C", "D")

_TAG = re.compile(r"\**\s*<\s*(human|assistant|options)\s*>\s*\**\s*:?", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\(?([A-Za-z])\s*[.):]\s*(.*)$")
_OPTION_INLINE = re.compile(r"(?:^|(?<=[\s;,]))\(?([A-H])\s*[.):]\s+")
_ANSWER_START = re.compile(r"^\(?([A-Da-d])(?:\)|[.:,]|$)")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-D])\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class FreeformRound:
    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class MultipleChoice:
    question: str
    options: tuple[str, str, str, str]
    answer: Literal["A", "B", "C", "D"]


@dataclass(slots=True)
class ParseResult:
    ok: bool
    items: tuple = ()
    reason: str | None = None
    truncated: int = 0
    dropped_items: Counter = field(default_factory=Counter)


def _segments(reply: str) -> list[tuple[str, str]]:
    """``[(tag, text), ...]`` in order; text before the first identifier is ignored."""
    parts = _TAG.split(reply or "")
    return [(parts[i].lower(), parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def parse_freeform(reply: str, *, min_rounds: int = 3, max_rounds: int = 5) -> ParseResult:
    """Free-form rounds: ``<Human>`` question then ``<Assistant>`` answer, strictly alternating."""
    segments = _segments(reply)
    if not segments:
        return ParseResult(ok=False, reason="no_identifiers")
    tags = [t for t, _ in segments]
    if len(tags) % 2 or any(t != ("human" if i % 2 == 0 else "assistant") for i, t in enumerate(tags)):
        return ParseResult(ok=False, reason="unpaired_rounds")
    rounds = []
    for i in range(0, len(segments), 2):
        question, answer = segments[i][1], segments[i + 1][1]
        if not question or not answer:
            return ParseResult(ok=False, reason="empty_turn")
        rounds.append(FreeformRound(question, answer))
    if len(rounds) < min_rounds:
        return ParseResult(ok=False, reason="too_few_rounds")
    return ParseResult(ok=True, items=tuple(rounds[:max_rounds]), truncated=max(0, len(rounds) - max_rounds))


def _parse_options(text: str) -> tuple[str, ...] | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_OPTION_LINE.match(line) for line in lines]
    pairs: list[tuple[str, str]] = []
    if len(lines) > 1 and all(matches):
        pairs = [(m.group(1).upper(), m.group(2).strip().rstrip(";").strip()) for m in matches]
    else:
        # All options on one line: "A. Cat; B. Dog; C. Bird; D. Fish".
        pieces = _OPTION_INLINE.split(" ".join(lines))
        if len(pieces) >= 3 and not pieces[0].strip(" ;,"):
            pairs = [(pieces[i], pieces[i + 1].strip().rstrip(";,").strip()) for i in range(1, len(pieces) - 1, 2)]
    if tuple(label for label, _ in pairs) != LETTERS:
        return None
    options = tuple(text for _, text in pairs)
    if any(not o for o in options) or len({o.lower() for o in options}) != 4:
        return None
    return options


def _parse_answer(text: str) -> str | None:
    text = text.strip().strip("*").strip()
    m = _ANSWER_START.match(text)
    if m:
        return m.group(1).upper()
    m = _ANSWER_PHRASE.search(text)
    return m.group(1).upper() if m else None


def parse_multiple_choice(reply: str, *, min_rounds: int = 3, max_rounds: int = 5) -> ParseResult:
    """Independent questions, each ``<Human>`` question, ``<Options>`` A-D, ``<Assistant>`` letter.

    A malformed question is dropped on its own (counted in ``dropped_items``); the reply fails only
    when fewer than ``min_rounds`` good questions remain.
    """
    segments = _segments(reply)
    if not segments:
        return ParseResult(ok=False, reason="no_identifiers")
    if segments[0][0] != "human":
        return ParseResult(ok=False, reason="unpaired_rounds")
    groups: list[list[tuple[str, str]]] = []
    for tag, text in segments:
        if tag == "human":
            groups.append([])
        groups[-1].append((tag, text))
    items: list[MultipleChoice] = []
    dropped: Counter = Counter()
    first_reason = None
    for group in groups:
        reason, item = _mc_item(group)
        if item is None:
            dropped[reason] += 1
            first_reason = first_reason or reason
        else:
            items.append(item)
    if len(items) < min_rounds:
        return ParseResult(ok=False, reason=first_reason or "too_few_rounds", dropped_items=dropped)
    return ParseResult(ok=True, items=tuple(items[:max_rounds]), truncated=max(0, len(items) - max_rounds),
                       dropped_items=dropped)


def _mc_item(group: list[tuple[str, str]]) -> tuple[str | None, MultipleChoice | None]:
    if [t for t, _ in group] != ["human", "options", "assistant"]:
        return "unpaired_rounds", None
    (_, question), (_, options_text), (_, answer_text) = group
    if not question or not answer_text:
        return "empty_turn", None
    options = _parse_options(options_text)
    if options is None:
        return "bad_options", None
    answer = _parse_answer(answer_text)
    if answer is None:
        return "bad_answer", None
    return None, MultipleChoice(question, options, answer)  # type: ignore[arg-type]
