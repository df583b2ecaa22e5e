"""Publishing to the Hub: a built dataset (``push``), a tagged release (``release``), the engine cache.

A push stages what the repo should hold (configs, card, plots, build info, optional exports),
compares it with what the repo holds (LFS sha256 or git blob id per file) and commits only the
difference, at most :data:`MAX_FILES_PER_COMMIT` operations per commit. Pushing the same data again
makes no commit. 429 and 412 answers are retried with backoff (a 412 means the branch moved under
us: the difference is computed again).

Tokens come from ``HF_TOKEN`` or the huggingface_hub login, are passed to the client only, and are
scrubbed from every error this module raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from viscon_hub.build.layout import (
    ALL_CONFIGS,
    BUILD_INFO,
    DEFAULT_MAX_SHARD_SIZE,
    MIXES,
    NON_CONTEXTUAL_MIXES,
    SPLITS,
    config_mix,
    data_files,
    data_glob,
    shard_files,
    shard_glob,
)
from viscon_hub.errors import ConfigError, VisconError, redact
from viscon_hub.retry import Backoff, parse_retry_after

logger = logging.getLogger(__name__)

MAX_FILES_PER_COMMIT = 100
BACKOFF_BASE_S = 1.0  # doubled per attempt, capped at 30 s; a Retry-After header wins
PUSH_FORMATS = ("idefics", "llava")
LFS_SUFFIXES = (".parquet", ".png", ".tar", ".jpg", ".jpeg", ".webp", ".bin")
T = TypeVar("T")


class HubError(VisconError):
    """The Hub refused or failed an operation (after retries)."""


@dataclass(slots=True)
class PushReport:
    repo: str
    revision: str
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    commits: list[str] = field(default_factory=list)
    retries: int = 0
    tag: str | None = None
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token(token: str | None, *, required: bool = False, what: str = "this command") -> str | None:
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if required and not token:
        raise ConfigError(
            f"{what} needs a Hugging Face token with write access: export HF_TOKEN=hf_... "
            "(from https://huggingface.co/settings/tokens) or run `hf auth login`"
        )
    return token


def _retrying(
    action: Callable[[], T],
    *,
    what: str,
    token: str | None,
    report: PushReport | None,
    attempts: int = 6,
    passthrough: tuple[type[BaseException], ...] = (),
) -> T:
    """Run ``action``, retrying 429 / 5xx (honouring Retry-After), 412 and lost connections.

    Errors in ``passthrough`` (e.g. "revision not found", which callers expect) are raised as they
    are; any other failure becomes one :class:`HubError` line that says what to do.
    """
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    # The HTTP client's own base error (httpx's HTTPError, whichever httpx the Hub client uses) also
    # covers connection failures, which never get an HTTP status.
    transport = tuple(b for b in HfHubHTTPError.__mro__[1:] if b.__name__ == "HTTPError")
    # Read at call time: tests shorten BACKOFF_BASE_S. A Retry-After is obeyed up to 60 base delays.
    backoff = Backoff(
        base_s=BACKOFF_BASE_S,
        max_s=max(30.0, BACKOFF_BASE_S),
        max_attempts=attempts,
        retry_after_max_s=60.0 * BACKOFF_BASE_S,
    )
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except passthrough:
            raise
        except HFValidationError as e:
            raise ConfigError(redact(f"{what}: {e}", secrets=[token], limit=None)) from None
        except (HfHubHTTPError, OSError, *transport) as e:
            response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
            status = getattr(response, "status_code", None)
            lost = not isinstance(e, HfHubHTTPError) or response is None  # no answer at all
            retryable = lost or status in (412, 429) or (status is not None and status >= 500)
            if not retryable or not backoff.retry(attempt):
                raise HubError(_hub_message(what, status, e, token)) from None
            delay = backoff.delay(attempt, parse_retry_after(getattr(response, "headers", None)))
            if report is not None:
                report.retries += 1
            logger.info("%s: %s, retrying in %.1fs", what, f"HTTP {status}" if status else "no answer", delay)
            time.sleep(delay)


def _hub_message(what: str, status: int | None, error: BaseException, token: str | None) -> str:
    """One line: what failed, why, and the fix where there is an obvious one."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if status is None:
        fix = "no answer from the Hub; check the network and HF_ENDPOINT"
    elif status == 401:
        fix = "the token was refused; export HF_TOKEN=hf_... or run `hf auth login`"
    elif status == 403:
        fix = "the token may not write there; use a token with write access to that org"
    elif status == 404:
        fix = "check --repo and --revision"
    else:
        fix = f"HTTP {status}"
    return redact(f"{what} failed: {first} ({fix})", secrets=[token], limit=None)


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same(local: Path, remote: Any) -> bool:
    if remote is None or remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == _sha256(local)
    return remote.blob_id == _git_blob_sha1(local)


def _files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != _OWNER
    }


def sync_folder(
    *,
    folder: Path,
    repo: str,
    revision: str,
    token: str | None,
    managed: Callable[[str], bool],
    message: str,
    report: PushReport,
    dry_run: bool = False,
) -> PushReport:
    """Make the repo's files under ``managed`` paths equal ``folder``'s, in commits of <= 100 files."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    local = _files(folder)
    while True:
        head = _head(api, repo, revision, token, report=report)
        remote = {}
        if head is not None:
            entries = _retrying(
                lambda head=head: list(
                    api.list_repo_tree(repo, repo_type="dataset", revision=head, recursive=True, token=token)
                ),
                what=f"list files of {repo}@{revision}",
                token=token,
                report=report,
            )
            for entry in entries:
                if hasattr(entry, "blob_id"):
                    remote[entry.path] = entry
        adds = [p for p, f in local.items() if not _same(f, remote.get(p))]
        deletes = sorted(p for p in remote if p not in local and managed(p))
        report.added, report.deleted = adds, deletes
        report.unchanged = len(local) - len(adds)
        if dry_run or not (adds or deletes):
            return report
        ops: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local[p])) for p in adds]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
        # Small text files (README, build info) go last, so a half-finished push never shows a card
        # that names configs whose data has not landed yet.
        ops.sort(key=lambda op: (op.path_in_repo in ("README.md", BUILD_INFO), op.path_in_repo))
        chunks = [ops[i : i + MAX_FILES_PER_COMMIT] for i in range(0, len(ops), MAX_FILES_PER_COMMIT)]
        try:
            parent = head
            for n, chunk in enumerate(chunks, 1):
                suffix = f" ({n}/{len(chunks)})" if len(chunks) > 1 else ""
                info = _retrying(
                    lambda chunk=chunk, parent=parent, suffix=suffix: api.create_commit(
                        repo,
                        chunk,
                        commit_message=message + suffix,
                        repo_type="dataset",
                        revision=revision,
                        parent_commit=parent,
                        token=token,
                    ),
                    what=f"commit to {repo}@{revision}",
                    token=token,
                    report=report,
                    attempts=4,
                )
                parent = info.oid
                report.commits.append(info.oid)
            return report
        except HubError as e:
            if "HTTP 412" not in str(e):
                raise
            # The branch moved (someone else pushed): recompute the difference against the new head.
            report.retries += 1
            logger.info("branch %s of %s moved; recomputing the push", revision, repo)


def _head(
    api: Any, repo: str, revision: str, token: str | None, *, report: PushReport | None = None
) -> str | None:
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = _retrying(
            lambda: api.dataset_info(repo, revision=revision, token=token),
            what=f"look up {repo}@{revision}",
            token=token,
            report=report,
            passthrough=(RevisionNotFoundError,),
        )
    except RevisionNotFoundError:
        return None
    return info.sha


def _ensure_repo(
    api: Any, repo: str, revision: str, *, private: bool, token: str | None, report: PushReport
) -> None:
    _retrying(
        lambda: api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True, token=token),
        what=f"create {repo}",
        token=token,
        report=report,
    )
    if revision != "main":
        _retrying(
            lambda: api.create_branch(repo, branch=revision, repo_type="dataset", exist_ok=True, token=token),
            what=f"create branch {revision}",
            token=token,
            report=report,
        )


def _check_repo_id(repo: str) -> str:
    """``ORG/NAME`` as the Hub spells it; anything else (``org/..``, ``org/n?x=1``) is a clear error.

    >>> _check_repo_id("org/name")
    'org/name'
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = repo.split("/") if isinstance(repo, str) else []
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--repo must be ORG/NAME; got {repo!r}")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ConfigError(
            f"--repo must be ORG/NAME with letters, digits, '-', '_' or '.' (not starting or ending with "
            f"'-' or '.', no '..'); got {repo!r}"
        ) from None
    return repo


def _built_configs(dataset: Path) -> list[str]:
    info_path = dataset / BUILD_INFO
    if not info_path.is_file():
        raise ConfigError(f"{dataset} holds no {BUILD_INFO}: run `viscon build` first")
    info = json.loads(info_path.read_text())
    configs = info.get("configs") or []
    rows = info.get("rows") or {}
    shards = info.get("shards") or {}
    missing = []
    for c in configs:
        for s in SPLITS:
            found = len(data_files(dataset, c, s))
            expected = shards.get(c, {}).get(s) or 1  # a build before shards wrote one file per split
            if rows.get(c, {}).get(s) and found != expected:
                missing.append(f"{data_glob(c, s)} ({found} of {expected} shards)")
    if missing or not configs:
        raise ConfigError(f"{dataset} is incomplete (missing {missing[:3]}); run `viscon build` again")
    return [c for c in ALL_CONFIGS if c in configs]


def stage_push(
    dataset: str | os.PathLike[str],
    staging: Path,
    *,
    repo: str,
    formats: Iterable[str] = (),
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> list[dict[str, Any]]:
    """Lay out in ``staging`` everything a push uploads; return the extra config entries of exports.

    The IDEFICS export of each mix is uploaded as shards of at most ``max_shard_size`` bytes.
    """
    from viscon_hub.publish.card import make_card

    root = Path(dataset)
    configs = _built_configs(root)
    formats = tuple(formats)
    for f in formats:
        if f not in PUSH_FORMATS:
            raise ConfigError(f"--formats takes {', '.join(PUSH_FORMATS)}; got {f!r}")
    for c in configs:
        for s in SPLITS:
            for path in data_files(root, c, s):
                _link(root / path, staging / path)
    for name in (BUILD_INFO, "stats.json"):
        if (root / name).is_file():
            _link(root / name, staging / name)
    mixes = [c for c in configs if config_mix(c) is not None]
    extra_configs: list[dict[str, Any]] = []
    exports: dict[str, Any] = {}
    if formats:
        from viscon_hub.publish.exports import export
        from viscon_hub.publish.exports.idefics import idefics_config_name

        with _staging("viscon-export-") as tmp:
            for c in mixes:
                if "idefics" in formats:
                    out = Path(tmp, "idefics", c)
                    summary = export(
                        dataset=str(root),
                        config=c,
                        format="idefics",
                        output=str(out),
                        max_shard_size=max_shard_size,
                    )
                    name = idefics_config_name(c)
                    for path in summary["files"]:
                        _link(out / path, staging / path)
                    # A glob per split, as the built configs declare: whatever shards a push uploads.
                    entry = {
                        "config_name": name,
                        "data_files": [
                            {"split": s, "path": f"{name}/{shard_glob(s)}"}
                            for s in SPLITS
                            if shard_files(out / name, s)
                        ],
                    }
                    extra_configs.append(entry)
                if "llava" in formats:
                    out = Path(tmp, "llava", c)
                    export(dataset=str(root), config=c, format="llava", output=str(out))
                    for js in sorted(out.glob("*.json")):
                        _link(js, staging / "llava" / c / js.name)
                    _tar(out / "images", staging / "llava" / c / "images.tar")
            exports = {
                "formats": list(formats),
                "idefics_configs": [e["config_name"] for e in extra_configs],
                "llava": {c: sorted(p.name for p in (staging / "llava" / c).iterdir()) for c in mixes}
                if "llava" in formats
                else {},
            }
    card = make_card(root, repo_id=repo, extra_configs=extra_configs or None, exports=exports or None)
    (staging / "README.md").write_text(str(card), encoding="utf-8")
    plots = root / "plots"
    if plots.is_dir():
        for png in sorted(plots.glob("*.png")):
            _link(png, staging / "plots" / png.name)
    return extra_configs


_OWNER = ".viscon-owner"


@contextmanager
def _staging(prefix: str) -> Iterator[str]:
    """A temporary folder marked with this process's id; a killed run's folder is removed by the next run."""
    _sweep_stale(prefix)
    folder = tempfile.mkdtemp(prefix=prefix)
    Path(folder, _OWNER).write_text(str(os.getpid()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sweep_stale(prefix: str) -> None:
    """Remove ``prefix*`` folders whose owner process is gone (a push killed mid-way)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid = int((folder / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being set up: leave it
        if pid != os.getpid() and not _alive(pid):
            logger.info("removing %s, left by a stopped run (pid %d)", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _tar(folder: Path, target: Path) -> None:
    """A tar of ``folder`` that is byte-identical for the same files (sorted, no times or owners)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(f"images/{path.relative_to(folder).as_posix()}")
            info.size = path.stat().st_size
            info.mtime = 0
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)


def _managed(path: str) -> bool:
    """Paths a push owns in the repo (others, e.g. a hand-written file, are left alone)."""
    top = path.split("/", 1)[0]
    known = set(ALL_CONFIGS) | {f"{m}_idefics" for m in MIXES + NON_CONTEXTUAL_MIXES}
    return top in known or top in ("plots", "llava") or path in ("README.md", BUILD_INFO, "stats.json")


def push(
    *,
    dataset: str | os.PathLike[str],
    repo: str,
    revision: str | None = None,
    private: bool = False,
    formats: Iterable[str] = (),
    token: str | None = None,
    dry_run: bool = False,
    message: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> PushReport:
    """Upload every config (train and test Parquet, images embedded), the card and its plots.

    ``formats`` adds exports of each mix; the Parquet ones go up as shards of at most
    ``max_shard_size`` bytes (default 500MB, as ``push_to_hub``).

    >>> push(dataset="viscon", repo="org/viscon")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    repo = _check_repo_id(repo)
    revision = revision or "main"
    token = _token(token, required=not dry_run, what="viscon push")
    report = PushReport(repo=repo, revision=revision, dry_run=dry_run)
    with _staging("viscon-push-") as tmp:
        staging = Path(tmp)
        stage_push(dataset, staging, repo=repo, formats=formats, max_shard_size=max_shard_size)
        api = HfApi(token=token)
        if not dry_run:
            _ensure_repo(api, repo, revision, private=private, token=token, report=report)
        elif _repo_missing(api, repo, token):
            report.added = sorted(_files(staging))
            return report
        return sync_folder(
            folder=staging,
            repo=repo,
            revision=revision,
            token=token,
            managed=_managed,
            message=message or "Upload dataset with viscon-hub",
            report=report,
            dry_run=dry_run,
        )


def _repo_missing(api: Any, repo: str, token: str | None) -> bool:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        _retrying(
            lambda: api.dataset_info(repo, token=token),
            what=f"look up {repo}",
            token=token,
            report=None,
            passthrough=(RepositoryNotFoundError,),
        )
    except RepositoryNotFoundError:
        return True
    return False


def release(
    *,
    dataset: str | os.PathLike[str],
    repo: str,
    version: str,
    revision: str | None = None,
    private: bool = False,
    formats: Iterable[str] = (),
    token: str | None = None,
    dry_run: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> PushReport:
    """Push, then tag the resulting Hub revision ``vX.Y.Z``; refuse a version that is already tagged."""
    from huggingface_hub import HfApi

    tag = _tag_name(version)
    repo = _check_repo_id(repo)
    token = _token(token, required=not dry_run, what="viscon release")
    api = HfApi(token=token)
    if not _repo_missing(api, repo, token):
        refs = _retrying(
            lambda: api.list_repo_refs(repo, repo_type="dataset", token=token),
            what=f"list refs of {repo}",
            token=token,
            report=None,
        )
        if any(t.name == tag for t in refs.tags):
            raise ConfigError(f"{repo} already has a release {tag}; choose a new version")
    report = push(
        dataset=dataset,
        repo=repo,
        revision=revision,
        private=private,
        formats=formats,
        token=token,
        dry_run=dry_run,
        message=f"Release {tag}",
        max_shard_size=max_shard_size,
    )
    report.tag = tag
    if dry_run:
        return report
    head = _head(api, repo, report.revision, token)
    _retrying(
        lambda: api.create_tag(
            repo,
            tag=tag,
            revision=head,
            repo_type="dataset",
            tag_message=f"viscon release {tag}",
            token=token,
        ),
        what=f"tag {tag}",
        token=token,
        report=report,
    )
    return report


def _tag_name(version: str) -> str:
    v = version.removeprefix("v")
    parts = v.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"--version must be X.Y.Z (e.g. 1.0.0); got {version!r}")
    return f"v{v}"


# -- the engine cache on the Hub -----------------------------------------------------------------


def cache_push(
    *, cache: str, repo: str, revision: str | None = None, private: bool = False, token: str | None = None
) -> PushReport:
    """Upload a local cache's Parquet shards (journals folded first); shards already there are skipped."""
    from huggingface_hub import HfApi

    from viscon_hub.engine import GenerationCache

    repo = _check_repo_id(repo)
    revision = revision or "main"
    token = _token(token, required=True, what="viscon cache push")
    root = Path(cache)
    if not root.is_dir():
        raise ConfigError(f"--cache {cache!r} is not a local cache folder")
    GenerationCache(cache).close()  # folds journals of finished runs into shards
    shards = root / "shards"
    report = PushReport(repo=repo, revision=revision)
    api = HfApi(token=token)
    _ensure_repo(api, repo, revision, private=private, token=token, report=report)
    with _staging("viscon-cache-") as tmp:
        staging = Path(tmp)
        for shard in sorted(shards.glob("*.parquet")) if shards.is_dir() else []:
            _link(shard, staging / "shards" / shard.name)
        # Shards are append-only: never delete one that another writer pushed.
        return sync_folder(
            folder=staging,
            repo=repo,
            revision=revision,
            token=token,
            managed=lambda _p: False,
            message="Add generation cache shards",
            report=report,
        )


def cache_pull(
    *, cache: str, repo: str, revision: str | None = None, token: str | None = None
) -> dict[str, int]:
    """Download a Hub cache's shards into a local cache folder; shards present locally are kept."""
    from huggingface_hub import snapshot_download

    repo = _check_repo_id(repo)
    token = _token(token)
    target = Path(cache) / "shards"
    target.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in target.glob("*.parquet")}
    from huggingface_hub import HfApi

    # Resolve the revision first: snapshot_download quietly falls back to local files when the Hub
    # does not answer, which would report an empty pull as a success.
    head = _head(HfApi(token=token), repo, revision or "main", token)
    if head is None:
        raise ConfigError(f"{repo} has no revision {revision or 'main'!r}; check --revision")
    with _staging("viscon-pull-") as tmp:
        folder = _retrying(
            lambda: snapshot_download(
                repo,
                repo_type="dataset",
                revision=head,
                allow_patterns=["shards/*.parquet"],
                local_dir=tmp,
                token=token,
            ),
            what=f"download {repo}",
            token=token,
            report=None,
        )
        pulled = sorted(Path(folder, "shards").glob("*.parquet")) if Path(folder, "shards").is_dir() else []
        added = 0
        for shard in pulled:
            if shard.name not in before:
                tmp_target = target / f".{shard.name}.tmp"
                shutil.copyfile(shard, tmp_target)
                os.replace(tmp_target, target / shard.name)
                added += 1
    return {"shards_pulled": added, "shards_present": len(before), "shards_remote": len(pulled)}


__all__ = [
    "HubError",
    "PushReport",
    "cache_pull",
    "cache_push",
    "push",
    "release",
    "stage_push",
    "sync_folder",
]
