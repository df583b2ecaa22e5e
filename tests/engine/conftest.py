"""What the engine tests share: the local OpenAI-compatible server, a Q&A request, a fast-retrying engine."""

import pytest

from tests.servers.openai_server import OpenAITestServer
from viscon_hub.engine import Engine, EngineConfig, GenerationCache, Request


@pytest.fixture
def server():
    with OpenAITestServer() as s:
        yield s


def qa_request(i, text="Write <Human> questions about this caption: a red mug on a desk."):
    """A free-form Q&A request the test server answers; ``i`` makes it unique."""
    return Request.create(
        stage="qa_freeform",
        model="viscon-test-llm",
        template_id="qa_freeform",
        template_version=1,
        messages=[{"role": "user", "content": f"{text} #{i}"}],
        sampling={"temperature": 0.0, "max_tokens": 400},
    )


def engine_for(tmp_path, **kw):
    """An engine on a cache under ``tmp_path`` whose retries wait milliseconds, not seconds."""
    kw.setdefault("max_concurrency", 8)
    config = EngineConfig(backoff_base_s=0.01, backoff_max_s=0.05, jitter_seed=0, **kw)
    return Engine(cache=GenerationCache(tmp_path / "cache"), config=config)
