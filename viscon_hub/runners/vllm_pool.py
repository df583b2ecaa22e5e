"""vLLM on GPUs through Ray: one engine per GPU as a Ray actor, shared by every generate worker.

When the runner is Ray and a model spec is ``vllm:MODEL``, the driver starts a pool of
:class:`VLLMEngineActor` (one GPU each) for that model, and each generate worker's engine talks to
the pool through :class:`RayVLLMBackend` instead of loading vLLM itself. The worker still owns the
cache, so a reply already stored is never sent to a GPU; the backend only turns a batch of requests
into conversations (images read from the store on the worker), deals them out to the engines in
equal slices and maps the outputs back.

``llm_class`` and ``sampling_class`` default to ``vllm.LLM`` and ``vllm.SamplingParams``; they are
parameters so a CPU-only test can stand in a class with the same ``chat`` call.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from viscon_hub.engine.backends.base import BackendError, ImageLoader, ThreadedBatchBackend, openai_messages
from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import ConfigError

logger = logging.getLogger(__name__)


class VLLMEngineActor:
    """One vLLM engine, run as a Ray actor holding one GPU. ``chat`` returns plain dicts."""

    def __init__(
        self,
        model: str,
        *,
        llm_options: dict[str, Any] | None = None,
        llm_class: Any = None,
        sampling_class: Any = None,
    ) -> None:
        if llm_class is None or sampling_class is None:
            from viscon_hub.engine.backends.base import require

            vllm = require("vllm", "vllm")
            llm_class = llm_class or vllm.LLM
            sampling_class = sampling_class or vllm.SamplingParams
        self.sampling_class = sampling_class
        self.llm = llm_class(model=model, **(llm_options or {}))

    def chat(self, conversations: list[list[dict[str, Any]]], sampling: list[dict[str, Any]]) -> list[dict]:
        params = [
            self.sampling_class(
                temperature=float(s.get("temperature", 0.0)),
                top_p=float(s.get("top_p", 1.0)),
                max_tokens=int(s.get("max_tokens", 512)),
                seed=s.get("seed"),
            )
            for s in sampling
        ]
        started = time.perf_counter()
        results = self.llm.chat(conversations, params, use_tqdm=False)
        latency = (time.perf_counter() - started) / max(1, len(conversations))
        out = []
        for r in results:
            gen = r.outputs[0]
            out.append(
                {
                    "text": gen.text,
                    "finish_reason": gen.finish_reason,
                    "prompt_tokens": len(r.prompt_token_ids or []),
                    "completion_tokens": len(gen.token_ids),
                    "latency_s": latency,
                }
            )
        return out


@dataclass(frozen=True, slots=True)
class VLLMPool:
    """Handles of the engine actors serving one model; picklable, so workers receive it as is."""

    model: str
    actors: tuple[Any, ...]

    @classmethod
    def start(
        cls,
        model: str,
        *,
        engines: int,
        gpus_per_engine: float = 1.0,
        llm_options: dict[str, Any] | None = None,
        llm_class: Any = None,
        sampling_class: Any = None,
    ) -> VLLMPool:
        """Start ``engines`` actors of ``gpus_per_engine`` GPUs each; returns once every engine is loaded."""
        import ray

        if engines < 1:
            raise ConfigError(f"a vLLM pool needs >= 1 engine; got {engines}")
        # An engine holds GPUs only, so the CPU workers feeding it keep every CPU. A few restarts for
        # a lost engine; a constructor that always fails must surface, not loop.
        remote = ray.remote(num_cpus=0, num_gpus=gpus_per_engine, max_restarts=3, max_task_retries=3)(
            VLLMEngineActor
        )
        actors = tuple(
            remote.remote(model, llm_options=llm_options, llm_class=llm_class, sampling_class=sampling_class)
            for _ in range(engines)
        )
        # Fail here, with the cause, rather than in the first block of every worker.
        ray.get([a.__ray_ready__.remote() for a in actors])
        return cls(model=model, actors=actors)

    @staticmethod
    def engines_for(cluster_gpus: float, *, gpus_per_engine: float = 1.0) -> int:
        """One engine per ``gpus_per_engine`` GPUs of the cluster; none is a clear error.

        >>> VLLMPool.engines_for(8), VLLMPool.engines_for(8, gpus_per_engine=2)
        (8, 4)
        """
        n = int(cluster_gpus // gpus_per_engine)
        if n < 1:
            raise ConfigError(
                f"vllm: models on --runner ray need GPUs: the cluster has {cluster_gpus:g}, each engine "
                f"takes {gpus_per_engine:g}. Join a cluster with GPUs (--ray-address) or use an openai: "
                "model behind a vLLM server"
            )
        return n

    def stop(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class RayVLLMBackend(ThreadedBatchBackend):
    """The ``vllm:`` backend of a Ray worker: batches go to the shared engine pool, not a local model."""

    name = "vllm"

    def __init__(self, pool: VLLMPool, *, image_loader: ImageLoader, max_batch: int = 256) -> None:
        self.pool = pool
        self.model = pool.model
        self.image_loader = image_loader
        self.max_batch = max_batch
        # Workers start at different engines so small batches spread over the pool too.
        self._next = itertools.count(id(self) % max(1, len(pool.actors)))

    def _run(self, requests: list[Request]) -> list[Completion | BackendError]:
        import ray

        outcomes: list[Completion | BackendError | None] = []
        conversations, sampling, live = [], [], []
        for i, r in enumerate(requests):
            try:
                conversations.append(openai_messages(r, self.image_loader))
                sampling.append(dict(r.sampling))
                live.append(i)
                outcomes.append(None)
            except (KeyError, FileNotFoundError) as e:
                outcomes.append(BackendError(f"image not in store: {e}", kind="permanent"))
        if live:
            actors = self.pool.actors
            start = next(self._next)
            n = min(len(actors), len(live))
            bounds = [len(live) * k // n for k in range(n + 1)]
            futures = [
                actors[(start + k) % len(actors)].chat.remote(
                    conversations[bounds[k] : bounds[k + 1]], sampling[bounds[k] : bounds[k + 1]]
                )
                for k in range(n)
            ]
            try:
                results = [item for part in ray.get(futures) for item in part]
            except Exception as e:  # noqa: BLE001 - an engine that died: the engine retries the batch
                return [o or BackendError(f"vLLM engine failed: {e}", kind="transient") for o in outcomes]
            for i, res in zip(live, results, strict=True):
                outcomes[i] = Completion(
                    key=requests[i].key,
                    reply=res["text"],
                    finish_reason=res["finish_reason"],
                    prompt_tokens=res["prompt_tokens"],
                    completion_tokens=res["completion_tokens"],
                    latency_s=res["latency_s"],
                )
        return outcomes  # type: ignore[return-value]

    async def aclose(self) -> None:
        """The engines belong to the pool; the driver stops them."""


__all__ = ["RayVLLMBackend", "VLLMEngineActor", "VLLMPool"]
