"""Benchmark the merge (records -> leaky conversations -> Parquet) against a bare pass over the same records.

Both sides start from the same generation records and image bytes and end with a Parquet file of one
row per image holding the image and a conversation:

- bare: one ``json.loads`` per record line, caption and Q&A concatenated into a message list,
  ``pa.Table.from_pylist`` and ``pq.write_table``;
- ours: ``viscon_hub.build.driver.write_dataset`` for the ``leaky`` config (record reading, seeded
  instructions and shuffles, image store reads, validation, the declared Features, row groups,
  staging and renaming, the README and build info). The question dedup is measured on its own in
  ``bench_dedup.py``; here it keeps every question.

Targets: ours >= 0.5x the bare rate, and >= 5,000 conversations/s per core (the merge is one thread).

    python bench/bench_merge.py [--records 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from viscon_hub.build import driver as build_module  # noqa: E402
from viscon_hub.build import merge as merge_module  # noqa: E402
from viscon_hub.build.dedup import DedupResult  # noqa: E402
from viscon_hub.build.merge import MergeConfig  # noqa: E402
from viscon_hub.prepare.images import ImageStore  # noqa: E402
from viscon_hub.records import GENERATION_SCHEMA  # noqa: E402


def make_records(n: int, root: Path) -> tuple[Path, Path]:
    """A generations folder with ``n`` ok records, and a JSONL copy of them for the bare side."""
    rng = random.Random(0)
    store = ImageStore(root / "images")
    images = []
    for i in range(64):  # 64 distinct ~8 KB images, shared like real duplicates
        data = hashlib.sha256(str(i).encode()).digest() * 256
        images.append(store.put(b"\xff\xd8\xff" + data))
    words = "image shows a mug lamp desk person street tree car sign red blue small large near behind".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    records = []
    for i in range(n):
        records.append(
            {
                "id": f"doc{i // 2}-{i % 2}",
                "document_id": f"doc{i // 2}",
                "image_index": i % 2,
                "page_url": f"https://example.org/page/{i // 2}",
                "image_url": f"https://example.org/img/{i}.jpg",
                "image_path": None,
                "alt_text": text(6),
                "context": text(300),
                "context_tokens": 400,
                "image_sha256": images[i % len(images)],
                "width": 640,
                "height": 480,
                "image_format": "jpeg",
                "source": "bench",
                "row": i // 2,
                "provenance": "{}",
                "context_mode": "contextual",
                "status": "ok",
                "drop_reason": None,
                "caption": text(120),
                "caption_model": "m",
                "caption_template": "contextual_caption@1",
                "caption_key": "k",
                "qa_model": "m",
                "qa_freeform": [{"question": text(8) + "?", "answer": text(20)} for _ in range(4)],
                "qa_freeform_template": "qa_freeform@1",
                "qa_freeform_key": "k",
                "qa_multiple_choice": [
                    {"question": text(8) + "?", "options": [text(2) for _ in range(4)], "answer": "ABCD"[j]}
                    for j in range(4)
                ],
                "qa_multiple_choice_template": "qa_multiple_choice@1",
                "qa_multiple_choice_key": "k",
            }
        )
    gen = root / "generations"
    (gen / "generations").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(records, schema=GENERATION_SCHEMA), gen / "generations" / "records.parquet"
    )
    (gen / "stats.json").write_text(json.dumps({"image_store": str(root / "images")}))
    jsonl = root / "records.jsonl"
    with open(jsonl, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return gen, jsonl


def bare(jsonl: Path, store_root: Path, out: Path) -> int:
    store = ImageStore(store_root)
    rows = []
    with open(jsonl) as f:
        for line in f:
            r = json.loads(line)
            messages = [
                {"role": "user", "content": "Describe the image."},
                {"role": "assistant", "content": r["caption"]},
            ]
            for q in r["qa_freeform"]:
                messages += [
                    {"role": "user", "content": q["question"]},
                    {"role": "assistant", "content": q["answer"]},
                ]
            for q in r["qa_multiple_choice"]:
                messages += [
                    {"role": "user", "content": q["question"]},
                    {"role": "assistant", "content": q["answer"]},
                ]
            rows.append(
                {
                    "id": r["id"],
                    "image": {"bytes": store.get(r["image_sha256"]), "path": None},
                    "messages": messages,
                }
            )
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows)


def keep_all(items, **_kwargs) -> DedupResult:
    keep = [(list(range(len(ff))), list(range(len(mc)))) for ff, mc in items]
    n = sum(len(ff) + len(mc) for ff, mc in items)
    return DedupResult(
        keep=keep, model="none", fell_back=False, fallback_reason=None, questions_in=n, questions_kept=n
    )


def ours(gen: Path, out: Path, cache: Path) -> int:
    report = build_module.write_dataset(
        generations=str(gen), output=str(out), merge=MergeConfig(configs=("leaky",)), cache=str(cache)
    )
    return sum(report.rows["leaky"].values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    merge_module.dedup_questions = keep_all  # dedup has its own benchmark
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gen, jsonl = make_records(args.records, root)
        best = {"bare": 0.0, "ours": 0.0}
        for rep in range(args.repeats):
            for side in ("bare", "ours") if rep % 2 == 0 else ("ours", "bare"):
                out = root / f"out-{side}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                t = time.perf_counter()
                n = (
                    bare(jsonl, root / "images", out / "x.parquet")
                    if side == "bare"
                    else ours(gen, out / "viscon", root / "cache")
                )
                rate = n / (time.perf_counter() - t)
                assert n == args.records, (side, n)
                best[side] = max(best[side], rate)
        result = {
            "records": args.records,
            "bare_conversations_per_s": round(best["bare"]),
            "ours_conversations_per_s": round(best["ours"]),
            "ratio": round(best["ours"] / best["bare"], 3),
            "targets": {"ratio": 0.5, "conversations_per_s_per_core": 5000},
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
