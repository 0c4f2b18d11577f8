"""RowReader: every dtype decodes like safetensors itself, FP8 scales are applied, and k rows cost k x row_bytes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_provenance.errors import InputError, ReadError
from hf_provenance.sources.header import parse_header_file
from hf_provenance.sources.reader import LocalTransport, MemoryTransport, RowReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"t0": (), "t1": (7,), "t2": (37, 5), "t3": (3, 4, 6)}
RANGES = [(0, None), (0, 1), (2, 5), (None, None), (3, 3)]  # None start: last row only


def _make(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    lo, hi = (0, 250) if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else (-120, 120)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _open(path: str, quantization_config: dict | None = None) -> RowReader:
    _, inventory = parse_header_file(path)
    return RowReader(inventory, LocalTransport(), quantization_config)


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
          torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_matches_safetensors(tmp_path, dtype):
    gen = torch.Generator().manual_seed(7)
    path = str(tmp_path / "m.safetensors")
    save_file({name: _make(dtype, shape, gen) for name, shape in SHAPES.items()}, path)
    reader = _open(path)
    with safe_open(path, "pt") as f:
        for name, shape in SHAPES.items():
            full = f.get_tensor(name)
            rows2d = full.reshape(-1, shape[-1] if shape else 1)
            n = rows2d.shape[0]
            for start, stop in RANGES:
                start = n - 1 if start is None else min(start, n)
                stop = n if stop is None else min(stop, n)
                before = reader.bytes_read
                raw = reader.read_raw(name, start, stop)
                assert reader.bytes_read - before == (stop - start) * rows2d.shape[1] * full.element_size()
                expected = (f.get_slice(name)[start:stop] if len(shape) == 2 else rows2d[start:stop])
                assert raw.dtype == full.dtype and raw.shape == (stop - start, rows2d.shape[1])
                assert _bytes(raw) == _bytes(expected), (name, start, stop)
                decoded = reader.read_rows(name, start, stop)
                assert decoded.dtype == torch.float32
                torch.testing.assert_close(decoded, expected.to(torch.float32), rtol=0, atol=0, equal_nan=True)


def test_results_are_not_views_of_the_reused_buffer(tmp_path):
    path = str(tmp_path / "m.safetensors")
    w = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    save_file({"w": w, "h": w.to(torch.float16)}, path)
    reader = _open(path)
    first, raw = reader.read_rows("w", 0, 2), reader.read_raw("h", 0, 2)
    reader.read_rows("w", 4, 8)
    reader.read_raw("h", 4, 8)
    assert torch.equal(first, w[0:2]) and torch.equal(raw, w[0:2].to(torch.float16))


def test_k_rows_cost_k_row_bytes(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.randn(1000, 64, dtype=torch.bfloat16), "b": torch.randn(10, 3)}, path)
    reader = _open(path)
    reader.read_rows("a", 100, 164)
    assert reader.bytes_read == 64 * 64 * 2
    reader.read_raw("b", 9, 10)
    assert reader.bytes_read == 64 * 64 * 2 + 3 * 4
    reader.read_rows("a", 5, 5)
    assert reader.bytes_read == 64 * 64 * 2 + 3 * 4


def test_bad_ranges_and_names(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(4, 2)}, path)
    reader = _open(path)
    with pytest.raises(ValueError, match=r"a: rows \[3, 5\) outside \[0, 4\)"):
        reader.read_rows("a", 3, 5)
    with pytest.raises(ValueError):
        reader.read_rows("a", 3, 2)
    with pytest.raises(KeyError, match="nope"):
        reader.read_rows("nope")
    assert reader.bytes_read == 0


# --- FP8 scales ---------------------------------------------------------------------------------------------------
def _fp8(shape, gen, dtype=torch.float8_e4m3fn):
    return (torch.randn(shape, generator=gen) * 2).to(dtype)


def _block_expected(w: torch.Tensor, scale: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Independent reference: loop over every block of every matrix and multiply it by its scale."""
    w = w.to(torch.float32).clone()
    mats = w.reshape(-1, *w.shape[-2:])
    scales = scale.to(torch.float32).reshape(-1, *scale.shape[-2:])
    for m in range(mats.shape[0]):
        for i in range(scales.shape[1]):
            for j in range(scales.shape[2]):
                mats[m, i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= scales[m, i, j]
    return mats.reshape(-1, w.shape[-1])


@pytest.mark.parametrize("block,qc", [((128, 128), None), ((128, 128), {"quant_method": "fp8"}),
                                      ((64, 32), {"weight_block_size": [64, 32]})])
def test_fp8_block_scale_inv(tmp_path, block, qc):
    gen = torch.Generator().manual_seed(1)
    b0, b1 = block
    w = _fp8((300, 200), gen)
    s = torch.rand((-(-300 // b0), -(-200 // b1)), generator=gen) + 0.5
    path = str(tmp_path / "m.safetensors")
    save_file({"l.weight": w, "l.weight_scale_inv": s}, path)
    reader = _open(path, qc)
    assert reader.scale_companion("l.weight") == "l.weight_scale_inv"
    assert reader.scale_kind("l.weight") == "block"
    assert reader.scale_names == frozenset({"l.weight_scale_inv"})
    with safe_open(path, "pt") as f:
        expected = _block_expected(f.get_tensor("l.weight"), f.get_tensor("l.weight_scale_inv"), b0, b1)
    for start, stop in [(0, 300), (100, 260), (b0 - 1, b0 + 1), (299, 300), (0, 1)]:
        before = reader.bytes_read
        got = reader.read_rows("l.weight", start, stop)
        torch.testing.assert_close(got, expected[start:stop], rtol=0, atol=0)
        scale_rows = (stop - 1) // b0 - start // b0 + 1
        assert reader.bytes_read - before == (stop - start) * 200 + scale_rows * s.shape[1] * 4
    raw = reader.read_raw("l.weight", 10, 20)
    assert raw.dtype == torch.float8_e4m3fn and _bytes(raw) == _bytes(w[10:20])


def test_fp8_block_scale_on_stacked_experts(tmp_path):
    gen = torch.Generator().manual_seed(2)
    w = _fp8((2, 150, 70), gen, torch.float8_e5m2)
    s = (torch.rand((2, 3, 2), generator=gen) + 0.5).to(torch.bfloat16)
    path = str(tmp_path / "m.safetensors")
    save_file({"experts.weight": w, "experts.weight_scale_inv": s}, path)
    reader = _open(path, {"weight_block_size": [64, 64]})
    expected = _block_expected(w, s, 64, 64)
    for start, stop in [(0, 300), (140, 170), (149, 151), (290, 300)]:
        torch.testing.assert_close(reader.read_rows("experts.weight", start, stop), expected[start:stop],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("scale_shape", [(40, 1), (40,), (), (1,)])
def test_fp8_channel_and_tensor_scales(tmp_path, scale_shape):
    gen = torch.Generator().manual_seed(3)
    w = _fp8((40, 24), gen)
    s = (torch.rand(scale_shape, generator=gen) + 0.5).to(torch.float32)
    path = str(tmp_path / "m.safetensors")
    save_file({"q.weight": w, "q.weight_scale": s, "q.input_scale": torch.ones(1)}, path)
    reader = _open(path)
    assert reader.scale_kind("q.weight") == ("channel" if len(scale_shape) and scale_shape[0] == 40 else "tensor")
    assert reader.scale_names == frozenset({"q.weight_scale", "q.input_scale"})
    with safe_open(path, "pt") as f:
        decoded = f.get_tensor("q.weight").to(torch.float32)
        scales = f.get_tensor("q.weight_scale").to(torch.float32)
    expanded = torch.empty(40, 24)
    for i in range(40):
        expanded[i, :] = scales.reshape(-1)[i if scales.numel() > 1 else 0]
    for start, stop in [(0, 40), (7, 19), (39, 40)]:
        before = reader.bytes_read
        got = reader.read_rows("q.weight", start, stop)
        torch.testing.assert_close(got, decoded[start:stop] * expanded[start:stop], rtol=0, atol=0)
        n_scales = stop - start if scales.numel() > 1 else 1
        assert reader.bytes_read - before == (stop - start) * 24 + n_scales * 4


def test_fp8_without_scale_and_scales_of_non_fp8(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w = _fp8((10, 8), gen)
    path = str(tmp_path / "m.safetensors")
    save_file({"a.weight": w, "b.weight": torch.ones(4, 4), "b.weight_scale": torch.full((4, 1), 3.0)}, path)
    reader = _open(path)
    assert reader.scale_companion("a.weight") is None
    torch.testing.assert_close(reader.read_rows("a.weight"), w.to(torch.float32), rtol=0, atol=0)
    assert reader.scale_companion("b.weight") is None  # only FP8 weights are dequantised
    assert torch.equal(reader.read_rows("b.weight"), torch.ones(4, 4))


def test_fp8_scale_of_wrong_shape_is_an_input_error(tmp_path):
    gen = torch.Generator().manual_seed(5)
    path = str(tmp_path / "m.safetensors")
    save_file({"l.weight": _fp8((300, 200), gen), "l.weight_scale_inv": torch.ones(2, 2)}, path)
    reader = _open(path)
    with pytest.raises(InputError) as err:
        reader.read_rows("l.weight", 0, 1)
    assert str(err.value) == (f"{path}: tensor 'l.weight_scale_inv': scale shape (2, 2) does not fit weight "
                              "'l.weight' of shape (300, 200); expected (3, 2) (blocks 128x128), (300, 1) "
                              "(per channel) or one element")


def test_bad_weight_block_size():
    with pytest.raises(InputError, match="weight_block_size must be two positive integers"):
        RowReader({}, MemoryTransport({}), {"weight_block_size": [128]})


# --- transports -----------------------------------------------------------------------------------------------
def test_file_that_shrinks_raises_read_error(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.ones(100, 10)}, path)
    reader = _open(path)
    os.truncate(path, os.path.getsize(path) - 400)
    reader.read_rows("a", 0, 10)
    with pytest.raises(ReadError, match=r"unexpected end of file at byte \d+ .*did the file shrink\?"):
        reader.read_rows("a", 80, 100)


def test_memory_transport_reads_like_the_file(tmp_path):
    path = str(tmp_path / "m.safetensors")
    t = torch.randn(12, 3, dtype=torch.float16)
    save_file({"a": t}, path)
    _, inventory = parse_header_file(path)
    with open(path, "rb") as handle:
        reader = RowReader(inventory, MemoryTransport({path: handle.read()}))
    assert torch.equal(reader.read_raw("a", 4, 9), t[4:9])
    with pytest.raises(ReadError):
        RowReader(inventory, MemoryTransport({path: b"short"})).read_raw("a")


def test_local_transport_refuses_non_regular_files(tmp_path):
    transport = LocalTransport()
    with pytest.raises(ReadError, match="no longer a regular file"):
        transport.pread_into(str(tmp_path), 0, memoryview(bytearray(4)))


# --- memory budget ------------------------------------------------------------------------------------------------
_PASS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    from hf_provenance.sources.header import parse_header_file
    from hf_provenance.sources.reader import LocalTransport, RowReader

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    _, inventory = parse_header_file(sys.argv[1])
    reader = RowReader(inventory, LocalTransport())
    base = hwm()
    info = inventory["w"]
    step = (32 << 20) // info.row_bytes
    checksum = 0.0
    for start in range(0, info.n_rows, step):
        checksum += float(reader.read_rows("w", start, min(start + step, info.n_rows))[0].sum())
    print(json.dumps({"hwm": hwm(), "before": base, "bytes_read": reader.bytes_read, "checksum": checksum}))
""")


@pytest.mark.slow
def test_full_pass_over_2gib_file_keeps_rss_small(tmp_path):
    rows, cols = 131072, 4096  # float32: exactly 2 GiB
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    header += " " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    try:
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header.encode())
            handle.truncate(8 + len(header) + rows * cols * 4)  # sparse: reads back as zeros
        out = subprocess.run([sys.executable, "-c", _PASS, str(path), ROOT], capture_output=True, text=True,
                             timeout=120, check=True)
    finally:
        path.unlink(missing_ok=True)
    result = json.loads(out.stdout)
    assert result["bytes_read"] == 2 * 2**30
    assert result["checksum"] == 0.0
    assert result["hwm"] < 600 * 2**20, result
