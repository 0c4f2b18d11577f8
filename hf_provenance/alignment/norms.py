"""Norm weights folded into the next matrices: detect it, test it, and measure the matrices with the fold undone.

An RMSNorm weight g can be folded into the matrices that read the normalised residual: W ← W·diag(g) for q/k/v
(or MLA q_a/kv_a) after ``attn_norm``, gate/up/router/experts after ``ffn_norm``, q_b/kv_b after the MLA
low-rank norms, the LM head after ``output_norm``; the norm is then set to 1. The function is unchanged (exactly,
up to rounding). Plain Pearson of W·diag(g) against W stays high when g varies mildly and drops when it varies a
lot; and the norm vectors themselves become constant, so their Pearson is undefined. This module makes the
relation explicit instead:

* **Detection** (structural, no fit): a norm pair whose vector is constant on one side and not on the other.
* **Evidence**: the per-column scale between the two sides' following matrices, s_j = ‖folded column j‖ /
  ‖unfolded column j‖ (column norms, pooled over the matrices that share the norm as a row-weighted mean of log
  ratios; invariant to any row map), is correlated with the unfolded side's norm weights |g_j|. Under
  independence the hidden axis is arbitrary, so the null permutes the *folded side's* columns only (Monte-Carlo,
  p = (k+1)/(K+1)): the unfolded side's own column norms are coupled with its norm weights in trained models
  (a fold of an independent llama gave r = −0.27 on average, −0.55 in one norm), and a null permuting s whole would
  call that coupling evidence. Reported, never a verdict input.
* **Measurement**: the following matrices are measured with the fold undone on the candidate's columns
  (``PairSpec.col_scale``): 1/g_base when the model is folded, g_model when the base is. The scale comes from one
  side's norm weights only, never fitted to the other side, so it cannot inflate an independent pair's similarity.

The scale is indexed by base column: correct under any later residual map when the model is folded (the common
case); when the base is folded it is g_model through the plan's column map at the time of detection.

Cost: the norm vectors, plus at most ``MAX_ROWS`` rows of each following matrix per side (all rows of small ones),
only when a fold is detected.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.nulls import cauchy
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.alignment.units import read_rows
from hf_provenance.statistics import effects as fx
from hf_provenance.statistics.effects import _clean

# norm role -> roles whose columns read its output (same layer)
NORM_READERS: dict[str, tuple[str, ...]] = {
    "attn_norm": ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_q_a", "attn_kv_a_mqa"),
    "ffn_norm": ("ffn_gate", "ffn_up", "ffn_gate_up", "ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_exp",
                 "ffn_up_exp", "ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_gate_shexp", "ffn_up_shexp"),
    "attn_q_a_norm": ("attn_q_b",),
    "attn_kv_a_norm": ("attn_kv_b",),
    "output_norm": ("output",),
}
SHORT = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_qkv": "qkv", "attn_q_a": "q_a", "attn_kv_a_mqa": "kv_a",
         "ffn_gate": "gate", "ffn_up": "up", "ffn_gate_up": "gate_up", "ffn_gate_inp": "router",
         "ffn_gate_inp_shexp": "shared router", "ffn_gate_exp": "expert gate", "ffn_up_exp": "expert up",
         "ffn_gate_exps": "expert gate", "ffn_up_exps": "expert up", "ffn_gate_up_exps": "expert gate_up",
         "ffn_gate_shexp": "shared gate", "ffn_up_shexp": "shared up", "attn_q_b": "q_b", "attn_kv_b": "kv_b",
         "output": "output"}
CONSTANT_RTOL = 1e-6     # a vector is constant when its range is below this share of its magnitude
VARYING_RTOL = 1e-4      # ... and varies when its range is above this share
MAX_ROWS = 4096          # rows read per following matrix and side (evenly spaced blocks)
BLOCK_ROWS = 256
N_PERM = 999

__all__ = ["NORM_READERS", "column_log_norms", "norm_plan", "scale_test"]


def _vector(src, pair: PairSpec, side: str) -> np.ndarray:
    return read_rows(src, pair, np.array([0]), side=side).reshape(-1).double().numpy()


def _spread(x: np.ndarray) -> float:
    mag = float(np.abs(x).max()) if x.size else 0.0
    return float(np.ptp(x)) / mag if mag > 0 else 0.0


def _rows_read(n_rows: int, sample: float | None) -> np.ndarray:
    limit = MAX_ROWS if sample is None or sample >= 1.0 else max(BLOCK_ROWS, min(MAX_ROWS, int(sample * n_rows)))
    if n_rows <= limit:
        return np.arange(n_rows)
    n_blocks = max(1, limit // BLOCK_ROWS)
    starts = np.linspace(0, n_rows - BLOCK_ROWS, n_blocks).astype(np.int64)
    return np.unique((starts[:, None] + np.arange(BLOCK_ROWS)[None, :]).reshape(-1))


def _col_ss(src, pair: PairSpec, rows: np.ndarray, side: str) -> np.ndarray:
    ss = np.zeros(pair.n_cols)
    for s in range(0, len(rows), BLOCK_ROWS):
        x = read_rows(src, pair, rows[s:s + BLOCK_ROWS], side=side).double()
        ss += (x * x).sum(0).numpy()
    return ss


def column_log_norms(readers: list[PairSpec], base, model, *, sample: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(L_base, L_model): per column, the row-weighted mean over ``readers`` of log ‖column j‖ on each side.

    Read through each pair's maps (the model side in the base's index space; any ``col_scale`` left out). The
    scale s_j = ‖folded column j‖ / ‖unfolded column j‖ is exp(L_folded − L_unfolded)."""
    logs = {"base": [], "model": []}
    weights = []
    for p in readers:
        q = replace(p, col_scale=None)
        rows = _rows_read(p.n_rows, sample)
        for side, src in (("base", base), ("model", model)):
            ss = _col_ss(src, q, rows, side)
            logs[side].append(0.5 * np.log(np.maximum(ss, 1e-300)))
        weights.append(p.n_rows)
    w = np.asarray(weights, dtype=np.float64)[:, None] / sum(weights)
    return (np.stack(logs["base"]) * w).sum(0), (np.stack(logs["model"]) * w).sum(0)


def scale_test(l_folded: np.ndarray, l_unfolded: np.ndarray, g: np.ndarray, *, seed: int,
               n_perm: int = N_PERM) -> dict:
    """Pearson of s = exp(L_folded − L_unfolded) with |g| (the unfolded side's norm weights), and its null.

    The null permutes the folded side's columns only: the unfolded side keeps its own coupling between column
    norms and norm weights (trained models have one, so permuting s itself, or "chance", would call independent
    models related), while the cross-model link is broken, as under independence (the hidden axis is arbitrary).
    p = (k+1)/(K+1) on |r − null mean|; z against the null's mean and sd."""
    a = np.abs(g)

    def r_of(lf):
        return fx.ratio(*fx.vector_parts(_sums(np.exp(lf - l_unfolded), a), len(a)))

    r = r_of(l_folded)
    if r is None:
        return {"scale_r": None, "z": None, "p": None}
    rng = np.random.default_rng(seed)
    null = np.array([r_of(l_folded[rng.permutation(len(l_folded))]) or 0.0 for _ in range(n_perm)])
    mu, sd = float(null.mean()), float(null.std())
    k = int(np.sum(np.abs(null - mu) >= abs(r - mu) - 1e-12))
    return {"scale_r": _clean(r), "z": _clean((r - mu) / sd) if sd > 0 else None, "p": (k + 1) / (n_perm + 1),
            "null_mean": _clean(mu), "null_sd": _clean(sd)}


def norm_plan(base, model, plan: AlignmentPlan, *, seed: int = 0, sample: float | None = None
              ) -> tuple[AlignmentPlan, dict, list[str]] | None:
    """Detect folded norms, test the recovered scales against the unfolded norm weights, undo the fold.

    Returns None when no norm pair is constant on exactly one side. Otherwise ``(plan, {"norms": summary},
    [line])``: the plan with ``col_scale`` set on every following matrix of a folded norm and a note on the norm
    pairs (their Pearson is undefined on a constant vector).
    """
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    offset = layout.norm_weight_offset
    by_layer: dict[tuple, list[PairSpec]] = {}
    for p in plan.pairs:
        if not p.is_vector and p.key.part == "weight" and p.layout is None:
            by_layer.setdefault((p.layer, p.key.role), []).append(p)
    folds = []                               # (norm pair, readers, folded side, g_unfolded)
    for p in plan.pairs:
        if not p.is_vector or p.key.part != "weight" or p.key.role not in NORM_READERS:
            continue
        gb, gm = _vector(base, p, "base") + offset, _vector(model, p, "model") + offset
        cb, cm = _spread(gb) <= CONSTANT_RTOL, _spread(gm) <= CONSTANT_RTOL
        if cb == cm:
            continue
        folded, g = ("model", gb) if cm else ("base", gm)
        if _spread(g) < VARYING_RTOL:
            continue
        readers = [q for role in NORM_READERS[p.key.role] for q in by_layer.get((p.layer, role), ())
                   if q.n_cols == p.n_cols]
        folds.append((p, readers, folded, g))
    if not folds:
        return None
    scales: dict[int, np.ndarray] = {}
    records, ps = [], []
    for i, (p, readers, folded, g) in enumerate(folds):
        rec = {"norm": p.base_name, "role": p.key.role, "layer": p.layer, "folded_side": folded,
               "readers": [q.base_name for q in readers], "n": int(p.n_cols)}
        if readers:
            lb, lm = column_log_norms(readers, base, model, sample=sample)
            test = scale_test(lm, lb, g, seed=seed + i) if folded == "model" else scale_test(lb, lm, g, seed=seed + i)
            rec.update(test)
            rec["null_method"] = f"Monte-Carlo permutation of the folded side's hidden dims (K={N_PERM})"
            if test["p"] is not None:
                ps.append(test["p"])
            if folded == "model":   # candidate = W·diag(g_base): divide it out (a zero weight drops its column)
                undo = np.divide(1.0, g, out=np.zeros_like(g), where=np.abs(g) > 1e-12 * np.abs(g).max())
            else:                   # base = W·diag(g_model): fold the candidate the same way
                undo = g
            for q in readers:
                scales[id(q)] = undo
        records.append(rec)
    note_of = {id(p): (f"folded into {', '.join(sorted({SHORT.get(q.key.role, q.key.role) for q in rd})) or 'nothing'}"
                       f" on the {side}'s side (constant there): compared through those matrices, fold undone")
               for p, rd, side, _ in folds}
    pairs = []
    for p in plan.pairs:
        if id(p) in scales:
            p = replace(p, col_scale=scales[id(p)], note=_note(p, "norm fold undone on these columns "
                                                                 "(scaled by the unfolded side's norm weights)"))
        elif id(p) in note_of:
            p = replace(p, evidence=False, note=_note(p, note_of[id(p)]))
        pairs.append(p)
    rs = [x["scale_r"] for x in records if x.get("scale_r") is not None]
    summary = {
        "method": ("norm constant on one side, not on the other: column-norm ratios of the following matrices "
                   "(pooled) correlated with the unfolded norm weights against a permutation of the folded side's "
                   "hidden dims; matrices measured with the fold undone (col_scale from one side's norm weights, "
                   "not fitted)"),
        "folded_side": sorted({x["folded_side"] for x in records}),
        "folded": len(records), "applied": bool(scales),
        "scale_r": {"mean": _clean(np.mean(rs)) if rs else None, "min": _clean(min(rs)) if rs else None,
                    "null_mean": _clean(np.mean([x["null_mean"] for x in records if x.get("null_mean") is not None]))
                    if rs else None,
                    "p_cauchy": _clean(cauchy(ps)) if ps else None},
        "sample": sample, "norms": records,
    }
    line = _line(folds, summary)
    new_summary = {**dict(plan.summary), "norms": summary}
    return AlignmentPlan(tuple(pairs), plan.unmatched, new_summary, plan.notes + (line,)), {"norms": summary}, [line]


def _sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from hf_provenance.measurement.accumulate import SCALARS

    i = {name: j for j, name in enumerate(SCALARS)}
    t = np.zeros(len(SCALARS))
    t[i["rows"]] = 1
    t[i["Sa"]], t[i["Sb"]] = a.sum(), b.sum()
    t[i["Saa"]], t[i["Sbb"]], t[i["Sab"]] = a @ a, b @ b, a @ b
    return t


def _note(p: PairSpec, note: str) -> str:
    return note if not p.note else f"{p.note}; {note}"


def _line(folds, summary: dict) -> str:
    groups: dict[tuple, set] = {}
    for p, readers, side, _ in folds:
        key = (p.key.role, "/".join(dict.fromkeys(SHORT.get(q.key.role, q.key.role) for q in readers)) or "nothing")
        groups.setdefault(key, set()).add(p.layer)
    parts = []
    for (role, into), layers in groups.items():
        where = "" if layers == {None} else f" in {len(layers)} layer{'s' if len(layers) > 1 else ''}"
        parts.append(f"{role} folded into {into}{where}")
    sides = summary["folded_side"]
    other = "base" if sides == ["model"] else "model" if sides == ["base"] else "unfolded"
    sr = summary["scale_r"]
    tail = "recovered scales: not measured (no following matrix)" if sr["mean"] is None else (
        f"recovered scales vs {other} norm weights r = {sr['mean']:.2f} (min {sr['min']:.2f}; null mean "
        f"{sr['null_mean']:.2f}, permutation p = {sr['p_cauchy']:.2g} combined)")
    return f"norm folding ({'/'.join(sides)} side): " + "; ".join(parts) + f"; {tail}; fold undone before measuring"
