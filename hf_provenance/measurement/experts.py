"""Under ``--sample``, routed experts too small to sample by row blocks are sampled whole, layer by layer.

DESIGN reads a tensor with fewer than 30 row blocks fully. Fine-grained MoEs store many small experts per layer
(Qwen3-30B-A3B: 128 experts of 768×2048 per layer; GLM-4.5-Air and Solar-Open-100B: 128 of 1408×4096): read fully,
they made ``--sample 0.1`` read 96%, 66% and 67% of those checkpoints' bytes. The routed experts of a layer are
exchangeable units of one population, so a stratified sample of them is read instead (DESIGN §Statistics 5 with the
expert as the unit: the expert index cut into equal strata, two experts drawn in each, about the fraction asked for),
every small tensor of a chosen expert read fully. Each measured tensor then stands for N/k experts of its layer in
the aggregates, whose intervals add the between-expert variance with the finite-population correction
(``statistics.aggregate``; an expert's tensors move together, so the unit of that variance is the expert). Expert
tensors large enough to be sampled by rows keep their row sample.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from hf_provenance.measurement.sampling import stratified

MIN_EXPERTS = 8  # a layer with fewer routed experts has them all read


@dataclass(frozen=True)
class ExpertDraw:
    """One measured tensor of an expert drawn whole: the layer's expert sample it belongs to."""

    population: str   # the layer's routed experts (e.g. "blk.3"): the sampling unit is one expert of it
    expert: int       # the drawn expert (base index)
    experts: int      # N: experts of the layer with tensors this small
    drawn: int        # k: experts read

    @property
    def weight(self) -> float:
        """Experts each drawn one stands for (N/k)."""
        return self.experts / self.drawn


def expert_sample(pairs, samples, fraction: float | None, seed: int) -> list[ExpertDraw | None | bool]:
    """For each pair (with its row sample): an ExpertDraw when it is a small expert tensor that was drawn, False
    when it is one that was not (not read), None otherwise (measured as before)."""
    out: list[ExpertDraw | None | bool] = [None] * len(pairs)
    if fraction is None or fraction >= 1.0:
        return out
    by_layer: dict[int | None, list[int]] = {}
    for i, (p, s) in enumerate(zip(pairs, samples)):
        expert = getattr(p.key, "expert", None)
        if expert is not None and s.full:  # too small to sample by rows
            by_layer.setdefault(p.layer, []).append(i)
    for layer, idx in by_layer.items():
        experts = sorted({pairs[i].key.expert for i in idx})
        if len(experts) < MIN_EXPERTS:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(f"experts.{layer}".encode())])
        chosen = {experts[j] for j in stratified(len(experts), fraction, rng)[0]}
        for i in idx:
            e = pairs[i].key.expert
            out[i] = ExpertDraw(f"blk.{layer}", e, len(experts), len(chosen)) if e in chosen else False
    return out


__all__ = ["MIN_EXPERTS", "ExpertDraw", "expert_sample"]
