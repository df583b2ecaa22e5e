"""The captioner export (caption prompt -> caption), and a tiny random VLM trained on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from viscon_hub.errors import ConfigError
from viscon_hub.generate.prompts import load_template
from viscon_hub.generate.stages import caption_messages
from viscon_hub.publish.exports import export
from viscon_hub.publish.exports.captioner import captioner_data_path
from viscon_hub.records import ImageContext

from .test_exports import COLOURS, build_folder, jpeg, record

ROOT = Path(__file__).parents[3]
TOKENIZER = ROOT / "viscon_hub" / "data" / "tokenizers" / "llama-spm" / "tokenizer.json"
TEMPLATE = load_template("contextual_caption")
LABEL = f"{TEMPLATE.id}@{TEMPLATE.version}"
# Not "<image>": the page text holds literal <image> markers, which must stay text for the model.
IMAGE_TOKEN = "<|img|>"


def captioned(i: int, data: bytes, **changes) -> dict:
    rec = record(f"doc-{i}", "contextual", data)
    rec.update(
        context=f"Intro {i} <another-image> about the swatch. <image> Closing words é ✓.",
        alt_text=f"  swatch\n {i} " if i % 2 else None,
        caption_template=LABEL,
        caption=f"A flat colour swatch number {i}, shown on its page.",
    )
    rec.update(changes)
    return rec


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    records = [(captioned(i, jpeg(c)), jpeg(c)) for i, c in enumerate(COLOURS)]
    data = jpeg((9, 9, 9))
    records.append((captioned(4, data, id="doc-4", caption_template="contextual_caption@999"), data))
    records.append((captioned(5, data, id="doc-5", caption="  "), data))
    return build_folder(tmp_path_factory.mktemp("built") / "viscon", records, configs=("contextual", "leaky"))


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("captioner")
    return out, export(dataset=built, config="contextual", format="captioner", output=out)


def test_user_turn_is_the_caption_prompt_exactly(built, exported):
    out, summary = exported
    assert summary["files"] == [captioner_data_path("contextual", s) for s in ("test", "train")]
    assert summary["skipped"] == {"caption_template_not_installed": 1, "no_caption": 1}
    rows = pq.read_table(out / captioner_data_path("contextual", "train")).to_pylist()
    source = {
        r["id"]: r for r in pq.read_table(built / "contextual" / "train-00000-of-00001.parquet").to_pylist()
    }
    assert len(rows) == 3
    for row, rid in zip(rows, sorted(r for r in source if r in ("doc-0", "doc-1", "doc-2")), strict=True):
        src = source[rid]
        ctx = ImageContext(
            id=rid,
            document_id=rid,
            image_index=0,
            page_url=src["source_url"],
            image_url=None,
            image_path=None,
            image_bytes=None,
            alt_text=src["alt_text"],
            context=src["context"],
            context_tokens=4,
            image_sha256="0" * 64,
        )
        sent = caption_messages(TEMPLATE, ctx, "contextual")  # what `viscon generate` sent
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": [{"type": "text", "text": sent[0]["content"]}]}
        assert user["content"][0] == {"type": "image", "text": None}
        assert user["content"][1]["text"] == sent[-1]["content"][1]["text"]
        assert "<image>" in user["content"][1]["text"] and "<another-image>" in user["content"][1]["text"]
        assert assistant["content"] == [{"type": "text", "text": src["caption"]}]
        assert len(row["images"]) == 1 and row["images"][0]["bytes"]


def test_only_per_image_configs(built, tmp_path):
    with pytest.raises(ConfigError, match="one row per image"):
        export(dataset=built, config="leaky", format="captioner", output=tmp_path / "x")


def test_cli_export_captioner(built, tmp_path, capsys):
    import json

    from viscon_hub.cli import main

    args = ["export", "--dataset", str(built), "--config", "contextual", "--format", "captioner"]
    assert main([*args, "--output", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == {"train": 3, "test": 1}


def tiny_vlm():
    """A random LLaVA (tiny CLIP tower + one-layer Llama) and its processor, built offline."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": [IMAGE_TOKEN]})
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for b in m['content'] %}{% if b['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif "
        "b['type'] == 'text' %}{{ b['text'] }}{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config), processor


def test_two_plain_transformers_steps_on_the_export(exported):
    import torch
    from datasets import load_dataset

    torch.manual_seed(0)
    out, _ = exported
    data = load_dataset(
        "parquet", data_files={"train": str(out / captioner_data_path("contextual", "train"))}, split="train"
    )
    model, processor = tiny_vlm()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(2):
        rows = data.select([step, step + 1])
        texts = [processor.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        batch = processor(
            images=[r["images"][0] for r in rows], text=texts, padding=True, return_tensors="pt"
        )
        # Every image block became exactly one image's worth of image tokens.
        image_id = model.config.image_token_index
        assert int((batch["input_ids"] == image_id).sum()) == 2 * 16
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_trl_sft_two_steps_with_the_recipe(exported, tmp_path):
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("train_captioner", ROOT / "scripts" / "train_captioner.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, _ = exported
    recipe = script.load_recipe(ROOT / "configs" / "train" / "captioner.yaml")
    recipe["data"] = str(out / "contextual_captioner")
    model, processor = tiny_vlm()
    trainer = script.train(
        recipe,
        model=model,
        processor=processor,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert (tmp_path / "run" / "config.json").is_file()


def test_recipe_refuses_a_model_that_reads_the_markers_as_images(exported):
    from types import SimpleNamespace

    from datasets import load_dataset

    spec = importlib.util.spec_from_file_location("train_captioner", ROOT / "scripts" / "train_captioner.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, _ = exported
    rows = load_dataset(
        "parquet", data_files={"train": str(out / captioner_data_path("contextual", "train"))}, split="train"
    )
    script.check_image_token(SimpleNamespace(image_token=IMAGE_TOKEN), rows)
    with pytest.raises(SystemExit, match="image token '<image>'"):
        script.check_image_token(SimpleNamespace(image_token="<image>"), rows)
