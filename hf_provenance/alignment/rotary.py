"""Rotary row order of Q/K: a small fixed candidate set of within-head row maps, chosen once per model.

Rotary embeddings pair the dimensions of each query/key head. HF checkpoints pair dim i with i + r/2
(``rotate_half``, "half"); Meta and GGUF checkpoints pair dims 2i, 2i+1 ("interleaved"). Converting between them
(Meta→HF ``convert_llama_weights_to_hf``, HF→GGUF ``convert_hf_to_gguf`` ``permute``) permutes the rows of q and k
inside every head (only the r rotated rows of a head under partial rotary; only the rope rows of MLA heads), so a
converted copy keeps v, o and the MLP exactly while q/k show almost nothing in the stored order.

**No search, a fixed candidate set.** Only three row maps are possible: identity, half→interleaved (the base
stores half, the model interleaved) and interleaved→half; fewer when they coincide (r = 4: the two conversions are
the same involution; r = 2: only the identity). Each candidate is measured on every q/k pair exactly as the stream
measures a pair (double-centred Pearson, column-permutation z from a Gaussian sketch, the pair's own maps applied
first), and one candidate is chosen **per model** (a checkpoint is converted as a whole): the one with the largest
mean r over the q/k pairs. Choosing the best of m candidates is a multiple comparison: every p-value of the chosen
candidate is multiplied by m (Bonferroni) before it counts, and the map is applied only when its mean r clears the
calibrated effect threshold and enough tensors (``min_evidence_tensors``) clear it with the corrected z. Picking
the best of three fixed maps on independent models moves r by the spread of three null draws (≈ 1/√(m·n)),
far below the threshold, so the candidate set cannot turn independent models into derived ones.

**Composition with head maps.** ``units.py`` applies a head permutation as whole blocks of rows (``expand``):
compared row (h, d) meets candidate row (heads[h], d). The rotary map acts on d inside every block, the same in
each block, so the two commute; it is composed with :func:`units.map_rows` (``cand_rows ← old[perm]``) and gives
(heads[h], m[d]) whichever runs first. q/k biases and per-head q_norm/k_norm vectors get the same map.

**Cost**: reading q and k once per model (a sample of whole heads under ``sample``), m float32 block products per
head; memory O(rows of the heads read × columns) per pair.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from statistics import NormalDist

from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.alignment.units import _attn_config, map_cols, map_rows, read_rows
from hf_provenance.measurement.accumulate import PairAccumulator
from hf_provenance.statistics import effects as fx
from hf_provenance.statistics.effects import _clean
from hf_provenance.statistics.thresholds import load as load_thresholds

IDENTITY, HALF_TO_INTERLEAVED, INTERLEAVED_TO_HALF = "stored order", "half→interleaved", "interleaved→half"
CANDIDATES = (IDENTITY, HALF_TO_INTERLEAVED, INTERLEAVED_TO_HALF)
# default rotated fraction of each head when the layout names a config field the config lacks (transformers'
# defaults: Glm4MoeConfig partial_rotary_factor 0.5, GPTNeoXConfig rotary_pct 0.25)
FRACTION_DEFAULTS = {"partial_rotary_factor": 0.5, "rotary_pct": 0.25}
MIN_HEADS_READ = 2          # under sampling: at least this many heads per pair
READ_ROWS = 1024            # rows per read
QK_LAG = 0.5                # q/k "lag" v/o when their r is below this share of the layer's v/o r

__all__ = ["CANDIDATES", "RowBlocks", "blocks_for", "order_map", "qk_lag", "rotary_plan", "row_map"]


def order_map(length: int, kind: str) -> np.ndarray:
    """m[r] = the candidate's row (inside a rotated span of ``length`` rows) that holds the base's row r.

    half→interleaved: the base pairs (i, i + L/2), the candidate (2i, 2i+1): base row j·L/2 + i sits at 2i + j.
    interleaved→half is its inverse. Example:
        >>> order_map(8, "half→interleaved").tolist()
        [0, 2, 4, 6, 1, 3, 5, 7]
        >>> order_map(8, "interleaved→half").tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
    """
    if length % 2:
        raise ValueError(f"a rotated span has an even number of rows, got {length}")
    half = length // 2
    i = np.arange(half)
    m = np.arange(length)
    if kind == HALF_TO_INTERLEAVED:
        m[i], m[half + i] = 2 * i, 2 * i + 1
    elif kind == INTERLEAVED_TO_HALF:
        m[2 * i], m[2 * i + 1] = i, half + i
    elif kind != IDENTITY:
        raise ValueError(f"unknown rotary order map {kind!r}; one of {CANDIDATES}")
    return m


@dataclass(frozen=True)
class RowBlocks:
    """Rows of one q/k tensor: ``n_blocks`` blocks (heads) of ``block`` rows, rows offset..offset+length rotate."""

    n_blocks: int
    block: int
    offset: int
    length: int

    @property
    def n_rows(self) -> int:
        return self.n_blocks * self.block


def row_map(blocks: RowBlocks, kind: str) -> np.ndarray:
    """The candidate row for every compared row: ``order_map`` inside the rotated span of every block."""
    inner = np.arange(blocks.block)
    inner[blocks.offset:blocks.offset + blocks.length] = blocks.offset + order_map(blocks.length, kind)
    return (np.arange(blocks.n_blocks)[:, None] * blocks.block + inner[None, :]).reshape(-1)


def _fraction(cfg: dict, field: str | None) -> float:
    if field is None:
        return 1.0
    for src in (cfg, cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}):
        if isinstance(src, dict) and isinstance(src.get(field), (int, float)):
            return float(src[field])
    return FRACTION_DEFAULTS.get(field, 1.0)


def blocks_for(role: str, n_rows: int, config: dict, layout) -> RowBlocks | None:
    """Head blocks and rotated span of a q/k role from the config (None when the shapes disagree)."""
    cfg = _attn_config(config)
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if not isinstance(n_heads, int) or n_heads < 1:
        return None
    if role == "attn_q_b" or role == "attn_kv_a_mqa":          # MLA: rope rows at the end of each block
        rope, nope, rank = cfg.get("qk_rope_head_dim"), cfg.get("qk_nope_head_dim"), cfg.get("kv_lora_rank")
        if not isinstance(rope, int) or rope < 2:
            return None
        out = (RowBlocks(n_heads, (nope or 0) + rope, nope or 0, rope) if role == "attn_q_b" else
               RowBlocks(1, (rank or 0) + rope, rank or 0, rope))
    else:
        n = n_heads if role == "attn_q" else (cfg.get("num_key_value_heads") or n_heads)
        hd = cfg.get("head_dim") or (cfg.get("hidden_size") or 0) // n_heads
        if not isinstance(hd, int) or hd < 2:
            return None
        rot = int(hd * _fraction(cfg, layout.rotary_fraction_field)) // 2 * 2
        out = RowBlocks(int(n), hd, 0, rot)
    return out if out.n_rows == n_rows and out.length >= 2 else None


def candidate_maps(blocks: RowBlocks) -> dict[str, np.ndarray]:
    """The distinct candidate maps (identity first); coinciding conversions are counted once."""
    out: dict[str, np.ndarray] = {}
    for kind in CANDIDATES:
        m = order_map(blocks.length, kind)
        if not any(np.array_equal(m, order_map(blocks.length, k)) for k in out):
            out[kind] = m
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring the candidates
# ---------------------------------------------------------------------------------------------------------------

def _heads_read(blocks: RowBlocks, sample: float | None, rng: np.random.Generator) -> np.ndarray:
    if sample is None or sample >= 1.0:
        return np.arange(blocks.n_blocks)
    k = min(blocks.n_blocks, max(MIN_HEADS_READ, math.ceil(sample * blocks.n_blocks)))
    return np.sort(rng.choice(blocks.n_blocks, size=k, replace=False))


def measure_candidates(pair: PairSpec, blocks: RowBlocks, maps: dict[str, np.ndarray], base, model, *,
                       sample: float | None, seed: int) -> dict[str, dict]:
    """Per candidate: the pair's Pearson r, column-permutation z and p, as the stream would measure it."""
    rng = np.random.default_rng([seed, zlib.crc32(pair.base_name.encode())])
    heads = _heads_read(blocks, sample, rng)
    accs = {k: PairAccumulator(n_cols=pair.n_cols, keep_blocks=False, sketch=True, seed=seed) for k in maps}
    per_read = max(1, READ_ROWS // blocks.block)
    for s in range(0, len(heads), per_read):
        hs = heads[s:s + per_read]
        pos = (hs[:, None] * blocks.block + np.arange(blocks.block)[None, :]).reshape(-1)
        a = read_rows(base, pair, pos, side="base").float()
        b = read_rows(model, pair, pos, side="model").float()
        for kind, m in maps.items():
            inner = np.arange(blocks.block)
            inner[blocks.offset:blocks.offset + blocks.length] = blocks.offset + m
            local = (np.arange(len(hs))[:, None] * blocks.block + inner[None, :]).reshape(-1)
            accs[kind].update(a, b[torch.from_numpy(local)])
    out = {}
    for kind, acc in accs.items():
        ca, cb = acc.col_a.cpu().numpy(), acc.col_b.cpu().numpy()
        num, da, db = fx.centred_parts(acc.totals, ca, cb, pair.n_cols)
        r = fx.ratio(num, da, db)
        z = None
        if r is not None:
            z = fx.z_one_axis(num, acc.sketch_acc.cpu().numpy(), ca, cb, int(acc.totals[0]), pair.n_cols,
                              acc._g.cpu().numpy().astype(np.float64))
        out[kind] = {"r": r, "z": z, "p": fx.two_sided_p(z) if z is not None else None}
    return out


def _bonferroni_z(p: float | None, m: int) -> float | None:
    if p is None:
        return None
    q = min(1.0, m * p) / 2
    return float(-NormalDist().inv_cdf(q)) if q > 0 else float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def _role(key_text: str) -> str:
    parts = key_text.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def qk_lag(tensors, th) -> bool:
    """True when, in some layer, q or k shows far less than that layer's v and o, which clear the threshold: the
    signature of a rotary reorder (v/o untouched, q/k rows moved inside heads). Only a trigger for the search."""
    by_layer: dict[int, dict[str, float]] = {}
    for t in tensors:
        if t.layer is None or len(t.shape) != 2 or t.pearson.value is None:
            continue
        role = _role(t.key)
        if role in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b"):
            z = t.pearson.z
            clears = abs(t.pearson.value) >= th.r_derived and z is not None and abs(z) >= th.z_derived
            by_layer.setdefault(t.layer, {})[role] = t.pearson.value if clears or role not in (
                "attn_v", "attn_output", "attn_kv_b") else float("nan")
    for roles in by_layer.values():
        ref = [roles[r] for r in ("attn_v", "attn_output", "attn_kv_b") if r in roles]
        qk = [roles[r] for r in ("attn_q", "attn_k", "attn_q_b", "attn_kv_a_mqa") if r in roles]
        if ref and qk and all(np.isfinite(ref)) and min(qk) < QK_LAG * min(ref):
            return True
    return False


def rotary_plan(base, model, plan: AlignmentPlan, *, seed: int = 0, sample: float | None = None
                ) -> tuple[AlignmentPlan, dict, list[str]] | None:
    """Try the fixed rotary row-order candidates on every q/k pair of ``plan``; one choice for the whole model.

    Returns None when there is nothing to try (no rotary layout, no q/k pair whose rows split into the config's
    heads, or rotated spans of 2 rows). Otherwise ``(plan, {"rotary": summary}, [line])``: the plan with the
    chosen map composed onto every q/k pair (and q/k biases, q_norm/k_norm) when it is applied, unchanged
    otherwise. ``summary["applied"]`` says whether a non-identity order was applied.
    """
    th = load_thresholds()
    cfg = base.config or {}
    layout = layout_for(str(cfg.get("model_type", "")))
    if layout.rotary is None or not layout.rotary_roles:
        return None
    targets = []
    for p in plan.pairs:
        if p.key.role in layout.rotary_roles and not p.is_vector and p.key.part == "weight" and p.layout is None \
                and p.key.expert is None:
            blocks = blocks_for(p.key.role, p.n_rows, cfg, layout)
            if blocks is not None:
                targets.append((p, blocks))
    if not targets:
        return None
    maps = candidate_maps(targets[0][1])
    targets = [(p, b) for p, b in targets if b.length == targets[0][1].length]
    if len(maps) < 2:
        return None
    m = len(maps)
    results = [(p, b, measure_candidates(p, b, maps, base, model, sample=sample, seed=seed)) for p, b in targets]
    mean_r = {k: float(np.mean([res[k]["r"] or 0.0 for _, _, res in results])) for k in maps}
    chosen = max(maps, key=lambda k: mean_r[k])
    tensors, recovered = [], 0
    for p, b, res in results:
        best = max(maps, key=lambda k: res[k]["r"] if res[k]["r"] is not None else -2.0)
        r, zb = res[chosen]["r"], _bonferroni_z(res[chosen]["p"], m)
        ok = best == chosen and r is not None and r >= th.r_derived and zb is not None and zb >= th.z_derived
        recovered += ok
        tensors.append({"name": p.base_name, "best": best, "recovered": bool(ok),
                        "r": {k: _clean(v["r"]) for k, v in res.items()},
                        "z": {k: _clean(v["z"]) for k, v in res.items()},
                        "p_bonferroni": _clean(min(1.0, m * res[chosen]["p"]) if res[chosen]["p"] is not None
                                               else None)})
    need = min(th.min_evidence_tensors, len(results))
    significant = mean_r[chosen] >= th.r_derived and recovered >= need
    applied = chosen != IDENTITY and significant
    new_plan = _apply(plan, targets, chosen, m, layout) if applied else plan
    summary = {
        "method": (f"fixed candidate set of within-head q/k row orders ({', '.join(maps)}), one choice per model by "
                   f"the largest mean Pearson r over the q/k pairs; p-values of the chosen order x{m} "
                   "(Bonferroni) before they count"),
        "declared": layout.rotary, "candidates": list(maps), "multiplicity": m, "chosen": chosen,
        "applied": applied, "confirmed": chosen == IDENTITY and significant,
        "pairs": len(results), "recovered": recovered, "rotated_rows_per_head": targets[0][1].length,
        "mean_r": {k: _clean(v) for k, v in mean_r.items()}, "sample": sample,
        "params_searched": int(sum(p.numel for p, _ in targets)), "tensors": tensors,
    }
    new_summary = {**dict(new_plan.summary), "rotary": summary}
    line = _line(summary)
    return (AlignmentPlan(new_plan.pairs, new_plan.unmatched, new_summary, new_plan.notes + (line,)),
            {"rotary": summary}, [line])


def _apply(plan: AlignmentPlan, targets, kind: str, m: int, layout) -> AlignmentPlan:
    note = (f"rotary row order {kind} applied inside each head (chosen among {m} fixed candidates on the q/k "
            f"pairs: Bonferroni x{m} on this tensor's p)")
    by_id = {id(p): b for p, b in targets}
    out = []
    for p in plan.pairs:
        if id(p) in by_id:
            p = map_rows(p, row_map(by_id[id(p)], kind), note=note)
        elif p.is_vector and p.key.expert is None:
            vec = _vector_blocks(p, targets, layout)
            if vec is not None:
                p = map_cols(p, row_map(vec, kind), note=f"rotary row order {kind} applied (as on q/k)")
        out.append(p)
    return AlignmentPlan(tuple(out), plan.unmatched, dict(plan.summary), plan.notes)


def _vector_blocks(p: PairSpec, targets, layout) -> RowBlocks | None:
    """q/k biases (one element per row) and q_norm/k_norm (one element per head dim) follow the q/k rows."""
    for t, b in targets:
        if t.layer != p.layer:
            continue
        if p.key.part == "bias" and p.key.role == t.key.role and p.n_cols == b.n_rows:
            return b
        if p.key.role in ("attn_q_norm", "attn_k_norm") and p.n_cols == b.block:
            return RowBlocks(1, b.block, b.offset, b.length)
    return None


def _line(s: dict) -> str:
    tried = f"{s['multiplicity']} candidates tried, multiplicity counted"
    r = s["mean_r"]
    if s["applied"]:
        return (f"rotary row order: {s['chosen']} recovered in {s['recovered']}/{s['pairs']} q and k tensors "
                f"({tried}); mean r = {r[s['chosen']]:.3f} (stored order: {r[IDENTITY]:.3f})")
    if s["confirmed"]:
        return f"rotary row order: stored order confirmed in {s['recovered']}/{s['pairs']} q and k tensors ({tried})"
    best = max(r, key=lambda k: r[k] if r[k] is not None else -2)
    return (f"rotary row order: no candidate order shows a correspondence ({tried}; best mean r = "
            f"{r[best]:.3f} for {best})")
