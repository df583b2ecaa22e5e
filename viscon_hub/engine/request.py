"""A model request, keyed by its canonical content, and what came back for it.

The key is a sha256 over (stage, model, template id and version, messages, sampling parameters);
images appear in messages as ``{"type": "image", "sha256": ...}`` so that a request is identified by
the bytes of its images, never by where they were fetched from.

>>> r = Request.create(stage="qa_freeform", model="m", template_id="qa", template_version=1,
...                    messages=[{"role": "user", "content": "hi"}], sampling={"temperature": 0.0})
>>> len(r.key), r.key == Request.create(stage="qa_freeform", model="m", template_id="qa",
...     template_version=1, messages=[{"role": "user", "content": "hi"}], sampling={"temperature": 0.0}).key
(64, True)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any, Literal

KEY_VERSION = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Request:
    """One model call. Build it with :meth:`create`; ``key`` is derived, never passed in."""

    stage: str
    model: str
    template_id: str
    template_version: int
    messages_json: str
    sampling_json: str
    key: str
    images: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        *,
        stage: str,
        model: str,
        template_id: str,
        template_version: int,
        messages: list[dict[str, Any]],
        sampling: dict[str, Any],
    ) -> Request:
        images = tuple(_image_hashes(messages))
        messages_json = canonical_json(messages)
        sampling_json = canonical_json({k: v for k, v in sampling.items() if v is not None})
        # The canonical JSON of {"messages", "model", "sampling", "stage", "template", "v"} (keys in
        # sorted order), assembled from the parts already serialised: hashing is on the hot path of
        # every cached replay and of the dedup's embeddings.
        q = encode_basestring  # what json.dumps(..., ensure_ascii=False) does to a str
        body = (
            f'{{"messages":{messages_json},"model":{q(model)},"sampling":{sampling_json},'
            f'"stage":{q(stage)},"template":[{q(template_id)},{int(template_version)}],"v":{KEY_VERSION}}}'
        )
        key = hashlib.sha256(body.encode("utf-8")).hexdigest()
        return cls(
            stage, model, template_id, int(template_version), messages_json, sampling_json, key, images
        )

    @property
    def messages(self) -> list[dict[str, Any]]:
        return json.loads(self.messages_json)

    @property
    def sampling(self) -> dict[str, Any]:
        return json.loads(self.sampling_json)

    def estimated_prompt_tokens(self) -> int:
        """A cheap estimate (4 characters a token, 765 tokens an image) for rate limits and dry runs."""
        text_chars = len(self.messages_json) - 80 * len(self.images)
        return max(1, text_chars // 4) + 765 * len(self.images)

    @property
    def max_tokens(self) -> int:
        return int(self.sampling.get("max_tokens") or 512)


def _image_hashes(messages: list[dict[str, Any]]) -> list[str]:
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    sha = part.get("sha256")
                    if not isinstance(sha, str) or len(sha) != 64:
                        raise ValueError(f"an image part needs the sha256 of its bytes; got {part!r}")
                    found.append(sha)
    return found


ErrorKind = Literal["permanent", "transient"]


@dataclass(slots=True)
class Completion:
    """What a backend returned for one request (or the error that ended it)."""

    key: str
    reply: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    error_kind: ErrorKind | None = None
    attempts: int = 1
    model: str = ""
    stage: str = ""
    template_id: str = ""
    template_version: int = 0
    timestamp: float = 0.0
    from_cache: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.reply is not None
