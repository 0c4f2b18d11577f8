"""Per-tensor effect sizes with their nulls (DESIGN §Statistics 1-2, 5).

Pearson after removing the means along each arbitrary axis ("double-centred" for matrices):
  num = Sab − Rab/n − colA·colB/m + Sa·Sb/(m n),  den_X = Sxx − Rxx/n − |colX|²/m + Sx²/(m n)
with R.. the sums of products of row sums. Nulls:
- two arbitrary axes: under independent uniform permutations of B's rows and columns, E[r] = 0 and
  Var[r] = 1/((m−1)(n−1)) exactly, so z = r·√((m−1)(n−1)).
- one arbitrary axis (columns; rows are tokens or positions): Hoeffding's combinatorial CLT for a permutation of
  B's columns: E = 0 (B's rows are centred) and Var[num] = ‖Acᵀ Bc‖²_F/(n−1), estimated from a Gaussian sketch.
- 1-D vectors over an arbitrary axis: Monte-Carlo permutation of B, p = (k+1)/(K+1) (Phipson & Smyth 2010).
Normal p-values are nominal; decisions rest on effect sizes and calibrated thresholds (``thresholds``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from hf_provenance.measurement.accumulate import SCALARS
from hf_provenance.statistics.tdist import t_quantile

_I = {name: i for i, name in enumerate(SCALARS)}
TINY = 1e-30


@dataclass(frozen=True)
class Statistic:
    """A statistic as the JSON contract has it: value, interval, z, p, the null's name and n."""

    value: float | None
    ci: tuple[float, float] | None = None
    z: float | None = None
    p: float | None = None
    null_method: str | None = None
    n: int | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        d = {"value": _clean(self.value), "ci": [_clean(self.ci[0]), _clean(self.ci[1])] if self.ci else None,
             "z": _clean(self.z), "p": _clean(self.p), "null_method": self.null_method, "n": self.n}
        if self.note:
            d["note"] = self.note
        return d


def _clean(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def centred_parts(t: np.ndarray, col_a: np.ndarray, col_b: np.ndarray, n: int):
    """(num, den_a, den_b) of the double-centred Pearson from the scalar sums and column sums.

    Also for many sum sets at once: t (N, SCALARS) and col_a, col_b (N, n) give three (N,) arrays.
    """
    m = t[..., _I["rows"]]
    if np.ndim(m) == 0 and m <= 0:
        return 0.0, 0.0, 0.0
    m = np.where(m > 0, m, np.inf)  # no rows: every part 0
    mn = m * n
    sa, sb = t[..., _I["Sa"]], t[..., _I["Sb"]]
    num = t[..., _I["Sab"]] - t[..., _I["Rab"]] / n - _rowdot(col_a, col_b) / m + sa * sb / mn
    da = t[..., _I["Saa"]] - t[..., _I["Raa"]] / n - _rowdot(col_a, col_a) / m + sa ** 2 / mn
    db = t[..., _I["Sbb"]] - t[..., _I["Rbb"]] / n - _rowdot(col_b, col_b) / m + sb ** 2 / mn
    return num, da, db


def _rowdot(x: np.ndarray, y: np.ndarray):
    return float(x @ y) if x.ndim == 1 else np.einsum("ij,ij->i", x, y)


def vector_parts(t: np.ndarray, n: int):
    """(num, den_a, den_b) of the ordinary Pearson of two vectors of length n (t may be (N, SCALARS))."""
    sa, sb = t[..., _I["Sa"]], t[..., _I["Sb"]]
    num = t[..., _I["Sab"]] - sa * sb / n
    da = t[..., _I["Saa"]] - sa ** 2 / n
    db = t[..., _I["Sbb"]] - sb ** 2 / n
    return num, da, db


def ratios(num, da, db) -> np.ndarray:
    """num/√(da·db) clipped to [−1, 1], elementwise; NaN where a side has (numerically) no spread."""
    num, da, db = (np.asarray(x, np.float64) for x in (num, da, db))
    scale = np.maximum(np.maximum(np.abs(da), np.abs(db)), TINY)
    ok = (da > 1e-12 * scale) & (db > 1e-12 * scale) & (da > TINY) & (db > TINY)
    r = np.clip(num / np.sqrt(np.where(ok, da * db, 1.0)), -1.0, 1.0)  # a harmless denominator where not ok
    return np.where(ok, r, np.nan)


def ratio(num: float, da: float, db: float) -> float | None:
    r = float(ratios(num, da, db))
    return r if math.isfinite(r) else None


def cosines(t: np.ndarray) -> np.ndarray:
    """Cosine from the raw sums, elementwise over t (..., SCALARS); NaN where a side is zero."""
    saa, sbb = t[..., _I["Saa"]], t[..., _I["Sbb"]]
    ok = (saa > TINY) & (sbb > TINY)
    c = np.clip(t[..., _I["Sab"]] / np.sqrt(np.where(ok, saa * sbb, 1.0)), -1.0, 1.0)
    return np.where(ok, c, np.nan)


def cosine(t: np.ndarray) -> float | None:
    c = float(cosines(t))
    return c if math.isfinite(c) else None


def two_sided_p(z: float) -> float:
    return float(math.erfc(abs(z) / math.sqrt(2.0)))  # 2·(1 − Φ(|z|)), without importing scipy


def z_two_axes(r: float, m: int, n: int) -> float:
    return r * math.sqrt(max(m - 1, 1) * max(n - 1, 1))


def z_one_axis(num: float, sketch: np.ndarray, col_a: np.ndarray, col_b: np.ndarray, m: int, n: int,
               g: np.ndarray) -> float | None:
    """z for a permutation of B's columns (Hoeffding): Var[num] = ‖Acᵀ Bc‖²/(n−1), ‖·‖² from the sketch.

    sketch = Σ_blocks Arᵀ (Br G) (row-centred blocks); Acᵀ Bc G = sketch − m μa (μbᵀ G) with μ the column means.
    """
    mu_a, mu_b = col_a / m, col_b / m
    cg = sketch - m * np.outer(mu_a, mu_b @ g)
    var = float((cg ** 2).sum()) / max(n - 1, 1)
    if var <= TINY:
        return None
    return num / math.sqrt(var)


def permutation_test_1d(a: np.ndarray, b: np.ndarray, *, n_perm: int = 999, seed: int = 0) -> tuple[float, float]:
    """Monte-Carlo permutation test of the Pearson correlation of two vectors: (two-sided p, z-equivalent).

    p = (k+1)/(K+1) where k counts permutations with |r| ≥ |r_obs| (Phipson & Smyth 2010).
    """
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= TINY or nb <= TINY:
        return float("nan"), float("nan")
    r_obs = float(a @ b / (na * nb))
    perms = _permutations(b.size, n_perm, seed)
    # the null in float32 (|r| to ~1e-7, far finer than the 1/(K+1) resolution of p), gathered by torch straight
    # from the int32 permutations in chunks of ~256K values that stay in cache (numpy would first cast every index
    # to int64: 3.5 against 1.8 ms for a 3072-vector); r_obs stays float64
    a32 = torch.from_numpy((a / na).astype(np.float32))
    b32 = torch.from_numpy((b / nb).astype(np.float32))
    rs = torch.empty(n_perm, dtype=torch.float32)
    step = max(1, _PERM_CHUNK_VALUES // b.size)
    for s in range(0, n_perm, step):
        rows = perms[s:s + step]
        torch.mv(b32.index_select(0, rows.reshape(-1)).view(rows.shape[0], -1), a32, out=rs[s:s + step])
    null = rs.double().numpy()
    k = int(np.sum(np.abs(null) >= abs(r_obs) - 1e-12))
    p = (k + 1) / (n_perm + 1)
    sd = float(np.std(null)) or 1.0 / math.sqrt(max(a.size - 1, 1))
    return p, r_obs / sd


_PERM_CHUNK_VALUES = 1 << 18


@functools.lru_cache(maxsize=8)
def _permutations(n: int, n_perm: int, seed: int) -> torch.Tensor:
    """K seeded uniform permutations of range(n) as an int32 (K, n) tensor, shared by every vector of length n in a
    run (each test is still exact: its K permutations are uniform and independent of the data); never written."""
    # permuted() shuffles a copy laid out as its input: a tiled (row-major) one, not a broadcast view, which gave
    # the copy column-major (each gather then strode across the whole array)
    idx = np.random.default_rng(seed).permuted(np.tile(np.arange(n, dtype=np.int32), (n_perm, 1)), axis=1)
    return torch.from_numpy(idx)


def fisher(r):
    return np.arctanh(np.clip(r, -0.999999, 0.999999))


def jackknife_ci(theta_full: float, theta_loo, strata, stratum_sizes, *, fisher_scale: bool = True,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Stratified delete-one-block jackknife interval with finite-population correction.

    v = Σ_h (1 − f_h)(n_h − 1)/n_h Σ_{b∈h} (θ_(b) − θ̄_h)², f_h = n_h/N_h; on Fisher's z scale for correlations.
    ``theta_loo``: the delete-one values, one per block, in the order of ``strata``.
    """
    loo = np.asarray(theta_loo, np.float64)
    if not loo.size:
        return None
    full = float(fisher(theta_full)) if fisher_scale else float(theta_full)
    if fisher_scale:
        loo = fisher(loo)
    st = np.asarray(strata)
    n_h = np.bincount(st).astype(np.float64)
    used = n_h >= 2  # a stratum of one block carries no variance estimate
    mean_h = np.bincount(st, loo) / np.maximum(n_h, 1)
    ss_h = np.bincount(st, (loo - mean_h[st]) ** 2, minlength=n_h.size)
    f_h = n_h / np.maximum(np.asarray(stratum_sizes, np.float64)[:n_h.size], n_h)
    v = float(np.sum(np.where(used, (1 - f_h) * (n_h - 1) / np.maximum(n_h, 1) * ss_h, 0.0)))
    df = int(np.sum(np.where(used, n_h - 1, 0)))
    q = t_quantile(df, 0.5 + level / 2)  # Student t with the jackknife's degrees of freedom (blocks minus strata)
    half = q * math.sqrt(max(v, 0.0))
    lo, hi = full - half, full + half
    if not math.isfinite(half):
        return None
    if fisher_scale:
        return math.tanh(lo), math.tanh(hi)
    return lo, hi
