"""Benchmark generate's memory: peak RSS at two numbers of image contexts, streamed and all at once.

Synthetic image contexts (page text of about 7 KB each, every context distinct, 256 tiny images
shared among them) go through ``generate`` (contextual captions, then both kinds of Q&A) offline
from a pre-filled cache. The cache is filled with exactly what the local zero-latency test server
(``tests/servers/openai_server.py``) would answer, computed by its own reply function from the
request body the ``openai`` backend would send: that takes seconds, where 150,000 calls over HTTP
on a small machine take many minutes. Each measurement is a fresh child process that reports its
RSS after its imports (the bare baseline) and its peak RSS (``VmHWM``) at the end:

- ``stream``: ``generate`` with the default ``chunk_size``;
- ``whole``: ``chunk_size`` = every context, which holds every context and record at once, as
  generate did before it streamed;
- ``cache_only``: the filled cache opened and nothing else. The cache keeps every reply in memory,
  so it grows with the number of contexts whatever generate does; it is reported apart, and
  ``growth_beyond_cache_mb`` is each run's growth less the cache's.

``largest_over`` divides the largest size's figures by each smaller size's. Target: ``stream``'s
growth beyond the cache levels off once a run holds more contexts than a chunk plus a records row
group (4,096 + 10,000: the writer keeps up to that many records, each with its page text, to cut
the file's row groups where one write would), so its ratio against the middle size is near 1,
where ``whole``'s grows with the contexts. About four minutes on two cores.

    python bench/bench_generate_memory.py [--sizes 5000,20000,50000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the a of and to in is on with red blue small large cat dog tree river stone bread cup table left "
    "right three four two one old new bright dark near far under over city market garden bridge museum "
    "recipe flour oven minutes festival music crowd evening harbour boat sail wind island map route"
).split()
IMAGES = 256
CONTEXT_ROW_GROUP = 1_000


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def make(n: int, root: Path, store: Path) -> None:
    """``root/contexts/part-00000-of-00001.parquet`` with ``n`` contexts whose images are in ``store``."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from viscon_hub.records import IMAGE_CONTEXT_SCHEMA

    rng = random.Random(0)
    shas = []
    for i in range(IMAGES):
        blob = b"\xff\xd8\xff\xe0" + i.to_bytes(4, "big") + bytes(rng.randrange(256) for _ in range(120))
        sha = hashlib.sha256(blob).hexdigest()
        path = store / "blobs" / sha[:2] / sha
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        shas.append(sha)
    # Pages are drawn from a pool of paragraphs (drawing 50M words one by one is the slow part) and
    # made distinct by their first line, so every caption request is its own.
    pool = []
    for _ in range(512):
        words, size = [], 0
        target = rng.randrange(6_000, 8_000)
        while size < target:
            w = rng.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        pool.append(" ".join(words))
    (root / "contexts").mkdir(parents=True)
    with pq.ParquetWriter(
        root / "contexts" / "part-00000-of-00001.parquet", IMAGE_CONTEXT_SCHEMA, compression="zstd"
    ) as writer:
        for start in range(0, n, CONTEXT_ROW_GROUP):
            rows = []
            for i in range(start, min(n, start + CONTEXT_ROW_GROUP)):
                text = f"Page {i}, image {i % 2}.\n{pool[(i * 7) % len(pool)]}"
                rows.append(
                    {
                        "id": f"doc{i // 2}-{i % 2}",
                        "document_id": f"doc{i // 2}",
                        "image_index": i % 2,
                        "page_url": f"https://example.org/page/{i // 2}",
                        "image_url": f"https://example.org/img/{i}.jpg",
                        "alt_text": "a picture",
                        "context": text,
                        "context_tokens": len(text) // 4,
                        "image_sha256": shas[i % IMAGES],
                        "width": 64,
                        "height": 48,
                        "image_format": "jpeg",
                        "source": "bench",
                        "row": i // 2,
                        "provenance": "{}",
                    }
                )
            writer.write_table(pa.Table.from_pylist(rows, schema=IMAGE_CONTEXT_SCHEMA))


def _config(root: Path, store: Path, **kw):
    from viscon_hub.engine import EngineConfig
    from viscon_hub.generate.stages import GenerateConfig

    return GenerateConfig(
        contexts=str(root),
        output=str(root / "gen"),
        cache=str(root / "cache"),
        image_store=str(store),
        caption_model="openai:viscon-test-vlm",
        qa_model="openai:viscon-test-llm",
        engine=EngineConfig(offline=True),
        **kw,
    )


def fill(root: Path, store: Path) -> dict:
    """Store in ``root/cache`` what the test server answers to every request a run of ``root`` makes."""
    from tests.servers.openai_server import _parse_request, fingerprint, make_reply
    from viscon_hub.engine import Completion
    from viscon_hub.engine.backends.openai_backend import chat_body
    from viscon_hub.generate.stages import Generator, caption_messages, iter_contexts

    generator = Generator(config=_config(root, store), image_store=str(store))
    caption = generator.caption_stages["contextual"]

    def answer(request) -> Completion:
        body = chat_body(request.model, request, generator.store.get)
        reply = make_reply(fingerprint(body), _parse_request(body))
        return Completion(
            key=request.key,
            reply=reply.content,
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=len(reply.content) // 4 + 1,
            model=request.model,
            stage=request.stage,
            template_id=request.template_id,
            template_version=request.template_version,
            timestamp=time.time(),
        )

    stored = 0
    try:
        for batch in iter_contexts(str(root), batch_size=2_000):
            completions = []
            for ctx in batch:
                c = answer(caption.request(caption_messages(caption.template, ctx, "contextual")))
                completions.append(c)
                for stage in (generator.ff_stage, generator.mc_stage):
                    completions.append(answer(stage.request(stage.template.render(caption=c.reply.strip()))))
            generator.cache.put_many(completions)
            stored += len(completions)
    finally:
        generator.close()
    return {"stored": stored}


def measure(kind: str, root: Path, store: Path, n: int) -> dict:
    """One measurement in this (fresh) process; see the module docstring for ``kind``."""
    from viscon_hub.engine import GenerationCache
    from viscon_hub.generate.stages import generate

    baseline = _rss_mb("VmRSS")
    started = time.perf_counter()
    out: dict = {}
    if kind == "cache_only":
        cache = GenerationCache(root / "cache", read_only=True)
        out["entries"] = len(cache)
    else:
        config = _config(root, store, **({"chunk_size": n} if kind == "whole" else {}))
        stats = generate(config)
        out.update(records=stats.records, records_ok=stats.records_ok, cache_hits=stats.engine["cache_hits"])
        out["chunk_size"] = config.chunk_size
    peak = _rss_mb("VmHWM")
    out.update(
        baseline_rss_mb=round(baseline, 1),
        peak_rss_mb=round(peak, 1),
        peak_over_baseline=round(peak / baseline, 3),
        growth_mb=round(peak - baseline, 1),
        elapsed_s=round(time.perf_counter() - started, 2),
    )
    return out


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


KINDS = ("stream", "whole", "cache_only")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="5000,20000,50000")
    parser.add_argument("--keep", default=None, help="work in DIR and leave it (default: a temporary folder)")
    parser.add_argument("--child", choices=("make", "fill", *KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("make", "fill"):
        t = time.perf_counter()
        out = {}
        if args.child == "make":
            make(args.n, Path(args.root), Path(args.store))
        else:
            out = fill(Path(args.root), Path(args.store))
        print(json.dumps({**out, "elapsed_s": round(time.perf_counter() - t, 2)}))
        return
    if args.child:
        print(json.dumps(measure(args.child, Path(args.root), Path(args.store), args.n)))
        return

    sizes = sorted(int(s) for s in args.sizes.split(","))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="viscon-bench-gen-"))
    base.mkdir(parents=True, exist_ok=True)
    store = base / "images"
    result: dict = {"sizes": sizes, "runs": {}}
    try:
        for n in sizes:
            root = base / str(n)
            shutil.rmtree(root, ignore_errors=True)
            common = ("--root", str(root), "--store", str(store), "--n", str(n))
            run: dict = {"make_s": child("--child", "make", *common)["elapsed_s"]}
            run["fill_s"] = child("--child", "fill", *common)["elapsed_s"]
            for kind in KINDS:
                run[kind] = child("--child", kind, *common)
            result["runs"][str(n)] = run
            print(json.dumps({str(n): run}), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    runs = result["runs"]
    hi = str(sizes[-1])
    result["peak_over_baseline"] = {
        kind: {str(n): runs[str(n)][kind]["peak_over_baseline"] for n in sizes} for kind in KINDS
    }
    beyond = {
        kind: {
            str(n): round(runs[str(n)][kind]["growth_mb"] - runs[str(n)]["cache_only"]["growth_mb"], 1)
            for n in sizes
        }
        for kind in ("stream", "whole")
    }
    result["growth_beyond_cache_mb"] = beyond
    # Largest size over each smaller one: near 1 where memory does not grow with the contexts.
    result["largest_over"] = {
        str(n): {
            **{
                f"{kind}_peak_over_baseline": round(
                    runs[hi][kind]["peak_over_baseline"] / runs[str(n)][kind]["peak_over_baseline"], 3
                )
                for kind in KINDS
            },
            **{
                f"{kind}_growth_beyond_cache": round(beyond[kind][hi] / max(beyond[kind][str(n)], 1.0), 3)
                for kind in ("stream", "whole")
            },
        }
        for n in sizes[:-1]
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
