"""Hostile and broken inputs: each must fail with the exact error class and one line ``where: problem``.

Longer fuzzing (default 300 examples per fuzz test):
    HF_PROVENANCE_FUZZ_EXAMPLES=200000 PYTHONPATH=. python -m pytest tests/test_malformed_inputs.py -k fuzz
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hf_provenance.errors import (ConfigError, HeaderError, IndexError_, InputError, LFSPointerError,
                                  ModelNotFoundError, PathEscapeError, UnsafeFormatError)
from hf_provenance.sources import open_model
from hf_provenance.sources.header import parse_header

FUZZ_EXAMPLES = int(os.environ.get("HF_PROVENANCE_FUZZ_EXAMPLES", "300"))
LFS = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
       "4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
LFS_HINT = ("is a Git LFS pointer, not the weights: fetch them with `git lfs pull` (or `lfs: true` in "
            "actions/checkout), or pass the Hub id instead")
UNPICKLE = ("refusing to unpickle (pickle files can run code when loaded); convert the checkpoint to safetensors, "
            "or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)")
KNOWN = "BF16, BOOL, F16, F32, F64, F8_E4M3, F8_E5M2, I16, I32, I64, I8, U16, U32, U64, U8"


def raw_safetensors(path, header, data: bytes | int = 0) -> int:
    """Write ``path`` with ``header`` (dict, or bytes used verbatim) and data; return the data section's start."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    data = bytes(data) if isinstance(data, int) else data
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return 8 + len(blob)


def f32(shape, begin):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def model_folder(tmp, config=True):
    folder = tmp / "model"
    folder.mkdir()
    if config:
        (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def sharded(tmp, weight_map, shards):
    """A folder with an index ``weight_map`` and ``shards`` = {file: {tensor: tensor}}."""
    folder = model_folder(tmp)
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


CASES: list = []


def case(error, ref_kwargs=None):
    """Register a builder ``(tmp) -> (ref, expected message)`` expected to raise ``error``."""

    def register(build):
        CASES.append(pytest.param(build, error, ref_kwargs or {}, id=build.__name__))
        return build

    return register


# --- headers (single file) --------------------------------------------------------------------------------------
def header_case(name, header, data, problem, data_end=0):
    """A single-file case; ``problem`` may use {size} (file size) and {end} (file offset of data byte data_end)."""

    def build(tmp):
        path = tmp / "m.safetensors"
        start = raw_safetensors(path, header, data)
        expected = problem.replace("{end}", str(start + data_end)).replace("{size}", str(path.stat().st_size))
        return str(path), f"{path}: {expected}"

    build.__name__ = name
    case(HeaderError)(build)


@case(HeaderError)
def empty_file(tmp):
    (tmp / "m.safetensors").write_bytes(b"")
    return str(tmp / "m.safetensors"), f"{tmp / 'm.safetensors'}: file is 0 bytes; a safetensors file starts with " \
                                       "an 8-byte header length"


@case(HeaderError)
def shorter_than_8_bytes(tmp):
    (tmp / "m.safetensors").write_bytes(b"\x01\x02\x03")
    return str(tmp / "m.safetensors"), f"{tmp / 'm.safetensors'}: file is 3 bytes; a safetensors file starts with " \
                                       "an 8-byte header length"


@case(HeaderError)
def header_length_past_end(tmp):
    (tmp / "m.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    return str(tmp / "m.safetensors"), f"{tmp / 'm.safetensors'}: header length 1000 runs past the end of the " \
                                       "file (8 + 1000 > 10 bytes); file truncated or not safetensors"


@case(HeaderError)
def header_length_over_100mb(tmp):
    path = tmp / "m.safetensors"
    with open(path, "wb") as handle:  # sparse: 100 MB of nothing on disk
        handle.write(struct.pack("<Q", 100_000_001))
        handle.truncate(100_000_100)
    return str(path), f"{path}: header length 100000001 exceeds the 100000000-byte limit"


header_case("invalid_utf8", b'{"\xff": 1}', 0, "header is not valid UTF-8 (invalid start byte at byte 10)")
header_case("invalid_json", b'{"a": ', 0, "header is not valid JSON (Expecting value: line 1 column 7 (char 6))")
header_case("empty_header", b"", 0, "header is not valid JSON (Expecting value: line 1 column 1 (char 0))")
header_case("nan_in_json", b'{"a": NaN}', 0, "header is not valid JSON (NaN is not allowed)")
header_case("deep_nesting", b"[" * 100_000, 0, "header is not valid JSON (nested too deeply)")
header_case("huge_integer", b'{"a": ' + b"9" * 5000 + b"}", 0,
            "header is not valid JSON (a number has too many digits)")
header_case("header_not_object", b"[1, 2]", 0, "header must be a JSON object, got array")
header_case("duplicate_tensor_name",
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8, "duplicate key 'w' in header")
header_case("metadata_not_strings", {"__metadata__": {"a": 1}}, 0,
            '__metadata__ must map strings to strings, got {"a": 1}')
header_case("entry_not_object", {"w": 5}, 0,
            "tensor 'w': entry must be an object with dtype, shape and data_offsets, got 5")
header_case("missing_dtype", {"w": {"shape": [1], "data_offsets": [0, 4]}}, 4, "tensor 'w': missing 'dtype'")
header_case("missing_data_offsets", {"w": {"dtype": "F32", "shape": [1]}}, 4, "tensor 'w': missing 'data_offsets'")
header_case("unknown_dtype", {"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, 1,
            f"tensor 'w': unknown dtype \"F7\" (known: {KNOWN})")
header_case("shape_not_list", {"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, 16,
            "tensor 'w': shape must be a list of non-negative integers, got \"2x2\"")
header_case("negative_dim", {"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}, 0,
            "tensor 'w': shape must be a list of non-negative integers, got [2, -1]")
header_case("float_dim", {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8,
            "tensor 'w': shape must be a list of non-negative integers, got [2.0]")
header_case("boolean_dim", {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4,
            "tensor 'w': shape must be a list of non-negative integers, got [true]")
header_case("absurd_dim", {"w": {"dtype": "U8", "shape": [2**41], "data_offsets": [0, 2**41]}}, 0,
            "tensor 'w': shape [2199023255552] has a dimension above 2**40")
header_case("absurd_numel", {"w": {"dtype": "U8", "shape": [2**30, 2**30], "data_offsets": [0, 1]}}, 0,
            "tensor 'w': shape [1073741824, 1073741824] has 1152921504606846976 elements, above 2**48")
header_case("offsets_not_pair", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4,
            "tensor 'w': data_offsets must be [begin, end] non-negative integers, got [0]")
header_case("offsets_negative", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, 4,
            "tensor 'w': data_offsets must be [begin, end] non-negative integers, got [-4, 0]")
header_case("offsets_end_before_begin", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, 4,
            "tensor 'w': data_offsets [4, 0] end before they begin")
header_case("size_not_numel_times_itemsize", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
            12, "tensor 'w': data_offsets [0, 12] hold 12 bytes, expected 16 (shape [2, 2] x 4 bytes of F32)")
header_case("offsets_out_of_file", {"a": f32([4], 0), "b": f32([4], 100)}, 16,
            "tensor 'b': data_offsets [100, 116] start past the end of the data section (16 bytes)")
header_case("overlapping_tensors", {"a": f32([4], 0), "b": f32([4], 8)}, 24,
            "tensors 'a' and 'b' overlap: 'a' is [0, 16], 'b' is [8, 24]")
header_case("gap_between_tensors", {"a": f32([4], 0), "b": f32([4], 24)}, 40,
            "gap of 8 bytes before tensor 'b' (data bytes [16, 24] belong to no tensor)")
header_case("data_not_starting_at_zero", {"a": f32([4], 8)}, 24,
            "gap of 8 bytes before tensor 'a' (data bytes [0, 8] belong to no tensor)")
header_case("truncated_file", {"a": f32([4], 0), "b": f32([4], 16)}, 20,
            "file truncated: tensor 'b' ends at byte {end} but the file has {size} bytes", data_end=32)
header_case("bytes_after_last_tensor", {"a": f32([4], 0)}, 20,
            "4 bytes after the last tensor (tensors end at byte {end}, the file has {size} bytes)", data_end=16)


@case(LFSPointerError)
def lfs_pointer_single_file(tmp):
    (tmp / "model.safetensors").write_text(LFS)
    return str(tmp / "model.safetensors"), f"{tmp / 'model.safetensors'}: {LFS_HINT}"


# --- sharded index ---------------------------------------------------------------------------------------------
@case(PathEscapeError)
def index_traversal(tmp):
    save_file({"w": torch.zeros(1)}, str(tmp / "outside.safetensors"))
    folder = sharded(tmp, {"w": "../outside.safetensors"}, {})
    return str(folder), (f"{folder / 'model.safetensors.index.json'}: weight_map entry '../outside.safetensors' "
                         "for tensor 'w' points outside the model folder; shards must be inside the model folder")


@case(PathEscapeError)
def index_absolute_path(tmp):
    target = tmp / "outside.safetensors"
    save_file({"w": torch.zeros(1)}, str(target))
    folder = sharded(tmp, {"w": str(target)}, {})
    return str(folder), (f"{folder / 'model.safetensors.index.json'}: weight_map entry '{target}' for tensor 'w' "
                         "is an absolute path; shards must be inside the model folder")


@case(IndexError_)
def index_missing_shard(tmp):
    folder = sharded(tmp, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"},
                     {"s1.safetensors": {"a": torch.zeros(1)}})
    return str(folder), (f"{folder / 's2.safetensors'}: shard listed in model.safetensors.index.json is missing "
                         "(it holds tensor 'b' and 1 more)")


@case(IndexError_)
def index_tensor_absent_from_shard(tmp):
    folder = sharded(tmp, {"a": "s1.safetensors", "ghost": "s1.safetensors"}, {"s1.safetensors": {"a": torch.zeros(1)}})
    return str(folder), (f"{folder / 's1.safetensors'}: tensor 'ghost' is listed for this shard in "
                         "model.safetensors.index.json but absent from it")


@case(IndexError_)
def index_does_not_list_tensor(tmp):
    folder = sharded(tmp, {"a": "s1.safetensors"}, {"s1.safetensors": {"a": torch.zeros(1), "extra": torch.ones(1)}})
    return str(folder), (f"{folder / 's1.safetensors'}: tensor 'extra' is in this shard but "
                         "model.safetensors.index.json does not list it")


@case(IndexError_)
def index_maps_tensor_to_other_shard(tmp):
    folder = sharded(tmp, {"a": "s1.safetensors", "b": "s2.safetensors"},
                     {"s1.safetensors": {"a": torch.zeros(1), "b": torch.ones(1)}, "s2.safetensors": {}})
    return str(folder), (f"{folder / 's1.safetensors'}: tensor 'b' is in this shard but "
                         "model.safetensors.index.json maps it to s2.safetensors")


@case(IndexError_)
def index_invalid_json(tmp):
    folder = model_folder(tmp)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    return str(folder), (f"{folder / 'model.safetensors.index.json'}: not valid JSON (Expecting value: line 1 "
                         "column 16 (char 15))")


@case(IndexError_)
def index_without_weight_map(tmp):
    folder = model_folder(tmp)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return str(folder), (f"{folder / 'model.safetensors.index.json'}: must hold a \"weight_map\" object mapping "
                         "tensor names to shard files")


@case(IndexError_)
def index_weight_map_empty(tmp):
    folder = model_folder(tmp)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    return str(folder), f"{folder / 'model.safetensors.index.json'}: weight_map is empty"


@case(IndexError_)
def index_weight_map_values_not_strings(tmp):
    folder = model_folder(tmp)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": 3}}')
    return str(folder), (f"{folder / 'model.safetensors.index.json'}: must hold a \"weight_map\" object mapping "
                         "tensor names to shard files")


@case(LFSPointerError)
def lfs_pointer_shard(tmp):
    folder = sharded(tmp, {"a": "s1.safetensors", "b": "s2.safetensors"}, {"s1.safetensors": {"a": torch.zeros(1)}})
    (folder / "s2.safetensors").write_text(LFS)
    return str(folder), f"{folder / 's2.safetensors'}: {LFS_HINT}"


@case(InputError)
def same_tensor_in_two_files_without_index(tmp):
    folder = model_folder(tmp)
    save_file({"w": torch.zeros(1)}, str(folder / "a.safetensors"))
    save_file({"w": torch.zeros(1)}, str(folder / "b.safetensors"))
    return str(folder), f"{folder / 'b.safetensors'}: tensor 'w' also appears in {folder / 'a.safetensors'}"


# --- symlinks ----------------------------------------------------------------------------------------------------
@case(PathEscapeError)
def symlink_to_outside_file(tmp):
    secret = tmp / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    folder = model_folder(tmp)
    os.symlink(secret, folder / "model.safetensors")
    real = os.path.realpath(secret)
    return str(folder), f"{folder / 'model.safetensors'}: resolves to {real}, outside the model folder"


@case(PathEscapeError)
def symlink_to_device(tmp):
    folder = model_folder(tmp)
    os.symlink("/dev/zero", folder / "model.safetensors")
    return str(folder), f"{folder / 'model.safetensors'}: resolves to /dev/zero, outside the model folder"


@case(PathEscapeError)
def symlink_to_fifo(tmp):
    folder = model_folder(tmp)
    os.mkfifo(folder / "pipe")
    os.symlink("pipe", folder / "model.safetensors")
    return str(folder), (f"{folder / 'model.safetensors'}: resolves to {os.path.realpath(folder / 'pipe')}, which "
                         "is a FIFO, not a regular file")


@case(PathEscapeError)
def fifo_named_like_weights(tmp):
    folder = model_folder(tmp)
    os.mkfifo(folder / "model.safetensors")
    return str(folder), f"{folder / 'model.safetensors'}: is a FIFO, not a regular file"


@case(PathEscapeError)
def symlink_to_directory(tmp):
    folder = model_folder(tmp)
    (folder / "sub").mkdir()
    os.symlink("sub", folder / "model.safetensors")
    return str(folder), (f"{folder / 'model.safetensors'}: resolves to {os.path.realpath(folder / 'sub')}, which "
                         "is a directory, not a regular file")


@case(PathEscapeError)
def shard_symlink_escaping(tmp):
    save_file({"w": torch.zeros(1)}, str(tmp / "elsewhere.safetensors"))
    folder = sharded(tmp, {"w": "s1.safetensors"}, {})
    os.symlink(tmp / "elsewhere.safetensors", folder / "s1.safetensors")
    return str(folder), (f"{folder / 's1.safetensors'}: resolves to {os.path.realpath(tmp / 'elsewhere.safetensors')}"
                         ", outside the model folder")


def _cache_snapshot(tmp, repo="models--org--name"):
    snap = tmp / repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp / repo / "blobs").mkdir()
    (snap / "config.json").write_text("{}")
    return snap


@case(PathEscapeError)
def cache_symlink_into_other_repo_blobs(tmp):
    snap = _cache_snapshot(tmp)
    other = _cache_snapshot(tmp, "models--evil--repo").parent.parent / "blobs" / "deadbeef"
    save_file({"w": torch.zeros(1)}, str(other))
    os.symlink(os.path.relpath(other, snap), snap / "model.safetensors")
    return str(snap), (f"{snap / 'model.safetensors'}: resolves to {os.path.realpath(other)}, outside the model "
                       "folder and its HF cache blobs/")


@case(ModelNotFoundError)
def cache_symlink_to_missing_blob(tmp):
    snap = _cache_snapshot(tmp)
    os.symlink("../../blobs/0000", snap / "model.safetensors")
    blob = os.path.realpath(snap.parent.parent / "blobs" / "0000")
    return str(snap), f"{snap / 'model.safetensors'}: symlink target {blob} does not exist (incomplete download?)"


@case(PathEscapeError)
def config_symlink_to_outside(tmp):
    secret = tmp / "secret.json"
    secret.write_text("{}")
    folder = tmp / "model"
    folder.mkdir()
    os.symlink(secret, folder / "config.json")
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    return str(folder), f"{folder / 'config.json'}: resolves to {os.path.realpath(secret)}, outside the model folder"


# --- pickles -----------------------------------------------------------------------------------------------------
@case(UnsafeFormatError)
def pickle_bin_in_folder(tmp):
    folder = model_folder(tmp)
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return str(folder), f"{folder / 'pytorch_model.bin'}: {UNPICKLE}"


@case(UnsafeFormatError)
def pickle_sharded_index(tmp):
    folder = model_folder(tmp)
    for i in (1, 2):
        torch.save({f"w{i}": torch.zeros(1)}, folder / f"pytorch_model-0000{i}-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"w1": "pytorch_model-00001-of-00002.bin", "w2": "pytorch_model-00002-of-00002.bin"}}))
    return str(folder), f"{folder / 'pytorch_model-00001-of-00002.bin'}: {UNPICKLE}"


@case(UnsafeFormatError)
def pickle_single_pt_file(tmp):
    torch.save({"w": torch.zeros(1)}, tmp / "weights.pt")
    return str(tmp / "weights.pt"), f"{tmp / 'weights.pt'}: {UNPICKLE}"


@case(UnsafeFormatError)
def pickle_ckpt_without_config(tmp):
    folder = model_folder(tmp, config=False)
    (folder / "model.ckpt").write_bytes(b"\x80\x04K\x01.")
    return str(folder), f"{folder / 'model.ckpt'}: {UNPICKLE}"


@case(UnsafeFormatError, {"allow_pickle": False})
def pickle_refused_even_with_explicit_false(tmp):
    (tmp / "w.pth").write_bytes(b"\x80\x04K\x01.")
    return str(tmp / "w.pth"), f"{tmp / 'w.pth'}: {UNPICKLE}"


# --- config and folder --------------------------------------------------------------------------------------------
@case(ConfigError)
def config_invalid_json(tmp):
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{'model_type': 'bert'}")
    return str(folder), (f"{folder / 'config.json'}: not valid JSON (Expecting property name enclosed in double "
                         "quotes: line 1 column 2 (char 1))")


@case(ConfigError)
def config_not_object(tmp):
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text("[1]")
    return str(folder), f"{folder / 'config.json'}: must be a JSON object, got list"


@case(ConfigError)
def config_not_utf8(tmp):
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"a": "\xff"}')
    return str(folder), f"{folder / 'config.json'}: not valid UTF-8 (invalid start byte at byte 7)"


@case(ConfigError)
def adapter_config_invalid(tmp):
    folder = model_folder(tmp)
    (folder / "adapter_config.json").write_text("nope")
    return str(folder), f"{folder / 'adapter_config.json'}: not valid JSON (Expecting value: line 1 column 1 (char 0))"


@case(ModelNotFoundError)
def empty_folder(tmp):
    folder = model_folder(tmp, config=False)
    return str(folder), f"{folder}: no config.json and no weight files (*.safetensors) in this folder"


@case(ModelNotFoundError)
def nonexistent_path(tmp):
    return str(tmp / "nope"), f"{tmp / 'nope'}: no such file or folder"


@case(ModelNotFoundError)
def hub_id_offline_not_in_cache(tmp):
    home = os.environ["HF_HOME"]  # the test session's empty HF_HOME; HF_HUB_OFFLINE=1 (conftest)
    return "some-org/some-model@main", (
        f"some-org/some-model@main: not in the local HF cache ({home}/hub), and no local file or folder by that "
        "name; HF_HUB_OFFLINE=1 keeps the Hub off: download it first (`hf download some-org/some-model --revision "
        "main`) or unset HF_HUB_OFFLINE")


@case(InputError)
def unsupported_file_type(tmp):
    (tmp / "model.gguf").write_bytes(b"GGUF")
    return str(tmp / "model.gguf"), (f"{tmp / 'model.gguf'}: unsupported file type; expected a .safetensors file or "
                                     "a model folder")


@case(ModelNotFoundError)
def cache_repo_with_two_snapshots_and_no_ref(tmp):
    repo = tmp / "models--org--name"
    for sha in ("a1", "b2"):
        (repo / "snapshots" / sha).mkdir(parents=True)
    return str(repo), (f"{repo}: HF cache repo with 2 snapshots and no usable refs/main; pass the snapshot folder "
                       "(snapshots/<sha>)")


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("build,error,kwargs", CASES)
def test_malformed_input(tmp_path, build, error, kwargs):
    ref, message = build(tmp_path)
    with pytest.raises(error) as err:
        open_model(ref, **kwargs)
    assert type(err.value) is error, f"expected exactly {error.__name__}, got {type(err.value).__name__}"
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("build,error,kwargs", [c for c in CASES if not c.values[2]])
def test_malformed_input_through_the_cli(tmp_path, capsys, build, error, kwargs):
    """The same corpus through `hf-provenance inspect`: exactly one stderr line, the exit code, no traceback."""
    from hf_provenance.cli.main import main

    ref, message = build(tmp_path)
    code = main(["inspect", ref])
    err = capsys.readouterr().err
    assert code == error.exit_code == 2
    assert err == f"hf-provenance: {message}\n"
    assert "Traceback" not in err


def test_cache_blob_symlink_is_accepted(tmp_path):
    snap = _cache_snapshot(tmp_path)
    blob = snap.parent.parent / "blobs" / "abcdef"
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(blob))
    os.symlink("../../blobs/abcdef", snap / "model.safetensors")
    src = open_model(str(snap))
    assert src.kind == "hf-cache"
    assert torch.equal(src.reader.read_rows("w", 1, 2), torch.tensor([[3.0, 4.0, 5.0]]))


def test_symlink_inside_model_folder_is_accepted(tmp_path):
    folder = model_folder(tmp_path)
    (folder / "store").mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "store" / "real.safetensors"))
    os.symlink("store/real.safetensors", folder / "model.safetensors")
    assert set(open_model(str(folder)).inventory) == {"w"}


# --- fuzzing -----------------------------------------------------------------------------------------------------
def _valid_file() -> bytes:
    header = {"__metadata__": {"format": "pt"}, "a": f32([2, 3], 0),
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
              "c": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [32, 36]}}
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + bytes(range(36))


VALID = _valid_file()


def _parse_only_header_errors(data: bytes, file_size: int | None = None) -> None:
    size = len(data) if file_size is None else file_size
    try:
        _, tensors = parse_header(lambda offset, length: data[offset: offset + length], size, "fuzz")
    except (HeaderError, LFSPointerError) as exc:
        assert str(exc).startswith("fuzz: ") and "\n" not in str(exc)
        return
    covered = sorted((t.start, t.end) for t in tensors.values())
    assert all(0 < s <= e <= size for s, e in covered)
    if covered:
        assert covered[-1][1] == size


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 2**64)))
def test_fuzz_random_bytes(data, file_size):
    _parse_only_header_errors(data, file_size)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)), st.binary(max_size=20))
def test_fuzz_mutated_valid_file(flips, cut, tail):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    _parse_only_header_errors(bytes(data[:cut]) + tail)


def _containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)


_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5)
_json_value = st.recursive(_scalars, _containers, max_leaves=8)
_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8_E5M2", "X", ""]) | _json_value,
    "shape": st.lists(st.integers(-2, 2**50), max_size=3) | _json_value,
    "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | _json_value})


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.text(max_size=4), _entry | _json_value, max_size=4), st.integers(0, 80))
def test_fuzz_structured_headers(header, data_len):
    blob = json.dumps(header).encode()
    _parse_only_header_errors(struct.pack("<Q", len(blob)) + blob + bytes(data_len))
