"""What the images cost: dataset bytes / image bytes of the bundled sample, per config and in all.

Builds the bundled sample once (offline, bundled cache), then merges its records again with the
choices that matter: every config with pyarrow's content-defined chunking (the default), every config
without it, and the configs a real run writes by default (``contextual,leaky``). For each it prints
the bytes of every config, the total over the image bytes (each distinct image of an ok record
counted once), and an estimate of what the Hub keeps after Xet deduplication: the files are cut into
chunks by a gear rolling hash of Xet's sizes (8-128 KiB, 64 KiB on average) and each distinct chunk
is counted once. That estimate is this script's chunker, not Xet's own.

    python bench/bench_image_bytes.py
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from viscon_hub.build import writer as writer_module  # noqa: E402
from viscon_hub.build.driver import BuildConfig, build, write_dataset  # noqa: E402
from viscon_hub.build.layout import ALL_CONFIGS, DEFAULT_RUN_CONFIGS  # noqa: E402
from viscon_hub.build.merge import MergeConfig  # noqa: E402
from viscon_hub.generate.stages import GenerateConfig  # noqa: E402

MIN_CHUNK, MAX_CHUNK = 8 * 1024, 128 * 1024
MASK = 0xFFFF << 48  # 16 bits: one boundary per 64 KiB on average
_rng = random.Random(0)
GEAR = [_rng.getrandbits(64) for _ in range(256)]


def chunks(data: bytes):
    """Content-defined chunks of ``data`` (a gear hash, as Xet's chunker works)."""
    start, n = 0, len(data)
    while start < n:
        end = min(n, start + MAX_CHUNK)
        h = 0
        i = start + MIN_CHUNK
        cut = end
        while i < end:
            h = ((h << 1) + GEAR[data[i]]) & 0xFFFFFFFFFFFFFFFF
            if not h & MASK:
                cut = i + 1
                break
            i += 1
        yield data[start:cut]
        start = cut


def unique_chunk_bytes(files: list[Path]) -> int:
    seen: set[bytes] = set()
    total = 0
    for f in files:
        for c in chunks(f.read_bytes()):
            key = hashlib.sha256(c).digest()
            if key not in seen:
                seen.add(key)
                total += len(c)
    return total


def measure(out: Path, image_bytes: int) -> dict:
    per_config = {
        c: sum(p.stat().st_size for p in (out / c).glob("*.parquet"))
        for c in ALL_CONFIGS
        if (out / c).is_dir()
    }
    total = sum(per_config.values())
    files = sorted(p for c in per_config for p in (out / c).glob("*.parquet"))
    hub = unique_chunk_bytes(files)
    return {
        "bytes_per_config": per_config,
        "dataset_bytes": total,
        "dataset_over_image_bytes": round(total / image_bytes, 2),
        "xet_estimate_bytes": hub,
        "xet_estimate_over_image_bytes": round(hub / image_bytes, 2),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = BuildConfig(
            output=str(root / "viscon"),
            work_dir=str(root / "work"),
            generate=GenerateConfig(cache=str(root / "cache")),
        )
        build(cfg)
        import pyarrow.parquet as pq

        from viscon_hub.prepare.images import ImageStore

        store = ImageStore(root / "work" / "contexts" / "images")
        records = pq.read_table(root / "work" / "generations" / "generations" / "records.parquet").to_pylist()
        shas = {r["image_sha256"] for r in records if r["status"] == "ok" and r["image_sha256"]}
        image_bytes = sum(len(store.get(s)) for s in shas)
        result: dict = {"images": len(shas), "image_bytes": image_bytes}

        def again(name: str, configs, cdc: bool) -> None:
            writer_module.CONTENT_DEFINED_CHUNKING = cdc
            out = root / name
            write_dataset(
                generations=str(root / "work" / "generations"),
                output=str(out),
                merge=MergeConfig(configs=configs),
                cache=cfg.generate.cache,
                extra_caches=cfg.generate.extra_caches,
            )
            result[name] = measure(out, image_bytes)

        again("all_configs_cdc", ALL_CONFIGS, True)
        again("all_configs_no_cdc", ALL_CONFIGS, False)
        again("default_run_configs", DEFAULT_RUN_CONFIGS, True)
        writer_module.CONTENT_DEFINED_CHUNKING = True
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
