import dataclasses
import random

import pytest

from viscon_hub.generate.parsers import (
    PARSE_DROP_REASONS,
    FreeformRound,
    MultipleChoice,
    parse_answer,
    parse_freeform,
    parse_multiple_choice,
    parse_options,
)

OPTIONS = ("Cat", "Dog", "Bird", "Fish")


def ff(n, fmt="<Human> Q{i}?\n<Assistant> A{i}.", sep="\n"):
    return sep.join(fmt.format(i=i) for i in range(n))


def mc(question="What is it?", options="A. Cat\nB. Dog\nC. Bird\nD. Fish", answer="B"):
    return f"<Human> {question}\n<Options>\n{options}\n<Assistant> {answer}"


def mcs(n, **kw):
    return "\n".join(mc(f"Q{i}?", **kw) for i in range(n))


# Free-form --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        ff(3),
        ff(4, sep="\n\n"),
        "Sure! Here is a conversation about the image:\n\n" + ff(3),
        ff(3, "<human>: Q{i}?\n<ASSISTANT>: A{i}."),
        ff(3, "<Human>:Q{i}?\n<Assistant>:A{i}."),
        ff(3, "< Human > Q{i}?\n< Assistant > A{i}."),
        ff(3, "**<Human>** Q{i}?\n**<Assistant>** A{i}."),
        ff(3, "**<Human>:** Q{i}?\n**<Assistant>:** A{i}."),
        ff(3, "<Human>Q{i}?<Assistant>A{i}."),
        ff(3, "<Human> Q{i}?\r\n<Assistant> A{i}.\r\n"),
        ff(3, "{i}. <Human> Q{i}?\n<Assistant> A{i}."),
        ff(3, "Round {i}:\n<Human> Q{i}?\n<Assistant> A{i}.\n---"),
        "  \n" + ff(3) + "\n\n",
    ],
)
def test_freeform_accepts_variants(reply):
    r = parse_freeform(reply)
    assert r.ok and r.reason is None and r.truncated == 0
    assert [(i.question, i.answer) for i in r.items][:3] == [(f"Q{i}?", f"A{i}.") for i in range(3)]


def test_freeform_multi_line_answer_is_kept_whole():
    answer = "First line.\n\n- a point\n- another point\nLast line."
    r = parse_freeform(f"<Human> Q?\n<Assistant> {answer}\n" + ff(2))
    assert r.ok and r.items[0] == FreeformRound("Q?", answer)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("just some prose, no identifiers", "no_identifiers"),
        ("", "no_identifiers"),
        (None, "no_identifiers"),
        ("Human: Q?\nAssistant: A.\n" * 3, "no_identifiers"),
        ("#@!%&\x00\ufffd" * 20 + "<Hum an> <Assist", "no_identifiers"),
        (ff(2), "too_few_rounds"),
        (ff(1), "too_few_rounds"),
        (ff(3) + "\n<Human> a question cut by max_tok", "unpaired_rounds"),
        (ff(2) + "\n<Human> Q3?\n<Assist", "unpaired_rounds"),
        ("<Assistant> A0.\n<Human> Q0?\n" + ff(3), "unpaired_rounds"),
        ("<Human> Q?\n<Human> Q?\n<Assistant> A\n" + ff(2), "unpaired_rounds"),
        (ff(2) + "\n<Human> Q?\n<Assistant> A.\n<Assistant> A again.", "unpaired_rounds"),
        (mcs(3), "unpaired_rounds"),
        ("<Human> \n<Assistant> A.\n" + ff(2), "empty_turn"),
        (ff(2) + "\n<Human> Q?\n<Assistant>", "empty_turn"),
        (ff(2) + "\n<Human> Q?\n<Assistant> **", "empty_turn"),
    ],
)
def test_freeform_failures(reply, reason):
    r = parse_freeform(reply)
    assert not r.ok and r.reason == reason and r.items == () and reason in PARSE_DROP_REASONS


@pytest.mark.parametrize(("n", "kept", "truncated"), [(3, 3, 0), (5, 5, 0), (6, 5, 1), (7, 5, 2), (12, 5, 7)])
def test_freeform_keeps_at_most_max_rounds(n, kept, truncated):
    r = parse_freeform(ff(n))
    assert r.ok and len(r.items) == kept and r.truncated == truncated
    assert r.items[-1].question == f"Q{kept - 1}?"


def test_freeform_round_limits_are_parameters():
    assert parse_freeform(ff(1), min_rounds=1, max_rounds=2).ok
    r = parse_freeform(ff(4), min_rounds=1, max_rounds=2)
    assert len(r.items) == 2 and r.truncated == 2
    assert parse_freeform(ff(5), min_rounds=6, max_rounds=8).reason == "too_few_rounds"


# Multiple choice --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        "A. Cat\nB. Dog\nC. Bird\nD. Fish",
        "A) Cat\nB) Dog\nC) Bird\nD) Fish",
        "(A) Cat\n(B) Dog\n(C) Bird\n(D) Fish",
        "A: Cat\nB: Dog\nC: Bird\nD: Fish",
        "a. Cat\nb. Dog\nc. Bird\nd. Fish",
        "A. Cat;\nB. Dog;\nC. Bird;\nD. Fish",
        "- A. Cat\n- B. Dog\n- C. Bird\n- D. Fish",
        "**A.** Cat\n**B.** Dog\n**C.** Bird\n**D.** Fish",
        "\nA. Cat\n\nB. Dog\n\nC. Bird\n\nD. Fish\n",
        "A. Cat; B. Dog; C. Bird; D. Fish",
        "A. Cat B. Dog C. Bird D. Fish",
        "(A) Cat (B) Dog (C) Bird (D) Fish",
        "A) Cat | B) Dog | C) Bird | D) Fish",
    ],
)
def test_multiple_choice_option_variants(options):
    r = parse_multiple_choice(mcs(3, options=options))
    assert r.ok and len(r.items) == 3 and not r.dropped_items
    assert all(i.options == OPTIONS and i.answer == "B" for i in r.items)


def test_options_on_the_identifier_line_and_wrapped_options():
    reply = mcs(3, options="").replace("<Options>\n\n", "<Options> A. Cat B. Dog C. Bird D. Fish\n")
    assert [i.options for i in parse_multiple_choice(reply).items] == [OPTIONS] * 3
    wrapped = parse_options("A. A big\nblack cat\nB. Dog\nC. Bird\nD. Fish")
    assert wrapped == ("A big black cat", "Dog", "Bird", "Fish")


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[B]", "B"),
        ("B) Dog", "B"),
        ("B. Dog", "B"),
        ("B - Dog", "B"),
        ("B, because it barks.", "B"),
        ("B\nThe dog is the only animal barking.", "B"),
        ("**B**", "B"),
        ("b", "B"),
        ("b)", "B"),
        ("Answer: B", "B"),
        ("answer:B", "B"),
        ("The answer is B", "B"),
        ("The correct answer is (B) Dog.", "B"),
        ("Option B", "B"),
        ("The right choice is D.", "D"),
        ("A", "A"),
        ("A. Cat", "A"),
    ],
)
def test_multiple_choice_answer_variants(answer, letter):
    assert parse_answer(answer) == letter
    r = parse_multiple_choice(mcs(3, answer=answer))
    assert r.ok and [i.answer for i in r.items] == [letter] * 3


@pytest.mark.parametrize(
    "answer",
    [
        "E",
        "E.",
        "(E)",
        "I am not sure",
        "A or B",
        "A, C",
        "B/C",
        "A and D",
        "The answer is a dog",
        "Answer: E",
        "Dog",
    ],
)
def test_bad_answers(answer):
    assert parse_answer(answer) is None


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (mc(options="A. Cat\nB. Dog\nC. Bird"), "bad_options"),
        (mc(options="A. Cat\nB. Dog\nC. Bird\nD. Fish\nE. Cow"), "bad_options"),
        (mc(options="B. Cat\nA. Dog\nC. Bird\nD. Fish"), "bad_options"),
        (mc(options="A. Cat\nB. Dog\nD. Bird\nC. Fish"), "bad_options"),
        (mc(options="A. Cat\nB. Dog\nC. Bird\nE. Fish"), "bad_options"),
        (mc(options="A. Cat\nB. cat\nC. Bird\nD. Fish"), "bad_options"),
        (mc(options="A. Cat\nB. \nC. Bird\nD. Fish"), "bad_options"),
        (mc(options="Cat\nDog\nBird\nFish"), "bad_options"),
        (mc(options="A. Cat; B. Dog; C. Bird"), "bad_options"),
        (mc(options=""), "bad_options"),
        (mc(answer="E"), "bad_answer"),
        (mc(answer="I am not sure"), "bad_answer"),
        (mc(answer="A or C"), "bad_answer"),
        (mc(answer=""), "empty_turn"),
        (mc(question=""), "empty_turn"),
        ("<Human> What is it?\n<Assistant> B", "unpaired_rounds"),
        ("<Human> What is it?\n<Options>\nA. Cat\nB. Dog\nC. Bird\nD. Fish", "unpaired_rounds"),
        (mc() + "\n<Assistant> C", "unpaired_rounds"),
        ("<Human> Q?\n<Options>\nA. Cat\nB. Do", "unpaired_rounds"),
    ],
)
def test_one_bad_question_among_good_ones_is_dropped_alone(bad, reason):
    assert reason in PARSE_DROP_REASONS
    good = [mc(f"Good {i}?", answer="ABCD"[i]) for i in range(4)]
    r = parse_multiple_choice("\n".join([good[0], bad, *good[1:]]))
    assert r.ok and r.reason is None and r.dropped_items == {reason: 1}
    assert [i.question for i in r.items] == [f"Good {i}?" for i in range(4)]
    assert [i.answer for i in r.items] == ["A", "B", "C", "D"]
    # With only two good questions left, the reply fails with the bad question's reason.
    alone = parse_multiple_choice("\n".join([good[0], bad, good[1]]))
    assert (
        not alone.ok and alone.reason == reason and alone.items == () and alone.dropped_items == {reason: 1}
    )


def test_multiple_choice_first_reason_wins_when_too_few_remain():
    reply = "\n".join([mc(answer="E"), mc(options="A. Cat"), mc("Good?")])
    r = parse_multiple_choice(reply)
    assert not r.ok and r.reason == "bad_answer" and r.dropped_items == {"bad_answer": 1, "bad_options": 1}


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("prose without identifiers", "no_identifiers"),
        ("", "no_identifiers"),
        (None, "no_identifiers"),
        ("<Assistant> B\n" + mcs(3), "unpaired_rounds"),
        ("<Options>\nA. Cat\nB. Dog\nC. Bird\nD. Fish\n" + mcs(3), "unpaired_rounds"),
        (mcs(2), "too_few_rounds"),
        (ff(4), "unpaired_rounds"),
        (mcs(2) + "\n<Human> Q3?\n<Options>\nA. Cat\nB. Do", "unpaired_rounds"),
    ],
)
def test_multiple_choice_whole_reply_failures(reply, reason):
    r = parse_multiple_choice(reply)
    assert not r.ok and r.reason == reason and r.items == ()


def test_multiple_choice_truncated_after_three_good_questions_keeps_them():
    r = parse_multiple_choice(mcs(3) + "\n<Human> Q4?\n<Options>\nA. Cat\nB. Do")
    assert r.ok and len(r.items) == 3 and r.dropped_items == {"unpaired_rounds": 1}


@pytest.mark.parametrize(("n", "kept", "truncated"), [(3, 3, 0), (5, 5, 0), (7, 5, 2)])
def test_multiple_choice_keeps_at_most_max_questions(n, kept, truncated):
    r = parse_multiple_choice(mcs(n))
    assert r.ok and len(r.items) == kept and r.truncated == truncated


def test_multiple_choice_items_are_frozen_records():
    item = parse_multiple_choice(mcs(3, answer="(D)")).items[0]
    assert item == MultipleChoice("Q0?", OPTIONS, "D")
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.answer = "A"


def test_parsers_never_raise_on_noise():
    pieces = [
        "<Human>",
        "<Assistant>",
        "<Options>",
        "**",
        ":",
        "A.",
        "B)",
        "(C)",
        "D:",
        "E.",
        "\n",
        " ",
        "x",
        "?",
        "Answer: ",
        "<",
        ">",
        "1.",
        "---",
        "é",
        "{",
        "}",
    ]
    rng = random.Random(0)
    for _ in range(300):
        reply = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        for parse in (parse_freeform, parse_multiple_choice):
            r = parse(reply)
            assert r.ok or r.reason in PARSE_DROP_REASONS
            assert all(reason in PARSE_DROP_REASONS for reason in r.dropped_items)
