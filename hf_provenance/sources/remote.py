"""Bytes of Hub files by HTTP Range: the remote transport of the row-block reader.

A 100B checkpoint is ~200 GB; a comparison needs its headers and the row blocks it samples. This module fetches
exactly those byte ranges:

* :class:`HubClient` sends requests to ``HF_ENDPOINT`` with huggingface_hub's headers (user agent, token). The
  token goes only to the endpoint's origin (never to a CDN a download redirects to) and is scrubbed from every
  message. Timeouts, dropped connections, 408/429/5xx and malformed partial responses (short body, wrong
  ``Content-Range``) are retried with exponential backoff, a bounded number of times, then raised as
  ``RemoteError`` (exit 3). A partial read is never returned as complete.
* :class:`RangeCache` keeps every fetched range on disk, keyed by the file's LFS sha256 and the byte range, so a
  rerun (or another comparison against the same base) fetches nothing again.
* :class:`HttpRangeTransport` implements ``ByteTransport.pread_into``: it serves what the cache holds, fetches the
  gaps (split into parts fetched by several requests in flight), and coalesces sequential reads by reading ahead,
  never past the end of the tensor being read. :meth:`HttpRangeTransport.prefetch` takes a list of ranges, merges
  adjacent ones into single requests and fetches them in the background.

Settings come from the environment (``RemoteSettings.from_env``): ``HF_PROVENANCE_HTTP_RETRIES``,
``HF_PROVENANCE_HTTP_BACKOFF`` (seconds, doubled per attempt), ``HF_PROVENANCE_HTTP_TIMEOUT``,
``HF_PROVENANCE_HTTP_WORKERS`` and ``HF_PROVENANCE_RANGE_CACHE`` (a folder, or ``off`` for a temporary cache
removed when the source closes; default ``$HF_HOME/hf-provenance/ranges``).
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import contextlib
import json
import os
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote, urljoin, urlsplit

try:  # huggingface_hub >= 2 ships httpx as "httpx2"; 1.x depends on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx  # type: ignore[no-redef]

from hf_provenance.errors import InputError, ModelNotFoundError, ProvenanceError, ReadError, RemoteError, UsageError
from hf_provenance.sources.reader import LocalTransport

MiB = 1 << 20
MAX_API_BYTES = 64 * MiB       # a model-info answer (siblings of a repo with thousands of files) stays far below
MAX_REDIRECTS = 5
LOCATION_TTL = 600.0           # seconds a resolved download location (signed CDN URL) is reused
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
_PIECE = re.compile(r"^(\d+)-(\d+)$")
_NOT_FOUND_CODES = frozenset({"RepoNotFound", "RevisionNotFound", "EntryNotFound"})


class RepoAccessError(InputError, PermissionError):
    """Raised when the Hub refuses a repo (HTTP 401/403): it is gated or private, or the token cannot read it."""


# --- settings ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteSettings:
    """How remote reads behave. ``from_env()`` reads the ``HF_PROVENANCE_*`` variables (see the module docstring).

    Attributes:
        retries: attempts after the first for a failed request (timeouts, 5xx, dropped or short responses).
        backoff: first delay between attempts in seconds; doubled per attempt up to ``backoff_max`` (jittered).
        timeout: seconds without progress before a request is abandoned (and retried).
        workers: requests in flight at most (parts of one large read, and read-ahead).
        part_bytes: the largest range fetched by one request.
        readahead_bytes: the largest read-ahead window for sequential reads (0 disables read-ahead).
        cache_dir: the on-disk range cache; None for a temporary one removed at close.
    """

    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 30.0
    timeout: float = 60.0
    connect_timeout: float = 10.0
    workers: int = 8
    part_bytes: int = 8 * MiB
    readahead_bytes: int = 32 * MiB
    cache_dir: str | None = None

    @classmethod
    def from_env(cls) -> "RemoteSettings":
        env = os.environ
        return cls(retries=_env_number("HF_PROVENANCE_HTTP_RETRIES", int, cls.retries, 0, 100),
                   backoff=_env_number("HF_PROVENANCE_HTTP_BACKOFF", float, cls.backoff, 0.0, 600.0),
                   timeout=_env_number("HF_PROVENANCE_HTTP_TIMEOUT", float, cls.timeout, 0.01, 3600.0),
                   workers=_env_number("HF_PROVENANCE_HTTP_WORKERS", int, cls.workers, 1, 64),
                   cache_dir=_cache_dir_from(env.get("HF_PROVENANCE_RANGE_CACHE")))


def _env_number(name: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise UsageError(name, f"must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], "
                               f"got {raw!r}")
    return value


def _cache_dir_from(raw: str | None) -> str | None:
    if raw is not None and raw.strip().lower() in ("off", "0", "false", "no", "none"):
        return None
    if raw and raw.strip():
        return os.path.abspath(os.path.expanduser(raw.strip()))
    return os.path.join(hf_home(), "hf-provenance", "ranges")


def hf_home() -> str:
    """``HF_HOME`` as set now (huggingface_hub reads it once, at import)."""
    raw = os.environ.get("HF_HOME")
    if raw:
        return os.path.expandvars(os.path.expanduser(raw))
    from huggingface_hub import constants

    return constants.HF_HOME


def hub_cache_dir() -> str:
    """The huggingface_hub download cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``), as set now."""
    raw = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if raw:
        return os.path.expandvars(os.path.expanduser(raw))
    return os.path.join(hf_home(), "hub")


def endpoint() -> str:
    """``HF_ENDPOINT`` as set now, else huggingface_hub's default endpoint."""
    raw = os.environ.get("HF_ENDPOINT")
    if raw and raw.strip():
        return raw.strip().rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now."""
    raw = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return raw.strip().upper() in ("1", "ON", "YES", "TRUE")


# --- HTTP client -----------------------------------------------------------------------------------------------
class _Retry(Exception):
    """A failure worth another attempt; ``reason`` is safe to print (token scrubbed)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class HubClient:
    """Requests to one Hub endpoint, with retries and a scrubbed token.

    Args:
        base_url: the endpoint (``HF_ENDPOINT``); the Authorization header is sent to this origin only.
        settings: timeouts and retries.
        token: None reads huggingface_hub's token (``HF_TOKEN``, then the stored login); False sends none.
    """

    def __init__(self, base_url: str, settings: RemoteSettings, *, token: str | bool | None = None):
        from huggingface_hub.utils import build_hf_headers

        from hf_provenance import __version__

        self.base_url = base_url.rstrip("/")
        self.settings = settings
        split = urlsplit(self.base_url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise UsageError("HF_ENDPOINT", f"must be an http(s) URL, got {_strip_userinfo(self.base_url)!r}")
        self.host = _strip_userinfo(f"{split.scheme}://{split.netloc}")
        try:
            headers = build_hf_headers(token=token, library_name="hf-provenance", library_version=__version__)
        except Exception as exc:  # noqa: BLE001 - a broken token setup (OIDC exchange...) is one clear line
            raise RemoteError("HF_TOKEN", f"could not obtain a Hub token ({type(exc).__name__}); check HF_TOKEN "
                                          "or `hf auth login`") from None
        headers = {k.lower(): v for k, v in headers.items()}
        auth = headers.pop("authorization", None)
        self._auth = auth
        self._secrets = [s for s in (auth, auth.split(" ", 1)[-1] if auth else None) if s]
        self._headers = headers
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.timeout, connect=min(settings.connect_timeout, settings.timeout * 10)),
            limits=httpx.Limits(max_connections=settings.workers + 4, max_keepalive_connections=settings.workers + 4),
            follow_redirects=False, trust_env=True)
        self._lock = threading.Lock()
        self._locations: dict[str, tuple[str, float]] = {}
        self.requests = 0          # HTTP requests sent (every attempt and redirect hop)
        self.range_requests = 0    # range requests sent (every attempt)
        self.range_bytes = 0       # body bytes received by range requests (retried attempts included)
        self.download_bytes = 0    # body bytes of metadata files and API answers

    @property
    def authenticated(self) -> bool:
        return self._auth is not None

    def scrub(self, text: str) -> str:
        """``text`` with the token (and the whole Authorization value) replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        self._client.close()

    # --- URLs -------------------------------------------------------------------------------------------------
    def api_url(self, repo_id: str, revision: str | None) -> str:
        url = f"{self.base_url}/api/models/{repo_id}"
        return (url if revision is None else f"{url}/revision/{quote(revision, safe='')}") + "?blobs=true"

    def file_url(self, repo_id: str, revision: str, filename: str) -> str:
        return f"{self.base_url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    # --- operations -------------------------------------------------------------------------------------------
    def get_json(self, url: str, *, where: str, what: str, not_found: str | dict[str, str]) -> Any:
        """GET a JSON document (the model-info API), with retries. ``not_found``: the message for a 404, or one
        per Hub error code (``RepoNotFound``, ``RevisionNotFound``; ``""`` for the rest)."""
        def attempt() -> bytes:
            with self._open("GET", url, where=where, not_found=not_found) as response:
                self._expect(response, (200,), where, what)
                return self._read_all(response, MAX_API_BYTES, where, what)

        body = self._with_retries(attempt, where, what)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise RemoteError(where, f"{what}: the answer from {self.host} is not JSON; is HF_ENDPOINT a Hub "
                                     "endpoint?") from None

    def download(self, url: str, *, where: str, what: str, size: int | None, limit: int) -> bytes:
        """GET a whole small file (config, tokenizer, card), with retries; its size must match ``size``."""
        def attempt() -> bytes:
            with self._open("GET", url, where=where, not_found=f"{what} is listed but missing", cached=True,
                            headers={"accept-encoding": "identity"}) as response:
                self._expect(response, (200,), where, what)
                data = self._read_all(response, limit, where, what)
            if size is not None and len(data) != size:
                raise _Retry(f"got {len(data)} bytes, the Hub lists {size}")
            return data

        return self._with_retries(attempt, where, what)

    def head_size(self, url: str, *, where: str, what: str) -> int:
        """The size of a file from a HEAD on its resolve URL (X-Linked-Size, else Content-Length)."""
        def attempt() -> int:
            with self._open("HEAD", url, where=where, not_found=f"{what} is listed but missing",
                            follow=False) as response:
                if response.status_code not in _REDIRECT_STATUS:
                    self._expect(response, (200,), where, what)
                raw = response.headers.get("x-linked-size") or response.headers.get("content-length")
            if raw is None or not raw.isdigit():
                raise RemoteError(where, f"{what}: the Hub gave no size for this file")
            return int(raw)

        return self._with_retries(attempt, where, what)

    def fetch_range(self, url: str, start: int, end: int, into: memoryview, *, where: str, total: int) -> None:
        """Fill ``into`` with bytes [start, end) of the file at ``url`` (``total`` bytes long), with retries.

        Raises RemoteError when the server ignores the Range header (it would send the whole file) or keeps
        failing; a short body or a wrong Content-Range is retried, never returned.
        """
        what = f"bytes {start}-{end - 1}"
        if len(into) != end - start:
            raise ValueError("buffer length does not match the range")

        def attempt() -> None:
            headers = {"range": f"bytes={start}-{end - 1}", "accept-encoding": "identity"}
            with self._lock:
                self.range_requests += 1
            with self._open("GET", url, where=where, not_found="file is listed but missing", cached=True,
                            headers=headers) as response:
                if response.status_code == 200:
                    if not (start == 0 and end == total):
                        raise RemoteError(where, f"{what}: the server ignored the Range header (HTTP 200, whole "
                                                 f"file); refusing to download {total} bytes. Check HF_ENDPOINT "
                                                 "or the proxy between you and the Hub")
                elif response.status_code == 206:
                    got = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                    if got is None or (int(got[1]), int(got[2])) != (start, end - 1):
                        value = response.headers.get("content-range")
                        raise _Retry(f"asked for {what}, got Content-Range {value!r}")
                    if got[3] != "*" and int(got[3]) != total:
                        raise RemoteError(where, f"the file is {got[3]} bytes on the server, the Hub listed "
                                                 f"{total}; did the revision change? Pin a commit SHA")
                else:
                    self._expect(response, (206,), where, what)
                length = response.headers.get("content-length")
                if length is not None and length.strip() != str(end - start):
                    raise _Retry(f"asked for {end - start} bytes, Content-Length says {length}")
                self._read_into(response, into, where, what)

        self._with_retries(attempt, where, what)

    # --- internals --------------------------------------------------------------------------------------------
    def _with_retries(self, attempt: Callable[[], Any], where: str, what: str) -> Any:
        tries = self.settings.retries + 1
        last: _Retry | None = None
        for i in range(tries):
            if last is not None:
                time.sleep(self._delay(i - 1, last.retry_after))
            try:
                return attempt()
            except _Retry as exc:
                last = exc
            except httpx.TimeoutException as exc:
                last = _Retry(f"timed out after {self.settings.timeout:g} s ({type(exc).__name__})")
            except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.TooManyRedirects) as exc:
                raise RemoteError(where, f"{what}: {self.scrub(_one_line(exc))}") from None
            except httpx.HTTPError as exc:  # connection refused or reset, peer closed mid-body, decoding...
                last = _Retry(f"{type(exc).__name__}: {self.scrub(_one_line(exc))}")
        raise RemoteError(where, f"{what} failed after {tries} attempt{'s' if tries > 1 else ''}: {last.reason}; "
                                 f"check the network and HF_ENDPOINT ({self.host}), then retry")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.settings.backoff_max, self.settings.backoff * (2 ** attempt))
        if retry_after is not None:
            base = max(base, min(retry_after, self.settings.backoff_max)) if self.settings.backoff > 0 else 0.0
        return base * random.uniform(0.5, 1.0)

    def _open(self, method: str, url: str, *, where: str, not_found: str | dict[str, str],
              headers: dict | None = None,
              follow: bool = True, cached: bool = False) -> "_Response":
        """Send a request, following redirects by hand (the token stays on the endpoint's origin)."""
        target = self._location(url) if cached else None
        via_cache = target is not None
        target = target or url
        for _ in range(MAX_REDIRECTS + 1):
            request_headers = dict(self._headers)
            if self._auth is not None and _origin(target) == _origin(self.base_url):
                request_headers["authorization"] = self._auth
            request_headers.update(headers or {})
            request = self._client.build_request(method, target, headers=request_headers)
            with self._lock:
                self.requests += 1
            response = self._client.send(request, stream=True)
            if follow and response.status_code in _REDIRECT_STATUS and response.headers.get("location"):
                location = urljoin(target, response.headers["location"])
                response.close()
                if response.status_code == 303:
                    method = "GET" if method != "HEAD" else method
                target, via_cache = location, False
                continue
            if via_cache and response.status_code in (400, 401, 403, 404, 410):
                response.close()  # the signed location expired: start again from the resolve URL
                self._forget(url)
                raise _Retry(f"download location expired (HTTP {response.status_code})")
            if cached and target != url and 200 <= response.status_code < 300:
                self._remember(url, target)
            if response.status_code >= 400:
                try:
                    self._raise_for_status(response, where, not_found)
                finally:
                    response.close()
            return _Response(response)
        raise RemoteError(where, f"more than {MAX_REDIRECTS} redirects from {self.host}")

    def _raise_for_status(self, response: Any, where: str, not_found: str | dict[str, str]) -> None:
        code = response.status_code
        error_code = response.headers.get("x-error-code", "")
        message = self.scrub(_one_line(response.headers.get("x-error-message", "")))[:200]
        said = f" (the Hub says: {message})" if message else ""
        if code in _RETRY_STATUS:
            raise _Retry(f"HTTP {code}{said}", _retry_after(response.headers.get("retry-after")))
        missing = error_code in _NOT_FOUND_CODES
        if code == 403 or (code == 401 and not missing):
            if self.authenticated:
                hint = ("your token may not read it: if the repo is gated, accept its terms on its model page with "
                        "the token's account; otherwise check that HF_TOKEN can read this repo")
            else:
                hint = ("set HF_TOKEN (or run `hf auth login`) to a token that can read it, and if the repo is "
                        "gated, accept its terms on its model page first")
            raise RepoAccessError(where, f"access denied (HTTP {code}): the repo is gated or private{said}; {hint}")
        if code in (401, 404) or missing:
            if isinstance(not_found, dict):
                text = not_found.get(error_code) or not_found.get("", "not found")
            else:
                text = not_found
            token_hint = "" if self.authenticated or error_code in ("RevisionNotFound", "EntryNotFound") else \
                " (a private repo also looks missing without HF_TOKEN)"
            raise ModelNotFoundError(where, f"{text} on {self.host} (HTTP {code}){token_hint}")
        if code == 416:
            raise RemoteError(where, f"range not satisfiable (HTTP 416): the file on {self.host} is shorter than "
                                     "the Hub lists; pin a commit SHA and retry")
        raise RemoteError(where, f"HTTP {code} from {self.host}{said}")

    def _expect(self, response: Any, codes: tuple[int, ...], where: str, what: str) -> None:
        if response.status_code not in codes:
            raise RemoteError(where, f"{what}: unexpected HTTP {response.status_code} from {self.host}")

    def _read_all(self, response: Any, limit: int, where: str, what: str) -> bytes:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RemoteError(where, f"{what}: {length} bytes, above the {limit}-byte limit")
        chunks, got = [], 0
        for chunk in response.iter_bytes():
            got += len(chunk)
            if got > limit:
                raise RemoteError(where, f"{what}: more than {limit} bytes, above the limit")
            chunks.append(chunk)
        with self._lock:
            self.download_bytes += got
        data = b"".join(chunks)
        if length is not None and length.isdigit() and len(data) != int(length):
            raise _Retry(f"short body: {len(data)} of {length} bytes")
        return data

    def _read_into(self, response: Any, into: memoryview, where: str, what: str) -> None:
        want, got = len(into), 0
        try:
            for chunk in response.iter_bytes():
                n = len(chunk)
                with self._lock:
                    self.range_bytes += n
                if got + n > want:
                    raise _Retry(f"{what}: the server sent more than the {want} bytes asked for")
                into[got: got + n] = chunk
                got += n
        except httpx.HTTPError as exc:
            raise _Retry(f"connection lost after {got} of {want} bytes ({type(exc).__name__})") from None
        if got != want:
            raise _Retry(f"short body: {got} of {want} bytes")

    def _location(self, url: str) -> str | None:
        with self._lock:
            hit = self._locations.get(url)
        return hit[0] if hit and hit[1] > time.monotonic() else None

    def _remember(self, url: str, location: str) -> None:
        with self._lock:
            self._locations[url] = (location, time.monotonic() + LOCATION_TTL)

    def _forget(self, url: str) -> None:
        with self._lock:
            self._locations.pop(url, None)


class _Response:
    """Context manager closing a streamed httpx response."""

    def __init__(self, response: Any):
        self.response = response

    def __enter__(self) -> Any:
        return self.response

    def __exit__(self, *exc: object) -> None:
        self.response.close()


def _origin(url: str) -> tuple[str, str, int | None]:
    split = urlsplit(url)
    port = split.port or {"http": 80, "https": 443}.get(split.scheme)
    return split.scheme, (split.hostname or "").lower(), port


def _strip_userinfo(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


def _one_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


def _retry_after(raw: str | None) -> float | None:
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


# --- on-disk range cache ---------------------------------------------------------------------------------------
class RangeCache:
    """Byte ranges of immutable files, on disk: ``<root>/<key[:2]>/<key>/<start>-<end>``.

    ``key`` is the file's sha256 (an LFS file's content hash), so an entry can never be stale. Entries are written
    to a temporary name and renamed, so a crash leaves no partial range; an entry whose size does not match its
    name is ignored. ``root`` None gives a temporary cache removed by :meth:`close`.
    """

    def __init__(self, root: str | None):
        self._tmp = tempfile.TemporaryDirectory(prefix="hf-provenance-ranges-") if root is None else None
        self.root = self._tmp.name if self._tmp is not None else root
        self.persistent = self._tmp is None
        self._index: dict[str, tuple[list[int], list[int]]] = {}  # key -> (starts, ends), sorted by start
        self._lock = threading.Lock()
        self.errors = 0  # failed writes (disk full...): the data was still delivered, just not kept

    def _dir(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"cache key must be 64 hex characters, got {key!r}")
        return os.path.join(self.root, key[:2], key)

    def _pieces(self, key: str) -> tuple[list[int], list[int]]:
        pieces = self._index.get(key)
        if pieces is None:
            found = []
            folder = self._dir(key)
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            for name in names:
                m = _PIECE.match(name)
                if m and int(m[2]) > int(m[1]):
                    try:
                        if os.path.getsize(os.path.join(folder, name)) == int(m[2]) - int(m[1]):
                            found.append((int(m[1]), int(m[2])))
                    except OSError:
                        pass
            found.sort()
            pieces = self._index[key] = ([s for s, _ in found], [e for _, e in found])
        return pieces

    def cover(self, key: str, start: int, end: int) -> tuple[list[tuple[int, int, tuple[int, int]]],
                                                              list[tuple[int, int]]]:
        """Split [start, end) into cached segments ``(s, e, piece)`` and gaps ``(s, e)``, in order."""
        with self._lock:
            starts, ends = self._pieces(key)
            cached, gaps, cursor = [], [], start
            while cursor < end:
                i = bisect.bisect_right(starts, cursor) - 1
                best = None
                for j in range(i, max(-1, i - 16), -1):  # pieces rarely overlap: look at the few before
                    if ends[j] > cursor and (best is None or ends[j] > ends[best]):
                        best = j
                if best is not None:
                    stop = min(end, ends[best])
                    cached.append((cursor, stop, (starts[best], ends[best])))
                else:
                    stop = starts[i + 1] if i + 1 < len(starts) else end
                    stop = min(end, stop)
                    gaps.append((cursor, stop))
                cursor = stop
        return cached, gaps

    def read_into(self, key: str, piece: tuple[int, int], offset: int, into: memoryview) -> bool:
        """Copy bytes at ``offset`` from ``piece`` into ``into``; False (and the piece forgotten) if it is gone."""
        path = os.path.join(self._dir(key), f"{piece[0]}-{piece[1]}")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._drop(key, piece)
            return False
        try:
            done = 0
            while done < len(into):
                got = os.preadv(fd, [into[done:]], offset - piece[0] + done)
                if got <= 0:
                    self._drop(key, piece)
                    return False
                done += got
        except OSError:
            self._drop(key, piece)
            return False
        finally:
            os.close(fd)
        return True

    def store(self, key: str, start: int, data: memoryview | bytes) -> bool:
        """Keep ``data`` as bytes [start, start + len) of ``key``; False when it could not be written."""
        end = start + len(data)
        folder = self._dir(key)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{start}-{end}.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, os.path.join(folder, f"{start}-{end}"))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            with self._lock:
                self.errors += 1
            return False
        with self._lock:
            starts, ends = self._pieces(key)
            i = bisect.bisect_left(starts, start)
            starts.insert(i, start)
            ends.insert(i, end)
        return True

    def _drop(self, key: str, piece: tuple[int, int]) -> None:
        with self._lock:
            starts, ends = self._pieces(key)
            for i in range(len(starts)):
                if (starts[i], ends[i]) == piece:
                    del starts[i], ends[i]
                    break

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


# --- the transport -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One Hub file the transport may read. ``key``: the cache key (LFS sha256); ``local_path``: a complete copy
    in the local HF cache (then no byte goes over the network)."""

    name: str
    url: str
    size: int
    key: str
    where: str
    local_path: str | None = None


@dataclass
class _Inflight:
    start: int
    end: int
    future: cf.Future = field(repr=False)


class HttpRangeTransport:
    """``ByteTransport`` over HTTP Range requests with an on-disk cache (see the module docstring).

    Args:
        client: the :class:`HubClient` that sends requests.
        files: ``TensorInfo.file`` -> :class:`RemoteFile`.
        cache: where fetched ranges are kept.
        settings: parts, workers, read-ahead.
        extents: per file, the sorted ``(start, end)`` byte ranges of its tensors; read-ahead stops at the end
            of the tensor being read (the next tensor may not be wanted at all).

    Counters: ``bytes_from_cache`` and ``bytes_local`` (served without the network); network bytes are counted by
    the client (``client.range_bytes``).
    """

    def __init__(self, client: HubClient, files: Mapping[str, RemoteFile], cache: RangeCache,
                 settings: RemoteSettings, extents: Mapping[str, Iterable[tuple[int, int]]] | None = None):
        self.client = client
        self.files = dict(files)
        self.cache = cache
        self.settings = settings
        self.set_extents(extents or {})
        self._local = LocalTransport({f.name: f.local_path for f in self.files.values() if f.local_path})
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._inflight: dict[str, list[_Inflight]] = {}
        self._seq: dict[str, tuple[int, int]] = {}     # file -> (end of the last read, read-ahead window size)
        self._ahead: dict[str, int] = {}               # file -> read-ahead scheduled up to this byte
        self._planned: dict[str, list[tuple[int, int]]] = {}  # file -> ranges the caller prefetched
        self._closed = False
        self.bytes_from_cache = 0
        self.bytes_local = 0
        self.prefetch_failures = 0

    def set_extents(self, extents: Mapping[str, Iterable[tuple[int, int]]]) -> None:
        """Per file, the byte ranges of its tensors (read-ahead never crosses the end of one)."""
        self._extents = {f: sorted(v) for f, v in extents.items()}
        self._extent_starts = {f: [s for s, _ in v] for f, v in self._extents.items()}

    # --- ByteTransport ----------------------------------------------------------------------------------------
    def pread_into(self, file: str, offset: int, buffer: memoryview) -> None:
        self._fill(file, offset, buffer, readahead=True)

    def read(self, file: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of ``file``, clipped to its end (for the header parser's ``read_at``)."""
        rf = self._file(file)
        length = max(0, min(length, rf.size - offset))
        buffer = bytearray(length)
        self._fill(file, offset, memoryview(buffer), readahead=False)
        return bytes(buffer)

    def prefetch(self, file: str, ranges: Iterable[tuple[int, int]]) -> int:
        """Fetch ``ranges`` of ``file`` in the background: adjacent or overlapping ranges become one request
        (split at ``part_bytes``); cached and in-flight bytes are skipped. Returns the number of requests queued.
        A later read waits for the requests it overlaps; a failed prefetch is retried by that read. Reads inside
        prefetched ranges do not read ahead (the caller said what it wants).
        """
        return self._prefetch(file, ranges, explicit=True)

    def _prefetch(self, file: str, ranges: Iterable[tuple[int, int]], *, explicit: bool) -> int:
        rf = self._file(file)
        if rf.local_path or self._closed:
            return 0
        merged = _merge((max(0, s), min(rf.size, e)) for s, e in ranges)
        if explicit:
            with self._lock:
                planned = self._planned.setdefault(file, [])
                for span in merged:
                    _insert_merged(planned, span)
        queued = 0
        for start, end in merged:
            _, gaps = self.cache.cover(rf.key, start, end)
            with self._lock:
                flights = [(f.start, f.end) for f in self._inflight.get(file, [])]
            for gap in gaps:
                for piece in _subtract(gap, flights):
                    for s, e in _split(piece, self.settings.part_bytes):
                        self._queue(rf, s, e)
                        queued += 1
        return queued

    def wait(self) -> None:
        """Block until every queued prefetch and read-ahead request has finished."""
        with self._lock:
            futures = [f.future for flights in self._inflight.values() for f in flights]
        cf.wait(futures)

    def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._local.close()

    # --- internals --------------------------------------------------------------------------------------------
    def _file(self, file: str) -> RemoteFile:
        rf = self.files.get(file)
        if rf is None:
            raise ReadError(file, "not a file of this Hub source")
        return rf

    def _executor(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                if self._closed:
                    raise ReadError("hub", "the source was closed")
                self._pool = cf.ThreadPoolExecutor(max_workers=self.settings.workers,
                                                   thread_name_prefix="hf-provenance-http")
            return self._pool

    def _fill(self, file: str, offset: int, buffer: memoryview, *, readahead: bool) -> None:
        rf = self._file(file)
        n = len(buffer)
        end = offset + n
        if offset < 0 or end > rf.size:
            raise ReadError(rf.where, f"bytes [{offset}, {end}) are outside the file's {rf.size} bytes")
        if n == 0:
            return
        if rf.local_path:
            self._local.pread_into(file, offset, buffer)
            with self._lock:
                self.bytes_local += n
            return
        self._wait_inflight(file, offset, end)
        cached, gaps = self.cache.cover(rf.key, offset, end)
        for s, e, piece in cached:
            if self.cache.read_into(rf.key, piece, s, buffer[s - offset: e - offset]):
                with self._lock:
                    self.bytes_from_cache += e - s
            else:
                gaps.append((s, e))
        parts = [p for gap in sorted(gaps) for p in _split(gap, self.settings.part_bytes)]
        if len(parts) == 1:
            self._fetch(rf, parts[0][0], parts[0][1], buffer[parts[0][0] - offset: parts[0][1] - offset])
        elif parts:
            pool = self._executor()
            futures = [pool.submit(self._fetch, rf, s, e, buffer[s - offset: e - offset]) for s, e in parts]
            cf.wait(futures)
            for future in futures:
                future.result()  # the first failure, after every part has finished writing into the buffer
        if readahead:
            self._after_read(rf, offset, end)

    def _fetch(self, rf: RemoteFile, start: int, end: int, into: memoryview | None = None) -> None:
        view = into if into is not None else memoryview(bytearray(end - start))
        self.client.fetch_range(rf.url, start, end, view, where=rf.where, total=rf.size)
        self.cache.store(rf.key, start, view)

    def _queue(self, rf: RemoteFile, start: int, end: int) -> None:
        try:
            pool = self._executor()
        except ReadError:
            return
        future = pool.submit(self._prefetch_part, rf, start, end)
        flight = _Inflight(start, end, future)
        with self._lock:
            self._inflight.setdefault(rf.name, []).append(flight)

        def done(_: cf.Future, name: str = rf.name) -> None:
            with self._lock:
                flights = self._inflight.get(name, [])
                if flight in flights:
                    flights.remove(flight)

        future.add_done_callback(done)

    def _prefetch_part(self, rf: RemoteFile, start: int, end: int) -> None:
        try:
            self._fetch(rf, start, end)
        except (ProvenanceError, OSError, ValueError):
            with self._lock:
                self.prefetch_failures += 1  # the read that needs these bytes fetches them again, and reports

    def _wait_inflight(self, file: str, start: int, end: int) -> None:
        with self._lock:
            waits = [f.future for f in self._inflight.get(file, []) if f.start < end and f.end > start]
        if waits:
            cf.wait(waits)

    def _after_read(self, rf: RemoteFile, offset: int, end: int) -> None:
        """Sequential reads of one tensor: read ahead in windows that double while the run goes on (the first is
        one read's length, the largest ``readahead_bytes``), never past the end of the tensor being read."""
        if self.settings.readahead_bytes <= 0:
            return
        name = rf.name
        with self._lock:
            last_end, size = self._seq.get(name, (-1, 0))
            if offset != last_end or _inside(self._planned.get(name, ()), offset, end):
                self._seq[name] = (end, 0)
                self._ahead[name] = end
                return
            ahead = max(end, self._ahead.get(name, end))
            if size and ahead - end >= size:  # still a full window ahead of the reader
                self._seq[name] = (end, size)
                return
            size = min(self.settings.readahead_bytes, max(end - offset, 2 * size))
            self._seq[name] = (end, size)
            limit = self._extent_end(name, end - 1)
            if limit is None:
                return
            target = min(limit, ahead + size)
            if target <= ahead:
                return
            self._ahead[name] = target
        self._prefetch(name, [(ahead, target)], explicit=False)

    def _extent_end(self, file: str, pos: int) -> int | None:
        starts = self._extent_starts.get(file)
        if not starts:
            return None
        i = bisect.bisect_right(starts, pos) - 1
        if i < 0:
            return None
        s, e = self._extents[file][i]
        return e if s <= pos < e else None


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with overlapping or adjacent ones joined; empty ones dropped."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _insert_merged(ranges: list[tuple[int, int]], span: tuple[int, int]) -> None:
    """Insert ``span`` into sorted, merged ``ranges`` in place, joining it with the ranges it touches."""
    start, end = span
    i = bisect.bisect_left(ranges, (start, start))
    if i > 0 and ranges[i - 1][1] >= start:
        i -= 1
    j = i
    while j < len(ranges) and ranges[j][0] <= end:
        start, end = min(start, ranges[j][0]), max(end, ranges[j][1])
        j += 1
    ranges[i:j] = [(start, end)]


def _inside(ranges: list[tuple[int, int]] | tuple, start: int, end: int) -> bool:
    """True when [start, end) lies inside one of the sorted, merged ``ranges``."""
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]


def _subtract(gap: tuple[int, int], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces = [gap]
    for ts, te in taken:
        nxt = []
        for s, e in pieces:
            if te <= s or ts >= e:
                nxt.append((s, e))
                continue
            if s < ts:
                nxt.append((s, ts))
            if te < e:
                nxt.append((te, e))
        pieces = nxt
    return pieces


def _split(rng: tuple[int, int], size: int) -> list[tuple[int, int]]:
    s, e = rng
    return [(a, min(e, a + size)) for a in range(s, e, max(1, size))]


__all__ = ["HubClient", "HttpRangeTransport", "RangeCache", "RemoteFile", "RemoteSettings", "RepoAccessError",
           "endpoint", "hf_home", "hub_cache_dir", "offline"]
