"""A local OpenAI-compatible chat server for tests and benchmarks, with fault injection.

Tests never put a fake model inside the product: they start this server on 127.0.0.1 and let the real
``openai`` client talk to it. A reply is a deterministic function of the request body, so two runs
give identical outputs, and it is cached by the request's fingerprint so that benchmarks measure the
client, not this server.

The reply is chosen from the system text and the text of the last user message:

- it contains ``<Options>``: four multiple-choice items (``<Human>``, ``<Options>``, ``A.``-``D.``,
  ``<Assistant> <letter>``);
- else it contains ``<Human>``: four free-form rounds of ``<Human>`` / ``<Assistant>`` lines;
- else: a caption of 4-5 sentences naming the page host, a few context words and the sha256 prefix of
  each image data URL, so different images give different captions.

With ``prompt_logprobs: k`` in the body (vLLM's extension, used to score answers), the reply also
carries ``prompt_logprobs`` and ``prompt_token_ids`` for the rendered prompt (see
:func:`prompt_logprobs_fields`): whitespace-led word tokens, each with a deterministic distribution
over itself and ``k`` other words that depends on every earlier token and on the images.

Endpoints: ``POST /v1/chat/completions`` (no streaming), ``GET /v1/models``, the Files and Batch API
(``POST /v1/files``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``,
with expiry, failed lines and lying output files: see ``BATCH_PLAN_DEFAULTS``) and, for tests,
``GET /_stats``, ``POST /_faults`` (body: a list of rules, or ``{"faults": [...], "latency_s": x}``)
and ``POST /_reset`` (clears the counters and restores the start-up fault plan and latency).

A fault rule (all keys but ``kind`` optional)::

    {"kind": "429" | "500" | "503" | "400" | "timeout" | "drop" | "garbled" | "truncated_json"
             | "garbled_content" | "truncated_content",
     "match": "*",             # or a substring of the request's text content
     "times": 1,               # applications before the rule is used up; null: never used up
     "per_fingerprint": False, # True: apply to the first `times` attempts of EACH distinct request
     "retry_after_s": 1.0,     # 429 (and 503 when given): the Retry-After header, may be fractional
     "delay_s": 30.0,          # timeout: seconds to wait before replying normally
     "reply": {...}}           # lie: a well-formed 200 whose body lies; any of "usage" (replaces the
                               # usage object, any JSON), "repeat" (content repeated N times),
                               # "finish_reason" (replaces it)

Rules are tried in order; the first one that matches and is not used up decides the request.

In process, for pytest (a background thread with its own event loop)::

    import openai
    from tests.servers.openai_server import OpenAITestServer

    with OpenAITestServer(faults=[{"kind": "429", "retry_after_s": 0.2}]) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test-key", max_retries=0,
                                    http_client=openai.DefaultAioHttpClient())
        ...  # the first call raises RateLimitError, the second succeeds
        assert server.stats()["total_requests"] == 2

As a subprocess, which runs until killed and outlives its clients::

    python tests/servers/openai_server.py --port 0 --port-file /tmp/port [--faults JSON] [--latency S]

Only aiohttp and the standard library: this file is copied and run on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "429",
    "500",
    "503",
    "400",
    "timeout",
    "drop",
    "garbled",
    "truncated_json",
    "garbled_content",
    "truncated_content",
    "lie",
)
DEFAULT_MODELS = ("viscon-test-vlm", "viscon-test-llm")
IMAGE_TOKENS = 85
REPLY_CACHE_SIZE = 200_000
MAX_BODY_BYTES = 256 * 1024 * 1024

_RULE_KEYS = {"kind", "match", "times", "per_fingerprint", "retry_after_s", "delay_s", "reply"}
_BEARER = re.compile(r"Bearer\s+\S+")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)
_HOST = re.compile(r"https?://([A-Za-z0-9.-]+)")
_WORD = re.compile(r"[A-Za-z][a-z]{3,}")
_STOPWORDS = frozenset(
    """
    about above after again against also among another answer answers around assistant because been
    before being below between both caption captions could describe described describing description
    detail detailed details does doing down during each every few format from further give given have
    having here human image images include including into itself just more most must only options other
    over page please provide question questions same should some such than that their them then there
    these they this those through under until very visual want were what when where which while with
    within without would write your another-image context contextual text http https html www alt
    round rounds choice multiple letter following example examples based make sure ask asks answered
    like using used many much into onto upon
    """.split()
)
_COLOURS = ["Red", "Blue", "Green", "Yellow", "White", "Black", "Orange", "Purple", "Brown", "Grey"]
_COUNTS = ["One", "Two", "Three", "Four", "Five", "Six", "Seven"]
_POSITIONS = ["On the left side", "On the right side", "In the centre", "Near the top", "Near the bottom"]
_MATERIALS = ["Wood", "Metal", "Glass", "Plastic", "Stone", "Fabric", "Paper"]
_ADJECTIVES = ["Large", "Small", "Bright", "Worn", "Polished", "Crowded", "Tidy"]
_TIMES = ["Early morning", "Midday", "Late afternoon", "Evening", "Night"]
_ACTIVITIES = ["Reading", "Walking", "Cooking", "Talking", "Sitting", "Writing", "Smiling"]
_MC_TEMPLATES: list[tuple[str, list[str]]] = [
    ("What colour is the {a} in the image?", _COLOURS),
    ("How many {a} items can be seen in the picture?", _COUNTS),
    ("Where in the image is the {a} located?", _POSITIONS),
    ("What material does the {a} appear to be made of?", _MATERIALS),
    ("Which word best describes the {a}?", _ADJECTIVES),
    ("What time of day does the scene with the {a} suggest?", _TIMES),
    ("What is the person near the {b} doing?", _ACTIVITIES),
    (
        "According to the page, what is the image mainly about?",
        ["The {a}", "The {b}", "Sports", "Finance", "Travel"],
    ),
    ("What is placed next to the {a}?", ["A {b}", "A window", "A wooden table", "A bicycle", "A plant"]),
]
_QA_TEMPLATES: list[tuple[str, str]] = [
    ("What can be seen in the image?", "The image shows a {a} together with a {b}, both clearly visible."),
    ("How many {a} items are there?", "There are {n} {a} items visible in the picture."),
    ("Where is the {a} positioned?", "The {a} is positioned {pos}, close to the {b}."),
    (
        "What does the page say about the {a}?",
        "The surrounding text links the {a} to the {b}, which the picture illustrates.",
    ),
    ("What colour is the {a}?", "The {a} is mostly {colour}, with lighter details around its edges."),
    (
        "Why might the {a} matter here?",
        "The {a} matters because the page discusses the {b}, and the image shows it concretely.",
    ),
    (
        "What is happening near the {b}?",
        "Near the {b}, someone is {activity}, which gives the scene a lively feel.",
    ),
    (
        "What material is the {b} made of?",
        "The {b} looks like it is made of {material}, judging by its surface.",
    ),
]
_FILLER = (
    "lorem ipsum dolor amet consectetur adipiscing elit sed eiusmod tempor incididunt labore dolore "
    "magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip commodo"
).split()


def fingerprint(body: Any) -> str:
    """The sha256 of a request body's canonical JSON (sorted keys, compact separators, UTF-8).

    >>> fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    True
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class FaultRule:
    """One rule of a fault plan; build it from a dict with :meth:`from_dict`.

    >>> FaultRule.from_dict({"kind": 429, "retry_after_s": 0.2}).kind
    '429'
    """

    kind: str
    match: str = "*"
    times: int | None = 1
    per_fingerprint: bool = False
    retry_after_s: float | None = None
    delay_s: float = 30.0
    reply: dict[str, Any] | None = None
    used: int = 0
    used_by_fingerprint: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> FaultRule:
        if not isinstance(raw, dict):
            raise ValueError(f"a fault rule must be an object, got {raw!r}")
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise ValueError(
                f"unknown fault rule keys {sorted(unknown)}; expected some of {sorted(_RULE_KEYS)}"
            )
        kind = str(raw.get("kind"))
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {list(FAULT_KINDS)}, got {raw.get('kind')!r}")
        match = raw.get("match") or "*"
        if not isinstance(match, str):
            raise ValueError(f"fault 'match' must be a string or '*', got {match!r}")
        times = raw.get("times", 1)
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise ValueError(f"fault 'times' must be an integer >= 1 or null (never used up), got {times!r}")
        retry_after = raw.get("retry_after_s")
        if kind == "429" and retry_after is None:
            retry_after = 1.0
        delay = raw.get("delay_s", 30.0)
        for name, value in (("retry_after_s", retry_after), ("delay_s", delay)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise ValueError(f"fault {name!r} must be a number of seconds >= 0, got {value!r}")
        lie = raw.get("reply")
        if lie is not None and (not isinstance(lie, dict) or set(lie) - {"usage", "repeat", "finish_reason"}):
            raise ValueError(f"fault 'reply' must be an object of usage, repeat, finish_reason; got {lie!r}")
        return cls(
            kind=kind,
            match=match,
            times=times,
            per_fingerprint=bool(raw.get("per_fingerprint", False)),
            retry_after_s=None if retry_after is None else float(retry_after),
            delay_s=float(delay),
            reply=lie,
        )

    def spec(self) -> dict[str, Any]:
        """The rule as :meth:`from_dict` reads it, without its counters."""
        return {
            "kind": self.kind,
            "match": self.match,
            "times": self.times,
            "per_fingerprint": self.per_fingerprint,
            "retry_after_s": self.retry_after_s,
            "delay_s": self.delay_s,
            "reply": self.reply,
        }

    def take(self, fp: str, text: str) -> bool:
        """Whether the rule applies to this request; counts the application when it does."""
        if self.match != "*" and self.match not in text:
            return False
        if self.per_fingerprint:
            seen = self.used_by_fingerprint.get(fp, 0)
            if self.times is not None and seen >= self.times:
                return False
            self.used_by_fingerprint[fp] = seen + 1
        elif self.times is not None and self.used >= self.times:
            return False
        self.used += 1
        return True


def parse_fault_plan(raw: Any) -> list[FaultRule]:
    """Fault rules from a list of dicts, a ``{"faults": [...]}`` object, or their JSON text."""
    if isinstance(raw, str | bytes):
        raw = json.loads(raw)
    if isinstance(raw, dict):
        raw = raw.get("faults", [])
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"a fault plan must be a list of rules, got {type(raw).__name__}")
    return [FaultRule.from_dict(r) for r in raw]


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class _Parsed:
    model: str
    text: str  # every text part of every message: what fault rules match against
    prompt_text: str  # system text and the last user message: what chooses the reply
    images: list[str]  # sha256 of each image data URL
    prompt_tokens: int
    max_tokens: int | None


@dataclass(slots=True)
class _Reply:
    model: str
    content: str
    finish_reason: str
    prompt_tokens: int
    body: bytes


def _error_body(message: str, kind: str, *, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _error(
    status: int,
    message: str,
    kind: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=_error_body(message, kind, code=code, param=param),
        content_type="application/json",
        headers=headers,
    )


def _parse_request(body: Any) -> _Parsed:
    if not isinstance(body, dict):
        raise _BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required and must be a non-empty string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' is required and must be a non-empty list", "messages")
    texts: list[str] = []
    system: list[str] = []
    last_user: list[str] = []
    images: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        role = message["role"]
        content = message.get("content")
        own: list[str] = []
        if isinstance(content, str):
            own.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                own.append(_part_text(part, f"messages[{i}].content[{j}]", images))
        elif not (content is None and role == "assistant"):
            raise _BadRequest(
                f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content"
            )
        own = [t for t in own if t]
        texts.extend(own)
        if role in ("system", "developer"):
            system.extend(own)
        elif role == "user":
            last_user = own
    text = "\n".join(texts)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens")
    return _Parsed(
        model=model,
        text=text,
        prompt_text="\n".join(system + last_user) if last_user else text,
        images=images,
        prompt_tokens=len(text) // 4 + 1 + IMAGE_TOKENS * len(images),
        max_tokens=max_tokens,
    )


def _part_text(part: Any, where: str, images: list[str]) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _BadRequest(f"{where}: a text part needs a string 'text'", where)
        return part["text"]
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if not isinstance(url, str):
            raise _BadRequest(
                f"{where}: expected {{'type': 'image_url', 'image_url': {{'url': ...}}}}", where
            )
        head = _DATA_URL.match(url)
        if head is None:
            raise _BadRequest(f"{where}: the image url must be a data:image/...;base64,... URL", where)
        try:
            if not base64.b64decode(url[head.end() :], validate=True):
                raise _BadRequest(f"{where}: the image data is empty", where)
        except (binascii.Error, ValueError):
            raise _BadRequest(f"{where}: the image data is not valid base64", where) from None
        images.append(hashlib.sha256(url.encode("ascii", "replace")).hexdigest())
        return ""
    raise _BadRequest(
        f"{where}: unsupported content part type {kind!r}; expected 'text' or 'image_url'", where
    )


def _words(text: str) -> list[str]:
    """Distinct content words, in order of first appearance; instruction words left out."""
    words = dict.fromkeys(w.lower() for w in _WORD.findall(text))
    return [w for w in words if w not in _STOPWORDS]


def _pick_words(rng: random.Random, text: str, k: int, defaults: tuple[str, ...]) -> list[str]:
    words = _words(text)
    chosen = rng.sample(words, k) if len(words) >= k else words + list(defaults[: k - len(words)])
    return chosen


def _multiple_choice(rng: random.Random, text: str) -> str:
    items = []
    for question, pool in rng.sample(_MC_TEMPLATES, 4):
        a, b = _pick_words(rng, text, 2, ("object", "scene"))
        options = list(dict.fromkeys(o.format(a=a, b=b) for o in pool))
        options = rng.sample(options, 4)
        letters = "ABCD"
        lines = [f"<Human> {question.format(a=a, b=b)}", "<Options>"]
        lines += [f"{letter}. {option}" for letter, option in zip(letters, options)]
        lines.append(f"<Assistant> {rng.choice(letters)}")
        items.append("\n".join(lines))
    return "\n\n".join(items)


def _free_form(rng: random.Random, text: str) -> str:
    rounds = []
    for question, answer in rng.sample(_QA_TEMPLATES, 4):
        a, b = _pick_words(rng, text, 2, ("object", "scene"))
        values = {
            "a": a,
            "b": b,
            "n": rng.choice(_COUNTS).lower(),
            "pos": rng.choice(_POSITIONS).lower(),
            "colour": rng.choice(_COLOURS).lower(),
            "activity": rng.choice(_ACTIVITIES).lower(),
            "material": rng.choice(_MATERIALS).lower(),
        }
        rounds.append(f"<Human> {question.format(**values)}\n<Assistant> {answer.format(**values)}")
    return "\n".join(rounds)


def _caption(rng: random.Random, text: str, images: list[str]) -> str:
    host_match = _HOST.search(text)
    a, b, c, d = _pick_words(rng, _HOST.sub(" ", text), 4, ("object", "surface", "light", "background"))
    sentences = [f"The image shows a {a} and a {b} in a {rng.choice(_ADJECTIVES).lower()} setting."]
    if host_match:
        sentences.append(f"It comes from a page on {host_match.group(1)}.")
    else:
        sentences.append("It is shown without a source page.")
    sentences.append(f"The surrounding text mentions the {c} and the {d}, which the picture illustrates.")
    if images:
        refs = ", ".join(h[:12] for h in images)
        sentences.append(f"Image reference {refs} identifies this exact picture.")
    else:
        sentences.append("No picture was attached, so the description relies on the text alone.")
    if rng.random() < 0.5:
        sentences.append(f"The {a} sits {rng.choice(_POSITIONS).lower()}, where the eye falls first.")
    return " ".join(sentences)


def _completion_body(fp: str, model: str, content: str, finish_reason: str, prompt_tokens: int) -> bytes:
    completion_tokens = len(content) // 4 + 1
    return json.dumps(
        {
            "id": f"chatcmpl-{fp[:24]}",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "system_fingerprint": "fp_viscon_test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
        ensure_ascii=False,
    ).encode("utf-8")


def make_reply(fp: str, parsed: _Parsed) -> _Reply:
    rng = random.Random(int(fp, 16))
    if "<Options>" in parsed.prompt_text:
        content = _multiple_choice(rng, parsed.prompt_text)
    elif "<Human>" in parsed.prompt_text:
        content = _free_form(rng, parsed.prompt_text)
    else:
        content = _caption(rng, parsed.prompt_text, parsed.images)
    finish_reason = "stop"
    if parsed.max_tokens is not None and len(content) // 4 + 1 > parsed.max_tokens:
        content, finish_reason = content[: parsed.max_tokens * 4], "length"
    body = _completion_body(fp, parsed.model, content, finish_reason, parsed.prompt_tokens)
    return _Reply(parsed.model, content, finish_reason, parsed.prompt_tokens, body)


# --- prompt_logprobs (vLLM's extension) ---------------------------------------------------------

_PROMPT_WORDS = tuple(
    "the a of and to in is on with red blue small large cat dog tree river stone bread cup table "
    "left right three four two one old new bright dark near far under over".split()
)
_PROMPT_TOKEN = re.compile(r"\s*\S+")


def _token_id(token: str) -> int:
    return 100 + int(hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) % 30000


def prompt_logprobs_fields(body: dict[str, Any], k: int) -> dict[str, Any]:
    """``prompt_logprobs`` and ``prompt_token_ids`` for the prompt this body renders to.

    The prompt is ``role: text`` per message (an image is ``<image>``), one line each; with
    ``continue_final_message`` the last message is left open, so the prompt ends with its text. Each
    position's distribution is seeded by the text before it and the sha256 of every image, so a
    prompt with an image and the same prompt without it give different log-probabilities.
    """
    images: list[str] = []
    lines = []
    for i, message in enumerate(body["messages"]):
        content = message.get("content")
        parts = [content] if isinstance(content, str) else []
        for j, part in enumerate(content if isinstance(content, list) else []):
            text = _part_text(part, f"messages[{i}].content[{j}]", images)
            parts.append(text if part.get("type") == "text" else "<image>")
        lines.append(f"{message['role']}: {''.join(parts)}")
    prompt = "\n".join(lines)
    if not body.get("continue_final_message"):
        prompt += "\nassistant:"
    tokens = _PROMPT_TOKEN.findall(prompt)
    ids = [_token_id(t) for t in tokens]
    seen = "|".join(images)
    out: list[Any] = [None]
    for i in range(1, len(tokens)):
        rng = random.Random(
            hashlib.sha256(f"{seen}#{''.join(tokens[:i])}".encode("utf-8", "surrogatepass")).digest()
        )
        others = [
            w for w in rng.sample(_PROMPT_WORDS, min(k, len(_PROMPT_WORDS))) if _token_id(" " + w) != ids[i]
        ]
        candidates = [(ids[i], tokens[i])] + [(_token_id(" " + w), " " + w) for w in others[:k]]
        logits = [rng.gauss(0.0, 2.0) for _ in candidates]
        # A fixed share of mass lies outside the listed tokens, as with any top-k list.
        norm = math.log(sum(math.exp(x) for x in logits) + math.exp(max(logits)))
        ranked = sorted(range(len(candidates)), key=lambda c: -logits[c])
        out.append(
            {
                str(tid): {"logprob": logits[c] - norm, "rank": ranked.index(c) + 1, "decoded_token": text}
                for c, (tid, text) in enumerate(candidates)
            }
        )
    return {"prompt_logprobs": out, "prompt_token_ids": ids}


def _with_prompt_logprobs(reply: _Reply, body: dict[str, Any]) -> _Reply:
    k = body.get("prompt_logprobs")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20:
        raise _BadRequest(f"'prompt_logprobs' must be an integer in [0, 20], got {k!r}", "prompt_logprobs")
    data = json.loads(reply.body)
    data.update(prompt_logprobs_fields(body, k))
    return replace(reply, body=json.dumps(data, ensure_ascii=False).encode("utf-8"))


class ServerState:
    """Counters, the fault plan and the reply cache; touched only from the server's event loop."""

    def __init__(
        self, *, faults: Any = None, latency_s: float = 0.0, models: tuple[str, ...] = DEFAULT_MODELS
    ) -> None:
        self._initial_faults = [r.spec() for r in parse_fault_plan(faults)]
        self._initial_latency = _check_latency(latency_s)
        self.models = tuple(models)
        self.replies: dict[str, _Reply] = {}
        self.closing: asyncio.Event | None = None
        self.reset()

    def reset(self) -> None:
        self.faults = parse_fault_plan(self._initial_faults)
        self.latency_s = self._initial_latency
        self.total_requests = 0
        self.model_list_requests = 0
        self.fingerprints: list[str] = []
        self.fingerprint_counts: Counter[str] = Counter()
        self.faults_injected: list[dict[str, Any]] = []
        self.fault_counts: Counter[str] = Counter()
        self.status_counts: Counter[str] = Counter()

    def set_faults(self, rules: list[FaultRule], latency_s: float | None = None) -> None:
        self.faults = rules
        if latency_s is not None:
            self.latency_s = latency_s

    def stats(self) -> dict[str, Any]:
        return {
            "total_requests": self.total_requests,
            "fingerprints": list(self.fingerprints),
            "fingerprint_counts": dict(self.fingerprint_counts),
            "duplicates": sorted(fp for fp, n in self.fingerprint_counts.items() if n > 1),
            "faults_injected": list(self.faults_injected),
            "fault_counts": dict(self.fault_counts),
            "status_counts": dict(self.status_counts),
            "model_list_requests": self.model_list_requests,
            "fault_plan": [{**r.spec(), "used": r.used} for r in self.faults],
            "latency_s": self.latency_s,
        }

    def pick_fault(self, fp: str, text: str) -> FaultRule | None:
        for index, rule in enumerate(self.faults):
            if rule.take(fp, text):
                self.faults_injected.append({"kind": rule.kind, "rule": index, "fingerprint": fp})
                self.fault_counts[rule.kind] += 1
                return rule
        return None

    def reply_for(self, fp: str, parsed: _Parsed) -> _Reply:
        reply = self.replies.get(fp)
        if reply is None:
            reply = make_reply(fp, parsed)
            if len(self.replies) >= REPLY_CACHE_SIZE:
                del self.replies[next(iter(self.replies))]
            self.replies[fp] = reply
        return reply

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server shuts down so that closing never waits on a fault."""
        if seconds <= 0:
            return
        if self.closing is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass


STATE = web.AppKey("state", ServerState)


def _check_latency(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"latency_s must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _respond(state: ServerState, status: int | str, response: web.StreamResponse) -> web.StreamResponse:
    state.status_counts[str(status)] += 1
    return response


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    state.total_requests += 1
    # The key is checked for presence only and never logged or echoed.
    if not _BEARER.fullmatch(request.headers.get("Authorization", "").strip()):
        message = "missing or malformed Authorization header: expected 'Bearer <api key>'"
        return _respond(state, 401, _error(401, message, "invalid_request_error", code="invalid_api_key"))
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        return _respond(
            state, 400, _error(400, "the request body is not valid JSON", "invalid_request_error")
        )
    fp = fingerprint(body)
    state.fingerprints.append(fp)
    state.fingerprint_counts[fp] += 1
    try:
        parsed = _parse_request(body)
    except _BadRequest as e:
        return _respond(state, 400, _error(400, str(e), "invalid_request_error", param=e.param))
    if body.get("stream"):
        message = "streaming is not supported by this test server; send stream=false"
        return _respond(state, 400, _error(400, message, "invalid_request_error", param="stream"))
    await state.pause(state.latency_s)
    rule = state.pick_fault(fp, parsed.text)
    reply = state.reply_for(fp, parsed)
    if body.get("prompt_logprobs") is not None:
        try:
            reply = _with_prompt_logprobs(reply, body)
        except _BadRequest as e:
            return _respond(state, 400, _error(400, str(e), "invalid_request_error", param=e.param))
    if rule is None:
        return _respond(state, 200, web.Response(body=reply.body, content_type="application/json"))
    return await _inject(state, request, rule, fp, reply)


async def _inject(
    state: ServerState, request: web.Request, rule: FaultRule, fp: str, reply: _Reply
) -> web.StreamResponse:
    kind = rule.kind
    headers = {"Retry-After": f"{rule.retry_after_s:g}"} if rule.retry_after_s is not None else None
    if kind == "429":
        message = "Rate limit reached (injected fault). Please retry after the Retry-After delay."
        return _respond(
            state, 429, _error(429, message, "rate_limit_error", code="rate_limit_exceeded", headers=headers)
        )
    if kind in ("500", "503"):
        message = f"The server had an error while processing your request (injected {kind})."
        return _respond(
            state,
            kind,
            _error(int(kind), message, "server_error", headers=headers if kind == "503" else None),
        )
    if kind == "400":
        message = "Invalid request (injected permanent fault)."
        return _respond(state, 400, _error(400, message, "invalid_request_error", code="invalid_request"))
    if kind == "timeout":
        await state.pause(rule.delay_s)
        return _respond(state, 200, web.Response(body=reply.body, content_type="application/json"))
    if kind == "drop":
        state.status_counts["drop"] += 1
        if request.transport is not None:
            request.transport.abort()
        # The transport is gone; aiohttp stops at the failed write and sends nothing.
        return web.Response(status=500)
    if kind == "garbled":
        body = b"<html><body>502 Bad Gateway: upstream sent something that is not JSON</body></html>"
        return _respond(state, 200, web.Response(body=body, content_type="application/json"))
    if kind == "truncated_json":
        return _respond(
            state, 200, web.Response(body=reply.body[: len(reply.body) // 2], content_type="application/json")
        )
    if kind == "garbled_content":
        rng = random.Random(f"garbled:{fp}")
        content = " ".join(rng.choice(_FILLER) for _ in range(max(8, len(reply.content) // 6)))
        body = _completion_body(fp, reply.model, content, "stop", reply.prompt_tokens)
        return _respond(state, 200, web.Response(body=body, content_type="application/json"))
    if kind == "lie":
        data = json.loads(reply.body)
        lie = rule.reply or {}
        if "usage" in lie:
            data["usage"] = lie["usage"]
        if "repeat" in lie:
            data["choices"][0]["message"]["content"] = reply.content * int(lie["repeat"])
        if "finish_reason" in lie:
            data["choices"][0]["finish_reason"] = lie["finish_reason"]
        body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        return _respond(state, 200, web.Response(body=body, content_type="application/json"))
    # truncated_content
    content = reply.content[: len(reply.content) // 2]
    body = _completion_body(fp, reply.model, content, "length", reply.prompt_tokens)
    return _respond(state, 200, web.Response(body=body, content_type="application/json"))


async def _models(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    state.model_list_requests += 1
    if not _BEARER.fullmatch(request.headers.get("Authorization", "").strip()):
        message = "missing or malformed Authorization header: expected 'Bearer <api key>'"
        return _error(401, message, "invalid_request_error", code="invalid_api_key")
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "viscon-test"} for m in state.models]
    return web.json_response({"object": "list", "data": data})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats())


async def _set_faults(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    try:
        raw = json.loads(await request.read() or b"[]")
        rules = parse_fault_plan(raw)
        latency = _check_latency(raw["latency_s"]) if isinstance(raw, dict) and "latency_s" in raw else None
    except (ValueError, KeyError) as e:
        return _error(400, f"bad fault plan: {e}", "invalid_request_error")
    state.set_faults(rules, latency)
    return web.json_response({"ok": True, "faults": len(rules), "latency_s": state.latency_s})


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"ok": True})


# -- Files and Batch API ----------------------------------------------------------------------------
# A batch is processed on the poll that finds it ready, line by line through the same reply function
# as /v1/chat/completions, so a batch run and an online run get identical replies. A batch plan (set
# with OpenAITestServer.set_batch_plan or POST /_batch_plan) makes the server hold batches, expire
# them part way, fail some lines, refuse big uploads, or lie in its output files.

BATCH_PLAN_DEFAULTS: dict[str, Any] = {
    "polls_to_finish": 1,  # GETs of a batch before it is processed
    "hold": False,  # True: batches stay in_progress until the plan says otherwise
    "expire_after": None,  # process only the first N lines, the rest expire (status "expired")
    "fail_match": None,  # lines whose text contains this substring fail with status 500
    "max_file_bytes": 200 * 1024 * 1024,  # uploads above this answer 413
    "max_requests": 50_000,  # batches with more lines fail validation
    "lie": None,  # "garbled": junk and unknown ids in the output; "no_output": completed, no file
}
BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchState:
    """Uploaded files, batches and their counters; touched only from the server's event loop."""

    def __init__(self) -> None:
        self.plan = dict(BATCH_PLAN_DEFAULTS)
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.uploads = 0
        self.upload_bytes: list[int] = []
        self.batch_polls = 0
        self.line_counts: list[int] = []

    def set_plan(self, plan: dict[str, Any]) -> None:
        unknown = set(plan) - set(BATCH_PLAN_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown batch plan keys {sorted(unknown)}; expected {sorted(BATCH_PLAN_DEFAULTS)}"
            )
        self.plan.update(plan)

    def stats(self) -> dict[str, Any]:
        return {
            "uploads": self.uploads,
            "upload_bytes": list(self.upload_bytes),
            "batches_created": len(self.batches),
            "batch_line_counts": list(self.line_counts),
            "batch_polls": self.batch_polls,
            "batch_status": {k: b["status"] for k, b in self.batches.items()},
            "plan": dict(self.plan),
        }

    def add_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{hashlib.sha256(data).hexdigest()[:16]}-{len(self.files)}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": 0,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[file_id] = {"meta": obj, "data": data}
        return obj


BATCHES = web.AppKey("batches", BatchState)


def _authorised(request: web.Request) -> bool:
    return bool(_BEARER.fullmatch(request.headers.get("Authorization", "").strip()))


def _unauthorised() -> web.Response:
    message = "missing or malformed Authorization header: expected 'Bearer <api key>'"
    return _error(401, message, "invalid_request_error", code="invalid_api_key")


async def _files_create(request: web.Request) -> web.Response:
    batches: BatchState = request.app[BATCHES]
    if not _authorised(request):
        return _unauthorised()
    form = await request.post()
    upload = form.get("file")
    purpose = form.get("purpose")
    if upload is None or not hasattr(upload, "file"):
        return _error(400, "a multipart 'file' field is required", "invalid_request_error", param="file")
    if purpose != "batch":
        return _error(
            400, f"purpose must be 'batch', got {purpose!r}", "invalid_request_error", param="purpose"
        )
    data = upload.file.read()
    if len(data) > batches.plan["max_file_bytes"]:
        message = f"file of {len(data)} bytes exceeds the {batches.plan['max_file_bytes']} byte limit"
        return _error(413, message, "invalid_request_error", code="file_too_large")
    batches.uploads += 1
    batches.upload_bytes.append(len(data))
    return web.json_response(batches.add_file(data, upload.filename or "upload.jsonl", purpose))


async def _files_content(request: web.Request) -> web.Response:
    batches: BatchState = request.app[BATCHES]
    if not _authorised(request):
        return _unauthorised()
    entry = batches.files.get(request.match_info["file_id"])
    if entry is None:
        return _error(404, "no such file", "invalid_request_error", code="not_found")
    return web.Response(body=entry["data"], content_type="application/octet-stream")


async def _batches_create(request: web.Request) -> web.Response:
    batches: BatchState = request.app[BATCHES]
    if not _authorised(request):
        return _unauthorised()
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "the request body is not valid JSON", "invalid_request_error")
    if not isinstance(body, dict) or body.get("input_file_id") not in batches.files:
        return _error(
            400, "input_file_id names no uploaded file", "invalid_request_error", param="input_file_id"
        )
    if body.get("endpoint") != "/v1/chat/completions":
        return _error(400, "only /v1/chat/completions batches", "invalid_request_error", param="endpoint")
    data = batches.files[body["input_file_id"]]["data"]
    lines = [line for line in data.splitlines() if line.strip()]
    batch_id = f"batch_{len(batches.batches):04d}_{hashlib.sha256(data).hexdigest()[:12]}"
    batch = {
        "id": batch_id,
        "object": "batch",
        "endpoint": body["endpoint"],
        "errors": None,
        "input_file_id": body["input_file_id"],
        "completion_window": body.get("completion_window", "24h"),
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": 0,
        "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        "metadata": body.get("metadata"),
        "_polls": 0,
    }
    batches.line_counts.append(len(lines))
    if len(lines) > batches.plan["max_requests"]:
        batch["status"] = "failed"
        batch["errors"] = {
            "object": "list",
            "data": [{"code": "too_many_requests", "message": f"{len(lines)} requests in one batch"}],
        }
    batches.batches[batch_id] = batch
    return web.json_response(_public(batch))


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


async def _batches_get(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    batches: BatchState = request.app[BATCHES]
    if not _authorised(request):
        return _unauthorised()
    batch = batches.batches.get(request.match_info["batch_id"])
    if batch is None:
        return _error(404, "no such batch", "invalid_request_error", code="not_found")
    batches.batch_polls += 1
    batch["_polls"] += 1
    if batch["status"] not in BATCH_TERMINAL:
        if batches.plan["hold"] or batch["_polls"] < batches.plan["polls_to_finish"]:
            batch["status"] = "in_progress"
        else:
            _process_batch(state, batches, batch)
    return web.json_response(_public(batch))


def _process_batch(state: ServerState, batches: BatchState, batch: dict[str, Any]) -> None:
    plan = batches.plan
    data = batches.files[batch["input_file_id"]]["data"]
    out: list[str] = []
    err: list[str] = []
    expired = False
    for n, raw in enumerate(line for line in data.splitlines() if line.strip()):
        try:
            item = json.loads(raw)
            custom_id, body = item["custom_id"], item["body"]
        except (ValueError, KeyError, TypeError):
            err.append(
                json.dumps(
                    {
                        "id": f"batch_req_{n}",
                        "custom_id": None,
                        "response": None,
                        "error": {"code": "invalid_json_line", "message": "unreadable line"},
                    }
                )
            )
            continue
        if plan["expire_after"] is not None and n >= plan["expire_after"]:
            expired = True
            err.append(
                json.dumps(
                    {
                        "id": f"batch_req_{n}",
                        "custom_id": custom_id,
                        "response": None,
                        "error": {"code": "batch_expired", "message": "the batch expired"},
                    }
                )
            )
            continue
        try:
            parsed = _parse_request(body)
        except _BadRequest as e:
            response = {
                "status_code": 400,
                "request_id": f"req_{n}",
                "body": json.loads(_error_body(str(e), "invalid_request_error")),
            }
            err.append(
                json.dumps(
                    {"id": f"batch_req_{n}", "custom_id": custom_id, "response": response, "error": None}
                )
            )
            continue
        if plan["fail_match"] and plan["fail_match"] in parsed.text:
            response = {
                "status_code": 500,
                "request_id": f"req_{n}",
                "body": json.loads(_error_body("injected batch line failure", "server_error")),
            }
            err.append(
                json.dumps(
                    {"id": f"batch_req_{n}", "custom_id": custom_id, "response": response, "error": None}
                )
            )
            continue
        reply = state.reply_for(fingerprint(body), parsed)
        response = {"status_code": 200, "request_id": f"req_{n}", "body": json.loads(reply.body)}
        out.append(
            json.dumps(
                {"id": f"batch_req_{n}", "custom_id": custom_id, "response": response, "error": None},
                ensure_ascii=False,
            )
        )
    if plan["lie"] == "garbled":
        out.insert(0, "<html>not json</html>")
        out.append(
            json.dumps(
                {
                    "id": "batch_req_x",
                    "custom_id": "f" * 64,
                    "response": {
                        "status_code": 200,
                        "body": {"choices": [{"message": {"content": "stray"}}]},
                    },
                    "error": None,
                }
            )
        )
        out.append(json.dumps({"id": "batch_req_z", "custom_id": "e" * 64, "response": {"status_code": 200}}))
        out.append(json.dumps({"id": "batch_req_y", "custom_id": 7, "response": "nonsense"}))
        if out[1:]:
            out[1] = out[1][: len(out[1]) // 2]  # a torn line: that request stays unfinished
    batch["request_counts"]["completed"] = len(out)
    batch["request_counts"]["failed"] = len(err)
    if out and plan["lie"] != "no_output":
        batch["output_file_id"] = batches.add_file(
            ("\n".join(out) + "\n").encode(), "output.jsonl", "batch_output"
        )["id"]
    if err:
        batch["error_file_id"] = batches.add_file(
            ("\n".join(err) + "\n").encode(), "errors.jsonl", "batch_output"
        )["id"]
    batch["status"] = "expired" if expired else "completed"


async def _batch_plan(request: web.Request) -> web.Response:
    batches: BatchState = request.app[BATCHES]
    try:
        raw = json.loads(await request.read() or b"{}")
        if not isinstance(raw, dict):
            raise ValueError("a batch plan is a JSON object")
        batches.set_plan(raw)
    except ValueError as e:
        return _error(400, f"bad batch plan: {e}", "invalid_request_error")
    return web.json_response({"ok": True, "plan": batches.plan})


async def _batch_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[BATCHES].stats())


def add_batch_routes(app: web.Application) -> None:
    """The Files and Batch API routes, and their test controls."""
    app[BATCHES] = BatchState()
    app.router.add_post("/v1/files", _files_create)
    app.router.add_get("/v1/files/{file_id}/content", _files_content)
    app.router.add_post("/v1/batches", _batches_create)
    app.router.add_get("/v1/batches/{batch_id}", _batches_get)
    app.router.add_post("/_batch_plan", _batch_plan)
    app.router.add_get("/_batch_stats", _batch_stats)


def make_app(state: ServerState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_stats", _stats)
    app.router.add_post("/_faults", _set_faults)
    app.router.add_post("/_reset", _reset)
    add_batch_routes(app)
    return app


async def _start(state: ServerState, host: str, port: int) -> tuple[web.AppRunner, int]:
    state.closing = asyncio.Event()
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def _stop(state: ServerState, runner: web.AppRunner) -> None:
    if state.closing is not None:
        state.closing.set()
    await runner.cleanup()


class OpenAITestServer:
    """The server on 127.0.0.1 in a background thread with its own event loop.

    >>> with OpenAITestServer() as server:
    ...     server.base_url.startswith("http://127.0.0.1:") and server.stats()["total_requests"] == 0
    True
    """

    def __init__(
        self,
        *,
        faults: Any = None,
        latency_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        models: tuple[str, ...] = DEFAULT_MODELS,
    ) -> None:
        self._state = ServerState(faults=faults, latency_s=latency_s, models=models)
        self.host = host
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._requested_port = port

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:PORT`` (control endpoints live here)."""
        if self.port is None:
            raise RuntimeError("OpenAITestServer is not started: use it as a context manager or call start()")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as the OpenAI client's ``base_url``: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def start(self) -> OpenAITestServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._runner, self.port = loop.run_until_complete(
                    _start(self._state, self.host, self._requested_port)
                )
            except BaseException as e:  # handed to the starting thread
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=serve, name="openai-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("OpenAITestServer did not start within 30 s")
        if failure:
            self._thread = None
            raise RuntimeError(
                f"OpenAITestServer could not listen on {self.host}:{self._requested_port}"
            ) from failure[0]
        return self

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._loop is None or self._thread is None:
            raise RuntimeError("OpenAITestServer is not started: use it as a context manager or call start()")

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """Counters since start or the last reset: the same JSON as ``GET /_stats``."""
        return self._call(self._state.stats)

    def set_faults(self, faults: Any, *, latency_s: float | None = None) -> None:
        """Replace the fault plan (a list of rule dicts; ``[]`` clears it) and optionally the latency."""
        rules = parse_fault_plan(faults)
        latency = None if latency_s is None else _check_latency(latency_s)
        self._call(self._state.set_faults, rules, latency)

    def reset(self) -> None:
        """Clear the counters and restore the start-up fault plan and latency."""
        self._call(self._state.reset)

    def set_batch_plan(self, **plan: Any) -> None:
        """Change how batches behave (keys of ``BATCH_PLAN_DEFAULTS``)."""
        self._call(self._batches().set_plan, plan)

    def batch_stats(self) -> dict[str, Any]:
        """Uploads, batches created, polls and batch statuses: the JSON of ``GET /_batch_stats``."""
        return self._call(self._batches().stats)

    def _batches(self) -> BatchState:
        assert self._runner is not None, "OpenAITestServer is not started"
        return self._runner.app[BATCHES]

    def close(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(_stop(self._state, self._runner), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._thread = None
        self._loop = None
        self._runner = None

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_faults(value: str | None) -> Any:
    if not value:
        return None
    if value.startswith("@"):
        return json.loads(Path(value[1:]).read_text(encoding="utf-8"))
    return json.loads(value)


async def _serve_forever(state: ServerState, host: str, port: int, port_file: str | None) -> None:
    runner, bound = await _start(state, host, port)
    if port_file:
        # Written atomically, so a reader never sees a half-written port.
        tmp = Path(f"{port_file}.tmp.{os.getpid()}")
        tmp.write_text(str(bound), encoding="utf-8")
        os.replace(tmp, port_file)
    sys.stderr.write(f"openai test server listening on http://{host}:{bound}/v1\n")
    sys.stderr.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await _stop(state, runner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Local OpenAI-compatible chat server for tests, with fault injection."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument(
        "--faults", help="fault plan as JSON (a list of rules or {'faults': [...]}), or @PATH"
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every completion (default 0)"
    )
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="comma-separated names for /v1/models"
    )
    args = parser.parse_args(argv)
    try:
        state = ServerState(
            faults=_read_faults(args.faults),
            latency_s=args.latency,
            models=tuple(m for m in args.models.split(",") if m),
        )
    except (ValueError, OSError) as e:
        parser.error(str(e))
    asyncio.run(_serve_forever(state, args.host, args.port, args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
