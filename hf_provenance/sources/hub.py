"""Models on the Hugging Face Hub, named ``org/name[@revision]``, read without downloading them.

A ref resolves to a commit SHA through the model-info API, which also lists every file with its size and LFS sha256.
Metadata (config.json, adapter_config.json, README.md, tokenizer files) is downloaded whole; each safetensors file
gives only its 8-byte length and JSON header, by HTTP Range, to the same ``read_header`` parser local files use. So
``inspect`` and ``arch`` transfer no weight byte. Row blocks are read later through the remote transport of
``remote`` (coalesced ranges, several requests in flight, an on-disk cache keyed by LFS sha256).

``content_id`` is ``kind="hub"``: the commit SHA plus each weight file's LFS sha256 (equal sha256 on both sides
certifies identical weights without reading them). With ``HF_HUB_OFFLINE=1`` a ref resolves from the local HF cache
instead (``refs/<branch>`` -> ``snapshots/<sha>``), opened as a local ``hf-cache`` source, and a note says so.

Repos with only pickle weights are refused, like local ones; gated or private repos (HTTP 401/403) and missing
repos or revisions (404) are one line naming the ref and what to do. The token never appears in any message.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

from hf_provenance.errors import (ConfigError, IndexError_, InputError, ModelNotFoundError, PathEscapeError,
                                  RemoteError, UnsafeFormatError, UsageError)
from hf_provenance.sources import metadata
from hf_provenance.sources.base import CardMetadata, ContentId, TensorInfo, Vocabulary
from hf_provenance.sources.header import read_header
from hf_provenance.sources.local import (NOT_WEIGHTS, PICKLE_INDEX, PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE,
                                         LocalSource)
from hf_provenance.sources.paths import join_inside
from hf_provenance.sources.reader import RowReader, scale_names
from hf_provenance.sources.refs import COMMIT_SHA, HubRef, parse_hub_ref
from hf_provenance.sources.remote import (HttpRangeTransport, HubClient, RangeCache, RemoteFile, RemoteSettings,
                                          RepoAccessError, endpoint, hub_cache_dir, offline)

MAX_METADATA_BYTES = metadata.MAX_METADATA_BYTES
PICKLE_HINT = ("holds only pickle weights ({files}); refusing to download and unpickle them (pickle files can run "
               "code when loaded). Use a revision with safetensors weights (the Hub's conversion bot opens one as "
               "org/name@refs/pr/N), or download the repo and open the folder with allow_pickle")


@dataclass(frozen=True)
class Sibling:
    """One file of a Hub commit as the model-info API lists it."""

    name: str
    size: int | None
    sha256: str | None  # LFS files only
    blob_id: str | None  # git blob id


def resolve_hub(ref: str, *, allow_pickle: bool = False, **_: Any) -> "HubSource | LocalSource | None":
    """Resolver for ``open_model``: Hub ids (``org/name[@revision]``); None for anything else.

    With ``HF_HUB_OFFLINE=1`` the ref resolves from the local HF cache (see :func:`open_cached`).
    """
    hub_ref = parse_hub_ref(ref)
    if hub_ref is None:
        return None
    if offline():
        return open_cached(ref, hub_ref, allow_pickle=allow_pickle)
    return HubSource(ref, allow_pickle=allow_pickle, hub_ref=hub_ref)


class HubSource:
    """A model on the Hub at one commit (implements ``ModelSource``). Build it with ``open_model("org/name")``.

    Attributes beyond ``ModelSource``: ``repo_id``, ``endpoint``, ``siblings`` (every file of the commit),
    ``files`` (weight files), ``scale_names``, ``header_metadata`` (each file's ``__metadata__``), ``header_bytes``
    (bytes of headers parsed), ``bytes_fetched`` (tensor bytes received over the network; cache hits are not
    counted), ``requests`` (HTTP requests sent), ``settings`` (retries, cache folder...).

    Args:
        ref: ``org/name`` or ``org/name@revision``.
        allow_pickle: accepted for symmetry with local sources; pickle-only repos are refused regardless.
        settings: remote settings; default ``RemoteSettings.from_env()``.

    Example:
        >>> src = open_model("org/name@main")                            # doctest: +SKIP
        >>> src.revision, src.content_id.files["model.safetensors"]       # doctest: +SKIP
        ('3f1c...', '9a0b...')
        >>> src.reader.read_rows("model.embed_tokens.weight", 0, 64).shape  # doctest: +SKIP
        torch.Size([64, 4096])
    """

    kind = "hub"
    path = None

    def __init__(self, ref: str, *, allow_pickle: bool = False, settings: RemoteSettings | None = None,
                 hub_ref: HubRef | None = None):
        self.ref = ref
        self.hub_ref = hub_ref or parse_hub_ref(ref)
        if self.hub_ref is None:
            raise UsageError(ref, "not a Hub id; expected org/name or org/name@revision")
        self.repo_id = self.hub_ref.repo_id
        self.settings = settings or RemoteSettings.from_env()
        self.endpoint = endpoint()
        self.notes: list[str] = []
        self.header_metadata: dict[str, dict[str, str]] = {}
        self.header_bytes = 0
        self._client = HubClient(self.endpoint, self.settings)
        self._cache = RangeCache(self.settings.cache_dir)
        self._transport: HttpRangeTransport | None = None
        self._reader: RowReader | None = None
        self._remote_files: dict[str, RemoteFile] = {}
        self._extents: dict[str, list[tuple[int, int]]] = {}
        self._closed_counts = {"range_bytes": 0, "requests": 0, "read": 0}
        self._header_fetched = 0
        try:
            self._open()
        except RepoAccessError as exc:  # gated or private: name the repo, whichever file was refused first
            self.close()
            raise RepoAccessError(self.ref, exc.problem) from None
        except BaseException:
            self.close()
            raise

    # --- ModelSource ----------------------------------------------------------------------------------------
    @property
    def reader(self) -> RowReader:
        """The row-block reader, opened on first use (again after ``close``)."""
        if self._reader is None:
            self._reader = RowReader(self.inventory, self._ensure_transport(),
                                     metadata.quantization_config(self.config))
        return self._reader

    @property
    def bytes_read(self) -> int:
        """Tensor bytes delivered to readers so far (from the network or the cache)."""
        return self._closed_counts["read"] + (0 if self._reader is None else self._reader.bytes_read)

    @property
    def bytes_fetched(self) -> int:
        """Tensor bytes received over the network so far (headers excluded; retried attempts included)."""
        live = 0 if self._client is None else self._client.range_bytes
        return self._closed_counts["range_bytes"] + live - self._header_fetched

    @property
    def requests(self) -> int:
        """HTTP requests sent so far (API, metadata, headers, ranges; every attempt and redirect hop)."""
        return self._closed_counts["requests"] + (0 if self._client is None else self._client.requests)

    def prefetch(self, blocks: Iterable[tuple[str, int, int]]) -> int:
        """Fetch row blocks ``(tensor, start_row, stop_row)`` in the background, before they are read.

        Adjacent blocks of a file become one request (split at ``settings.part_bytes``); cached bytes are skipped.
        Returns the number of requests queued. A read waits for the requests it overlaps.
        """
        ranges: dict[str, list[tuple[int, int]]] = {}
        for name, start, stop in blocks:
            info = self.inventory[name]
            ranges.setdefault(info.file, []).append((info.start + start * info.row_bytes,
                                                     info.start + stop * info.row_bytes))
        transport = self._ensure_transport()
        return sum(transport.prefetch(file, spans) for file, spans in ranges.items())

    def close(self) -> None:
        """Close the reader, the HTTP connections and a temporary cache; a later ``reader`` access reopens."""
        if self._reader is not None:
            self._closed_counts["read"] += self._reader.bytes_read
            self._reader.close()
            self._reader = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._client is not None:
            self._closed_counts["range_bytes"] += self._client.range_bytes
            self._closed_counts["requests"] += self._client.requests
            self._client.close()
            self._client = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __enter__(self) -> "HubSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        revision = getattr(self, "revision", None)
        return f"HubSource({self.ref!r}, revision={revision!r}, tensors={len(getattr(self, 'inventory', {}))})"

    # --- opening ----------------------------------------------------------------------------------------------
    def _open(self) -> None:
        rev = self.hub_ref.revision
        no_repo = f"no such repo {self.repo_id} (and no local file or folder by that name)"
        missing = {"RepoNotFound": no_repo,
                   "RevisionNotFound": f"no such revision {rev!r} in {self.repo_id}",
                   "": no_repo if rev is None else f"no such repo {self.repo_id}, or no revision {rev!r} in it "
                                                   "(and no local file or folder by that name)"}
        try:
            info = self._client.get_json(self._client.api_url(self.repo_id, rev), where=self.ref,
                                         what="model info", not_found=missing)
        except ModelNotFoundError as exc:
            fix = "check the repo id" if rev is None else "check the repo id and the branch, tag or commit SHA"
            raise ModelNotFoundError(self.ref, f"{exc.problem}; {fix}") from None
        sha = info.get("sha") if isinstance(info, dict) else None
        if not (isinstance(sha, str) and COMMIT_SHA.match(sha)):
            raise RemoteError(self.ref, f"the model-info answer from {self._client.host} has no commit SHA; is "
                                        "HF_ENDPOINT a Hub endpoint?")
        if self.hub_ref.is_commit and sha != rev:
            raise RemoteError(self.ref, f"asked for commit {rev}, the Hub answered with {sha}")
        self.revision = sha
        self.siblings = _siblings(info, self.ref)
        if not self.hub_ref.is_commit:
            self.notes.append(f"{self.ref}: {self.hub_ref.revision_or_default} is commit {sha} "
                              f"({self._client.host})")
        self.config = self._json_object("config.json")
        self.quantization = metadata.quantization_method(self.config)
        self.adapter = self._json_object("adapter_config.json")
        self.card = self._card()
        self.vocab = self._vocab()
        weights, weight_map = self._weight_files()
        if weights:
            self.inventory = self._read_headers(weights, weight_map)
            files = {name: self._file_id(name) for name in weights}
        else:
            if self.config is None:
                raise ModelNotFoundError(self.ref, f"no config.json and no weight files (*.safetensors) at commit "
                                                   f"{sha}")
            self.inventory = {}
            files = {}
            self.notes.append(f"{self.ref}: no weight files; config only")
        self.files = sorted(weights)
        self.scale_names = scale_names(self.inventory)
        self.content_id = ContentId(kind="hub", value=sha, revision=sha, files=dict(sorted(files.items())))

    def _where(self, name: str) -> str:
        return f"{self.ref}:{name}"

    def _download(self, name: str, error: type[InputError]) -> bytes | None:
        sib = self.siblings.get(name)
        if sib is None:
            return None
        if sib.size is not None and sib.size > MAX_METADATA_BYTES:
            raise error(self._where(name), f"{sib.size} bytes, above the {MAX_METADATA_BYTES}-byte limit for "
                                           "metadata files")
        key = _content_key(sib)
        if key is not None and sib.size is not None:  # immutable content: kept in the range cache for reruns
            cached, gaps = self._cache.cover(key, 0, sib.size)
            if not gaps:
                data = bytearray(sib.size)
                if all(self._cache.read_into(key, piece, s, memoryview(data)[s:e]) for s, e, piece in cached):
                    return bytes(data)
        url = self._client.file_url(self.repo_id, self.revision, name)
        data = self._client.download(url, where=self._where(name), what=name, size=sib.size,
                                     limit=MAX_METADATA_BYTES)
        if key is not None and sib.size is not None:
            self._cache.store(key, 0, data)
        return data

    def _text(self, name: str, error: type[InputError] = InputError) -> str | None:
        data = self._download(name, error)
        if data is None:
            return None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(self._where(name), f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def _json(self, name: str, error: type[InputError] = InputError) -> Any:
        text = self._text(name, error)
        if text is None:
            return None
        try:
            return json.loads(text)
        except RecursionError:
            raise error(self._where(name), "not valid JSON (nested too deeply)") from None
        except ValueError as exc:
            raise error(self._where(name), f"not valid JSON ({exc})") from None

    def _json_object(self, name: str) -> dict[str, Any] | None:
        doc = self._json(name, ConfigError)
        if doc is not None and not isinstance(doc, dict):
            raise ConfigError(self._where(name), f"must be a JSON object, got {type(doc).__name__}")
        return doc

    def _card(self) -> CardMetadata:
        try:
            text = self._text("README.md")
        except InputError as exc:  # an unreadable card is a note; the weights are still comparable
            self.notes.append(f"{exc}; card metadata ignored")
            return CardMetadata()
        if text is None:
            return CardMetadata()
        card, notes = metadata.parse_card(text, self._where("README.md"))
        self.notes += notes
        return card

    def _vocab(self) -> Vocabulary | None:
        """The first of tokenizer.json, vocab.txt, tokenizer.model that gives a vocabulary (as local folders)."""
        if "tokenizer.json" in self.siblings:
            try:
                vocab = metadata.vocab_from_tokenizer_json(self._json("tokenizer.json"))
            except InputError as exc:
                self.notes.append(f"{exc}; vocabulary not read from it")
            else:
                if vocab is not None:
                    return vocab
                self.notes.append(f"{self._where('tokenizer.json')}: no model.vocab in a known format; vocabulary "
                                  "not read from it")
        if "vocab.txt" in self.siblings:
            try:
                return metadata.vocab_from_vocab_txt(self._text("vocab.txt"))
            except InputError as exc:
                self.notes.append(f"{exc}; vocabulary not read from it")
        if "tokenizer.model" in self.siblings:
            try:
                data = self._download("tokenizer.model", InputError)
            except InputError as exc:
                self.notes.append(f"{exc}; vocabulary not read")
                return None
            with tempfile.TemporaryDirectory(prefix="hf-provenance-spm-") as tmp:
                path = os.path.join(tmp, "tokenizer.model")
                with open(path, "wb") as handle:
                    handle.write(data)
                vocab, note = metadata._vocab_from_sentencepiece(path, (os.path.realpath(tmp),))
            if note:
                self.notes.append(note.replace(path, self._where("tokenizer.model")))
            return vocab
        return None

    # --- weights ----------------------------------------------------------------------------------------------
    def _weight_files(self) -> tuple[list[str], dict[str, str] | None]:
        names = self.siblings
        if SAFE_SINGLE in names:
            if SAFE_INDEX in names:
                self.notes.append(f"{self._where(SAFE_INDEX)}: ignored, {SAFE_SINGLE} is present")
            return [SAFE_SINGLE], None
        if SAFE_INDEX in names:
            weight_map = self._index(SAFE_INDEX)
            return sorted(set(weight_map.values())), weight_map
        weights = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
        if weights:
            return weights, None
        pickles = sorted(n for n in names if "/" not in n and (n == PICKLE_INDEX or (
            n.endswith(PICKLE_SUFFIXES) and n not in NOT_WEIGHTS)))
        if pickles:
            shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
            raise UnsafeFormatError(self.ref, PICKLE_HINT.format(files=shown))
        return [], None

    def _index(self, index: str) -> dict[str, str]:
        """weight_map of a sharded index; every shard a file of this commit, inside the repo."""
        doc = self._json(index, IndexError_)
        where = self._where(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise IndexError_(where, "must hold a \"weight_map\" object mapping tensor names to shard files")
        if not weight_map:
            raise IndexError_(where, "weight_map is empty")
        folder = posixpath.dirname(index)
        out: dict[str, str] = {}
        for tensor, shard in weight_map.items():
            joined = posixpath.normpath(posixpath.join(folder, shard)) if shard else ""
            if shard.startswith(("/", "\\")) or "\\" in shard or joined.startswith("..") or joined in ("", "."):
                raise PathEscapeError(where, f"weight_map entry {shard!r} for tensor {tensor!r} points outside the "
                                             "repo; shards must be files of the repo")
            out[tensor] = joined
        for shard in sorted(set(out.values())):
            if shard not in self.siblings:
                needed = sorted(t for t, s in out.items() if s == shard)
                more = f" and {len(needed) - 1} more" if len(needed) > 1 else ""
                raise IndexError_(self._where(shard), f"shard listed in {index} is missing (it holds tensor "
                                                      f"{needed[0]!r}{more})")
        return out

    def _file_id(self, name: str) -> str:
        sib = self.siblings[name]
        return sib.sha256 if sib.sha256 else f"git:{sib.blob_id}"

    def _remote_file(self, name: str) -> RemoteFile:
        sib = self.siblings[name]
        url = self._client.file_url(self.repo_id, self.revision, name)
        size = sib.size if sib.size is not None else self._client.head_size(url, where=self._where(name), what=name)
        key = _content_key(sib) or hashlib.sha256(
            f"{self.endpoint}\0{self.repo_id}\0{self.revision}\0{name}".encode()).hexdigest()
        local = None
        if sib.sha256:
            org, repo = self.repo_id.split("/")
            blob = os.path.join(hub_cache_dir(), f"models--{org}--{repo}", "blobs", sib.sha256)
            try:
                if os.path.isfile(blob) and os.path.getsize(blob) == size:
                    local = blob
            except OSError:
                local = None
        return RemoteFile(name, url, size, key, self._where(name), local)

    def _read_headers(self, weights: list[str], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        self._remote_files = {name: self._remote_file(name) for name in weights}
        transport = self._ensure_transport()
        inventory: dict[str, TensorInfo] = {}
        owner: dict[str, str] = {}
        for name in weights:
            rf = self._remote_files[name]
            header = read_header(lambda offset, length, n=name: transport.read(n, offset, length), rf.size,
                                 rf.where, file=name)
            self.header_bytes += len(header.raw)
            self.header_metadata[name] = header.metadata
            if weight_map is not None:
                _check_shard(name, header.tensors, weight_map, rf.where)
            for tensor, info in header.tensors.items():
                if tensor in owner:
                    raise InputError(rf.where, f"tensor {tensor!r} also appears in {owner[tensor]}")
                owner[tensor] = name
                inventory[tensor] = info
            self._extents[name] = [(t.start, t.end) for t in header.tensors.values()]
        transport.set_extents(self._extents)
        self._header_fetched = self._client.range_bytes
        local = [rf.name for rf in self._remote_files.values() if rf.local_path]
        if local:
            self.notes.append(f"{self.ref}: {len(local)} of {len(weights)} weight file(s) read from the local HF "
                              f"cache ({hub_cache_dir()}), not the network")
        return inventory

    def _ensure_transport(self) -> HttpRangeTransport:
        if self._transport is None:
            if self._client is None:  # reopened after close()
                self._client = HubClient(self.endpoint, self.settings)
                self._cache = RangeCache(self.settings.cache_dir)
            self._transport = HttpRangeTransport(self._client, self._remote_files, self._cache, self.settings,
                                                 self._extents)
        return self._transport


def _content_key(sib: Sibling) -> str | None:
    """A cache key naming a file's content: its LFS sha256, else a hash of its git blob id."""
    if sib.sha256:
        return sib.sha256
    if sib.blob_id:
        return hashlib.sha256(f"git-blob\0{sib.blob_id}".encode()).hexdigest()
    return None


def _siblings(info: dict[str, Any], ref: str) -> dict[str, Sibling]:
    raw = info.get("siblings")
    if not isinstance(raw, list):
        raise RemoteError(ref, "the model-info answer lists no files (no \"siblings\"); is HF_ENDPOINT a Hub "
                               "endpoint?")
    out: dict[str, Sibling] = {}
    for entry in raw:
        if not (isinstance(entry, dict) and isinstance(entry.get("rfilename"), str)):
            continue
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
        sha256 = lfs.get("sha256") if isinstance(lfs.get("sha256"), str) else None
        if sha256 is not None and not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            sha256 = None
        size = entry.get("size", lfs.get("size"))
        size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
        blob = entry.get("blobId") if isinstance(entry.get("blobId"), str) else None
        out[entry["rfilename"]] = Sibling(entry["rfilename"], size, sha256, blob)
    return out


def _check_shard(name: str, tensors: dict[str, TensorInfo], weight_map: dict[str, str], where: str) -> None:
    """The index and the shard's header must name the same tensors."""
    listed = {t for t, shard in weight_map.items() if shard == name}
    absent, unlisted = sorted(listed - tensors.keys()), sorted(tensors.keys() - listed)
    if absent:
        raise IndexError_(where, f"tensor {absent[0]!r} is listed for this shard in {SAFE_INDEX} but absent from it")
    if unlisted:
        other = weight_map.get(unlisted[0])
        said = f"maps it to {other}" if other else "does not list it"
        raise IndexError_(where, f"tensor {unlisted[0]!r} is in this shard but {SAFE_INDEX} {said}")


# --- offline: the local HF cache -------------------------------------------------------------------------------
def open_cached(ref: str, hub_ref: HubRef, *, allow_pickle: bool = False) -> LocalSource:
    """Open ``org/name[@revision]`` from the local HF cache (``HF_HUB_OFFLINE=1``) as an ``hf-cache`` source.

    The revision resolves through ``refs/<revision>`` (a commit SHA names its snapshot directly). When every weight
    file is a link to an LFS blob (named by its sha256), ``content_id`` is the same ``hub`` id the online source
    gives for that commit.

    Raises:
        ModelNotFoundError: the repo, the revision or its snapshot is not in the cache.
    """
    root = hub_cache_dir()
    repo_dir = os.path.join(root, f"models--{hub_ref.org}--{hub_ref.name}")
    rev = hub_ref.revision_or_default
    how = ("HF_HUB_OFFLINE=1 keeps the Hub off: download it first (`hf download "
           f"{hub_ref.repo_id}{'' if hub_ref.revision is None else ' --revision ' + rev}`) or unset HF_HUB_OFFLINE")
    if not os.path.isdir(repo_dir):
        raise ModelNotFoundError(ref, f"not in the local HF cache ({root}), and no local file or folder by that "
                                      f"name; {how}")
    if hub_ref.is_commit:
        sha = rev
    else:
        ref_file = join_inside(os.path.join(repo_dir, "refs"), rev)
        if ref_file is None or not os.path.isfile(ref_file):
            raise ModelNotFoundError(ref, f"revision {rev!r} is not in the local HF cache ({repo_dir}); {how}")
        with open(ref_file, encoding="utf-8", errors="replace") as handle:
            sha = handle.read(100).strip()
        if not COMMIT_SHA.match(sha):
            raise InputError(ref_file, f"does not hold a commit SHA (got {sha[:50]!r}); the HF cache is damaged")
    snapshot = os.path.join(repo_dir, "snapshots", sha)
    if not os.path.isdir(snapshot):
        raise ModelNotFoundError(ref, f"snapshot {sha} is not in the local HF cache ({repo_dir}); {how}")
    source = LocalSource(snapshot, allow_pickle=allow_pickle)
    source.ref = ref
    source.notes.insert(0, f"{ref}: HF_HUB_OFFLINE=1: {rev} resolved from the local HF cache to snapshot {sha}")
    files = _cached_lfs_ids(snapshot, repo_dir, source.files)
    if files is not None:
        source.content_id = ContentId(kind="hub", value=sha, revision=sha, files=files)
    return source


def _cached_lfs_ids(snapshot: str, repo_dir: str, files: list[str]) -> dict[str, str] | None:
    """{file: LFS sha256} when every weight file links to a blob named by a sha256; else None."""
    if not files:
        return None
    blobs = os.path.realpath(os.path.join(repo_dir, "blobs"))
    out = {}
    for rel in files:
        real = os.path.realpath(os.path.join(snapshot, rel))
        name = os.path.basename(real)
        if os.path.dirname(real) != blobs or len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            return None
        out[rel] = name
    return dict(sorted(out.items()))


__all__ = ["HubSource", "resolve_hub", "open_cached", "Sibling"]
