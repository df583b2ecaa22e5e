import pytest

from viscon_hub.errors import ConfigError
from viscon_hub.generate.parsers import parse_freeform, parse_multiple_choice
from viscon_hub.generate.prompts import context_fields, load_template
from viscon_hub.records import ImageContext

NAMES = ["contextual_caption", "non_contextual_caption", "qa_freeform", "qa_multiple_choice"]


@pytest.mark.parametrize("name", NAMES)
def test_every_template_loads_with_id_version_and_sampling(name):
    t = load_template(name)
    assert t.id == name and t.version >= 1 and t.sampling["max_tokens"] > 0
    assert t.key_fields() == {"id": name, "version": t.version}


def test_few_shot_examples_are_valid_replies():
    for name, parser in (("qa_freeform", parse_freeform), ("qa_multiple_choice", parse_multiple_choice)):
        t = load_template(name)
        assert len(t.few_shot) >= 2
        for example in t.few_shot:
            result = parser(example["reply"])
            assert result.ok and not result.dropped_items and not result.truncated, (name, result.reason)


def test_caption_render_has_one_image_and_the_context():
    ctx = ImageContext(id="d-0", document_id="d", image_index=0, page_url="https://example.org/p",
                       image_url=None, image_path="/x.jpg", image_bytes=None, alt_text=None,
                       context="Intro\n\n<image>\n\n<another-image>", context_tokens=3)
    msgs = load_template("contextual_caption").render(**context_fields(ctx))
    final = msgs[-1]["content"]
    assert sum(p["type"] == "image" for p in final) == 1
    text = final[1]["text"]
    assert "https://example.org/p" in text and "<another-image>" in text and "none" in text
    plain = load_template("non_contextual_caption").render()
    assert "example.org" not in str(plain)


def test_qa_render_puts_few_shot_before_the_request():
    msgs = load_template("qa_freeform").render(caption="A blue bicycle.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "A blue bicycle." in msgs[-1]["content"]


def test_missing_field_is_a_config_error():
    with pytest.raises(ConfigError, match="caption"):
        load_template("qa_freeform").render()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("id: x\nversion: 1\nstage: qa_freeform\nsystem: s\nuser: 'Use {caption} and {secret}'\n", "secret"),
        ("id: x\nversion: 0\nstage: qa_freeform\nsystem: s\nuser: '{caption}'\n", "version"),
        ("id: x\nversion: 1\nstage: dancing\nsystem: s\nuser: u\n", "stage"),
        ("id: x\nstage: qa_freeform\nsystem: s\nuser: u\n", "missing"),
        ("[1, 2]", "mapping"),
        ("id: x\nversion: 1\nstage: qa_freeform\nsystem: s\nuser: '{caption}'\nfew_shot: [{reply: r}]\n", "caption"),
    ],
)
def test_bad_template_files(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_template(path)


def test_unknown_template_name():
    with pytest.raises(ConfigError, match="not found"):
        load_template("no_such_template")
