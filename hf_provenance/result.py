"""Result objects: frozen dataclasses with ``to_dict()``; every renderer reads ``to_dict()`` and never recomputes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_provenance.statistics.aggregate import GroupEffect
from hf_provenance.statistics.tensor import TensorResult
from hf_provenance.verdict import Verdict

COMPARE_SCHEMA = "hf-provenance.compare/1"


@dataclass(frozen=True)
class ModelRef:
    ref: str
    revision: str | None
    content_id: dict[str, Any]
    kind: str

    def to_dict(self) -> dict:
        return {"ref": self.ref, "revision": self.revision, "content_id": self.content_id, "kind": self.kind}


@dataclass(frozen=True)
class Comparison:
    base: ModelRef
    verdict: Verdict
    components: dict[str, GroupEffect]
    layers: tuple[GroupEffect, ...]
    overall: GroupEffect
    tensors: tuple[TensorResult, ...]
    alignment: dict[str, Any]
    architecture: dict[str, Any] | None
    io: dict[str, Any]
    declared: dict[str, Any]
    rule_of_thumb: dict[str, Any]
    layer_readings: tuple[dict, ...] = ()
    unmatched: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()
    rank: int = 1

    def to_dict(self) -> dict:
        d = {"base": self.base.to_dict(), "rank": self.rank}
        d.update(self.verdict.to_dict())
        d.update({
            "overall": self.overall.to_dict(),
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "layers": [dict(g.to_dict(), layer=int(g.name), **extra)
                       for g, extra in zip(self.layers, self.layer_readings or [{}] * len(self.layers))],
            "tensors": [t.to_dict() for t in self.tensors],
            "alignment": self.alignment,
            "architecture": self.architecture,
            "declared": self.declared,
            "rule_of_thumb": self.rule_of_thumb,
            "unmatched": list(self.unmatched),
            "io": self.io,
            "notes": list(self.notes),
        })
        return d


@dataclass(frozen=True)
class CompareReport:
    tool: dict[str, str]
    run: dict[str, Any]
    model: ModelRef
    comparisons: tuple[Comparison, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    merge: dict | None = None   # with ≥ 2 bases: the least-squares fit M ≈ Σ wᵢ·Bᵢ (alignment.merge)
    lineage: dict | None = None  # with ≥ 2 derived/partial bases: where the lineages meet (alignment.lineage)

    def to_dict(self) -> dict:
        return {"schema": COMPARE_SCHEMA, "tool": self.tool, "run": self.run, "model": self.model.to_dict(),
                "comparisons": [c.to_dict() for c in self.comparisons], "notes": list(self.notes),
                "merge": self.merge, "lineage": self.lineage}
