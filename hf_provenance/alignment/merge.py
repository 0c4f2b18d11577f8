"""Merges: with two or more bases, fit M ≈ Σᵢ wᵢ·Bᵢ by least squares, tensor by tensor, from streamed Gram sums.

Per tensor the pass accumulates G = [⟨Bᵢ, Bⱼ⟩], c = [⟨Bᵢ, M⟩] and ⟨M, M⟩ in float64 over row blocks — O(numel·k²)
work and O(k²) memory — and solves G·w = c. The weights reported are the parameter-weighted mean of the per-tensor
weights with a 95% interval from their spread across tensors (a tensor-level jackknife would give the same order);
R² says how much of M the combination explains, beside the best single base's R².

A linear merge of fine-tunes A and B shows weights near the merge's own and R² ≈ 1, well above either base alone.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from hf_provenance.alignment.identity import keyed
from hf_provenance.measurement.sampling import draw
from hf_provenance.measurement.stream import read_indexed

R2_MERGE = 0.99          # the combination explains the model almost exactly ...
RESIDUAL_RATIO = 0.5     # ... and leaves at most half the residual of the best single base
MIN_WEIGHT = 0.05        # a base takes part when its weight's interval lies above this


@dataclass(frozen=True)
class MergeFit:
    bases: tuple[str, ...]
    weights: tuple[float, ...]
    ci: tuple[tuple[float, float], ...]
    r2: float
    r2_single: tuple[float, ...]
    tensors: int
    is_merge: bool
    members: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"bases": list(self.bases), "weights": [round(w, 6) for w in self.weights],
                "ci": [[round(a, 6), round(b, 6)] for a, b in self.ci], "r2": self.r2,
                "r2_single_base": list(self.r2_single), "tensors": self.tensors, "is_merge": self.is_merge,
                "members": list(self.members),
                "method": "per-tensor least squares M ≈ Σ wᵢ·Bᵢ from streamed Gram sums; weights averaged over "
                          "tensors (parameter-weighted), 95% interval from their spread"}


@dataclass(frozen=True, eq=False)
class GramSums:
    """One streamed pass over the tensors that the model and every base hold under one canonical key and shape.

    Per tensor t: ``gram[t] = [⟨Bᵢ, Bⱼ⟩]``, ``cross[t] = [⟨Bᵢ, M⟩]``, ``mm[t] = ⟨M, M⟩`` (float64) and its numel. The
    merge fit and the lineage geometry (alignment.lineage: squared distances d²(X, Y) = ⟨X,X⟩ − 2⟨X,Y⟩ + ⟨Y,Y⟩)
    both read these, so the weights are streamed once.
    """

    keys: tuple          # canonical keys (alignment.keys.CanonicalKey)
    numel: np.ndarray   # (n,)
    gram: np.ndarray    # (n, k, k)
    cross: np.ndarray   # (n, k)
    mm: np.ndarray      # (n,)


def gram_sums(model, bases: list, *, fraction: float | None = None, seed: int = 0) -> GramSums:
    """Per tensor, ⟨Bᵢ, Bⱼ⟩, ⟨Bᵢ, M⟩ and ⟨M, M⟩ over its rows, or over the sampled row blocks under ``--sample``
    (the same stratified blocks as the measurement: a per-tensor least-squares fit on a row sample estimates the
    same weights; the intervals come from the spread across tensors either way)."""
    km, _, _ = keyed(model)
    kbs = [keyed(b)[0] for b in bases]
    k = len(bases)
    keys, numel, grams, crosses, mms = [], [], [], [], []
    for key, mname in km.items():
        names = [kb.get(key) for kb in kbs]
        if any(n is None for n in names):
            continue
        info = model.inventory[mname]
        if any(b.inventory[n].shape != info.shape for b, n in zip(bases, names)):
            continue
        g, c, mm = np.zeros((k, k)), np.zeros(k), 0.0
        rng = np.random.default_rng([seed, zlib.crc32(mname.encode())])
        for s, e in draw(info.n_rows, info.row_bytes, fraction, rng).blocks:
            m = read_indexed(model.reader, mname, None, s, e, raw=False, finite=True).reshape(-1).double()
            bs = torch.stack([read_indexed(b.reader, n, None, s, e, raw=False, finite=True).reshape(-1).double()
                              for b, n in zip(bases, names)])
            g += (bs @ bs.T).numpy()
            c += (bs @ m).numpy()
            mm += float(m @ m)
        keys.append(key)
        numel.append(info.numel)
        grams.append(g)
        crosses.append(c)
        mms.append(mm)
    return GramSums(tuple(keys), np.array(numel, float), np.array(grams).reshape(-1, k, k),
                    np.array(crosses).reshape(-1, k), np.array(mms, float))


def fit_merge(model, bases: list, refs: list[str], sums: GramSums | None = None) -> MergeFit | None:
    """None when fewer than two bases share same-shaped tensors with the model. ``sums``: a pass already made."""
    sums = gram_sums(model, bases) if sums is None else sums
    k = len(bases)
    rows_w, rows_n, gram_tot, c_tot, mm_tot = [], [], np.zeros((k, k)), np.zeros(k), 0.0
    for g, c, mm, numel in zip(sums.gram, sums.cross, sums.mm, sums.numel):
        if mm <= 0 or np.linalg.matrix_rank(g) < k:
            continue
        w = np.linalg.solve(g, c)
        rows_w.append(w)
        rows_n.append(numel)
        gram_tot += g
        c_tot += c
        mm_tot += mm
    if len(rows_w) < 2:
        return None
    W, n = np.array(rows_w), np.array(rows_n, float)
    wn = n / n.sum()
    mean = wn @ W
    var = (wn[:, None] * (W - mean) ** 2).sum(0) / max(len(W) - 1, 1) * (wn ** 2).sum() * len(W)
    half = 1.96 * np.sqrt(var)
    w_all = np.linalg.solve(gram_tot, c_tot)
    resid = mm_tot - 2 * w_all @ c_tot + w_all @ gram_tot @ w_all
    r2 = float(max(0.0, 1 - resid / mm_tot))
    r2_single = tuple(float(max(0.0, c_tot[i] ** 2 / (gram_tot[i, i] * mm_tot))) for i in range(k))
    ci = tuple((float(m - h), float(m + h)) for m, h in zip(mean, half))
    members = tuple(refs[i] for i in range(k) if ci[i][0] > MIN_WEIGHT)
    best = max(r2_single)
    ratio = (1 - r2) / (1 - best) if best < 1 else 1.0
    is_merge = r2 >= R2_MERGE and ratio <= RESIDUAL_RATIO and len(members) >= 2
    return MergeFit(tuple(refs), tuple(float(x) for x in mean), ci, r2, r2_single, len(W), bool(is_merge), members)


def r2_note(fit: MergeFit) -> str:
    ws = ", ".join(f"{r}: {w:.3f} [{a:.3f}, {b:.3f}]" for r, w, (a, b) in zip(fit.bases, fit.weights, fit.ci))
    best = max(fit.r2_single)
    head = "linear merge of the bases" if fit.is_merge else "not a linear merge of the bases"
    return f"{head}: M ≈ Σ w·B with {ws}; R² = {fit.r2:.4f} (best single base {best:.4f}) over {fit.tensors} tensors"


__all__ = ["GramSums", "MergeFit", "fit_merge", "gram_sums", "r2_note", "math"]
