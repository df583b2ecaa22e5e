from tests.conftest import good_row
from viscon_hub.prepare.contexts import extract_contexts
from viscon_hub.prepare.readers import RawRow
from viscon_hub.prepare.validate import parse_row
from viscon_hub.records import IMAGE_CONTEXT_SCHEMA, IMAGE_PLACEHOLDER, OTHER_IMAGE_PLACEHOLDER, ImageContext


def doc_with(images):
    doc, _ = parse_row(RawRow(data=good_row(7, images=images), source="s", row=4))
    doc.text_tokens = 11
    return doc


def test_one_context_per_image_with_placeholders():
    contexts = extract_contexts(doc_with(3))
    assert [c.image_index for c in contexts] == [0, 1, 2]
    for c in contexts:
        assert c.context.count(IMAGE_PLACEHOLDER) == 1
        assert c.context.count(OTHER_IMAGE_PLACEHOLDER) == 2
        assert c.context.startswith("Intro paragraph 7.") and c.context.endswith("Closing paragraph 7.")
        assert c.context_tokens == 11
        assert c.page_url == "https://example.org/page-7"
    assert contexts[1].context.split("\n\n")[2] == IMAGE_PLACEHOLDER
    assert contexts[1].alt_text == "alt 1"
    assert contexts[2].image_url == "https://example.org/img-7-2.jpg"
    assert len({c.id for c in contexts}) == 3


def test_cap_on_images_per_document_keeps_all_placeholders():
    contexts = extract_contexts(doc_with(4), max_images=2)
    assert len(contexts) == 2
    assert contexts[0].context.count(OTHER_IMAGE_PLACEHOLDER) == 3


def test_provenance_and_row_round_trip():
    ctx = extract_contexts(doc_with(1))[0]
    assert ctx.provenance["source"] == "s" and ctx.provenance["row"] == 4
    assert ctx.provenance["warc_filename"] == "w"
    row = ctx.to_row()
    assert list(row) == IMAGE_CONTEXT_SCHEMA.names
    assert ImageContext.from_row(row) == ctx
