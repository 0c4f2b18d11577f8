"""Width pruning (Minitron, Sheared-LLaMA): which MLP units and attention heads of the base a narrower model kept.

A width-pruned model keeps a subset of each layer's MLP intermediate units (gate/up rows, down columns) and of its
attention heads (q rows, o column blocks; k/v rows per KV group), possibly reordered, then is trained on. Its MLP
and attention tensors have other shapes than the base's, so the identity plan pairs none of them ("shape differs:
needs alignment"). This module recovers, per layer, the base unit / head each kept one is and pairs every pruned
tensor with the base rows (``base_rows``) or columns (``base_cols``) it kept.

**The map** is the injective special case of :mod:`hf_provenance.alignment.slices` (many-to-one unit matching):
each model unit is a different base unit, so model units are assigned into base units by maximum-similarity
linear assignment on a rectangular matrix (:func:`hf_provenance.alignment.units.assign`: mutual-best rounds, then
scipy's ``linear_sum_assignment``). Unit signatures are the scale-invariant sketches of down columns of
:mod:`hf_provenance.alignment.units`. Heads are matched on attn_output column blocks and keep grouped-query
attention intact: the heads of one model KV group come from one base KV group, model groups are different base
groups (:func:`grouped_subset`). This covers pruning whole KV groups (fewer groups, same heads per group), query
heads within groups (same groups, fewer heads per group) and both.

**Fit on the residual writers, test on the readers** (why: :mod:`hf_provenance.alignment.units`). Only ffn_down and
attn_output are read to fit (only their sampled rows under ``sample``). Each layer's map is tested split-half (fit
on one half of the residual buckets, held-out r on the other; agreement of the two half maps) against the
coupling-matched simulated null of :mod:`hf_provenance.alignment.nulls`, and applied only when the held-out r
clears the effect threshold with z ≥ z_derived: a search over an independent model's units cannot manufacture
evidence. Applied, gate/up/q/k/v are measured against the base rows they kept and stay evidence (held out); down
and attn_output, on which the maps were fitted, are reported and not evidence (DESIGN §Statistics 3).

**Direction.** A model holding a subset of the base's units or heads is contained in the base (DESIGN §Meaning):
relation ``pruned``, model derived from base (``summary["containment"]`` feeds the verdict's direction).

Cost per layer with n base units, n' kept units, residual width h, sketch width k: reading O(h·(n + n')) (ffn_down
only), the map O(n'·n·k) in float32 blocks plus one assignment on at most LAP_MAX unresolved units, the null
O(K·u·n·k) for u ≤ 512 test units (fewer for wide layers, as in units.py). Heads: O(h·(H + H')·d) to read, the
grouped assignment O(G'·G·r³ + G³) per fit, 2·(K + 1) fits for the null. Memory O((n + n')·k + 1024·n).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from hf_provenance.alignment import keys as K
from hf_provenance.alignment import nulls as N
from hf_provenance.alignment.experts import _reading_pair, _residual_template, _View, layer_map
from hf_provenance.alignment.hidden import kept_dimensions
from hf_provenance.alignment.identity import axes_for, keyed
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.alignment.slices import _pair
from hf_provenance.alignment.units import (_attn_config, _decide, _test_units, assign, expand, grouped_subset,
                                           sketch_writer)
from hf_provenance.statistics.effects import _clean

# role -> (axis, index): which axis of the tensor holds the pruned index and whether it runs over units, query
# heads or KV groups. Writers (down, o) hold it on columns: the maps are fitted there.
MLP_ROLES = {"ffn_gate": ("rows", "units"), "ffn_up": ("rows", "units"), "ffn_down": ("cols", "units")}
ATTN_ROLES = {"attn_q": ("rows", "heads"), "attn_k": ("rows", "groups"), "attn_v": ("rows", "groups"),
              "attn_output": ("cols", "heads")}
WRITER = {"units": "ffn_down", "heads": "attn_output"}
NAMES = {"units": "MLP units", "heads": "attention heads"}

__all__ = [
    "WidthFit",
    "fit_heads",
    "fit_units",
    "grouped_subset",
    "is_width_pruned",
    "narrower_layers",
    "width_plan",
]


# ---------------------------------------------------------------------------------------------------------------
# Which layers are narrower
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Narrower:
    """One layer's MLP (what="units") or attention (what="heads") whose model side holds fewer units / heads."""

    what: str
    layer: int
    weights: dict            # role -> (base name, model name, base 2-D shape, model 2-D shape)
    vectors: dict            # role -> (base name, model name) of unit/head-indexed biases
    base_n: int              # units, or query heads
    model_n: int
    base_groups: int = 0     # KV groups (heads only)
    model_groups: int = 0
    head_dim: int = 1

    @property
    def block(self) -> dict:
        """Rows (columns for writers) per index: 1 for units, head_dim for heads and groups."""
        return {"units": 1, "heads": self.head_dim, "groups": self.head_dim}

    def base_numel(self) -> int:
        return int(sum(s[0] * s[1] for _, _, s, _ in self.weights.values()))


def _shape2(info) -> tuple[int, int]:
    shape = tuple(int(x) for x in info.shape)
    return (int(np.prod(shape[:-1])), shape[-1]) if len(shape) >= 2 else (1, shape[0] if shape else 1)


def narrower_layers(base, model, plan: AlignmentPlan) -> tuple[list[Narrower], list[str]]:
    """Layers whose MLP or attention writer (ffn_down, attn_output) is unpaired with fewer columns on the model side
    and the same residual width; the readers are checked to agree. Model layer j meets the base layer the plan's
    layer map chose (else base layer j). Returns (layers, notes on layers skipped)."""
    unmatched = {u.name for u in plan.unmatched if "shape differs" in u.reason}
    if not unmatched:
        return [], []
    paired_model = {p.cand_name for p in plan.pairs}
    lmap = layer_map(plan)
    kept = kept_dimensions(plan)  # a narrower residual stream too (Minitron-Width): residual widths H vs H'
    widths = (kept[2], len(kept[0])) if kept is not None else None

    def same_residual(xb: int, xm: int) -> bool:
        return xb == xm or (widths is not None and (xb, xm) == widths)

    kb, _, _ = keyed(base)
    km, _, _ = keyed(model)
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    by_layer: dict[tuple[int, str], dict] = {}
    for mkey, mname in km.items():
        roles = MLP_ROLES if mkey.role in MLP_ROLES else ATTN_ROLES if mkey.role in ATTN_ROLES else None
        if roles is None or mkey.layer is None or mkey.expert is not None \
                or layout.is_transposed(mkey.role) or mkey.part not in ("weight", "bias"):
            continue
        at = mkey.layer if lmap is None else lmap.get(mkey.layer)
        bname = None if at is None else kb.get(replace(mkey, layer=at))
        if bname is None:
            continue
        what = "units" if roles is MLP_ROLES else "heads"
        # keyed by the model's key (model layer numbering); the base tensor is the mapped layer's
        by_layer.setdefault((mkey.layer, what), {})[mkey] = (bname, mname)
    out, notes = [], []
    cfg = _attn_config(base.config or {})
    for (layer, what), found in sorted(by_layer.items()):
        writer = next((k for k in found if k.role == WRITER[what] and k.part == "weight"), None)
        if writer is None or found[writer][1] in paired_model or not (set(found[writer]) & unmatched):
            continue
        bname, mname = found[writer]
        (hb, nb), (hm, nm) = _shape2(base.inventory[bname]), _shape2(model.inventory[mname])
        if not same_residual(hb, hm) or not nm < nb:
            continue
        g = Narrower(what, layer, {}, {}, nb, nm)
        if what == "heads":
            why = _head_counts(g, cfg, found, base, model)
            if why:
                notes.append(f"width pruning, attention of layer {layer}: not searched ({why})")
                continue
        bad = []
        for key, (bn, mn) in found.items():
            axis, index = (MLP_ROLES if what == "units" else ATTN_ROLES)[key.role]
            sb, sm = _shape2(base.inventory[bn]), _shape2(model.inventory[mn])
            n_b, n_m = _counts(g, index)
            want_b, want_m = n_b * g.block[index], n_m * g.block[index]
            if key.part == "bias":
                if axis == "rows" and sb == (1, want_b) and sm == (1, want_m):
                    g.vectors[key.role] = (bn, mn)
                continue
            ok = (sb[0] == want_b and sm[0] == want_m and same_residual(sb[1], sm[1])) if axis == "rows" else \
                (sb[1] == want_b and sm[1] == want_m and same_residual(sb[0], sm[0]))
            if ok:
                g.weights[key.role] = (bn, mn, sb, sm)
            else:
                bad.append(key.role)
        if bad:
            notes.append(f"width pruning, {NAMES[what]} of layer {layer}: not searched ({', '.join(sorted(bad))} "
                         f"do not hold {g.model_n} of {g.base_n} {what})")
            continue
        out.append(g)
    return out, notes


def _counts(g: Narrower, index: str) -> tuple[int, int]:
    return (g.base_groups, g.model_groups) if index == "groups" else (g.base_n, g.model_n)


def _head_counts(g: Narrower, cfg: dict, found: dict, base, model) -> str | None:
    """Fill head counts from the base config and the model's shapes; a reason when they do not fit."""
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if not isinstance(n_heads, int) or n_heads < 1 or g.base_n % n_heads:
        return "no num_attention_heads in the base config that splits attn_output"
    n_kv = cfg.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        return f"{n_heads} heads do not split into {n_kv} KV groups"
    hd = g.base_n // n_heads
    if g.model_n % hd:
        return f"the model's attn_output columns ({g.model_n}) are not whole heads of {hd}"
    k = next((v for key, v in found.items() if key.role == "attn_k" and key.part == "weight"), None)
    g_m = (_shape2(model.inventory[k[1]])[0] // hd) if k is not None else g.model_n // hd * n_kv // n_heads
    h_m = g.model_n // hd
    if g_m < 1 or h_m % g_m or h_m // g_m > n_heads // n_kv or g_m > n_kv:
        return (f"{h_m} heads in {g_m} KV groups are not a subset of {n_heads} heads in {n_kv} groups "
                "that keeps each group's heads together")
    g.base_n, g.model_n, g.base_groups, g.model_groups, g.head_dim = n_heads, h_m, n_kv, g_m, hd
    return None


def is_width_pruned(base, model, plan: AlignmentPlan) -> bool:
    """Whether some layer's MLP or attention is narrower in the model (the comparison then runs :func:`width_plan`)."""
    return bool(narrower_layers(base, model, plan)[0])


# ---------------------------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WidthFit:
    """One layer's recovered subset map and its tests against the simulated null."""

    what: str                    # units | heads
    layer: int
    base_n: int
    model_n: int
    kept: np.ndarray             # per model unit / head: the base unit / head it is
    groups: np.ndarray | None    # heads: per model KV group, the base KV group
    base_groups: int
    model_groups: int
    score: np.ndarray            # per model unit / head: signature similarity with its base unit / head
    heldout: N.NullTest
    agreement: N.NullTest
    recovered: bool

    @property
    def in_order(self) -> bool:
        return bool(np.all(np.diff(self.kept) > 0))

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "what": self.what, "base": self.base_n, "model": self.model_n,
               "recovered": self.recovered, "kept": self.kept.tolist(), "in_order": self.in_order,
               "similarity": _clean(float(np.mean(self.score))),
               "heldout_r": self.heldout.to_dict(), "agreement": self.agreement.to_dict()}
        if self.groups is not None:
            out.update(base_kv_groups=self.base_groups, model_kv_groups=self.model_groups,
                       kv_groups=self.groups.tolist())
        return out


def _writer_sketches(g: Narrower, base, model, bkeys, sketch, template, kept=None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketches of the writer's columns, base [n_cols, k] and model [k, n_cols'] (bucket-major, for null draws);
    ``kept``: ``hidden.kept_dimensions`` (the base's residual rows read through the model's kept dimensions)."""
    bname, mname, _, _ = g.weights[WRITER[g.what]]
    a = sketch_writer(base, _reading_pair(base, bname, bkeys, template, writer=True, side="base", kept=kept),
                      sketch, side="base")
    b = sketch_writer(model, _reading_pair(model, mname, bkeys, template, writer=True, side="model", kept=kept),
                      sketch, side="model")
    return a, b.T.contiguous()


def fit_units(g: Narrower, base, model, bkeys: dict, sketch: N.ResidualSketch, template, *, seed: int,
              draws: int, kept=None) -> WidthFit:
    """Assign each kept unit (down column) to a base unit, one-to-one, and test the map against the null."""
    a, b = _writer_sketches(g, base, model, bkeys, sketch, template, kept)    # [n, k], [k, n']
    n_base, n_model = a.shape[0], b.shape[1]
    halves = [torch.from_numpy(h) for h in sketch.halves]
    rng = np.random.default_rng([seed, 0x3D7, g.layer])
    u = torch.from_numpy(np.sort(rng.choice(n_model, size=min(n_model, _test_units([n_base], draws, sketch.k)),
                                            replace=False)))
    ah = [N.unit_rows(a[:, h]) for h in halves]
    # centring over all kept units commutes with a null draw (a signed permutation of buckets): centre once
    bu = (b - b.mean(1, keepdim=True)).index_select(1, u)

    def statistics(t):
        bd = bu if t is None else t.rows(bu)
        bh = [bd.index_select(0, h) for h in halves]
        bh = [x / x.norm(dim=0, keepdim=True).clamp_min(N.EPS) for x in bh]
        m = [(ah[i] @ bh[i]).argmax(0) for i in range(2)]                      # test unit -> base unit
        held = 0.5 * (float((ah[1][m[0]] * bh[1].T).sum(1).mean()) + float((ah[0][m[1]] * bh[0].T).sum(1).mean()))
        return {"heldout": held, "agreement": float((m[0] == m[1]).float().mean())}

    stats = N.simulate(statistics, sketch, draws=draws, seed=seed + 104723 * (g.layer + 1))
    fit = assign(N.unit_cols(b).T.contiguous(), N.unit_rows(a))             # kept units into base units
    return WidthFit("units", g.layer, n_base, n_model, fit.perm, None, 0, 0, fit.score, stats["heldout"],
                    stats["agreement"], _decide(stats["heldout"]))


def fit_heads(g: Narrower, base, model, bkeys: dict, sketch: N.ResidualSketch, template, *, seed: int,
              draws: int, kept=None) -> WidthFit:
    """Match the kept heads (attn_output column blocks) to base heads, GQA groups kept together; test on the null."""
    a, b = _writer_sketches(g, base, model, bkeys, sketch, template, kept)
    a = a.T.reshape(sketch.k, g.base_n, g.head_dim)                            # [k, H, d]
    b = b.reshape(sketch.k, g.model_n, g.head_dim)                             # [k, H', d]
    r_b, r_m = g.base_n // g.base_groups, g.model_n // g.model_groups
    halves = [torch.from_numpy(h) for h in sketch.halves]

    def sig(x, h=None):                   # -> [k(half), heads, d], unit length per head
        # not centred over heads (units.fit_heads centres): the mean of a few kept heads is not the mean of all
        x = x if h is None else x.index_select(0, h)
        return x / x.pow(2).sum((0, 2), keepdim=True).sqrt().clamp_min(N.EPS)

    def sim(xm, xb):                      # model heads x base heads
        return torch.einsum("bht,bgt->hg", xm, xb)

    def match(s):
        return torch.from_numpy(grouped_subset(s.numpy().astype(np.float64), r_m, r_b)[0])

    ah = [sig(a, h) for h in halves]
    rows = torch.arange(g.model_n)

    def statistics(t):
        bo = b if t is None else t.axis(b, 0)
        bh = [sig(bo, h) for h in halves]
        s = [sim(bh[i], ah[i]) for i in range(2)]
        m = [match(x) for x in s]
        held = 0.5 * (float(s[1][rows, m[0]].mean()) + float(s[0][rows, m[1]].mean()))
        return {"heldout": held, "agreement": float((m[0] == m[1]).float().mean())}

    stats = N.simulate(statistics, sketch, draws=draws, seed=seed + 130363 * (g.layer + 1))
    full = sim(sig(b), sig(a)).numpy().astype(np.float64)
    heads, groups = grouped_subset(full, r_m, r_b)
    return WidthFit("heads", g.layer, g.base_n, g.model_n, heads, groups, g.base_groups, g.model_groups,
                    full[np.arange(g.model_n), heads], stats["heldout"], stats["agreement"],
                    _decide(stats["heldout"]))


# ---------------------------------------------------------------------------------------------------------------
# Pairs through the map
# ---------------------------------------------------------------------------------------------------------------

def _pairs(g: Narrower, fit: WidthFit, base, bkeys: dict, template, hidden=None) -> list[PairSpec]:
    """Every tensor of the layer against the base rows (readers) or columns (writers) it kept; with ``hidden``
    (``kept_dimensions``: a narrower residual stream) the base is read through the kept hidden dimensions on its
    residual axis too."""
    roles = MLP_ROLES if g.what == "units" else ATTN_ROLES
    index_map = {"units": fit.kept, "heads": fit.kept, "groups": fit.groups}
    fitted = f"{'unit' if g.what == 'units' else 'head'} subset map fitted on {WRITER[g.what]} columns"
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    out = []
    for role, (bname, mname, sb, sm) in g.weights.items():
        axis, index = roles[role]
        kept = expand(index_map[index], g.block[index])
        writer = axis == "cols"
        note, evidence = ((f"{fitted}: reported, not evidence", False) if writer else
                          (f"{fitted}: held out here (the base rows the model kept)", True))
        sb_seen = sb if hidden is None else (sm[0], sb[1]) if writer else (sb[0], sm[1])
        key = replace(bkeys[bname], layer=g.layer)  # the model's layer (a layer map may pair it with another)
        p = _pair(base, _View(bname, key, sb_seen), _View(mname, key, sm), template, kept,
                  part="down" if writer else "rows", note=note, evidence=evidence)
        if p is not None and hidden is not None:  # the base's residual axis through the kept dimensions
            if writer:
                rows = hidden[0] if p.base_rows is None else hidden[0][np.asarray(p.base_rows)]
                p = replace(p, base_rows=rows, cand_rows=p.cand_rows if p.cand_rows is not None else
                            np.arange(len(rows)), row_sign=hidden[1])
            else:
                p = replace(p, base_cols=hidden[0], col_sign=hidden[1])
        if p is not None:
            out.append(p)
    for role, (bname, mname) in g.vectors.items():
        _, index = roles[role]
        kept = expand(index_map[index], g.block[index])
        key = replace(bkeys[bname], layer=g.layer)
        out.append(PairSpec(key, bname, mname, (len(kept),), axes_for(key, 1, layout), K.component_of(key),
                            key.layer, base_rows=kept, cand_rows=np.arange(len(kept)),
                            note=f"{fitted}: applied (the base elements the model kept)"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def width_plan(base, model, plan: AlignmentPlan, *, seed: int = 0, sample: float | None = None,
               draws: int = N.NULL_DRAWS, sketch_k: int = N.SKETCH_K, apply_all: bool = False
               ) -> tuple[AlignmentPlan, dict, list[str]] | None:
    """Recover the kept MLP units and attention heads of a width-pruned model, layer by layer.

    Args:
        base, model: ModelSources. plan: the plan to refine (identity, or after ``apply_residual``); its unmatched
            base tensors whose shapes differ are the candidates.
        seed, sample, draws, sketch_k: as in :func:`hf_provenance.alignment.units.unit_plan`.
        apply_all: apply maps that did not beat the null too (diagnostics and tests only).

    Returns:
        None when no layer's MLP or attention is narrower in the model. Otherwise ``(plan, {"width": summary},
        lines)``: the pruned tensors of layers whose map beat the null paired with the base rows/columns they kept
        (down and attn_output evidence=False), removed from ``unmatched``; ``summary["pruned_layers"]`` (layers with
        an applied map: the comparison adds relation ``pruned``) and ``summary["containment"]`` ({what: [base,
        model]} counts, for the verdict's direction).

    Example:
        >>> new_plan, summary, lines = width_plan(base, model, plan, seed=0)     # doctest: +SKIP
    """
    layers, notes = narrower_layers(base, model, plan)
    if not layers:
        return None
    kb, _, _ = keyed(base)
    bkeys = {name: key for key, name in kb.items()}
    kept = kept_dimensions(plan)
    hidden = next(sm[0] for g in layers for r, (_, _, _, sm) in g.weights.items() if r == WRITER[g.what])
    sketch = N.ResidualSketch.build(hidden, N.residual_dims(hidden, sample, seed), k=sketch_k, seed=seed)
    template = _residual_template(plan)
    fitter = {"units": fit_units, "heads": fit_heads}
    fits = [(fitter[g.what](g, base, model, bkeys, sketch, template, seed=seed, draws=draws, kept=kept), g)
            for g in layers]
    added: list[PairSpec] = []
    params = [0, 0]
    for fit, g in fits:
        n = g.base_numel()
        params[0] += n
        if fit.recovered or apply_all:
            added += _pairs(g, fit, base, bkeys, template, kept)
            params[1] += n
    paired = {(p.base_name, p.layer) for p in added}
    # a same-shape tensor the identity plan paired (k/v of groups kept whole) is re-paired through the map
    pairs = tuple(p for p in plan.pairs if (p.base_name, p.layer) not in paired) + tuple(added)
    names = {n for p in added for n in (p.base_name, p.cand_name)}
    unmatched = tuple(u for u in plan.unmatched if u.name not in names)
    summary = _summary(fits, params, sketch, draws, sample, notes)
    lines = [_line(fits)] + notes
    new_summary = {**dict(plan.summary), "width": summary}
    return AlignmentPlan(pairs, unmatched, new_summary, plan.notes + tuple(lines)), {"width": summary}, lines


def _part(fits: list[WidthFit], what: str) -> dict | None:
    got = [f for f in fits if f.what == what]
    if not got:
        return None
    held = [f.heldout for f in got]
    out = {"layers_searched": len(got), "recovered": sum(f.recovered for f in got),
           "base": sorted({f.base_n for f in got}), "model": sorted({f.model_n for f in got}),
           "heldout_r": {"mean": _clean(np.mean([h.observed for h in held])),
                         "null_mean": _clean(np.mean([h.mean for h in held])),
                         "null_sd": _clean(np.mean([h.sd for h in held])),
                         "min_z": _clean(min((h.z for h in held if h.z is not None), default=None))},
           "agreement_p_cauchy": _clean(N.cauchy([f.agreement.p for f in got])),
           "layers": [f.to_dict() for f in got]}
    if what == "heads":
        out.update(base_kv_groups=sorted({f.base_groups for f in got}),
                   model_kv_groups=sorted({f.model_groups for f in got}))
    return out


def _summary(pairs_fits, params, sketch, draws, sample, notes) -> dict:
    fits = [f for f, _ in pairs_fits]
    applied = bool(params[1])
    containment = {}
    for what in ("units", "heads"):
        rec = [f for f in fits if f.what == what and f.recovered]
        if applied and rec:
            containment[NAMES[what]] = [max(f.base_n for f in rec), max(f.model_n for f in rec)]
    return {
        "method": "kept units assigned one-to-one to base units by linear assignment on scale-invariant sketches of "
                  "ffn_down columns; kept heads matched on attn_output column blocks with GQA groups kept together; "
                  "gate/up/q/k/v held out; tested split-half against a coupling-matched simulated null",
        "units": _part(fits, "units"), "heads": _part(fits, "heads"),
        "applied": applied, "searched_params": params[0], "aligned_params": params[1],
        "pruned_layers": len({f.layer for f, g in pairs_fits if f.recovered}) if applied else 0,
        "containment": containment or None,
        "sketch": sketch.to_dict(), "null_draws": draws, "sample": sample, "notes": notes,
    }


def _counts_text(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _line(pairs_fits) -> str:
    parts = []
    for what in ("units", "heads"):
        got = [f for f, _ in pairs_fits if f.what == what]
        if not got:
            continue
        rec = [f for f in got if f.recovered]
        held = [f.heldout for f in got]
        text = f"{NAMES[what]} {_counts_text([f.model_n for f in got])}/{_counts_text([f.base_n for f in got])}"
        if what == "heads":
            text += (f" (KV groups {_counts_text([f.model_groups for f in got])}/"
                     f"{_counts_text([f.base_groups for f in got])})")
        stats = (f"held-out split-half r = {np.mean([h.observed for h in held]):.2f}, null "
                 f"{np.mean([h.mean for h in held]):.2f} ± {np.mean([h.sd for h in held]):.2f}")
        if len(rec) == len(got):
            text += f" kept in {len(got)} layers (recovered map, {stats})"
        elif rec:
            text += f" kept: map recovered in {len(rec)}/{len(got)} layers ({stats}); the rest not compared"
        else:
            text += f": no correspondence found in {len(got)} layers ({stats}); not compared"
        parts.append(text)
    return "width pruning: " + "; ".join(parts)
