"""Peak memory of opening a large generation cache and reading random replies, against baselines.

A synthetic cache of N entries is written once per size under ``--work`` (shards of ``--shard-rows``
rows, row groups as :class:`GenerationCache` writes them): 60% caption / Q&A replies of ~1 KB of
text, 40% question embeddings as the embedding backend stores them (384 float16 values, base64:
1 KB). Each measurement runs in a fresh subprocess and reports its peak RSS (``VmHWM``):

- bare: imports pyarrow, numpy and ``viscon_hub.engine``, reads nothing (the floor of any process);
- floor: the index side on a cache of 1,000 entries: what opening any cache costs whatever its size
  (the Parquet reader, pandas that pyarrow imports on first conversion, one decoded row group);
- index: opens the cache (the compact index) and does M random ``get`` calls, checking each reply;
- dict (at the smallest N, or every N with ``--dict-max``): the cache as it was before the index,
  every ``Completion`` kept in a dict (the previous ``cache.py``, taken from git), with the same gets.

Figures per N: peak MB, growth over bare (MB and bytes per entry), ``ratio`` = peak / bare peak,
growth over the floor per entry (what each stored key costs), open time, mean get time (and per key of one get_many of 20 x M keys, after the peak is taken); and
``marginal_bytes_per_entry`` between the two largest sizes. Printed as one JSON object.

    python bench/bench_cache_memory.py [--sizes 100000 1000000] [--gets 2000] [--work /tmp/...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from viscon_hub.engine.backends.embed_backend import encode_embedding
from viscon_hub.engine.cache import CACHE_SCHEMA, SHARD_ROW_GROUP_ROWS, shard_write_options

REPO = Path(__file__).resolve().parents[1]
# The cache before the compact index: every Completion held in a dict.
OLD_CACHE_COMMIT = "7339877"

CHILD = r"""
import json, random, sys, time
mode, root, n, gets, old_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import hashlib
import numpy, pyarrow, pyarrow.parquet
import viscon_hub.engine
def peak_mb():
    # VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's RSS over fork and exec.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
out = {"mode": mode, "import_peak_mb": round(peak_mb(), 1)}
if mode != "bare":
    if mode == "dict":
        import importlib.util
        spec = importlib.util.spec_from_file_location("old_cache", old_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        Cache = module.GenerationCache
    else:
        Cache = viscon_hub.engine.GenerationCache
    t = time.perf_counter()
    cache = Cache(root, read_only=True)
    out["open_s"] = round(time.perf_counter() - t, 2)
    out["open_peak_mb"] = round(peak_mb(), 1)
    out["entries"] = len(cache)
    rng = random.Random(0)
    picks = [rng.randrange(n) for _ in range(gets)]
    t = time.perf_counter()
    for i in picks:
        key = hashlib.sha256(str(i).encode()).hexdigest()
        c = cache.get(key)
        if c is None or c.key != key or not c.reply:
            raise SystemExit(f"wrong reply for entry {i}")
    out["get_ms"] = round((time.perf_counter() - t) / gets * 1e3, 3)
out["peak_mb"] = round(peak_mb(), 1)
if mode == "index":
    # The bulk path the engine and dedup take: each row group read once for all its keys.
    many = [hashlib.sha256(str(rng.randrange(n)).encode()).hexdigest() for _ in range(20 * gets)]
    t = time.perf_counter()
    found = cache.get_many(many)
    out["get_many_us_per_key"] = round((time.perf_counter() - t) / len(many) * 1e6, 1)
    if len(found) != len(set(many)):
        raise SystemExit("get_many missed stored keys")
print(json.dumps(out))
"""


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def build_cache(root: Path, n: int, shard_rows: int, seed: int = 0) -> float:
    """Write ``n`` entries as shards of ``shard_rows``; returns the size on disk in MB."""
    if (root / "done").exists():
        return _size_mb(root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    vocabulary = np.array(
        ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(3000)]
    )
    for start in range(0, n, shard_rows):
        rows = range(start, min(n, start + shard_rows))
        count = len(rows)
        embedding = rng.random(count) < 0.4
        replies = []
        for is_embedding in embedding.tolist():
            if is_embedding:
                replies.append(encode_embedding(rng.standard_normal(384).astype(np.float32)))
            else:
                replies.append(" ".join(vocabulary[rng.integers(0, len(vocabulary), 170)].tolist()))
        stage = np.where(embedding, "dedup_embedding", "qa_freeform").tolist()
        table = pa.table(
            {
                "key": [key(i) for i in rows],
                "stage": stage,
                "model": np.where(embedding, "all-MiniLM-L6-v2", "gpt-4o-mini").tolist(),
                "template_id": stage,
                "template_version": pa.array(np.ones(count, dtype=np.int32)),
                "reply": replies,
                "finish_reason": ["stop"] * count,
                "prompt_tokens": rng.integers(50, 1500, count),
                "completion_tokens": rng.integers(0, 400, count),
                "latency_s": rng.random(count),
                "error": pa.nulls(count, pa.string()),
                "error_kind": pa.nulls(count, pa.string()),
                "attempts": pa.array(np.ones(count, dtype=np.int32)),
                "timestamp": np.full(count, 1.7e9) + np.arange(start, start + count),
            },
            schema=CACHE_SCHEMA,
        )
        pq.write_table(table, root / "shards" / f"{start:020d}-bench.parquet", **shard_write_options())
    (root / "done").write_text(str(n))
    return _size_mb(root)


def _size_mb(root: Path) -> float:
    return round(sum(p.stat().st_size for p in (root / "shards").glob("*.parquet")) / 2**20, 1)


def measure(mode: str, root: Path, n: int, gets: int, old_path: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(root), str(n), str(gets), old_path],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    parser.add_argument("--dict-max", type=int, default=100_000, help="largest N measured the old way")
    parser.add_argument("--work", default="/tmp/viscon-bench-cache")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic caches for a rerun")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old_path = work / "old_cache.py"
    old_path.write_text(
        subprocess.run(
            ["git", "show", f"{OLD_CACHE_COMMIT}:viscon_hub/engine/cache.py"],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout
    )
    report: dict = {"gets": args.gets, "shard_rows": args.shard_rows, "row_group_rows": SHARD_ROW_GROUP_ROWS}
    bare = measure("bare", work, 1, 0, str(old_path))
    report["bare_peak_mb"] = bare["peak_mb"]
    tiny = work / "n1000"
    build_cache(tiny, 1000, args.shard_rows)
    floor = measure("index", tiny, 1000, min(args.gets, 200), str(old_path))
    report["floor_peak_mb"] = floor["peak_mb"]
    shutil.rmtree(tiny)
    for n in args.sizes:
        root = work / f"n{n}"
        t = time.perf_counter()
        disk_mb = build_cache(root, n, args.shard_rows)
        entry: dict = {"disk_mb": disk_mb, "build_s": round(time.perf_counter() - t, 1)}
        sides = ["index", "dict"] if n <= args.dict_max else ["index"]
        for mode in sides:
            m = measure(mode, root, n, args.gets, str(old_path))
            if m["entries"] != n:
                raise SystemExit(f"{mode} saw {m['entries']} entries of {n}")
            growth = m["peak_mb"] - bare["peak_mb"]
            entry[mode] = {
                "peak_mb": m["peak_mb"],
                "growth_mb": round(growth, 1),
                "growth_bytes_per_entry": round(growth * 2**20 / n, 1),
                "ratio_to_bare": round(m["peak_mb"] / bare["peak_mb"], 2),
                "over_floor_bytes_per_entry": round((m["peak_mb"] - floor["peak_mb"]) * 2**20 / n, 1),
                "open_s": m["open_s"],
                "get_ms": m["get_ms"],
                **({"get_many_us_per_key": m["get_many_us_per_key"]} if mode == "index" else {}),
            }
        if "dict" in entry:
            entry["index_over_dict_peak"] = round(entry["index"]["peak_mb"] / entry["dict"]["peak_mb"], 3)
        report[str(n)] = entry
        if not args.keep:
            shutil.rmtree(root)
    if len(args.sizes) > 1:
        small, large = sorted(args.sizes)[-2:]
        extra = report[str(large)]["index"]["peak_mb"] - report[str(small)]["index"]["peak_mb"]
        report["marginal_bytes_per_entry"] = round(extra * 2**20 / (large - small), 1)
    if not args.keep:
        os.remove(old_path)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
