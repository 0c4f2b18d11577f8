"""A fake Hugging Face Hub on 127.0.0.1 for tests: real files of registered folders, through the Hub's endpoints.

Endpoints (the ones huggingface_hub and ``hf_provenance.sources.hub`` use):

* ``GET /api/models/{org}/{name}`` and ``/api/models/{org}/{name}/revision/{rev}`` (``?blobs=true`` adds sizes,
  blob ids and LFS sha256): model info with ``sha`` and ``siblings``.
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}`` with ``Range``: 200 or 206 with ``Content-Range``,
  ``Accept-Ranges``, ``Content-Length``, ``ETag`` (the LFS sha256 for LFS files, the git blob id otherwise),
  ``X-Repo-Commit``, ``X-Linked-Size``/``X-Linked-Etag`` for LFS files; 416 for unsatisfiable ranges. A repo
  registered with ``redirect=True`` answers 302 to ``/_blobs/{sha256}`` for LFS files (``redirect=URL``: on
  another server, as the Hub sends downloads to its CDN).

Bookkeeping for assertions: ``bytes_served[(repo, path)]`` (body bytes written, partial writes included),
``requests`` (one :class:`Served` per request). Faults (:meth:`FakeHub.fault`): an HTTP status N times (or forever),
``drop`` (headers then half the body, then the connection is cut), ``slow`` (sleep before answering),
``wrong_range`` (a 206 whose Content-Range is shifted by one byte), ``ignore_range`` (200 with the whole file).
Repos registered with ``token=`` answer 401 without a token and 403 with another one; ``gated=True`` answers 403
to tokens that did not "accept the terms".
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".gguf")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class Repo:
    repo_id: str
    refs: dict[str, str] = field(default_factory=dict)            # branch or tag -> commit
    commits: dict[str, dict[str, FileEntry]] = field(default_factory=dict)
    token: str | None = None
    gated: bool = False
    redirect: bool | str = False  # True: to /_blobs/ on this host; a URL: to {url}/_blobs/ (another origin)


@dataclass
class Served:
    method: str
    repo: str | None
    path: str | None
    range: str | None
    status: int
    body_bytes: int = 0


@dataclass
class Fault:
    kind: str             # "status" | "drop" | "slow" | "wrong_range" | "ignore_range"
    match: str            # substring of the request path
    times: int | None     # None: forever
    status: int = 500
    delay: float = 0.0
    methods: tuple[str, ...] = ("GET", "HEAD")
    message: str | None = None


class FakeHub:
    """The server and its state. Use as a context manager (the ``hub`` fixture does)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.bytes_served: dict[tuple[str, str], int] = {}
        self.requests: list[Served] = []
        self.authorizations: list[str | None] = []
        self.accepted: set[str] = set()  # tokens that accepted gated repos' terms
        self.server_errors: list[str] = []  # exceptions in handler threads (clients that hung up...)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- registration -----------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str | os.PathLike, *, branch: str = "main", tags: tuple[str, ...] = (),
                 token: str | None = None, gated: bool = False, redirect: bool | str = False,
                 skip: tuple[str, ...] = ()) -> str:
        """Serve ``folder``'s files as a new commit of ``repo_id`` on ``branch`` (and ``tags``); returns its SHA.

        ``redirect``: LFS downloads answer 302 to ``/_blobs/{sha256}`` on this host (True) or on another server
        (its base URL, e.g. a second FakeHub holding the same files, standing in for a CDN).
        """
        folder = Path(folder)
        files: dict[str, FileEntry] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel in skip:
                continue
            sha256, git_sha1 = self._hash(path)
            files[rel] = FileEntry(path, path.stat().st_size, sha256, git_sha1, rel.endswith(LFS_SUFFIXES))
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            digest = hashlib.sha1(f"{repo_id}\n{len(repo.commits)}\n".encode())
            for rel, entry in files.items():
                digest.update(f"{rel}\0{entry.sha256}\n".encode())
            commit = digest.hexdigest()
            repo.commits[commit] = files
            repo.refs[branch] = commit
            for tag in tags:
                repo.refs[tag] = commit
            repo.token, repo.gated, repo.redirect = token, gated, redirect
        return commit

    def _hash(self, path: Path) -> tuple[str, str]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            sha256 = hashlib.sha256()
            git = hashlib.sha1(f"blob {st.st_size}\0".encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    sha256.update(chunk)
                    git.update(chunk)
            self._hashes[key] = (sha256.hexdigest(), git.hexdigest())
        return self._hashes[key]

    # --- faults and counters ----------------------------------------------------------------------------------
    def fault(self, kind: str, *, match: str = "/resolve/", times: int | None = 1, status: int = 500,
              delay: float = 0.0, methods: tuple[str, ...] = ("GET", "HEAD"), message: str | None = None) -> Fault:
        """Inject a fault into requests whose path contains ``match`` (``times`` None: every such request)."""
        fault = Fault(kind, match, times, status, delay, methods, message)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()
            self.authorizations.clear()

    def served(self, repo: str | None = None, suffix: str = "") -> int:
        """Body bytes served for files of ``repo`` (any repo when None) whose path ends with ``suffix``."""
        with self._lock:
            return sum(n for (r, p), n in self.bytes_served.items()
                       if (repo is None or r == repo) and p.endswith(suffix))

    def range_requests(self, repo: str | None = None, suffix: str = ".safetensors") -> list[Served]:
        with self._lock:
            return [s for s in self.requests if s.method == "GET" and s.path is not None and s.path.endswith(suffix)
                    and (repo is None or s.repo == repo) and s.range is not None]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.match in path and method in fault.methods and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _count(self, key: tuple[str, str] | None, n: int, served: Served) -> None:
        with self._lock:
            served.body_bytes += n
            if key is not None:
                self.bytes_served[key] = self.bytes_served.get(key, 0) + n


class _Server(ThreadingHTTPServer):
    """Handler threads are daemons; a client hanging up mid-body is recorded, not printed to stderr."""

    daemon_threads = True
    hub: FakeHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        with self.hub._lock:
            self.hub.server_errors.append(repr(sys.exc_info()[1]))


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 20

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # --- routing ----------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        hub = self.state
        raw_path = urlsplit(self.path).path
        served = Served(method, None, None, self.headers.get("Range"), 0)
        with hub._lock:
            hub.requests.append(served)
            hub.authorizations.append(self.headers.get("Authorization"))
        self._served = served
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if len(segments) >= 5 and segments[2] == "resolve":
            served.repo, served.path = "/".join(segments[:2]), "/".join(segments[4:])
        fault = hub._take_fault(method, raw_path)
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay)
            fault = None
        if fault is not None and fault.kind == "status":
            return self._error(fault.status, "Injected", fault.message or "injected fault")
        try:
            if segments[:2] == ["api", "models"] and len(segments) >= 4:
                return self._model_info(method, segments[2:])
            if len(segments) >= 5 and segments[2] == "resolve":
                return self._resolve(method, segments, fault)
            if len(segments) == 2 and segments[0] == "_blobs":
                return self._blob(method, segments[1], fault)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return None
        return self._error(404, "EntryNotFound", "no such endpoint")

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.token is not None or repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "GatedRepo" if repo.gated else "", "Access restricted: you must be authenticated")
                return None
            token = auth.removeprefix("Bearer ")
            allowed = (repo.token is None or token == repo.token) and (not repo.gated or token in self.state.accepted)
            if not allowed:
                self._error(403, "GatedRepo" if repo.gated else "",
                            f"Access to model {repo_id} is restricted (token {token})")  # echoes it, on purpose
                return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.commits:
            return rev
        commit = repo.refs.get(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _model_info(self, method: str, parts: list[str]) -> None:
        self._served.repo = repo_id = "/".join(parts[:2])
        rev = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if repo.token is not None and not repo.gated and self._repo(repo_id) is None:
            return None  # private repos hide their info; gated ones show it
        commit = self._commit(repo, rev)
        if commit is None:
            return None
        blobs = "blobs=true" in (urlsplit(self.path).query or "")
        siblings = []
        for rel, entry in repo.commits[commit].items():
            sib: dict[str, Any] = {"rfilename": rel}
            if blobs:
                sib.update({"blobId": entry.git_sha1, "size": entry.size})
                if entry.lfs:
                    sib["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
            siblings.append(sib)
        body = json.dumps({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                           "private": repo.token is not None and not repo.gated,
                           "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                           "siblings": siblings}).encode()
        self._send(200, {"Content-Type": "application/json"}, body, method)

    def _resolve(self, method: str, segments: list[str], fault: Fault | None) -> None:
        repo_id, rev, rel = "/".join(segments[:2]), segments[3], "/".join(segments[4:])
        self._served.repo, self._served.path = repo_id, rel
        repo = self._repo(repo_id)
        if repo is None:
            return None
        commit = self._commit(repo, rev)
        if commit is None:
            return None
        entry = repo.commits[commit].get(rel)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{rel} does not exist at {rev}")
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.etag}"'}
        if entry.lfs:
            headers.update({"X-Linked-Size": str(entry.size), "X-Linked-Etag": f'"{entry.sha256}"'})
            if repo.redirect:
                base = repo.redirect if isinstance(repo.redirect, str) else ""
                headers.update({"Location": f"{base}/_blobs/{entry.sha256}", "Content-Length": "0"})
                self.send_response(302)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self._served.status = 302
                return None
        self._file(method, entry, (repo_id, rel), headers, fault)

    def _blob(self, method: str, sha256: str, fault: Fault | None) -> None:
        for repo in self.state.repos.values():
            for files in repo.commits.values():
                for rel, entry in files.items():
                    if entry.sha256 == sha256:
                        self._served.repo, self._served.path = repo.repo_id, rel
                        return self._file(method, entry, (repo.repo_id, rel), {"ETag": f'"{sha256}"'}, fault)
        return self._error(404, "EntryNotFound", "no such blob")

    # --- bodies -----------------------------------------------------------------------------------------------
    def _file(self, method: str, entry: FileEntry, key: tuple[str, str], headers: dict[str, str],
              fault: Fault | None) -> None:
        size = entry.size
        start, end, status = 0, size, 200
        wanted = self.headers.get("Range")
        if wanted and not (fault is not None and fault.kind == "ignore_range"):
            parsed = _parse_range(wanted, size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{size}"
                return self._error(416, "RangeNotSatisfiable", "range not satisfiable", headers)
            start, end, status = parsed[0], parsed[1], 206
            shift = 1 if fault is not None and fault.kind == "wrong_range" else 0
            headers["Content-Range"] = f"bytes {start + shift}-{end - 1 + shift}/{size}"
        headers.update({"Accept-Ranges": "bytes", "Content-Length": str(end - start),
                        "Content-Type": "application/octet-stream"})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self._served.status = status
        if method == "HEAD":
            return None
        stop = end if fault is None or fault.kind != "drop" else start + (end - start) // 2
        with open(entry.path, "rb") as handle:
            handle.seek(start)
            pos = start
            while pos < stop:
                chunk = handle.read(min(_CHUNK, stop - pos))
                if not chunk:
                    break
                # counted before the write: once the client holds the bytes it may read the count at once
                self.state._count(key, len(chunk), self._served)
                try:
                    self.wfile.write(chunk)
                except OSError:
                    self.state._count(key, -len(chunk), self._served)
                    raise
                pos += len(chunk)
        if stop < end:  # cut the connection mid-body
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return None

    def _send(self, status: int, headers: dict[str, str], body: bytes, method: str) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._served.status = status
        if method != "HEAD":
            self.state._count(None, len(body), self._served)
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        headers.update(extra or {})
        self._send(status, headers, body, self.command)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range, None when unsatisfiable."""
    value = value.strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[6:].partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 else None
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    except ValueError:
        return None
    return (start, end) if start < end and start < size else None
