"""TRL's own message preparation accepts the ``messages`` export (opt-in: VISCON_TEST_TRL=1).

TRL is not a dependency: the test installs ``trl`` (and ``accelerate``, which ``trl.trainer.utils``
imports) from PyPI with ``--no-deps`` into a temporary folder and runs TRL in a subprocess with that
folder on ``PYTHONPATH``, so the main environment is left as it was. Set ``VISCON_TRL_TARGET`` to a
folder to reuse an installation between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from viscon_hub.publish.exports import export
from viscon_hub.publish.exports.messages import messages_data_path

from .test_exports import COLOURS, build_folder, jpeg, record

pytestmark = pytest.mark.skipif(
    os.environ.get("VISCON_TEST_TRL") != "1", reason="opt-in: VISCON_TEST_TRL=1 installs trl from PyPI"
)

# Runs under TRL: load the export as a trainer would, prepare every row, report what TRL made of it.
CHECK = r"""
import json, sys
import trl
from datasets import load_dataset
from trl.data_utils import is_conversational, prepare_multimodal_messages

try:
    from trl.trainer.utils import remove_none_values
except ImportError:
    remove_none_values = None

ds = load_dataset("parquet", data_files={"train": sys.argv[1]}, split="train")
report = {"trl": trl.__version__, "rows": 0, "filled": 0, "remove_none_values": remove_none_values is not None}
for example in ds:
    assert is_conversational(example), example
    variants = [example]
    if remove_none_values is not None:
        variants.append(remove_none_values(example))
    for ex in variants:
        prepared = prepare_multimodal_messages(ex["messages"], images=ex["images"])
        filled = [b for m in prepared for b in m["content"] if b["type"] == "image"]
        assert len(filled) == len(ex["images"]) == 1
        assert filled[0]["image"] is ex["images"][0] and prepared[0]["content"][0] is filled[0]
        assert all(b["type"] == "text" and b["text"] for m in prepared for b in m["content"] if b not in filled)
        report["filled"] += len(filled)
    try:
        prepare_multimodal_messages(example["messages"], images=example["images"] * 2)
    except ValueError:
        pass
    else:
        raise AssertionError("TRL accepted two images for one placeholder; the check is not live")
    report["rows"] += 1
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    records = [(record(f"doc-{i}", "contextual", data), data) for i, data in enumerate(map(jpeg, COLOURS))]
    return build_folder(tmp_path_factory.mktemp("built") / "viscon", records, configs=("leaky",))


@pytest.fixture(scope="module")
def trl_path(tmp_path_factory) -> str:
    target = Path(os.environ.get("VISCON_TRL_TARGET") or tmp_path_factory.mktemp("trl"))
    if not (target / "trl" / "data_utils.py").is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
            + ["trl", "accelerate"],
            check=True,
        )
    return str(target)


def test_trl_prepares_exported_messages(built, tmp_path, trl_path):
    summary = export(dataset=built, config="leaky", format="messages", output=tmp_path)
    path = tmp_path / messages_data_path("leaky", "train")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [trl_path, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == summary["rows"]["train"] == 3
    assert report["filled"] == report["rows"] * (2 if report["remove_none_values"] else 1)
