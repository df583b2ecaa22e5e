"""--max-cost: the engine stops before a run's spend could pass the budget; stored replies stay."""

import pytest

from tests.servers.openai_server import OpenAITestServer
from viscon_hub.engine import Engine, EngineConfig, GenerationCache, PriceTable, Request, make_backend
from viscon_hub.engine.engine import BUDGET_STOP
from viscon_hub.errors import ConfigError

pytest.importorskip("openai")


def req(i):
    return Request.create(
        stage="caption",
        model="viscon-test-llm",
        template_id="t",
        template_version=1,
        messages=[{"role": "user", "content": f"Describe picture #{i} of a harbour at dawn."}],
        sampling={"max_tokens": 100},
    )


def test_budget_stops_calls_and_keeps_what_was_paid_for(tmp_path):
    prices = PriceTable({"viscon-test-llm": (1_000.0, 1_000.0)})  # about $0.12 per request, worst case
    requests = [req(i) for i in range(10)]
    worst = prices.cost("viscon-test-llm", requests[0].estimated_prompt_tokens(), 100)
    budget = 3.5 * worst
    with OpenAITestServer() as server:
        backend = make_backend(
            "openai:viscon-test-llm", image_loader=lambda s: b"", base_url=server.base_url, api_key="k"
        )
        cache = GenerationCache(tmp_path / "cache")
        engine = Engine(
            cache=cache, config=EngineConfig(max_concurrency=4, max_cost_usd=budget), prices=prices
        )
        out = engine.run(requests, backend=backend)
        called = server.stats()["total_requests"]
    assert 1 <= called <= 3 and engine.report.cost_usd <= budget
    assert sum(c.ok for c in out) == called
    assert [c.error for c in out if not c.ok] == [BUDGET_STOP] * (10 - called)
    assert engine.report.budget_stops == 10 - called
    # Budget stops are not stored: a later run without a budget asks for exactly those.
    assert sum(GenerationCache(tmp_path / "cache").get(r.key) is not None for r in requests) == called


def test_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="--max-cost"):
        EngineConfig(max_cost_usd=-1.0)
