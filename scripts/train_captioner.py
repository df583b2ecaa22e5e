"""Fine-tune a contextual captioner with TRL SFT on the captioner export (the VisCon-1M loop).

    viscon export --dataset viscon --config contextual --format captioner --output viscon-captioner
    pip install 'viscon-hub[train]'
    python scripts/train_captioner.py --config configs/train/captioner.yaml \
        [--model HuggingFaceTB/SmolVLM-256M-Instruct] [--data viscon-captioner/contextual_captioner] \
        [--output-dir captioner-out] [--max-steps N]

Each row's user turn is the caption prompt exactly as `viscon generate` sends it, so the trained model
can be served with vLLM and used as `--caption-model` (see README: "Train your own captioner").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml


def load_recipe(path: str | Path) -> dict[str, Any]:
    recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sft", {}), dict):
        raise SystemExit(
            f"{path}: expected a mapping with `model`, `data` and an `sft` mapping of SFTConfig fields"
        )
    return recipe


def load_data(folder: str | Path):
    """The export's splits as a DatasetDict (``train``, and ``test`` when it has rows)."""
    from datasets import load_dataset

    folder = Path(folder)
    # The export writes each split as shards <split>-NNNNN-of-MMMMM.parquet (none for a split without rows).
    files = {s: sorted(str(p) for p in folder.glob(f"{s}-*-of-*.parquet")) for s in ("train", "test")}
    files = {s: f for s, f in files.items() if f}
    if "train" not in files:
        raise SystemExit(f"{folder} holds no train-*.parquet shard: run `viscon export --format captioner`")
    return load_dataset("parquet", data_files=files)


def check_image_token(processor, rows) -> None:
    """Refuse a model whose image token is spelled like the page-text markers (``<image>``).

    The prompt must stay exactly what `viscon generate` sends, and its page text marks images with
    ``<image>`` / ``<another-image>``; a processor that reads ``<image>`` as its own image token would
    count one image per marker, here and when serving.
    """
    token = getattr(processor, "image_token", None)
    if not token:
        return
    for row in rows.select_columns(["messages"]):
        for m in row["messages"]:
            for block in m["content"]:
                if block.get("type") == "text" and token in (block.get("text") or ""):
                    raise SystemExit(
                        f"this model's image token {token!r} occurs in the caption prompt's page text; "
                        "choose a model whose image token differs (e.g. Qwen2-VL: '<|image_pad|>')"
                    )


def train(recipe: dict[str, Any], *, model=None, processor=None, **overrides: Any):
    """Run SFT; ``model`` / ``processor`` default to ``recipe["model"]`` from the Hub or a local folder."""
    from trl import SFTConfig, SFTTrainer

    if model is None or processor is None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = processor or AutoProcessor.from_pretrained(recipe["model"])
        model = model or AutoModelForImageTextToText.from_pretrained(recipe["model"])
    if recipe.get("freeze_vision", True):
        for name, param in model.named_parameters():
            if "vision_tower" in name or "vision_model" in name:
                param.requires_grad_(False)
    data = load_data(recipe["data"])
    check_image_token(processor, data["train"])
    test = data["test"] if "test" in data and len(data["test"]) else None
    config = SFTConfig(**{**recipe.get("sft", {}), **overrides})
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data["train"], eval_dataset=test, processing_class=processor
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    processor.save_pretrained(config.output_dir)
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs/train/captioner.yaml"))
    parser.add_argument("--model", default=None, help="model id or folder (default: the recipe's)")
    parser.add_argument(
        "--data", default=None, help="the export's <config>_captioner folder (default: the recipe's)"
    )
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    for key in ("model", "data"):
        if getattr(args, key):
            recipe[key] = getattr(args, key)
    overrides = {
        k: v for k, v in (("output_dir", args.output_dir), ("max_steps", args.max_steps)) if v is not None
    }
    train(recipe, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
