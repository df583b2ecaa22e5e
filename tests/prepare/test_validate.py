import json
import os

import pytest

from tests.conftest import good_row
from viscon_hub.prepare.readers import RawRow
from viscon_hub.prepare.validate import DROP_REASONS, END_OF_DOCUMENT, parse_row


def parse(data, **kw):
    return parse_row(RawRow(data=data, source="test", row=0, **kw))


def test_good_row_parses():
    doc, reason = parse(good_row(1, images=2))
    assert reason is None
    assert doc.url == "https://example.org/page-1"
    assert [s.url for s in doc.images if s] == [
        "https://example.org/img-1-0.jpg",
        "https://example.org/img-1-1.jpg",
    ]
    assert doc.image_positions == [1, 2]
    assert doc.text == "Intro paragraph 1.\n\nClosing paragraph 1."
    assert len(doc.id) == 20


def test_document_id_is_stable_and_content_based():
    a, _ = parse(good_row(1))
    b, _ = parse(good_row(1))
    c, _ = parse(good_row(2))
    assert a.id == b.id != c.id


def mutate(**changes):
    row = good_row(0)
    row.update(changes)
    return row


BAD = {
    "length_mismatch": mutate(texts=["only one"]),
    "metadata_not_json": mutate(metadata="{not json"),
    "metadata_not_list": mutate(metadata=json.dumps({"a": 1})),
    "general_metadata_not_json": mutate(general_metadata="nope{"),
    "image_without_url": mutate(images=[None, None, None]),
    "no_image": {"images": [None], "texts": ["text"], "metadata": "[null]", "general_metadata": "{}"},
    "no_text": {
        "images": ["https://example.org/a.jpg"],
        "texts": [None],
        "metadata": json.dumps([{"src": "x"}]),
        "general_metadata": "{}",
    },
    "empty_document": {"images": [], "texts": [], "metadata": "[]", "general_metadata": "{}"},
    "wrong_type": mutate(texts="a string, not a list"),
    "null_text": {
        "images": [None, "https://example.org/a.jpg"],
        "texts": [None, None],
        "metadata": json.dumps([None, {"src": "x"}]),
        "general_metadata": "{}",
    },
    "missing_column": {"images": [None], "metadata": "[null]"},
    "text_and_image_at_one_position": mutate(texts=["a", "b", "c"]),
    "bad_image_reference": mutate(images=[None, "data:image/png;base64,@@@", None]),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_malformed_rows_are_dropped_with_their_reason(reason):
    doc, got = parse(BAD[reason])
    assert doc is None
    assert got == reason
    assert got in DROP_REASONS


@pytest.mark.parametrize(
    "row",
    [
        mutate(texts=[1, None, "x"]),
        mutate(images=[None, 42, None]),
        mutate(metadata=json.dumps([None, "not a dict", None])),
        mutate(images={"a": 1}),
    ],
)
def test_wrong_types(row):
    assert parse(row) == (None, "wrong_type")


def test_only_end_of_document_marker_is_an_empty_document():
    row = {
        "images": ["https://example.org/a.jpg", None],
        "texts": [None, END_OF_DOCUMENT],
        "metadata": json.dumps([{"src": "x"}, None]),
        "general_metadata": "{}",
    }
    assert parse(row) == (None, "no_text")


def test_end_of_document_marker_is_stripped_and_texts_merge():
    row = {
        "images": [None, None, "https://example.org/a.jpg", None],
        "texts": ["First.", END_OF_DOCUMENT, None, f"Second.\n\n{END_OF_DOCUMENT}\n\nThird."],
        "metadata": json.dumps([None, None, {"src": "x"}, None]),
        "general_metadata": "{}",
    }
    doc, reason = parse(row)
    assert reason is None
    assert END_OF_DOCUMENT not in doc.text
    assert doc.texts == ["First.", None, "Second.\n\nThird."]


def test_unreadable_line_is_a_drop():
    assert parse_row(RawRow(data=None, source="f", row=3, error="invalid_json: Expecting value")) == (
        None,
        "invalid_json",
    )
    assert parse_row(RawRow(data=None, source="f", row=3, error="not_a_mapping")) == (None, "not_a_mapping")


def test_image_references_of_every_kind(tmp_path):
    import base64

    payload = base64.b64encode(b"\x89PNG fake").decode()
    row = mutate(images=[None, f"data:image/png;base64,{payload}", None])
    doc, _ = parse(row)
    assert doc.images[1].data == b"\x89PNG fake"
    doc, _ = parse(mutate(images=[None, "images/x.jpg", None]), base="/data/corpus")
    assert doc.images[1].path == "/data/corpus/images/x.jpg"
    doc, _ = parse(mutate(images=[None, {"bytes": b"abc", "path": None}, None]))
    assert doc.images[1].data == b"abc"
    root = os.path.realpath(tmp_path)
    doc, _ = parse_row(
        RawRow(data=mutate(images=[None, f"file://{root}/a.png", None]), source="t", row=0),
        image_roots=(str(tmp_path),),
    )
    assert doc.images[1].path == f"{root}/a.png"
    # Without a root that holds it, a file:// reference is refused.
    assert parse(mutate(images=[None, f"file://{root}/a.png", None]))[1] == "image_outside_root"


def test_real_obelics_row_with_optional_keys_missing(obelics_row_fixture):
    row = dict(obelics_row_fixture)
    # The notebook did not print `texts`: as shipped, the row is missing a column and is dropped.
    assert parse(row) == (None, "missing_column")
    # Its shape was [text, image, text]; put texts back and it parses, optional keys absent.
    row["texts"] = ["Influencing factors on entrepreneurship.", None, "Read the full journal article."]
    doc, reason = parse(row)
    assert reason is None
    assert doc.url.startswith("https://slidelegend.com/the-influencing-factors")
    assert doc.general_metadata["warc_record_length"] == 14280
    assert doc.images[1].url.endswith("div_59c212ac1723dd1242167485.jpg")
    meta = doc.image_metadata[1]
    assert "alt_text" not in meta and "rendered_height" not in meta
    assert meta["original_width"] == 626
