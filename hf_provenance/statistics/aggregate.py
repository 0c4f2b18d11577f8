"""Combine tensor effects into component, layer and overall effects (DESIGN §Statistics 4).

The effect of a group is the parameter-weighted mean Pearson r̄ of its evidence tensors, with an interval from the
tensors' sampling intervals. The group's p combines tensor p-values with the Cauchy combination test, valid under
arbitrary dependence (Liu & Xie 2020, JASA 115:393), with Bonferroni beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hf_provenance.statistics.effects import _clean
from hf_provenance.statistics.tensor import TensorResult
from hf_provenance.statistics.thresholds import Thresholds

P_FLOOR = 1e-300


def cauchy_combine(ps: list[float], weights: list[float] | None = None) -> float | None:
    """Cauchy combination of p-values; tiny p use tan((0.5−p)π) ≈ 1/(pπ)."""
    ps = [min(max(p, P_FLOOR), 1.0) for p in ps if p is not None]
    if not ps:
        return None
    w = np.ones(len(ps)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    terms = [1.0 / (p * math.pi) if p < 1e-15 else math.tan((0.5 - p) * math.pi) for p in ps]
    t = float(np.dot(w, terms))
    if t > 1e15:
        return max(1.0 / (t * math.pi), P_FLOOR)
    return float(min(1.0, max(0.5 - math.atan(t) / math.pi, P_FLOOR)))


def bonferroni(ps: list[float]) -> float | None:
    ps = [p for p in ps if p is not None]
    return float(min(1.0, max(min(ps) * len(ps), P_FLOOR))) if ps else None


@dataclass(frozen=True)
class GroupEffect:
    name: str
    n_tensors: int
    n_evidence: int              # tensors that clear the derivation threshold
    params: int
    r_mean: float | None         # parameter-weighted mean Pearson over evidence-eligible tensors
    r_abs_mean: float | None     # weighted mean |r| beyond its null expectation sqrt(2/pi)·sd0 (equivalence test)
    ci: tuple[float, float] | None
    abs_upper: float | None      # one-sided 95% upper bound of r_abs_mean
    cos_mean: float | None
    r_reported: float | None     # weighted mean Pearson over every tensor with a value (display only)
    p_cauchy: float | None
    p_bonferroni: float | None
    derived: bool
    below_delta: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "n_tensors": self.n_tensors, "n_evidence": self.n_evidence, "params": self.params,
                "pearson": {"value": _clean(self.r_mean), "ci": [_clean(x) for x in self.ci] if self.ci else None,
                            "p": _clean(self.p_cauchy), "null_method": "Cauchy combination of tensor p-values",
                            "n": self.n_tensors},
                "abs_pearson": {"value": _clean(self.r_abs_mean), "upper": _clean(self.abs_upper)},
                "pearson_reported": _clean(self.r_reported),
                "cosine": _clean(self.cos_mean), "p_bonferroni": _clean(self.p_bonferroni),
                "derived": self.derived, "below_delta": self.below_delta}


def is_evidence(t: TensorResult, th: Thresholds) -> bool:
    r, z = t.pearson.value, t.pearson.z
    return bool(t.evidence and r is not None and z is not None and abs(r) >= th.r_derived and abs(z) >= th.z_derived)


def group(name: str, tensors: list[TensorResult], th: Thresholds) -> GroupEffect:
    """A group's effect. Tensors weigh by the parameters they stand for (an expert drawn whole under --sample stands
    for N/k experts of its layer), and the interval adds the between-expert variance of such expert samples."""
    elig = [t for t in tensors if t.evidence and t.pearson.value is not None]
    params = round(sum(t.numel * t.weight for t in tensors))
    n_ev = sum(is_evidence(t, th) for t in tensors)
    cos = [(t.cosine.value, t.numel * t.weight) for t in tensors if t.cosine.value is not None]
    cos_mean = float(np.average([c for c, _ in cos], weights=[w for _, w in cos])) if cos else None
    rep = [(t.pearson.value, t.numel * t.weight) for t in tensors if t.pearson.value is not None]
    r_rep = float(np.average([c for c, _ in rep], weights=[w for _, w in rep])) if rep else None
    if not elig:
        return GroupEffect(name, len(tensors), n_ev, params, None, None, None, None, cos_mean, r_rep, None, None,
                           False, False)
    w = np.array([t.numel * t.weight for t in elig], float)
    r = np.array([t.pearson.value for t in elig])
    # sampling sd of each tensor's r from its interval (zero-width when read fully)
    sd = np.array([((t.pearson.ci[1] - t.pearson.ci[0]) / (2 * 1.96)) if t.pearson.ci else 0.0 for t in elig])
    # the null sd of each r (|r/z|; 1/sqrt(n) without a z): under independence E|r| = sqrt(2/pi)·sd0
    sd0 = np.array([abs(t.pearson.value / t.pearson.z) if t.pearson.z else 1.0 / math.sqrt(max(t.numel, 2))
                    for t in elig])
    wn = w / w.sum()
    r_mean = float(wn @ r)
    # the equivalence statistic: mean |r| in excess of what independent tensors of these sizes give
    excess = np.abs(r) - math.sqrt(2 / math.pi) * sd0
    r_abs = max(0.0, float(wn @ excess))
    between_r, between_abs = _between_experts(elig, wn, r, excess)
    se = float(math.sqrt(float((wn ** 2) @ (sd ** 2)) + between_r))
    se_abs = float(math.sqrt(float((wn ** 2) @ (sd ** 2 + (1 - 2 / math.pi) * sd0 ** 2)) + between_abs))
    upper = r_abs + 1.645 * se_abs
    ps = [t.pearson.p for t in elig if t.pearson.p is not None]
    need = min(th.min_evidence_tensors, len(elig))
    derived = n_ev >= max(1, need) and abs(r_mean) >= th.r_derived
    return GroupEffect(name, len(tensors), n_ev, params, r_mean, r_abs,
                       (max(-1.0, r_mean - 1.96 * se), min(1.0, r_mean + 1.96 * se)), upper, cos_mean, r_rep,
                       cauchy_combine(ps), bonferroni(ps), derived, upper < th.delta)


def _between_experts(elig: list[TensorResult], wn: np.ndarray, *values: np.ndarray) -> list[float]:
    """Variance that drawing experts whole adds to each weighted mean Σ wn·v. The unit is the expert (its tensors
    are drawn together, and move together: an expert re-initialised or kept shows in all of them): per layer with k
    of N experts read, k·(1 − k/N)·s², s² the variance over the drawn experts of z_e = Σ wn·v over expert e's
    tensors in the group (the expansion estimator's variance under simple random sampling of experts; the
    stratified draw only does better)."""
    z: dict[str, dict[int, list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for i, t in enumerate(elig):
        d = t.expert_draw
        if d is not None:
            per = z.setdefault(d.population, {}).setdefault(d.expert, [0.0] * len(values))
            for j, v in enumerate(values):
                per[j] += float(wn[i] * v[i])
            sizes[d.population] = (d.experts, d.drawn)
    out = [0.0] * len(values)
    for pop, per_expert in z.items():
        n, k = sizes[pop]
        if k < 2:
            continue
        # (k drawn experts, values); a drawn expert with no tensor in this group adds z = 0
        zs = np.zeros((k, len(values)))
        zs[:len(per_expert)] = np.array(list(per_expert.values()))
        for j in range(len(values)):
            out[j] += k * max(0.0, 1 - k / n) * float(np.var(zs[:, j], ddof=1))
    return out


def by(tensors: list[TensorResult], keyfn, th: Thresholds) -> dict:
    groups: dict = {}
    for t in tensors:
        groups.setdefault(keyfn(t), []).append(t)
    return {k: group(str(k), v, th) for k, v in groups.items()}
