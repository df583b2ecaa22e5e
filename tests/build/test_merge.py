import pytest

from viscon_hub.build.layout import (
    ALL_CONFIGS,
    MIXES,
    assign_splits,
    config_mix,
    config_mode,
    configs_metadata,
    data_path,
    parse_configs,
    split_score,
)
from viscon_hub.build.merge import ConversationStyle, mix_rows, per_image_row, public_source, qa_rounds
from viscon_hub.errors import ConfigError


@pytest.fixture(scope="module")
def style():
    return ConversationStyle.load()


def record(rid="doc-0", mode="contextual", *, ff=3, mc=2, caption="A red mug on a desk."):
    return {
        "id": rid,
        "document_id": rid.split("-")[0],
        "image_index": 0,
        "page_url": f"https://example.org/{rid}",
        "context_mode": mode,
        "caption": caption,
        "image_sha256": "ab" * 32,
        "qa_freeform": [{"question": f"Free question {i}?", "answer": f"Answer {i}."} for i in range(ff)],
        "qa_multiple_choice": [
            {"question": f"Choice question {i}?", "options": ["w", "x", "y", "z"], "answer": "ABCD"[i % 4]}
            for i in range(mc)
        ],
        "provenance": '{"image_metadata": {"src": "https://example.org/a.jpg"}}',
        "source": "/home/someone/private/obelics.parquet",
    }


def test_config_names_follow_method():
    assert set(MIXES) == {"captions_only", "qa_only", "leaky", "split"}
    assert "non_contextual_leaky" in ALL_CONFIGS and len(ALL_CONFIGS) == 10
    assert config_mode("non_contextual_split") == "non_contextual" and config_mix("split") == "split"
    with pytest.raises(ConfigError, match="unknown config"):
        config_mode("leaky_idefics")
    assert parse_configs("all") == ALL_CONFIGS
    assert parse_configs("leaky, contextual") == ("contextual", "leaky")
    with pytest.raises(ConfigError):
        parse_configs(" , ")
    with pytest.raises(ConfigError, match="unknown split"):
        data_path("leaky", "validation")


def test_configs_metadata_marks_leaky_default():
    meta = configs_metadata(["contextual", "leaky"])
    assert [m["config_name"] for m in meta] == ["contextual", "leaky"]
    assert [m.get("default", False) for m in meta] == [False, True]
    assert meta[1]["data_files"] == [
        {"split": "train", "path": "leaky/train-*.parquet"},
        {"split": "test", "path": "leaky/test-*.parquet"},
    ]
    assert configs_metadata(["qa_only"])[0]["default"] is True


def test_split_is_a_function_of_the_page():
    pages = {f"https://example.org/{i}": split_score(f"https://example.org/{i}", str(i)) for i in range(5000)}
    splits = assign_splits(pages, 0.02)
    share = sum(s == "test" for s in splits.values()) / len(splits)
    assert 0.01 < share < 0.03
    # Same page, same split, whatever else is present.
    subset = dict(list(pages.items())[:2500])
    sub_splits = assign_splits(subset, 0.02)
    if "test" in [splits[k] for k in subset]:
        assert all(sub_splits[k] == splits[k] for k in subset)


def test_small_data_still_gets_a_test_page():
    pages = {"a": 0.9, "b": 0.5, "c": 0.7}
    assert assign_splits(pages, 0.02) == {"a": "train", "b": "test", "c": "train"}
    assert assign_splits(pages, 0.0) == dict.fromkeys(pages, "train")
    assert assign_splits({"a": 0.9}, 0.02) == {"a": "train"}
    with pytest.raises(ConfigError):
        assign_splits(pages, 1.5)


def test_leaky_has_caption_then_qa_of_same_image(style):
    (row,) = mix_rows(record(), "leaky", style=style, image={"bytes": b"x", "path": "a.jpg"})
    assert row["round_types"][0] == "caption"
    assert sorted(row["round_types"][1:]) == ["freeform"] * 3 + ["multiple_choice"] * 2
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["user", "assistant"] * 6
    assert row["messages"][1]["content"] == "A red mug on a desk."
    caption_instruction = row["messages"][0]["content"]
    assert any(caption_instruction.startswith(s) for s in style.caption_instructions)
    assert any(caption_instruction.endswith(s) for s in style.context_instructions)


def test_non_contextual_caption_round_has_no_context_instruction(style):
    (row,) = mix_rows(record(mode="non_contextual"), "captions_only", style=style, image=None)
    assert row["messages"][0]["content"] in style.caption_instructions
    assert row["round_types"] == ["caption"]


def test_qa_only_and_split(style):
    rec = record()
    (qa,) = mix_rows(rec, "qa_only", style=style, image=None)
    assert "caption" not in qa["round_types"] and len(qa["round_types"]) == 5
    cap, qa2 = mix_rows(rec, "split", style=style, image=None)
    assert (cap["id"], qa2["id"]) == ("doc-0-caption", "doc-0-qa")
    assert cap["round_types"] == ["caption"] and qa2["messages"] == qa["messages"]
    (leaky,) = mix_rows(rec, "leaky", style=style, image=None)
    assert leaky["messages"][2:] == qa["messages"], "leaky and qa_only show the same rounds in the same order"


def test_multiple_choice_turn_shows_options_and_answer_is_a_letter(style):
    (row,) = mix_rows(record(ff=0, mc=3), "qa_only", style=style, image=None)
    for user, assistant in zip(row["messages"][::2], row["messages"][1::2], strict=True):
        assert "\nA. w\nB. x\nC. y\nD. z\n" in user["content"]
        assert user["content"].endswith(style.multiple_choice_instruction)
        assert assistant["content"] in {"A", "B", "C", "D"}


def test_bad_multiple_choice_item_is_refused(style):
    rec = record(ff=1, mc=1)
    rec["qa_multiple_choice"][0]["answer"] = "E"
    with pytest.raises(ValueError, match="A-D"):
        qa_rounds(rec, style)


def test_choices_are_seeded_by_sample_id(style):
    a = mix_rows(record("doc-1", ff=5, mc=4), "leaky", style=style, image=None)
    b = mix_rows(record("doc-1", ff=5, mc=4), "leaky", style=style, image=None)
    assert a == b
    orders = {
        tuple(mix_rows(record(f"doc-{i}", ff=5, mc=4), "leaky", style=style, image=None)[0]["round_types"])
        for i in range(20)
    }
    assert len(orders) > 5, "different samples get different shuffles"


def test_empty_rounds_make_no_rows(style):
    no_qa = record(ff=0, mc=0)
    assert mix_rows(no_qa, "leaky", style=style, image=None) == []
    assert mix_rows(no_qa, "qa_only", style=style, image=None) == []
    assert mix_rows(no_qa, "split", style=style, image=None) == []
    assert len(mix_rows(no_qa, "captions_only", style=style, image=None)) == 1
    with pytest.raises(ConfigError):
        mix_rows(no_qa, "contextual", style=style, image=None)


def test_per_image_row_counts_dedup_and_hides_local_paths():
    row = per_image_row(record(ff=2, mc=2), image=None, questions_generated=6)
    assert row["questions_removed_by_dedup"] == 2
    assert row["source_url"] == "https://example.org/doc-0"
    assert "/home/someone" not in row["provenance"] and "obelics.parquet" in row["provenance"]
    assert public_source("HuggingFaceM4/OBELICS") == "HuggingFaceM4/OBELICS"


def test_style_file_errors_are_config_errors(tmp_path):
    bad = tmp_path / "style.yaml"
    bad.write_text(
        "version: 1\ncaption_instructions: []\ncontext_instructions: [x]\nmultiple_choice_instruction: y\n"
    )
    with pytest.raises(ConfigError):
        ConversationStyle.load(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        ConversationStyle.load(str(tmp_path / "missing.yaml"))


def test_mix_columns_and_generation_page_columns_are_disjoint():
    from viscon_hub.build.merge import MIX_COLUMNS
    from viscon_hub.records import GENERATION_PAGE_COLUMNS

    assert not set(MIX_COLUMNS) & set(GENERATION_PAGE_COLUMNS)
