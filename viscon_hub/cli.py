"""The ``viscon`` command line. Each command is a thin shell over the library function of the same name."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import VisconError

logger = logging.getLogger("viscon_hub")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viscon",
        description="Turn web documents (OBELICS) into contextual visual instruction data.",
    )
    parser.add_argument("--version", action="version", version=f"viscon-hub {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="documents in, image contexts out (validate, token filter, contexts, images)",
        description="Read OBELICS-shaped documents, drop malformed ones with a counted reason, keep those "
        "within --max-tokens, write one image context per image as Parquet under --output, plus stats.json.",
    )
    p.add_argument(
        "--source",
        default=None,
        help="OBELICS-shaped Parquet/JSONL file, folder, glob or fsspec URL, or a Hub dataset id "
        "(e.g. HuggingFaceM4/OBELICS; prefix hub: to force); default: the bundled sample",
    )
    p.add_argument("--output", default=None, help="output folder or fsspec URL (default: viscon-contexts)")
    p.add_argument("--recipe", default=None, help="YAML recipe with prepare options (flags override it)")
    p.add_argument("--limit", type=_non_negative_int, default=None, help="read at most N rows (per shard)")
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        help="keep documents of at most N text tokens (default 2000)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json, a folder with one, or a model id available "
        "offline (default: the bundled LLaMA/Vicuna vocabulary)",
    )
    p.add_argument("--num-shards", type=_positive_int, default=None, help="split the corpus into N shards")
    p.add_argument(
        "--shard-index", type=_non_negative_int, default=None, help="which shard this job runs (0-based)"
    )
    p.add_argument(
        "--max-images-per-document",
        type=_positive_int,
        default=None,
        help="keep at most the first N images of each document",
    )
    p.add_argument(
        "--image-store", default=None, help="content-addressed image store (default: OUTPUT/images)"
    )
    p.add_argument("--no-images", action="store_true", help="do not acquire images (contexts only)")
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="allow image URLs on private, loopback and link-local addresses (off by default)",
    )
    p.add_argument(
        "--concurrency", type=_positive_int, default=None, help="image downloads in flight (default 32)"
    )
    p.add_argument("--timeout", type=_positive_float, default=None, help="seconds per image download attempt")
    p.add_argument("--split", default=None, help="split of a Hub dataset (default train)")
    p.add_argument("--dataset-config", default=None, help="config of a Hub dataset")
    p.add_argument("--revision", default=None, help="revision of a Hub dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=_cmd_prepare)

    g = sub.add_parser(
        "generate",
        help="captions, then free-form and multiple-choice Q&A, through the cached engine",
        description="Caption every image context (with or without its web context), then turn captions into "
        "free-form and multiple-choice Q&A. Every model call goes through the content-addressed cache: a rerun "
        "makes no call whose reply is stored.",
    )
    g.add_argument("--contexts", required=True, help="the output folder of `viscon prepare`")
    g.add_argument("--output", required=True, help="folder for generations/records.parquet and stats.json")
    g.add_argument(
        "--cache", default="viscon-cache", help="cache folder or fsspec URL (default viscon-cache)"
    )
    g.add_argument(
        "--extra-cache",
        action="append",
        default=[],
        metavar="URL",
        help="read-only cache consulted after --cache (repeatable), e.g. a pulled or bundled cache",
    )
    g.add_argument("--caption-model", default="openai:gpt-4o", help="BACKEND:MODEL for captions")
    g.add_argument("--qa-model", default="openai:gpt-4o", help="BACKEND:MODEL for Q&A")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    g.add_argument("--context", default="contextual", choices=["contextual", "non_contextual", "both"])
    g.add_argument(
        "--max-concurrency", type=_positive_int, default=64, help="requests in flight (default 64)"
    )
    g.add_argument("--rpm", type=_positive_float, default=None, help="requests per minute limit")
    g.add_argument("--tpm", type=_positive_float, default=None, help="tokens per minute limit")
    g.add_argument("--max-attempts", type=_positive_int, default=5, help="attempts per request (default 5)")
    g.add_argument(
        "--reasks",
        type=_non_negative_int,
        default=2,
        help="re-ask with a new seed when a Q&A reply does not parse (default 2)",
    )
    g.add_argument("--image-store", default=None, help="image store (default: the one prepare used)")
    g.add_argument("--limit", type=_non_negative_int, default=None, help="use at most N image contexts")
    g.add_argument("--offline", action="store_true", help="use only the cache; report misses, call nothing")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="count requests, cache hits, estimated tokens and cost; call nothing, write nothing",
    )
    g.add_argument("--no-progress", action="store_true", help="no live progress line even on a terminal")
    g.set_defaults(func=_cmd_generate)
    return parser


def _cache_alias(url: str) -> str:
    """``bundled`` names the handwritten cache shipped for the bundled sample."""
    if url == "bundled":
        from .generate.handwritten import BUNDLED_CACHE

        return str(BUNDLED_CACHE)
    return url


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from .engine import EngineConfig
    from .generate.stages import GenerateConfig, generate

    config = GenerateConfig(
        contexts=args.contexts,
        output=args.output,
        cache=args.cache,
        extra_caches=tuple(_cache_alias(c) for c in args.extra_cache),
        caption_model=args.caption_model,
        qa_model=args.qa_model,
        base_url=args.base_url,
        context=args.context,
        image_store=args.image_store,
        reasks=args.reasks,
        limit=args.limit,
        dry_run=args.dry_run,
        engine=EngineConfig(
            max_concurrency=args.max_concurrency,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            max_attempts=args.max_attempts,
            offline=args.offline,
        ),
    )
    live = not args.no_progress and sys.stderr.isatty()
    started = time.monotonic()

    def progress(stage, report) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        done = report.succeeded + report.permanent_errors + report.transient_errors
        sys.stderr.write(
            f"\r{stage}: {done}/{report.unique - report.cache_hits} calls, {done / elapsed:.1f} req/s, "
            f"{report.prompt_tokens + report.completion_tokens} tokens, ${report.cost_usd:.4f}   "
        )
        sys.stderr.flush()

    stats = generate(config, progress=progress if live else None)
    if live:
        sys.stderr.write("\n")
    summary = stats.to_dict()
    if args.dry_run:
        print(json.dumps(summary["plan"], indent=2))
        return 0
    engine = summary["engine"]
    print(
        json.dumps(
            {
                "records": summary["records"],
                "records_ok": summary["records_ok"],
                "dropped": summary["dropped"],
                "calls": engine["calls"],
                "cache_hits": engine["cache_hits"],
                "offline_misses": engine["offline_misses"],
                "tokens": engine["prompt_tokens"] + engine["completion_tokens"],
                "cost_usd": engine["cost_usd"],
            }
        )
    )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .prepare import PrepareConfig, prepare

    overrides = {
        "source": args.source,
        "output": args.output,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "tokenizer": args.tokenizer,
        "num_shards": args.num_shards,
        "shard_index": args.shard_index,
        "max_images_per_document": args.max_images_per_document,
        "image_store": args.image_store,
        "split": args.split,
        "dataset_config": args.dataset_config,
        "revision": args.revision,
    }
    if args.no_images:
        overrides["fetch_images"] = False
    if args.recipe:
        config = PrepareConfig.from_recipe(args.recipe, **overrides)
    else:
        config = PrepareConfig(**{k: v for k, v in overrides.items() if v is not None})
    fetch_overrides = {}
    if args.allow_private_urls:
        fetch_overrides["allow_private"] = True
    if args.concurrency is not None:
        fetch_overrides["concurrency"] = args.concurrency
    if args.timeout is not None:
        fetch_overrides["timeout_s"] = args.timeout
    if fetch_overrides:
        config = replace(config, fetch=replace(config.fetch, **fetch_overrides))

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.limit, unit="doc", desc="prepare", file=sys.stderr)
    try:
        stats = prepare(config, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = stats.to_dict()
    print(json.dumps({k: summary[k] for k in ("documents_read", "documents_kept", "images_kept", "dropped")}))
    print(f"wrote {config.output}/contexts and {config.output}/stats.json", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except VisconError as e:
        print(f"viscon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
