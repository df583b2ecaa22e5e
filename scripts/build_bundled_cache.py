"""Rebuild the bundled cache from the handwritten stand-ins for model output (a maintainer script).

``viscon_hub/data/handwritten/sample_generations.jsonl`` holds captions and Q&A replies that a
person wrote for the 36 image contexts of the bundled sample. This module turns them into cache
entries under the model name ``handwritten-example`` (never a real model's name), keyed by the very
requests the stages build, so that the quickstart runs offline. The shipped cache lives in
``viscon_hub/data/cache/``; after editing a prompt template, rebuild it with::

    python scripts/build_bundled_cache.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from viscon_hub.engine import Completion, GenerationCache
from viscon_hub.generate.prompts import load_template
from viscon_hub.generate.stages import CAPTION_TEMPLATES, _Stage, caption_messages, read_contexts
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.resources import BUNDLED_CACHE, HANDWRITTEN
from viscon_hub.resources import HANDWRITTEN_MODEL as MODEL

SPEC = f"openai:{MODEL}"


def handwritten_entries(contexts_dir: str) -> list[Completion]:
    """Cache entries for every handwritten reply, keyed for the contexts prepared under ``contexts_dir``.

    Lines are matched to contexts by order (the file follows the order the contexts are prepared in):
    a context id hashes the image's file path, so it differs from one install location to the next.
    """
    contexts = list(read_contexts(contexts_dir))
    order: dict[str, int] = {}
    ff = _Stage(load_template("qa_freeform"), SPEC)
    mc = _Stage(load_template("qa_multiple_choice"), SPEC)
    entries = []
    for line in HANDWRITTEN.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        ctx = contexts[order.setdefault(item["context_id"], len(order))]
        mode = item["mode"]
        caption_stage = _Stage(load_template(CAPTION_TEMPLATES[mode]), SPEC)
        caption_req = caption_stage.request(caption_messages(caption_stage.template, ctx, mode))
        caption = item["caption"].strip()
        pairs = [
            (caption_req, caption),
            (ff.request(ff.template.render(caption=caption)), item["qa_freeform"]),
            (mc.request(mc.template.render(caption=caption)), item["qa_multiple_choice"]),
        ]
        for req, reply in pairs:
            entries.append(
                Completion(
                    key=req.key,
                    reply=reply,
                    finish_reason="stop",
                    model=MODEL,
                    stage=req.stage,
                    template_id=req.template_id,
                    template_version=req.template_version,
                    timestamp=1.0,
                )
            )
    if len(order) != len(contexts):
        raise ValueError(f"{HANDWRITTEN} answers {len(order)} contexts; the sample prepares {len(contexts)}")
    return entries


def build_bundled_cache(target: Path = BUNDLED_CACHE) -> int:
    """Rebuild the shipped cache from the handwritten file; returns the number of entries."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(PrepareConfig(output=f"{tmp}/contexts"))
        entries = handwritten_entries(f"{tmp}/contexts")
    if target.exists():
        shutil.rmtree(target)
    with GenerationCache(target) as cache:
        cache.put_many(entries)
    # One shard with a fixed name keeps rebuilds byte-stable in git.
    shards = sorted((target / "shards").glob("*.parquet"))
    if len(shards) != 1:
        raise SystemExit(f"expected one cache shard under {target / 'shards'}, found {len(shards)}")
    shards[0].rename(target / "shards" / "handwritten-example.parquet")
    return len(entries)


if __name__ == "__main__":
    print(f"wrote {build_bundled_cache()} entries to {BUNDLED_CACHE}")
