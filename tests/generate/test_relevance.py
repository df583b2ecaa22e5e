"""C3L relevance scores on a tiny random VLM built here, and through a vLLM-style server (prompt_logprobs)."""

import asyncio
import json
import math

import pytest

from tests.servers.openai_server import OpenAITestServer, prompt_logprobs_fields
from viscon_hub.engine import Engine, EngineConfig, GenerationCache, make_backend
from viscon_hub.engine.scoring import answer_tail, parse_scores
from viscon_hub.errors import ConfigError
from viscon_hub.generate.relevance import (
    RelevanceConfig,
    attach_scores,
    relevance_request,
    rounds_to_score,
    score_records,
)
from viscon_hub.prepare.images import ImageStore
from viscon_hub.prepare.readers import SAMPLE_PATH
from viscon_hub.prepare.tokens import DEFAULT_TOKENIZER

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGES = SAMPLE_PATH.parent / "images"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %} | {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A randomly initialised LLaVA (tiny CLIP tower, tiny Llama) with the bundled LLaMA vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(DEFAULT_TOKENIZER), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "images"))


def records(store):
    cat = store.put((IMAGES / "chelsea_cat.jpg").read_bytes())
    cup = store.put((IMAGES / "coffee_espresso_cup.jpg").read_bytes())
    return [
        {
            "id": "doc-0",
            "context_mode": "contextual",
            "status": "ok",
            "image_sha256": cat,
            "caption": "A ginger cat sits on a wooden floor.",
            "qa_freeform": [{"question": "What animal is shown?", "answer": "A ginger cat."}],
            "qa_multiple_choice": [
                {
                    "question": "Where does the cat sit?",
                    "options": ["Floor", "Roof", "Car", "Tree"],
                    "answer": "A",
                }
            ],
        },
        {
            "id": "doc-1",
            "context_mode": "non_contextual",
            "status": "ok",
            "image_sha256": cup,
            "caption": "A red cup of espresso on a saucer.",
            "qa_freeform": [{"question": "What colour is the cup?", "answer": "Red."}],
            "qa_multiple_choice": [],
        },
        {
            "id": "doc-2",
            "context_mode": "contextual",
            "status": "dropped",
            "image_sha256": cup,
            "caption": "x",
        },
    ]


def engine(tmp_path, **kw):
    return Engine(cache=GenerationCache(tmp_path / "cache"), config=EngineConfig(**kw))


def test_tiny_vlm_scores_are_finite_deterministic_cached_and_depend_on_the_image(tiny_vlm, store, tmp_path):
    config = RelevanceConfig(model=f"transformers:{tiny_vlm}")
    backend = make_backend(config.model, image_loader=store.get, device="cpu")
    recs = records(store)
    first_engine = engine(tmp_path)
    rows, report = score_records(recs, config=config, engine=first_engine, backend=backend)
    assert report.rounds == report.scored == 5 and not report.failed
    assert first_engine.last_report.calls == 5
    assert {(r["id"], r["round"]) for r in rows} == {
        ("doc-0", "caption"),
        ("doc-0", "freeform"),
        ("doc-0", "multiple_choice"),
        ("doc-1", "caption"),
        ("doc-1", "freeform"),
    }
    for r in rows:
        assert math.isfinite(r["kl"]) and math.isfinite(r["pmi"]) and r["kl"] > 0.0
    # The image changes the answer's probability: with and without it differ for every round.
    for r in rows:
        detail = json.loads(first_engine.cache.get(r["key"]).reply)
        assert detail["logp_image"] != detail["logp_text"] and detail["tokens"] >= 1
    first_engine.cache.close()

    # A rerun computes nothing: every score is a cached reply, the same numbers.
    again_engine = engine(tmp_path, offline=True)
    again, report2 = score_records(recs, config=config, engine=again_engine, backend=None)
    assert again == rows and again_engine.last_report.calls == 0 and report2.scored == 5
    again_engine.cache.close()
    # A fresh cache and a fresh backend recompute the same scores (no sampling in scoring).
    fresh_engine = Engine(cache=GenerationCache(tmp_path / "other"))
    fresh, _ = score_records(
        recs,
        config=config,
        engine=fresh_engine,
        backend=make_backend(config.model, image_loader=store.get, device="cpu"),
    )
    assert [(r["kl"], r["pmi"]) for r in fresh] == [(r["kl"], r["pmi"]) for r in rows]
    fresh_engine.cache.close()
    asyncio.run(backend.aclose())


def test_vllm_server_scores_through_prompt_logprobs(store, tmp_path):
    pytest.importorskip("openai")
    config = RelevanceConfig(model="openai:viscon-test-vlm", top_logprobs=5)
    recs = records(store)
    with OpenAITestServer() as server:
        backend = make_backend(
            config.model, image_loader=store.get, base_url=server.base_url, api_key="sk-test-relevance"
        )
        e = engine(tmp_path, backoff_base_s=0.01, backoff_max_s=0.02)
        rows, report = score_records(recs, config=config, engine=e, backend=backend)
        calls = server.stats()["total_requests"]
        e.cache.close()
    assert report.scored == 5 and not report.failed
    assert calls == 10, "two prompts per round: with the image and without it"
    for r in rows:
        assert math.isfinite(r["kl"]) and r["kl"] >= 0.0 and math.isfinite(r["pmi"]) and r["pmi"] != 0.0
    again_engine = engine(tmp_path, offline=True)
    again, _ = score_records(recs, config=config, engine=again_engine, backend=None)
    assert again == rows and again_engine.last_report.calls == 0
    again_engine.cache.close()


def test_a_lying_server_is_a_failed_round_not_a_crash(store, tmp_path):
    pytest.importorskip("openai")
    config = RelevanceConfig(model="openai:viscon-test-vlm")
    with OpenAITestServer(faults=[{"kind": "garbled", "times": None}]) as server:
        backend = make_backend(config.model, image_loader=store.get, base_url=server.base_url, api_key="sk-x")
        e = engine(tmp_path, max_attempts=1)
        rows, report = score_records(records(store)[:1], config=config, engine=e, backend=backend)
        e.cache.close()
    assert rows == [] and report.rounds == 3 and report.failed == {"transient": 3}


def test_answer_tail_refuses_malformed_prompt_logprobs():
    good = prompt_logprobs_fields(
        {
            "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A red cup."}],
            "continue_final_message": True,
        },
        3,
    )
    tail = answer_tail(good["prompt_logprobs"], good["prompt_token_ids"], "A red cup.")
    assert len(tail) == 3 and all(lp <= 0 for _, lp, _ in tail)
    bad_inputs = [
        (None, None),
        (good["prompt_logprobs"][:-1], good["prompt_token_ids"]),
        (good["prompt_logprobs"][:-1] + [{"1": {"logprob": "x"}}], good["prompt_token_ids"]),
        (
            good["prompt_logprobs"][:-1] + [{"1": {"logprob": 0.5, "decoded_token": " cup."}}],
            good["prompt_token_ids"],
        ),
        (
            good["prompt_logprobs"][:-1] + [{"1": {"logprob": -1.0, "decoded_token": " cup."}}],
            good["prompt_token_ids"],
        ),
    ]
    for logprobs, ids in bad_inputs:
        with pytest.raises(ValueError):
            answer_tail(logprobs, ids, "A red cup.")
    with pytest.raises(ValueError, match="does not end with the answer"):
        answer_tail(good["prompt_logprobs"], good["prompt_token_ids"], "A blue cup.")


def test_scores_parse_and_requests_are_stable():
    assert parse_scores('{"kl": 0.1, "pmi": -2}') == {"kl": 0.1, "pmi": -2.0}
    for reply in (None, "", "[]", '{"kl": 1}', '{"kl": true, "pmi": 1}', '{"kl": Infinity, "pmi": 1}'):
        assert parse_scores(reply) is None
    a = relevance_request(model="m", image_sha256="a" * 64, question="Q?", answer="A.")
    assert a.key == relevance_request(model="m", image_sha256="a" * 64, question="Q?", answer="A.").key
    assert a.key != relevance_request(model="m", image_sha256="b" * 64, question="Q?", answer="A.").key
    with pytest.raises(ConfigError):
        RelevanceConfig(on="bleu")
    with pytest.raises(ConfigError):
        RelevanceConfig(model="no-backend")


def test_multiple_choice_scores_do_not_depend_on_option_order():
    item = {"question": "Colour?", "options": ["Red", "Tan", "Grey", "Blue"], "answer": "C"}
    moved = {"question": "Colour?", "options": ["Grey", "Blue", "Red", "Tan"], "answer": "A"}
    one = rounds_to_score({"qa_multiple_choice": [item]})
    two = rounds_to_score({"qa_multiple_choice": [moved]})
    assert one == two == [("multiple_choice", 0, "Colour?\nBlue\nGrey\nRed\nTan", "Grey")]


def test_min_relevance_drops_rounds_below_it_on_either_score():
    rec = {
        "caption": "c",
        "qa_freeform": [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}],
        "qa_multiple_choice": [{"question": "m0", "options": ["a", "b", "c", "d"], "answer": "A"}],
    }
    scores = {
        ("freeform", 0): {"kl": 0.5, "pmi": -1.0},
        ("freeform", 1): {"kl": 0.01, "pmi": 3.0},
        ("multiple_choice", 0): {"kl": 0.2, "pmi": 0.5},
    }
    by_kl, counts = attach_scores(rec, scores, min_relevance=0.1, on="kl")
    assert [q["question"] for q in by_kl["qa_freeform"]] == ["q0"] and counts["relevance_dropped"] == 1
    by_pmi, counts = attach_scores(rec, scores, min_relevance=0.0, on="pmi")
    assert [q["question"] for q in by_pmi["qa_freeform"]] == ["q1"] and len(by_pmi["qa_multiple_choice"]) == 1
    kept, counts = attach_scores(rec, scores)
    assert len(kept["qa_freeform"]) == 2 and not counts and kept["caption_relevance_kl"] is None
    assert kept["qa_freeform"][1]["relevance_pmi"] == 3.0


def test_build_stores_scores_drops_low_rounds_and_plots_them(quickstart_build, tiny_vlm, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from viscon_hub.build.driver import write_dataset
    from viscon_hub.build.layout import BUILD_INFO, SPLITS, data_files
    from viscon_hub.build.merge import MergeConfig
    from viscon_hub.generate.relevance import score_generations
    from viscon_hub.publish.card import write_card

    work = quickstart_build["config"].work
    generations = tmp_path / "gen"
    shutil.copytree(f"{work}/generations", generations)
    # Four images (both context modes) keep the scoring quick on a CPU.
    table = pq.read_table(generations / "generations" / "records.parquet")
    keep = sorted(set(table.column("id").to_pylist()))[:4]
    pq.write_table(
        table.filter(pc.is_in(table.column("id"), pa.array(keep))),
        generations / "generations" / "records.parquet",
    )
    images = f"{work}/contexts/images"
    config = RelevanceConfig(model=f"transformers:{tiny_vlm}")
    report = score_generations(
        str(generations), config=config, cache=str(tmp_path / "cache"), image_store=images
    )
    assert report.rounds > 50 and report.scored == report.rounds
    first = pq.read_table(generations / "generations" / "relevance.parquet")
    # Scored a few records at a time: the same rows, from the cache alone.
    rerun = score_generations(
        str(generations), config=config, cache=str(tmp_path / "cache"), image_store=images, batch_size=3
    )
    assert rerun.engine["calls"] == 0 and rerun.scored == report.scored and rerun.rounds == report.rounds
    assert pq.read_table(generations / "generations" / "relevance.parquet").equals(first)

    kl = sorted(pq.read_table(generations / "generations" / "relevance.parquet").column("kl").to_pylist())
    threshold = kl[len(kl) // 4]
    out = tmp_path / "viscon"
    common = dict(
        generations=str(generations),
        cache=quickstart_build["config"].generate.cache,
        extra_caches=quickstart_build["config"].generate.extra_caches,
        image_store=images,
        merge=MergeConfig(configs=("contextual", "non_contextual", "leaky")),
    )
    write_dataset(output=str(out), relevance=RelevanceConfig(min_relevance=threshold), **common)
    info = json.loads((out / BUILD_INFO).read_text())
    dropped = sum(info["relevance"][m].get("relevance_dropped", 0) for m in ("contextual", "non_contextual"))
    assert dropped > 0 and info["relevance"]["min_relevance"] == threshold
    rows = [
        r
        for s in SPLITS
        for f in data_files(out, "contextual", s)
        for r in pq.read_table(out / f).to_pylist()
    ]
    items = [qa for r in rows for qa in r["qa_freeform"] + r["qa_multiple_choice"]]
    assert items and all(qa["relevance_kl"] >= threshold * (1 - 1e-6) for qa in items)
    assert all(r["caption_relevance_kl"] is not None for r in rows)

    write_card(out)
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["relevance"]["groups"]) == {
        f"{m}/{k}"
        for m in ("contextual", "non_contextual")
        for k in ("caption", "freeform", "multiple_choice")
    }
    assert (out / "plots" / "relevance.png").is_file()
    assert "C3L relevance" in (out / "README.md").read_text()


def test_scores_answer_like_a_dict_of_every_row(monkeypatch):
    import random

    from viscon_hub.generate.relevance import ROUND_KINDS, Scores

    rng = random.Random(7)
    rows, expected = [], {}
    for n in range(300):
        key = (rng.choice(["contextual", "non_contextual"]), f"doc-{n}-\u00e9")
        for kind in ROUND_KINDS:
            for i in range(rng.randint(0, 3)):
                kl = None if rng.random() < 0.1 else rng.random()
                rows.append(
                    {"context_mode": key[0], "id": key[1], "round": kind, "index": i, "kl": kl, "pmi": -1.0}
                )
                expected.setdefault(key, {})[(kind, i)] = {"kl": kl, "pmi": -1.0}
    scores = Scores.from_batches([rows[:100], rows[100:]])
    assert len(scores) == len(rows)
    for key, want in expected.items():
        assert scores.get(key, {}) == want
    assert scores.get(("contextual", "nobody"), {}) == {}

    # Two records whose digests share the first 64 bits are still told apart by the other 64.
    monkeypatch.setattr(Scores, "_digest", staticmethod(lambda mode, rid: (1, hash((mode, rid)) & 0xFFFF)))
    clash = Scores.from_batches([[dict(rows[0], id="a", kl=0.1), dict(rows[0], id="b", kl=0.9)]])
    assert clash.get((rows[0]["context_mode"], "a"))[(rows[0]["round"], rows[0]["index"])]["kl"] == 0.1
    assert clash.get((rows[0]["context_mode"], "b"))[(rows[0]["round"], rows[0]["index"])]["kl"] == 0.9
