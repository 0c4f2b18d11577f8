"""Residual-stream permutation: recover which hidden dimension of the model is which dimension of the base.

Someone hiding a copy can permute the residual dimensions (and, for RMSNorm models, flip their signs): the
function is unchanged and plain similarity drops to ≈0. The map is fitted from token-embedding columns over half of
the shared tokens by linear assignment (scipy's ``linear_sum_assignment``; a mutual-best-match pass first, the
assignment on the unresolved rest), and tested on the other half (DESIGN §Statistics 3). Layer matrices are then
compared with the map applied on their residual axis, with evidence taken along their other, unsearched axis.
LayerNorm's mean subtraction does not commute with sign flips, so flips are searched for RMSNorm models only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from hf_provenance.alignment.assignment import linear_sum_assignment

from hf_provenance.alignment import keys as K
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.measurement.accumulate import PairAccumulator
from hf_provenance.measurement.stream import read_indexed
from hf_provenance.statistics import effects as fx

# Roles whose columns (last axis) read the residual stream, whose rows write it, and 1-D vectors over it.
RESIDUAL_IN = frozenset({
    "token_embd", "output", "position_embd", "token_types", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_q_a",
    "attn_kv_a_mqa", "ffn_gate", "ffn_up", "ffn_gate_up", "ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_exp",
    "ffn_up_exp", "ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps", "ffn_gate_shexp", "ffn_up_shexp",
    "mlm_dense", "pooler"})
RESIDUAL_OUT = frozenset({"attn_output", "ffn_down", "ffn_down_exp", "ffn_down_exps", "ffn_down_shexp",
                          "mlm_dense", "pooler"})
# 1-D vectors over the residual: norm weights are permuted but never sign-flipped; biases added to it flip too.
RESIDUAL_NORMS = frozenset({"attn_norm", "ffn_norm", "output_norm", "token_embd_norm", "post_attention_norm",
                            "post_ffw_norm", "layer_output_norm", "attn_output_norm", "mlm_norm"})
RESIDUAL_BIASES = frozenset({"attn_output", "ffn_down", "ffn_down_shexp", "mlm_dense", "pooler"})

MAX_FIT_TOKENS = 32768
MIN_SHARED_TOKENS = 64
IDENTITY_SHARE = 0.95


@dataclass(frozen=True)
class ResidualFit:
    perm: np.ndarray                # model dimension for each base dimension
    sign: np.ndarray | None         # ±1 per base dimension (RMSNorm models only)
    identity_share: float           # share of dimensions mapped to themselves with sign +1
    heldout_r: float | None         # Pearson of embedding columns on the held-out tokens, map applied
    heldout_r_identity: float | None
    n_fit: int
    n_test: int
    mutual_best: int                # dimensions resolved by the mutual-best pass
    flips: int

    @property
    def is_identity(self) -> bool:
        return self.identity_share >= IDENTITY_SHARE

    def to_dict(self) -> dict:
        return {"dims": int(len(self.perm)), "identity_share": self.identity_share,
                "heldout_r": fx._clean(self.heldout_r), "heldout_r_identity": fx._clean(self.heldout_r_identity),
                "fit_tokens": self.n_fit, "test_tokens": self.n_test, "mutual_best": self.mutual_best,
                "sign_flips": self.flips, "method": "linear assignment on embedding-column correlation, "
                "fitted on half the shared tokens, tested on the other half"}


def _rows(pair: PairSpec, positions: np.ndarray, base, model, chunk: int = 2048):
    """Yield (base rows, model rows) float32 blocks for the given positions of the pair's row list."""
    for s in range(0, len(positions), chunk):
        pos = positions[s:s + chunk]
        ib = pos if pair.base_rows is None else np.asarray(pair.base_rows)[pos]
        im = pos if pair.cand_rows is None else np.asarray(pair.cand_rows)[pos]
        a = read_indexed(base.reader, pair.base_name, ib, 0, len(ib), raw=False, finite=True)
        b = read_indexed(model.reader, pair.cand_name, im, 0, len(im), raw=False, finite=True)
        yield a.reshape(len(ib), -1), b.reshape(len(im), -1)


def fit_residual(emb: PairSpec, base, model, *, signs: bool, seed: int = 0,
                 sample: float | None = None) -> ResidualFit | None:
    """Fit the residual map from the embedding pair; None when too few shared tokens.

    Reads at most MAX_FIT_TOKENS shared tokens; under ``sample`` the share of tokens read follows the sample
    fraction, but never fewer than 8 per hidden dimension (the correlation matrix needs them).
    """
    n_tok, n = emb.n_rows, emb.n_cols
    split = split_tokens(n_tok, n, seed=seed, sample=sample, tag=0x5E51)
    if split is None:
        return None
    fit_pos, test_pos = split
    corr = column_correlation(_rows(emb, fit_pos, base, model), n, n)
    perm, mutual = match_columns(np.abs(corr) if signs else corr)
    sign = np.where(corr[np.arange(n), perm] < 0, -1.0, 1.0) if signs else None
    same = perm == np.arange(n)
    if sign is not None:
        same &= sign > 0
    ident = float(same.mean())
    r_map, r_id = _heldout(emb, test_pos, base, model, perm, sign)
    return ResidualFit(perm, sign, ident, r_map, r_id, len(fit_pos), len(test_pos), mutual,
                       int((sign < 0).sum()) if sign is not None else 0)


def split_tokens(n_tok: int, n_dims: int, *, seed: int, sample: float | None, tag: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Shared-token positions to fit a map of embedding columns on, and the held-out ones to test it on; None when
    too few. At most MAX_FIT_TOKENS; under ``sample`` the share read follows the fraction, but never fewer than 8
    tokens per dimension of the wider side (the correlation matrix needs them)."""
    if n_tok < max(MIN_SHARED_TOKENS, 4):
        return None
    k = min(n_tok, MAX_FIT_TOKENS)
    if sample is not None:
        k = min(k, max(int(sample * n_tok), 8 * n_dims, 2048))
    chosen = np.random.default_rng([seed, tag]).permutation(n_tok)[:k]
    half = len(chosen) // 2
    return np.sort(chosen[:half]), np.sort(chosen[half:])


def column_correlation(blocks, n_a: int, n_b: int) -> np.ndarray:
    """Pearson of every column of a with every column of b, (n_a, n_b), from row blocks (a, b) of the same rows."""
    c = torch.zeros(n_a, n_b, dtype=torch.float64)
    sa, sb = torch.zeros(n_a, dtype=torch.float64), torch.zeros(n_b, dtype=torch.float64)
    saa, sbb = torch.zeros(n_a, dtype=torch.float64), torch.zeros(n_b, dtype=torch.float64)
    m = 0
    for a, b in blocks:
        c += (a.T @ b).double()
        sa += a.sum(0, dtype=torch.float64)
        sb += b.sum(0, dtype=torch.float64)
        saa += (a.double() ** 2).sum(0)
        sbb += (b.double() ** 2).sum(0)
        m += a.shape[0]
    cov = c - torch.outer(sa, sb) / m
    va = (saa - sa ** 2 / m).clamp_min(1e-30)
    vb = (sbb - sb ** 2 / m).clamp_min(1e-30)
    return (cov / torch.sqrt(torch.outer(va, vb))).numpy()


def match_columns(score: np.ndarray) -> tuple[np.ndarray, int]:
    """A distinct column for every row of ``score`` (rows ≤ columns), maximising the total: mutual best matches first
    (row j's best column k whose best row is j), linear assignment on the rest. (column per row, mutual matches)"""
    n_rows, n_cols = score.shape
    out = np.full(n_rows, -1, dtype=np.int64)
    best_col, best_row = score.argmax(1), score.argmax(0)
    mutual = np.nonzero(best_row[best_col] == np.arange(n_rows))[0]
    out[mutual] = best_col[mutual]
    rest_rows = np.setdiff1d(np.arange(n_rows), mutual)
    if len(rest_rows):
        rest_cols = np.setdiff1d(np.arange(n_cols), out[mutual])
        ri, ci = linear_sum_assignment(score[np.ix_(rest_rows, rest_cols)], maximize=True)
        out[rest_rows[ri]] = rest_cols[ci]
    return out, int(len(mutual))


def _heldout(emb, positions, base, model, perm, sign) -> tuple[float | None, float | None]:
    """Held-out Pearson of the embedding columns with the map applied, and without it: one read of the rows."""
    mapped, as_is = (PairAccumulator(n_cols=emb.n_cols, keep_blocks=False, sketch=False) for _ in range(2))
    cols = torch.from_numpy(perm)
    flip = None if sign is None else torch.from_numpy(sign.astype(np.float32))
    for a, b in _rows(emb, positions, base, model):
        as_is.update(a, b)
        b = b[:, cols]
        mapped.update(a, b if flip is None else b * flip)
    return tuple(fx.ratio(*fx.centred_parts(acc.totals, acc.col_a.numpy(), acc.col_b.numpy(), emb.n_cols))
                 for acc in (mapped, as_is))


def apply_residual(plan: AlignmentPlan, fit: ResidualFit, hidden: int) -> tuple[AlignmentPlan, int]:
    """Map every pair's residual axis through the fit; returns the new plan and the parameters it covers."""
    pairs, covered = [], 0
    perm, sign = fit.perm, fit.sign
    for p in plan.pairs:
        role = p.key.role
        new = p
        if p.is_vector and p.n_cols == hidden and (role in RESIDUAL_NORMS or
                                                     (role in RESIDUAL_BIASES and p.key.part == "bias")):
            flip = sign if (sign is not None and role in RESIDUAL_BIASES) else None
            new = replace(p, col_map=perm, col_sign=flip, evidence=False,
                          note="residual map applied (fitted from embeddings): reported, not evidence")
        elif not p.is_vector and role in RESIDUAL_IN and p.n_cols == hidden and p.key.part == "weight":
            fitted_here = role == "token_embd"
            new = replace(p, col_map=perm, col_sign=sign, evidence=p.evidence and not fitted_here,
                          note=("residual map fitted on these columns: reported, not evidence" if fitted_here
                                else "residual map applied to columns; evidence along the rows"))
        elif not p.is_vector and role in RESIDUAL_OUT and p.key.part == "weight" and p.n_rows % hidden == 0 \
                and p.base_rows is None and p.cand_rows is None:
            reps = p.n_rows // hidden
            rows = (np.arange(reps)[:, None] * hidden + perm[None, :]).reshape(-1)
            new = replace(p, cand_rows=rows, base_rows=np.arange(p.n_rows),
                          row_sign=None if sign is None else np.tile(sign, reps),
                          note="residual map applied to rows; evidence along the columns")
        if new is not p:
            covered += p.numel
        pairs.append(new)
    summary = dict(plan.summary)
    summary["residual"] = fit.to_dict()
    return AlignmentPlan(tuple(pairs), plan.unmatched, summary, plan.notes), covered


def residual_axis_params(plan: AlignmentPlan, hidden: int) -> int:
    """Parameters of pairs that have a residual axis (where the residual search applies)."""
    total = 0
    for p in plan.pairs:
        role = p.key.role
        if (p.is_vector and p.n_cols == hidden and (role in RESIDUAL_NORMS or role in RESIDUAL_BIASES)) or \
           (not p.is_vector and role in RESIDUAL_IN and p.n_cols == hidden) or \
           (not p.is_vector and role in RESIDUAL_OUT and p.n_rows % hidden == 0):
            total += p.numel
    return total


def embedding_pair(plan: AlignmentPlan) -> PairSpec | None:
    for p in plan.pairs:
        if p.key.role == "token_embd" and not p.is_vector:
            return p
    return None


__all__ = ["ResidualFit", "fit_residual", "apply_residual", "residual_axis_params", "embedding_pair", "K"]
