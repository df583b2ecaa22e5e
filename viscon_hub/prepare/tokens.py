"""Token counting for the document filter, in batches with a fast (Rust) tokenizer.

The default is the LLaMA-1/2 (Vicuna) SentencePiece vocabulary shipped in
``viscon_hub/data/tokenizers/llama-spm/`` (see its ``SOURCE.md``); any ``tokenizer.json``, a folder
holding one, or a model id that ``transformers`` can load offline may replace it.

>>> counter = TokenCounter()
>>> counter.count(["Hello world", ""])
[2, 0]
"""

from __future__ import annotations

import logging
from pathlib import Path

from viscon_hub.errors import ConfigError
from viscon_hub.resources import PACKAGE_DATA

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = PACKAGE_DATA / "tokenizers" / "llama-spm" / "tokenizer.json"


class TokenCounter:
    """Counts text tokens (no special tokens) for many texts at once."""

    def __init__(self, spec: str | None = None) -> None:
        self.spec = str(spec) if spec is not None else "llama-spm"
        self._tokenizer = _load(spec)
        vocab = self._tokenizer.get_vocab()
        # Every token covers at most this many characters of the normalised text, so a text longer
        # than limit * this cannot fit: it is rejected without being tokenised.
        self.max_piece_chars = max((len(piece) for piece in vocab), default=1) or 1

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of ``texts``, in order."""
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def surely_over(self, text: str, limit: int) -> bool:
        """True when ``text`` certainly has more than ``limit`` tokens (a cheap, exact lower bound)."""
        return len(text) + 1 > limit * self.max_piece_chars


def _load(spec: str | None):
    from tokenizers import Tokenizer

    if spec is None:
        return Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    path = Path(spec)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for "cannot load"
        raise ConfigError(
            f"--tokenizer must be a tokenizer.json file, a folder holding one, or a model id available "
            f"offline; could not load {spec!r}: {type(e).__name__}: {e}"
        ) from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"--tokenizer {spec!r} has no fast tokenizer; batched counting needs one")
    return backend
