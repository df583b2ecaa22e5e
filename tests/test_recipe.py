"""One recipe drives every command: the loader, the flags derived from the fields, hostile recipe files."""

import json
from pathlib import Path

import pytest
import yaml

from viscon_hub.build.driver import BuildConfig
from viscon_hub.cli import main
from viscon_hub.errors import ConfigError
from viscon_hub.recipe import from_mapping, load, read_recipe, to_mapping

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
OBELICS = ROOT / "configs" / "obelics-gpt4o.yaml"


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def printed(capsys, *argv) -> dict:
    assert main([*argv, "--print-recipe"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_quickstart_recipe_builds_the_same_bytes_as_no_flags(tmp_path, monkeypatch, capsys):
    for name, argv in (("plain", []), ("recipe", ["--recipe", str(QUICKSTART)])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert main(["build", "--no-progress", *argv]) == 0
    capsys.readouterr()
    plain, recipe = files(tmp_path / "plain" / "viscon"), files(tmp_path / "recipe" / "viscon")
    assert plain.keys() == recipe.keys() and any(k.endswith(".parquet") for k in plain)
    assert plain == recipe
    info = json.loads(plain["viscon_build.json"])
    recorded = info["recipe"]["build"]
    assert recorded["generate"]["caption_model"] == "openai:handwritten-example"
    assert "output" not in recorded and "work_dir" not in recorded
    assert "output" not in recorded["prepare"] and "contexts" not in recorded["generate"]
    assert recorded["generate"]["extra_caches"] == ["bundled"], "no machine-specific path is recorded"


def test_quickstart_recipe_resolves_like_no_flags(capsys):
    assert printed(capsys, "build", "--recipe", str(QUICKSTART)) == printed(capsys, "build")


def test_a_flag_overrides_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "build:\n  merge:\n    test_fraction: 0.1\n    dedup:\n      threshold: 0.8\n"
        "  generate:\n    engine:\n      max_attempts: 3\n"
    )
    from_file = printed(capsys, "build", "--recipe", str(recipe))["build"]
    assert from_file["merge"]["test_fraction"] == 0.1 and from_file["merge"]["dedup"]["threshold"] == 0.8
    assert from_file["generate"]["engine"]["max_attempts"] == 3
    both = printed(
        capsys, "build", "--recipe", str(recipe), "--test-fraction", "0.2", "--dedup-threshold", "0.85"
    )["build"]
    assert both["merge"]["test_fraction"] == 0.2 and both["merge"]["dedup"]["threshold"] == 0.85
    assert both["generate"]["engine"]["max_attempts"] == 3, "a nested value the flags do not name stays"


def test_printed_recipe_reads_back_to_the_same_config(tmp_path, capsys):
    text = yaml.safe_dump(printed(capsys, "build", "--recipe", str(OBELICS)))
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load(BuildConfig, again, "build") == load(BuildConfig, OBELICS, "build")


def test_every_stage_command_takes_the_recipe(capsys):
    for argv in (["build"], ["card"], ["push"], ["release"], ["cache", "push"], ["cache", "pull"]):
        out = printed(capsys, *argv, "--recipe", str(OBELICS))
        (section,) = out
        assert section == (argv[-1] if argv[0] != "cache" else "cache")
    assert printed(capsys, "card", "--recipe", str(OBELICS))["card"]["dataset"] == "viscon-obelics"
    assert printed(capsys, "release", "--recipe", str(OBELICS))["release"]["version"] == "1.0.0"
    export = printed(capsys, "export", "--recipe", str(QUICKSTART), "--format", "idefics")["export"]
    assert export == {
        "dataset": "viscon",
        "config": "leaky",
        "format": "idefics",
        "output": "viscon-llava",
        "split": None,
        "max_shard_size": 500_000_000,
    }


def test_prepare_and_generate_take_the_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "prepare:\n  max_tokens: 500\n  fetch:\n    concurrency: 4\n"
        "generate:\n  contexts: c\n  output: o\n  batch_max_bytes: 1MiB\n  engine:\n    requests_per_minute: 60\n"
    )
    prep = printed(capsys, "prepare", "--recipe", str(recipe), "--concurrency", "8")["prepare"]
    assert prep["max_tokens"] == 500 and prep["fetch"]["concurrency"] == 8
    gen = printed(capsys, "generate", "--recipe", str(recipe), "--offline")["generate"]
    assert gen["batch_max_bytes"] == 2**20 and gen["engine"]["requests_per_minute"] == 60.0
    assert gen["engine"]["offline"] is True


@pytest.mark.parametrize(
    ("text", "key", "expected", "arrived"),
    [
        (
            "build:\n  merge:\n    dedup:\n      thresold: 0.9\n",
            "build.merge.dedup.thresold",
            "expected one of",
            "got 0.9",
        ),
        (
            "build:\n  merge:\n    test_fraction: lots\n",
            "build.merge.test_fraction",
            "expected a number",
            "got 'lots' (str)",
        ),
        ("build:\n  offline: 'yes'\n", "build.offline", "expected true or false or null", "got 'yes'"),
        (
            "build:\n  merge:\n    configs: leaky\n",
            "build.merge.configs",
            "expected a list of a string",
            "got 'leaky'",
        ),
        (
            "build:\n  generate:\n    engine: 5\n",
            "build.generate.engine",
            "expected a mapping",
            "got 5 (int)",
        ),
        (
            "build:\n  caption_model: openai:gpt-4o\n",
            "build.caption_model",
            "expected one of output, work_dir, offline, prepare, generate, relevance, merge, runner",
            "got 'openai:gpt-4o'",
        ),
        (
            "build:\n  prepare:\n    output: somewhere\n",
            "build: prepare.output",
            "expected it left out",
            "got 'somewhere'",
        ),
        (
            "build:\n  generate:\n    engine:\n      max_attempts: 2.5\n",
            "build.generate.engine.max_attempts",
            "whole number",
            "got 2.5",
        ),
        (
            "build:\n  relevance:\n    on: cosine\n",
            "build.relevance.on",
            "one of 'kl', 'pmi'",
            "got 'cosine'",
        ),
    ],
)
def test_unknown_key_or_wrong_type_is_one_line_and_exit_2(tmp_path, capsys, text, key, expected, arrived):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["build", "--recipe", str(recipe)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"viscon build: error: {key}:"), line
    assert expected in line and arrived in line, line


def test_a_value_the_config_refuses_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("build:\n  merge:\n    dedup:\n      threshold: 1.5\n")
    assert main(["build", "--recipe", str(recipe)]) == 2
    line = error_line(capsys)
    assert "build.merge.dedup" in line and "1.5" in line


def _bomb() -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "build:\n  " + "\n  ".join(lines) + "\n"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"- just\n- a list\n", "expected a mapping of command"),
        (b"42\n", "expected a mapping of command"),
        (b"build: [1, 2]\n", "build: expected a mapping of option to value"),
        (b"builds:\n  limit: 1\n", "unknown section"),
        (b"build:\n  source: \xff\xfe\n", "expected UTF-8 text"),
        (b"build: {limit: [1, 2\n", "not valid YAML"),
        (b"build:\n  x: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nest"),
        (b"build:\n  x: " + b"[" * 40 + b"]" * 40 + b"\n", "levels of nesting"),
        (_bomb().encode(), "anchors expanded"),
        (b"prepare:\n  limit: 1\n", "expected a section 'build'"),
        (b"build: !!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_hostile_recipes_are_a_clear_error(tmp_path, capsys, content, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    assert main(["build", "--recipe", str(recipe)]) == 2
    line = error_line(capsys)
    assert line.startswith("viscon build: error: ") and says in line, line
    assert "Traceback" not in line


def test_missing_or_folder_recipe_is_a_clear_error(tmp_path, capsys):
    for where in (tmp_path / "nope.yaml", tmp_path):
        assert main(["card", "--recipe", str(where)]) == 2
        assert "expected a YAML file" in error_line(capsys)


def test_required_field_without_a_value_names_its_flag(tmp_path, capsys):
    assert main(["push", "--dataset", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "push.repo" in line and "--repo" in line


def test_bad_flag_value_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["build", "--limit", "many"])
    assert info.value.code == 2


def test_secrets_never_reach_the_printed_recipe(capsys):
    out = printed(capsys, "build", "--base-url", "https://user:sk-abcdefghijklmnop@llm.example.org/v1")
    text = json.dumps(out)
    assert "sk-abcdefghijklmnop" not in text and "user:" not in text
    assert out["build"]["generate"]["base_url"] == "https://llm.example.org/v1"


def test_loader_reads_nested_configs_and_sizes():
    config = from_mapping(
        BuildConfig,
        {
            "merge": {"max_shard_size": "200KB"},
            "prepare": {"fetch": {"formats": ["png"]}, "filters": {"languages": ["EN"]}},
        },
    )
    assert config.merge.max_shard_size == 200_000 and config.prepare.fetch.formats == ("png",)
    assert config.prepare.filters.languages == ("en",)
    assert to_mapping(config, portable=True).keys() < to_mapping(config).keys()
    with pytest.raises(
        ConfigError, match=r"^build\.prepare\.fetch\.formats\[0\]: expected a string; got 3 \(int\)$"
    ):
        from_mapping(BuildConfig, {"prepare": {"fetch": {"formats": [3]}}}, where="build")


def test_shipped_recipes_load_into_their_configs():
    from viscon_hub.cli import COMMANDS

    classes = {c.name.split()[0]: c.config_class() for c in COMMANDS}
    for path in (QUICKSTART, OBELICS, ROOT / "configs" / "prepare.yaml"):
        sections = read_recipe(path)
        assert sections, path
        for section in sections:
            data = (
                {**sections.get("push", {}), **sections[section]}
                if section == "release"
                else sections[section]
            )
            data = {"dataset": "d", "output": "o", **data} if section == "export" else data
            assert from_mapping(classes[section], data, where=section), (path, section)
