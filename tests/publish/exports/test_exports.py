"""Exports of a small built folder: each format's invariants, refusals, determinism, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from viscon_hub.build.layout import SPLITS, config_mode, data_path, features_for, write_minimal_readme
from viscon_hub.build.merge import ConversationStyle, mix_rows, per_image_row
from viscon_hub.errors import ConfigError
from viscon_hub.publish.exports import FORMATS, export
from viscon_hub.publish.exports.idefics import idefics_data_path
from viscon_hub.publish.exports.llamafactory import DATASET_INFO, dataset_info_entry
from viscon_hub.publish.exports.llava import check_sample, preprocess_multimodal
from viscon_hub.publish.exports.messages import messages_data_path

# The shared checkout keeps the real trainer examples (see its fixtures/external/SOURCES.md).
_EXTERNAL = [
    Path(__file__).resolve().parents[2] / "fixtures" / "external",
    Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "external",
]
EXTERNAL = next((p for p in _EXTERNAL if (p / "llamafactory").is_dir()), None)
# LLaMA-Factory data/dataset_info.json at ff6d4d1, entry "mllm_demo" (Apache-2.0).
MLLM_DEMO_ENTRY = {
    "file_name": "mllm_demo.json",
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}
BUILT = ("contextual", "captions_only", "qa_only", "leaky", "split", "non_contextual_leaky")
COLOURS = ((200, 30, 30), (30, 160, 60), (40, 60, 210), (230, 200, 20))
TRAIN_IDS = ("doc-0", "doc-1", "doc-2")


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def record(
    rid: str, mode: str, data: bytes, *, ff: int = 2, mc: int = 1, question: str | None = None
) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    return {
        "id": rid,
        "document_id": rid,
        "image_index": 0,
        "page_url": f"https://example.org/{rid}",
        "context_mode": mode,
        "caption": f"A flat colour swatch for {rid}.",
        "image_sha256": sha,
        "width": 24,
        "height": 16,
        "image_url": f"https://example.org/{rid}.jpg",
        "alt_text": None,
        "context": f"Context of {rid}.",
        "context_tokens": 4,
        "qa_freeform": [
            {"question": question or f"What colour is swatch {i} of {rid}?", "answer": f"Answer {i}."}
            for i in range(ff)
        ],
        "qa_multiple_choice": [
            {
                "question": f"Which shape is {rid}?",
                "options": ["square", "oval", "star", "bar"],
                "answer": "A",
            }
            for _ in range(mc)
        ],
        "provenance": "{}",
        "source": "sample.jsonl",
    }


def build_folder(root: Path, records: list[dict], *, configs=BUILT) -> Path:
    """What `viscon build` leaves: a README, build info and Parquet per config and split."""
    style = ConversationStyle.load()
    rows: dict[tuple[str, str], list[dict]] = {(c, s): [] for c in configs for s in SPLITS}
    for rec, data in records:
        image = {"bytes": data, "path": f"{rec['image_sha256']}.jpg"}
        split = "train" if rec["id"] in TRAIN_IDS else "test"
        for c in configs:
            if config_mode(c) != rec["context_mode"]:
                continue
            if c == "contextual":
                made = [per_image_row(rec, image=image, questions_generated=3)]
            else:
                made = mix_rows(rec, c.removeprefix("non_contextual_"), style=style, image=image)
            rows[(c, split)].extend(made)
    for (c, s), made in rows.items():
        schema = features_for(c).arrow_schema
        path = root / data_path(c, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(made, schema=schema), path)
    write_minimal_readme(root, configs)
    (root / "viscon_build.json").write_text(json.dumps({"configs": list(configs)}))
    return root


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    records = []
    for i, colour in enumerate(COLOURS):
        data = jpeg(colour)
        for mode in ("contextual", "non_contextual"):
            records.append((record(f"doc-{i}", mode, data), data))
    return build_folder(tmp_path_factory.mktemp("built") / "viscon", records)


def source_rows(root: Path, config: str, split: str) -> list[dict]:
    return pq.read_table(root / data_path(config, split)).to_pylist()


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def load_parquet(path: Path):
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"train": str(path)}, split="train")


def load_folder(folder: Path):
    """``load_dataset`` on an export folder of shards: splits from the file names, as a user would."""
    from datasets import load_dataset

    return load_dataset(str(folder))


def test_llava_samples_follow_preprocess_multimodal(built, tmp_path):
    out = tmp_path / "llava"
    summary = export(dataset=built, config="leaky", format="llava", output=out)
    assert summary["files"] == ["leaky_test.json", "leaky_train.json"]
    assert (
        summary["rows"] == {s: len(source_rows(built, "leaky", s)) for s in SPLITS} == {"train": 3, "test": 1}
    )
    assert summary["skipped"] == {} and summary["images"] == 4
    for split in SPLITS:
        samples = json.loads((out / f"leaky_{split}.json").read_text(encoding="utf-8"))
        for sample, row in zip(samples, source_rows(built, "leaky", split), strict=True):
            assert check_sample(sample, image_folder=out / "images") == []
            assert preprocess_multimodal(sample["conversations"]) == sample["conversations"]
            assert sample["id"] == row["id"]
            assert sample["conversations"][0]["value"] == "<image>\n" + row["messages"][0]["content"]
            assert [t["value"] for t in sample["conversations"][1:]] == [
                m["content"] for m in row["messages"][1:]
            ]
            with Image.open(out / "images" / sample["image"]) as im:
                im.load()
                assert im.size == (24, 16)
            assert (out / "images" / sample["image"]).read_bytes() == row["image"]["bytes"]


def test_llava_rules_reject_what_llava_cannot_train_on(tmp_path):
    ok = {"id": "a", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A mug."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."},
    ]}  # fmt: skip
    assert check_sample(ok) == []

    def variant(**changes):
        return {**ok, **changes}

    two = [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "B"},
           {"from": "human", "value": "<image>\nC?"}, {"from": "gpt", "value": "D"}]  # fmt: skip
    assert "2 <image> tokens" in check_sample(variant(conversations=two))[0]
    late = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"},
            {"from": "human", "value": "<image>\nC?"}, {"from": "gpt", "value": "D"}]  # fmt: skip
    assert "first human turn" in check_sample(variant(conversations=late))[0]
    none = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"}]
    assert "exactly one" in check_sample(variant(conversations=none))[0]
    gpt_first = [{"from": "gpt", "value": "<image>\nA"}, {"from": "human", "value": "B?"}]
    assert any("alternate" in p for p in check_sample(variant(conversations=gpt_first)))
    text_only = {"id": "t", "conversations": ok["conversations"]}
    assert "text-only" in check_sample(text_only)[0]
    assert check_sample({"id": "t", "conversations": none}) == []
    assert "not found" in check_sample(ok, image_folder=tmp_path)[0]
    (tmp_path / "x.jpg").write_bytes(jpeg(COLOURS[0]))
    assert check_sample(ok, image_folder=tmp_path) == []
    assert "inside the image folder" in check_sample(variant(image="../x.jpg"), image_folder=tmp_path)[0]
    assert check_sample({"id": "e", "conversations": []}) == [
        "conversations must be a non-empty list of turns"
    ]
    assert check_sample([]) == ["a sample is a JSON object, got list"]
    # preprocess_multimodal moves a stray token to the front, as LLaVA's does.
    assert preprocess_multimodal([{"from": "human", "value": " What? <image> "}]) == [
        {"from": "human", "value": "<image>\nWhat?"}
    ]


@pytest.mark.skipif(EXTERNAL is None, reason="shared external fixtures not present")
def test_llava_rules_accept_llava_s_own_questions():
    """LLaVA's GPT-4 Q&A rows, laid out as LLaVA's instruction data lays them out, pass the check."""
    for line in (EXTERNAL / "llava" / "coco2014_val_gpt4_qa_30x3.jsonl").read_text().splitlines():
        row = json.loads(line)
        sample = {"id": row["id"], "image": row["image"], "conversations": [
            {"from": "human", "value": f"<image>\n{row['instruction']}"},
            {"from": "gpt", "value": row["output"]},
        ]}  # fmt: skip
        assert check_sample(sample) == []


def test_idefics_loads_with_image_features(built, tmp_path):
    from datasets import Image as ImageFeature
    from datasets import List

    out = tmp_path / "idefics"
    summary = export(dataset=built, config="leaky", format="idefics", output=out)
    assert summary["files"] == [idefics_data_path("leaky", s) for s in ("test", "train")]
    assert idefics_data_path("leaky", "train") == "leaky_idefics/train-00000-of-00001.parquet"
    for split in SPLITS:
        ds = load_parquet(out / idefics_data_path("leaky", split))
        assert ds.features["images"] == List(ImageFeature())
        assert list(ds.column_names) == ["images", "texts"]
        rows = source_rows(built, "leaky", split)
        assert len(ds) == len(rows) == summary["rows"][split]
        for example, row in zip(ds, rows, strict=True):
            assert len(example["images"]) == 1 and example["images"][0].size == (24, 16)
            assert len(example["texts"]) == len(row["round_types"])
            for t, (u, a) in zip(example["texts"], zip(row["messages"][::2], row["messages"][1::2])):
                assert (t["user"], t["assistant"], t["source"]) == (
                    u["content"],
                    a["content"],
                    "viscon/leaky",
                )
                assert "<image>" not in t["user"] + t["assistant"]
    # Embedded paths are content names, never where the build happened to live.
    raw = pq.read_table(out / idefics_data_path("leaky", "train")).to_pylist()
    assert all(len(im["path"]) == 64 + 4 and im["path"].endswith(".jpg") for r in raw for im in r["images"])


def test_messages_blocks_match_images(built, tmp_path):
    out = tmp_path / "messages"
    summary = export(dataset=built, config="non_contextual_leaky", format="messages", output=out)
    assert summary["files"] == [messages_data_path("non_contextual_leaky", s) for s in ("test", "train")]
    ds = load_parquet(out / messages_data_path("non_contextual_leaky", "train"))
    assert len(ds) == 3 and ds.features["images"].feature.__class__.__name__ == "Image"
    for example in ds:
        messages = example["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        blocks = [b for m in messages for b in m["content"]]
        image_blocks = [b for b in blocks if b["type"] == "image"]
        assert len(image_blocks) == len(example["images"]) == 1
        assert messages[0]["content"][0] == {"type": "image", "text": None}
        assert all(
            b["type"] == "text" and isinstance(b["text"], str) for b in blocks if b not in image_blocks
        )
        assert not any("<image>" in (b["text"] or "") for b in blocks)
        assert example["images"][0].size == (24, 16)


def check_sharegpt(folder: Path, entry: dict) -> int:
    """LLaMA-Factory's rules for a sharegpt multimodal file; returns the number of samples."""
    samples = json.loads((folder / entry["file_name"]).read_text(encoding="utf-8"))
    cols, tags = entry["columns"], entry["tags"]
    for s in samples:
        messages = s[cols["messages"]]
        roles = [m[tags["role_tag"]] for m in messages]
        assert roles == [tags["user_tag"], tags["assistant_tag"]] * (len(roles) // 2)
        tokens = sum(m[tags["content_tag"]].count("<image>") for m in messages)
        assert tokens == len(s[cols["images"]])
        assert all((folder / p).is_file() and not Path(p).is_absolute() for p in s[cols["images"]])
    return len(samples)


def test_llamafactory_matches_mllm_demo(built, tmp_path):
    out = tmp_path / "lf"
    summary = export(dataset=built, config="leaky", format="llamafactory", output=out)
    assert summary["files"] == [DATASET_INFO, "leaky_test.json", "leaky_train.json"]
    info = json.loads((out / DATASET_INFO).read_text())
    assert sorted(info) == summary["datasets"] == ["viscon_leaky_test", "viscon_leaky_train"]
    for split in SPLITS:
        entry = info[f"viscon_leaky_{split}"]
        assert entry == {**MLLM_DEMO_ENTRY, "file_name": f"leaky_{split}.json"}
        assert check_sharegpt(out, entry) == summary["rows"][split]
    sample = json.loads((out / "leaky_train.json").read_text())[0]
    assert sample["messages"][0]["content"].startswith("<image>") and sample["images"][0].startswith(
        "images/"
    )
    # LLaMA-Factory reads the file through datasets' json loader.
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out / "leaky_train.json"), split="train")
    assert ds.column_names == ["messages", "images"] and len(ds) == 3


@pytest.mark.skipif(EXTERNAL is None, reason="shared external fixtures not present")
def test_mllm_demo_fixture_meets_the_same_rules():
    folder = EXTERNAL / "llamafactory"
    entry = json.loads((folder / "dataset_info.json").read_text())["mllm_demo"]
    assert entry == MLLM_DEMO_ENTRY == dataset_info_entry("mllm_demo.json")
    assert check_sharegpt(folder, entry) == 6


def test_llamafactory_keeps_other_datasets_in_dataset_info(built, tmp_path):
    out = tmp_path / "lf"
    out.mkdir()
    (out / DATASET_INFO).write_text(json.dumps({"mine": MLLM_DEMO_ENTRY}))
    export(dataset=built, config="qa_only", format="llamafactory", output=out, split="train")
    export(dataset=built, config="leaky", format="llamafactory", output=out, split="test")
    info = json.loads((out / DATASET_INFO).read_text())
    assert list(info) == ["mine", "viscon_qa_only_train", "viscon_leaky_test"]
    (out / DATASET_INFO).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        export(dataset=built, config="leaky", format="llamafactory", output=out)


def test_split_mix_gives_two_samples_per_image(built, tmp_path):
    summary = export(dataset=built, config="split", format="llava", output=tmp_path / "s")
    assert summary["rows"] == {"train": 6, "test": 2} and summary["images"] == 4
    samples = json.loads((tmp_path / "s" / "split_train.json").read_text())
    by_image: dict[str, list[str]] = {}
    for s in samples:
        by_image.setdefault(s["image"], []).append(s["id"])
        assert check_sample(s, image_folder=tmp_path / "s" / "images") == []
    assert sorted(by_image.values()) == [[f"doc-{i}-caption", f"doc-{i}-qa"] for i in range(3)]
    assert len(list((tmp_path / "s" / "images").iterdir())) == 4
    summary = export(dataset=built, config="split", format="idefics", output=tmp_path / "i")
    assert summary["rows"] == {"train": 6, "test": 2}


def test_per_image_config_is_refused(built, tmp_path):
    for config in ("contextual", "non_contextual"):
        with pytest.raises(ConfigError, match="export a mix such as leaky"):
            export(dataset=built, config=config, format="llava", output=tmp_path / "x")


def test_missing_or_unknown_inputs_are_clear_errors(built, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"has no non_contextual_split/train.*mixes found there: captions_only, qa_only, leaky, split, ",
    ):
        export(dataset=built, config="non_contextual_split", format="idefics", output=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown config"):
        export(dataset=built, config="leaky_idefics", format="idefics", output=tmp_path / "x")
    with pytest.raises(ConfigError, match="does not exist"):
        export(dataset=tmp_path / "nowhere", config="leaky", format="llava", output=tmp_path / "x")
    with pytest.raises(ConfigError, match="expected one of llava, idefics, messages, llamafactory"):
        export(dataset=built, config="leaky", format="sharegpt", output=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown split 'validation'"):
        export(dataset=built, config="leaky", format="llava", output=tmp_path / "x", split="validation")
    with pytest.raises(ConfigError, match="dataset folder itself"):
        export(dataset=built, config="leaky", format="llava", output=built)
    assert not (tmp_path / "x").exists()


def test_one_split_only(built, tmp_path):
    summary = export(dataset=built, config="captions_only", format="messages", output=tmp_path, split="test")
    assert summary["splits"] == ["test"] and summary["rows"] == {"test": 1}
    assert sorted(all_files(tmp_path)) == [messages_data_path("captions_only", "test")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exports_are_deterministic_and_portable(built, tmp_path, fmt):
    config = "contextual" if fmt == "captioner" else "leaky"  # the captioner reads per-image rows
    first = export(dataset=built, config=config, format=fmt, output=tmp_path / "a")
    second = export(dataset=built, config=config, format=fmt, output=tmp_path / "b")
    again = export(dataset=built, config=config, format=fmt, output=tmp_path / "a")
    files_a, files_b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert files_a == files_b and first["rows"] == second["rows"] == again["rows"]
    assert not any(name.startswith(".") or ".tmp-" in name for name in files_a)
    for content in files_a.values():
        assert str(tmp_path).encode() not in content and str(built).encode() not in content
    if "images_written" in first:
        assert first["images_written"] == 4 and again["images_written"] == 0


def test_rows_a_trainer_would_choke_on_are_skipped_and_counted(tmp_path):
    data = [jpeg(c) for c in COLOURS[:2]]
    records = [
        (record("doc-0", "contextual", data[0], question="Where is the <image> tag?"), data[0]),
        (record("doc-1", "contextual", data[1]), data[1]),
    ]
    root = build_folder(tmp_path / "viscon", records, configs=("leaky",))
    for fmt in (f for f in FORMATS if f != "captioner"):  # its prompts hold <image> markers by design
        summary = export(dataset=root, config="leaky", format=fmt, output=tmp_path / fmt)
        assert summary["rows"] == {"train": 1, "test": 0}
        assert summary["skipped"] == {"placeholder_in_text": 1}
    assert json.loads((tmp_path / "llava" / "leaky_test.json").read_text()) == []
    # A split without rows gets no shard, as in a build: load_dataset fails on a Parquet file of 0 rows,
    # and the folder still loads with the split that has rows.
    assert sorted(all_files(tmp_path / "idefics")) == [idefics_data_path("leaky", "train")]
    assert load_folder(tmp_path / "idefics" / "leaky_idefics")["train"].num_rows == 1


def test_cli_runs_an_export(built, tmp_path, capsys):
    from viscon_hub.cli import main

    out = tmp_path / "cli"
    argv = ["export", "--dataset", str(built), "--config", "qa_only", "--format", "llamafactory"]
    assert main([*argv, "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "llamafactory" and summary["rows"] == {"train": 3, "test": 1}
    assert (out / "qa_only_train.json").is_file()
    assert main(["export", "--dataset", str(built), "--config", "contextual", "--format", "llava",
                 "--output", str(out)]) == 2  # fmt: skip
    assert "export a mix such as leaky" in capsys.readouterr().err
