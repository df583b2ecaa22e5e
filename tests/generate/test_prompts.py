import json

import pytest
import yaml

from viscon_hub.errors import ConfigError
from viscon_hub.generate import prompts
from viscon_hub.generate.parsers import parse_freeform, parse_multiple_choice
from viscon_hub.generate.prompts import context_fields, load_template, prompt_dirs
from viscon_hub.records import ImageContext

STAGES = {
    "contextual_caption": "caption_contextual",
    "non_contextual_caption": "caption_non_contextual",
    "qa_freeform": "qa_freeform",
    "qa_multiple_choice": "qa_multiple_choice",
}
PARSERS = {"qa_freeform": parse_freeform, "qa_multiple_choice": parse_multiple_choice}
FIELDS = {
    "contextual_caption": {
        "page_url": "https://example.org/p",
        "alt_text": "none",
        "context": "A. <image> B.",
    },
    "non_contextual_caption": {},
    "qa_freeform": {"caption": "A blue bicycle leans on a wall."},
    "qa_multiple_choice": {"caption": "A blue bicycle leans on a wall."},
}


def image_context(**kw):
    values = dict(
        id="d-0",
        document_id="d",
        image_index=0,
        page_url="https://example.org/p",
        image_url=None,
        image_path="/x.jpg",
        image_bytes=None,
        alt_text=None,
        context="Intro {not a field}\n\n<image>\n\nMore text\n\n<another-image>",
        context_tokens=3,
    )
    values.update(kw)
    return ImageContext(**values)


@pytest.mark.parametrize("name", STAGES)
def test_every_template_loads(name):
    t = load_template(name)
    assert t.id == name and t.stage == STAGES[name] and t.version >= 1 and t.description.strip()
    assert t.key_fields() == {"id": name, "version": t.version} and t.label == f"{name}@{t.version}"
    assert (
        t.sampling["max_tokens"] > 0 and 0 <= t.sampling["temperature"] <= 2 and 0 < t.sampling["top_p"] <= 1
    )
    assert hash(t) == hash(load_template(name)) and t == load_template(name)
    assert t.fields == set(FIELDS[name])


@pytest.mark.parametrize("name", STAGES)
def test_every_template_renders_json_ready_messages(name):
    t = load_template(name)
    msgs = t.render(**FIELDS[name])
    json.dumps(msgs)  # messages enter the request key as canonical JSON
    roles = [m["role"] for m in msgs]
    assert roles == ["system"] + ["user", "assistant"] * len(t.few_shot) + ["user"]
    assert msgs[0]["content"] == t.system
    msgs[-1]["content"] = "edited by a caller"
    assert t.render(**FIELDS[name])[-1]["content"] != "edited by a caller"


@pytest.mark.parametrize(
    ("name", "index"), [(name, i) for name in PARSERS for i in range(len(load_template(name).few_shot))]
)
def test_few_shot_replies_parse_cleanly(name, index):
    t = load_template(name)
    example = t.few_shot[index]
    result = PARSERS[name](example["reply"])
    assert result.ok, result.reason
    assert not result.dropped_items and not result.truncated and 3 <= len(result.items) <= 5
    assert set(example) == {"caption", "reply"}


@pytest.mark.parametrize("name", PARSERS)
def test_qa_templates_have_two_few_shot_examples_with_varied_content(name):
    t = load_template(name)
    assert len(t.few_shot) >= 2
    assert len({e["caption"] for e in t.few_shot}) == len(t.few_shot)
    if name == "qa_multiple_choice":
        letters = [i.answer for e in t.few_shot for i in parse_multiple_choice(e["reply"]).items]
        assert set(letters) == {"A", "B", "C", "D"}  # the examples must not teach one favourite letter


def test_qa_render_puts_examples_before_the_request():
    t = load_template("qa_freeform")
    msgs = t.render(caption="A blue bicycle.")
    assert isinstance(msgs[-1]["content"], str) and "A blue bicycle." in msgs[-1]["content"]
    assert t.few_shot[0]["caption"] in msgs[1]["content"] and msgs[2]["content"] == t.few_shot[0]["reply"]
    assert "{caption}" not in json.dumps(msgs)


def test_contextual_caption_has_exactly_one_image_part_and_the_context():
    ctx = image_context(alt_text=None)
    msgs = load_template("contextual_caption").render(**context_fields(ctx))
    final = msgs[-1]["content"]
    assert [p["type"] for p in final] == ["image", "text"]
    assert sum(isinstance(m["content"], list) for m in msgs) == 1  # the image goes in the final message only
    text = final[1]["text"]
    assert "https://example.org/p" in text and "none" in text
    assert ctx.context in text  # braces in the page text are data, not fields


def test_non_contextual_caption_has_no_web_context():
    msgs = load_template("non_contextual_caption").render()
    assert [p["type"] for p in msgs[-1]["content"]] == ["image", "text"]
    assert "example.org" not in json.dumps(msgs) and "<another-image>" not in json.dumps(msgs)


def test_prompt_texts_route_in_the_test_server():
    # tests/servers/openai_server.py picks its canned reply by the identifiers in system + last user text.
    texts = {name: load_template(name).system + load_template(name).user for name in STAGES}
    for name in ("contextual_caption", "non_contextual_caption"):
        assert "<Human>" not in texts[name] and "<Options>" not in texts[name]
    assert "<Human>" in texts["qa_freeform"] and "<Options>" not in texts["qa_freeform"]
    assert "<Options>" in texts["qa_multiple_choice"]


@pytest.mark.parametrize(
    ("name", "fields", "match"),
    [
        ("qa_freeform", {}, "caption"),
        ("qa_multiple_choice", {"caption": None}, "caption"),
        ("contextual_caption", {"page_url": "u", "alt_text": "none"}, "context"),
        ("qa_freeform", {"caption": "c", "captoin": "typo"}, "captoin"),
        ("non_contextual_caption", {"context": "c"}, "context"),
    ],
)
def test_missing_or_foreign_field_is_a_config_error(name, fields, match):
    with pytest.raises(ConfigError, match=match):
        load_template(name).render(**fields)


@pytest.mark.parametrize(
    ("alt", "page_url", "expected_alt", "expected_url"),
    [
        (None, None, "none", "unknown"),
        ("", "https://e.org", "none", "https://e.org"),
        ("  \n ", "https://e.org", "none", "https://e.org"),
        ("A red\n  kite", "https://e.org", "A red kite", "https://e.org"),
    ],
)
def test_context_fields(alt, page_url, expected_alt, expected_url):
    fields = context_fields(image_context(alt_text=alt, page_url=page_url))
    assert fields == {"page_url": expected_url, "alt_text": expected_alt, "context": image_context().context}


BASE = {
    "id": "bad",
    "version": 1,
    "stage": "qa_freeform",
    "description": "d",
    "system": "s",
    "user": "Describe: {caption}",
    "few_shot": [{"caption": "c", "reply": "r"}],
    "sampling": {"temperature": 0.5, "top_p": 1.0, "max_tokens": 10},
}


def _drop(key):
    return lambda d: d.pop(key)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(user="Use {caption} and {secret}"), r"\{secret\}.*provides \{caption\}"),
        (lambda d: d.update(user="Use {}"), r"uses \{\}"),
        (lambda d: d.update(user="Use {caption!r}"), "plain fields only"),
        (lambda d: d.update(user="Use {caption.upper}"), "caption.upper"),
        (lambda d: d.update(user="Use {caption"), "malformed"),
        (lambda d: d.update(user="   "), "user must be non-empty"),
        (lambda d: d.update(version=0), "version must be an integer >= 1; got 0"),
        (lambda d: d.update(version="1"), "version must be an integer; got str"),
        (lambda d: d.update(version=True), "version must be an integer; got bool"),
        (lambda d: d.update(stage="dancing"), "stage must be one of .*got 'dancing'"),
        (_drop("system"), r"missing key\(s\) \['system'\]"),
        (_drop("sampling"), r"missing key\(s\) \['sampling'\]"),
        (lambda d: d.update(few_shots=[]), r"unknown key\(s\) \['few_shots'\]"),
        (lambda d: d.update(id="other"), "id must equal the file's stem 'bad'; got 'other'"),
        (lambda d: d.update(few_shot=[{"caption": "c"}]), r"few_shot\[0\] must have keys"),
        (
            lambda d: d.update(few_shot=[{"reply": "r"}]),
            r"few_shot\[0\] must give the field\(s\) \['caption'\]",
        ),
        (lambda d: d.update(few_shot=[{"caption": "c", "reply": "r", "mood": "x"}]), "mood"),
        (lambda d: d.update(few_shot=[{"caption": "c", "reply": ""}]), "non-empty text"),
        (lambda d: d.update(few_shot="not a list"), "few_shot must be a list"),
        (lambda d: d.update(stage="caption_non_contextual", user="Describe."), "few_shot is for Q&A stages"),
        (lambda d: d["sampling"].update(temprature=0.1), r"unknown sampling key\(s\) \['temprature'\]"),
        (lambda d: d["sampling"].update(temperature=9), "temperature must be a number in"),
        (lambda d: d["sampling"].update(top_p=0), "top_p must be a number in"),
        (lambda d: d["sampling"].update(max_tokens=1.5), "max_tokens must be an integer > 0"),
        (lambda d: d["sampling"].pop("max_tokens"), "must set max_tokens"),
    ],
)
def test_bad_template_file_is_a_config_error_naming_the_file(tmp_path, change, match):
    data = json.loads(json.dumps(BASE))
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(ConfigError, match=match) as info:
        load_template(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("body", "match"), [("[1, 2]", "expected a mapping"), ("id: [unclosed", "not valid YAML")]
)
def test_unreadable_template_file(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_template(path)


def test_valid_custom_template_by_path_and_by_name(tmp_path, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "id": "bad"}))
    assert load_template(path).render(caption="x")[-1]["content"] == "Describe: x"
    assert load_template(str(path)).path == str(path)
    monkeypatch.setenv("VISCON_PROMPTS", str(tmp_path))
    assert prompt_dirs() == [tmp_path]
    assert load_template("bad").path == str(path)
    with pytest.raises(ConfigError, match="not found"):
        load_template("qa_freeform")  # VISCON_PROMPTS replaces the built-in folders


def test_prompts_env_must_be_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VISCON_PROMPTS", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="VISCON_PROMPTS"):
        load_template("qa_freeform")


def test_package_data_prompts_come_before_the_repository(tmp_path, monkeypatch):
    package = tmp_path / "viscon_hub"
    (package / "data" / "prompts").mkdir(parents=True)
    (package / "data" / "prompts" / "bad.yaml").write_text(yaml.safe_dump(BASE))
    monkeypatch.delenv("VISCON_PROMPTS", raising=False)
    monkeypatch.delenv("VISCON_CONFIGS", raising=False)
    monkeypatch.setattr(prompts, "_PACKAGE", package)
    dirs = prompt_dirs()
    assert dirs[0] == package / "data" / "prompts" and dirs[-1].parts[-2:] == ("configs", "prompts")
    assert load_template("bad").id == "bad"
    assert load_template("qa_freeform").path.endswith("configs/prompts/qa_freeform.yaml")


@pytest.mark.parametrize("name", ["no_such_template", "qa_freeform.yaml", "nowhere/qa_freeform"])
def test_unknown_template(name):
    with pytest.raises(ConfigError, match="not found|does not exist"):
        load_template(name)
