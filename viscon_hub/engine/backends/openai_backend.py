"""Any OpenAI-compatible chat endpoint (OpenAI, a vLLM or SGLang server) through the async client on aiohttp.

The client's own retries are off: the engine retries, so that ``Retry-After`` and permanent errors
are handled in one place. The API key never appears in an error message.

Scoring requests (``engine/scoring.py``) need a vLLM server: the prompt ends with the answer
(``continue_final_message``) and the server returns its top-k ``prompt_logprobs``, once with the
images and once without.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from viscon_hub.engine.backends.base import (
    BackendError,
    BaseBackend,
    ImageLoader,
    complete_each,
    openai_messages,
    require,
)
from viscon_hub.engine.request import Completion, Request
from viscon_hub.engine.scoring import answer_tail, is_scoring, scores_reply, topk_kl
from viscon_hub.errors import ConfigError, redact
from viscon_hub.retry import parse_retry_after

_PERMANENT_STATUS = {400, 413, 422}
_FATAL_STATUS = {401, 403, 404}


class OpenAIBackend(BaseBackend):
    name = "openai"
    max_batch = 1

    def __init__(
        self,
        model: str,
        *,
        image_loader: ImageLoader,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_connections: int = 1000,
    ) -> None:
        openai = require("openai", "openai")
        self.model = model
        self.image_loader = image_loader
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url is None:
                raise ConfigError(
                    "openai backend: set OPENAI_API_KEY (or pass --base-url for a local server)"
                )
            key = "EMPTY"  # local vLLM / SGLang servers accept any key
        self._secret = key
        self.timeout_s = timeout_s
        # Keep as many connections alive as may be in flight: the client's default keeps 100, so at
        # higher concurrency every extra request would pay for a new TCP connection.
        self.max_connections = max_connections
        self._openai = openai
        self._client = None
        self._loop = None
        try:
            openai.DefaultAioHttpClient()
        except RuntimeError as e:
            raise ConfigError(f"{e}: pip install 'viscon-hub[openai]'") from None

    @property
    def client(self):
        """The async client of the running event loop (aiohttp sessions cannot cross loops)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = self._openai.AsyncOpenAI(
                api_key=self._secret,
                base_url=self.base_url,
                max_retries=0,
                timeout=self.timeout_s,
                http_client=self._openai.DefaultAioHttpClient(limits=self._limits()),
            )
            self._loop = loop
        return self._client

    def _clean(self, text: str) -> str:
        """``text`` without the API key (vLLM's placeholder key ``EMPTY`` is no secret)."""
        return redact(text, secrets=[self._secret] if self._secret != "EMPTY" else [], limit=None)

    def _limits(self):
        import httpx2

        return httpx2.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_connections,
            keepalive_expiry=30.0,
        )

    async def complete(self, request: Request) -> Completion:
        if is_scoring(request.sampling):
            return await self._score(request)
        started = time.perf_counter()
        response = await self._post(chat_body(self.model, request, self.image_loader))
        latency = time.perf_counter() - started
        choices = getattr(response, "choices", None) or []
        if not choices or getattr(choices[0], "message", None) is None:
            raise BackendError("malformed response: no choices", kind="transient")
        choice = choices[0]
        content = choice.message.content
        if not isinstance(content, str):
            raise BackendError("malformed response: message has no text content", kind="transient")
        usage = getattr(response, "usage", None)
        return Completion(
            key=request.key,
            reply=content,
            finish_reason=choice.finish_reason,
            prompt_tokens=_count(getattr(usage, "prompt_tokens", None)),
            completion_tokens=_count(getattr(usage, "completion_tokens", None)),
            latency_s=latency,
        )

    async def _score(self, request: Request) -> Completion:
        *_, last = request.messages
        answer = last.get("content") if last.get("role") == "assistant" else None
        if not isinstance(answer, str) or not answer.strip():
            raise BackendError("a scoring request ends with the assistant turn to score", kind="permanent")
        k = int(request.sampling.get("prompt_logprobs", 20))
        messages = openai_messages(request, self.image_loader)
        bare = [
            {**m, "content": [p for p in m["content"] if p.get("type") != "image_url"]}
            if isinstance(m.get("content"), list)
            else m
            for m in messages
        ]
        started = time.perf_counter()
        tails = []
        for msgs in (messages, bare):
            response = await self._post(
                {
                    "model": self.model,
                    "messages": msgs,
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "prompt_logprobs": k,
                    "add_generation_prompt": False,
                    "continue_final_message": True,
                    "return_token_ids": True,
                }
            )
            try:
                tails.append(
                    answer_tail(
                        getattr(response, "prompt_logprobs", None),
                        getattr(response, "prompt_token_ids", None),
                        answer,
                    )
                )
            except ValueError as e:
                raise BackendError(f"malformed prompt_logprobs: {e}", kind="transient") from None
        with_image, without = tails
        if [t for t, _, _ in with_image] != [t for t, _, _ in without]:
            raise BackendError("the answer tokenises differently without the image", kind="permanent")
        try:
            reply = scores_reply(
                kl=[topk_kl(a[2], b[2]) for a, b in zip(with_image, without, strict=True)],
                image_logprobs=[a[1] for a in with_image],
                text_logprobs=[b[1] for b in without],
            )
        except ValueError as e:
            raise BackendError(str(e), kind="permanent") from None
        return Completion(
            key=request.key,
            reply=reply,
            finish_reason="stop",
            prompt_tokens=len(with_image),
            latency_s=time.perf_counter() - started,
        )

    async def _post(self, body: dict[str, Any]) -> Any:
        """One chat completion, its failures mapped to BackendError / ConfigError with the key redacted."""
        openai = self._openai
        try:
            # The documented low-level POST, not chat.completions.create: the body is plain JSON
            # already, and create() walks it against its TypedDicts on every call, about a quarter
            # of the client's CPU per request (bench/bench_engine.py). The reply parses the same, and
            # vLLM's extra fields (prompt_logprobs) stay readable as attributes.
            return await self.client.post(
                "/chat/completions", cast_to=openai.types.chat.ChatCompletion, body=body
            )
        except openai.APIStatusError as e:
            status = e.status_code
            message = self._clean(f"HTTP {status}: {_short(e)}")
            if status in _FATAL_STATUS:
                raise ConfigError(
                    f"openai backend at {self.base_url or 'api.openai.com'}: {message}"
                ) from None
            if status == 429 or status >= 500 or status == 408 or status == 409:
                raise BackendError(
                    message,
                    kind="transient",
                    retry_after=parse_retry_after(getattr(e.response, "headers", None)),
                    status=status,
                ) from None
            kind = "permanent" if status in _PERMANENT_STATUS else "transient"
            raise BackendError(message, kind=kind, status=status) from None
        except openai.APITimeoutError as e:
            # The aiohttp transport reports a refused connection as a connect timeout: say which.
            cause = e.__cause__
            detail = f"cannot connect: {_short(cause)}" if "connect" in type(cause).__name__.lower() else None
            raise BackendError(
                self._clean(detail or f"timeout after {self.timeout_s:g}s (--request-timeout)"),
                kind="transient",
            ) from None
        except openai.APIConnectionError as e:
            raise BackendError(self._clean(f"connection error: {_short(e)}"), kind="transient") from None
        except openai.APIResponseValidationError as e:
            raise BackendError(self._clean(f"malformed response: {_short(e)}"), kind="transient") from None
        except ValueError as e:  # a body that is not JSON at all
            raise BackendError(self._clean(f"malformed response: {_short(e)}"), kind="transient") from None

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]:
        return await complete_each(self, requests)

    async def end_loop(self) -> None:
        """Close the client of the running loop; the next call on a new loop makes a fresh one."""
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = None


_SAMPLING = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty")


def chat_body(model: str, request: Request, image_loader: ImageLoader) -> dict[str, Any]:
    """The body of a chat completion call for ``request``; the batch backend writes the same one."""
    sampling = request.sampling
    body: dict[str, Any] = {"model": model, "messages": openai_messages(request, image_loader)}
    body.update({name: sampling[name] for name in _SAMPLING if name in sampling})
    return body


def _count(value: Any) -> int:
    """A token count as the server sent it: a whole number, 0 when absent, -1 when it is not a count.

    The engine turns -1 (and any other impossible figure) into a counted usage anomaly.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return -1


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
