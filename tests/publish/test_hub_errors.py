"""Hub failures a user can act on: one or two lines with the fix, retries on every Hub call, no leftovers."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.publish.test_hub import REPO, dataset  # noqa: F401 - the fixture
from viscon_hub.cli import main
from viscon_hub.errors import ConfigError
from viscon_hub.publish.hub import _check_repo_id, push


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr("viscon_hub.publish.hub.BACKOFF_BASE_S", 0.01)


def error_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 <= len(err) <= 2, err
    assert not any("Traceback" in line for line in err)
    return err


def test_rate_limited_first_lookup_is_retried(hub_server, dataset):  # noqa: F811
    push(dataset=dataset, repo=REPO)
    hub_server.set_read_faults(["429", "500", "429"])
    report = push(dataset=dataset, repo=REPO)
    assert report.retries >= 3 and not report.commits and hub_server.read_faults == []


@pytest.mark.parametrize("command", [["push"], ["release", "--version", "1.0.0"], ["cache", "push"]])
def test_dead_hub_is_one_line(hub_server, dataset, tmp_path, capsys, command):  # noqa: F811
    hub_server.stop()
    where = ["--cache", str(tmp_path)] if command[0] == "cache" else ["--dataset", str(dataset)]
    assert main([*command, *where, "--repo", REPO]) == 2
    (line,) = error_lines(capsys)
    assert "no answer from the Hub" in line and "HF_ENDPOINT" in line


def test_dead_hub_on_pull_is_one_line(hub_server, tmp_path, capsys):
    hub_server.stop()
    assert main(["cache", "pull", "--cache", str(tmp_path / "c"), "--repo", REPO]) != 0
    error_lines(capsys)


@pytest.mark.parametrize(
    "command", [["push"], ["release", "--version", "1.0.0"], ["cache", "push"]], ids=lambda c: c[0]
)
def test_missing_token_says_how_to_set_one(hub_server, dataset, tmp_path, monkeypatch, capsys, command):  # noqa: F811
    monkeypatch.delenv("HF_TOKEN")
    where = ["--cache", str(tmp_path)] if command[0] == "cache" else ["--dataset", str(dataset)]
    assert main([*command, *where, "--repo", REPO]) == 2
    (line,) = error_lines(capsys)
    assert "HF_TOKEN" in line and "hf auth login" in line


def test_refused_token_says_so(hub_server, dataset, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrongwrong")
    from tests.servers import minihub

    monkeypatch.setattr(minihub._Handler, "_authed", lambda self: False)
    rc = main(["push", "--dataset", str(dataset), "--repo", REPO])
    out = capsys.readouterr().err
    assert rc == 2 and "hf_wrongwrongwrongwrong" not in out


@pytest.mark.parametrize(
    "repo", ["org/..", "org/name?x=1", "../etc", "org/na me", "org/-x", "a/b/c", "org/", "x" * 200 + "/y"]
)
def test_bad_repo_names_are_clean_errors(repo, tmp_path, capsys):
    with pytest.raises(ConfigError, match="ORG/NAME"):
        _check_repo_id(repo)
    assert main(["push", "--dataset", str(tmp_path), "--repo", repo]) == 2
    (line,) = error_lines(capsys)
    assert "--repo" in line


def test_killed_push_staging_is_removed_by_the_next_run(hub_server, dataset):  # noqa: F811
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix="viscon-push-"))
    (stale / ".viscon-owner").write_text(str(dead.pid))
    (stale / "big.parquet").write_bytes(b"x" * 1000)
    live = Path(tempfile.mkdtemp(prefix="viscon-push-"))
    (live / ".viscon-owner").write_text(str(os.getppid()))
    try:
        report = push(dataset=dataset, repo=REPO)
        assert not stale.exists() and live.exists()
        assert ".viscon-owner" not in str(report.added)
        assert not any(".viscon-owner" in p for p in hub_server.files(REPO))
    finally:
        import shutil

        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def test_storage_without_its_package_names_the_extra(tmp_path, monkeypatch, capsys):
    import fsspec.core

    def no_s3(url, **kw):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3)
    assert main(["prepare", "--source", "s3://bucket/docs.jsonl", "--output", str(tmp_path / "o")]) == 2
    (line,) = error_lines(capsys)
    assert "viscon-hub[s3]" in line


def test_unexpected_error_is_two_lines_and_a_traceback_on_debug(monkeypatch, tmp_path, capsys):
    from viscon_hub import cli

    def boom(args):
        raise RuntimeError("something\nbroke with https://user:secret@example.org")

    monkeypatch.setattr(cli, "_cmd_card", boom)
    assert main(["card", "--dataset", str(tmp_path)]) == 1
    lines = error_lines(capsys)
    assert lines[0].startswith("viscon card: error: RuntimeError: something broke")
    assert "secret" not in lines[0] and "--log-level DEBUG" in lines[1]
    with pytest.raises(RuntimeError):
        main(["--log-level", "DEBUG", "card", "--dataset", str(tmp_path)])
