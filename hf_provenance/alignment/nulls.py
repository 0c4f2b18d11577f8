"""The coupling-matched simulated null for maps searched over hidden axes (DESIGN §Statistics 1, 3).

A map fitted by maximising similarity (units, heads, experts) makes even independent models look alike, and two
maps fitted on different tensors of one model agree far more often than "chance" (a uniform random permutation)
says, because a model's tensors are coupled *within* each unit: SwiGLU's gate and up rows of one unit point the
same way, a unit's down column leans on its gate row, a router row on its expert. A Poisson or hypergeometric
p-value for "k of n maps agree" therefore calls two independent coupled models derived. Every statistic of the
alignment stage is instead compared with its value on simulated candidates B' that keep all of B's internal
coupling but have lost any correspondence with A.

**Which simulation.** B' = S·P·B on the residual axis: a random permutation P of the residual dimensions with
random signs S, applied to every tensor of B at once (rows of down/o, columns of gate/up/q/router).

* It is an exact symmetry of H0 (DESIGN §1: residual dimensions are an arbitrary axis): initialisation is i.i.d.
  and symmetric, and Adam-type training is equivariant to signed permutations of coordinates, so an independently
  trained B and S·P·B have the same law. A random orthogonal rotation Q would also keep every within-unit inner
  product, but it is *not* a symmetry of Adam-trained weights (Adam has a privileged basis: outlier dimensions,
  per-dimension scales), so rotated B' would be drawn from a different law than B.
* It keeps every within-unit (and within-head, within-expert) coupling of B: the same P acts on all of B's tensors,
  so every inner product between B's rows and columns is unchanged.
* It destroys correspondence with A: A's unit i and B's unit j are compared through their residual coordinates,
  which P scrambles (for hidden sizes ≥ 64 the chance that P is near the identity is nil).

**Sketch and null are one design.** Rows and columns over the residual axis are compressed by a *balanced* signed
count-sketch (:class:`ResidualSketch`): every bucket sums exactly ``m`` residual dimensions with fixed random signs.
Then a signed permutation of the buckets equals the sketch of S·P·B for a signed permutation P of the residual
dimensions (bucket b's m dimensions go onto bucket σ(b)'s, signs chosen to match), so a null draw is a re-indexing
of stored sketches: no tensor is read twice. The buckets are split into two halves (two disjoint sets of residual
dimensions) and null draws permute buckets within each half: this is a subgroup of the signed permutations, so the
Monte-Carlo randomisation test stays exact, and split-half statistics (fit on one half, test on the other) are
defined on every draw.

p-values are (k+1)/(K+1) with k the draws at least as large as the observed value (Phipson & Smyth 2010, Stat.
Appl. Genet. Mol. Biol. 9:39; exact for a random subset of a group, Hemerik & Goeman 2018, JRSS-B 80:137).

**Caveat.** When the residual map itself was fitted (residual.py), B is compared as R·B with R data-dependent; the
null then treats R as fixed. In practice the residual map is applied only once its own held-out test passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from hf_provenance.statistics.effects import _clean
from hf_provenance.statistics.thresholds import load as load_thresholds

SKETCH_K = 512          # buckets of the unit/head sketches (k ≤ 512 columns)
NULL_DRAWS = 99         # simulated candidates per statistic: smallest p = 0.01
SHORT_DRAWS = 19        # ... when no null can change the decision (see ``simulate``): for the report only
MIN_SAMPLED_DIMS = 512  # under sampling, read at least this many residual dimensions (or all of them)
DIM_BLOCK = 64          # residual dimensions are read in contiguous blocks of this many rows
EPS = 1e-12

__all__ = ["SKETCH_K", "NULL_DRAWS", "SHORT_DRAWS", "ResidualSketch", "SignedPermutation", "NullTest", "simulate",
           "residual_dims", "unit_rows", "unit_cols", "cauchy"]


@dataclass(frozen=True)
class SignedPermutation:
    """out[..., j] = sign[j] · x[..., perm[j]] on a sketch axis (one null draw)."""

    perm: torch.Tensor   # int64 (k,)
    sign: torch.Tensor   # float32 (k,)

    def cols(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to the last axis."""
        return x.index_select(-1, self.perm) * self.sign

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to the first axis (bucket-major sketches: a row gather)."""
        return self.axis(x, 0)

    def axis(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[dim] = -1
        return x.index_select(dim, self.perm) * self.sign.reshape(shape)

    def gram(self, g: torch.Tensor) -> torch.Tensor:
        """A Gram matrix over sketch coordinates (last two axes): S P G Pᵀ S."""
        g = g.index_select(-1, self.perm).index_select(-2, self.perm)
        return g * torch.outer(self.sign, self.sign)


@dataclass(frozen=True)
class ResidualSketch:
    """Balanced signed count-sketch of the residual dimensions into ``k`` buckets, in two halves.

    ``bucket[d]`` is the bucket of residual dimension d (-1: not sketched), ``sign[d]`` its fixed sign. Each half
    holds k/2 buckets of exactly ``m`` dimensions drawn at random from the dimensions read; when a half has no
    more dimensions than buckets every dimension is its own bucket and the sketch is exact.

    Cost: sketching a block of b rows over the residual axis is O(b·n) (an ``index_add``); memory O(k·n).

    Example:
        >>> s = ResidualSketch.build(64, np.arange(64), k=512, seed=0)
        >>> s.k, [len(h) for h in s.halves]
        (64, [32, 32])
    """

    n_dims: int
    dims: np.ndarray                      # residual dimensions read (sorted)
    bucket: np.ndarray                    # int64 (n_dims,)
    sign: np.ndarray                      # float32 (n_dims,)
    halves: tuple[np.ndarray, np.ndarray]  # bucket indices of each half
    per_bucket: int
    seed: int

    @classmethod
    def build(cls, n_dims: int, dims: np.ndarray, *, k: int = SKETCH_K, seed: int = 0) -> ResidualSketch:
        dims = np.sort(np.asarray(dims, dtype=np.int64))
        if len(dims) < 4:
            raise ValueError(f"ResidualSketch needs at least 4 residual dimensions, got {len(dims)}")
        if k < 2:
            raise ValueError(f"ResidualSketch k must be >= 2, got {k}")
        rng = np.random.default_rng([seed, 0x5EC7])
        shuffled = rng.permutation(dims)
        half = len(shuffled) // 2
        kb = min(k // 2, half)
        m = half // kb
        bucket = np.full(n_dims, -1, dtype=np.int64)
        for h in range(2):
            chosen = shuffled[h * half: h * half + kb * m]
            bucket[chosen] = h * kb + np.arange(kb * m) // m
        sign = np.where(rng.random(n_dims) < 0.5, -1.0, 1.0).astype(np.float32)
        halves = (np.arange(kb), np.arange(kb, 2 * kb))
        return cls(n_dims, dims, bucket, sign, halves, m, seed)

    @property
    def k(self) -> int:
        return len(self.halves[0]) + len(self.halves[1])

    @property
    def exact(self) -> bool:
        return self.per_bucket == 1

    def sketch_rows(self, rows: torch.Tensor, row_dims: np.ndarray) -> torch.Tensor:
        """Rows indexed by residual dimensions ``row_dims`` ([b, n], e.g. a block of ffn_down) -> [k, n] sums."""
        b = self.bucket[np.asarray(row_dims)]
        keep = np.nonzero(b >= 0)[0]
        out = torch.zeros(self.k, rows.shape[1], dtype=torch.float32)
        if len(keep):
            sel = torch.from_numpy(keep)
            s = torch.from_numpy(self.sign[np.asarray(row_dims)[keep]]).unsqueeze(1)
            out.index_add_(0, torch.from_numpy(b[keep]), rows.index_select(0, sel).float() * s)
        return out

    def sketch_cols(self, x: torch.Tensor) -> torch.Tensor:
        """Rows whose columns are the residual axis ([n, n_dims], e.g. gate rows, router rows) -> [n, k]."""
        used = np.nonzero(self.bucket >= 0)[0]
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32)
        cols = x.index_select(1, torch.from_numpy(used)).float() * torch.from_numpy(self.sign[used])
        out.index_add_(1, torch.from_numpy(self.bucket[used]), cols)
        return out

    def draw(self, rng: np.random.Generator) -> SignedPermutation:
        """A random signed permutation of the buckets within each half (one simulated candidate)."""
        perm = np.concatenate([rng.permutation(h) for h in self.halves])
        sign = np.where(rng.random(self.k) < 0.5, -1.0, 1.0).astype(np.float32)
        return SignedPermutation(torch.from_numpy(perm), torch.from_numpy(sign))

    def to_dict(self) -> dict:
        return {"buckets": self.k, "dims_read": int(len(self.dims)), "dims_per_bucket": self.per_bucket,
                "exact": self.exact, "seed": self.seed,
                "method": "balanced signed count-sketch of the residual axis, two halves of disjoint dimensions"}


def residual_dims(n_dims: int, sample: float | None, seed: int) -> np.ndarray:
    """The residual dimensions to read: all of them, or under ``sample`` a seeded set of contiguous 64-row blocks
    covering max(sample·n, MIN_SAMPLED_DIMS) dimensions."""
    if sample is None or sample >= 1.0:
        return np.arange(n_dims)
    want = min(n_dims, max(math.ceil(sample * n_dims), MIN_SAMPLED_DIMS))
    n_blocks = math.ceil(n_dims / DIM_BLOCK)
    take = min(n_blocks, math.ceil(want / DIM_BLOCK))
    rng = np.random.default_rng([seed, 0xD135])
    blocks = np.sort(rng.choice(n_blocks, size=take, replace=False))
    dims = np.concatenate([np.arange(b * DIM_BLOCK, min(n_dims, (b + 1) * DIM_BLOCK)) for b in blocks])
    return dims


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Centre each column over the rows, then scale each row to unit length (scale-invariant signatures).

    Row i of the result is unit i's signature: per-unit rescaling (up×c, down÷c) leaves it unchanged, and the
    component shared by all units of one model (a common output direction) is removed.
    """
    x = x.float()
    x = x - x.mean(0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


def unit_cols(x: torch.Tensor) -> torch.Tensor:
    """``unit_rows`` for a bucket-major sketch [k, n]: the result's column j is unit j's signature."""
    x = x.float()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=0, keepdim=True).clamp_min(EPS)


@dataclass(frozen=True)
class NullTest:
    """One statistic, its value on the real candidate and on K simulated candidates (upper-tail test)."""

    name: str
    observed: float
    draws: np.ndarray = field(repr=False)
    method: str = "simulated candidates B' = signed permutation of B's residual axis (coupling kept)"
    seed: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(self.draws)) if len(self.draws) else float("nan")

    @property
    def sd(self) -> float:
        return float(np.std(self.draws, ddof=1)) if len(self.draws) > 1 else float("nan")

    @property
    def z(self) -> float | None:
        sd = self.sd
        if not math.isfinite(sd):
            return None
        if sd <= EPS:
            return 0.0 if abs(self.observed - self.mean) <= EPS else math.copysign(1e9, self.observed - self.mean)
        return (self.observed - self.mean) / sd

    @property
    def p(self) -> float:
        """(k+1)/(K+1), k = draws ≥ observed (ties count against the observation)."""
        k = int(np.sum(self.draws >= self.observed - 1e-9))
        return (k + 1) / (len(self.draws) + 1)

    @property
    def exceeds_all(self) -> bool:
        return bool(len(self.draws)) and bool(self.observed > float(np.max(self.draws)))

    def to_dict(self) -> dict:
        return {"value": _clean(self.observed), "ci": None, "z": _clean(self.z), "p": _clean(self.p),
                "null_method": self.method, "n": int(len(self.draws)), "null_mean": _clean(self.mean),
                "null_sd": _clean(self.sd), "seed": self.seed}


def simulate(statistics: Callable[[SignedPermutation | None], dict[str, float]], sketch: ResidualSketch, *,
             draws: int = NULL_DRAWS, seed: int = 0, method: str | None = None,
             decisive: tuple[str, ...] = ("heldout",)) -> dict[str, NullTest]:
    """Evaluate ``statistics`` on the real candidate (argument None) and on ``draws`` simulated candidates.

    ``statistics(t)`` must compute every statistic from B's sketches transformed by ``t`` with exactly the
    procedure used for the observation (fitting included): that is what makes the null search-aware.

    ``decisive``: the statistics a decision rests on. Every decision needs the observed value to reach the
    calibrated effect threshold r_derived as well as to beat the null, so when none of them does (independent
    models: every layer of an auditor's check), no null can change the decision; only the first SHORT_DRAWS of the
    same candidates are then drawn, for the report's null mean, sd and p (and the method says so). On an
    independent layer at GLM-4.5-Air's sizes the nulls had cost about a third of its searches.
    """
    observed = statistics(None)
    if decisive and all(observed.get(name, -math.inf) < load_thresholds().r_derived for name in decisive):
        if draws > SHORT_DRAWS:
            draws = SHORT_DRAWS
            method = (f"{method or NullTest.method}; {SHORT_DRAWS} candidates only: the observed "
                      f"{'/'.join(n for n in decisive if n in observed)} is below the effect threshold, so the "
                      "decision needs no null")
    rng = np.random.default_rng([seed, 0x4E55])
    values: dict[str, list[float]] = {name: [] for name in observed}
    for _ in range(draws):
        got = statistics(sketch.draw(rng))
        for name in observed:
            values[name].append(float(got[name]))
    kw = {"method": method} if method else {}
    return {name: NullTest(name, float(observed[name]), np.asarray(values[name]), seed=seed, **kw)
            for name in observed}


def cauchy(ps: list[float]) -> float | None:
    """Cauchy combination of p-values, valid under dependence (Liu & Xie 2020)."""
    from hf_provenance.statistics.aggregate import cauchy_combine

    return cauchy_combine([p for p in ps if p is not None and math.isfinite(p)])
