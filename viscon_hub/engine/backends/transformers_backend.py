"""Small local models with ``transformers``: a vision-language model when images are present, else a
causal LM. One request at a time (a lock keeps the model single-threaded); meant for small models,
tests and debugging, not for throughput. Loaded models are kept for the process (two at most), so a
second backend for the same model, device and dtype reuses the weights; backends sharing a model take
turns with it.

Besides generation it answers scoring requests (``engine/scoring.py``): the last assistant turn is
scored under teacher forcing with and without the request's images, exactly over the vocabulary.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from viscon_hub.engine.backends.base import (
    BackendError,
    BaseBackend,
    ImageLoader,
    LoadedModels,
    complete_each,
    require,
)
from viscon_hub.engine.request import Completion, Request
from viscon_hub.engine.scoring import is_scoring, scores_reply


@dataclass(frozen=True, slots=True, eq=False)
class _LoadedModel:
    processor: Any  # None for a text-only causal LM
    tokenizer: Any  # None for a vision-language model (its processor tokenizes)
    net: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while the net runs: every backend that shares this model runs it through here."""


# Loaded models, kept for the process: a build makes an engine per stage (caption, Q&A, relevance)
# and per run, often for the same weights. Two at most, as for the embedding models.
_MODELS = LoadedModels(capacity=2)


def _load(model: str, *, device: str, dtype: str | None) -> _LoadedModel:
    torch = require("torch", "transformers")
    transformers = require("transformers", "transformers")
    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model)
        net = transformers.AutoModelForImageTextToText.from_pretrained(model, **kwargs)
        tokenizer = None
    except (ValueError, OSError, KeyError):
        # Not a vision-language checkpoint: a text-only causal LM (the Q&A stages need no image).
        processor = None
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        net = transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs)
    net.to(device).eval()
    return _LoadedModel(processor=processor, tokenizer=tokenizer, net=net)


class TransformersBackend(BaseBackend):
    name = "transformers"
    max_batch = 1

    def __init__(
        self,
        model: str,
        *,
        image_loader: ImageLoader,
        device: str | None = None,
        dtype: str | None = None,
        **options: Any,
    ) -> None:
        torch = require("torch", "transformers")
        require("transformers", "transformers")
        self.model = model
        self.image_loader = image_loader
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = _MODELS.get(
            (model, self.device, dtype), lambda: _load(model, device=self.device, dtype=dtype)
        )
        self.processor = loaded.processor
        self.tokenizer = loaded.tokenizer
        self.net = loaded.net
        self._model_lock = loaded.lock
        # Keeps this backend's requests queued on the event loop rather than in worker threads.
        self._lock = asyncio.Lock()

    def _inputs(
        self, request: Request, *, messages_in: list[dict[str, Any]] | None = None, answer: str | None = None
    ):
        from PIL import Image

        if self.processor is None and request.images:
            raise BackendError(f"{self.model} is a text-only model and cannot read images", kind="permanent")
        messages, images = [], []
        for m in request.messages if messages_in is None else messages_in:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        try:
                            data = self.image_loader(part["sha256"])
                            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                        except Exception as e:  # noqa: BLE001 - any unreadable image fails this request only
                            raise BackendError(
                                f"image {part['sha256'][:12]} unreadable: {e}", kind="permanent"
                            ) from None
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": m["role"], "content": content})
        if self.processor is not None:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return self.processor(text=prompt + (answer or ""), images=images or None, return_tensors="pt")
        text_messages = [
            {
                "role": m["role"],
                "content": m["content"]
                if isinstance(m["content"], str)
                else "".join(p.get("text", "") for p in m["content"]),
            }
            for m in messages
        ]
        if answer is not None:
            prompt = self.tokenizer.apply_chat_template(
                text_messages, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False)
        return self.tokenizer.apply_chat_template(
            text_messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def _generate(self, request: Request) -> Completion:
        torch = self._torch
        s = request.sampling
        inputs = self._inputs(request).to(self.device)
        temperature = float(s.get("temperature", 0.0))
        if s.get("seed") is not None:
            torch.manual_seed(int(s["seed"]))
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.net.generate(
                **inputs,
                max_new_tokens=int(s.get("max_tokens", 256)),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=float(s.get("top_p", 1.0)) if temperature > 0 else None,
            )
        prompt_len = inputs["input_ids"].shape[1]
        new = out[0, prompt_len:]
        decoder = self.processor if self.processor is not None else self.tokenizer
        text = decoder.decode(new, skip_special_tokens=True)
        eos = getattr(self.net.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        finished = bool(len(new)) and int(new[-1]) in eos_ids
        return Completion(
            key=request.key,
            reply=text,
            finish_reason="stop" if finished else "length",
            prompt_tokens=int(prompt_len),
            completion_tokens=int(len(new)),
            latency_s=time.perf_counter() - started,
        )

    def _answer_logprobs(self, request: Request, messages: list[dict[str, Any]], answer: str):
        """Log-softmax rows predicting each answer token, and the answer's token ids."""
        torch = self._torch
        prompt_ids = self._inputs(request, messages_in=messages, answer="")["input_ids"][0]
        inputs = self._inputs(request, messages_in=messages, answer=answer).to(self.device)
        ids = inputs["input_ids"][0]
        n = len(ids) - len(prompt_ids)
        if n < 1 or not torch.equal(ids[: len(prompt_ids)].cpu(), prompt_ids.cpu()):
            raise BackendError(
                "the answer's tokens do not follow the prompt's; cannot score", kind="permanent"
            )
        with torch.inference_mode():
            logits = self.net(**inputs).logits[0].float()
        rows = torch.log_softmax(logits[len(ids) - n - 1 : len(ids) - 1], dim=-1)
        return rows, ids[len(ids) - n :]

    def _score(self, request: Request) -> Completion:
        torch = self._torch
        started = time.perf_counter()
        *asked, last = request.messages
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str) or not last["content"]:
            raise BackendError("a scoring request ends with the assistant turn to score", kind="permanent")
        answer = last["content"]
        if not answer.startswith(" "):
            answer = " " + answer  # as after "assistant:" in a reply the model would write
        bare = [
            {**m, "content": [p for p in m["content"] if p.get("type") != "image"]}
            if isinstance(m["content"], list)
            else m
            for m in asked
        ]
        with_image, tokens = self._answer_logprobs(request, asked, answer)
        without, tokens_bare = self._answer_logprobs(request, bare, answer)
        if not torch.equal(tokens.cpu(), tokens_bare.cpu()):
            raise BackendError("the answer tokenises differently without the image", kind="permanent")
        kl = (with_image.exp() * (with_image - without)).sum(-1)
        index = tokens.to(with_image.device).unsqueeze(-1)
        try:
            reply = scores_reply(
                kl=kl.tolist(),
                image_logprobs=with_image.gather(-1, index).squeeze(-1).tolist(),
                text_logprobs=without.gather(-1, index).squeeze(-1).tolist(),
            )
        except ValueError as e:
            raise BackendError(str(e), kind="permanent") from None
        return Completion(
            key=request.key,
            reply=reply,
            finish_reason="stop",
            prompt_tokens=int(len(tokens)),
            latency_s=time.perf_counter() - started,
        )

    async def complete(self, request: Request) -> Completion:
        run = self._score if is_scoring(request.sampling) else self._generate
        async with self._lock:
            return await asyncio.to_thread(self._alone, run, request)

    def _alone(self, run: Callable[[Request], Completion], request: Request) -> Completion:
        # Other backends (other engines, other event loops) may share this model: one runs it at a time.
        with self._model_lock:
            return run(request)

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]:
        return await complete_each(self, requests)

    async def aclose(self) -> None:
        self.net = None
