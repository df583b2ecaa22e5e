"""Local image references stay inside their source's folder (or --image-root); hostile ones are drops."""

import io
import json
import os
import threading

import pyarrow.parquet as pq
from PIL import Image

from tests.conftest import good_row, write_jsonl
from tests.prepare.test_prepare import _Server, jpeg
from viscon_hub.cli import main
from viscon_hub.prepare.driver import PrepareConfig, prepare
from viscon_hub.prepare.images import FetchPolicy
from viscon_hub.prepare.images.check import check_image


def png(w=240, h=200):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def row_with(n, image):
    r = good_row(n)
    r["images"][1] = image
    return r


def kept(out):
    return pq.read_table(out / "contexts").to_pylist()


def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "img").mkdir(parents=True)
    (src / "img" / "ok.png").write_bytes(png())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(250, 210))
    return src, outside


def test_paths_outside_the_source_folder_are_refused(tmp_path):
    src, outside = corpus(tmp_path)
    os.symlink(outside / "secret.png", src / "img" / "link.png")
    hostile = [
        "../elsewhere/secret.png",
        "img/../../elsewhere/secret.png",
        str(outside / "secret.png"),
        f"file://{outside}/secret.png",
        "file:///etc/passwd",
        "/etc/passwd",
        "img/link.png",  # a symlink inside that points outside
    ]
    schemes = ["javascript:alert(1)", "gopher://example.org/1", "s3://bucket/a.png", "ftp://x/a.png"]
    rows = [row_with(0, "img/ok.png")]
    rows += [row_with(i + 1, ref) for i, ref in enumerate(hostile + schemes)]
    rows.append(row_with(99, f"file://{src}/img/ok.png"))
    write_jsonl(src / "docs.jsonl", rows)
    out = tmp_path / "out"
    stats = prepare(PrepareConfig(source=str(src / "docs.jsonl"), output=str(out)))
    assert stats.dropped == {"image_outside_root": len(hostile), "unsupported_scheme": len(schemes)}
    assert sorted(r["page_url"] for r in kept(out)) == [
        "https://example.org/page-0",
        "https://example.org/page-99",
    ]
    blob_files = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == (outside / "secret.png").read_bytes() for p in blob_files)


def test_image_root_lets_a_named_folder_in(tmp_path, capsys):
    src, outside = corpus(tmp_path)
    write_jsonl(src / "docs.jsonl", [row_with(0, str(outside / "secret.png"))])
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(src / "docs.jsonl"), "--output", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] == {"image_outside_root": 1}
    args = ["--image-root", str(outside), "--no-progress"]
    assert (
        main(["prepare", "--source", str(src / "docs.jsonl"), "--output", str(tmp_path / "o2"), *args]) == 0
    )
    assert json.loads(capsys.readouterr().out)["images_kept"] == 1


def test_fifo_and_oversize_files_are_drops_not_hangs(tmp_path):
    src, _ = corpus(tmp_path)
    os.mkfifo(src / "img" / "pipe.png")
    (src / "img" / "huge.png").write_bytes(png() + b"\0" * 3000)
    (src / "img" / "folder.png").mkdir()
    rows = [row_with(0, "img/ok.png"), row_with(1, "img/pipe.png"), row_with(2, "img/huge.png")]
    rows.append(row_with(3, "img/folder.png"))
    write_jsonl(src / "docs.jsonl", rows)
    policy = FetchPolicy(max_bytes=len(png()) + 100)
    box = {}
    run = threading.Thread(
        target=lambda: box.update(
            stats=prepare(
                PrepareConfig(source=str(src / "docs.jsonl"), output=str(tmp_path / "o"), fetch=policy)
            )
        ),
        daemon=True,
    )
    run.start()
    run.join(120)  # a guard against the old hang, not a speed claim
    assert not run.is_alive(), "prepare hung on a FIFO"
    stats = box["stats"]
    assert stats.images_kept == 1
    assert stats.dropped == {"image_unreadable_file": 2, "image_too_large": 1}


def test_credentials_never_reach_stored_urls(tmp_path):
    server = _Server({"/ok.jpg": (200, "image/jpeg", jpeg())})
    try:
        host = server.url.removeprefix("http://")
        image = f"http://alice:hunter2-secret@{host}/ok.jpg"
        page = "https://bob:page-secret@example.org/page"
        write_jsonl(
            tmp_path / "docs.jsonl", [row_with(0, image) | {"general_metadata": json.dumps({"url": page})}]
        )
        out = tmp_path / "out"
        policy = FetchPolicy(allowed_networks=("127.0.0.1/32",), max_attempts=1)
        stats = prepare(PrepareConfig(source=str(tmp_path / "docs.jsonl"), output=str(out), fetch=policy))
        assert stats.images_kept == 1
        (ctx,) = kept(out)
        assert ctx["image_url"] == f"{server.url}/ok.jpg" and ctx["page_url"] == "https://example.org/page"
        for path in out.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert b"hunter2-secret" not in data and b"page-secret" not in data, path
    finally:
        server.close()


def test_decoding_is_bounded_in_pixels():
    policy = FetchPolicy(max_decode_pixels=60_000)
    big_jpeg = jpeg(400, 300)  # 120k px: measured by a reduced decode
    info, reason, _ = check_image(big_jpeg, policy=policy)
    assert reason is None and (info.width, info.height) == (400, 300)
    info, reason, message = check_image(png(400, 300), policy=policy)
    assert reason == "too_many_pixels" and "max_decode_pixels" in message
    damaged = big_jpeg[: len(big_jpeg) // 3] + b"\0" * 100
    assert check_image(damaged, policy=policy)[1] == "decode_error"
    assert check_image(png(400, 300), policy=FetchPolicy())[1] is None
