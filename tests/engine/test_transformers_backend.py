"""The transformers backend, for real, on a tiny randomly initialised Llama built here (no download)."""

import asyncio
import time

import pytest

from viscon_hub.engine import Engine, EngineConfig, GenerationCache, Request, make_backend
from viscon_hub.prepare.tokens import DEFAULT_TOKENIZER

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(DEFAULT_TOKENIZER), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def qa_request(text, seed=None):
    sampling = {"temperature": 0.0, "max_tokens": 8}
    if seed is not None:
        sampling["seed"] = seed
    return Request.create(
        stage="qa_freeform",
        model="tiny",
        template_id="qa_freeform",
        template_version=1,
        messages=[{"role": "user", "content": text}],
        sampling=sampling,
    )


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_transformers_backend_generates_and_engine_caches(tiny_llama, tmp_path, device):
    backend = make_backend(f"transformers:{tiny_llama}", image_loader=lambda sha: b"", device=device)
    assert backend.device == device
    requests = [qa_request("Describe a red mug."), qa_request("Count the chairs.")]
    engine = Engine(cache=GenerationCache(tmp_path), config=EngineConfig(max_concurrency=2))
    first = engine.run(requests, backend=backend)
    assert all(c.ok and c.completion_tokens > 0 for c in first)
    assert first[0].prompt_tokens > 3 and first[0].finish_reason in ("stop", "length")
    assert engine.last_report.calls == 2
    # Greedy decoding is deterministic; a second run is answered by the cache alone.
    again = Engine(cache=GenerationCache(tmp_path)).run(requests, backend=backend)
    assert [c.reply for c in again] == [c.reply for c in first]
    assert all(c.from_cache for c in again)
    asyncio.run(backend.aclose())


def test_text_only_model_refuses_images_permanently(tiny_llama, tmp_path):
    backend = make_backend(f"transformers:{tiny_llama}", image_loader=lambda sha: b"", device="cpu")
    req = Request.create(
        stage="caption_contextual",
        model="tiny",
        template_id="c",
        template_version=1,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image", "sha256": "a" * 64}, {"type": "text", "text": "describe"}],
            }
        ],
        sampling={"max_tokens": 4},
    )
    out = Engine(cache=GenerationCache(tmp_path)).run([req], backend=backend)[0]
    assert out.error_kind == "permanent" and "text-only" in out.error


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """A fresh model cache for the test, and the checkpoints each ``from_pretrained`` was asked for."""
    from viscon_hub.engine.backends import transformers_backend
    from viscon_hub.engine.backends.base import LoadedModels

    monkeypatch.setattr(transformers_backend, "_MODELS", LoadedModels(capacity=2))
    calls = []
    for auto in ("AutoProcessor", "AutoModelForImageTextToText", "AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, auto)
        real = cls.from_pretrained

        def counting(*args, _real=real, _auto=auto, **kwargs):
            calls.append(_auto)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", counting)
    return calls


def tiny_backend(folder, **options):
    return make_backend(f"transformers:{folder}", image_loader=lambda sha: b"", device="cpu", **options)


def test_a_second_backend_reuses_the_loaded_model(tiny_llama, from_pretrained_calls, tmp_path):
    first = tiny_backend(tiny_llama)
    assert "AutoModelForCausalLM" in from_pretrained_calls
    loads = len(from_pretrained_calls)
    second = tiny_backend(tiny_llama)
    assert len(from_pretrained_calls) == loads  # no from_pretrained at all the second time
    assert second.net is first.net and second.tokenizer is first.tokenizer and second.processor is None
    asyncio.run(first.aclose())  # closing one backend leaves the shared model to the other
    out = Engine(cache=GenerationCache(tmp_path)).run([qa_request("Name a colour.")], backend=second)
    assert out[0].ok and out[0].completion_tokens > 0


def test_another_dtype_loads_separately_and_the_cache_stays_bounded(tiny_llama, from_pretrained_calls):
    default = tiny_backend(tiny_llama)
    half = tiny_backend(tiny_llama, dtype="bfloat16")
    assert half.net is not default.net
    assert half.net.dtype == torch.bfloat16 and default.net.dtype == torch.float32
    assert from_pretrained_calls.count("AutoModelForCausalLM") == 2
    assert tiny_backend(tiny_llama, dtype="bfloat16").net is half.net
    # A third model drops the least recently used (the default dtype), which then loads again.
    tiny_backend(tiny_llama, dtype="float64")
    assert from_pretrained_calls.count("AutoModelForCausalLM") == 3
    assert tiny_backend(tiny_llama).net is not default.net
    assert from_pretrained_calls.count("AutoModelForCausalLM") == 4


def test_backends_sharing_a_model_take_turns(tiny_llama, from_pretrained_calls, monkeypatch):
    first, second = tiny_backend(tiny_llama), tiny_backend(tiny_llama)
    assert first.net is second.net and first._lock is not second._lock
    running, most = [0], [0]
    real = first.net.generate

    def generate(**kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.2)  # long enough for the other backend's call to arrive meanwhile
        try:
            return real(**kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(first.net, "generate", generate)

    async def both():
        return await asyncio.gather(
            first.complete(qa_request("Count the chairs.")), second.complete(qa_request("Count the cups."))
        )

    out = asyncio.run(both())
    assert all(c.completion_tokens > 0 for c in out)
    assert most[0] == 1
