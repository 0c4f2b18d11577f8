"""AlignmentPlan: which base tensor is compared with which candidate tensor, and how rows/columns correspond.

Measurement consumes only plans. The identity plan pairs tensors with the same canonical key and the same shape;
richer plans (permutations, layer maps, vocabulary row maps, fused-tensor splits) come from the alignment stage.
Row maps are expressed in the base's row index space: ``row_map[i]`` is the candidate row compared with base row
``base_rows[i]`` (both in the tensors' 2-D views).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What an axis of a tensor means for the null (DESIGN §Statistics 1): only "arbitrary" axes may be permuted.
ARBITRARY, VOCAB, POSITION, ROTARY, TYPE = "arbitrary", "vocab", "position", "rotary", "type"
# Tokens of PairSpec.layout (";"-separated) that measurement acts on: that side is stored [.., in, out] (GPT-2
# Conv1D) and its rows are read from the transposed view [.., out, in] (measurement/transposed.py).
TRANSPOSE_BASE, TRANSPOSE_CAND = "transpose:base", "transpose:cand"


@dataclass(frozen=True, eq=False)
class PairSpec:
    """One comparison: base tensor vs candidate tensor.

    base_rows/cand_rows: int arrays of equal length selecting rows of each 2-D view (None = all rows, in order);
    for a 1-D pair they select elements (a fused bias split into its pieces). A side marked transposed in ``layout``
    is indexed in its transposed view ``[.., out, in]`` flattened to 2-D.
    col_map: candidate column for each base column (None = identity). col_sign: ±1 per base column or None.
    base_cols: base columns compared (None = all, in order), for a candidate that holds a subset of the base's
    columns (an expert cut from a dense MLP's units: the dense ffn_down's columns of that slice); col_map and
    col_sign then index the compared columns.
    axes: meaning of (row axis, column axis) for the null; 1-D tensors have a single-entry tuple.
    wide: a layer-mapped pair measured without the rows its layer sketch read is this pair with all its rows (the
    searches fit unit and head maps on whole tensors); sketch_raw: on such a whole pair, the stored rows of (base,
    candidate) that the sketch read, to be left out again once the searches are done (``layers.narrow``).
    """

    key: Any                       # CanonicalKey
    base_name: str
    cand_name: str
    shape: tuple[int, ...]         # compared 2-D shape (rows, cols) in the base's index space, or (n,) for 1-D
    axes: tuple[str, ...]
    component: str
    layer: int | None = None
    base_rows: np.ndarray | None = None
    cand_rows: np.ndarray | None = None
    col_map: np.ndarray | None = None
    col_sign: np.ndarray | None = None
    row_sign: np.ndarray | None = None   # ±1 per compared row (residual sign flips on a row axis)
    col_scale: np.ndarray | None = None  # factor per compared column on the candidate (after col_map, as col_sign)
    evidence: bool = True                # False when a map was fitted on this tensor (no valid null left)
    layout: str | None = None      # ";"-joined: "transpose:base" / "transpose:cand", "split:attn_qkv:concat>per_head"
    note: str | None = None
    base_cols: np.ndarray | None = None
    wide: "PairSpec | None" = None
    sketch_raw: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) == 2 else 1

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def transposed(self) -> tuple[bool, bool]:
        """Whether the (base, candidate) tensor is read through its transposed view (see ``layout``)."""
        tokens = set((self.layout or "").split(";"))
        return TRANSPOSE_BASE in tokens, TRANSPOSE_CAND in tokens

    @property
    def is_vector(self) -> bool:
        return len(self.shape) == 1

    @property
    def n_arbitrary(self) -> int:
        return sum(a == ARBITRARY for a in self.axes)


@dataclass(frozen=True)
class Unmatched:
    """A tensor on one side with no counterpart on the other, and why."""

    side: str  # "base" | "model"
    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"side": self.side, "name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class AlignmentPlan:
    pairs: tuple[PairSpec, ...]
    unmatched: tuple[Unmatched, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)  # alignment{residual,units,heads,layers,experts,vocab}
    notes: tuple[str, ...] = ()

    @property
    def compared_params(self) -> int:
        return sum(p.numel for p in self.pairs)
