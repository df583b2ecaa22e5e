"""Benchmark the merge's memory: peak RSS of merge + write at 100K and 1M generation records.

Synthetic generation records (two images per page, every image distinct and tiny, four free-form and
four multiple-choice items each) are written to a generations folder by one child process; another
child runs ``write_dataset`` for ``leaky`` and ``contextual`` (question dedup keeps everything: it has
its own benchmark) and reports its own peak RSS (``ru_maxrss``), so each size is measured in a fresh
process. The bare baseline is ``bench_merge.bare`` (json.loads per line -> message lists ->
``pa.Table.from_pylist`` -> ``pq.write_table``, all rows in memory) over the smallest size's records,
in the same run.

Targets: ``peak_rss_ratio`` (largest size / smallest) <= 1.3, and merge conversations/s >= 0.5x the
bare rate. ``conversations_per_s_ratio`` is the two-config merge (contextual rows come on top);
``leaky_only_conversations_per_s_ratio`` writes one config, as the bare side writes one file.

    python bench/bench_build_memory.py [--sizes 100000,1000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORDS = "image shows a mug lamp desk person street tree car sign red blue small large near behind".split()


def make(n: int, root: Path, jsonl: bool) -> None:
    """``root/generations`` with ``n`` ok contextual records and ``root/images``; a JSONL copy if asked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from viscon_hub.prepare.images import ImageStore
    from viscon_hub.records import GENERATION_SCHEMA

    rng = random.Random(0)
    store = ImageStore(root / "images")

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    gen = root / "generations"
    (gen / "generations").mkdir(parents=True)
    out = open(root / "records.jsonl", "w") if jsonl else None
    with pq.ParquetWriter(
        gen / "generations" / "records.parquet", GENERATION_SCHEMA, compression="zstd"
    ) as w:
        for start in range(0, n, 10_000):
            chunk = []
            for i in range(start, min(n, start + 10_000)):
                blob = b"\xff\xd8\xff" + i.to_bytes(8, "big") + rng.randbytes(120)
                sha = hashlib.sha256(blob).hexdigest()
                path = Path(store.blob_path(sha))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)  # store.put's atomic rename is not what is measured here
                chunk.append(
                    {
                        "id": f"doc{i // 2}-{i % 2}",
                        "document_id": f"doc{i // 2}",
                        "image_index": i % 2,
                        "page_url": f"https://example.org/page/{i // 2}",
                        "image_url": f"https://example.org/img/{i}.jpg",
                        "alt_text": text(6),
                        "context": text(60),
                        "context_tokens": 80,
                        "image_sha256": sha,
                        "width": 64,
                        "height": 48,
                        "image_format": "jpeg",
                        "source": "bench",
                        "row": i // 2,
                        "provenance": "{}",
                        "context_mode": "contextual",
                        "status": "ok",
                        "caption": text(40),
                        "caption_model": "m",
                        "caption_template": "contextual_caption@1",
                        "caption_key": f"c{i}",
                        "qa_model": "m",
                        "qa_freeform": [{"question": text(8) + "?", "answer": text(12)} for _ in range(4)],
                        "qa_freeform_template": "qa_freeform@1",
                        "qa_freeform_key": f"f{i}",
                        "qa_multiple_choice": [
                            {
                                "question": text(8) + "?",
                                "options": [text(2) for _ in range(4)],
                                "answer": "ABCD"[j],
                            }
                            for j in range(4)
                        ],
                        "qa_multiple_choice_template": "qa_multiple_choice@1",
                        "qa_multiple_choice_key": f"m{i}",
                    }
                )
            w.write_table(pa.Table.from_pylist(chunk, schema=GENERATION_SCHEMA), row_group_size=10_000)
            if out is not None:
                for r in chunk:
                    out.write(json.dumps(r) + "\n")
    if out is not None:
        out.close()
    (gen / "stats.json").write_text(json.dumps({"image_store": str(root / "images")}))


def merge(root: Path, configs: tuple[str, ...] = ("contextual", "leaky")) -> dict:
    from bench_merge import keep_all

    from viscon_hub.build import merge as merge_module
    from viscon_hub.build.driver import write_dataset
    from viscon_hub.build.merge import MergeConfig

    merge_module.dedup_questions = keep_all  # dedup has its own benchmark
    t = time.perf_counter()
    report = write_dataset(
        generations=str(root / "generations"),
        output=str(root / "out"),
        merge=MergeConfig(configs=configs),
        cache=str(root / "cache"),
    )
    elapsed = time.perf_counter() - t
    rows = sum(report.rows["leaky"].values())
    return {
        "conversations": rows,
        "contextual_rows": sum(report.rows["contextual"].values()) if "contextual" in configs else 0,
        "elapsed_s": round(elapsed, 2),
        "conversations_per_s": round(rows / elapsed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bare_run(root: Path) -> dict:
    from bench_merge import bare

    t = time.perf_counter()
    n = bare(root / "records.jsonl", root / "images", root / "bare.parquet")
    elapsed = time.perf_counter() - t
    return {
        "conversations": n,
        "elapsed_s": round(elapsed, 2),
        "conversations_per_s": round(n / elapsed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--keep", default=None, help="work in DIR and leave it (default: a temporary folder)")
    parser.add_argument(
        "--child", choices=("make", "make-jsonl", "merge", "merge-leaky", "bare"), help=argparse.SUPPRESS
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("make", "make-jsonl"):
        t = time.perf_counter()
        make(args.n, Path(args.root), jsonl=args.child == "make-jsonl")
        print(json.dumps({"elapsed_s": round(time.perf_counter() - t, 2)}))
        return
    if args.child in ("merge", "merge-leaky"):
        configs = ("leaky",) if args.child == "merge-leaky" else ("contextual", "leaky")
        print(json.dumps(merge(Path(args.root), configs)))
        return
    if args.child == "bare":
        print(json.dumps(bare_run(Path(args.root))))
        return

    sizes = sorted(int(s) for s in args.sizes.split(","))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="viscon-bench-"))
    result: dict = {"sizes": sizes, "configs": ["contextual", "leaky"], "runs": {}}
    try:
        for n in sizes:
            root = base / str(n)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            made = child(
                "--child", "make-jsonl" if n == sizes[0] else "make", "--root", str(root), "--n", str(n)
            )
            run = child("--child", "merge", "--root", str(root))
            run["make_s"] = made["elapsed_s"]
            result["runs"][str(n)] = run
            if n == sizes[0]:
                result["bare"] = child("--child", "bare", "--root", str(root))
                # Like for like: the bare side writes one file of conversations, so does this run.
                result["leaky_only"] = child("--child", "merge-leaky", "--root", str(root))
            print(json.dumps({str(n): run}), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    small, large = result["runs"][str(sizes[0])], result["runs"][str(sizes[-1])]
    result["peak_rss_mb"] = {k: v["peak_rss_mb"] for k, v in result["runs"].items()}
    result["peak_rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    bare_rate = result["bare"]["conversations_per_s"]
    result["conversations_per_s_ratio"] = round(small["conversations_per_s"] / bare_rate, 3)
    result["leaky_only_conversations_per_s_ratio"] = round(
        result["leaky_only"]["conversations_per_s"] / bare_rate, 3
    )
    result["targets"] = {"peak_rss_ratio": 1.3, "conversations_per_s_ratio": 0.5}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
