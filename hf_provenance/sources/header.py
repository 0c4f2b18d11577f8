"""The one safetensors header parser, fed by any transport (local file, HTTP range, test bytes).

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` + the data section. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section) and may
hold a ``"__metadata__"`` object of strings. Everything is validated before use: a hostile header can name absurd
shapes, overlapping or out-of-file ranges, or be a Git LFS pointer instead of weights. Every problem is raised as
one line ``where: problem`` naming the tensor and the expected versus the found value.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from hf_provenance.errors import HeaderError, LFSPointerError, ModelNotFoundError, ReadError
from hf_provenance.sources.base import DTYPES, TensorInfo

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
MAX_DIM = 2**40
MAX_NUMEL = 2**48
LFS_PREFIX = b"version https://git-lfs.github.com/spec/v1"
LFS_HINT = ("is a Git LFS pointer, not the weights: fetch them with `git lfs pull` (or `lfs: true` in "
            "actions/checkout), or pass the Hub id instead")

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header. ``raw`` is the whole prefix (8-byte length + JSON) for hashing; ``tensors`` in file order."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_len: int
    file_size: int
    raw: bytes = field(repr=False)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def parse_header(read_at: ReadAt, file_size: int, where: str, *, file: str | None = None
                 ) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parse and validate a safetensors header.

    Args:
        read_at: ``read_at(offset, length)`` returns up to ``length`` bytes at ``offset`` of the file.
        file_size: the file's size in bytes.
        where: names the file in error messages (a path, or ``repo@rev:file``).
        file: the value stored in ``TensorInfo.file`` (what the transport opens); defaults to ``where``.

    Returns:
        ``(metadata, tensors)``: the ``__metadata__`` strings and the tensors in file (data-offset) order, each
        with absolute ``start``/``end`` offsets.

    Raises:
        LFSPointerError: the file is a Git LFS pointer.
        HeaderError: anything else wrong with the header or the file size.

    Example:
        >>> import struct
        >>> blob = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        >>> data = struct.pack("<Q", len(blob)) + blob + bytes(4)
        >>> meta, tensors = parse_header(lambda o, n: data[o:o + n], len(data), "t.safetensors")
        >>> tensors["w"].start, tensors["w"].end
        (62, 66)
    """
    header = read_header(read_at, file_size, where, file=file)
    return header.metadata, header.tensors


def read_header(read_at: ReadAt, file_size: int, where: str, *, file: str | None = None) -> SafetensorsHeader:
    """Like :func:`parse_header`, returning a :class:`SafetensorsHeader` that also keeps the raw header bytes."""
    where = str(where)
    head = _read_exact(read_at, 0, min(file_size, max(len(LFS_PREFIX), 8)), where)
    if head.startswith(LFS_PREFIX):
        raise LFSPointerError(where, LFS_HINT)
    if file_size < 8:
        raise HeaderError(where, f"file is {file_size} bytes; a safetensors file starts with an 8-byte header "
                                 "length")
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > file_size:
        raise HeaderError(where, f"header length {n} runs past the end of the file (8 + {n} > {file_size} bytes); "
                                 "file truncated or not safetensors")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(where, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    raw = _read_exact(read_at, 8, n, where)
    doc = _decode_json(raw, where)
    metadata = _check_metadata(doc.pop("__metadata__", {}), where)
    data_len = file_size - 8 - n
    entries = [_check_entry(name, entry, where) for name, entry in doc.items()]
    _check_layout(entries, data_len, file_size, 8 + n, where)
    entries.sort(key=lambda e: (e[3], e[4]))
    base = 8 + n
    target = where if file is None else file
    tensors = {name: TensorInfo(name, dtype, shape, target, base + b, base + e)
               for name, dtype, shape, b, e in entries}
    return SafetensorsHeader(metadata, tensors, n, file_size, head[:8] + raw)


def parse_header_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parse the header of a local .safetensors file (see :func:`parse_header`)."""
    header = read_header_file(path)
    return header.metadata, header.tensors


def read_header_file(path: str | os.PathLike, *, where: str | None = None, file: str | None = None
                     ) -> SafetensorsHeader:
    """Read and validate the header of a local file with ``os.pread`` (never blocks on FIFOs or devices).

    ``where`` names the file in messages (default: ``path``); ``file`` goes into ``TensorInfo.file``.
    """
    path = os.fspath(path)
    where = path if where is None else where
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelNotFoundError(where, "no such file") from None
    except OSError as exc:
        raise ReadError(where, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError(where, "not a regular file")

        def read_at(offset: int, length: int) -> bytes:
            try:
                return os.pread(fd, length, offset)
            except OSError as exc:
                raise ReadError(where, f"read failed at byte {offset}: {exc.strerror}") from None

        return read_header(read_at, st.st_size, where, file=file)
    finally:
        os.close(fd)


def _read_exact(read_at: ReadAt, offset: int, length: int, where: str) -> bytes:
    chunks, got = [], 0
    while got < length:
        chunk = read_at(offset + got, length - got)
        if not chunk:
            raise HeaderError(where, f"file ended at byte {offset + got} while reading the header "
                                     f"(expected {length} bytes from byte {offset}); file truncated?")
        chunks.append(bytes(chunk))
        got += len(chunk)
    return b"".join(chunks)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


class _Constant(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Constant(f"{name} is not allowed")


def _decode_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(where, f"header is not valid UTF-8 ({exc.reason} at byte {8 + exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _Duplicate as dup:
        raise HeaderError(where, f"duplicate key {_name(dup.key)} in header") from None
    except RecursionError:
        raise HeaderError(where, "header is not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, _Constant) as exc:
        raise HeaderError(where, f"header is not valid JSON ({exc})") from None
    except ValueError:  # an integer beyond Python's digit limit for str -> int
        raise HeaderError(where, "header is not valid JSON (a number has too many digits)") from None
    if not isinstance(doc, dict):
        raise HeaderError(where, f"header must be a JSON object, got {_json_type(doc)}")
    return doc


def _check_metadata(meta: Any, where: str) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(where, f"__metadata__ must map strings to strings, got {_show(meta)}")
    return meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(name: str, entry: Any, where: str) -> tuple[str, str, tuple[int, ...], int, int]:
    tensor = f"tensor {_name(name)}"
    if not isinstance(entry, dict):
        raise HeaderError(where, f"{tensor}: entry must be an object with dtype, shape and data_offsets, "
                                 f"got {_show(entry)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise HeaderError(where, f"{tensor}: missing {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(where, f"{tensor}: unknown dtype {_show(dtype)} (known: {', '.join(sorted(DTYPES))})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(where, f"{tensor}: shape must be a list of non-negative integers, got {_show(shape)}")
    if any(d > MAX_DIM for d in shape):
        raise HeaderError(where, f"{tensor}: shape {_show(shape)} has a dimension above 2**40")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise HeaderError(where, f"{tensor}: shape {_show(shape)} has {numel} elements, above 2**48")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise HeaderError(where, f"{tensor}: data_offsets must be [begin, end] non-negative integers, "
                                 f"got {_show(offsets)}")
    begin, end = offsets
    if end < begin:
        raise HeaderError(where, f"{tensor}: data_offsets [{begin}, {end}] end before they begin")
    itemsize = DTYPES[dtype][0]
    if end - begin != numel * itemsize:
        raise HeaderError(where, f"{tensor}: data_offsets [{begin}, {end}] hold {end - begin} bytes, expected "
                                 f"{numel * itemsize} (shape {_show(shape)} x {itemsize} bytes of {dtype})")
    return name, dtype, tuple(shape), begin, end


def _check_layout(entries: list, data_len: int, file_size: int, data_start: int, where: str) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing after, nothing missing."""
    for name, _, _, begin, end in entries:
        if begin > data_len:
            raise HeaderError(where, f"tensor {_name(name)}: data_offsets [{begin}, {end}] start past the end of "
                                     f"the data section ({data_len} bytes)")
    ordered = sorted(entries, key=lambda e: (e[3], e[4]))
    cursor, previous = 0, None
    for name, _, _, begin, end in ordered:
        if begin < cursor:
            raise HeaderError(where, f"tensors {_name(previous[0])} and {_name(name)} overlap: "
                                     f"{_name(previous[0])} is [{previous[3]}, {previous[4]}], "
                                     f"{_name(name)} is [{begin}, {end}]")
        if begin > cursor:
            raise HeaderError(where, f"gap of {begin - cursor} bytes before tensor {_name(name)} (data bytes "
                                     f"[{cursor}, {begin}] belong to no tensor)")
        cursor, previous = end, (name, None, None, begin, end)
    if cursor > data_len:
        raise HeaderError(where, f"file truncated: tensor {_name(previous[0])} ends at byte {data_start + cursor} "
                                 f"but the file has {file_size} bytes")
    if cursor < data_len:
        raise HeaderError(where, f"{data_len - cursor} bytes after the last tensor (tensors end at byte "
                                 f"{data_start + cursor}, the file has {file_size} bytes)")


def _json_type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number")


def _name(name: str, limit: int = 120) -> str:
    """A tensor name or key for messages: Python repr (escapes control characters), cut to ``limit``."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _show(x: Any, limit: int = 80) -> str:
    """Compact JSON rendering of a value for messages, cut to ``limit`` characters."""
    try:
        text = json.dumps(x, separators=(", ", ": "), ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."
