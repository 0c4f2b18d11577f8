"""Vocabulary row maps: rows of vocabulary-indexed tensors are paired by token string, not by id.

This module pairs exact token strings (special tokens included); normalisation across tokenizer families
(byte-level BPE, sentencepiece ``▁``, WordPiece ``##``) belongs to the alignment issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_provenance.sources.base import Vocabulary


@dataclass(frozen=True)
class VocabMap:
    base_rows: np.ndarray
    model_rows: np.ndarray
    method: str               # "token strings" | "ids (no tokenizer on one side)" | "identity"
    shared: int
    base_size: int
    model_size: int
    base_only: int
    model_only: int

    @property
    def is_identity(self) -> bool:
        return (self.method == "identity" or (len(self.base_rows) == self.base_size == self.model_size
                and bool(np.array_equal(self.base_rows, self.model_rows))
                and bool(np.array_equal(self.base_rows, np.arange(self.base_size)))))

    def to_dict(self) -> dict:
        return {"method": self.method, "shared": self.shared, "base_rows": self.base_size,
                "model_rows": self.model_size, "base_only": self.base_only, "model_only": self.model_only}


def vocab_map(base: Vocabulary | None, model: Vocabulary | None, base_rows: int, model_rows: int) -> VocabMap:
    """Pair the rows of two vocabulary-indexed tensors with ``base_rows`` and ``model_rows`` rows."""
    if base is not None and model is not None:
        pairs = sorted((i, model.tokens[t]) for t, i in base.tokens.items()
                       if t in model.tokens and i < base_rows and model.tokens[t] < model_rows)
        # one row per id on each side (a tokenizer can alias two strings to one id)
        seen_a, seen_b, keep = set(), set(), []
        for a, b in pairs:
            if a not in seen_a and b not in seen_b:
                seen_a.add(a)
                seen_b.add(b)
                keep.append((a, b))
        arr = np.array(keep, dtype=np.int64).reshape(-1, 2)
        method = "token strings"
    else:
        k = min(base_rows, model_rows)
        arr = np.stack([np.arange(k), np.arange(k)], axis=1)
        method = "identity" if base_rows == model_rows else "ids (no tokenizer on one side)"
    n = len(arr)
    return VocabMap(arr[:, 0], arr[:, 1], method, n, base_rows, model_rows, base_rows - n, model_rows - n)
