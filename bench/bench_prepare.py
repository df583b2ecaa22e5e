"""Benchmark the prepare stage against bare baselines measured in the same run.

1. Throughput: validation + token filter + context extraction (``process_batch``) over in-memory
   rows, in text tokens per second, against a bare batched fast-tokenizer pass
   (``Tokenizer.encode_batch_fast``) over the same documents' texts. Target: at least 0.8x.
2. Memory: peak RSS of a full ``prepare`` (read, filter, contexts, Parquet; no image I/O) over 10K and
   100K generated documents, each in a fresh process. Target: flat (100K / 10K close to 1).

    python bench/bench_prepare.py [--docs 4000] [--repeats 3] [--memory-sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a of and to in is was for on that with as by at from this it an be are or which his her their "
    "museum photograph river bridge station garden harbour coffee roast kitchen recipe engine rocket "
    "launch crew mission orbit telescope galaxy star nebula cell tissue sample microscope stain teacher "
    "student lecture chapter history village market festival church tower castle mountain lake forest "
    "winter summer spring autumn morning evening painting portrait artist gallery exhibition collection "
    "archive letter newspaper report council building street square century war peace treaty king queen"
).split()


def make_row(i: int, rng: random.Random, words_per_doc: int) -> dict:
    n_images = 1 + i % 3
    n_texts = n_images + 1
    texts, images, meta = [], [], []
    url = f"https://example.org/bench/{i}"
    per_text = max(1, words_per_doc // n_texts)
    for k in range(n_texts):
        texts.append(" ".join(rng.choice(WORDS) for _ in range(per_text)).capitalize() + ".")
        images.append(None)
        meta.append(None)
        if k < n_images:
            src = f"https://example.org/bench/{i}/{k}.jpg"
            texts.append(None)
            images.append(src)
            meta.append({"document_url": url, "src": src, "unformatted_src": src, "alt_text": f"figure {k}"})
    return {
        "images": images,
        "metadata": json.dumps(meta),
        "general_metadata": json.dumps({"url": url}),
        "texts": texts,
    }


def write_corpus(path: Path, n_docs: int, words_per_doc: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            f.write(json.dumps(make_row(i, rng, words_per_doc)) + "\n")
    return path


def throughput(n_docs: int, repeats: int, words_per_doc: int) -> dict:
    from viscon_hub.prepare.driver import PrepareConfig, PrepareStats, process_batch
    from viscon_hub.prepare.readers import RawRow
    from viscon_hub.prepare.tokens import TokenCounter
    from viscon_hub.prepare.validate import parse_row

    rng = random.Random(1)
    rows = [RawRow(data=make_row(i, rng, words_per_doc), source="bench", row=i) for i in range(n_docs)]
    texts = [parse_row(r)[0].text for r in rows]
    counter = TokenCounter()
    bare = counter._tokenizer  # the same Rust tokenizer, called directly: the bare baseline
    config = PrepareConfig(output="unused", fetch_images=False)
    batch = config.batch_size
    total_tokens = sum(counter.count(texts))

    def run_bare() -> float:
        t = time.perf_counter()
        n = 0
        for s in range(0, len(texts), batch):
            n += sum(
                len(e.ids) for e in bare.encode_batch_fast(texts[s : s + batch], add_special_tokens=False)
            )
        assert n == total_tokens
        return time.perf_counter() - t

    def run_ours() -> float:
        stats = PrepareStats()
        t = time.perf_counter()
        contexts = 0
        for s in range(0, len(rows), batch):
            contexts += len(process_batch(rows[s : s + batch], config=config, counter=counter, stats=stats))
        elapsed = time.perf_counter() - t
        assert stats.text_tokens_kept == total_tokens and contexts > 0
        return elapsed

    run_bare(), run_ours()  # warm up both
    bare_s, ours_s = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        bare_s.append(run_bare())
        ours_s.append(run_ours())
    bare_tps = total_tokens / min(bare_s)
    ours_tps = total_tokens / min(ours_s)
    return {
        "documents": n_docs,
        "tokens": total_tokens,
        "bare_tokens_per_s": round(bare_tps),
        "viscon_tokens_per_s": round(ours_tps),
        "ratio": round(ours_tps / bare_tps, 3),
        "target_ratio": 0.8,
    }


CHILD = """
import json, resource, sys, time
from viscon_hub.prepare.driver import PrepareConfig, prepare
t = time.perf_counter()
stats = prepare(PrepareConfig(source=sys.argv[1], output=sys.argv[2], fetch_images=False))
print(json.dumps({"documents_read": stats.documents_read, "images_kept": stats.images_kept,
                  "seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def memory(sizes: list[int], words_per_doc: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            corpus = write_corpus(Path(tmp) / f"corpus-{n}.jsonl", n, words_per_doc)
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(corpus), str(Path(tmp) / f"out-{n}")],
                check=True,
                capture_output=True,
                text=True,
            )
            results[n] = json.loads(out.stdout.strip().splitlines()[-1])
            corpus.unlink()
    small, large = min(sizes), max(sizes)
    return {
        "runs": results,
        "peak_rss_ratio_large_vs_small": round(
            results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"], 3
        ),
        "target": "flat (ratio close to 1.0)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--words", type=int, default=600, help="words per document (throughput)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", default="10000,100000")
    parser.add_argument("--memory-words", type=int, default=150, help="words per document (memory)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    report = {"throughput": throughput(args.docs, args.repeats, args.words)}
    print(json.dumps(report["throughput"], indent=2), flush=True)
    if not args.skip_memory:
        report["memory"] = memory([int(x) for x in args.memory_sizes.split(",")], args.memory_words)
        print(json.dumps(report["memory"], indent=2))


if __name__ == "__main__":
    main()
