"""``openai-batch:MODEL``: the OpenAI Batch API (half price, a 24 h window, its own rate limits).

The engine hands this backend every cache miss at once. It writes them as JSONL batch files (one line
per request, ``custom_id`` = the request's cache key), split under the provider's limits on requests
and bytes, uploads each file (``POST /v1/files``, purpose ``batch``), creates a batch per file and
polls them. Output and error files are kept beside the batch files in the cache folder::

    <cache>/batches/<model>-<digest>.jsonl          a batch input file (also what `vllm run-batch` reads)
    <cache>/batches/<model>-<digest>.index.json     custom_id -> stage and template, for ingestion
    <cache>/batches/state/<batch id>.json            the recorded batch: its file, ids, status
    <cache>/batches/<batch id>.output.jsonl          what the provider answered
    <cache>/batches/<batch id>.error.jsonl           what failed or expired

A batch is recorded before it is polled, so a killed run resumes polling it instead of submitting it
again. Requests that a batch leaves unfinished (expired, failed, missing from a lying output file)
come back to the engine as transient errors; the engine's next attempt submits a batch of those only.
A results line that cannot be read is counted and logged, never raised.

>>> line = ('{"custom_id": "' + "a" * 64 + '", "response": {"status_code": 200, "body": {"choices": '
...         '[{"message": {"content": "A cat."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, '
...         '"completion_tokens": 3}}}, "error": null}')
>>> key, out = parse_result_line(line)
>>> out.reply, out.prompt_tokens
('A cat.', 9)
>>> parse_result_line("<html>")
(None, 'bad_json')
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from viscon_hub.engine.backends.base import BackendError, BaseBackend, ImageLoader
from viscon_hub.engine.backends.openai_backend import _FATAL_STATUS, _PERMANENT_STATUS, chat_body
from viscon_hub.engine.request import Completion, Request
from viscon_hub.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
_KEY = re.compile(r"[0-9a-f]{64}")


class BatchFilesWritten(Exception):  # noqa: N818 - a signal that stops the run, not a failure
    """Raised by a ``--batch-file-only`` backend once its batch files are written: the run stops there."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(f"wrote {len(paths)} batch file(s)")
        self.paths = paths


class OpenAIBatchBackend(BaseBackend):
    """Batch API calls; see the module docstring. ``file_only`` writes the files and stops."""

    name = "openai-batch"
    max_batch = 1 << 40  # every miss in one call: the batch files are split here, under the limits
    price_tier = "batch"

    def __init__(
        self,
        model: str,
        *,
        image_loader: ImageLoader,
        batch_dir: str | os.PathLike[str],
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
        poll_interval_s: float = 60.0,
        max_wait_s: float = 26 * 3600.0,
        file_only: bool = False,
    ) -> None:
        if max_requests < 1 or max_bytes < 1024:
            raise ConfigError(
                f"--batch-max-requests must be >= 1 and --batch-max-bytes >= 1024; "
                f"got {max_requests} and {max_bytes}"
            )
        if poll_interval_s <= 0:
            raise ConfigError(f"--batch-poll-interval must be > 0 seconds; got {poll_interval_s}")
        self.model = model
        self.image_loader = image_loader
        self.folder = Path(batch_dir)
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.poll_interval_s = poll_interval_s
        # Past the provider's 24 h window a batch still "in progress" is a server that lies: stop
        # waiting, keep it recorded (a later run polls it again) and report its requests unfinished.
        self.max_wait_s = max_wait_s
        self.file_only = file_only
        self.counts: Counter[str] = Counter()
        self._online = None
        if not file_only:
            from viscon_hub.engine.backends.openai_backend import OpenAIBackend

            self._online = OpenAIBackend(
                model, image_loader=image_loader, base_url=base_url, api_key=api_key, timeout_s=timeout_s
            )

    # -- the engine's protocol ------------------------------------------------------------------
    async def complete(self, request: Request) -> Completion:
        out = (await self.complete_batch([request]))[0]
        if isinstance(out, BackendError):
            raise out
        return out

    async def complete_batch(self, requests: list[Request]) -> list[Completion | BackendError]:
        wanted = {r.key: r for r in requests}
        results: dict[str, Completion | BackendError] = {}
        open_states = (
            [] if self.file_only else [s for s in self.recorded() if set(s["custom_ids"]) & set(wanted)]
        )
        covered = {k for s in open_states for k in s["custom_ids"]}
        if open_states:
            self.counts["batches_resumed"] += len(open_states)
            logger.info("resuming %d recorded batch(es) instead of resubmitting", len(open_states))
        todo = [r for r in wanted.values() if r.key not in covered]
        files = self.write_files(todo, results)
        if self.file_only:
            raise BatchFilesWritten([str(p) for p in files])
        for path in files:
            state = await self._submit(path, results)
            if state is not None:
                open_states.append(state)
        await self._poll(open_states, wanted, results)
        for key in wanted:
            if key not in results:
                self.counts["unfinished"] += 1
                results[key] = BackendError("unfinished in its batch; resubmitting", kind="transient")
        return [results[r.key] for r in requests]

    async def end_loop(self) -> None:
        if self._online is not None:
            await self._online.end_loop()

    async def aclose(self) -> None:
        if self._online is not None:
            await self._online.aclose()

    # -- files ----------------------------------------------------------------------------------
    def write_files(
        self, requests: Sequence[Request], results: dict[str, Completion | BackendError] | None = None
    ) -> list[Path]:
        """Write ``requests`` as batch input files under the limits; too-large lines become errors."""
        self.folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        lines: list[bytes] = []
        index: dict[str, list] = {}
        size = 0

        def close() -> None:
            nonlocal lines, index, size
            if lines:
                paths.append(self._write_file(lines, index))
            lines, index, size = [], {}, 0

        for r in requests:
            line = batch_line(self.model, r, self.image_loader)
            if len(line) > self.max_bytes:
                self.counts["request_over_max_bytes"] += 1
                if results is not None:
                    results[r.key] = BackendError(
                        f"a request of {len(line)} bytes exceeds --batch-max-bytes {self.max_bytes}",
                        kind="permanent",
                    )
                continue
            if len(lines) >= self.max_requests or size + len(line) > self.max_bytes:
                close()
            lines.append(line)
            index[r.key] = [r.stage, r.model, r.template_id, r.template_version]
            size += len(line)
        close()
        self.counts["files_written"] += len(paths)
        return paths

    def _write_file(self, lines: list[bytes], index: dict[str, list]) -> Path:
        data = b"".join(lines)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model)[:60]
        path = self.folder / f"{slug}-{hashlib.sha256(data).hexdigest()[:16]}.jsonl"
        _write_atomic(path, data)
        _write_atomic(path.with_suffix(".index.json"), json.dumps(index).encode())
        return path

    # -- state ----------------------------------------------------------------------------------
    def recorded(self) -> list[dict[str, Any]]:
        """Recorded batches not yet collected (a killed run's batches)."""
        out = []
        for path in sorted((self.folder / "state").glob("*.json")):
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
                if state["status"] != "done" and isinstance(state["custom_ids"], list):
                    out.append(state)
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("ignoring an unreadable batch record %s: %s", path, e)
        return out

    def _record(self, state: dict[str, Any]) -> None:
        path = self.folder / "state" / f"{_safe(state['batch_id'])}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(state, indent=1).encode())

    # -- the API --------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._online is None:
            raise ConfigError(
                "openai-batch backend: file_only=True writes batch files and calls no API; "
                "run without --batch-file-only to submit them"
            )
        return self._online

    async def _submit(self, path: Path, results: dict) -> dict[str, Any] | None:
        online = self._client()
        client = online.client
        openai = online._openai
        data = path.read_bytes()
        keys = [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]
        try:
            uploaded = await client.files.create(file=(path.name, data), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id,
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata={"viscon_file": path.name},
            )
        except openai.APIStatusError as e:
            message = self._online._clean(f"batch submit HTTP {e.status_code}: {str(e)[:200]}")
            if e.status_code in _FATAL_STATUS:
                raise ConfigError(f"openai-batch backend: {message}") from None
            kind = "permanent" if e.status_code in _PERMANENT_STATUS and e.status_code != 413 else "transient"
            self.counts["submit_errors"] += 1
            for k in keys:
                results[k] = BackendError(message, kind=kind, status=e.status_code)
            return None
        except (openai.APIConnectionError, openai.APITimeoutError, openai.APIResponseValidationError) as e:
            self.counts["submit_errors"] += 1
            for k in keys:
                results[k] = BackendError(self._online._clean(f"batch submit: {e}"[:300]), kind="transient")
            return None
        state = {
            "batch_id": str(batch.id),
            "input_file": path.name,
            "input_file_id": str(uploaded.id),
            "model": self.model,
            "custom_ids": keys,
            "status": "submitted",
        }
        self._record(state)
        self.counts["batches_submitted"] += 1
        logger.info("submitted batch %s (%d requests, %d bytes)", batch.id, len(keys), len(data))
        return state

    async def _poll(self, states: list[dict[str, Any]], wanted: dict, results: dict) -> None:
        openai = self._online._openai if self._online is not None else None
        pending = list(states)
        started = time.monotonic()
        while pending:
            still = []
            for state in pending:
                try:
                    batch = await self._online.client.batches.retrieve(state["batch_id"])
                except openai.APIStatusError as e:
                    if e.status_code in (401, 403):
                        raise ConfigError(
                            f"openai-batch backend: HTTP {e.status_code} polling a batch"
                        ) from None
                    if e.status_code == 404:  # the provider forgot it: its requests go out again
                        self.counts["batches_lost"] += 1
                        self._done(state, "lost")
                        continue
                    still.append(state)
                    continue
                except (openai.APIConnectionError, openai.APITimeoutError, openai.APIResponseValidationError):
                    self.counts["poll_errors"] += 1
                    still.append(state)
                    continue
                self.counts["polls"] += 1
                status = getattr(batch, "status", None)
                if status not in TERMINAL:
                    still.append(state)
                    continue
                await self._collect(state, batch, wanted, results)
            pending = still
            if pending and time.monotonic() - started > self.max_wait_s:
                self.counts["batches_waited_out"] += len(pending)
                logger.warning(
                    "%d batch(es) still unfinished after %.0f s; left recorded", len(pending), self.max_wait_s
                )
                return
            if pending:
                await asyncio.sleep(self.poll_interval_s)

    async def _collect(self, state: dict, batch: Any, wanted: dict, results: dict) -> None:
        status = str(batch.status)
        self.counts[f"batches_{status}"] += 1
        for kind in ("output", "error"):
            file_id = getattr(batch, f"{kind}_file_id", None)
            if not file_id:
                continue
            try:
                content = await self._online.client.files.content(file_id)
                data = content.content
            except (self._online._openai.APIError, ValueError) as e:
                self.counts["download_errors"] += 1
                logger.warning("could not download the %s file of batch %s: %s", kind, batch.id, e)
                continue
            path = self.folder / f"{_safe(state['batch_id'])}.{kind}.jsonl"
            _write_atomic(path, data)
            self._read_results(data.decode("utf-8", errors="replace").splitlines(), wanted, results)
        self._done(state, status)

    def _read_results(self, lines: Iterable[str], wanted: dict, results: dict) -> None:
        for line in lines:
            if not line.strip():
                continue
            key, out = parse_result_line(line)
            if key is None:
                self.counts[f"result_{out}"] += 1
                continue
            if key not in wanted:
                self.counts["result_unknown_custom_id"] += 1
                continue
            if isinstance(results.get(key), Completion):
                self.counts["result_duplicate"] += 1
                continue
            if isinstance(out, BackendError) and out.kind == "transient":
                self.counts["result_transient"] += 1
                continue  # left unfinished: the engine's next attempt resubmits it
            results[key] = out

    def _done(self, state: dict, status: str) -> None:
        state["status"] = "done"
        state["batch_status"] = status
        self._record(state)


def batch_line(model: str, request: Request, image_loader: ImageLoader) -> bytes:
    """One batch input line: ``custom_id`` is the request's cache key, ``body`` the online call's body."""
    item = {
        "custom_id": request.key,
        "method": "POST",
        "url": ENDPOINT,
        "body": chat_body(model, request, image_loader),
    }
    return json.dumps(item, ensure_ascii=False).encode("utf-8") + b"\n"


def parse_result_line(line: str | bytes) -> tuple[str | None, Completion | BackendError | str]:
    """``(custom_id, Completion or BackendError)`` for a results line, or ``(None, drop reason)``.

    Reads the OpenAI batch output format, which ``vllm run-batch`` also writes.
    """
    try:
        item = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "bad_json"
    if not isinstance(item, dict):
        return None, "not_an_object"
    key = item.get("custom_id")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        return None, "bad_custom_id"
    error = item.get("error")
    response = item.get("response")
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        return key, BackendError(f"batch error: {str(code or error)[:200]}", kind="transient")
    if not isinstance(response, dict):
        return None, "no_response"
    status = response.get("status_code")
    body = response.get("body")
    if not isinstance(status, int) or isinstance(status, bool):
        return None, "bad_status_code"
    if status != 200:
        kind = "permanent" if status in _PERMANENT_STATUS else "transient"
        return key, BackendError(f"HTTP {status} in batch", kind=kind, status=status)
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, "bad_body"
    if not isinstance(content, str):
        return None, "bad_body"
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return key, Completion(
        key=key,
        reply=content,
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def ingest_results(
    path: str | os.PathLike[str], cache: Any, *, index_dir: str | os.PathLike[str] | None = None
) -> Counter:
    """Store the replies of a results file (OpenAI batch output / ``vllm run-batch``) in ``cache``.

    Successes and permanent errors are stored; unreadable lines are counted by reason.
    ``index_dir`` (the cache's ``batches/`` folder) supplies each key's stage and template.
    """
    index: dict[str, list] = {}
    if index_dir is not None:
        for p in sorted(Path(index_dir).glob("*.index.json")):
            try:
                index.update(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                logger.warning("ignoring an unreadable batch index %s: %s", p, e)
    counts: Counter[str] = Counter()
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"--batch-results {path}: cannot read it ({e}); expected a JSONL results file"
        ) from None
    for line in raw.splitlines():
        if not line.strip():
            continue
        counts["lines"] += 1
        key, out = parse_result_line(line)
        if key is None:
            counts[f"dropped_{out}"] += 1
            continue
        if isinstance(out, BackendError):
            if out.kind != "permanent":
                counts["dropped_transient"] += 1
                continue
            out = Completion(key=key, error=str(out), error_kind="permanent")
        meta = index.get(key)
        if isinstance(meta, list) and len(meta) == 4:
            out.stage, out.model, out.template_id, out.template_version = (
                meta[0],
                meta[1],
                meta[2],
                int(meta[3]),
            )
        cache.put(out)
        counts["stored"] += 1
    cache.flush()
    return counts


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
