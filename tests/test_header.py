"""The safetensors header parser on valid files: offsets, order, metadata, transports (see also malformed inputs)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_provenance.errors import HeaderError
from hf_provenance.sources.header import (MAX_HEADER_BYTES, parse_header, parse_header_file, read_header,
                                          read_header_file)


def _raw(header: dict, data: bytes = b"", pad: bytes = b"") -> bytes:
    blob = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(blob)) + blob + data


def _mem(data: bytes):
    return lambda offset, length: data[offset: offset + length]


def test_offsets_are_absolute_and_match_safetensors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    tensors = {"b.weight": torch.randn(5, 3), "a.bias": torch.randn(4, dtype=torch.float16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "scalar": torch.tensor(2.5)}
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    meta, inv = parse_header_file(path)
    assert meta == {"format": "pt", "note": "x"}
    assert set(inv) == set(tensors)
    starts = [info.start for info in inv.values()]
    assert starts == sorted(starts), "tensors come in file order"
    with open(path, "rb") as handle:
        data = handle.read()
    (n,) = struct.unpack("<Q", data[:8])
    assert min(starts) == 8 + n and max(info.end for info in inv.values()) == len(data)
    with safe_open(path, "pt") as f:
        for name, info in inv.items():
            expected = f.get_tensor(name)
            assert info.shape == tuple(expected.shape) and info.file == path
            assert data[info.start: info.end] == expected.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert inv["scalar"].n_rows == 1 and inv["scalar"].row_len == 1
    assert inv["c"].dtype == "I64" and inv["c"].row_bytes == 24


def test_memory_and_file_transports_agree(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"x": torch.ones(2, 2, dtype=torch.bfloat16), "y": torch.zeros(3, dtype=torch.bool)}, path)
    with open(path, "rb") as handle:
        data = handle.read()
    assert parse_header(_mem(data), len(data), path) == parse_header_file(path)

    def one_byte_at_a_time(offset: int, length: int) -> bytes:  # a transport that returns short reads
        return data[offset: offset + min(length, 1)]

    assert parse_header(one_byte_at_a_time, len(data), path) == parse_header_file(path)


def test_file_and_where_are_separate():
    data = _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    _, inv = parse_header(_mem(data), len(data), "org/name@abc:model.safetensors", file="model.safetensors")
    assert inv["w"].file == "model.safetensors"
    with pytest.raises(HeaderError, match=r"^org/name@abc:model\.safetensors: "):
        parse_header(_mem(data[:-1]), len(data) - 1, "org/name@abc:model.safetensors", file="model.safetensors")


def test_edge_cases_that_are_valid():
    header = {"__metadata__": {}, "empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
              "w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
              "zero_dim": {"dtype": "I8", "shape": [3, 0], "data_offsets": [8, 8]},
              "s": {"dtype": "BOOL", "shape": [], "data_offsets": [8, 9]}}
    data = _raw(header, bytes(9), pad=b"       ")  # trailing spaces, as safetensors pads
    meta, inv = parse_header(_mem(data), len(data), "t")
    assert meta == {}
    assert list(inv) == ["empty", "w", "zero_dim", "s"]
    assert inv["empty"].nbytes == 0 and inv["zero_dim"].n_rows == 3 and inv["s"].shape == ()
    empty = _raw({})
    assert parse_header(_mem(empty), len(empty), "t") == ({}, {})


def test_raw_header_and_size_kept(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"x": torch.ones(3)}, path)
    header = read_header_file(path)
    with open(path, "rb") as handle:
        data = handle.read()
    assert header.raw == data[: header.data_start] and header.file_size == len(data)
    assert read_header(_mem(data), len(data), path) == header


def test_header_cap_checked_without_reading_it():
    calls = []

    def read_at(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{" * (length - 8) if offset == 0 else b""

    with pytest.raises(HeaderError) as err:
        parse_header(read_at, 10 * MAX_HEADER_BYTES, "big")
    assert str(err.value) == f"big: header length {MAX_HEADER_BYTES + 1} exceeds the {MAX_HEADER_BYTES}-byte limit"
    assert calls == [(0, 42)], "only the first bytes were read (enough to spot an LFS pointer)"
