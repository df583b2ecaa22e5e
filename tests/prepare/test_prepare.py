import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import good_row, write_jsonl
from viscon_hub.errors import ConfigError
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.prepare.images import FetchPolicy
from viscon_hub.prepare.readers import SAMPLE_PATH
from viscon_hub.records import IMAGE_CONTEXT_SCHEMA, IMAGE_PLACEHOLDER


def read_contexts(out):
    return pq.read_table(sorted((out / "contexts").glob("*.parquet"))).to_pylist()


def sample_rows():
    return [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample_out")
    stats = prepare(PrepareConfig(output=str(out)))
    return out, stats


def test_sample_contexts_hold_image_exactly_once(sample_run):
    out, stats = sample_run
    rows = read_contexts(out)
    assert rows and len(rows) == stats.images_kept
    for row in rows:
        assert row["context"].count(IMAGE_PLACEHOLDER) == 1
        assert row["image_sha256"] and len(row["image_sha256"]) == 64
        assert row["width"] >= 150 and row["height"] >= 150
        assert row["context_tokens"] <= 2000
        assert json.loads(row["provenance"])["image_metadata"]["image_license"]
    assert pq.read_schema(next((out / "contexts").glob("*.parquet"))).equals(
        IMAGE_CONTEXT_SCHEMA, check_metadata=False
    )
    assert len({r["id"] for r in rows}) == len(rows)


def test_sample_stats(sample_run):
    out, stats = sample_run
    on_disk = json.loads((out / "stats.json").read_text())
    rows = sample_rows()
    assert on_disk["documents_read"] == len(rows) == stats.documents_read
    # The sample holds one deliberately long document; the 2000-token filter drops it.
    assert on_disk["dropped"] == {"too_many_tokens": 1}
    assert on_disk["documents_kept"] == len(rows) - 1
    images_in_kept = stats.images_seen
    assert on_disk["images_kept"] == images_in_kept >= 30
    assert {"documents_read", "documents_kept", "images_kept", "dropped"} <= set(on_disk)
    drops = [json.loads(x) for x in (out / "drops").glob("*.jsonl").__next__().read_text().splitlines()]
    assert [d["reason"] for d in drops] == ["too_many_tokens"]


def test_rerun_is_identical_and_fetches_nothing(sample_run, tmp_path):
    out, _ = sample_run
    again = tmp_path / "again"
    # Same image store: everything is answered from its index.
    prepare(PrepareConfig(output=str(again), image_store=str(out / "images")))
    assert read_contexts(again) == read_contexts(out)


def test_max_tokens_and_cap_flags(tmp_path):
    stats = prepare(
        PrepareConfig(output=str(tmp_path), max_tokens=300, max_images_per_document=1, fetch_images=False)
    )
    assert stats.dropped["too_many_tokens"] > 1
    rows = read_contexts(tmp_path)
    assert all(r["context_tokens"] <= 300 for r in rows)
    assert all(r["image_index"] == 0 for r in rows)
    assert stats.images_capped == stats.dropped["image_over_document_cap"]


def test_shards_partition_the_sample(sample_run, tmp_path):
    out, stats = sample_run
    for i in range(3):
        prepare(
            PrepareConfig(output=str(tmp_path), num_shards=3, shard_index=i, image_store=str(out / "images"))
        )
    assert len(list((tmp_path / "contexts").glob("part-*-of-00003.parquet"))) == 3
    merged = json.loads((tmp_path / "stats.json").read_text())
    assert merged["shards_done"] == 3
    assert merged["documents_read"] == stats.documents_read
    assert merged["images_kept"] == stats.images_kept
    assert sorted(r["id"] for r in read_contexts(tmp_path)) == sorted(r["id"] for r in read_contexts(out))


class _Server:
    """A tiny image server on 127.0.0.1: path -> (status, content type, body)."""

    def __init__(self, routes):
        routes_ = routes
        self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.hits.append(self.path)
                status, ctype, body = routes_.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = self
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def jpeg(w=240, h=200, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


def test_mixed_good_and_malformed_rows(tmp_path):
    server = _Server(
        {
            "/ok.jpg": (200, "image/jpeg", jpeg()),
            "/ok2.jpg": (200, "image/jpeg", jpeg(color=(10, 200, 10))),
            "/corrupt.jpg": (200, "image/jpeg", b"\xff\xd8\xff garbage"),
            "/tiny.jpg": (200, "image/jpeg", jpeg(40, 40)),
        }
    )
    try:

        def row(n, path):
            r = good_row(n)
            r["images"][1] = server.url + path
            return r

        good = [row(0, "/ok.jpg"), row(1, "/ok2.jpg")]
        bad_image_rows = [row(2, "/gone.jpg"), row(3, "/corrupt.jpg"), row(4, "/tiny.jpg")]
        malformed = [
            "{not json",
            {**good_row(5), "texts": ["x"]},
            {**good_row(6), "metadata": "{oops"},
            {**good_row(7), "metadata": json.dumps({"a": 1})},
            {**good_row(8), "images": [None, None, None]},
            {"images": [None], "texts": ["t"], "metadata": "[null]", "general_metadata": "{}"},
            {**good_row(9), "texts": [None, None, None]},
            {**good_row(10), "texts": [1, None, "x"]},
            {"images": [], "texts": [], "metadata": "[]", "general_metadata": "{}"},
        ]
        path = write_jsonl(
            tmp_path / "mixed.jsonl", [good[0], *malformed[:4], good[1], *malformed[4:], *bad_image_rows]
        )
        out = tmp_path / "out"
        policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_attempts=1, timeout_s=5)
        prepare(PrepareConfig(source=str(path), output=str(out), fetch=policy))
        rows = read_contexts(out)
        assert sorted(r["image_url"] for r in rows) == sorted(
            [server.url + "/ok.jpg", server.url + "/ok2.jpg"]
        )
        on_disk = json.loads((out / "stats.json").read_text())
        assert on_disk["documents_read"] == 2 + len(malformed) + 3
        assert on_disk["documents_kept"] == 5
        assert on_disk["images_kept"] == 2
        assert on_disk["dropped"] == {
            "invalid_json": 1,
            "length_mismatch": 1,
            "metadata_not_json": 1,
            "metadata_not_list": 1,
            "image_without_url": 1,
            "no_image": 1,
            "null_text": 1,
            "wrong_type": 1,
            "empty_document": 1,
            "image_http_404": 1,
            "image_decode_error": 1,
            "image_too_small": 1,
        }
        logged = [json.loads(x) for f in (out / "drops").glob("*.jsonl") for x in f.read_text().splitlines()]
        assert sum(on_disk["dropped"].values()) == len(logged)
        assert {d["row"] for d in logged if d["reason"] == "invalid_json"} == {1}
        # A rerun on the same store asks the server for nothing.
        hits = len(server.hits)
        prepare(
            PrepareConfig(
                source=str(path), output=str(tmp_path / "out2"), fetch=policy, image_store=str(out / "images")
            )
        )
        assert len(server.hits) == hits
    finally:
        server.close()


def test_private_urls_refused_by_default(tmp_path):
    server = _Server({"/ok.jpg": (200, "image/jpeg", jpeg())})
    try:
        r = good_row(0)
        r["images"][1] = server.url + "/ok.jpg"
        path = write_jsonl(tmp_path / "one.jsonl", [r])
        stats = prepare(PrepareConfig(source=str(path), output=str(tmp_path / "out")))
        assert stats.images_kept == 0 and stats.dropped["image_blocked_address"] == 1
        assert server.hits == []
    finally:
        server.close()


def test_bad_config_values():
    with pytest.raises(ConfigError, match="--max-tokens"):
        PrepareConfig(max_tokens=0)
    with pytest.raises(ConfigError, match="--shard-index"):
        PrepareConfig(num_shards=2, shard_index=5)
    with pytest.raises(ConfigError, match="--max-images-per-document"):
        PrepareConfig(max_images_per_document=0)


def test_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prepare:\n  max_tokens: 500\n  fetch:\n    concurrency: 4\n")
    config = PrepareConfig.from_recipe(recipe, output="x", max_tokens=None)
    assert config.max_tokens == 500 and config.fetch.concurrency == 4 and config.output == "x"
    assert PrepareConfig.from_recipe(recipe, max_tokens=700).max_tokens == 700
    recipe.write_text("prepare:\n  max_tokenz: 500\n")
    with pytest.raises(ConfigError, match="max_tokenz"):
        PrepareConfig.from_recipe(recipe)


def viscon(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "viscon_hub", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_version_and_help():
    from viscon_hub import __version__

    assert viscon("--version").stdout.strip() == f"viscon-hub {__version__}"
    helped = viscon("prepare", "--help")
    assert helped.returncode == 0
    for flag in (
        "--source",
        "--output",
        "--limit",
        "--max-tokens",
        "--num-shards",
        "--shard-index",
        "--allow-private-urls",
    ):
        assert flag in helped.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "-3"], "--limit"),
        (["--max-tokens", "many"], "--max-tokens"),
        (["--num-shards", "2", "--shard-index", "2"], "--shard-index"),
        (["--bogus"], "unrecognized arguments"),
        (["--source", "/nonexistent/corpus.parquet"], "no OBELICS files"),
    ],
)
def test_cli_bad_flags_are_clear_errors(args, message, tmp_path):
    result = viscon("prepare", "--output", str(tmp_path / "o"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prepare_on_the_sample(tmp_path):
    result = viscon("prepare", "--output", str(tmp_path / "o"), "--limit", "5", "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["documents_read"] == 5
    assert (
        json.loads((tmp_path / "o" / "stats.json").read_text())["images_kept"] == summary["images_kept"] > 0
    )


def test_a_killed_prepare_leaves_nothing_after_the_rerun(tmp_path):
    """SIGKILL mid-run leaves its staging folder; the next run sweeps it and writes the same outputs."""
    import signal

    out = tmp_path / "out"
    script = (
        "import os, signal\n"
        "from viscon_hub.prepare import driver\n"
        "def die(self):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "driver._Output.commit = die\n"
        f"driver.prepare(driver.PrepareConfig(output={str(out)!r}, limit=5, fetch_images=False))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    left = list(out.glob(".staging-*"))
    assert len(left) == 1 and any(left[0].iterdir()), "the killed run's staging folder is there"

    # A live writer's folder (a concurrent shard) is not touched by the sweep.
    from viscon_hub.fsutil import StagingDir

    live = StagingDir(out)
    prepare(PrepareConfig(output=str(out), limit=5, fetch_images=False))
    assert [p.name for p in out.glob(".staging-*")] == [live.path.name]
    live.remove()
    fresh = tmp_path / "fresh"
    prepare(PrepareConfig(output=str(fresh), limit=5, fetch_images=False))
    part = "contexts/part-00000-of-00001.parquet"
    assert pq.read_table(out / part).equals(pq.read_table(fresh / part))
