import pytest

from viscon_hub.generate.parsers import PARSE_DROP_REASONS, parse_freeform, parse_multiple_choice


def ff(n, fmt="<Human> Q{i}?\n<Assistant> A{i}."):
    return "\n".join(fmt.format(i=i) for i in range(n))


def mc(question="What is it?", options="A. Cat\nB. Dog\nC. Bird\nD. Fish", answer="B"):
    return f"<Human> {question}\n<Options>\n{options}\n<Assistant> {answer}"


@pytest.mark.parametrize(
    "reply",
    [
        ff(4),
        "Sure! Here you go:\n" + ff(3),
        ff(3, "<human>: Q{i}?\n<ASSISTANT>: A{i}."),
        ff(3, "**<Human>** Q{i}?\n**<Assistant>** A{i}."),
        ff(3, "<Human>Q{i}?<Assistant>A{i}."),
        "<Human> Q1?\n<Assistant> First line.\nSecond line.\n" + ff(2),
    ],
)
def test_freeform_accepts_variants(reply):
    r = parse_freeform(reply)
    assert r.ok and 3 <= len(r.items) <= 5
    assert all(i.question and i.answer for i in r.items)


def test_freeform_multi_line_answer_is_kept_whole():
    r = parse_freeform("<Human> Q1?\n<Assistant> First line.\nSecond line.\n" + ff(2))
    assert r.items[0].answer == "First line.\nSecond line."


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("just some prose, no identifiers", "no_identifiers"),
        ("", "no_identifiers"),
        (ff(2), "too_few_rounds"),
        (ff(3) + "\n<Human> dangling question cut by max_tokens", "unpaired_rounds"),
        ("<Assistant> A0.\n<Human> Q0?\n" + ff(3), "unpaired_rounds"),
        ("<Human> Q?\n<Human> Q?\n<Assistant> A\n" + ff(2), "unpaired_rounds"),
        ("<Human> \n<Assistant> A.\n" + ff(2), "empty_turn"),
    ],
)
def test_freeform_failures(reply, reason):
    r = parse_freeform(reply)
    assert not r.ok and r.reason == reason and reason in PARSE_DROP_REASONS


def test_freeform_truncates_beyond_max_rounds():
    r = parse_freeform(ff(7))
    assert r.ok and len(r.items) == 5 and r.truncated == 2


@pytest.mark.parametrize(
    ("options", "answer", "expected"),
    [
        ("A. Cat\nB. Dog\nC. Bird\nD. Fish", "B", "B"),
        ("A) Cat\nB) Dog\nC) Bird\nD) Fish", "(C)", "C"),
        ("(A) Cat\n(B) Dog\n(C) Bird\n(D) Fish", "D.", "D"),
        ("A. Cat; B. Dog; C. Bird; D. Fish", "A", "A"),
        ("A: Cat\nB: Dog\nC: Bird\nD: Fish", "Answer: B", "B"),
        ("A. Cat\nB. Dog\nC. Bird\nD. Fish", "The answer is C because it flies.", "C"),
        ("A. Cat\nB. Dog\nC. Bird\nD. Fish", "B) Dog", "B"),
    ],
)
def test_multiple_choice_variants(options, answer, expected):
    reply = "\n".join(mc(f"Q{i}?", options, answer) for i in range(3))
    r = parse_multiple_choice(reply)
    assert r.ok and len(r.items) == 3
    assert all(i.answer == expected and i.options == ("Cat", "Dog", "Bird", "Fish") for i in r.items)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (mc(options="A. Cat\nB. Dog\nC. Bird"), "bad_options"),
        (mc(options="A. Cat\nB. Dog\nC. Bird\nD. Fish\nE. Cow"), "bad_options"),
        (mc(options="B. Cat\nA. Dog\nC. Bird\nD. Fish"), "bad_options"),
        (mc(options="A. Cat\nB. Cat\nC. Bird\nD. Fish"), "bad_options"),
        (mc(options="A. Cat\nB. \nC. Bird\nD. Fish"), "bad_options"),
        (mc(answer="E"), "bad_answer"),
        (mc(answer="I am not sure"), "bad_answer"),
        ("<Human> What is it?\n<Assistant> B", "unpaired_rounds"),
    ],
)
def test_one_bad_question_among_good_ones_is_dropped_alone(bad, reason):
    good = [mc(f"Good {i}?") for i in range(3)]
    r = parse_multiple_choice("\n".join([good[0], bad, *good[1:]]))
    assert r.ok and len(r.items) == 3 and r.dropped_items == {reason: 1}
    alone = parse_multiple_choice("\n".join([bad, good[0], good[1]]))
    assert not alone.ok and alone.reason == reason


def test_multiple_choice_whole_reply_failures():
    assert parse_multiple_choice("prose").reason == "no_identifiers"
    assert parse_multiple_choice("<Assistant> B\n" + mc()).reason == "unpaired_rounds"
    truncated = mc("Q1?") + "\n" + mc("Q2?") + "\n<Human> Q3?\n<Options>\nA. Cat\nB. Do"
    assert not parse_multiple_choice(truncated).ok


def test_multiple_choice_truncates_beyond_max():
    r = parse_multiple_choice("\n".join(mc(f"Q{i}?") for i in range(7)))
    assert r.ok and len(r.items) == 5 and r.truncated == 2
