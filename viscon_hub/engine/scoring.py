"""Scoring requests: how much an answer depends on the image (C3L's image-instruction correspondence).

A scoring request is an ordinary :class:`~viscon_hub.engine.request.Request` whose sampling holds
``{"score": "c3l"}``: its messages end with the assistant turn to score, and its reply is the JSON of
:func:`scores_reply`, so the engine caches and replays scores like any other reply. The backend
scores the answer twice under teacher forcing, with the request's images and with them removed:

``kl``    mean over answer tokens of KL(P(. | image, question, prefix) || P(. | question, prefix))
``pmi``   log P(answer | image, question) - log P(answer | question), summed over answer tokens

Local models give the exact KL over the vocabulary. A server that returns only the top-k prompt
log-probabilities (vLLM's ``prompt_logprobs``) gives :func:`topk_kl`: the sum over the with-image
top-k, where a token missing from the without-image top-k takes the smallest log-probability listed
there (an upper bound on its probability, so the KL is under- rather than over-estimated).

>>> topk_kl({1: -0.1, 2: -2.5}, {1: -0.1, 2: -2.5})
0.0
>>> round(topk_kl({1: -0.1, 2: -2.5}, {1: -2.5, 2: -0.1}), 3)
1.975
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

SCORE_KIND = "c3l"


def is_scoring(sampling: dict[str, Any]) -> bool:
    return sampling.get("score") == SCORE_KIND


def scores_reply(
    *, kl: Sequence[float], image_logprobs: Sequence[float], text_logprobs: Sequence[float]
) -> str:
    """The reply text of a scoring request: per-answer-token figures reduced to the two scores."""
    n = len(image_logprobs)
    if n == 0 or len(text_logprobs) != n or len(kl) != n:
        raise ValueError(
            "a score needs one KL and two log-probabilities per answer token, at least one token"
        )
    values = {
        "kl": sum(kl) / n,
        "pmi": sum(image_logprobs) - sum(text_logprobs),
        "logp_image": sum(image_logprobs),
        "logp_text": sum(text_logprobs),
        "tokens": n,
    }
    if not all(math.isfinite(v) for v in values.values()):
        raise ValueError(f"non-finite score {values}")
    return json.dumps(
        {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}, sort_keys=True
    )


def parse_scores(reply: str | None) -> dict[str, float] | None:
    """The scores of a scoring reply, or None when the reply is not one (a lying server, a truncated file).

    >>> parse_scores('{"kl": 0.5, "pmi": 1.25, "tokens": 3}')["pmi"]
    1.25
    >>> parse_scores("not json") is None, parse_scores('{"kl": "NaN", "pmi": 1}') is None
    (True, True)
    """
    try:
        data = json.loads(reply or "")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    out = {}
    for name in ("kl", "pmi"):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        out[name] = float(value)
    return out


def topk_kl(with_image: dict[Any, float], without_image: dict[Any, float]) -> float:
    """KL over the with-image top-k log-probabilities (see the module doc)."""
    if not with_image:
        return 0.0
    floor = min(without_image.values()) if without_image else math.log(1e-9)
    total = 0.0
    for token, lp in with_image.items():
        lq = without_image.get(token, floor)
        total += math.exp(lp) * (lp - min(lq, 0.0))
    # Each term's sign depends on the pair; a truncated sum can dip below zero, which a KL cannot.
    return max(total, 0.0)


def answer_tail(
    prompt_logprobs: Any, prompt_token_ids: Any, answer: str
) -> list[tuple[int, float, dict[int, float]]]:
    """(token id, its log-probability, the top-k log-probabilities) for each answer token at the prompt's end.

    ``prompt_logprobs`` and ``prompt_token_ids`` are what a vLLM server returns for a prompt that ends
    with the answer (``continue_final_message``): per prompt token, a mapping of token id to
    ``{"logprob", "rank", "decoded_token"}`` holding the top-k and the prompt's own token. The answer's
    tokens are found by decoding backwards until they spell the answer. Raises ValueError for a reply
    that does not have this shape or does not end with the answer.

    >>> lp = [None, {"5": {"logprob": -1.0, "decoded_token": " A"}},
    ...       {"6": {"logprob": -0.5, "decoded_token": " cat"}, "7": {"logprob": -1.5, "decoded_token": " dog"}}]
    >>> answer_tail(lp, [4, 5, 6], "A cat")
    [(5, -1.0, {5: -1.0}), (6, -0.5, {6: -0.5, 7: -1.5})]
    """
    if not isinstance(prompt_logprobs, list) or not isinstance(prompt_token_ids, list):
        raise ValueError("the reply has no prompt_logprobs / prompt_token_ids lists")
    if len(prompt_logprobs) != len(prompt_token_ids):
        raise ValueError("prompt_logprobs and prompt_token_ids differ in length")
    target = answer.strip()
    spelled = ""
    out: list[tuple[int, float, dict[int, float]]] = []
    for i in range(len(prompt_token_ids) - 1, 0, -1):
        entry, token = prompt_logprobs[i], prompt_token_ids[i]
        if not isinstance(entry, dict) or isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"prompt token {i} has no log-probabilities")
        top: dict[int, float] = {}
        for key, value in entry.items():
            lp = value.get("logprob") if isinstance(value, dict) else None
            if isinstance(lp, bool) or not isinstance(lp, int | float) or not math.isfinite(lp) or lp > 0:
                raise ValueError(f"prompt token {i}: log-probability {lp!r} is not a number <= 0")
            try:
                top[int(key)] = float(lp)
            except ValueError:
                raise ValueError(f"prompt token {i}: token id {key!r} is not an integer") from None
        own = entry.get(str(token))
        if token not in top or not isinstance(own, dict) or not isinstance(own.get("decoded_token"), str):
            raise ValueError(
                f"prompt token {i}: the prompt's own token is missing from its log-probabilities"
            )
        out.append((token, top[token], top))
        spelled = own["decoded_token"] + spelled
        if spelled.strip() == target:
            return out[::-1]
        if len(spelled.strip()) > len(target):
            break
    raise ValueError("the prompt does not end with the answer's tokens")


__all__ = ["SCORE_KIND", "answer_tail", "is_scoring", "parse_scores", "scores_reply", "topk_kl"]
