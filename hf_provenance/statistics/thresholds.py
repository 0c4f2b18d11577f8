"""The decision thresholds, stored in the package with the run that set them (DESIGN §Statistics 6).

r_derived / z_derived: a tensor is evidence of shared lineage when |r| ≥ r_derived and |z| ≥ z_derived.
delta: the equivalence margin; ``independent`` needs the upper bound of the aligned effect below it.
min_evidence_tensors: replication: a component needs this many evidence tensors (or all it has, if fewer).
coverage_independent: share of compared parameters on which alignment must have been attempted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    r_derived: float
    z_derived: float
    delta: float
    min_evidence_tensors: int
    coverage_independent: float
    source: str
    calibration: Any = None

    def to_dict(self) -> dict:
        return asdict(self)


def load() -> Thresholds:
    data = json.loads(resources.files("hf_provenance.statistics").joinpath("thresholds.json").read_text())
    return Thresholds(**data)
