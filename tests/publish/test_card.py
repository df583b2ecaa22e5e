"""The dataset card: front matter the Hub and datasets accept, loadable configs, sections, hygiene."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from tests.publish.test_stats import known_folder, mix_row, write_folder
from viscon_hub.build.layout import (
    ALL_CONFIGS,
    BUILD_INFO,
    configs_metadata,
    mix_features,
    per_image_features,
)
from viscon_hub.errors import ConfigError
from viscon_hub.publish import card as C
from viscon_hub.publish.card import make_card, size_category, source_dataset_id, write_card

FAKE_TOKEN = "hf_" + "FakeTokenForTheCardTest0123456789"


def front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card starts with a YAML block"
    return yaml.safe_load(match.group(1))


def built_configs(root: Path) -> list[str]:
    return [c for c in ALL_CONFIGS if (root / c).is_dir()]


@pytest.fixture(scope="module")
def carded(quickstart_build, tmp_path_factory):
    """A copy of the quickstart build with its card written by the CLI command."""
    from viscon_hub.cli import main

    root = tmp_path_factory.mktemp("carded") / "viscon"
    shutil.copytree(quickstart_build["dataset"], root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        assert main(["card", "--dataset", str(root)]) == 0
    return root


# --- the quickstart build, carded through `viscon card` -----------------------------------------


def test_card_files_written(carded):
    assert (carded / "README.md").is_file() and (carded / "stats.json").is_file()
    for name in C.PLOT_FILES.values():
        assert (carded / "plots" / name).is_file()


def test_front_matter_accepted_by_huggingface_hub(carded):
    from huggingface_hub import DatasetCard, DatasetCardData, RepoCard

    text = (carded / "README.md").read_text()
    meta = front_matter(text)
    DatasetCardData(**meta)  # no unknown-field trouble
    card = DatasetCard.load(carded / "README.md")
    assert card.data.license == "cc-by-4.0"
    assert card.data.language == ["en"]
    assert card.data.size_categories == ["n<1K"]
    assert card.data.task_categories == ["visual-question-answering", "image-to-text"]
    assert card.data.source_datasets == ["original"]  # the bundled sample is constructed, not OBELICS
    assert "handwritten-example" in card.data.tags
    assert RepoCard.load(carded / "README.md").data.to_dict()["configs"] == meta["configs"]
    assert str(card) == text


def test_configs_preserved_exactly(carded):
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    meta = front_matter((carded / "README.md").read_text())
    assert meta["configs"] == configs_metadata(built_configs(carded), carded)
    parsed = MetadataConfigs.from_dataset_card_data(DatasetCard.load(carded / "README.md").data)
    assert list(parsed) == built_configs(carded) and parsed.get_default_config_name() == "leaky"


def test_every_config_still_loads(carded):
    from datasets import load_dataset

    stats = json.loads((carded / "stats.json").read_text())
    for config in built_configs(carded):
        ds = load_dataset(str(carded), config)
        assert {s: d.num_rows for s, d in ds.items()} == {
            s: n for s, n in stats["configs"][config].items() if s != "total"
        }
    default = load_dataset(str(carded))
    assert default["train"].num_rows == stats["configs"]["leaky"]["train"]
    assert "messages" in default["train"].column_names


class _ValidateYaml(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hub's /api/validate-yaml: the checks it makes on a dataset card's metadata."""

    seen: list[dict] = []
    LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0", "odc-by", "other", "unknown"}
    TASKS = {"visual-question-answering", "image-to-text", "image-text-to-text", "text-generation"}
    SIZES = {label for _, label in C._SIZE_BUCKETS} | {"n>1T"}
    CREATORS = {"crowdsourced", "expert-generated", "found", "machine-generated", "no-annotation", "other"}

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        errors = self.check(body)
        status = 400 if errors else 200
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write("; ".join(errors).encode() if errors else b"{}")

    def log_message(self, *args):
        pass

    @classmethod
    def check(cls, body: dict) -> list[str]:
        if body.get("repoType") != "dataset":
            return [f"repoType {body.get('repoType')!r}"]
        meta = front_matter(body["content"])
        errors = []
        if meta.get("license") not in cls.LICENSES:
            errors.append(f"license {meta.get('license')!r}")
        errors += [f"task {t!r}" for t in meta.get("task_categories", []) if t not in cls.TASKS]
        errors += [f"size {s!r}" for s in meta.get("size_categories", []) if s not in cls.SIZES]
        errors += [f"language {x!r}" for x in meta.get("language", []) if not re.fullmatch(r"[a-z]{2,3}", x)]
        for key in ("annotations_creators", "language_creators"):
            errors += [f"{key} {x!r}" for x in meta.get(key, []) if x not in cls.CREATORS]
        names = [c.get("config_name") for c in meta.get("configs", [])]
        if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            errors.append("config names")
        if sum(bool(c.get("default")) for c in meta.get("configs", [])) > 1:
            errors.append("more than one default config")
        for c in meta.get("configs", []):
            for f in c.get("data_files", []):
                if not (isinstance(f, dict) and set(f) == {"split", "path"}):
                    errors.append(f"data_files of {c.get('config_name')}")
        return errors


@pytest.fixture
def hub_validator(monkeypatch):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ValidateYaml)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ValidateYaml.seen = []
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield _ValidateYaml
    server.shutdown()
    thread.join()


def test_repocard_validate(carded, hub_validator):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(carded / "README.md")
    card.validate()  # raises ValueError on a 400
    assert hub_validator.seen[-1]["content"] == str(card)
    bad = DatasetCard(str(card).replace("license: cc-by-4.0", "license: not-a-licence"))
    with pytest.raises(ValueError, match="license"):
        bad.validate()


def test_sections_and_plots_linked(carded):
    text = (carded / "README.md").read_text()
    for heading in (
        "## Summary",
        "## Configs and how to load them",
        "## Fields",
        "### Per-image configs",
        "### Mixes",
        "## Statistics",
        "### At a glance, next to the VisCon-100K paper",
        "### Context length",
        "### Caption/context word overlap",
        "### Q&A per sample",
        "### Caption and answer length",
        "### Image sizes",
        "### Caption words",
        "### Rows per config and split",
        "### Question dedup",
        "### Dropped along the way",
        "### Tokens and estimated cost",
        "### Provenance",
        "## Datasheet",
        "### Motivation",
        "### Composition",
        "### Collection process",
        "### Preprocessing, cleaning, labelling",
        "### Uses",
        "### Distribution",
        "### Maintenance",
        "## Limitations and risks",
        "## Licence",
        "## Citation",
    ):
        assert f"\n{heading}" in text, heading
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(f"plots/{n}" for n in C.PLOT_FILES.values())
    assert all((carded / link).is_file() for link in links)
    for config in built_configs(carded):
        assert f'load_dataset("ORG/NAME", "{config}")' in text
        assert f"| `{config}`" in text
    assert "871.58" in text and "0.24" in text and "@misc{kumar_viscon100k" in text
    assert "{{" not in text and "{%" not in text and "\n\n\n" not in text


def test_fields_described_from_features():
    assert list(C.PER_IMAGE_FIELDS) == list(per_image_features())
    assert list(C.MIX_FIELDS) == list(mix_features())


def test_handwritten_warning_is_loud(carded):
    text = (carded / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    warning = body.index("NOT MODEL OUTPUT, NOT FOR TRAINING")
    assert warning < body.index("## Summary")  # before anything else
    assert "handwritten-example" in body[warning : body.index("## Summary")]
    assert "do not train or evaluate on it" in body


def test_no_token_in_the_card(carded):
    for path in [carded / "README.md", carded / "stats.json"]:
        assert FAKE_TOKEN not in path.read_text()


def test_card_identical_when_made_twice(carded, tmp_path):
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(carded, other)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((other / "plots").iterdir())}
    write_card(other)
    assert (other / "README.md").read_bytes() == (carded / "README.md").read_bytes()
    assert (other / "stats.json").read_bytes() == (carded / "stats.json").read_bytes()
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((other / "plots").iterdir())}
    assert after == before
    assert str(make_card(other)) == str(make_card(other)) == (carded / "README.md").read_text()
    assert str(tmp_path) not in (other / "README.md").read_text()  # no absolute path


def test_write_card_summary(carded, tmp_path):
    root = tmp_path / "v"
    shutil.copytree(carded, root)
    summary = write_card(root, repo_id="org/viscon-demo", license="cc-by-sa-4.0", pretty_name="Demo")
    assert summary["files"][:2] == ["README.md", "stats.json"]
    assert all((root / f).is_file() for f in summary["files"])
    assert summary["license"] == "cc-by-sa-4.0" and summary["handwritten_example"] is True
    head = summary["headline"]
    assert head["primary_config"] == "contextual" and head["qa_mode"] == "4+4"
    assert head["images"] == 36 and 0 < head["overlap_mean"] <= 1
    text = (root / "README.md").read_text()
    assert 'load_dataset("org/viscon-demo", "leaky")' in text and "ORG/NAME" not in text
    assert front_matter(text)["pretty_name"] == "Demo"


def test_stage_push_uses_the_card(carded, tmp_path):
    from viscon_hub.publish.hub import stage_push

    staging = tmp_path / "staging"
    assert stage_push(carded, staging, repo="org/viscon") == []
    meta = front_matter((staging / "README.md").read_text())
    assert meta["configs"] == configs_metadata(built_configs(carded), carded)
    assert (staging / "plots" / "context_tokens.png").is_file()


# --- synthetic folders: licence, source, exports, secrets ---------------------------------------


def test_real_model_build_has_no_warning(tmp_path):
    root = known_folder(tmp_path / "v")
    text = str(make_card(root, repo_id="org/v"))
    assert "NOT MODEL OUTPUT" not in text and "handwritten" not in text.lower()
    meta = front_matter(text)
    assert meta["source_datasets"] == ["HuggingFaceM4/OBELICS"]
    assert meta["annotations_creators"] == ["machine-generated"]
    assert "revision `abc123`" in text
    assert "| `gpt-4o` | 9 | 9,000 | 1,200 | 0.0345 |" in text
    assert "| generate | contextual | unparseable_qa | 2 |" in text


def test_licence_from_build_info_then_override(tmp_path):
    root = known_folder(tmp_path / "v", license="odc-by")
    assert make_card(root).data.license == "odc-by"
    assert make_card(root, license="mit").data.license == "mit"
    root2 = known_folder(tmp_path / "w")
    assert make_card(root2).data.license == C.DEFAULT_LICENSE == "cc-by-4.0"


def test_source_datasets_from_hub_source(tmp_path):
    root = known_folder(tmp_path / "v", source="hf://datasets/someone/obelics-subset@main/data/x.parquet")
    assert make_card(root).data.source_datasets == ["someone/obelics-subset"]
    root = known_folder(tmp_path / "w", source="part-3.parquet")
    assert make_card(root).data.source_datasets == ["HuggingFaceM4/OBELICS"]


def test_secrets_never_reach_the_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "x" * 40)
    root = known_folder(
        tmp_path / "v",
        source=f"https://user:{FAKE_TOKEN}@example.org/obelics/part.parquet?token={FAKE_TOKEN}&sig=abc",
        source_revision=FAKE_TOKEN,
    )
    text = str(make_card(root, pretty_name=f"leaky {FAKE_TOKEN}"))
    assert FAKE_TOKEN not in text and "sk-xxxxxxxx" not in text and "sig=abc" not in text
    assert "https://example.org/obelics/part.parquet" in text


def test_extra_configs_and_exports(tmp_path):
    root = known_folder(tmp_path / "v")
    extra = [
        {
            "config_name": "leaky_idefics",
            "data_files": [{"split": "train", "path": "leaky_idefics/train-*.parquet"}],
        }
    ]
    exports = {
        "formats": ["llava", "idefics"],
        "idefics_configs": ["leaky_idefics"],
        "llava": {"leaky": ["leaky_train.json", "images.tar", "leaky_test.json"]},
        "notes": "Images in `images.tar` keep their sha256 names.",
    }
    card = make_card(root, repo_id="org/v", extra_configs=extra, exports=exports)
    meta = front_matter(str(card))
    assert meta["configs"] == configs_metadata(built_configs(root), root) + extra
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["leaky"]
    text = str(card)
    assert "### Trainer formats" in text
    assert 'load_dataset("org/v", "leaky_idefics")' in text
    assert "`llava/leaky/images.tar`" in text and "`llava/leaky/leaky_train.json`" in text
    assert "keep their sha256 names" in text
    assert str(make_card(root, repo_id="org/v", extra_configs=extra, exports=exports)) == text


@pytest.mark.parametrize(
    "extra, match",
    [
        ([{"config_name": "leaky", "data_files": [{"split": "train", "path": "x.parquet"}]}], "repeats"),
        ([{"config_name": "x", "data_files": [{"split": "train", "path": "x"}], "default": True}], "default"),
        ([{"config_name": "x"}], "data_files"),
        ([{"config_name": "x", "data_files": ["x.parquet"]}], "split"),
    ],
)
def test_bad_extra_configs(tmp_path, extra, match):
    root = known_folder(tmp_path / "v")
    with pytest.raises(ConfigError, match=match):
        make_card(root, extra_configs=extra)


def test_bad_exports(tmp_path):
    root = known_folder(tmp_path / "v")
    with pytest.raises(ConfigError, match="exports takes"):
        make_card(root, exports={"formats": ["llava"], "secret": 1})


def test_mixes_only_folder(tmp_path):
    root = write_folder(tmp_path / "m", {"leaky": {"train": [mix_row(0), mix_row(1)]}})
    text = str(make_card(root))
    assert "### Mixes" in text and "### Per-image configs" not in text
    assert front_matter(text)["configs"] == configs_metadata(["leaky"], root)


def test_templates_render_with_strict_variables(carded):
    """Every name the templates use is a variable card_inputs provides (the Hub renderer is lenient)."""
    import jinja2

    data, variables = C.card_inputs(carded)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(C.templates_dir())), undefined=jinja2.StrictUndefined
    )
    variables["datasheet"] = env.get_template("datasheet.md").render(**variables)
    env.get_template("card_template.md").render(card_data=data.to_yaml(), **{**data.to_dict(), **variables})


def test_size_categories_and_source_ids():
    assert [size_category(n) for n in (0, 999, 1000, 9_999, 10_000, 100_000, 2_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
        "1M<n<10M",
    ]
    assert source_dataset_id("HuggingFaceM4/OBELICS") == "HuggingFaceM4/OBELICS"
    assert source_dataset_id("hub:org/name") == "org/name"
    assert source_dataset_id("viscon-hub:sample/obelics_sample.jsonl") is None
    assert source_dataset_id("s3://bucket/obelics/part-0.parquet") is None
    assert source_dataset_id(None) is None


def test_missing_build_info_still_makes_a_card(tmp_path):
    root = known_folder(tmp_path / "v")
    (root / BUILD_INFO).unlink()
    card = make_card(root)
    assert card.data.license == "cc-by-4.0" and card.data.source_datasets == ["HuggingFaceM4/OBELICS"]
    assert "not recorded" in str(card)


def test_card_reports_what_the_build_cost_at_the_rates_used(tmp_path):
    online = str(make_card(known_folder(tmp_path / "o"), repo_id="org/v"))
    assert "What the build cost: about **$0.0345**." in online
    batch = str(make_card(known_folder(tmp_path / "b", model="openai-batch:gpt-4o"), repo_id="org/v"))
    # 9,000 prompt and 1,200 completion tokens at gpt-4o's Batch API rates (half the standard ones).
    assert re.search(
        r"What the build cost: about \*\*\$0\.017[23]\*\*\n\(Batch API rates for `gpt-4o`\)", batch
    )
