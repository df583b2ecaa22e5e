"""The Ray runner: prepare and generate as ``ray.data`` ``map_batches`` over blocks, on any Ray cluster.

The driver reads documents (or image contexts) and deals them out in blocks, one dataset row per
block. A pool of actors, one per worker, each with its own token counter, image store handle,
engine, cache handle, concurrency and share of the cluster-wide ``--rpm/--tpm``, turns a block into
its outputs. The driver gathers the blocks in order and writes exactly the files the local runner
writes, so everything downstream (the merge, the Hub) cannot tell the runners apart.

Failures, from small to large:

- a bad row or reply is a counted drop inside its block, as in the local runner;
- a worker process that dies is restarted by Ray and its block retried; replies it already stored
  sit in its own cache journal, which the retry folds in, so nothing stored is asked again;
- a block that raises is retried ``max_retries`` times; if it still fails, its rows are a counted
  drop (``block_failed``) and every other block is written.

The cache and the image store must be reachable from every worker under the same URL: a local
path on one machine, a shared filesystem or an object store (``s3://``, ``gs://``) on a cluster.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from viscon_hub.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from viscon_hub.generate.stages import GenerateConfig, GenerateStats
    from viscon_hub.prepare.driver import PrepareConfig, PrepareStats
    from viscon_hub.runners import RunnerOptions

logger = logging.getLogger(__name__)

BLOCK_FAILED = "block_failed"


def _ray(runner: RunnerOptions):
    """Import Ray and join (or start) the cluster once per process."""
    try:
        import ray
        import ray.data  # noqa: F401 - the runner needs the data library, not just core
    except ImportError as e:
        raise MissingDependencyError(
            f"--runner ray needs Ray Data ({e}); install it with: pip install 'viscon-hub[ray]'"
        ) from e
    if not ray.is_initialized():
        ray.init(
            address=runner.ray_address,
            ignore_reinit_error=True,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    return ray


def cluster_workers(runner: RunnerOptions) -> int:
    """How many workers to run: ``--ray-workers``, else one per CPU of the cluster."""
    ray = _ray(runner)
    if runner.ray_workers is not None:
        return runner.ray_workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def engine_share(engine, workers: int):
    """One worker's engine settings: the cluster-wide rate limits split evenly between ``workers``.

    >>> from viscon_hub.engine import EngineConfig
    >>> engine_share(EngineConfig(requests_per_minute=600, max_concurrency=8), 4).requests_per_minute
    150.0
    """
    rpm, tpm = engine.requests_per_minute, engine.tokens_per_minute
    return replace(
        engine,
        requests_per_minute=None if rpm is None else rpm / workers,
        tokens_per_minute=None if tpm is None else tpm / workers,
    )


def _to_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return sink.getvalue().to_pybytes()


def _from_bytes(data: bytes) -> list[dict[str, Any]]:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()


def _map_blocks(
    runner: RunnerOptions, items: list[dict[str, Any]], worker: type, *, workers: int, **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Run ``worker`` over ``items`` (one per block) on an actor pool; yield outputs in block order.

    A block whose retries all fail is skipped (Ray Data's errored-block budget is every block), so
    its absence from the output is what the caller counts as ``block_failed``.
    """
    ray = _ray(runner)
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.max_errored_blocks = len(items)
    ctx.actor_task_retry_on_errors = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not items:
        return
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        worker,
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=min(workers, len(items))),
        fn_constructor_kwargs=kwargs,
        num_cpus=1,
        max_restarts=-1,
        max_task_retries=runner.max_retries,
    )
    yield from ds.iter_rows()


# -- prepare ------------------------------------------------------------------------------------


class _DropLines:
    """Stands in for prepare's drop log inside a worker: keeps entries to send back with the block."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, **entry: Any) -> None:
        self.entries.append({k: v for k, v in entry.items() if v is not None})


class _PrepareWorker:
    def __init__(self, config: PrepareConfig) -> None:
        from viscon_hub.prepare.images import ImageStore
        from viscon_hub.prepare.tokens import TokenCounter

        self.config = config
        self.counter = TokenCounter(config.tokenizer)
        self.store = ImageStore(config.store_url) if config.fetch_images else None
        self.filters = None
        if config.filters.active:
            from viscon_hub.prepare.filters import Filters

            self.filters = Filters(config.filters)
        # Repeated documents are caught within a worker's blocks; across workers they are not (yet).
        self.seen: set[str] = set()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from viscon_hub.prepare.driver import PrepareStats, _attach_images, process_batch
        from viscon_hub.records import IMAGE_CONTEXT_SCHEMA

        out: dict[str, list] = {"block": [], "contexts": [], "stats": [], "drops": []}
        for block, payload in zip(batch.column("block").to_pylist(), batch.column("rows").to_pylist()):
            rows = pickle.loads(payload)  # noqa: S301 - written by this run's driver a moment ago
            stats, drops = PrepareStats(), _DropLines()
            contexts = process_batch(
                rows,
                config=self.config,
                counter=self.counter,
                stats=stats,
                drops=drops,
                seen=self.seen,
                filters=self.filters,
            )
            if self.store is not None:
                contexts = _attach_images(
                    contexts,
                    config=self.config,
                    store=self.store,
                    stats=stats,
                    drops=drops,
                    filters=self.filters,
                )
            stats.images_kept += len(contexts)
            out["block"].append(block)
            out["contexts"].append(_to_bytes([c.to_row() for c in contexts], IMAGE_CONTEXT_SCHEMA))
            out["stats"].append(json.dumps(stats.to_dict()))
            out["drops"].append(json.dumps(drops.entries, ensure_ascii=False, default=str))
        return pa.table(out)


def prepare_on_ray(
    config: PrepareConfig, *, runner: RunnerOptions, progress: Callable[[int], None] | None = None
) -> PrepareStats:
    """:func:`viscon_hub.prepare.driver.prepare` with the blocks processed on Ray; the same files."""
    from viscon_hub.prepare.driver import PrepareStats, _batched, _Output, finish, source_rows
    from viscon_hub.prepare.readers import resolve_source
    from viscon_hub.prepare.tokens import TokenCounter
    from viscon_hub.records import ImageContext

    started = time.monotonic()
    spec = resolve_source(
        config.source, split=config.split, config=config.dataset_config, revision=config.revision
    )
    tokenizer = TokenCounter(config.tokenizer).spec
    blocks = list(_batched(source_rows(config), config.batch_size))
    items = [{"block": i, "rows": pickle.dumps(b)} for i, b in enumerate(blocks)]
    stats = PrepareStats()
    out = _Output(config)
    try:
        done = _in_order(
            _map_blocks(runner, items, _PrepareWorker, workers=cluster_workers(runner), config=config),
            len(blocks),
        )
        for i, result in done:
            if result is None:
                _failed_prepare_block(blocks[i], stats, out.drops)
                continue
            part = json.loads(result["stats"])
            for name, value in part.items():
                if name == "dropped":
                    stats.dropped.update(value)
                else:
                    setattr(stats, name, getattr(stats, name) + value)
            for entry in json.loads(result["drops"]):
                out.drops.add(**entry)
            out.write([ImageContext.from_row(r) for r in _from_bytes(result["contexts"])])
            if progress is not None:
                progress(len(blocks[i]))
        out.commit()
    finally:
        out.close()
    finish(config, stats, spec=spec, tokenizer=tokenizer, started=started)
    return stats


def _failed_prepare_block(rows: list, stats: PrepareStats, drops: Any) -> None:
    stats.documents_read += len(rows)
    stats.drop(BLOCK_FAILED, len(rows))
    for raw in rows:
        drops.add(source=raw.source, row=raw.row, reason=BLOCK_FAILED)


def _in_order(results: Iterable[dict[str, Any]], n: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(block, result)`` for every block 0..n-1; ``None`` for a block that never came back."""
    expected = 0
    for result in results:
        block = int(result["block"])
        if block < expected:
            raise ConfigError(f"Ray returned block {block} twice or out of order; expected {expected}")
        while expected < block:
            yield expected, None
            expected += 1
        yield block, result
        expected += 1
    while expected < n:
        yield expected, None
        expected += 1


# -- generate -----------------------------------------------------------------------------------


class _GenerateWorker:
    def __init__(self, config: GenerateConfig, image_store: str, vllm_pools: dict[str, Any]) -> None:
        from viscon_hub.generate.stages import Generator

        # One cache handle, engine and client per worker for all its blocks; a worker that dies
        # leaves its journal behind, and the restarted worker's cache folds it in.
        self.generator = Generator(config=config, image_store=image_store, make=_backend_maker(vllm_pools))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from viscon_hub.generate.stages import GENERATION_SCHEMA
        from viscon_hub.records import ImageContext

        out: dict[str, list] = {"block": [], "records": [], "stats": []}
        for block, payload in zip(batch.column("block").to_pylist(), batch.column("contexts").to_pylist()):
            contexts = [ImageContext.from_row(r) for r in _from_bytes(payload)]
            records, stats = self.generator.run(contexts)
            # A finished block's replies go to a Parquet shard before the driver hears of it, so a
            # remote cache (no journal there) loses nothing of it when this worker goes away.
            self.generator.cache.flush()
            out["block"].append(block)
            out["records"].append(_to_bytes(records, GENERATION_SCHEMA))
            out["stats"].append(json.dumps(stats.to_dict()))
        return pa.table(out)

    def __del__(self) -> None:
        generator = getattr(self, "generator", None)
        if generator is not None:
            generator.close()


def _backend_maker(vllm_pools: dict[str, Any]) -> Callable[..., Any]:
    """``make_backend``, except that ``vllm:`` models with a pool go to that pool's GPU engines."""
    from viscon_hub.engine import make_backend, parse_spec

    def make(spec: str, *, image_loader, **options: Any):
        kind, model = parse_spec(spec)
        if kind == "vllm" and model in vllm_pools:
            from viscon_hub.runners.vllm_pool import RayVLLMBackend

            return RayVLLMBackend(vllm_pools[model], image_loader=image_loader)
        return make_backend(spec, image_loader=image_loader, **options)

    return make


def _start_vllm_pools(config: GenerateConfig, runner: RunnerOptions) -> dict[str, Any]:
    """One engine pool per ``vllm:`` model of this run, one engine per GPU of the cluster."""
    from viscon_hub.engine import parse_spec
    from viscon_hub.runners.vllm_pool import VLLMPool

    models = sorted(
        {model for kind, model in map(parse_spec, (config.caption_model, config.qa_model)) if kind == "vllm"}
    )
    if not models or config.engine.offline:
        return {}
    ray = _ray(runner)
    engines = VLLMPool.engines_for(ray.cluster_resources().get("GPU", 0.0) / len(models))
    return {m: VLLMPool.start(m, engines=engines) for m in models}


def generate_on_ray(
    config: GenerateConfig, *, runner: RunnerOptions, vllm_pools: dict[str, Any] | None = None
) -> GenerateStats:
    """:func:`viscon_hub.generate.stages.generate` with blocks of contexts generated on Ray; the same files.

    ``vllm_pools`` maps a ``vllm:`` model name to a running :class:`~viscon_hub.runners.vllm_pool.VLLMPool`;
    by default one is started per such model (one engine per GPU) and stopped at the end.
    """
    from viscon_hub.generate import stages
    from viscon_hub.records import IMAGE_CONTEXT_SCHEMA, ImageContext

    if config.dry_run:
        # A plan calls nothing; one process reads the cache as fast as many.
        return stages.generate(config)
    started = time.monotonic()
    # Only this shard's share is read (counted from the Parquet footers), a block at a time; the
    # driver keeps the blocks as Arrow bytes, which Ray Data needs up front, never as Python objects.
    first, stop = stages.context_share(
        config.contexts, limit=config.limit, num_shards=config.num_shards, shard_index=config.shard_index
    )
    store_url = stages._image_store_of(config.contexts, config.image_store)
    workers = cluster_workers(runner)
    worker_config = replace(config, engine=engine_share(config.engine, workers))
    size = runner.generate_block_size
    items = [
        {"block": i, "contexts": _to_bytes([c.to_row() for c in block], IMAGE_CONTEXT_SCHEMA)}
        for i, block in enumerate(
            stages.iter_contexts(config.contexts, start=first, stop=stop, batch_size=size)
        )
    ]
    started_pools = _start_vllm_pools(config, runner) if vllm_pools is None else {}
    pools = vllm_pools if vllm_pools is not None else started_pools
    parts: list[dict[str, Any]] = []
    results = _map_blocks(
        runner,
        items,
        _GenerateWorker,
        workers=workers,
        config=worker_config,
        image_store=store_url,
        vllm_pools=pools,
    )
    # Blocks hold every mode of their contexts; the writer lists a mode's records before the next's,
    # as one local run does, and holds no more than a row group of them.
    out = stages.RecordsWriter(config)
    try:
        for i, result in _in_order(results, len(items)):
            if result is None:
                block = [ImageContext.from_row(r) for r in _from_bytes(items[i]["contexts"])]
                block_records, part = _failed_generate_block(block, config)
            else:
                block_records, part = _from_bytes(result["records"]), json.loads(result["stats"])
            out.write(block_records)
            parts.append(part)
        records = out.commit()
    finally:
        out.discard()
        for pool in started_pools.values():
            pool.stop()
    stats = _stats_of(stages.merge_stats(parts) if parts else {})
    stats.contexts_read = stop - first
    stats.records = records
    stages._write_summary(config, stats, started, image_store=store_url)
    return stats


def _failed_generate_block(contexts: list, config: GenerateConfig) -> tuple[list[dict[str, Any]], dict]:
    from viscon_hub.generate import stages
    from viscon_hub.generate.prompts import load_template

    ff = stages._Stage(load_template("qa_freeform"), config.qa_model)
    mc = stages._Stage(load_template("qa_multiple_choice"), config.qa_model)
    stats = stages.GenerateStats(contexts_read=len(contexts))
    records = []
    for mode in config.modes:
        caption = stages._Stage(load_template(stages.CAPTION_TEMPLATES[mode]), config.caption_model)
        for ctx in contexts:
            rec = stages._base_record(ctx, mode, caption, ff, mc)
            stages._drop(rec, BLOCK_FAILED, stats)
            records.append(rec)
    logger.warning("a block of %d contexts failed on every retry; counted as %s", len(contexts), BLOCK_FAILED)
    return records, stats.to_dict()


def _stats_of(merged: dict[str, Any]) -> GenerateStats:
    from viscon_hub.generate.stages import GenerateStats

    return GenerateStats(
        contexts_read=merged.get("contexts_read", 0),
        records_ok=merged.get("records_ok", 0),
        dropped=Counter(merged.get("dropped", {})),
        reasks=merged.get("reasks", 0),
        qa_truncated_rounds=merged.get("qa_truncated_rounds", 0),
        mc_dropped_items=Counter(merged.get("mc_dropped_items", {})),
        engine=merged.get("engine", {}),
    )


__all__ = ["cluster_workers", "engine_share", "generate_on_ray", "prepare_on_ray"]
