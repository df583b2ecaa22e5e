"""Captioner export: training data for a contextual captioner (the VisCon-1M loop).

One row per image of a per-image config (``contextual``, or ``non_contextual``), in the TRL messages
shape of the ``messages`` export::

    <config>_captioner/<split>-NNNNN-of-MMMMM.parquet   shards of at most --max-shard-size
        images    [the image]
        messages  system: the caption prompt's system text
                  user: an image block, then the caption prompt's text (page URL, alt-text, the page
                        text with <image> / <another-image>) exactly as the caption stage sent it
                  assistant: the caption

The prompt is rendered by the same template and the same field function as the caption stage, at
the template version recorded in the row, so a model fine-tuned on this export and served as
``--caption-model`` sees at inference what it saw in training. A row without an image or a caption,
or whose recorded template version is not the one installed, is skipped and counted.

>>> captioner_data_path("contextual", "train")
'contextual_captioner/train-00000-of-00001.parquet'
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from viscon_hub.build.layout import DEFAULT_MAX_SHARD_SIZE, PER_IMAGE_CONFIGS, shard_name
from viscon_hub.errors import ConfigError
from viscon_hub.publish.exports import Source, Tally, embedded_image, write_parquet
from viscon_hub.publish.exports.messages import features

SUFFIX = "_captioner"
COLUMNS = ("id", "image", "source_url", "alt_text", "context", "caption", "caption_template")
_TEMPLATES = {"contextual": "contextual_caption", "non_contextual": "non_contextual_caption"}


def captioner_folder(config: str) -> str:
    """The folder of a per-image config's captioner shards, relative to the export folder."""
    if config not in PER_IMAGE_CONFIGS:
        raise ConfigError(
            f"the captioner export reads a per-image config ({', '.join(PER_IMAGE_CONFIGS)}); got {config!r}"
        )
    return f"{config}{SUFFIX}"


def captioner_data_path(config: str, split: str, index: int = 0, count: int = 1) -> str:
    """Shard ``index`` of ``count`` of a per-image config's captioner split, relative to the export folder."""
    return f"{captioner_folder(config)}/{shard_name(split, index, count)}"


def prompt_messages(row: dict[str, Any], template, mode: str) -> list[dict[str, Any]]:
    """The caption stage's messages for a per-image row, in TRL content blocks (image block first)."""
    from viscon_hub.generate.prompts import context_fields

    ctx = SimpleNamespace(
        page_url=row.get("source_url"), alt_text=row.get("alt_text"), context=row.get("context")
    )
    fields = context_fields(ctx) if mode == "contextual" else {}  # type: ignore[arg-type]
    out = []
    for m in template.render(**fields):
        content = m["content"]
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
        else:
            blocks = [
                {"type": "image", "text": None}
                if p.get("type") == "image"
                else {"type": "text", "text": p["text"]}
                for p in content
            ]
        out.append({"role": m["role"], "content": blocks})
    return out


def write(
    source: Source, *, splits: Sequence[str], output: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> dict[str, Any]:
    """Write the shards ``<config>_captioner/<split>-NNNNN-of-MMMMM.parquet``; return the summary part."""
    from viscon_hub.generate.prompts import load_template

    mode = source.config
    template = load_template(_TEMPLATES[mode])
    label = f"{template.id}@{template.version}"
    tally = Tally()

    def keep(row: dict[str, Any]) -> str | None:
        if embedded_image(row.get("image")) is None:
            return "no_image"
        if not isinstance(row.get("caption"), str) or not row["caption"].strip():
            return "no_caption"
        if row.get("caption_template") != label:
            return "caption_template_not_installed"  # its prompt text cannot be rebuilt exactly
        if mode == "contextual" and not isinstance(row.get("context"), str):
            return "no_context"
        return None

    def rows(split: str) -> Iterator[list[dict[str, Any]]]:
        for batch in source.batches(split, columns=COLUMNS):
            out = []
            for row in batch:
                reason = keep(row)
                if reason is not None:
                    tally.skipped[reason] += 1
                    continue
                messages = prompt_messages(row, template, mode)
                messages.append({"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]})
                out.append({"images": [embedded_image(row["image"])], "messages": messages})
            yield out

    counts, files = write_parquet(
        output,
        captioner_folder(source.config),
        features(),
        {s: rows(s) for s in splits},
        max_shard_size=max_shard_size,
    )
    tally.rows.update(counts)
    return {"files": files, **tally.summary()}


__all__ = ["COLUMNS", "SUFFIX", "captioner_data_path", "captioner_folder", "prompt_messages", "write"]
