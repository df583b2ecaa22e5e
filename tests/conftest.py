import json
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path_factory, monkeypatch):
    """No test reads a real cache or token, or reaches a real Hub."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def good_row(n: int = 0, *, images: int = 1, url: str | None = None) -> dict:
    """A valid OBELICS-shaped row: a text, then ``images`` images, then a text."""
    url = url or f"https://example.org/page-{n}"
    image_urls = [f"https://example.org/img-{n}-{i}.jpg" for i in range(images)]
    texts = [f"Intro paragraph {n}."] + [None] * images + [f"Closing paragraph {n}."]
    imgs = [None] + image_urls + [None]
    meta = (
        [None]
        + [
            {"document_url": url, "src": u, "unformatted_src": u, "alt_text": f"alt {i}"}
            for i, u in enumerate(image_urls)
        ]
        + [None]
    )
    return {
        "images": imgs,
        "metadata": json.dumps(meta),
        "general_metadata": json.dumps(
            {"url": url, "warc_filename": "w", "warc_record_offset": 1, "warc_record_length": 2}
        ),
        "texts": texts,
    }


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


@pytest.fixture
def obelics_row_fixture() -> dict:
    return json.loads(
        (FIXTURES / "external" / "obelics_notebook_row" / "obelics_train_row2_partial.json").read_text()
    )


os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@pytest.fixture(scope="session")
def quickstart_build(tmp_path_factory):
    """The no-flag ``viscon build`` (bundled sample, bundled cache, offline), built once per session.

    Tests must not modify it; copy it first.
    """
    from viscon_hub.build import BuildConfig, build

    root = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        home = root / "hf_home"
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.delenv("HF_TOKEN", raising=False)
        config = BuildConfig(
            output=str(root / "viscon"), work_dir=str(root / "work"), cache=str(root / "cache")
        )
        report = build(config)
    return {"root": root, "dataset": root / "viscon", "config": config, "report": report}
