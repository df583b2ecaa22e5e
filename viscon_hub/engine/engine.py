"""The engine: the one place where model calls happen.

It answers from the cache first, calls the backend only for misses, and owns bounded concurrency,
requests- and tokens-per-minute limits, retries with exponential backoff and jitter that honour
``Retry-After``, a cap on attempts, and token and cost accounting. Every reply (and every permanent
error) is stored the moment it arrives, so a killed run resumes without repeating a stored call.

>>> import tempfile
>>> from viscon_hub.engine import Engine, EngineConfig, GenerationCache, Request
>>> engine = Engine(cache=GenerationCache(tempfile.mkdtemp()), config=EngineConfig(offline=True))
>>> req = Request.create(stage="s", model="m", template_id="t", template_version=1,
...                      messages=[{"role": "user", "content": "hi"}], sampling={})
>>> engine.run([req], backend=None)[0].error
'offline: not in cache'
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from viscon_hub.engine.backends.base import Backend, BackendError, ImageLoader
from viscon_hub.engine.backends.registry import make_backend
from viscon_hub.engine.cache import GenerationCache
from viscon_hub.engine.prices import PriceTable
from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import ConfigError, EndpointError, redact
from viscon_hub.recipe import opt
from viscon_hub.retry import Backoff

logger = logging.getLogger(__name__)
T = TypeVar("T")

OFFLINE_MISS = "offline: not in cache"
BUDGET_STOP = "budget: --max-cost reached"
# More tokens than any model takes or writes in one call: a figure above it is a lie, not a bill.
MAX_USAGE_TOKENS = 10_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """How hard the engine may push a backend. Validated on creation."""

    max_concurrency: int = opt(64, "requests in flight")
    requests_per_minute: float | None = opt(None, "requests per minute limit", flag="--rpm")
    tokens_per_minute: float | None = opt(None, "tokens per minute limit", flag="--tpm")
    max_attempts: int = opt(5, "attempts per request")
    backoff_base_s: float = opt(1.0, "first retry wait in seconds (doubles per attempt, jittered)")
    backoff_max_s: float = opt(60.0, "longest retry wait in seconds")
    retry_after_max_s: float = opt(300.0, "longest wait a server's Retry-After may ask for")
    offline: bool = opt(False, "use only the cache; report misses, call nothing")
    jitter_seed: int | None = opt(None, "seed of the retry jitter (tests)")
    max_cost_usd: float | None = opt(
        None,
        "stop calling models before the estimated spend of this run passes USD (stored replies stay)",
        flag="--max-cost",
        metavar="USD",
    )
    # Stop the run once more than this share of the last ``error_window`` attempts failed (rate-limit
    # answers aside): a dead endpoint then fails within its first wave of calls, not after every retry.
    max_error_rate: float = opt(
        0.5,
        "stop when more than this share of recent calls fail, and fail the run when this share of all "
        "calls did (1 never stops)",
    )
    error_window: int = opt(20, "how many recent attempts --max-error-rate looks at")
    request_timeout_s: float = opt(
        120.0, "seconds one model call may take before it is retried", flag="--request-timeout"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(
                f"--max-error-rate must be in [0, 1] (1 never stops); got {self.max_error_rate}"
            )
        if self.error_window < 1:
            raise ConfigError(f"error_window must be >= 1; got {self.error_window}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds; got {self.request_timeout_s}")
        if self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency must be >= 1; got {self.max_concurrency}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1; got {self.max_attempts}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 when set; got {value}")
        if self.max_cost_usd is not None and not self.max_cost_usd >= 0:
            raise ConfigError(f"--max-cost must be a number of USD >= 0; got {self.max_cost_usd}")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigError(
                f"backoff needs 0 <= base <= max; got base={self.backoff_base_s}, max={self.backoff_max_s}"
            )


@dataclass(slots=True)
class RunReport:
    """What a run asked, what the cache answered, what was called, and what it cost."""

    requests: int = 0
    unique: int = 0
    cache_hits: int = 0
    calls: int = 0
    attempts: int = 0
    retries: int = 0
    succeeded: int = 0
    permanent_errors: int = 0
    transient_errors: int = 0
    offline_misses: int = 0
    budget_stops: int = 0
    usage_anomalies: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    by_model: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def add_usage(self, model: str, c: Completion, prices: PriceTable, *, batch: bool = False) -> None:
        cost = prices.cost(model, c.prompt_tokens, c.completion_tokens, batch=batch)
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        self.cost_usd += cost
        m = self.by_model.setdefault(
            model, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        )
        m["calls"] += 1
        m["prompt_tokens"] += c.prompt_tokens
        m["completion_tokens"] += c.completion_tokens
        m["cost_usd"] += cost

    def merge(self, other: RunReport) -> None:
        for name in (
            "requests",
            "unique",
            "cache_hits",
            "calls",
            "attempts",
            "retries",
            "succeeded",
            "permanent_errors",
            "transient_errors",
            "offline_misses",
            "budget_stops",
            "usage_anomalies",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "elapsed_s",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for model, m in other.by_model.items():
            mine = self.by_model.setdefault(model, dict.fromkeys(m, 0))
            for k, v in m.items():
                mine[k] = mine.get(k, 0) + v

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cost_usd"] = round(d["cost_usd"], 6)
        return d


def _unanswered(r: Request, error: str) -> Completion:
    """The completion of a request never sent (offline miss, budget stop): not cached, never retried."""
    return Completion(
        key=r.key,
        error=error,
        model=r.model,
        stage=r.stage,
        template_id=r.template_id,
        template_version=r.template_version,
        attempts=0,
    )


def _plausible(tokens: object) -> bool:
    return isinstance(tokens, int) and not isinstance(tokens, bool) and 0 <= tokens <= MAX_USAGE_TOKENS


def endpoint_of(backend: Backend | None) -> str:
    """Where a backend sends its calls, for messages: the base URL, or ``backend:model``."""
    if backend is None:
        return "the cache"
    if backend.name == "openai":
        return redact(getattr(backend, "base_url", None) or "https://api.openai.com/v1")
    return f"{backend.name}:{backend.model}"


def _run_sync(coroutine_function: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end from sync code, in a worker thread when a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine_function())
    box: list = []

    def in_thread() -> None:
        try:
            box.append(asyncio.run(coroutine_function()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            box.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class _TokenBucket:
    """A rate in units per second with a burst of ``capacity``; ``acquire`` waits for room."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 60.0 * 5)  # up to five seconds' worth at once
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= amount:
                    self.tokens -= amount
                    return
                await asyncio.sleep((amount - self.tokens) / self.rate)


class Engine:
    """Cache-first, bounded, polite model calls. One engine can serve several stages and backends."""

    def __init__(
        self, *, cache: GenerationCache, config: EngineConfig | None = None, prices: PriceTable | None = None
    ) -> None:
        self.cache = cache
        self.config = config or EngineConfig()
        self.prices = prices or PriceTable.load()
        self.report = RunReport()
        self.backoff = Backoff(
            base_s=self.config.backoff_base_s,
            max_s=self.config.backoff_max_s,
            max_attempts=self.config.max_attempts,
            # The server said when; a little jitter keeps a crowd of waiters from returning at once.
            retry_after_max_s=self.config.retry_after_max_s,
            retry_after_jitter_s=0.05,
            seed=self.config.jitter_seed,
        )
        self._outcomes: deque[bool] = deque(maxlen=self.config.error_window)  # True: the attempt failed
        self.last_error: str | None = None
        self._backends: dict[str, Backend] = {}

    # -- clients -------------------------------------------------------------------------------
    def backend(
        self,
        spec: str,
        *,
        image_loader: ImageLoader,
        make: Callable[..., Backend] | None = None,
        **options: Any,
    ) -> Backend | None:
        """The backend ``spec`` names, made on first use and kept until :meth:`close`; None offline.

        One engine holds one client per spec, so stages that share a model share its connection
        pool (or its loaded weights); ``options`` of a later call for the same spec are ignored.
        """
        if self.config.offline:
            return None
        if spec not in self._backends:
            self._backends[spec] = (make or make_backend)(
                spec, image_loader=image_loader, timeout_s=self.config.request_timeout_s, **options
            )
        return self._backends[spec]

    @property
    def backends(self) -> list[Backend]:
        """The backends this engine made and has not closed yet."""
        return list(self._backends.values())

    def close(self) -> None:
        """Close every backend this engine made; a failure to close is logged, never raised."""
        backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            try:
                _run_sync(backend.aclose)
            except Exception as e:  # noqa: BLE001 - closing must not hide the run's result
                logger.debug("closing %s: %s", endpoint_of(backend), redact(e))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning ------------------------------------------------------------------------------
    def plan(self, requests: Sequence[Request], *, batch_prices: bool = False) -> dict:
        """What running ``requests`` would do, calling nothing: counts, cache hits, tokens and cost."""
        unique = {r.key: r for r in requests}
        missing = set(self.cache.missing(unique))
        misses = [r for k, r in unique.items() if k in missing]
        prompt = sum(r.estimated_prompt_tokens() for r in misses)
        completion = sum(r.max_tokens // 2 for r in misses)  # replies rarely use their whole budget
        cost = sum(
            self.prices.cost(r.model, r.estimated_prompt_tokens(), r.max_tokens // 2, batch=batch_prices)
            for r in misses
        )
        return {
            "requests": len(requests),
            "unique": len(unique),
            "cached": len(unique) - len(misses),
            "to_call": len(misses),
            "estimated_prompt_tokens": prompt,
            "estimated_completion_tokens": completion,
            "estimated_cost_usd": round(cost, 4),
        }

    # -- running -------------------------------------------------------------------------------
    def run(
        self,
        requests: Sequence[Request],
        *,
        backend: Backend | None,
        progress: Callable[[RunReport], None] | None = None,
    ) -> list[Completion]:
        """Synchronous wrapper of :meth:`arun` (runs its own event loop, also from a worker thread)."""

        async def once() -> list[Completion]:
            try:
                return await self.arun(requests, backend=backend, progress=progress)
            finally:
                # Clients bound to this event loop (aiohttp sessions) must close before it does.
                if backend is not None:
                    await backend.end_loop()

        return _run_sync(once)

    async def arun(
        self,
        requests: Sequence[Request],
        *,
        backend: Backend | None,
        progress: Callable[[RunReport], None] | None = None,
    ) -> list[Completion]:
        """One completion per request, in order: from the cache, or from ``backend`` (then stored)."""
        started = time.perf_counter()
        report = RunReport(requests=len(requests))
        unique: dict[str, Request] = {}
        for r in requests:
            unique.setdefault(r.key, r)
        report.unique = len(unique)
        results: dict[str, Completion] = {}
        misses: list[Request] = []
        cached = self.cache.get_many(unique)  # one read per shard row group, not one per key
        for key, r in unique.items():
            hit = cached.get(key)
            if hit is not None:
                hit.from_cache = True
                results[key] = hit
                report.cache_hits += 1
            else:
                misses.append(r)
        if misses and (self.config.offline or backend is None):
            for r in misses:
                results[r.key] = _unanswered(r, OFFLINE_MISS)
            report.offline_misses += len(misses)
            misses = []
        if misses and backend is not None:
            await self._call_all(misses, backend, results, report, progress)
        report.elapsed_s = time.perf_counter() - started
        self.report.merge(report)
        self.last_report = report
        return [results[r.key] for r in requests]

    async def _call_all(
        self,
        misses: list[Request],
        backend: Backend,
        results: dict[str, Completion],
        report: RunReport,
        progress: Callable[[RunReport], None] | None,
    ) -> None:
        batch_prices = backend.price_tier == "batch"
        # A provider's batch API has its own limits, counted by the provider, not per request here.
        limits = not batch_prices
        rpm = (
            _TokenBucket(self.config.requests_per_minute)
            if limits and self.config.requests_per_minute
            else None
        )
        tpm = (
            _TokenBucket(self.config.tokens_per_minute) if limits and self.config.tokens_per_minute else None
        )
        batch_size = max(1, int(backend.max_batch))
        queue: list[list[Request]] = [misses[i : i + batch_size] for i in range(0, len(misses), batch_size)]
        queue.reverse()
        workers = 1 if batch_size > 1 else min(self.config.max_concurrency, len(queue))
        budget = self.config.max_cost_usd
        reserved = [0.0]

        def within_budget(batch: list[Request]) -> tuple[list[Request], float]:
            # Each request reserves its worst case (estimated prompt, the whole max_tokens) before it
            # goes out, so requests in flight together cannot overshoot the budget either.
            allowed, held = [], 0.0
            for r in batch:
                worst = self.prices.cost(
                    r.model, r.estimated_prompt_tokens(), r.max_tokens, batch=batch_prices
                )
                if self.report.cost_usd + report.cost_usd + reserved[0] + held + worst > budget:
                    report.budget_stops += 1
                    results[r.key] = _unanswered(r, BUDGET_STOP)
                else:
                    allowed.append(r)
                    held += worst
            reserved[0] += held
            return allowed, held

        async def worker() -> None:
            while queue:
                batch = queue.pop()
                held = 0.0
                if budget is not None:
                    batch, held = within_budget(batch)
                    if not batch:
                        continue
                for r in batch:
                    if rpm is not None:
                        await rpm.acquire(1)
                    if tpm is not None:
                        await tpm.acquire(r.estimated_prompt_tokens() + r.max_tokens)
                try:
                    if len(batch) == 1 and batch_size == 1:
                        done = [await self._call_one(batch[0], backend, report, batch_prices)]
                    else:
                        done = await self._call_batch(batch, backend, report, batch_prices)
                finally:
                    reserved[0] -= held
                for r, c in zip(batch, done, strict=True):
                    results[r.key] = c
                    if progress is not None:
                        progress(report)

        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.cache.flush()

    def _observe(self, error: BackendError | None, backend: Backend) -> None:
        """Count one attempt; raise :class:`EndpointError` once failures pass ``max_error_rate``."""
        if error is not None and (error.status == 429 or error.retry_after is not None):
            return  # the server is alive and asked us to wait: not a failure of the endpoint
        self._outcomes.append(error is not None)
        if error is not None:
            self.last_error = redact(error)
        window = self._outcomes
        if len(window) == window.maxlen and sum(window) / len(window) > self.config.max_error_rate:
            raise EndpointError(
                f"{endpoint_of(backend)} failed {sum(window)} of the last {len(window)} attempts "
                f"(over --max-error-rate {self.config.max_error_rate}); last error: {self.last_error}. "
                "Check the server and --base-url, or raise --max-error-rate"
            )

    def _finish(
        self, r: Request, c: Completion, attempts: int, report: RunReport, batch_prices: bool = False
    ) -> Completion:
        c.key = r.key
        c.model, c.stage = r.model, r.stage
        c.template_id, c.template_version = r.template_id, r.template_version
        c.attempts = attempts
        c.timestamp = time.time()
        if not all(_plausible(n) for n in (c.prompt_tokens, c.completion_tokens)):
            # The reply may still be good; its bill is not. Counted, and never summed as sent.
            report.usage_anomalies += 1
            logger.warning(
                "%s: implausible usage from %s (prompt %r, completion %r); counted as 0",
                r.key[:12],
                r.model,
                c.prompt_tokens,
                c.completion_tokens,
            )
            c.prompt_tokens = c.prompt_tokens if _plausible(c.prompt_tokens) else 0
            c.completion_tokens = c.completion_tokens if _plausible(c.completion_tokens) else 0
        self.cache.put(c)
        if c.ok:
            report.succeeded += 1
            report.add_usage(r.model, c, self.prices, batch=batch_prices)
        elif c.error_kind == "permanent":
            report.permanent_errors += 1
        else:
            report.transient_errors += 1
        return c

    def _failure(self, r: Request, e: BackendError) -> Completion:
        return Completion(
            # Stored in the cache: whatever a backend or server echoed, no credential goes with it.
            key=r.key,
            error=redact(e, limit=None),
            error_kind="permanent" if e.kind == "permanent" else "transient",
        )

    async def _call_one(
        self, r: Request, backend: Backend, report: RunReport, batch_prices: bool = False
    ) -> Completion:
        # Another process on this cache may have the same request in flight: wait for its reply.
        wait = 0.05
        while (lease := self.cache.try_lease(r.key)) is None:
            await asyncio.sleep(wait)
            wait = min(wait * 2, 1.0)
        if isinstance(lease, Completion):
            lease.from_cache = True
            report.cache_hits += 1
            return lease
        c: Completion | None = None
        try:
            c = await self._call_leased(r, backend, report, batch_prices)
            return c
        finally:
            lease.release(c)

    async def _call_leased(
        self, r: Request, backend: Backend, report: RunReport, batch_prices: bool = False
    ) -> Completion:
        report.calls += 1
        attempt = 0
        while True:
            attempt += 1
            report.attempts += 1
            try:
                c = await backend.complete(r)
            except BackendError as e:
                self._observe(e, backend)
                if e.kind == "permanent" or not self.backoff.retry(attempt):
                    return self._finish(r, self._failure(r, e), attempt, report, batch_prices)
                report.retries += 1
                delay = await self.backoff.asleep(attempt, e.retry_after)
                logger.debug("retried %s after %.2fs: %s", r.key[:12], delay, e)
                continue
            self._observe(None, backend)
            return self._finish(r, c, attempt, report, batch_prices)

    async def _call_batch(
        self, batch: list[Request], backend: Backend, report: RunReport, batch_prices: bool = False
    ) -> list[Completion]:
        report.calls += len(batch)
        done: dict[str, Completion] = {}
        pending = list(batch)
        attempt = 0
        while pending:
            attempt += 1
            report.attempts += len(pending)
            outcomes = await backend.complete_batch(pending)
            retry = []
            for r, out in zip(pending, outcomes, strict=True):
                self._observe(out if isinstance(out, BackendError) else None, backend)
                if isinstance(out, BackendError):
                    if out.kind == "permanent" or not self.backoff.retry(attempt):
                        done[r.key] = self._finish(r, self._failure(r, out), attempt, report, batch_prices)
                    else:
                        retry.append(r)
                else:
                    done[r.key] = self._finish(r, out, attempt, report, batch_prices)
            if retry:
                report.retries += len(retry)
                await self.backoff.asleep(attempt)
            pending = retry
        return [done[r.key] for r in batch]
