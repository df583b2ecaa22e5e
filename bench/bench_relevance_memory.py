"""Peak memory of the merge's relevance lookups (``relevance.Scores``) against nested dicts and a bare process.

A synthetic ``relevance.parquet`` of N records (both context modes, a caption and eight Q&A rounds
each, as the scoring stage writes it) is written once per size. Each side runs in a fresh subprocess
and reports its peak RSS (``VmHWM``):

- bare: imports pyarrow, numpy and ``viscon_hub.generate.relevance``, reads nothing;
- scores: ``read_scores`` (compact arrays) and M random lookups, each checked;
- dict: the same rows read into ``{(mode, id): {(round, index): {"kl", "pmi"}}}``, as the merge kept
  them before, with the same lookups.

Figures per N: peak MB, ``ratio`` = peak / bare peak, bytes per round above bare. Printed as JSON.

    python bench/bench_relevance_memory.py [--sizes 100000 1000000] [--lookups 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROUNDS = [("caption", 0)] + [("freeform", i) for i in range(4)] + [("multiple_choice", i) for i in range(4)]

CHILD = r"""
import json, random, sys
import numpy, pyarrow, pyarrow.parquet as pq
from viscon_hub.generate import relevance

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

mode, generations, n, lookups = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "scores":
    scores = relevance.read_scores(generations)
elif mode == "dict":
    scores = {}
    path = f"{generations}/generations/{relevance.RELEVANCE_FILE}"
    for b in pq.ParquetFile(path).iter_batches():
        for r in b.to_pylist():
            scores.setdefault((r["context_mode"], r["id"]), {})[(r["round"], r["index"])] = {
                "kl": r["kl"], "pmi": r["pmi"]}
if mode != "bare":
    rng = random.Random(0)
    for _ in range(lookups):
        i = rng.randrange(n)
        got = scores.get(("contextual", f"doc-{i}"), {})
        assert got[("caption", 0)]["kl"] == i % 1000 / 1000, (i, got)
print(json.dumps({"mode": mode, "peak_mb": round(peak_mb(), 1)}))
"""


def write_relevance(root: Path, n: int) -> None:
    out = root / "generations"
    out.mkdir(parents=True, exist_ok=True)
    from viscon_hub.generate.relevance import RELEVANCE_FILE, SCHEMA

    with pq.ParquetWriter(out / RELEVANCE_FILE, SCHEMA) as w:
        for start in range(0, n, 20_000):
            rows = [
                {
                    "id": f"doc-{i}",
                    "context_mode": mode,
                    "round": kind,
                    "index": index,
                    "kl": i % 1000 / 1000,
                    "pmi": -1.0,
                    "key": f"{i:064x}",
                }
                for mode in ("contextual", "non_contextual")
                for i in range(start, min(n, start + 20_000))
                for kind, index in ROUNDS
            ]
            w.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))


def measure(mode: str, root: Path, n: int, lookups: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(root), str(n), str(lookups)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--dict-max", type=int, default=100_000, help="largest N also measured with dicts")
    args = parser.parse_args()
    random.seed(0)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        bare = measure("bare", Path(tmp), 1, 0)["peak_mb"]
        result["bare_peak_mb"] = bare
        for n in args.sizes:
            root = Path(tmp) / str(n)
            write_relevance(root, n)
            rounds = 2 * n * len(ROUNDS)
            sides = ["scores"] + (["dict"] if n <= args.dict_max else [])
            for side in sides:
                peak = measure(side, root, n, args.lookups)["peak_mb"]
                result[f"{side}_{n}"] = {
                    "rounds": rounds,
                    "peak_mb": peak,
                    "ratio": round(peak / bare, 2),
                    "bytes_per_round_over_bare": round((peak - bare) * 2**20 / rounds, 1),
                }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
