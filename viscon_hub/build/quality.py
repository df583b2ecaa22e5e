"""Multiple-choice rounds without a tell: the option shuffle, the length flag and the audit figures.

A model trained on multiple-choice rounds learns whatever picks the right letter most cheaply. Three
tells are measured here: a right letter that is not uniform over A-D, a right option that is the
longest of the four, and a right option that is the only one sharing a word with the question.
The merge repairs what it can without calling a model (:func:`repair_multiple_choice`): it shuffles
the options of every item with a seed drawn from the sample id, so the right letter is uniform, and it
flags items whose right option is much longer than every other (and drops them when asked).

>>> item = {"question": "What colour is the mug?", "options": ["Red", "Blue", "Green", "Grey"], "answer": "A"}
>>> shuffled = shuffle_options(item, seed="doc-0|0")
>>> shuffled["options"][LETTERS.index(shuffled["answer"])]
'Red'
>>> shuffle_options(item, seed="doc-0|0") == shuffled
True
>>> length_tell(["A tall red mug with a chipped handle", "Blue", "Green", "Grey"], "A", ratio=1.5)
True
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from viscon_hub.errors import ConfigError
from viscon_hub.recipe import opt

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True, slots=True, kw_only=True)
class MultipleChoiceQuality:
    """How the merge treats multiple-choice items.

    ``shuffle`` permutes each item's options with a seed from the sample id (the answer letter follows
    its option). An item is flagged when its right option is at least ``longest_ratio`` times as long
    (in characters) as every other option; flagged items are counted, and dropped when ``drop_flagged``.
    """

    shuffle: bool = opt(
        True,
        "shuffle each item's options (--no-option-shuffle: keep the generated order)",
        flag="--no-option-shuffle",
    )
    longest_ratio: float = opt(
        1.5,
        "flag a multiple-choice item whose right option is this many times longer than every other",
        flag="--mc-longest-ratio",
    )
    drop_flagged: bool = opt(
        False, "leave flagged multiple-choice items out (counted)", flag="--drop-length-tells"
    )

    def __post_init__(self) -> None:
        if not isinstance(self.longest_ratio, int | float) or not self.longest_ratio > 1.0:
            raise ConfigError(
                f"the multiple-choice longest_ratio must be a number above 1.0 (right option this many "
                f"times longer than every other); got {self.longest_ratio!r}"
            )


def right_index(item: dict[str, Any]) -> int | None:
    """Position of the right option, or None when the item is not four options with an A-D answer."""
    options = item.get("options")
    answer = item.get("answer")
    if not isinstance(options, list | tuple) or len(options) != 4 or answer not in LETTERS:
        return None
    return LETTERS.index(answer)


def shuffle_options(item: dict[str, Any], *, seed: str, right_at: int | None = None) -> dict[str, Any]:
    """A copy of ``item`` with its options in a seeded random order and the answer letter following.

    Every permutation is equally likely, so over many items the right letter is uniform over A-D
    whatever the generator's habits were. ``right_at`` (0-3) puts the right option there and shuffles
    the other three. An item that is not four options with an A-D answer is returned unchanged (the
    parser never makes one).

    >>> shuffle_options({"options": ["r", "x", "y", "z"], "answer": "A"}, seed="s", right_at=2)["answer"]
    'C'
    """
    k = right_index(item)
    if k is None:
        return dict(item)
    # random.Random seeds a str through sha512: the same order in every process and Python version.
    rng = random.Random(seed)
    if right_at is None:
        order = list(range(4))
        rng.shuffle(order)
    else:
        others = [i for i in range(4) if i != k]
        rng.shuffle(others)
        order = others[:right_at] + [k] + others[right_at:]
    return {
        **item,
        "options": [item["options"][i] for i in order],
        "answer": LETTERS[order.index(k)],
    }


def _lengths(options: Iterable[Any]) -> list[int]:
    return [len(str(o or "").strip()) for o in options]


def is_longest(options: list[Any], answer: str) -> bool:
    """The right option is strictly longer (in characters) than each of the other three.

    >>> is_longest(["Red", "Blue", "Green", "Grey"], "C"), is_longest(["Red", "Tan", "Ox", "Ab"], "A")
    (True, False)
    """
    k = LETTERS.index(answer)
    lengths = _lengths(options)
    return all(lengths[k] > n for i, n in enumerate(lengths) if i != k)


def length_tell(options: list[Any], answer: str, *, ratio: float) -> bool:
    """The right option is at least ``ratio`` times as long (in characters) as every other option."""
    k = LETTERS.index(answer)
    lengths = _lengths(options)
    longest_other = max(n for i, n in enumerate(lengths) if i != k)
    return lengths[k] >= ratio * max(longest_other, 1)


def only_overlap(
    question: str, options: list[Any], answer: str, *, words: Callable[[str], Iterable[str]]
) -> bool:
    """The right option is the only one that shares a word (as ``words`` makes them) with the question.

    >>> only_overlap("Which mug is red", ["The red mug", "A cup", "A jar", "A pan"], "A", words=str.split)
    True
    >>> only_overlap("Which mug is red", ["The red mug", "A blue mug", "A jar", "A pan"], "A", words=str.split)
    False
    """
    k = LETTERS.index(answer)
    asked = set(words(question or ""))
    shares = [bool(asked & set(words(str(o or "")))) for o in options]
    return shares[k] and sum(shares) == 1


def repair_multiple_choice(
    record: dict[str, Any], config: MultipleChoiceQuality
) -> tuple[dict[str, Any], Counter[str]]:
    """The record with its multiple-choice items shuffled, flagged ones dropped when asked, and counts.

    The right letters of a record's items follow each other round A-D from a start drawn with the
    seed ``<context_mode>|<id>``, and item ``i``'s other options are shuffled with ``...|<i>``: two
    builds give the same order, the contextual and non-contextual records of one image are shuffled
    independently, and the letters stay balanced on a small dataset too (a record's four items take
    the four letters), not only on average. Counts:
    ``length_flagged`` (items whose right option is ``longest_ratio`` times longer than every other)
    and ``length_dropped`` (those of them left out).

    >>> rec = {"id": "d-0", "context_mode": "contextual", "qa_multiple_choice": [
    ...     {"question": "Q?", "options": ["a long right answer", "b", "c", "d"], "answer": "A"}]}
    >>> _, counts = repair_multiple_choice(rec, MultipleChoiceQuality(drop_flagged=True))
    >>> dict(counts), _["qa_multiple_choice"]
    ({'length_flagged': 1, 'length_dropped': 1}, [])
    """
    counts: Counter[str] = Counter()
    items = record.get("qa_multiple_choice") or []
    kept = []
    seed = f"{record.get('context_mode')}|{record.get('id')}"
    start = random.Random(seed).randrange(4)
    for i, item in enumerate(items):
        if right_index(item) is not None:
            if length_tell(item["options"], item["answer"], ratio=config.longest_ratio):
                counts["length_flagged"] += 1
                if config.drop_flagged:
                    counts["length_dropped"] += 1
                    continue
            if config.shuffle:
                item = shuffle_options(item, seed=f"{seed}|{i}", right_at=(start + len(kept)) % 4)
        kept.append(item)
    return {**record, "qa_multiple_choice": kept}, counts


def parse_turn(user_turn: str) -> tuple[str, list[str]] | None:
    """(question, four options) of a multiple-choice user turn as the merge writes it, else None.

    The turn is the question, the lines ``A. ...`` to ``D. ...``, then the instruction line.

    >>> parse_turn("What is it?\\nA. A cat\\nB. A dog\\nC. A cow\\nD. A hen\\nAnswer with the letter.")
    ('What is it?', ['A cat', 'A dog', 'A cow', 'A hen'])
    """
    lines = (user_turn or "").split("\n")
    if len(lines) < 6:
        return None
    block = lines[-5:-1]
    if not all(line.startswith(f"{letter}. ") for letter, line in zip(LETTERS, block, strict=True)):
        return None
    return "\n".join(lines[:-5]), [line[3:] for line in block]


class MultipleChoiceAudit:
    """Running tallies of the three tells over the multiple-choice items of one config.

    >>> audit = MultipleChoiceAudit(words=str.split, ratio=1.5)
    >>> audit.add("Is it red?", ["red", "blue", "green", "grey"], "A")
    >>> audit.to_dict()["right_longest_share"], audit.to_dict()["right_letter_share"]["A"]
    (0.0, 1.0)
    """

    def __init__(self, *, words: Callable[[str], Iterable[str]], ratio: float) -> None:
        self.words = words
        self.ratio = ratio
        self.items = 0
        self.letters: Counter[str] = Counter()
        self.longest = 0
        self.only_overlap = 0
        self.flagged = 0

    def add(self, question: str, options: list[Any], answer: str) -> None:
        if answer not in LETTERS or len(options) != 4:
            return
        self.items += 1
        self.letters[answer] += 1
        self.longest += is_longest(options, answer)
        self.only_overlap += only_overlap(question, options, answer, words=self.words)
        self.flagged += length_tell(options, answer, ratio=self.ratio)

    def to_dict(self) -> dict[str, Any]:
        n = max(self.items, 1)
        return {
            "items": self.items,
            "right_letter": {letter: self.letters[letter] for letter in LETTERS},
            "right_letter_share": {letter: round(self.letters[letter] / n, 4) for letter in LETTERS},
            "right_longest": self.longest,
            "right_longest_share": round(self.longest / n, 4),
            "right_only_overlap": self.only_overlap,
            "right_only_overlap_share": round(self.only_overlap / n, 4),
            "length_flagged": self.flagged,
            "longest_ratio": self.ratio,
        }


__all__ = [
    "LETTERS",
    "MultipleChoiceAudit",
    "MultipleChoiceQuality",
    "is_longest",
    "length_tell",
    "only_overlap",
    "parse_turn",
    "repair_multiple_choice",
    "right_index",
    "shuffle_options",
]
