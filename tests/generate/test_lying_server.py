"""A server that lies (usage, finish_reason, reply size) costs a counted anomaly or drop, never a crash."""

import json

import pytest

from tests.engine.test_engine_faults import backend_for, engine_for, req
from tests.generate.conftest import generate_config
from viscon_hub.engine import EngineConfig
from viscon_hub.engine.prices import PriceTable
from viscon_hub.errors import RunFailedError
from viscon_hub.generate.stages import generate
from viscon_hub.prepare.driver import PrepareConfig, prepare

pytest.importorskip("openai")


@pytest.mark.parametrize(
    "usage, anomalous",
    [
        ({"prompt_tokens": "abc", "completion_tokens": 5}, True),
        ({"prompt_tokens": -15_000_000_000_000, "completion_tokens": 5}, True),
        ({"prompt_tokens": 10, "completion_tokens": -3}, True),
        ({"prompt_tokens": 10**15, "completion_tokens": 5}, True),
        ({"prompt_tokens": 1.5, "completion_tokens": 5}, True),
        ({"prompt_tokens": True, "completion_tokens": 5}, True),
        ({"prompt_tokens": [1], "completion_tokens": {"a": 1}}, True),
        ({"prompt_tokens": 12.0, "completion_tokens": 5}, False),
        (None, False),
        ("usage as a string", False),
        ([1, 2, 3], False),
    ],
)
def test_bad_usage_is_a_counted_anomaly_never_a_negative_cost(server, tmp_path, usage, anomalous):
    server.set_faults([{"kind": "lie", "times": None, "reply": {"usage": usage}}])
    engine = engine_for(tmp_path)
    engine.prices = PriceTable({"viscon-test-llm": (5.0, 15.0)})
    out = engine.run([req(i) for i in range(3)], backend=backend_for(server))
    assert all(c.ok for c in out)
    report = engine.report
    assert report.usage_anomalies == (3 if anomalous else 0)
    assert report.cost_usd >= 0 and report.prompt_tokens >= 0 and report.completion_tokens >= 0
    assert report.prompt_tokens <= 3 * 10_000_000
    # What the cache keeps is as clean as what was summed.
    assert all(0 <= c.prompt_tokens <= 10_000_000 for c in out)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    out = tmp_path_factory.mktemp("contexts")
    prepare(PrepareConfig(output=str(out), limit=2))
    return str(out)


def gen(contexts, server, tmp_path, **kw):
    fast = EngineConfig(max_concurrency=4, backoff_base_s=0.01, backoff_max_s=0.02, max_error_rate=1.0)
    return generate(generate_config(contexts, server, tmp_path, engine=fast, **kw))


def stats_on_disk(tmp_path):
    return json.loads((tmp_path / "gen" / "stats.json").read_text())


def test_qa_cut_at_the_limit_is_reasked_then_dropped(contexts, server, tmp_path):
    server.set_faults(
        [{"kind": "lie", "match": "<Options>", "times": None, "reply": {"finish_reason": "length"}}]
    )
    with pytest.raises(RunFailedError, match="every reply was dropped"):
        gen(contexts, server, tmp_path, reasks=1)
    on_disk = stats_on_disk(tmp_path)
    assert on_disk["reasks"] == on_disk["records"] == 2
    assert on_disk["dropped"] == {"qa_multiple_choice_length": 2}


def test_qa_cut_once_is_saved_by_the_reask(contexts, server, tmp_path):
    server.set_faults(
        [{"kind": "lie", "match": "<Options>", "times": 1, "reply": {"finish_reason": "length"}}]
    )
    stats = gen(contexts, server, tmp_path, reasks=1)
    assert stats.reasks == 1 and stats.records_ok == stats.records == 2


def test_caption_cut_at_the_limit_is_dropped(contexts, server, tmp_path):
    server.set_faults([{"kind": "truncated_content", "match": "*", "times": 1}])
    stats = gen(contexts, server, tmp_path)
    assert stats.dropped == {"caption_length": 1} and stats.records_ok == 1


def test_huge_reply_is_dropped_per_stage(contexts, server, tmp_path):
    server.set_faults([{"kind": "lie", "match": "<Options>", "times": None, "reply": {"repeat": 2000}}])
    with pytest.raises(RunFailedError):
        gen(contexts, server, tmp_path, reasks=0)
    assert stats_on_disk(tmp_path)["dropped"] == {"qa_multiple_choice_too_long": 2}
    server.set_faults([{"kind": "lie", "match": "*", "times": 1, "reply": {"repeat": 2000}}])
    stats = gen(contexts, server, tmp_path / "again")
    assert stats.dropped == {"caption_too_long": 1} and stats.records_ok == 1
