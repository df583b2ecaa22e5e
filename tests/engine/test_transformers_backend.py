"""The transformers backend, for real, on a tiny randomly initialised Llama built here (no download)."""

import asyncio

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
