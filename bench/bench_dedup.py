"""Benchmark the question-dedup selection against a bare baseline measured in the same run.

Both sides get the same seeded, L2-normalised random vectors (by default 20,000 images x 8 questions,
4 free-form + 4 multiple-choice, 384 dimensions, with about half the multiple-choice questions
planted as paraphrases of a free-form one) and must return the same kept questions per image.

- ours: ``viscon_hub.build.dedup.select_per_image``, the path ``dedup_questions`` takes once embeddings are
  decoded.
- bare: per image, a plain numpy matrix product and the same greedy rule written inline the simplest
  way (sort by mean similarity, keep under the threshold, top each type up to its minimum).

Rates are images per second; ``ratio`` is ours / bare. Target: ratio >= 0.5 (within 2x of bare).

    python bench/bench_dedup.py [--images 20000] [--questions 8] [--dim 384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def make_embeddings(images: int, nf: int, nm: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((images, nf + nm, dim), dtype=np.float32)
    # Paraphrases: multiple-choice question j repeats free-form question j plus a little noise.
    planted = rng.random((images, min(nf, nm))) < 0.5
    for j in range(min(nf, nm)):
        rows = planted[:, j]
        x[rows, nf + j] = x[rows, j] + 0.2 * rng.standard_normal((int(rows.sum()), dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    return x.reshape(images * (nf + nm), dim)


def bare(e: np.ndarray, images: int, nf: int, nm: int, threshold: float, min_ff: int, min_mc: int) -> list:
    n = nf + nm
    out = []
    for i in range(images):
        x = e[i * n : (i + 1) * n]
        s = x @ x.T
        score = np.round((s.sum(axis=1) - s.diagonal()) / (n - 1), 6)
        order = np.argsort(score, kind="stable")
        kept = []
        for q in order:
            if all(s[q, k] < threshold for k in kept):
                kept.append(q)
        for lo, hi, minimum in ((0, nf, min_ff), (nf, n, min_mc)):
            have = sum(lo <= k < hi for k in kept)
            for q in order:
                if have >= minimum:
                    break
                if lo <= q < hi and q not in kept:
                    kept.append(q)
                    have += 1
        kept.sort()
        out.append(([int(k) for k in kept if k < nf], [int(k) - nf for k in kept if k >= nf]))
    return out


def main() -> None:
    from viscon_hub.build.dedup import DedupConfig, select_per_image

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--questions", type=int, default=8, help="per image, half of each type")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = DedupConfig()
    nf = args.questions // 2
    nm = args.questions - nf
    e = make_embeddings(args.images, nf, nm, args.dim)
    counts = [(nf, nm)] * args.images
    knobs = {
        "threshold": config.threshold,
        "min_freeform": config.min_freeform,
        "min_multiple_choice": config.min_multiple_choice,
    }

    def run_ours() -> tuple[float, list]:
        t = time.perf_counter()
        keep = select_per_image(e, counts, **knobs)
        return time.perf_counter() - t, keep

    def run_bare() -> tuple[float, list]:
        t = time.perf_counter()
        keep = bare(e, args.images, nf, nm, config.threshold, config.min_freeform, config.min_multiple_choice)
        return time.perf_counter() - t, keep

    _, ours_keep = run_ours()  # warm up both, and check they agree
    _, bare_keep = run_bare()
    mismatches = sum(a != b for a, b in zip(ours_keep, bare_keep))
    kept = sum(len(f) + len(m) for f, m in ours_keep)
    ours_s, bare_s = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        bare_s.append(run_bare()[0])
        ours_s.append(run_ours()[0])
    ours_rate = args.images / min(ours_s)
    bare_rate = args.images / min(bare_s)
    print(
        json.dumps(
            {
                "images": args.images,
                "questions_per_image": args.questions,
                "dim": args.dim,
                "threshold": config.threshold,
                "questions_removed": args.images * args.questions - kept,
                "mismatched_images": mismatches,
                "bare_images_per_s": round(bare_rate),
                "viscon_images_per_s": round(ours_rate),
                "ratio": round(ours_rate / bare_rate, 3),
                "target_ratio": 0.5,
            }
        )
    )


if __name__ == "__main__":
    main()
