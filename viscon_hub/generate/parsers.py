"""Parsers for Q&A replies written with the literal identifiers ``<Human>``, ``<Assistant>`` and ``<Options>``.

They never raise on model output: a reply parses into items, or fails with one of
:data:`PARSE_DROP_REASONS`. Identifiers are matched case-insensitively, with optional spaces
inside the brackets, an optional colon after them and optional Markdown bold around them
(``<human>:``, ``**<Assistant>**``). Text before the first identifier is ignored; a turn runs until
the next identifier, so answers may span lines.

Free-form reply (3 to 5 rounds)::

    <Human> How many cups are on the table?
    <Assistant> There are three cups.
    ...

Multiple-choice reply (3 to 5 questions, four options, the answer a letter)::

    <Human> What colour is the teapot?
    <Options>
    A. Green
    B. White
    C. Blue
    D. Red
    <Assistant> A

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

ParseReason = Literal[
    "no_identifiers", "unpaired_rounds", "empty_turn", "too_few_rounds", "bad_options", "bad_answer"
]
PARSE_DROP_REASONS: tuple[ParseReason, ...] = (
    "no_identifiers",  # not one <Human>/<Assistant>/<Options> identifier in the reply
    "unpaired_rounds",  # identifiers out of order: a question without answer, an answer without question, ...
    "empty_turn",  # a question or an answer with no text
    "too_few_rounds",  # fewer than min_rounds good rounds (or questions)
    "bad_options",  # multiple choice: not exactly four non-empty, distinct options labelled A-D in order
    "bad_answer",  # multiple choice: no single letter A-D in the answer
)
LETTERS = ("A", "B", "C", "D")

_BOLD = r"(?:\*\*|__)?"
_TAG = re.compile(
    rf"[ \t]*{_BOLD}[ \t]*<[ \t]*(human|assistant|options)[ \t]*>[ \t]*{_BOLD}[ \t]*:?[ \t]*{_BOLD}",
    re.IGNORECASE,
)
# Round numbers, headings or rules a model writes between rounds end up at the tail of a turn.
_TRAILING_NOISE = re.compile(
    r"(?:\n\s*(?:\d{1,2}[.):]|(?:round|question|q)\s*\d{1,2}\s*[.:)]?|[-*_=#]{3,}))+\s*\Z", re.I
)
_OPTION_LINE = re.compile(r"^(?:[-•]\s*|\*\s+)?\**\(?([A-Za-z])\s*[.):]\**\s*(.*)$")
_OPTION_INLINE = re.compile(r"(?:^|(?<=[\s;,|]))\(?([A-H])\s*[.):]\s+")
_ANSWER_MULTI = re.compile(r"^[\[(]?[A-Da-d][\])]?\.?\s*(?:,|/|&|\band\b|\bor\b)\s*[\[(]?[A-Da-d]\b")
_ANSWER_START = re.compile(r"^[\[(]?([A-D])(?:[\])]|\s*[.:,;]|\s+[-–—]\s|[ \t]*(?:\n|$))")
_ANSWER_START_LOWER = re.compile(r"^[\[(]?([a-d])(?:[\])]|\.|[ \t]*(?:\n|$))")
_ANSWER_PHRASE = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)\s*(?:(?i:is)\b\s*)?[:=]?\s*(?:(?i:option)\s*)?[\[(]?([A-D])\b"
)


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
    """The outcome of parsing one reply.

    ``items`` holds at most ``max_rounds`` items; ``truncated`` counts good items cut beyond that.
    ``dropped_items`` counts, by reason, multiple-choice questions dropped on their own.
    """

    ok: bool
    items: tuple = ()
    reason: ParseReason | None = None
    truncated: int = 0
    dropped_items: Counter = field(default_factory=Counter)


def _clean(text: str) -> str:
    return _TRAILING_NOISE.sub("", text.strip()).strip()


def _segments(reply: str) -> list[tuple[str, str]]:
    """``[(identifier, text), ...]`` in order; text before the first identifier is ignored."""
    parts = _TAG.split(reply if isinstance(reply, str) else "")
    return [(parts[i].lower(), _clean(parts[i + 1])) for i in range(1, len(parts) - 1, 2)]


def parse_freeform(reply: str, *, min_rounds: int = 3, max_rounds: int = 5) -> ParseResult:
    """Free-form rounds: a ``<Human>`` question then an ``<Assistant>`` answer, strictly alternating.

    >>> parse_freeform("<Human> Q?\\n<Assistant> A.").reason
    'too_few_rounds'
    """
    segments = _segments(reply)
    if not segments:
        return ParseResult(ok=False, reason="no_identifiers")
    expected = ("human", "assistant")
    if len(segments) % 2 or any(tag != expected[i % 2] for i, (tag, _) in enumerate(segments)):
        return ParseResult(ok=False, reason="unpaired_rounds")
    rounds = []
    for (_, question), (_, answer) in zip(segments[::2], segments[1::2]):
        if not question or not answer:
            return ParseResult(ok=False, reason="empty_turn")
        rounds.append(FreeformRound(question, answer))
    if len(rounds) < min_rounds:
        return ParseResult(ok=False, reason="too_few_rounds")
    return ParseResult(ok=True, items=tuple(rounds[:max_rounds]), truncated=max(0, len(rounds) - max_rounds))


def parse_multiple_choice(reply: str, *, min_rounds: int = 3, max_rounds: int = 5) -> ParseResult:
    """Independent questions, each ``<Human>`` question, ``<Options>`` A-D, ``<Assistant>`` letter.

    A malformed question is dropped on its own and counted in ``dropped_items``; the reply fails,
    with the first question's reason, only when fewer than ``min_rounds`` good questions remain.

    >>> q = "<Human> Colour?\\n<Options>\\nA. Red\\nB. Blue\\nC. Green\\nD. Black\\n<Assistant> (C)\\n"
    >>> r = parse_multiple_choice(q * 3)
    >>> r.ok, r.items[0].options, r.items[0].answer
    (True, ('Red', 'Blue', 'Green', 'Black'), 'C')
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
    first_reason: ParseReason | None = None
    for group in groups:
        item = _mc_item(group)
        if isinstance(item, MultipleChoice):
            items.append(item)
        else:
            dropped[item] += 1
            first_reason = first_reason or item
    if len(items) < min_rounds:
        return ParseResult(ok=False, reason=first_reason or "too_few_rounds", dropped_items=dropped)
    return ParseResult(
        ok=True,
        items=tuple(items[:max_rounds]),
        truncated=max(0, len(items) - max_rounds),
        dropped_items=dropped,
    )


def _mc_item(group: list[tuple[str, str]]) -> MultipleChoice | ParseReason:
    if [tag for tag, _ in group] != ["human", "options", "assistant"]:
        return "unpaired_rounds"
    (_, question), (_, options_text), (_, answer_text) = group
    if not question or not answer_text:
        return "empty_turn"
    options = parse_options(options_text)
    if options is None:
        return "bad_options"
    answer = parse_answer(answer_text)
    if answer is None:
        return "bad_answer"
    return MultipleChoice(question, options, answer)


def _option_text(text: str) -> str:
    return text.strip().strip("*").strip().rstrip(";,|").strip()


def parse_options(text: str) -> tuple[str, str, str, str] | None:
    """Four options labelled A-D in order, one per line or all on one line; ``None`` otherwise.

    >>> parse_options("(A) cat; (B) dog; (C) bird; (D) fish")
    ('cat', 'dog', 'bird', 'fish')
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matches = [_OPTION_LINE.match(line) for line in lines]
    pairs: list[tuple[str, str]] = []
    if len(lines) > 1 and all(matches):
        pairs = [(m.group(1).upper(), _option_text(m.group(2))) for m in matches if m]
    else:
        pieces = _OPTION_INLINE.split(" ".join(lines))
        if len(pieces) >= 3 and not pieces[0].strip(" ;,|"):
            pairs = [(pieces[i], _option_text(pieces[i + 1])) for i in range(1, len(pieces) - 1, 2)]
    if tuple(label for label, _ in pairs) != LETTERS:
        return None
    options = tuple(option for _, option in pairs)
    if not all(options) or len({o.casefold() for o in options}) != len(LETTERS):
        return None
    return options  # type: ignore[return-value]


def parse_answer(text: str) -> Literal["A", "B", "C", "D"] | None:
    """The one letter A-D an answer names (``B``, ``(B)``, ``B) text``, ``Answer: B``); ``None`` otherwise.

    >>> parse_answer("The answer is C."), parse_answer("A or B"), parse_answer("E")
    ('C', None, None)
    """
    text = text.replace("*", "").replace("`", "").strip().strip("\"'").strip()
    if _ANSWER_MULTI.match(text):
        return None
    m = _ANSWER_START.match(text) or _ANSWER_START_LOWER.match(text) or _ANSWER_PHRASE.search(text)
    return m.group(1).upper() if m else None  # type: ignore[return-value]
