"""What every model source gives the stages above it, whatever the transport.

A source (local folder, single file, HF cache snapshot, Hub repo) exposes metadata read without weight bytes and a
``TensorReader`` that decodes row blocks on demand. Nothing above this module knows where the bytes come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# safetensors dtype name -> (bytes per element, torch dtype or None when torch lacks it)
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "U16": (2, getattr(torch, "uint16", None)),
    "U32": (4, getattr(torch, "uint32", None)),
    "U64": (8, getattr(torch, "uint64", None)),
    "BOOL": (1, torch.bool),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it. ``start``/``end`` are absolute byte offsets in ``file``.

    Rows are the rows of the 2-D view ``(prod(shape[:-1]), shape[-1])``: each row is contiguous on disk.
    A 0-D or 1-D tensor is a single row.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) >= 2 else 1

    @property
    def row_len(self) -> int:
        return self.shape[-1] if len(self.shape) >= 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.row_len * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class CardMetadata:
    """What the model card's YAML header declares (never evidence, only claims to check)."""

    base_model: tuple[str, ...] = ()
    base_model_relation: str | None = None
    license: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"base_model": list(self.base_model), "base_model_relation": self.base_model_relation,
                "license": self.license}


@dataclass(frozen=True)
class Vocabulary:
    """Token string -> id, as stored by the tokenizer file it came from (``kind`` names that file's format)."""

    kind: str  # "tokenizer.json" | "vocab.txt" | "tokenizer.model"
    tokens: dict[str, int]
    special: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ContentId:
    """Identifies the exact weights without reading them (DESIGN: content_id).

    kind: "layout_id" (local: hash of headers and file sizes) or "hub" (commit SHA + per-file LFS sha256).
    """

    kind: str
    value: str
    revision: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "revision": self.revision, "files": dict(self.files)}


class TensorReader(Protocol):
    """Decodes row blocks. Every byte fetched is added to ``bytes_read``."""

    bytes_read: int

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor's 2-D view, decoded to float32 (FP8 scales applied), shape (k, row_len)."""

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype (no scale applied), shape (k, row_len)."""

    def close(self) -> None: ...


class ModelSource(Protocol):
    """A model, opened. Built by ``hf_provenance.sources.open_model(ref)``."""

    ref: str                      # what the user typed
    kind: str                     # "folder" | "file" | "hf-cache" | "hub"
    path: str | None              # local path when there is one
    revision: str | None          # commit SHA for Hub refs
    config: dict[str, Any] | None
    inventory: dict[str, TensorInfo]
    vocab: Vocabulary | None
    card: CardMetadata
    content_id: ContentId
    quantization: str | None      # quantization_config.quant_method, if any
    adapter: dict[str, Any] | None  # adapter_config.json, if any
    notes: list[str]              # things the source noticed (offline cache used, ...)

    @property
    def reader(self) -> TensorReader: ...
