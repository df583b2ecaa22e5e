"""Statistics of a built folder: the word-overlap definition, every figure on known rows, plots."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from viscon_hub.build.layout import BUILD_INFO, data_path, features_for
from viscon_hub.publish import stats as S
from viscon_hub.publish.stats import (
    STOPWORDS,
    compute_stats,
    content_words,
    overlap_ratio,
    words,
    write_plots,
    write_stats,
)


def _png(width: int = 4, height: int = 3) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def per_image_row(
    i: int,
    *,
    mode: str = "contextual",
    caption: str = "A red cup.",
    context: str = "A red cup on a table. <image>",
    context_tokens: int = 100,
    freeform: int = 4,
    multiple_choice: int = 4,
    answer: str = "It is red.",
    width: int = 400,
    height: int = 300,
    generated: int | None = None,
    model: str = "openai:gpt-4o",
) -> dict:
    ff = [{"question": f"Q{k} of {i}?", "answer": answer} for k in range(freeform)]
    mc = [
        {"question": f"MC{k} of {i}?", "options": ["a", "b", "c", "d"], "answer": "B"}
        for k in range(multiple_choice)
    ]
    generated = freeform + multiple_choice if generated is None else generated
    return {
        "id": f"doc{i}-0",
        "image": {"bytes": _png(), "path": f"img{i}.png"},
        "image_sha256": f"{i:064x}",
        "width": width,
        "height": height,
        "source_url": f"https://example.org/p{i}",
        "image_url": None,
        "alt_text": None,
        "context": context,
        "context_tokens": context_tokens,
        "context_mode": mode,
        "caption": caption,
        "qa_freeform": ff,
        "qa_multiple_choice": mc,
        "questions_generated": generated,
        "questions_removed_by_dedup": generated - freeform - multiple_choice,
        "caption_model": model.split(":")[-1],
        "qa_model": model.split(":")[-1],
        "caption_template": f"{mode}_caption@1",
        "qa_freeform_template": "qa_freeform@1",
        "qa_multiple_choice_template": "qa_multiple_choice@1",
        "provenance": "{}",
    }


def mix_row(i: int, *, mode: str = "contextual") -> dict:
    return {
        "id": f"doc{i}-0",
        "image": {"bytes": _png(), "path": f"img{i}.png"},
        "image_sha256": f"{i:064x}",
        "source_url": f"https://example.org/p{i}",
        "context_mode": mode,
        "messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A cup."}],
        "round_types": ["caption"],
    }


def build_info(rows: dict[str, dict[str, int]], *, model: str = "openai:gpt-4o", **over) -> dict:
    """A viscon_build.json shaped like build.write_dataset's."""
    info = {
        "viscon_hub_version": "0.1.0",
        "configs": list(rows),
        "default_config": "leaky" if "leaky" in rows else next(iter(rows)),
        "rows": rows,
        "test_fraction": 0.02,
        "pages": {"test": 1, "train": 2},
        "dropped": {
            "generate": {"contextual": {"unparseable_qa": 2}},
            "merge": {"contextual": {"image_missing": 1}},
        },
        "dedup": {
            "contextual": {
                "model": "WhereIsAI/UAE-Large-V1",
                "fell_back": False,
                "threshold": 0.9,
                "questions_in": 23,
                "questions_kept": 22,
                "removed": 1,
                "images": 3,
                "engine": {"requests": 23, "unique": 23},
            }
        },
        "conversation_style": 1,
        "generation": {
            "caption_model": model,
            "qa_model": model,
            "context": "contextual",
            "records": 4,
            "records_ok": 3,
        },
        "source": "HuggingFaceM4/OBELICS",
        "source_revision": "abc123",
        "templates": ["contextual_caption@1", "qa_freeform@1", "qa_multiple_choice@1"],
        "usage": {
            "gpt-4o": {"replies": 9, "prompt_tokens": 9000, "completion_tokens": 1200, "cost_usd": 0.0345},
        },
    }
    info.update(over)
    return info


def write_folder(
    root: Path, configs: dict[str, dict[str, list[dict]]], info: dict | None = None, **info_kwargs
) -> Path:
    """A built folder written the way build.py writes one: Features' Arrow schema, data_path layout.

    ``info`` None writes a ``build_info`` of the rows (``info_kwargs`` passed on); ``{}`` writes none.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = {}
    for config, splits in configs.items():
        schema = features_for(config).arrow_schema
        rows[config] = {}
        for split, items in splits.items():
            path = root / data_path(config, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(items, schema=schema), path, row_group_size=2)
            rows[config][split] = len(items)
    info = build_info(rows, **info_kwargs) if info is None else info
    if info:
        (root / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return root


def known_folder(root: Path, *, model: str = "openai:gpt-4o", **info_kwargs) -> Path:
    """Four contextual rows with figures worked out by hand in the tests below."""
    ctx = [
        per_image_row(
            0,
            caption="The red cup and a spoon.",
            context="A red cup with a spoon. <image>",
            context_tokens=100,
            answer="one two three",
            width=400,
            height=300,
            model=model,
        ),
        per_image_row(
            1,
            caption="Blue kite",
            context="A red car. <another-image> <image>",
            context_tokens=200,
            answer="one two three four five",
            width=800,
            height=600,
            generated=9,
            model=model,
        ),
        per_image_row(
            2,
            caption="Running dogs at a museum",
            context="A dog runs to the museum.",
            context_tokens=300,
            freeform=3,
            answer="a",
            width=1000,
            height=500,
            model=model,
        ),
        per_image_row(
            3,
            caption="Unknown tokens",
            context="Unknown tokens here.",
            context_tokens=-1,
            answer="x y",
            width=100,
            height=100,
            model=model,
        ),
    ]
    non_ctx = [
        per_image_row(
            i,
            mode="non_contextual",
            caption="A cup on a wooden table seen from above",
            context="A red cup. <image>",
            model=model,
        )
        for i in range(2)
    ]
    configs = {
        "contextual": {"train": ctx[:3], "test": ctx[3:]},
        "non_contextual": {"train": non_ctx},
        "leaky": {"train": [mix_row(i) for i in range(3)], "test": [mix_row(3)]},
    }
    return write_folder(root, configs, model=model, **info_kwargs)


# --- words and overlap --------------------------------------------------------------------------


def test_words_lowercase_and_keep_inner_apostrophes():
    assert words("Hello, World! Don\u2019t STOP 1920s") == ["hello", "world", "don't", "stop", "1920s"]
    assert words(None) == [] and words("") == []


def test_content_words_drop_stopwords_and_single_letters():
    assert content_words("The cat and a dog, x y z, are on THE mat") == ["cat", "dog", "mat"]


def test_stopword_list_is_ours_and_sane():
    assert isinstance(STOPWORDS, frozenset) and len(STOPWORDS) > 150
    assert all(w == w.lower() and " " not in w for w in STOPWORDS)
    assert {"the", "and", "of", "is", "don't", "themselves"} <= STOPWORDS
    # Words the paper's word cloud shows as frequent caption words are content, not stopwords.
    assert not {"one", "white", "right", "scene", "red", "image"} & STOPWORDS


def test_overlap_caption_inside_context_is_one():
    context = "In 1969 the crew of Apollo 11 photographed the Earth rising over the Moon."
    assert overlap_ratio("Apollo 11 photographed the Earth", context) == 1.0


def test_overlap_ignores_stopwords():
    # Only "cat" and "dog" count; the stopwords are absent from the context but do not lower the score.
    assert overlap_ratio("The cat and the dog are there with us", "cat dog") == 1.0


def test_overlap_matches_stems():
    assert overlap_ratio("Running dogs photographed", "A dog runs; a photograph.") == 1.0


def test_overlap_counts_caption_repeats_over_caption_length():
    assert overlap_ratio("red red blue", "red") == pytest.approx(2 / 3)
    assert overlap_ratio("blue kite", "red car") == 0.0


def test_overlap_ignores_image_placeholders():
    assert overlap_ratio("image", "Text <image> and <another-image> more") == 0.0
    assert overlap_ratio("another image", "<another-image>") == 0.0


def test_overlap_undefined_without_content_words():
    assert overlap_ratio("The and of a", "anything") is None
    assert overlap_ratio("", "anything") is None


def test_stemmer_memoises():
    stem = S.Stemmer()
    assert stem("running") == stem("runs") == "run"
    assert "running" in stem._memo


# --- figures on a known folder -----------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    return known_folder(tmp_path / "viscon")


def test_every_statistic_present(folder):
    stats = compute_stats(folder)
    assert sorted(stats) == sorted(
        [
            "answer_length",
            "caption_length",
            "caption_word_frequencies",
            "configs",
            "context_tokens",
            "dedup",
            "dropped",
            "generation",
            "image_sizes",
            "multiple_choice",
            "non_contextual_baseline",
            "overlap",
            "primary_config",
            "provenance",
            "qa_counts",
            "relevance",
            "stats_version",
            "usage",
        ]
    )
    assert stats["primary_config"] == "contextual"


def test_context_tokens_skip_unknown_and_histogram_covers_values(folder):
    ct = compute_stats(folder)["context_tokens"]
    assert ct["count"] == 3  # the -1 row is no figure
    assert (ct["mean"], ct["median"], ct["min"], ct["max"]) == (200.0, 200.0, 100, 300)
    hist = ct["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) == 3
    assert hist["edges"][0] == 0 and hist["edges"][-1] > 300


def test_overlap_figures(folder):
    ov = compute_stats(folder)["overlap"]
    # rows: "red cup spoon" all in context -> 1; "blue kite" -> 0; "running dogs museum" -> 1 (stems);
    # "unknown tokens" -> 1.
    assert ov["count"] == 4 and ov["mean"] == 0.75 and ov["median"] == 1.0
    assert sum(ov["histogram"]["counts"]) == 4 and ov["histogram"]["edges"][-1] == 1.0
    assert "stem" in ov["definition"] and "stopword" in ov["definition"]


def test_qa_counts(folder):
    qa = compute_stats(folder)["qa_counts"]
    assert qa["per_sample"] == {"4+4": 3, "3+4": 1}
    assert qa["mode"] == "4+4" and qa["mode_share"] == 0.75
    assert qa["freeform"] == {"3": 1, "4": 3} and qa["multiple_choice"] == {"4": 4}
    assert qa["freeform_mean"] == 3.75 and qa["multiple_choice_mean"] == 4.0
    assert qa["rounds_total"] == 31


def test_caption_and_answer_length(folder):
    stats = compute_stats(folder)
    cap = stats["caption_length"]
    assert cap["count"] == 4 and cap["min"] == 2 and cap["max"] == 6
    assert cap["mean"] == pytest.approx((6 + 2 + 5 + 2) / 4)
    ans = stats["answer_length"]
    # free-form answers only: 4 x 3 words, 4 x 5, 3 x 1, 4 x 2
    assert ans["count"] == 15 and ans["min"] == 1 and ans["max"] == 5
    assert ans["mean"] == pytest.approx(round((12 + 20 + 3 + 8) / 15, 4))
    assert "multiple-choice" in ans["unit"]


def test_image_sizes(folder):
    sizes = compute_stats(folder)["image_sizes"]
    assert sizes["width"]["max"] == 1000 and sizes["height"]["min"] == 100
    assert sizes["megapixels"]["max"] == 0.5 and sizes["megapixels"]["min"] == 0.01
    grid = sizes["width_height_histogram"]
    assert sum(map(sum, grid["counts"])) == 4
    assert len(grid["counts"]) == len(grid["width_edges"]) - 1
    assert len(grid["counts"][0]) == len(grid["height_edges"]) - 1


def test_dedup_rows_drops_usage_provenance(folder):
    stats = compute_stats(folder)
    assert stats["configs"]["contextual"] == {"train": 3, "test": 1, "total": 4}
    assert stats["configs"]["non_contextual"] == {"train": 2, "total": 2}  # no test file, no test key
    per = stats["dedup"]["per_image"]["contextual"]
    assert per == {
        "images": 4,
        "questions_generated": 32,
        "questions_removed": 1,
        "questions_kept": 31,
        "removed_rate": round(1 / 32, 4),
    }
    assert stats["dedup"]["build"]["contextual"]["model"] == "WhereIsAI/UAE-Large-V1"
    assert stats["dropped"]["generate"] == {"contextual": {"unparseable_qa": 2}}
    assert stats["usage"]["total"] == {
        "replies": 9,
        "prompt_tokens": 9000,
        "completion_tokens": 1200,
        "cost_usd": 0.0345,
    }
    prov = stats["provenance"]
    assert prov["source"] == "HuggingFaceM4/OBELICS" and prov["source_revision"] == "abc123"
    assert prov["caption_model"] == "openai:gpt-4o" and prov["viscon_hub_version"] == "0.1.0"
    assert prov["conversation_style"] == 1 and prov["templates"][0] == "contextual_caption@1"
    assert prov["dedup_models"] == ["WhereIsAI/UAE-Large-V1"]
    assert prov["handwritten_example"] is False
    assert prov["models_in_rows"]["contextual"]["caption_model"] == {"gpt-4o": 4}


def test_non_contextual_baseline_and_word_frequencies(folder):
    stats = compute_stats(folder)
    base = stats["non_contextual_baseline"]
    assert base["config"] == "non_contextual" and base["rows"] == 2
    assert base["caption_words_mean"] == 9.0
    freqs = stats["caption_word_frequencies"]
    assert freqs["red"] == 1 and "the" not in freqs and "and" not in freqs
    assert len(freqs) <= S.WORDCLOUD_WORDS


def test_falls_back_to_non_contextual(tmp_path):
    root = write_folder(
        tmp_path / "nc",
        {"non_contextual": {"train": [per_image_row(i, mode="non_contextual") for i in range(2)]}},
    )
    stats = compute_stats(root)
    assert stats["primary_config"] == "non_contextual"
    assert stats["context_tokens"]["config"] == "non_contextual"
    assert stats["non_contextual_baseline"] is None


def test_mixes_only_and_no_build_info(tmp_path):
    root = write_folder(tmp_path / "mix", {"leaky": {"train": [mix_row(0)]}}, info={})
    stats = compute_stats(root)
    assert stats["primary_config"] is None and stats["context_tokens"] is None
    assert stats["configs"] == {"leaky": {"train": 1, "total": 1}}
    assert stats["usage"]["total"]["replies"] == 0 and stats["provenance"]["source"] is None


def test_empty_folder_is_a_config_error(tmp_path):
    from viscon_hub.errors import ConfigError

    with pytest.raises(ConfigError, match="viscon build"):
        compute_stats(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        compute_stats(tmp_path / "missing")


def test_reads_only_needed_columns_in_batches(folder, monkeypatch):
    seen: list[list[str]] = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(list(kwargs.get("columns") or []))
        assert kwargs.get("batch_size"), "batches must be bounded"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a whole table was read"))
    compute_stats(folder)
    assert seen and all(cols and "image" not in cols for cols in seen)


def test_deterministic_sorted_and_rounded(folder):
    a, b = compute_stats(folder), compute_stats(folder)
    assert a == b
    text = json.dumps(a, sort_keys=True)

    def floats(x):
        if isinstance(x, float):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from floats(v)
        elif isinstance(x, list):
            for v in x:
                yield from floats(v)

    assert all(round(f, 4) == f for f in floats(a))
    path = write_stats(a, folder)
    assert Path(path) == folder / "stats.json"
    assert json.loads(Path(path).read_text()) == a
    assert Path(path).read_text() == json.dumps(a, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert text == json.dumps(json.loads(Path(path).read_text()), sort_keys=True)


def test_handwritten_flag(tmp_path):
    stats = compute_stats(known_folder(tmp_path / "hw", model="openai:handwritten-example"))
    assert stats["provenance"]["handwritten_example"] is True


# --- plots --------------------------------------------------------------------------------------


def _digests(root: Path, files: list[str]) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in files}


def test_plots_written_and_byte_identical(folder):
    stats = compute_stats(folder)
    files = write_plots(stats, folder)
    assert files == [f"plots/{name}" for name in S.PLOT_FILES.values()]
    first = _digests(folder, files)
    for f in files:
        data = (folder / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"matplotlib" not in data.lower()  # no Software chunk
    # Again, and from stats.json read back: same bytes.
    write_stats(stats, folder)
    again = write_plots(json.loads((folder / "stats.json").read_text()), folder)
    assert _digests(folder, again) == first


def test_plots_do_not_touch_global_matplotlib_state(folder):
    import matplotlib

    before = dict(matplotlib.rcParams)
    write_plots(compute_stats(folder), folder)
    assert dict(matplotlib.rcParams) == before


def test_plots_skip_missing_figures(tmp_path):
    root = write_folder(tmp_path / "mix", {"leaky": {"train": [mix_row(0)]}}, info={})
    assert write_plots(compute_stats(root), root) == []


# --- the real quickstart build ------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_statistics(quickstart_build, tmp_path):
    root = tmp_path / "viscon"
    shutil.copytree(quickstart_build["dataset"], root)
    info = json.loads((root / BUILD_INFO).read_text())
    stats = compute_stats(root)
    for config, splits in info["rows"].items():
        assert {s: n for s, n in stats["configs"][config].items() if s != "total"} == {
            s: n for s, n in splits.items() if n
        }
    images = stats["configs"]["contextual"]["total"]
    assert stats["context_tokens"]["count"] == images and stats["overlap"]["count"] == images
    assert 0 < stats["overlap"]["mean"] <= 1
    assert stats["qa_counts"]["mode"] == "4+4"
    assert sum(stats["qa_counts"]["per_sample"].values()) == images
    for mode, per in stats["dedup"]["per_image"].items():
        build = info["dedup"][mode]
        assert per["questions_generated"] == build["questions_in"]
        assert per["questions_removed"] == build["removed"]
        assert per["questions_kept"] == build["questions_kept"]
    assert stats["provenance"]["handwritten_example"] is True
    assert stats["usage"]["by_model"] == info["usage"]
    files = write_plots(stats, root)
    assert len(files) == len(S.PLOT_FILES)
