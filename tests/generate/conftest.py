"""What the generate tests share: the prepared sample, the local OpenAI-compatible server, a config."""

import pytest

from tests.servers.openai_server import OpenAITestServer
from viscon_hub.engine import EngineConfig
from viscon_hub.generate.stages import GenerateConfig
from viscon_hub.prepare.driver import PrepareConfig, prepare


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """The bundled sample's image contexts (``viscon prepare`` with no flags)."""
    out = tmp_path_factory.mktemp("contexts")
    prepare(PrepareConfig(output=str(out)))
    return str(out)


@pytest.fixture
def server():
    with OpenAITestServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-logged")


def generate_config(contexts, server, out, *, backend="openai", **kw) -> GenerateConfig:
    """A generate run of ``contexts`` into ``out/gen`` (cache ``out/cache``) against the test server,
    retrying in milliseconds; ``kw`` overrides any field."""
    kw.setdefault("engine", EngineConfig(max_concurrency=8, backoff_base_s=0.01, backoff_max_s=0.05))
    return GenerateConfig(
        contexts=contexts,
        output=str(out / "gen"),
        cache=str(out / "cache"),
        caption_model=f"{backend}:viscon-test-vlm",
        qa_model=f"{backend}:viscon-test-llm",
        base_url=server.base_url if server else None,
        **kw,
    )
