import json
from collections import Counter

import pytest

from viscon_hub.build.driver import write_dataset
from viscon_hub.build.layout import BUILD_INFO
from viscon_hub.build.merge import ConversationStyle, MergeConfig, multiple_choice_turn
from viscon_hub.build.quality import (
    LETTERS,
    MultipleChoiceAudit,
    MultipleChoiceQuality,
    is_longest,
    length_tell,
    only_overlap,
    parse_turn,
    repair_multiple_choice,
    shuffle_options,
)
from viscon_hub.errors import ConfigError
from viscon_hub.publish.stats import compute_stats


def item(answer="A", options=("Red", "Blue", "Green", "Grey"), question="What colour is the mug?"):
    return {"question": question, "options": list(options), "answer": answer}


def test_shuffle_keeps_the_right_option_and_is_deterministic():
    for seed in range(50):
        original = item(answer=LETTERS[seed % 4])
        right = original["options"][LETTERS.index(original["answer"])]
        shuffled = shuffle_options(original, seed=f"doc-{seed}|0")
        assert sorted(shuffled["options"]) == sorted(original["options"])
        assert shuffled["options"][LETTERS.index(shuffled["answer"])] == right
        assert shuffle_options(original, seed=f"doc-{seed}|0") == shuffled
        assert original["answer"] == LETTERS[seed % 4], "the input is not modified"


def test_shuffle_makes_a_skewed_generator_uniform():
    # A generator that always puts the right option first: after the shuffle every letter is near 1/4.
    letters = Counter(shuffle_options(item(answer="A"), seed=f"doc-{i}|0")["answer"] for i in range(2000))
    assert set(letters) == set(LETTERS)
    assert all(abs(n / 2000 - 0.25) < 0.04 for n in letters.values()), letters


def test_repair_balances_letters_on_a_small_dataset():
    # Ten records of four items whose right option is always first: each letter is right exactly ten
    # times, where independent shuffles would leave the shares to chance.
    records = [
        {
            "id": f"d-{n}",
            "context_mode": "contextual",
            "qa_multiple_choice": [item(answer="A") for _ in range(4)],
        }
        for n in range(10)
    ]
    repaired = [repair_multiple_choice(r, MultipleChoiceQuality())[0] for r in records]
    letters = Counter(i["answer"] for r in repaired for i in r["qa_multiple_choice"])
    assert letters == dict.fromkeys(LETTERS, 10)
    for r in repaired:
        for i in r["qa_multiple_choice"]:
            assert i["options"][LETTERS.index(i["answer"])] == item(answer="A")["options"][0]
    assert repaired == [repair_multiple_choice(r, MultipleChoiceQuality())[0] for r in records]


def test_shuffle_leaves_a_malformed_item_alone():
    bad = {"question": "Q?", "options": ["a", "b"], "answer": "A"}
    assert shuffle_options(bad, seed="x") == bad
    assert shuffle_options(item(answer="E"), seed="x") == item(answer="E")


def test_longest_and_length_tell():
    long_right = ["A tall red mug with a chipped handle", "Blue", "Green", "Grey"]
    assert is_longest(long_right, "A") and length_tell(long_right, "A", ratio=1.5)
    assert not is_longest(long_right, "B") and not length_tell(long_right, "B", ratio=1.5)
    close = ["Seven", "Four", "Two", "Six"]
    assert is_longest(close, "A") and not length_tell(close, "A", ratio=1.5)
    # Ties are not "the longest"; an empty other option does not divide by zero.
    assert not is_longest(["Red", "Tan", "Ox", "Ab"], "A")
    assert length_tell(["Red", "", "", ""], "A", ratio=2.0)


def test_only_overlap_uses_the_words_given():
    opts = ["The red mug", "A cup", "A jar", "A pan"]
    assert only_overlap("Which mug is red", opts, "A", words=lambda t: t.lower().split())
    assert not only_overlap("Which mug is red", opts, "B", words=lambda t: t.lower().split())
    assert not only_overlap("What is it", opts, "A", words=lambda t: t.lower().split())


def test_config_is_validated():
    with pytest.raises(ConfigError, match="longest_ratio"):
        MultipleChoiceQuality(longest_ratio=1.0)
    with pytest.raises(ConfigError, match="longest_ratio"):
        MultipleChoiceQuality(longest_ratio="2")


def test_repair_flags_always_and_drops_only_when_asked():
    rec = {
        "id": "d-0",
        "context_mode": "contextual",
        "qa_multiple_choice": [
            item(answer="A", options=["A tall red mug with a chipped handle", "Blue", "Green", "Grey"]),
            item(answer="B"),
        ],
    }
    kept, counts = repair_multiple_choice(rec, MultipleChoiceQuality())
    assert counts == Counter(length_flagged=1)
    assert len(kept["qa_multiple_choice"]) == 2
    assert rec["qa_multiple_choice"][1]["answer"] == "B", "the record is not modified"
    dropped, counts = repair_multiple_choice(rec, MultipleChoiceQuality(drop_flagged=True))
    assert counts == Counter(length_flagged=1, length_dropped=1)
    assert [i["options"][LETTERS.index(i["answer"])] for i in dropped["qa_multiple_choice"]] == ["Blue"]
    same, _ = repair_multiple_choice(rec, MultipleChoiceQuality(shuffle=False))
    assert same["qa_multiple_choice"] == rec["qa_multiple_choice"]


def test_parse_turn_reads_what_the_merge_writes():
    style = ConversationStyle.load()
    it = item(question="Two lines\nof question?")
    assert parse_turn(multiple_choice_turn(it, style)) == (it["question"], it["options"])
    assert parse_turn("just a question") is None
    assert parse_turn("Q?\nA. a\nB. b\nX. c\nD. d\nAnswer.") is None


def test_audit_counts_the_three_tells():
    audit = MultipleChoiceAudit(words=lambda t: t.lower().split(), ratio=1.5)
    audit.add("which mug is red", ["the red mug on the desk", "a cup", "a jar", "a pan"], "A")
    audit.add("how many", ["one", "two", "three", "four"], "B")
    audit.add("bad", ["one"], "A")  # not four options: not counted
    d = audit.to_dict()
    assert d["items"] == 2
    assert d["right_letter"] == {"A": 1, "B": 1, "C": 0, "D": 0}
    assert d["right_longest"] == 1 and d["right_only_overlap"] == 1 and d["length_flagged"] == 1


def test_build_shuffles_flags_drops_and_reports(quickstart_build, tmp_path):
    cfg = quickstart_build["config"]
    common = dict(
        generations=f"{cfg.work}/generations",
        cache=cfg.generate.cache,
        extra_caches=cfg.generate.extra_caches,
        image_store=f"{cfg.work}/contexts/images",
    )

    def merge(multiple_choice):
        return MergeConfig(configs=("contextual", "leaky"), multiple_choice=multiple_choice)

    plain = tmp_path / "plain"
    write_dataset(output=str(plain), merge=merge(MultipleChoiceQuality(shuffle=False)), **common)
    strict = tmp_path / "strict"
    # The bundled replies follow template v2 (options alike in length): a stricter ratio finds some.
    tight = MultipleChoiceQuality(drop_flagged=True, longest_ratio=1.2)
    write_dataset(output=str(strict), merge=merge(tight), **common)

    shuffled = compute_stats(quickstart_build["dataset"])["multiple_choice"]
    before = compute_stats(plain)["multiple_choice"]
    after = compute_stats(strict)["multiple_choice"]
    for config in ("contextual", "leaky"):
        shares = shuffled["configs"][config]["right_letter_share"]
        assert all(abs(s - 0.25) <= 0.05 for s in shares.values()), (config, shares)
    for stats in (shuffled, after):
        for config in ("contextual", "leaky"):
            shares = stats["configs"][config]["right_letter_share"]
            assert all(abs(s - 0.25) <= 0.1 for s in shares.values()), (config, shares)
    # The shuffle moves letters, not texts: the longest-option share stays; dropping flags lowers it.
    assert shuffled["configs"]["leaky"]["right_longest"] == before["configs"]["leaky"]["right_longest"]
    assert shuffled["repair"]["contextual"]["length_dropped"] == 0
    flagged = after["repair"]["contextual"]["length_flagged"]
    assert flagged > 0 and after["repair"]["contextual"]["length_dropped"] == flagged
    assert after["configs"]["leaky"]["items"] == before["configs"]["leaky"]["items"] - flagged
    assert after["configs"]["leaky"]["length_flagged"] == 0
    assert (
        after["configs"]["leaky"]["right_longest_share"] < before["configs"]["leaky"]["right_longest_share"]
    )
    info = json.loads((strict / BUILD_INFO).read_text())
    assert info["multiple_choice"]["config"] == {"drop_flagged": True, "longest_ratio": 1.2, "shuffle": True}
