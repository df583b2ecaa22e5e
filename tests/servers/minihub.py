"""A local server speaking the parts of the Hub's HTTP API that publishing and loading datasets use.

The real ``huggingface_hub`` and ``datasets`` clients run against it (``HF_ENDPOINT``): repo
create/info, branches, tags, refs, preupload, the LFS batch API with basic transfers, NDJSON
commits with parent checks, tree listing, paths-info, resolve with HTTP Range, validate-yaml and
agent-harnesses. Files live in memory. Faults can be queued for commits (429 with Retry-After, 412,
500), and every request is logged (method, path, status, headers) for the tests to inspect.

Xet is not spoken: clients must run with ``HF_HUB_DISABLE_XET=1`` (the fixture sets it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".parquet", ".png", ".jpg", ".jpeg", ".tar", ".arrow", ".bin", ".zip", ".gz")
_REPO = r"(?P<type>dataset|model|space)s/(?P<repo>[^/]+/[^/]+)"


@dataclass
class _File:
    data: bytes
    lfs: bool

    @property
    def git_oid(self) -> str:
        if self.lfs:
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
            ).encode()
            return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class _Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, _File]


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> _Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(oid) if oid else None


class MiniHub:
    """The server. ``with MiniHub() as hub: ...`` or ``hub.start()`` / ``hub.stop()``."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.request_log: list[dict] = []
        self.faults: list[str] = []
        self.read_faults: list[str] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- control -----------------------------------------------------------------------------
    def start(self) -> MiniHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MiniHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_faults(self, faults: list[str]) -> None:
        """Answer the next commits with these statuses, in order: "429", "412" or "500"."""
        with self.lock:
            self.faults = list(faults)

    def set_read_faults(self, faults: list[str]) -> None:
        """Answer the next repo reads (info, tree, refs) with these statuses, in order: "429" or "500"."""
        with self.lock:
            self.read_faults = list(faults)

    def commits(self, repo: str, revision: str = "main", repo_type: str = "dataset") -> list[str]:
        """Commit messages from the tip of ``revision`` back to the first."""
        r = self.repos.get((repo_type, repo))
        c = r.resolve(revision) if r else None
        out = []
        while c is not None:
            out.append(c.message)
            c = r.commits.get(c.parent) if c.parent else None
        return out

    def files(self, repo: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        r = self.repos.get((repo_type, repo))
        c = r.resolve(revision) if r else None
        return {p: f.data for p, f in sorted(c.files.items())} if c else {}


class _Handler(BaseHTTPRequestHandler):
    server_hub: MiniHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the hub keeps its own log
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self,
        status: int,
        body: bytes | dict | list = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header(
            "Content-Length",
            str(len(body)) if "Content-Length" not in (headers or {}) else headers["Content-Length"],
        )
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.server_hub.request_log.append(
            {"method": self.command, "path": self.path, "status": status, "headers": dict(self.headers)}
        )

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _authed(self) -> bool:
        return (self.headers.get("Authorization") or "").startswith("Bearer ")

    def _repo(self, rtype: str, repo_id: str, head: bool = False) -> _Repo | None:
        r = self.server_hub.repos.get((rtype, repo_id))
        if r is None or (r.private and not self._authed()):
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            return None
        return r

    def _commit(self, r: _Repo, rev: str, head: bool = False) -> _Commit | None:
        c = r.resolve(unquote(rev))
        if c is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}", head=head)
        return c

    # -- verbs ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        hub = self.server_hub
        try:
            with hub.lock:
                self._dispatch(method, path, query)
        except Exception as e:  # noqa: BLE001 - a test server answers 500 rather than hanging the client
            self._error(500, "ServerError", f"{type(e).__name__}: {e}")

    def _dispatch(self, method: str, path: str, query: dict) -> None:
        hub = self.server_hub
        head = method == "HEAD"
        if method == "GET" and path.startswith("/api/datasets/") and hub.read_faults:
            with hub.lock:
                fault = hub.read_faults.pop(0) if hub.read_faults else None
            if fault == "429":
                return self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
            if fault is not None:
                return self._error(int(fault), "ServerError", "injected read failure")
        if path == "/api/agent-harnesses":
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if path == "/api/whoami-v2":
            if not self._authed():
                return self._error(401, "Unauthorized", "Invalid credentials")
            return self._send(
                200,
                {"type": "user", "name": "tester", "orgs": [], "auth": {"accessToken": {"role": "write"}}},
            )
        if path == "/api/validate-yaml" and method == "POST":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            rtype = payload.get("type") or "model"
            repo_id = (
                f"{payload['organization']}/{payload['name']}"
                if payload.get("organization")
                else payload["name"]
            )
            if not self._authed():
                return self._error(401, "Unauthorized", "You must be authenticated to create a repo")
            prefix = "" if rtype == "model" else f"{rtype}s/"
            if (rtype, repo_id) in hub.repos:
                # Like the Hub, the conflict answer still names the repo: create_repo(exist_ok=True) reads it.
                message = "You already created this repo"
                return self._send(
                    409,
                    {"error": message, "url": f"{self.endpoint}/{prefix}{repo_id}"},
                    {"X-Error-Code": "RepoExists", "X-Error-Message": message},
                )
            repo = _Repo(private=bool(payload.get("private")) or payload.get("visibility") == "private")
            first = _Commit(oid=_oid("init", repo_id), parent=None, message="initial commit", files={})
            repo.commits[first.oid] = first
            repo.branches["main"] = first.oid
            hub.repos[(rtype, repo_id)] = repo
            prefix = "" if rtype == "model" else f"{rtype}s/"
            return self._send(200, {"url": f"{self.endpoint}/{prefix}{repo_id}", "name": repo_id})
        if path.startswith("/lfs-upload/") and method == "PUT":
            oid = path.rsplit("/", 1)[1]
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "BadUpload", "sha256 mismatch")
            hub.lfs[oid] = data
            return self._send(200, b"")
        m = re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            return self._lfs_batch(json.loads(self._body()))
        m = re.fullmatch(rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if m and method == "GET":
            return self._info(m["type"], m["repo"], m["rev"] or "main")
        m = re.fullmatch(
            rf"/api/{_REPO}/(?P<op>preupload|commit|tree|paths-info|refs|tag|branch|commits)(?:/(?P<rev>[^/]+))?(?P<rest>/.*)?",
            path,
        )
        if m:
            return self._repo_op(
                method, m["type"], m["repo"], m["op"], m["rev"], unquote(m["rest"] or "").lstrip("/"), query
            )
        m = re.fullmatch(
            r"/(?:(?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path
        )
        if m and method in ("GET", "HEAD"):
            rtype = (m["t"] or "models")[:-1]
            return self._resolve(rtype, m["repo"], m["rev"], unquote(m["file"]), head)
        return self._error(404, "NotFound", f"no route for {method} {path}", head=head)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _info(self, rtype: str, repo_id: str, rev: str) -> None:
        r = self._repo(rtype, repo_id)
        if r is None:
            return
        c = self._commit(r, rev)
        if c is None:
            return
        self._send(
            200,
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": c.oid,
                "private": r.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(c.files)],
            },
        )

    def _entry(self, p: str, f: _File) -> dict:
        entry = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": p}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
        return entry

    def _dirs(self, c: _Commit) -> set[str]:
        out = set()
        for p in c.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    def _repo_op(
        self, method: str, rtype: str, repo_id: str, op: str, rev: str | None, rest: str, query: dict
    ) -> None:
        r = self._repo(rtype, repo_id)
        if r is None:
            return
        if op == "refs":

            def refs(kind: str, d: dict) -> list:
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid}
                    for n, oid in sorted(d.items())
                ]

            return self._send(
                200, {"branches": refs("heads", r.branches), "tags": refs("tags", r.tags), "converts": []}
            )
        if rev is None:
            return self._error(400, "BadRequest", "missing revision")
        if op == "branch" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            name = unquote(rev)
            if name in r.branches:
                return self._error(409, "BranchExists", f"branch {name} exists")
            start = r.resolve(payload.get("startingPoint") or "main")
            r.branches[name] = start.oid
            return self._send(200, {})
        if op == "tag" and method == "POST":
            payload = json.loads(self._body() or b"{}")
            c = self._commit(r, rev)
            if c is None:
                return
            if payload["tag"] in r.tags:
                return self._error(409, "TagExists", f"tag {payload['tag']} exists")
            r.tags[payload["tag"]] = c.oid
            return self._send(200, {})
        if op == "preupload" and method == "POST":
            payload = json.loads(self._body())
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for f in payload.get("files", [])
            ]
            return self._send(200, {"files": files, "commitOid": r.branches.get(unquote(rev))})
        if op == "commit" and method == "POST":
            return self._commit_op(r, rtype, repo_id, unquote(rev))
        c = self._commit(r, rev)
        if c is None:
            return
        if op == "commits":
            log, cur = [], c
            while cur is not None:
                log.append(
                    {
                        "id": cur.oid,
                        "title": cur.message,
                        "message": cur.message,
                        "authors": [],
                        "date": "2026-01-01T00:00:00.000Z",
                    }
                )
                cur = r.commits.get(cur.parent) if cur.parent else None
            return self._send(200, log)
        if op == "tree":
            prefix = rest.rstrip("/")
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            if prefix and prefix not in self._dirs(c) and prefix not in c.files:
                return self._error(404, "EntryNotFound", f"{prefix} does not exist")
            out = []
            for d in sorted(self._dirs(c)):
                parent = d.rsplit("/", 1)[0] if "/" in d else ""
                if (recursive and (not prefix or d.startswith(prefix + "/"))) or parent == prefix:
                    out.append(
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(d.encode()).hexdigest(),
                            "size": 0,
                            "path": d,
                        }
                    )
            for p, f in sorted(c.files.items()):
                parent = p.rsplit("/", 1)[0] if "/" in p else ""
                if (recursive and (not prefix or p.startswith(prefix + "/"))) or parent == prefix:
                    out.append(self._entry(p, f))
            return self._send(200, out)
        if op == "paths-info" and method == "POST":
            body = self._body().decode()
            ctype = self.headers.get("Content-Type") or ""
            paths = json.loads(body).get("paths", []) if "json" in ctype else parse_qs(body).get("paths", [])
            out = []
            dirs = self._dirs(c)
            for p in paths:
                p = p.strip("/")
                if p in c.files:
                    out.append(self._entry(p, c.files[p]))
                elif p in dirs or p == "":
                    out.append(
                        {
                            "type": "directory",
                            "oid": hashlib.sha1(p.encode()).hexdigest(),
                            "size": 0,
                            "path": p,
                        }
                    )
            return self._send(200, out)
        return self._error(404, "NotFound", f"unsupported {method} {op}")

    def _commit_op(self, r: _Repo, rtype: str, repo_id: str, branch: str) -> None:
        hub = self.server_hub
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        if hub.faults:
            fault = hub.faults.pop(0)
            if fault == "429":
                return self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
            if fault == "412":
                return self._error(
                    412, "PreconditionFailed", "A commit has happened since. Please refresh and try again."
                )
            return self._error(int(fault), "ServerError", "injected failure")
        if branch not in r.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        tip = r.commits[r.branches[branch]]
        header = next((entry["value"] for entry in lines if entry["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and parent != tip.oid:
            return self._error(
                412, "PreconditionFailed", "A commit has happened since. Please refresh and try again."
            )
        files = dict(tip.files)
        for entry in lines:
            key, value = entry["key"], entry["value"]
            if key == "file":
                data = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                files[value["path"]] = _File(data, lfs=False)
            elif key == "lfsFile":
                data = hub.lfs.get(value["oid"])
                if data is None:
                    return self._error(422, "LfsMissing", f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = _File(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
        oid = _oid(header.get("summary", ""), tip.oid, str(time.time_ns()))
        r.commits[oid] = _Commit(oid=oid, parent=tip.oid, message=header.get("summary", ""), files=files)
        r.branches[branch] = oid
        prefix = "" if rtype == "model" else f"{rtype}s/"
        self._send(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{oid}",
                "commitMessage": header.get("summary", ""),
                "pullRequestUrl": None,
            },
        )

    def _lfs_batch(self, payload: dict) -> None:
        hub = self.server_hub
        objects = []
        for obj in payload.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs:
                item["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}", "header": {}}
                }
            objects.append(item)
        self._send(
            200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _resolve(self, rtype: str, repo_id: str, rev: str, file: str, head: bool) -> None:
        r = self._repo(rtype, repo_id, head=head)
        if r is None:
            return
        c = self._commit(r, rev, head=head)
        if c is None:
            return
        f = c.files.get(file)
        if f is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist at {rev}", head=head)
        etag = f'"{f.sha256 if f.lfs else f.git_oid}"'
        headers = {"X-Repo-Commit": c.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(f.data))})
        data = f.data
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            if start_s == "":
                start, end = max(0, len(data) - int(end_s)), len(data) - 1
            else:
                start = int(start_s)
                end = min(int(end_s), len(data) - 1) if end_s else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Type"] = "application/octet-stream"
        self._send(status, data, headers, head=head)


def _oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()
