"""The bundled cache answers every request of the bundled sample, for the current prompt templates."""

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq

from viscon_hub.engine import EngineConfig, GenerationCache
from viscon_hub.generate.stages import GenerateConfig, generate
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.resources import BUNDLED_CACHE, HANDWRITTEN
from viscon_hub.resources import HANDWRITTEN_MODEL as MODEL

SPEC = f"openai:{MODEL}"


def test_bundled_cache_is_current_and_covers_the_sample(tmp_path):
    prepare(PrepareConfig(output=str(tmp_path / "ctx")))
    stats = generate(
        GenerateConfig(
            contexts=str(tmp_path / "ctx"),
            output=str(tmp_path / "gen"),
            cache=str(tmp_path / "cache"),
            extra_caches=(str(BUNDLED_CACHE),),
            caption_model=SPEC,
            qa_model=SPEC,
            context="both",
            engine=EngineConfig(offline=True),
            reasks=0,
        )
    )
    # Stale keys (a template edited without `python scripts/build_bundled_cache.py`) show up as misses.
    assert stats.engine["offline_misses"] == 0, (
        "rebuild the bundled cache: python scripts/build_bundled_cache.py"
    )
    assert stats.records == 72 and stats.records_ok == 72
    rows = pq.read_table(tmp_path / "gen" / "generations" / "records.parquet").to_pylist()
    assert {r["caption_model"] for r in rows} == {MODEL}


def test_bundled_entries_say_they_are_handwritten():
    cache = GenerationCache(BUNDLED_CACHE, read_only=True)
    assert len(cache) == 3 * sum(1 for line in HANDWRITTEN.read_text().splitlines() if line.strip())
    assert {c.model for c in cache} == {MODEL}
    assert all(c.prompt_tokens == 0 and c.completion_tokens == 0 for c in cache)
    readme = (HANDWRITTEN.parent / "README.md").read_text().lower()
    assert "handwritten" in readme and "not" in readme
    assert json.loads(HANDWRITTEN.read_text().splitlines()[0])["mode"] in ("contextual", "non_contextual")


def test_maintainer_script_rebuilds_the_shipped_keys(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_bundled_cache.py"
    spec = importlib.util.spec_from_file_location("build_bundled_cache", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prepare(PrepareConfig(output=str(tmp_path / "ctx")))
    entries = module.handwritten_entries(str(tmp_path / "ctx"))
    shipped = {c.key: c.reply for c in GenerationCache(BUNDLED_CACHE, read_only=True)}
    assert {e.key: e.reply for e in entries} == shipped
