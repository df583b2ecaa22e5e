"""The ``viscon`` command line: a thin shell over the library.

Each command names its config class and which of its fields (dotted paths into nested configs) are
flags; a flag's spelling, type, default and help come from the field (see :func:`viscon_hub.recipe.opt`),
so a default is written once. ``--recipe FILE`` reads the command's section of a YAML recipe; a flag
given on the command line wins over it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from viscon_hub import __version__
from viscon_hub.errors import ConfigError, VisconError

logger = logging.getLogger("viscon_hub")

ENGINE = tuple(
    f"engine.{name}"
    for name in (
        "max_concurrency requests_per_minute tokens_per_minute max_attempts max_cost_usd max_error_rate "
        "request_timeout_s"
    ).split()
)
MODELS = ("cache", "extra_caches", "caption_model", "qa_model", "base_url", "reasks")
RUNNER = ("runner.kind", "runner.ray_address", "runner.ray_workers")
FILTERS = tuple(
    "filters.languages filters.opt_out filters.toxic_text filters.nsfw_images filters.near_duplicate_images".split()
)
QUICK = "openai:gpt-4o; the bundled handwritten example with no --source"


def _under(stage: str, paths: Sequence[str]) -> tuple[str, ...]:
    """The field paths of a stage config nested in another one (``BuildConfig.generate``)."""
    return tuple(f"{stage}.{p}" for p in paths)


@dataclass(frozen=True)
class Command:
    """A command: its config class (``module:Class``), the fields it shows as flags, and its runner."""

    name: str
    config: str
    flags: tuple[Any, ...]
    run: str  # the name of the function in this module that runs it (looked up at call time)
    help: str
    description: str = ""
    sections: tuple[str, ...] = ()
    progress: bool = False

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


# --- runners: call the library, print a one-line JSON summary ---------------------------------------


def _slurm_shards(config: Any) -> Any:
    """``config`` with its shard from a Slurm job array's task when no shard was asked for."""
    from dataclasses import replace

    from viscon_hub.runners.slurm import resolve_shard

    if (config.num_shards, config.shard_index) != (1, 0):
        return config
    num_shards, shard_index = resolve_shard(None, None)
    return replace(config, num_shards=num_shards, shard_index=shard_index)


def _cmd_prepare(args: argparse.Namespace) -> int:
    config = _slurm_shards(args.config)
    from viscon_hub.runners import run_prepare

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.limit, unit="doc", desc="prepare", file=sys.stderr)
    try:
        stats = run_prepare(config, runner=config.runner, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = stats.to_dict()
    print(json.dumps({k: summary[k] for k in ("documents_read", "documents_kept", "images_kept", "dropped")}))
    print(f"wrote {config.output}/contexts and {config.output}/stats.json", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    config = _slurm_shards(args.config)
    import time

    from viscon_hub.runners import run_generate

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

    stats = run_generate(config, runner=config.runner, progress=progress if live else None)
    if live:
        sys.stderr.write("\n")
    summary = stats.to_dict()
    if config.dry_run:
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


def _cmd_build(args: argparse.Namespace) -> int:
    config = args.config
    from viscon_hub.build.driver import build

    quiet = args.no_progress or not sys.stderr.isatty()

    def progress(stage: str) -> None:
        # The disk cost of the images ("merge: ...") is said before writing, even without a terminal.
        if not quiet or ":" in stage:
            print(f"viscon build: {stage}", file=sys.stderr)

    summary = build(config, progress=progress).to_dict()
    gen = summary["stages"]["generate"]["engine"]
    keys = ("calls", "cache_hits", "offline_misses")
    print(
        json.dumps(
            {"output": summary["output"], "rows": summary["rows"], "dropped": summary["dropped"]}
            | {k: gen[k] for k in keys}
        )
    )
    print(f"load it with: datasets.load_dataset({config.output!r}, 'leaky')", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    config = args.config
    from viscon_hub.publish.exports import export

    result = export(
        dataset=config.dataset,
        config=config.config,
        format=config.format,
        output=config.output,
        split=config.split,
        max_shard_size=config.max_shard_size,
    )
    print(json.dumps(result))
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    config = args.config
    from viscon_hub.publish.card import write_card

    print(json.dumps(write_card(config.dataset, repo_id=config.repo, license=config.license), sort_keys=True))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """``push`` and ``release`` (which needs ``--version``)."""
    config = args.config
    from viscon_hub.publish.hub import push, release

    options = {
        "dataset": config.dataset,
        "repo": config.repo,
        "revision": config.revision,
        "private": config.private,
        "formats": config.formats,
        "dry_run": config.dry_run,
        "max_shard_size": config.max_shard_size,
    }
    if args.command == "release":
        if config.version is None:
            raise ConfigError(
                "release.version: expected --version X.Y.Z (or version: in the recipe); got nothing"
            )
        report = release(version=config.version, **options)
    else:
        report = push(**options)
    summary = report.to_dict()
    if config.dry_run:
        print(json.dumps(summary, indent=2))
        return 0
    summary["added"], summary["deleted"] = len(report.added), len(report.deleted)
    print(json.dumps(summary))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    config = args.config
    from viscon_hub.publish.hub import cache_pull, cache_push

    where = {"cache": config.cache, "repo": config.repo, "revision": config.revision}
    if args.command == "cache push":
        report = cache_push(private=config.private, **where)
        print(
            json.dumps(
                {"commits": len(report.commits), "added": len(report.added), "unchanged": report.unchanged}
            )
        )
    else:
        print(json.dumps(cache_pull(**where)))
    return 0


_PUSH_FLAGS = ("dataset", "repo", "revision", "private", "formats", "dry_run", "max_shard_size")
COMMANDS = (
    Command(
        "prepare",
        "viscon_hub.prepare.driver:PrepareConfig",
        (
            *(
                "source output limit max_tokens tokenizer num_shards shard_index max_images_per_document "
                "image_store fetch_images image_roots fetch.allow_private fetch.concurrency fetch.timeout_s "
                "split dataset_config revision"
            ).split(),
            *FILTERS,
            *RUNNER,
        ),
        "_cmd_prepare",
        "documents in, image contexts out (validate, token filter, contexts, images)",
        "Read OBELICS-shaped documents, drop malformed ones with a counted reason, keep those within "
        "--max-tokens, write one image context per image as Parquet under --output, plus stats.json.",
        progress=True,
    ),
    Command(
        "generate",
        "viscon_hub.generate.stages:GenerateConfig",
        (
            "contexts",
            "output",
            *MODELS,
            *ENGINE,
            *"context image_store limit chunk_size".split(),
            "engine.offline",
            *(
                "dry_run batch_max_requests batch_max_bytes batch_poll_interval_s batch_file_only batch_results"
            ).split(),
            "num_shards",
            "shard_index",
            *RUNNER,
        ),
        "_cmd_generate",
        "captions, then free-form and multiple-choice Q&A, through the cached engine",
        "Caption every image context (with or without its web context), then turn captions into free-form "
        "and multiple-choice Q&A. Every model call goes through the content-addressed cache: a rerun makes "
        "no call whose reply is stored.",
        progress=True,
    ),
    Command(
        "build",
        "viscon_hub.build.driver:BuildConfig",
        (
            *_under("prepare", "source revision max_tokens tokenizer max_images_per_document".split()),
            ("prepare.limit", {"help": "read at most N documents"}),
            "output",
            "work_dir",
            "merge.configs",
            *_under("generate", [m for m in MODELS if not m.endswith("_model")]),
            *(
                (f"generate.{m}", {"help": f"BACKEND:MODEL for {what} (default: {QUICK})"})
                for m, what in (("caption_model", "captions"), ("qa_model", "Q&A"))
            ),
            *_under("generate", ENGINE),
            "generate.chunk_size",
            "offline",
            *_under(
                "merge",
                "test_fraction dedup.threshold dedup.model multiple_choice.longest_ratio "
                "multiple_choice.drop_flagged multiple_choice.shuffle max_shard_size".split(),
            ),
            *"relevance.model relevance.min_relevance relevance.on".split(),
            *_under("prepare", FILTERS),
            *RUNNER,
        ),
        "_cmd_build",
        "prepare, generate, dedup and merge into a dataset folder every config loads from",
        "Run the whole pipeline and write a local dataset folder: Parquet per config and split, and a README "
        "whose configs load with `load_dataset(FOLDER, CONFIG)`. With no flags it builds the bundled sample "
        "from the bundled handwritten cache, offline.",
        progress=True,
    ),
    Command(
        "export",
        "viscon_hub.publish.options:ExportConfig",
        ("dataset", "config", "format", "output", "split", "max_shard_size"),
        "_cmd_export",
        "write a built config in a trainer's format (llava, idefics, messages, llamafactory)",
        "Convert one config of a built dataset folder into the format a training codebase reads. The Parquet "
        "formats write shards <config>_<format>/<split>-NNNNN-of-MMMMM.parquet of at most --max-shard-size.",
    ),
    Command(
        "card",
        "viscon_hub.publish.options:CardConfig",
        ("dataset", "repo", "license"),
        "_cmd_card",
        "statistics, plots and the dataset card of a built folder",
        "Compute the statistics of a built dataset (context tokens, caption/context overlap, Q&A counts, "
        "lengths, word cloud, image sizes, dedup, drops, cost), write plots/ and README.md.",
    ),
    Command(
        "push",
        "viscon_hub.publish.options:PushConfig",
        _PUSH_FLAGS,
        "_cmd_push",
        "upload every config, the card and the plots to a Hub dataset repo",
        "Upload all configs (train and test Parquet, images embedded), the card and plots in as few commits "
        "as the Hub allows; files already there are not uploaded again. The token comes from HF_TOKEN or "
        "`hf auth login`.",
    ),
    Command(
        "release",
        "viscon_hub.publish.options:PushConfig",
        (*_PUSH_FLAGS, "version"),
        "_cmd_push",
        "push and tag the Hub revision vX.Y.Z (refuses an existing version)",
        "Push the dataset, then tag the resulting revision; `load_dataset(REPO, revision='vX.Y.Z')` reads it back.",
        sections=("push", "release"),
    ),
    Command(
        "cache push",
        "viscon_hub.publish.options:CacheConfig",
        ("cache", "repo", "revision", "private"),
        "_cmd_cache",
        "upload the cache's shards",
        sections=("cache",),
    ),
    Command(
        "cache pull",
        "viscon_hub.publish.options:CacheConfig",
        ("cache", "repo", "revision"),
        "_cmd_cache",
        "download a Hub cache's shards",
        sections=("cache",),
    ),
)
# What a publishing command reads from the recipe's build section when its own section does not say.
_FROM_BUILD = {"export": "dataset", "card": "dataset", "push": "dataset", "release": "dataset"}


def _add_command(sub: Any, command: Command) -> None:
    p = sub.add_parser(command.name.split()[-1], help=command.help, description=command.description or None)
    p.add_argument("--recipe", default=None, metavar="FILE", help="YAML recipe; flags given here override it")
    p.add_argument(
        "--print-recipe", action="store_true", help="print the resolved recipe of this run and exit"
    )
    if command.progress:
        p.add_argument("--no-progress", action="store_true", help="no progress output even on a terminal")
    from viscon_hub.flags import add_flags

    p.set_defaults(command_spec=command, flag_paths=add_flags(p, command.config_class(), command.flags))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viscon", description="Turn web documents (OBELICS) into contextual visual instruction data."
    )
    parser.add_argument("--version", action="version", version=f"viscon-hub {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cache_sub = None
    for command in COMMANDS:
        if command.name.startswith("cache "):
            if cache_sub is None:
                k = sub.add_parser("cache", help="share the generation cache through the Hub (push | pull)")
                cache_sub = k.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
            _add_command(cache_sub, command)
        else:
            _add_command(sub, command)
    return parser


def resolve(args: argparse.Namespace) -> Any:
    """The config of a parsed command line: its recipe section(s), then the flags given."""
    from viscon_hub.flags import resolve as resolve_config

    command: Command = args.command_spec
    given = vars(args)
    return resolve_config(
        command.config_class(),
        args.recipe,
        command.sections or (command.name,),
        overrides={path: given[path] for path in args.flag_paths if path in given},
        inherit=_FROM_BUILD.get(command.name),
    )


def _print_recipe(command: Command, config: Any) -> None:
    import yaml

    from viscon_hub.recipe import to_mapping

    section = (command.sections or (command.name,))[-1]
    print(yaml.safe_dump({section: to_mapping(config)}, sort_keys=False, allow_unicode=True), end="")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command_spec", None):
        parser.print_help()
        return 2
    args.command = args.command_spec.name
    try:
        config = resolve(args)
        if args.print_recipe:
            _print_recipe(args.command_spec, config)
            return 0
        args.config = config
        return globals()[args.command_spec.run](args)
    except VisconError as e:
        print(f"viscon {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last word of the CLI: one line, the traceback on request
        if args.log_level == "DEBUG":
            raise
        message = _unexpected(e)
        print(f"viscon {args.command}: error: {message}", file=sys.stderr)
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
