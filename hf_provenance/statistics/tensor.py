"""From streamed sums to the statistics of one tensor pair (what the report's ``tensors[]`` shows)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hf_provenance.measurement.accumulate import SCALARS, simhash_distance, unshift
from hf_provenance.measurement.experts import ExpertDraw
from hf_provenance.measurement.stream import TensorMeasurement
from hf_provenance.statistics import effects as fx

_I = {name: i for i, name in enumerate(SCALARS)}
# unit roundoff of each stored dtype: the rounding noise a re-export alone would add
UNIT_ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "BF16": 2.0 ** -8, "F16": 2.0 ** -11,
                 "F8_E4M3": 2.0 ** -4, "F8_E5M2": 2.0 ** -3}
FOLK_MSE = 1e-5
N_PERM = 999


@dataclass(frozen=True)
class TensorResult:
    name: str
    model_name: str
    key: str
    component: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: tuple[str, str]
    numel: int
    axes: tuple[str, ...]
    evidence: bool               # may count as evidence (has an arbitrary axis, not vocabulary-indexed 1-D)
    cosine: fx.Statistic
    pearson: fx.Statistic
    rel_l2: float | None
    rel_mse_rounding: float | None
    mse: float | None
    max_abs_diff: float
    max_abs_diff_is_bound: bool
    frac_equal: float
    bit_equal: bool
    cast_equal: float | None
    sha256_equal: bool | None
    simhash_distance: int | None
    rowhash_jaccard: float | None
    fraction_read: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    expert_draw: ExpertDraw | None = None  # one of k experts of N read whole under --sample: stands for N/k

    @property
    def weight(self) -> float:
        """Tensors this one stands for in the aggregates (N/k for an expert drawn under --sample, else 1)."""
        return self.expert_draw.weight if self.expert_draw is not None else 1.0

    def to_dict(self) -> dict:
        c = fx._clean
        return {
            "name": self.name, "model_name": self.model_name, "key": self.key, "component": self.component,
            "layer": self.layer, "shape": list(self.shape), "dtype": list(self.dtype), "numel": self.numel,
            "axes": list(self.axes), "evidence": self.evidence,
            "cosine": self.cosine.to_dict(), "pearson": self.pearson.to_dict(),
            "rel_l2": c(self.rel_l2), "rel_mse_rounding": c(self.rel_mse_rounding), "mse": c(self.mse),
            "folk_mse_rule_same_layer": None if self.mse is None else bool(self.mse < FOLK_MSE),
            "max_abs_diff": c(self.max_abs_diff), "max_abs_diff_is_lower_bound": self.max_abs_diff_is_bound,
            "frac_equal": c(self.frac_equal), "bit_equal": self.bit_equal, "cast_equal": c(self.cast_equal),
            "sha256_equal": self.sha256_equal, "simhash_distance": self.simhash_distance,
            "rowhash_jaccard": c(self.rowhash_jaccard), "fraction_read": c(self.fraction_read),
            "notes": list(self.notes),
            "expert_sample": None if self.expert_draw is None else {
                "population": self.expert_draw.population, "experts": self.expert_draw.experts,
                "experts_read": self.expert_draw.drawn, "stands_for": self.expert_draw.weight},
        }


LOO_CHUNK = 256  # blocks whose delete-one column sums are formed at once (bounds memory for wide tensors)


def _loo(acc, strata, *fns, cols: bool = True) -> list[np.ndarray]:
    """Stratified delete-one-block values of each fn(totals, col_a, col_b) (JKn): one array per fn, a value per
    block, NaN where undefined.

    Deleting block b of stratum h reweights the stratum's other blocks by n_h/(n_h−1), so the stratum keeps its
    share: totals_(hb) = T − S_h + n_h/(n_h−1)·(S_h − b). Every statistic here is a function of such sums; fn
    takes them for many blocks at once ((N, SCALARS), (N, n), (N, n)); ``cols=False`` when no fn needs the column
    sums (they are then None).
    """
    blk = acc.blocks
    h = np.asarray(strata)
    one_hot = np.zeros((h.max() + 1, h.size))
    one_hot[h, np.arange(h.size)] = 1.0
    n_h = one_hot.sum(1)
    w = np.where(n_h >= 2, n_h / np.maximum(n_h - 1, 1), 1.0)[h][:, None]
    keep = (n_h >= 2)[h][:, None]  # a lone block: its stratum cannot be reweighted, the totals stay

    parts = [(acc.totals, blk.scalars)]
    if cols:
        parts += [(acc.col_a.cpu().numpy(), blk.col_a), (acc.col_b.cpu().numpy(), blk.col_b)]
    parts = [(total, per_block, one_hot @ per_block) for total, per_block in parts]  # + the strata's sums

    def dropped(total, per_block, by_stratum, sl):
        s_h = by_stratum[h[sl]]
        return np.where(keep[sl], total - s_h + w[sl] * (s_h - per_block[sl]), total)

    outs = [np.empty(h.size) for _ in fns]
    for lo in range(0, h.size, LOO_CHUNK):
        sl = slice(lo, lo + LOO_CHUNK)
        tt, ca, cb = [dropped(*part, sl) for part in parts] + [None] * (3 - len(parts))
        for out, fn in zip(outs, fns):
            out[lo:lo + LOO_CHUNK] = fn(tt, ca, cb)
    return outs


def _vec_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    b = b - b.mean()
    t = np.zeros(len(SCALARS))
    t[_I["rows"]] = 1
    t[_I["Saa"]], t[_I["Sbb"]], t[_I["Sab"]] = a @ a, b @ b, a @ b
    return t


def summarize(m: TensorMeasurement, *, seed: int = 0) -> TensorResult:
    pair, acc = m.pair, m.acc
    t = acc.totals
    n = pair.n_cols
    rows = int(t[_I["rows"]])
    numel = rows * n
    notes = list(m.notes)
    if pair.note:
        notes.append(pair.note)
    arbitrary = pair.n_arbitrary > 0
    evidence = arbitrary and pair.evidence
    ca, cb = acc.col_a.cpu().numpy(), acc.col_b.cpu().numpy()

    def r_of(tt, a, b):
        return fx.ratios(*(fx.vector_parts(tt, n) if pair.is_vector else fx.centred_parts(tt, a, b, n)))

    def cos_of(tt, a, b):
        return fx.cosines(unshift(tt, n, acc.shift_a, acc.shift_b))

    def defined(x):
        return float(x) if np.isfinite(x) else None

    cos = defined(cos_of(t, ca, cb))
    r = defined(r_of(t, ca, cb))
    va, vb = m.vec_a, m.vec_b
    if va is not None:  # NaN/Inf elements are left out, as the block sums leave them out
        fin = np.isfinite(va) & np.isfinite(vb)
        if not fin.all():
            va, vb = va[fin], vb[fin]
    if pair.is_vector and va is not None:  # exact, in float64
        r = fx.ratio(*fx.vector_parts(_vec_sums(va, vb), len(va))) if len(va) else None
    ci_r = ci_c = None
    if not m.sample.full and len(acc.blocks):
        strata, sizes = m.sample.strata, m.sample.stratum_sizes
        loo_r, loo_c = _loo(acc, strata, r_of, cos_of, cols=not pair.is_vector)
        if r is not None and np.isfinite(loo_r).all():
            ci_r = fx.jackknife_ci(r, loo_r, strata, sizes)
        if cos is not None and np.isfinite(loo_c).all():
            ci_c = fx.jackknife_ci(cos, loo_c, strata, sizes)
    elif m.sample.full:
        ci_r = (r, r) if r is not None else None
        ci_c = (cos, cos) if cos is not None else None

    z = p = None
    null = None
    if r is None:
        notes.append("Pearson undefined: a zero or constant tensor (or row/column structure only)")
        evidence = False
    elif pair.is_vector:
        if arbitrary and va is not None and len(va) >= 8:
            p, z = fx.permutation_test_1d(va, vb, n_perm=N_PERM, seed=seed)
            null = f"Monte-Carlo permutation of the vector (K={N_PERM})"
        else:
            evidence = False
            null = None
            notes.append(f"{pair.axes[0]}-indexed vector: reported, never evidence")
    elif pair.n_arbitrary == 2:
        z = fx.z_two_axes(r, rows, n)
        p = fx.two_sided_p(z)
        null = "row and column permutation (exact moments)"
    elif pair.n_arbitrary == 1 and acc.sketch_acc is not None:
        num = fx.centred_parts(t, ca, cb, n)[0]
        z = fx.z_one_axis(num, acc.sketch_acc.cpu().numpy(), ca, cb, rows, n, acc._g.cpu().numpy().astype(np.float64))
        p = fx.two_sided_p(z) if z is not None else None
        null = "column permutation (Hoeffding moments, sketched variance)"
    else:
        evidence = False
        notes.append("no arbitrary axis: reported, never evidence")
    if acc.nonfinite:
        notes.append(f"{acc.nonfinite} NaN/Inf values ignored")

    raw = acc.raw_totals()
    saa, sbb = raw[_I["Saa"]], raw[_I["Sbb"]]
    big = max(saa, sbb)
    rel_l2 = math.sqrt(acc.raw_sdd / big) if big > 0 else None
    mse = acc.raw_sdd / numel if numel else None
    u = UNIT_ROUNDOFF.get(m.dtype_b)
    mean_sq = saa / numel if numel else 0.0
    rel_mse = (mse / (mean_sq * u * u / 3.0)) if (mse is not None and u and mean_sq > 0) else None
    bit_equal = m.dtype_a == m.dtype_b and acc.equal == numel and not acc.nonfinite and m.sample.full
    if m.sha_a and m.sha_b:
        sha_eq = m.sha_a == m.sha_b
    elif m.bytes_differ:
        sha_eq = False
    else:
        sha_eq = None
    if m.dtype_a == m.dtype_b:
        cast_eq = acc.equal / numel if numel else None
    elif acc.cast_dtype is not None:
        cast_eq = acc.cast_equal / numel if numel else None
    else:
        cast_eq = None
    sim = simhash_distance(m.simhash_a, m.simhash_b) if m.simhash_a and m.simhash_b else None
    return TensorResult(
        name=pair.base_name, model_name=pair.cand_name, key=pair.key.to_str() if hasattr(pair.key, "to_str") else str(pair.key),
        component=pair.component, layer=pair.layer, shape=tuple(pair.shape), dtype=(m.dtype_a, m.dtype_b),
        numel=pair.numel, axes=tuple(pair.axes), evidence=evidence,
        cosine=fx.Statistic(cos, ci_c, None, None, None, numel),
        pearson=fx.Statistic(r, ci_r, z, p, null, numel),
        rel_l2=rel_l2, rel_mse_rounding=rel_mse, mse=mse, max_abs_diff=acc.raw_max_abs_diff,
        max_abs_diff_is_bound=not m.sample.full, frac_equal=acc.equal / numel if numel else 0.0,
        bit_equal=bit_equal, cast_equal=cast_eq, sha256_equal=sha_eq, simhash_distance=sim,
        rowhash_jaccard=m.rowhash_jaccard, fraction_read=m.sample.fraction, notes=tuple(notes),
        expert_draw=m.expert_draw)
