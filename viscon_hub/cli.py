"""The ``viscon`` command line. Each command is a thin shell over the library function of the same name."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from viscon_hub import __version__
from viscon_hub.errors import VisconError

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


def _add_generation_flags(g: argparse.ArgumentParser, *, quickstart_defaults: bool) -> None:
    """Flags shared by ``generate`` and ``build``: cache, models, endpoint, engine limits."""
    model_default = None if quickstart_defaults else "openai:gpt-4o"
    model_help = (
        " (default: openai:gpt-4o; the bundled handwritten example with no --source)"
        if quickstart_defaults
        else " (default openai:gpt-4o)"
    )
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
    g.add_argument("--caption-model", default=model_default, help="BACKEND:MODEL for captions" + model_help)
    g.add_argument("--qa-model", default=model_default, help="BACKEND:MODEL for Q&A" + model_help)
    g.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    g.add_argument(
        "--max-concurrency", type=_positive_int, default=64, help="requests in flight (default 64)"
    )
    g.add_argument("--rpm", type=_positive_float, default=None, help="requests per minute limit")
    g.add_argument("--tpm", type=_positive_float, default=None, help="tokens per minute limit")
    g.add_argument("--max-attempts", type=_positive_int, default=5, help="attempts per request (default 5)")
    g.add_argument(
        "--max-cost",
        type=_positive_float,
        default=None,
        metavar="USD",
        help="stop calling models before the estimated spend of this run passes USD (stored replies stay)",
    )
    g.add_argument(
        "--max-error-rate",
        type=float,
        default=0.5,
        help="stop when more than this share of recent calls fail, and fail the run when this share of all "
        "calls did (default 0.5; 1 never stops)",
    )
    g.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds one model call may take before it is retried (default 120)",
    )
    g.add_argument(
        "--reasks",
        type=_non_negative_int,
        default=2,
        help="re-ask with a new seed when a Q&A reply does not parse (default 2)",
    )


def _engine_config(args: argparse.Namespace, *, offline: bool):
    from viscon_hub.engine import EngineConfig

    return EngineConfig(
        max_concurrency=args.max_concurrency,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_attempts=args.max_attempts,
        offline=offline,
        max_cost_usd=args.max_cost,
        max_error_rate=args.max_error_rate,
        request_timeout_s=args.request_timeout,
    )


def _add_runner_flags(p: argparse.ArgumentParser) -> None:
    """``--runner`` and its Ray options, shared by ``prepare``, ``generate`` and ``build``."""
    p.add_argument(
        "--runner",
        default="local",
        choices=["local", "ray"],
        help="local: this process; ray: blocks over a Ray cluster through ray.data (pip install 'viscon-hub[ray]')",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: start a local one; 'auto': $RAY_ADDRESS)",
    )
    p.add_argument(
        "--ray-workers",
        type=_positive_int,
        default=None,
        help="concurrent Ray workers, each with its own engine (default: the cluster's CPUs)",
    )


def _runner_options(args: argparse.Namespace):
    from viscon_hub.runners import RunnerOptions

    return RunnerOptions(kind=args.runner, ray_address=args.ray_address, ray_workers=args.ray_workers)


def _shard_flags(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """Explicit flags, else a Slurm job array's task, else nothing (the config's default)."""
    import os

    from viscon_hub.runners.slurm import resolve_shard

    if args.num_shards is None and args.shard_index is None and not os.environ.get("SLURM_ARRAY_TASK_ID"):
        return None, None
    return resolve_shard(args.num_shards, args.shard_index)


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
    p.add_argument(
        "--num-shards",
        type=_positive_int,
        default=None,
        help="split the corpus into N shards (default $SLURM_ARRAY_TASK_COUNT in a job array)",
    )
    p.add_argument(
        "--shard-index",
        type=_non_negative_int,
        default=None,
        help="which shard this job runs, 0-based (default from $SLURM_ARRAY_TASK_ID in a job array)",
    )
    _add_runner_flags(p)
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
        "--image-root",
        action="append",
        default=None,
        metavar="DIR",
        help="also read local images under DIR (repeatable); by default only under each source file's folder",
    )
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
    _add_filter_flags(p)
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
    _add_generation_flags(g, quickstart_defaults=False)
    g.add_argument("--context", default="contextual", choices=["contextual", "non_contextual", "both"])
    g.add_argument("--image-store", default=None, help="image store (default: the one prepare used)")
    g.add_argument("--limit", type=_non_negative_int, default=None, help="use at most N image contexts")
    g.add_argument(
        "--num-shards",
        type=_positive_int,
        default=None,
        help="split the contexts into N contiguous shards (default $SLURM_ARRAY_TASK_COUNT in a job array)",
    )
    g.add_argument(
        "--shard-index",
        type=_non_negative_int,
        default=None,
        help="which shard this job runs, 0-based (default from $SLURM_ARRAY_TASK_ID in a job array)",
    )
    _add_runner_flags(g)
    g.add_argument("--offline", action="store_true", help="use only the cache; report misses, call nothing")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="count requests, cache hits, estimated tokens and cost; call nothing, write nothing",
    )
    g.add_argument("--no-progress", action="store_true", help="no live progress line even on a terminal")
    g.add_argument(
        "--batch-max-requests",
        type=_positive_int,
        default=50_000,
        help="openai-batch: requests per batch file (default 50000, the provider's cap)",
    )
    g.add_argument(
        "--batch-max-bytes",
        type=_int_at_least(1024),
        default=200 * 1024 * 1024,
        help="openai-batch: bytes per batch file, images included (default 200 MB, the provider's cap)",
    )
    g.add_argument(
        "--batch-poll-interval",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="openai-batch: seconds between polls of a running batch (default 60)",
    )
    g.add_argument(
        "--batch-file-only",
        action="store_true",
        help="openai-batch: write the batch JSONL files under CACHE/batches/ and stop (e.g. for vllm run-batch)",
    )
    g.add_argument(
        "--batch-results",
        action="append",
        default=[],
        metavar="FILE",
        help="store the replies of a batch results file (OpenAI or vllm run-batch output) first (repeatable)",
    )
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser(
        "build",
        help="prepare, generate, dedup and merge into a dataset folder every config loads from",
        description="Run the whole pipeline and write a local dataset folder: Parquet per config and split, "
        "and a README whose configs load with `load_dataset(FOLDER, CONFIG)`. With no flags it builds the "
        "bundled sample from the bundled handwritten cache, offline.",
    )
    b.add_argument("--source", default=None, help="documents to build from (default: the bundled sample)")
    b.add_argument("--revision", default=None, help="revision of a Hub source dataset")
    b.add_argument("--output", default="viscon", help="dataset folder (default ./viscon)")
    b.add_argument("--work-dir", default=None, help="intermediate outputs (default OUTPUT-work)")
    b.add_argument(
        "--configs",
        default=None,
        help="comma-separated config names, or all (default: all for the bundled sample, contextual,leaky "
        "with --source; each config carries its images' bytes, so each one more costs about the images again)",
    )
    _add_generation_flags(b, quickstart_defaults=True)
    b.add_argument(
        "--offline",
        action="store_true",
        default=None,
        help="use only the cache for generations (the default with no --source and no models)",
    )
    b.add_argument("--online", dest="offline", action="store_false", help="allow model calls")
    b.add_argument(
        "--test-fraction", type=float, default=None, help="share of pages in the test split (default 0.02)"
    )
    b.add_argument(
        "--dedup-threshold",
        type=float,
        default=None,
        help="cosine similarity above which a question counts as a near-duplicate",
    )
    b.add_argument("--dedup-model", default=None, help="sentence-transformers model for the question dedup")
    b.add_argument(
        "--mc-longest-ratio",
        type=float,
        default=None,
        help="flag a multiple-choice item whose right option is this many times longer than every other "
        "(default 1.5)",
    )
    b.add_argument(
        "--drop-length-tells", action="store_true", help="leave flagged multiple-choice items out (counted)"
    )
    b.add_argument(
        "--no-option-shuffle", action="store_true", help="keep multiple-choice options in generated order"
    )
    b.add_argument(
        "--relevance-model",
        default=None,
        help="score every round's C3L relevance with this VLM: transformers:PATH, or openai:MODEL on a "
        "vLLM server (--base-url; it must answer prompt_logprobs)",
    )
    b.add_argument(
        "--min-relevance", type=float, default=None, help="drop Q&A rounds whose relevance is below this"
    )
    b.add_argument(
        "--relevance-on",
        choices=["kl", "pmi"],
        default="kl",
        help="the score --min-relevance reads (default kl)",
    )
    b.add_argument("--limit", type=_non_negative_int, default=None, help="read at most N documents")
    b.add_argument(
        "--max-shard-size",
        default="500MB",
        help="largest Parquet file per config and split, e.g. 500MB or 200KB (default 500MB, as push_to_hub)",
    )
    _add_runner_flags(b)
    b.add_argument("--no-progress", action="store_true", help="no stage lines even on a terminal")
    _add_filter_flags(b)
    b.set_defaults(func=_cmd_build)

    e = sub.add_parser(
        "export",
        help="write a built config in a trainer's format (llava, idefics, messages, llamafactory)",
        description="Convert one config of a built dataset folder into the format a training codebase reads.",
    )
    e.add_argument("--dataset", required=True, help="a folder written by `viscon build`")
    e.add_argument("--config", default="leaky", help="config to export (default leaky)")
    e.add_argument(
        "--format",
        required=True,
        choices=["llava", "idefics", "messages", "llamafactory", "captioner"],
        help="captioner: caption-prompt -> caption rows of a per-image config (--config contextual), for SFT",
    )
    e.add_argument("--output", required=True, help="folder to write the export into")
    e.add_argument("--split", default=None, help="one split only (default: every split)")
    e.set_defaults(func=_cmd_export)

    c = sub.add_parser(
        "card",
        help="statistics, plots and the dataset card of a built folder",
        description="Compute the statistics of a built dataset (context tokens, caption/context overlap, Q&A "
        "counts, lengths, word cloud, image sizes, dedup, drops, cost), write plots/ and README.md.",
    )
    c.add_argument("--dataset", default="viscon", help="a folder written by `viscon build` (default viscon)")
    c.add_argument("--repo", default=None, help="ORG/NAME the card's loading examples name")
    c.add_argument("--license", default=None, help="licence id for the front matter")
    c.set_defaults(func=_cmd_card)

    def hub_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dataset", default="viscon", help="a folder written by `viscon build` (default viscon)"
        )
        p.add_argument("--repo", required=True, help="ORG/NAME of the Hub dataset repo")
        p.add_argument("--revision", default=None, help="branch to push to (default main)")
        p.add_argument("--private", action="store_true", help="create the repo private")
        p.add_argument(
            "--formats",
            default="",
            help="also push these exports of each mix: idefics, llava (comma-separated)",
        )
        p.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")

    u = sub.add_parser(
        "push",
        help="upload every config, the card and the plots to a Hub dataset repo",
        description="Upload all configs (train and test Parquet, images embedded), the card and plots in as few "
        "commits as the Hub allows; files already there are not uploaded again. The token comes from HF_TOKEN "
        "or `hf auth login`.",
    )
    hub_flags(u)
    u.set_defaults(func=_cmd_push)

    r = sub.add_parser(
        "release",
        help="push and tag the Hub revision vX.Y.Z (refuses an existing version)",
        description="Push the dataset, then tag the resulting revision; `load_dataset(REPO, revision='vX.Y.Z')` "
        "reads it back.",
    )
    hub_flags(r)
    r.add_argument("--version", required=True, help="X.Y.Z")
    r.set_defaults(func=_cmd_push)

    k = sub.add_parser("cache", help="share the generation cache through the Hub (push | pull)")
    ksub = k.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for action, text in (("push", "upload the cache's shards"), ("pull", "download a Hub cache's shards")):
        kp = ksub.add_parser(action, help=text)
        kp.add_argument("--cache", default="viscon-cache", help="local cache folder (default viscon-cache)")
        kp.add_argument("--repo", required=True, help="ORG/NAME of the Hub dataset repo holding the cache")
        kp.add_argument("--revision", default=None, help="branch (default main)")
        if action == "push":
            kp.add_argument("--private", action="store_true", help="create the repo private")
        kp.set_defaults(func=_cmd_cache)
    return parser


def _cmd_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from viscon_hub.build.dedup import DedupConfig
    from viscon_hub.build.driver import BuildConfig, build
    from viscon_hub.build.layout import parse_configs
    from viscon_hub.build.quality import MultipleChoiceQuality
    from viscon_hub.generate.relevance import RelevanceConfig
    from viscon_hub.prepare.filters import FilterConfig

    dedup = DedupConfig()
    if args.dedup_threshold is not None:
        dedup = replace(dedup, threshold=args.dedup_threshold)
    if args.dedup_model is not None:
        dedup = replace(dedup, model=args.dedup_model)
    values = {
        "source": args.source,
        "revision": args.revision,
        "output": args.output,
        "work_dir": args.work_dir,
        "configs": parse_configs(args.configs) if args.configs else None,
        "cache": args.cache,
        "extra_caches": tuple(_cache_alias(c) for c in args.extra_cache),
        "caption_model": args.caption_model,
        "qa_model": args.qa_model,
        "base_url": args.base_url,
        "offline": args.offline,
        "limit": args.limit,
        "reasks": args.reasks,
        "dedup": dedup,
        "max_shard_size": args.max_shard_size,
        "runner": _runner_options(args),
    }
    if args.test_fraction is not None:
        values["test_fraction"] = args.test_fraction
    mc = MultipleChoiceQuality(shuffle=not args.no_option_shuffle, drop_flagged=args.drop_length_tells)
    if args.mc_longest_ratio is not None:
        mc = replace(mc, longest_ratio=args.mc_longest_ratio)
    values["multiple_choice"] = mc
    values["filters"] = _filter_config(args, FilterConfig())
    values["relevance"] = RelevanceConfig(
        model=args.relevance_model, min_relevance=args.min_relevance, on=args.relevance_on
    )
    config = BuildConfig(**values)
    config = replace(config, engine=_engine_config(args, offline=config.offline))
    quiet = args.no_progress or not sys.stderr.isatty()

    def progress(stage: str) -> None:
        # The disk cost of the images ("merge: ...") is said before writing, even without a terminal.
        if not quiet or ":" in stage:
            print(f"viscon build: {stage}", file=sys.stderr)

    report = build(config, progress=progress)
    summary = report.to_dict()
    gen = summary["stages"]["generate"]["engine"]
    print(
        json.dumps(
            {
                "output": summary["output"],
                "rows": summary["rows"],
                "dropped": summary["dropped"],
                "calls": gen["calls"],
                "cache_hits": gen["cache_hits"],
                "offline_misses": gen["offline_misses"],
            }
        )
    )
    print(f"load it with: datasets.load_dataset({config.output!r}, 'leaky')", file=sys.stderr)
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from viscon_hub.publish.card import write_card

    summary = write_card(args.dataset, repo_id=args.repo, license=args.license)
    print(json.dumps(summary, sort_keys=True))
    return 0


def _formats(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


def _print_push(report, *, dry_run: bool) -> None:
    summary = report.to_dict()
    if dry_run:
        print(json.dumps(summary, indent=2))
        return
    summary["added"], summary["deleted"] = len(report.added), len(report.deleted)
    print(json.dumps(summary))


def _cmd_push(args: argparse.Namespace) -> int:
    """``push`` and ``release`` (which adds ``--version``)."""
    from viscon_hub.publish.hub import push, release

    options = {
        "dataset": args.dataset,
        "repo": args.repo,
        "revision": args.revision,
        "private": args.private,
        "formats": _formats(args.formats),
        "dry_run": args.dry_run,
    }
    version = getattr(args, "version", None)
    report = release(version=version, **options) if version is not None else push(**options)
    _print_push(report, dry_run=args.dry_run)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from viscon_hub.publish.hub import cache_pull, cache_push

    if args.cache_command == "push":
        report = cache_push(cache=args.cache, repo=args.repo, revision=args.revision, private=args.private)
        print(
            json.dumps(
                {"commits": len(report.commits), "added": len(report.added), "unchanged": report.unchanged}
            )
        )
    else:
        print(json.dumps(cache_pull(cache=args.cache, repo=args.repo, revision=args.revision)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from viscon_hub.publish.exports import export

    result = export(
        dataset=args.dataset, config=args.config, format=args.format, output=args.output, split=args.split
    )
    print(json.dumps(result))
    return 0


def _cache_alias(url: str) -> str:
    """``bundled`` names the handwritten cache shipped for the bundled sample."""
    if url == "bundled":
        from viscon_hub.resources import BUNDLED_CACHE

        return str(BUNDLED_CACHE)
    return url


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from viscon_hub.generate.stages import GenerateConfig
    from viscon_hub.runners import run_generate

    num_shards, shard_index = _shard_flags(args)
    runner = _runner_options(args)
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
        engine=_engine_config(args, offline=args.offline),
        batch_max_requests=args.batch_max_requests,
        batch_max_bytes=args.batch_max_bytes,
        batch_poll_interval_s=args.batch_poll_interval,
        batch_file_only=args.batch_file_only,
        batch_results=tuple(args.batch_results),
        num_shards=num_shards or 1,
        shard_index=shard_index or 0,
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

    stats = run_generate(config, runner=runner, progress=progress if live else None)
    if live:
        sys.stderr.write("\n")
    summary = stats.to_dict()
    if args.dry_run:
        print(json.dumps(summary["plan"], indent=2))
        return 0
    if "batch_files" in summary["batch"]:
        print(json.dumps({"batch": summary["batch"]}, indent=2))
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
                **({"budget_stops": engine["budget_stops"]} if engine["budget_stops"] else {}),
                **({"batch": summary["batch"]} if summary["batch"] else {}),
            }
        )
    )
    return 0


def _add_filter_flags(parser: argparse.ArgumentParser) -> None:
    f = parser.add_argument_group("safety and language filters (pip install 'viscon-hub[safety]')")
    f.add_argument("--languages", default=None, help="keep pages in these languages, e.g. en or en,de")
    f.add_argument("--opt-out", default=None, help="file of opted-out domains / URL patterns, one a line")
    f.add_argument(
        "--toxic-text", action="store_true", help="drop pages (and, in build, generations) with toxic text"
    )
    f.add_argument("--nsfw-images", action="store_true", help="drop images nudenet finds explicit")
    f.add_argument(
        "--near-duplicate-images",
        action="store_true",
        help="drop an image an earlier document already showed (same perceptual hash)",
    )


def _filter_config(args: argparse.Namespace, base: Any) -> Any:
    """``base`` (a FilterConfig, e.g. from a recipe) with the filter flags given on the command line."""
    from dataclasses import replace

    changes: dict[str, Any] = {}
    if args.languages is not None:
        changes["languages"] = tuple(x for x in args.languages.split(",") if x.strip())
    if args.opt_out is not None:
        changes["opt_out"] = args.opt_out
    for name in ("toxic_text", "nsfw_images", "near_duplicate_images"):
        if getattr(args, name):
            changes[name] = True
    return replace(base, **changes) if changes else base


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from viscon_hub.prepare.driver import PrepareConfig
    from viscon_hub.runners import run_prepare

    num_shards, shard_index = _shard_flags(args)
    runner = _runner_options(args)
    overrides = {
        "source": args.source,
        "output": args.output,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "tokenizer": args.tokenizer,
        "num_shards": num_shards,
        "shard_index": shard_index,
        "max_images_per_document": args.max_images_per_document,
        "image_store": args.image_store,
        "split": args.split,
        "dataset_config": args.dataset_config,
        "revision": args.revision,
        "image_roots": tuple(args.image_root) if args.image_root else None,
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
    config = replace(config, filters=_filter_config(args, config.filters))

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.limit, unit="doc", desc="prepare", file=sys.stderr)
    try:
        stats = run_prepare(config, runner=runner, progress=bar.update if bar is not None else None)
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
    command = " ".join(filter(None, (args.command, getattr(args, "cache_command", None))))
    try:
        return args.func(args)
    except VisconError as e:
        print(f"viscon {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last word of the CLI: one line, the traceback on request
        if args.log_level == "DEBUG":
            raise
        message = _unexpected(e)
        print(f"viscon {command}: error: {message}", file=sys.stderr)
        return 2 if message.startswith("this storage needs") else 1  # a setup problem, like a bad flag


def _one_line(e: BaseException) -> str:
    from viscon_hub.errors import redact

    text = " ".join(str(e).split()) or type(e).__name__
    return redact(text, limit=600)


_FSSPEC_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}


def _unexpected(e: BaseException) -> str:
    """An error nobody raised on purpose: its type and first line, the extra to install, the way to see more."""
    if isinstance(e, ImportError):
        for package, extra in _FSSPEC_EXTRAS.items():
            if package in str(e):
                return f"this storage needs {package}: pip install 'viscon-hub[{extra}]'"
    return f"{type(e).__name__}: {_one_line(e)}\n(rerun with --log-level DEBUG for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
