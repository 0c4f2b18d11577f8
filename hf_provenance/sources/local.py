"""Local models: a folder in HF layout, an HF cache snapshot, or a single .safetensors file.

Everything is known from headers and small metadata files; no weight byte is read until the reader asks for rows.
Every file is resolved and checked before it is opened (see ``paths``); pickle checkpoints are refused unless the
caller opts in, and then are only loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from hf_provenance.errors import (IndexError_, InputError, ModelNotFoundError, PathEscapeError,
                                  UnsafeFormatError)
from hf_provenance.sources import metadata
from hf_provenance.sources.base import DTYPES, ContentId, TensorInfo
from hf_provenance.sources.header import read_header_file
from hf_provenance.sources.paths import allowed_roots, checked_file, hf_cache_repo, join_inside
from hf_provenance.sources.reader import (ByteTransport, LocalTransport, MemoryTransport, RowReader,
                                          scale_names)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles that trainers leave beside the weights; they hold no weights, so they neither count nor block.
NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt"})
UNPICKLE_HINT = ("refusing to unpickle (pickle files can run code when loaded); convert the checkpoint to "
                 "safetensors, or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)")


@dataclass
class _Layout:
    kind: str                 # "folder" | "file" | "hf-cache"
    folder: str               # where config.json, tokenizer and README are looked up
    revision: str | None
    roots: tuple[str, ...]
    weights: list[str] = field(default_factory=list)  # safetensors paths inside ``folder``
    index: str | None = None  # the index file the weights came from
    weight_map: dict[str, str] | None = None  # tensor -> shard path, from the index
    pickles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class LocalSource:
    """A model on the local disk (implements ``ModelSource``). Build it with ``open_model(ref)``.

    Attributes beyond ``ModelSource``: ``files`` (weight files), ``scale_names`` (quantisation scale tensors),
    ``header_metadata`` (each file's ``__metadata__``), ``header_bytes`` (bytes read for headers).
    """

    def __init__(self, ref: str, *, allow_pickle: bool = False):
        self.ref = ref
        layout = _locate(ref)
        self.kind, self.revision = layout.kind, layout.revision
        self.path = (layout.weights or layout.pickles)[0] if layout.kind == "file" else layout.folder
        self.notes: list[str] = list(layout.notes)
        self.config = metadata.read_config(layout.folder, layout.roots)
        self.quantization = metadata.quantization_method(self.config)
        self.adapter = metadata.read_adapter(layout.folder, layout.roots)
        self.card, card_notes = metadata.read_card(layout.folder, layout.roots)
        self.vocab, vocab_notes = metadata.read_vocab(layout.folder, layout.roots)
        self.notes += card_notes + vocab_notes
        self.header_metadata: dict[str, dict[str, str]] = {}
        self.header_bytes = 0
        self._real_paths: dict[str, str] = {}
        self._memory: dict[str, bytearray] | None = None
        if layout.weights:
            self.inventory, digests = self._read_safetensors(layout)
        elif layout.pickles:
            if not allow_pickle:
                raise UnsafeFormatError(layout.pickles[0], UNPICKLE_HINT)
            self.inventory, digests = self._read_pickles(layout)
        else:
            if self.config is None:
                raise ModelNotFoundError(layout.folder, "no config.json and no weight files (*.safetensors) in "
                                                        "this folder")
            self.inventory = {}
            canonical = json.dumps(self.config, sort_keys=True).encode()
            digests = {"config.json": _file_digest("config.json", len(canonical), canonical)}
            self.notes.append(f"{layout.folder}: no weight files; config only")
        self.files = sorted(digests) if (layout.weights or layout.pickles) else []  # relative names
        self.scale_names = scale_names(self.inventory)
        self.content_id = _layout_id(digests, self.revision)
        self._reader: RowReader | None = None
        self._bytes_read_closed = 0  # bytes read by readers already closed

    # --- ModelSource ----------------------------------------------------------------------------------------
    @property
    def reader(self) -> RowReader:
        """The row-block reader, opened on first use."""
        if self._reader is None:
            transport: ByteTransport = (LocalTransport(self._real_paths) if self._memory is None
                                        else MemoryTransport(self._memory))
            self._reader = RowReader(self.inventory, transport, metadata.quantization_config(self.config))
        return self._reader

    def prefetch(self, blocks) -> int:
        """Hint the kernel to read row blocks ``(tensor, start_row, stop_row)`` ahead; returns the spans hinted."""
        transport = self.reader.transport
        if not hasattr(transport, "advise"):
            return 0
        spans: dict[str, list[tuple[int, int]]] = {}
        for name, start, stop in blocks:
            info = self.inventory[name]
            spans.setdefault(info.file, []).append((info.start + start * info.row_bytes,
                                                    info.start + stop * info.row_bytes))
        for file, s in spans.items():
            transport.advise(file, s)
        return sum(map(len, spans.values()))

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far by this source's readers (headers are counted in ``header_bytes``)."""
        return self._bytes_read_closed + (0 if self._reader is None else self._reader.bytes_read)

    def close(self) -> None:
        """Close the reader's files; a later ``reader`` access opens them again."""
        if self._reader is not None:
            self._bytes_read_closed += self._reader.bytes_read
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "LocalSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalSource({self.ref!r}, kind={self.kind!r}, tensors={len(self.inventory)})"

    # --- safetensors ----------------------------------------------------------------------------------------
    def _read_safetensors(self, layout: _Layout) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        inventory: dict[str, TensorInfo] = {}
        owner: dict[str, str] = {}
        digests: dict[str, str] = {}
        by_shard: dict[str, set[str]] = {}  # the index inverted once, not walked again for every shard
        for tensor, shard in (layout.weight_map or {}).items():
            by_shard.setdefault(shard, set()).add(tensor)
        for path in layout.weights:
            real = checked_file(path, layout.roots)
            header = read_header_file(real, where=path, file=path)
            self._real_paths[path] = real
            self.header_bytes += len(header.raw)
            rel = os.path.relpath(path, layout.folder)
            self.header_metadata[rel] = header.metadata
            digests[rel] = _file_digest(rel, header.file_size, header.raw)
            if layout.weight_map is not None:
                _check_shard(path, header.tensors, layout, by_shard.get(path, set()))
            for name, info in header.tensors.items():
                if name in owner:
                    raise InputError(path, f"tensor {name!r} also appears in {owner[name]}")
                owner[name] = path
                inventory[name] = info
        return inventory, digests

    # --- pickle (opt-in) ------------------------------------------------------------------------------------
    def _read_pickles(self, layout: _Layout) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Load pickle checkpoints with ``torch.load(weights_only=True)`` into an in-memory inventory."""
        names = {dtype: name for name, (_, dtype) in DTYPES.items() if dtype is not None}
        inventory: dict[str, TensorInfo] = {}
        self._memory, digests = {}, {}
        for path in layout.pickles:
            real = checked_file(path, layout.roots)
            try:
                state = torch.load(real, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
                raise InputError(path, f"torch.load(weights_only=True) failed: {str(exc).splitlines()[0]}") from None
            if not isinstance(state, dict):
                raise InputError(path, f"expected a dict of tensors, got {type(state).__name__}")
            blob, layout_rows, offset = bytearray(), [], 0
            for name, value in state.items():
                if not isinstance(value, torch.Tensor) or value.dtype not in names:
                    self.notes.append(f"{path}: entry {name!r} is not a supported tensor; skipped")
                    continue
                data = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                info = TensorInfo(str(name), names[value.dtype], tuple(value.shape), path, offset,
                                  offset + len(data))
                if info.name in inventory:
                    raise InputError(path, f"tensor {info.name!r} also appears in {inventory[info.name].file}")
                inventory[info.name] = info
                blob += data
                offset += len(data)
                layout_rows.append([info.name, info.dtype, list(info.shape), info.start, info.end])
            self._memory[path] = blob
            rel = os.path.relpath(path, layout.folder)
            digests[rel] = _file_digest(rel, os.path.getsize(real), json.dumps(layout_rows).encode())
        self.notes.append("pickle checkpoint loaded with torch.load(weights_only=True), held in memory")
        return inventory, digests


# --- layout ---------------------------------------------------------------------------------------------------
def _locate(ref: str) -> _Layout:
    path = os.path.abspath(os.path.expanduser(ref))
    if not os.path.lexists(path):
        raise ModelNotFoundError(ref, "no such file or folder")
    if os.path.isdir(path):
        return _locate_folder(_snapshot_of_repo(path))
    folder = os.path.dirname(path)
    layout = _base_layout(folder, kind="file")
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        layout.weights = [path]
    elif name.endswith(PICKLE_SUFFIXES):
        layout.pickles = [path]
    else:
        raise InputError(path, "unsupported file type; expected a .safetensors file or a model folder")
    return layout


def _snapshot_of_repo(folder: str) -> str:
    """For an HF cache repo folder (``models--org--name``), the snapshot that refs/main names."""
    if not (os.path.basename(folder).startswith("models--") and os.path.isdir(os.path.join(folder, "snapshots"))):
        return folder
    ref_file = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref_file):
        with open(ref_file, encoding="utf-8", errors="replace") as handle:
            sha = handle.read(100).strip()
        target = join_inside(os.path.join(folder, "snapshots"), sha)
        if sha and target and os.path.isdir(target):
            return target
    snapshots = sorted(os.listdir(os.path.join(folder, "snapshots")))
    if len(snapshots) == 1:
        return os.path.join(folder, "snapshots", snapshots[0])
    raise ModelNotFoundError(folder, f"HF cache repo with {len(snapshots)} snapshots and no usable refs/main; "
                                     "pass the snapshot folder (snapshots/<sha>)")


def _base_layout(folder: str, kind: str) -> _Layout:
    repo = hf_cache_repo(os.path.realpath(folder))
    revision = os.path.basename(os.path.realpath(folder)) if repo else None
    if repo and kind == "folder":
        kind = "hf-cache"
    return _Layout(kind=kind, folder=folder, revision=revision, roots=allowed_roots(folder))


def _locate_folder(folder: str) -> _Layout:
    layout = _base_layout(folder, kind="folder")
    single, index = os.path.join(folder, SAFE_SINGLE), os.path.join(folder, SAFE_INDEX)
    if os.path.lexists(single):
        layout.weights = [single]
        if os.path.lexists(index):
            layout.notes.append(f"{index}: ignored, {SAFE_SINGLE} is present")
    elif os.path.lexists(index):
        layout.index = index
        layout.weight_map = _read_index(index, layout)
        layout.weights = sorted(set(layout.weight_map.values()))
    else:
        layout.weights = sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
    if layout.weights:
        return layout
    pickle_index = os.path.join(folder, PICKLE_INDEX)
    if os.path.lexists(pickle_index):
        layout.pickles = sorted(set(_read_index(pickle_index, layout).values()))
    else:
        layout.pickles = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*"))
                                if p.endswith(PICKLE_SUFFIXES) and os.path.basename(p) not in NOT_WEIGHTS)
    return layout


def _read_index(index: str, layout: _Layout) -> dict[str, str]:
    """weight_map of a sharded index, each shard checked to stay inside the folder and to exist."""
    doc = metadata.read_json(index, layout.roots, IndexError_)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise IndexError_(index, "must hold a \"weight_map\" object mapping tensor names to shard files")
    if not weight_map:
        raise IndexError_(index, "weight_map is empty")
    out: dict[str, str] = {}
    joined: dict[str, str | None] = {}  # a few shards for many tensors: each checked once
    for tensor, shard in weight_map.items():
        path = joined[shard] if shard in joined else joined.setdefault(shard, join_inside(layout.folder, shard))
        if path is None:
            problem = "is an absolute path" if os.path.isabs(shard) or shard.startswith(("/", "\\")) else \
                "points outside the model folder"
            raise PathEscapeError(index, f"weight_map entry {shard!r} for tensor {tensor!r} {problem}; shards "
                                         "must be inside the model folder")
        out[tensor] = path
    for path in sorted(set(out.values())):
        if not os.path.lexists(path):
            needed = sorted(t for t, p in out.items() if p == path)
            more = f" and {len(needed) - 1} more" if len(needed) > 1 else ""
            raise IndexError_(path, f"shard listed in {os.path.basename(index)} is missing (it holds tensor "
                                    f"{needed[0]!r}{more})")
    return out


def _check_shard(path: str, tensors: dict[str, TensorInfo], layout: _Layout, listed: set[str]) -> None:
    """The index and the shard's header must name the same tensors (``listed``: the index's tensors for it)."""
    index_name = os.path.basename(layout.index or SAFE_INDEX)
    absent, unlisted = sorted(listed - tensors.keys()), sorted(tensors.keys() - listed)
    if absent:
        raise IndexError_(path, f"tensor {absent[0]!r} is listed for this shard in {index_name} but absent from it")
    if unlisted:
        other = layout.weight_map.get(unlisted[0])
        where = f"maps it to {os.path.relpath(other, layout.folder)}" if other else "does not list it"
        raise IndexError_(path, f"tensor {unlisted[0]!r} is in this shard but {index_name} {where}")


# --- content id -----------------------------------------------------------------------------------------------
def _file_digest(rel: str, size: int, header: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{rel}\0{size}\0{len(header)}\0".encode())
    h.update(header)
    return h.hexdigest()


def _layout_id(digests: dict[str, str], revision: str | None) -> ContentId:
    """sha256 over the files' (name, size, header) digests in name order; no weight byte is read."""
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\0{digests[rel]}\n".encode())
    return ContentId(kind="layout_id", value=h.hexdigest(), revision=revision, files=dict(sorted(digests.items())))


__all__ = ["LocalSource"]
