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
    from viscon_hub.build.driver import BuildConfig, build
    from viscon_hub.generate.stages import GenerateConfig

    root = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        home = root / "hf_home"
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.delenv("HF_TOKEN", raising=False)
        config = BuildConfig(
            output=str(root / "viscon"),
            work_dir=str(root / "work"),
            generate=GenerateConfig(cache=str(root / "cache")),
        )
        report = build(config)
    return {"root": root, "dataset": root / "viscon", "config": config, "report": report}


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A local Hub-protocol server (tests/servers/minihub.py) that the real clients talk to.

    Sets ``HF_ENDPOINT``, a fake ``HF_TOKEN``, ``HF_HUB_DISABLE_XET=1`` and a private ``HF_HOME``, turns
    the offline switches of the isolation fixture back off, and patches the module constants that
    huggingface_hub and datasets read at import time.
    """
    import secrets

    import datasets.config as dconfig
    from huggingface_hub import HfFileSystem, constants, hf_api

    from tests.servers.minihub import MiniHub

    hub = MiniHub().start()
    endpoint = hub.endpoint
    home = tmp_path / "hf_home_hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_test_" + secrets.token_hex(12),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # Module-level helpers (upload_file, create_repo, ...) are methods of an HfApi made at import time.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # Without these, load_dataset also asks a datasets-server host and bumps download counts.
    monkeypatch.setattr(dconfig, "USE_PARQUET_EXPORT", False, raising=False)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(dconfig, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(
        dconfig, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setattr(dconfig, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dconfig, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(dconfig, "HF_DATASETS_CACHE", home / "datasets")
    HfFileSystem.clear_instance_cache()
    try:
        yield hub
    finally:
        HfFileSystem.clear_instance_cache()
        hub.stop()
