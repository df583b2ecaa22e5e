"""One local two-CPU Ray cluster for the runner tests (starting one takes seconds)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    # Workers inherit the environment the cluster starts with.
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("hf_home")
        mp.setenv("OPENAI_API_KEY", "sk-test-never-logged")
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        # Stand-in classes defined in the tests are imported by name in the workers.
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
