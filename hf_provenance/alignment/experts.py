"""Mixture-of-experts: match routed experts, check that the router follows, compare shared experts, detect upcycling.

Routed experts are an arbitrary axis: a copy can list them in any order (router rows permuted the same way) and
every per-expert comparison then meets the wrong expert. Routed experts, shared experts and the router are analysed
separately:

* **Routed experts** are matched per MoE layer by an *expert sketch* that does not depend on the order of the
  units inside the expert nor on per-unit rescaling (up×c, down÷c): the Gram matrix Ŝ Ŝᵀ of the expert's ffn_down
  columns, each scaled to unit length, over count-sketched residual dimensions (k ≤ 128 buckets). Experts are
  compared by the Pearson correlation of the off-diagonal Gram entries, matched one-to-one by linear assignment,
  and many-to-one where the model has more experts than the base (a dense base MLP counts as one expert: upcycling).
  Only ffn_down is read to fit (only its sampled rows under ``sample``); gate and up stay held-out evidence, as in
  :mod:`hf_provenance.alignment.units`.
* **The router** (``ffn_gate_inp``) is not used to fit: its rows are checked to follow the expert map (router r,
  the mean per-expert Pearson of router rows under the map), and a map fitted on the router alone is compared with
  the expert map (agreement).
* **Shared experts** have no order to recover; their Gram similarity is reported (units inside them are matched by
  ``unit_plan``).

Every statistic (split-half held-out Gram r, agreement of the half maps, router r, router/expert agreement) is
tested against the coupling-matched simulated null of :mod:`hf_provenance.alignment.nulls`: one signed permutation
of B's residual axis transforms every expert Gram matrix and the router of B at once, so each expert's coupling
with its router row is kept. A layer's map is applied only when its held-out Gram r clears the effect threshold and
z ≥ z_derived against that null.

**Stacked experts.** transformers v5 stores a layer's routed experts as ``mlp.experts.gate_up_proj [E, 2I, H]``
(gate then up per expert) and ``mlp.experts.down_proj [E, H, I]``; gguf as ``*_exps [E, ...]``. Each expert matrix
is then a set of rows of the stacked tensor's 2-D view (``_View``; the gate/up split from the declared layout,
:mod:`hf_provenance.alignment.layouts`), so matching and pairing work the same whether either side stores experts
one tensor each or stacked. Where one side is stacked and the other is not, the identity plan paired nothing: the
experts are paired expert by expert through the fitted map when it beat the null, else by index (what the identity
plan does when both sides store them alike). Stacked layouts stored transposed (gpt-oss, Llama-4: ``[E, H, 2I]``)
are listed, not searched.

Cost per MoE layer with E experts of n units, residual width h, sketch width k: reading O(h·E·n) (ffn_down) plus
the router; sketches O(h·E·n); Gram matrices O(E·n·k²); matching O(E²·k²) plus an E×E assignment; the null
O(K·(E·k² + E²·k²)). Memory O(E·k² + n·k).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from hf_provenance.alignment.assignment import linear_sum_assignment

from hf_provenance.alignment import keys as K
from hf_provenance.alignment import nulls as N
from hf_provenance.alignment.hidden import kept_dimensions
from hf_provenance.alignment.identity import axes_for, keyed
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.alignment.units import map_cols, map_rows, read_rows, sketch_writer
from hf_provenance.statistics.effects import _clean
from hf_provenance.statistics.thresholds import load as load_thresholds

EXPERT_SKETCH_K = 128
IDENTITY_SHARE = 0.95
EXPERT_ROLES = ("ffn_gate_exp", "ffn_up_exp", "ffn_down_exp")
DENSE_ROLES = ("ffn_gate", "ffn_up", "ffn_down")
SHARED_DOWN = "ffn_down_shexp"
ROUTER = "ffn_gate_inp"
ROUTER_VECTORS = ("exp_probs_b",)   # one element per routed expert (DeepSeek's e_score_correction_bias)
STACKED = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")

__all__ = ["ExpertLayerFit", "expert_plan", "experts_relayout", "gram_sketch"]


# ---------------------------------------------------------------------------------------------------------------
# Expert sketches
# ---------------------------------------------------------------------------------------------------------------

def gram_sketch(down_sketch: torch.Tensor) -> torch.Tensor:
    """[n_units, k] sketch of an expert's down columns -> its [k, k] Gram matrix of unit-length columns.

    Invariant to the order of the units and to any positive (or negative) per-unit scale.
    """
    s = down_sketch / down_sketch.norm(dim=1, keepdim=True).clamp_min(N.EPS)
    return s.T @ s


def _offdiag(g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Upper off-diagonal entries of g[:, idx, idx] as rows, each centred and scaled to unit length (Pearson)."""
    sub = g.index_select(-1, idx).index_select(-2, idx)
    iu = torch.triu_indices(len(idx), len(idx), offset=1)
    v = sub[:, iu[0], iu[1]]
    v = v - v.mean(1, keepdim=True)
    return v / v.norm(dim=1, keepdim=True).clamp_min(N.EPS)


def _lap(sim: np.ndarray) -> np.ndarray:
    """One-to-one map of the rows of sim (n ≤ n' columns) maximising total similarity."""
    ri, ci = linear_sum_assignment(sim, maximize=True)
    out = np.full(sim.shape[0], -1, dtype=np.int64)
    out[ri] = ci
    return out


# ---------------------------------------------------------------------------------------------------------------
# One MoE layer
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _View:
    """One expert matrix: a whole tensor, or rows ``rows`` of a stacked [E, ...] tensor's 2-D view."""

    name: str
    key: K.CanonicalKey          # the expert's own key (synthesised for a stacked tensor: role ffn_*_exp, expert e)
    shape: tuple[int, int]
    rows: np.ndarray | None = None

    @property
    def stacked(self) -> bool:
        return self.rows is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def through(self, local: np.ndarray | None) -> np.ndarray | None:
        """Stored rows of the view's rows ``local`` (None: all of them, in order)."""
        if self.rows is None:
            return None if local is None else np.asarray(local)
        return self.rows if local is None else self.rows[np.asarray(local)]


@dataclass
class _Side:
    experts: dict            # expert index (or -1 for a dense MLP) -> {role: _View (or a tensor name)}
    router: str | None
    shared_down: str | None

    @property
    def stacked(self) -> bool:
        return any(isinstance(v, _View) and v.stacked for e in self.experts.values() for v in e.values())


# stacked role -> the per-expert roles of its pieces (in the order of the declared split's pieces)
UNSTACK = {"ffn_gate_exps": ("ffn_gate_exp",), "ffn_up_exps": ("ffn_up_exp",), "ffn_down_exps": ("ffn_down_exp",),
           "ffn_gate_up_exps": ("ffn_gate_exp", "ffn_up_exp")}


def _unstack(key, name: str, shape: tuple, layout) -> dict[int, dict[str, _View]] | None:
    """Per-expert views of a stacked [E, out, in] tensor, or None (transposed storage, no declared split)."""
    if len(shape) != 3 or layout.is_transposed(key.role) or key.role not in UNSTACK:
        return None
    n_exp, n_out, n_in = (int(x) for x in shape)
    if key.role == "ffn_gate_up_exps":
        split = layout.split_for(key.role)
        try:
            pieces = split.indices(n_out) if split is not None else None
        except ValueError:
            pieces = None
        if pieces is None:
            return None
    else:
        pieces = (tuple(range(n_out)),)
    out: dict[int, dict[str, _View]] = {}
    for e in range(n_exp):
        for role, idx in zip(UNSTACK[key.role], pieces):
            out.setdefault(e, {})[role] = _View(name, K.CanonicalKey(role, key.layer, e, key.part),
                                                (len(idx), n_in), e * n_out + np.asarray(idx, dtype=np.int64))
    return out


@dataclass(frozen=True)
class ExpertLayerFit:
    layer: int
    base_experts: tuple[int, ...]      # base expert ids (-1: the dense MLP of an upcycling base)
    model_experts: tuple[int, ...]
    mapping: np.ndarray                # per base expert: model expert id (one-to-one part)
    best_base: np.ndarray              # per model expert: best-matching base expert id (many-to-one view)
    similarity: np.ndarray             # per base expert: Gram r with its matched model expert
    model_similarity: np.ndarray       # per model expert: Gram r with its best base expert
    heldout: N.NullTest
    agreement: N.NullTest | None
    router_r: N.NullTest | None
    router_agreement: N.NullTest | None
    shared_r: N.NullTest | None
    recovered: bool
    router_consistent: bool | None
    upcycled: bool

    @property
    def is_identity(self) -> bool:
        if self.upcycled or len(self.base_experts) != len(self.model_experts):
            return False
        return float(np.mean(np.asarray(self.model_experts)[self.mapping] == np.asarray(self.base_experts))) \
            >= IDENTITY_SHARE

    @property
    def unmatched_model(self) -> list[int]:
        used = set(np.asarray(self.model_experts)[self.mapping[self.mapping >= 0]].tolist())
        return [e for e in self.model_experts if e not in used]

    def to_dict(self) -> dict:
        mex = np.asarray(self.model_experts)
        return {
            "layer": self.layer, "base_experts": len(self.base_experts), "model_experts": len(self.model_experts),
            "upcycled": self.upcycled, "recovered": self.recovered, "router_consistent": self.router_consistent,
            "map": {str(b): int(mex[m]) for b, m in zip(self.base_experts, self.mapping) if m >= 0},
            "similarity": {str(b): _clean(s) for b, s in zip(self.base_experts, self.similarity)},
            "model_best_base": {str(e): int(self.base_experts[b]) for e, b in zip(self.model_experts, self.best_base)},
            "model_similarity": {str(e): _clean(s) for e, s in zip(self.model_experts, self.model_similarity)},
            "unmatched_model_experts": self.unmatched_model,
            "heldout_r": self.heldout.to_dict(),
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
            "router_r": None if self.router_r is None else self.router_r.to_dict(),
            "router_agreement": None if self.router_agreement is None else self.router_agreement.to_dict(),
            "shared_r": None if self.shared_r is None else self.shared_r.to_dict(),
        }


def _sides(kb: dict, km: dict, base_src, model_src, layer_map: dict[int, int | None] | None = None,
           kept=None) -> tuple[dict[int, tuple[_Side, _Side]], dict[str, list[str]]]:
    """Per layer with routed experts in the model: the base's experts (or its dense MLP) and the model's; and the
    stacked roles per outcome (``{"searched": [...], "not_searched": [...]}``). ``layer_map``: the base layer
    of each model layer when a layer map paired them (pruned, up-scaled); else model layer j meets base layer j."""
    stacked: dict[str, set] = {"searched": set(), "not_searched": set()}

    def collect(keymap, src):
        layout = layout_for(str((src.config or {}).get("model_type", "")))
        out: dict[int, _Side] = {}

        def view(key, name):
            shape = tuple(int(x) for x in src.inventory[name].shape)
            return _View(name, key, shape) if len(shape) == 2 else None

        for key, name in keymap.items():
            if key.part != "weight" or key.layer is None:
                continue
            side = out.setdefault(key.layer, _Side({}, None, None))
            if key.role in EXPERT_ROLES and (v := view(key, name)) is not None:
                side.experts.setdefault(key.expert, {})[key.role] = v
            elif key.role in DENSE_ROLES and (v := view(key, name)) is not None:
                side.experts.setdefault(-1, {})[key.role + "_exp"] = v
            elif key.role in STACKED:
                views = _unstack(key, name, tuple(src.inventory[name].shape), layout)
                stacked["searched" if views is not None else "not_searched"].add(key.role)
                for e, roles in (views or {}).items():
                    side.experts.setdefault(e, {}).update(roles)
            elif key.role == ROUTER:
                side.router = name
            elif key.role == SHARED_DOWN:
                side.shared_down = name
        return out

    base, model = collect(kb, base_src), collect(km, model_src)
    out = {}
    for layer, ms in model.items():
        mexp = {e: v for e, v in ms.experts.items() if e >= 0 and "ffn_down_exp" in v}
        at = layer if layer_map is None else layer_map.get(layer)
        if not mexp or at not in base:
            continue
        bs = base[at]
        bexp = {e: v for e, v in bs.experts.items() if e >= 0 and "ffn_down_exp" in v}
        if not bexp and -1 in bs.experts and "ffn_down_exp" in bs.experts[-1]:
            bexp = {-1: bs.experts[-1]}          # dense base layer: upcycling
        if not bexp:
            continue
        widths = {v["ffn_down_exp"].shape[0] for side in (bexp, mexp) for v in side.values()}
        if len(widths) > 1 and (kept is None or widths != {kept[2], len(kept[0])}):
            continue  # residual widths differ (another family; a pruned hidden size without its kept dimensions)
        out[layer] = (_Side(bexp, bs.router, bs.shared_down), _Side(mexp, ms.router, ms.shared_down))
    return out, {k: sorted(v) for k, v in stacked.items()}


def _residual_template(plan: AlignmentPlan) -> tuple[dict, dict]:
    """The plan's residual map as (for residual-writing rows, for residual-reading columns) PairSpec fields."""
    from hf_provenance.alignment.residual import RESIDUAL_IN, RESIDUAL_OUT

    rows, cols = {}, {}
    for p in plan.pairs:
        if p.is_vector or p.key.part != "weight":
            continue
        if not rows and p.key.role in RESIDUAL_OUT and p.key.role not in ("mlm_dense", "pooler") \
                and p.cand_rows is not None and "residual" in (p.note or ""):
            rows = {"cand_rows": np.asarray(p.cand_rows), "row_sign": p.row_sign}
        if not cols and p.key.role in RESIDUAL_IN and p.key.role != "token_embd" and p.col_map is not None \
                and "residual" in (p.note or ""):
            cols = {"col_map": np.asarray(p.col_map), "col_sign": p.col_sign}
    return rows, cols


def _pair(base, model, bview: _View, mview: _View, template: tuple[dict, dict], *, writer: bool,
          note: str | None = None, evidence: bool = True, kept=None) -> PairSpec | None:
    """Base expert matrix vs model expert matrix (either may be rows of a stacked tensor), through the residual
    map: rows of residual writers, columns of residual readers (through the kept hidden dimensions of a narrower
    model, ``kept``)."""
    shape_b = tuple(bview.shape)
    narrow = kept is not None and shape_b != tuple(mview.shape)
    if narrow:
        shape_b = (len(kept[0]), shape_b[1]) if writer and shape_b[0] == kept[2] else \
            (shape_b[0], len(kept[0])) if not writer and shape_b[1] == kept[2] else shape_b
    if shape_b != tuple(mview.shape):
        return None
    if narrow:  # the base's pair through its kept dimensions, then narrowed on its residual axis
        whole = _pair(base, model, bview, _View(mview.name, mview.key, tuple(bview.shape), mview.rows), template,
                      writer=writer, note=note, evidence=evidence)
        if whole is None:
            return None
        if writer:
            rows = np.arange(bview.shape[0]) if whole.base_rows is None else np.asarray(whole.base_rows)
            crows = None if whole.cand_rows is None else np.asarray(whole.cand_rows)[: len(kept[0])]
            return replace(whole, shape=shape_b, base_rows=rows[kept[0]], cand_rows=crows, row_sign=kept[1])
        return replace(whole, shape=shape_b, base_cols=kept[0], col_sign=kept[1])
    n_rows, n_cols = bview.shape
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    rows, cols = template
    kw: dict = {}
    local = None
    if writer and rows and len(rows["cand_rows"]) == n_rows:
        local, kw["row_sign"] = rows["cand_rows"], rows["row_sign"]
    elif not writer and cols and len(cols["col_map"]) == n_cols:
        kw = dict(cols)
    brows, crows = bview.through(None), mview.through(local)
    if brows is not None or crows is not None:
        kw["base_rows"] = np.arange(n_rows) if brows is None else brows
        kw["cand_rows"] = np.arange(n_rows) if crows is None else crows
    key = bview.key
    return PairSpec(key, bview.name, mview.name, (n_rows, n_cols), axes_for(key, 2, layout), K.component_of(key),
                    key.layer, evidence=evidence, note=note, **kw)


def fit_layer(layer: int, bside: _Side, mside: _Side, base, model, bkeys: dict, sketch: N.ResidualSketch,
              template, *, seed: int, draws: int, kept=None) -> ExpertLayerFit:
    """Match one MoE layer's experts and test the map, the router and the shared expert against the null
    (``kept``: ``hidden.kept_dimensions``, the base read through a narrower model's hidden dimensions)."""
    bex, mex = sorted(bside.experts), sorted(mside.experts)
    upcycled = bex == [-1]

    def grams(side: _Side, src, which: str) -> torch.Tensor:
        out = []
        for e in sorted(side.experts):
            pair = _reading_pair(src, side.experts[e]["ffn_down_exp"], bkeys, template, writer=True, side=which,
                                 kept=kept)
            out.append(gram_sketch(sketch_writer(src, pair, sketch, side=which)))
        return torch.stack(out)

    ga, gb = grams(bside, base, "base"), grams(mside, model, "model")
    halves = [torch.from_numpy(h) for h in sketch.halves]
    full = torch.arange(sketch.k)
    a_full = _offdiag(ga, full)
    a_half = [_offdiag(ga, h) for h in halves]
    ra = rb = None
    if bside.router and mside.router and not upcycled:
        pa = _reading_pair(base, bside.router, bkeys, template, writer=False, side="base", kept=kept)
        pb = _reading_pair(model, mside.router, bkeys, template, writer=False, side="model", kept=kept)
        if pa.n_cols == pb.n_cols == sketch.n_dims:
            ra = N.unit_rows(sketch.sketch_cols(read_rows(base, pa, np.arange(pa.n_rows), side="base")))
            rb = sketch.sketch_cols(read_rows(model, pb, np.arange(pb.n_rows), side="model"))
    sa = sb = None
    if bside.shared_down and mside.shared_down:
        pa = _reading_pair(base, bside.shared_down, bkeys, template, writer=True, side="base", kept=kept)
        pb = _reading_pair(model, mside.shared_down, bkeys, template, writer=True, side="model", kept=kept)
        if pa.shape == pb.shape:
            sa = gram_sketch(sketch_writer(base, pa, sketch, side="base")).unsqueeze(0)
            sb = gram_sketch(sketch_writer(model, pb, sketch, side="model")).unsqueeze(0)

    def match(sim: torch.Tensor) -> torch.Tensor:
        s = sim.numpy().astype(np.float64)
        if s.shape[0] <= s.shape[1]:
            return torch.from_numpy(_lap(s))
        return torch.from_numpy(s.argmax(1))   # more base experts than model experts: many-to-one

    def statistics(t):
        g = gb if t is None else t.gram(gb)
        bh = [_offdiag(g, h) for h in halves]
        m = [match(a_half[i] @ bh[i].T) for i in range(2)]
        rows = torch.arange(len(bex))
        held = 0.5 * (float((a_half[1] * bh[1][m[0]]).sum(1).mean()) +
                      float((a_half[0] * bh[0][m[1]]).sum(1).mean()))
        out = {"heldout": held, "agreement": float((m[0] == m[1]).float().mean())}
        if ra is not None:
            mfull = match(a_full @ _offdiag(g, full).T)
            rbt = N.unit_rows(rb if t is None else t.cols(rb))
            out["router_r"] = float((ra[rows] * rbt[mfull]).sum(1).mean())
            out["router_agreement"] = float((match(ra @ rbt.T) == mfull).float().mean())
        if sa is not None:
            sbt = sb if t is None else t.gram(sb)
            out["shared_r"] = float((_offdiag(sa, full) * _offdiag(sbt, full)).sum())
        return out

    stats = N.simulate(statistics, sketch, draws=draws, seed=seed + 15485863 * (layer + 1),
                       decisive=("heldout", "router_r"))
    sim = (a_full @ _offdiag(gb, full).T).numpy().astype(np.float64)
    mapping = _lap(sim) if sim.shape[0] <= sim.shape[1] else sim.argmax(1)
    best_base = sim.argmax(0)
    similarity = sim[np.arange(len(bex)), mapping]
    model_sim = sim[best_base, np.arange(len(mex))]
    held = stats["heldout"]
    th = load_thresholds()
    recovered = bool(held.observed >= th.r_derived and (held.z or 0) >= th.z_derived and held.exceeds_all)
    router_r = stats.get("router_r")
    consistent = None
    if router_r is not None:
        consistent = bool(router_r.observed >= th.r_derived and (router_r.z or 0) >= th.z_derived)
    return ExpertLayerFit(layer, tuple(bex), tuple(mex), mapping, best_base, similarity, model_sim, held,
                          None if upcycled else stats.get("agreement"), router_r, stats.get("router_agreement"),
                          stats.get("shared_r"), recovered, consistent, upcycled)


def _reading_pair(src, view: _View | str, bkeys: dict, template: tuple[dict, dict], *, writer: bool,
                  side: str, kept=None) -> PairSpec:
    """A pair that reads one side's matrix ``view`` (a _View, or a whole tensor by name) in the base's index space
    (the model through the residual map: rows of residual writers, columns of residual readers)."""
    if not isinstance(view, _View):
        info = src.inventory[view]
        view = _View(view, bkeys.get(view) or K.CanonicalKey("ffn_down_exp"),
                     (int(np.prod(info.shape[:-1])), int(info.shape[-1])))
    shape = view.shape
    kw: dict = {}
    if side == "model":
        rows, cols = template
        if writer and rows and len(rows["cand_rows"]) == shape[0]:
            kw = {"base_rows": np.arange(shape[0]), "cand_rows": view.through(rows["cand_rows"]),
                  "row_sign": rows["row_sign"]}
        elif not writer and cols and len(cols["col_map"]) == shape[1]:
            kw = dict(cols)
        if view.stacked and "cand_rows" not in kw:
            kw.update(base_rows=np.arange(shape[0]), cand_rows=view.rows)
    elif view.stacked:
        kw = {"base_rows": view.rows}
    if kept is not None and side == "base":  # a narrower model: the base's residual axis through its kept dimensions
        if writer and shape[0] == kept[2]:
            rows = np.arange(shape[0]) if "base_rows" not in kw else np.asarray(kw["base_rows"])
            kw["base_rows"], shape = rows[kept[0]], (len(kept[0]), shape[1])
        elif not writer and shape[1] == kept[2]:
            kw["base_cols"], shape = kept[0], (shape[0], len(kept[0]))
    elif kept is not None and kept[1] is not None:  # the model's residual signs flipped by the same map
        if writer and shape[0] == len(kept[0]) and "row_sign" not in kw:
            kw["row_sign"] = kept[1]
        elif not writer and shape[1] == len(kept[0]) and "col_sign" not in kw:
            kw["col_sign"] = kept[1]
    return PairSpec(view.key, view.name, view.name, shape, ("arbitrary", "arbitrary"), "routed_experts", **kw)


def _router_pair(base, model, bkeys, bname, mname, template, rows: np.ndarray | None) -> PairSpec | None:
    ib, im = base.inventory[bname], model.inventory[mname]
    if len(ib.shape) != 2 or ib.shape[1] != im.shape[1]:
        return None
    key = bkeys[bname]
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    cols = template[1]
    kw = dict(cols) if cols and len(cols["col_map"]) == ib.shape[1] else {}
    if rows is not None:
        kw.update(base_rows=np.arange(len(rows)), cand_rows=np.asarray(rows))
    elif ib.shape != im.shape:
        return None
    return PairSpec(key, bname, mname, (ib.shape[0], ib.shape[1]), axes_for(key, 2, layout), K.component_of(key),
                    key.layer, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def expert_plan(base, model, plan: AlignmentPlan, *, seed: int = 0, sample: float | None = None,
                draws: int = N.NULL_DRAWS, sketch_k: int = EXPERT_SKETCH_K, apply_all: bool = False
                ) -> tuple[AlignmentPlan, dict, list[str]] | None:
    """Match routed experts per MoE layer (after the residual map), check the router, detect upcycling.

    Args:
        base, model: ModelSources; plan: the plan to refine. seed, sample, draws: as in ``unit_plan``.
        sketch_k: buckets of the expert Gram sketch (≤ 128 keeps E·k² small).
        apply_all: apply maps that did not beat the null too (diagnostics and tests only).

    Returns:
        None when the model has no routed experts (per-expert tensors, or stacked ones stored [E, out, in]) with a
        counterpart in the base, or every layer's map is the identity and both sides store experts alike.
        Otherwise ``(plan, summary, lines)``: expert pairs re-paired through the map (``ffn_down_exp``, fitted on,
        gets evidence=False; gate/up stay evidence), router rows and ``exp_probs_b`` mapped, upcycled dense MLPs
        paired with every copy (the best one as evidence, further copies evidence=False: one base tensor is counted
        once) or, for experts cut from unit slices, with the rows/columns each took (:mod:`.slices`); layers whose
        experts are stacked on one side only and whose map is the identity (or did not beat the null) paired by
        index (``repaired_layers``); ``summary = {"experts": ...}``; report lines.
    """
    kb, _, _ = keyed(base)
    km, _, _ = keyed(model)
    kept = kept_dimensions(plan)
    layers, stacked = _sides(kb, km, base, model, layer_map(plan), kept)
    if not layers:
        return None
    bkeys = {name: key for key, name in kb.items()}
    hidden = next(v.shape[0] for _, m in layers.values() for e in m.experts.values()
                  for r, v in e.items() if r == "ffn_down_exp")  # the model's residual width
    sketch = N.ResidualSketch.build(hidden, N.residual_dims(hidden, sample, seed), k=sketch_k, seed=seed)
    template = _residual_template(plan)
    from hf_provenance.alignment import slices as S   # slices builds on this module's helpers

    # unit slices of a dense MLP read through kept hidden dimensions: not searched (a narrower upcycling)
    sliced = {layer for layer, (b, m) in layers.items() if kept is None and S.is_sliced(b, m)}
    fits = [fit_layer(layer, b, m, base, model, bkeys, sketch, template, seed=seed, draws=draws, kept=kept)
            for layer, (b, m) in sorted(layers.items()) if layer not in sliced]
    unit_sketch = (N.ResidualSketch.build(hidden, N.residual_dims(hidden, sample, seed), k=N.SKETCH_K, seed=seed)
                   if sliced else None)
    slice_fits = [S.fit_slices(layer, *layers[layer], base, model, bkeys, unit_sketch, template, seed=seed,
                               draws=draws) for layer in sorted(sliced)]
    # one side stacked, the other per expert: the identity plan paired none of these experts
    relayout = {layer for layer, (b, m) in layers.items() if b.stacked != m.stacked and layer not in sliced}
    if all(f.is_identity for f in fits) and not slice_fits and not relayout:
        return None
    pairs = list(plan.pairs)
    paired_names: set[str] = set()
    params = [0, 0]                                   # searched, aligned (the base's expert and router tensors)
    repaired = 0
    for fit in fits:
        b, m = layers[fit.layer]
        n = sum(v.numel for e in b.experts.values() for v in e.values()) + (
            base.inventory[b.router].numel if b.router else 0)
        params[0] += n
        mapped = (fit.recovered or apply_all) and not fit.is_identity
        if mapped or fit.layer in relayout:
            pairs, done = _apply(pairs, fit, b, m, base, model, template, bkeys, by_index=not mapped, kept=kept)
            paired_names |= done
            params[1] += n if mapped else 0
            repaired += not mapped
    for fit in slice_fits:
        b, m = layers[fit.layer]
        n = sum(v.numel for v in b.experts[-1].values())
        params[0] += n
        if fit.recovered or apply_all:
            pairs, done = S.apply_slices(pairs, fit, b, m, base, template)
            paired_names |= done
            params[1] += n
    unmatched = tuple(u for u in plan.unmatched if u.name not in paired_names)
    summary = {"experts": _summary(fits, sketch, draws, sample, stacked, params, slice_fits, repaired)}
    lines = _lines(fits) + S.lines(slice_fits)
    if repaired:
        lines.append(f"stacked experts ({', '.join(stacked['searched'])}) against per-expert tensors: paired expert by "
                     f"expert by index in {repaired} layers (no expert map applied there)")
    if stacked["not_searched"]:
        lines.append(f"stacked expert tensors ({', '.join(stacked['not_searched'])}): experts not searched "
                     "(stored transposed or without a declared split)")
    new_summary = dict(plan.summary)
    new_summary.update(summary)
    return AlignmentPlan(tuple(pairs), unmatched, new_summary, plan.notes + tuple(lines)), summary, lines


def layer_map(plan: AlignmentPlan) -> dict[int, int | None] | None:
    """Model layer -> base layer from the plan's layer map (None: layers paired by number)."""
    found = (plan.summary.get("layers") or {}).get("map")
    return None if not found else {int(j): (None if i is None else int(i)) for j, i, _ in found}


def experts_relayout(base, model, plan: AlignmentPlan) -> bool:
    """Whether some MoE layer stores its routed experts stacked on one side and one tensor per expert on the other:
    ``plan`` (the identity plan) pairs none of them there, so the comparison runs the expert search to pair them."""
    if {u.side for u in plan.unmatched} != {"base", "model"}:
        return False
    kb, _, _ = keyed(base)
    km, _, _ = keyed(model)
    if not any(k.role in STACKED for k in list(kb) + list(km)):
        return False
    layers, _ = _sides(kb, km, base, model)
    return any(b.stacked != m.stacked and -1 not in b.experts for b, m in layers.values())


def _apply(pairs: list[PairSpec], fit: ExpertLayerFit, b: _Side, m: _Side, base, model, template, bkeys: dict,
           *, by_index: bool = False, kept=None):
    """Re-pair this layer's expert tensors and map its router; returns the new pair list and names now paired.

    by_index: pair base expert e with model expert e, no map (one side stacked, the other not: the identity plan
    could not pair them); the router and its vectors are left as the identity plan paired them.
    """
    mex = np.asarray(fit.model_experts)
    # a base tensor is paired once per model layer mapped to its layer (up-scaling repeats base layers)
    by_base = {(p.base_name, p.layer): i for i, p in enumerate(pairs)}
    out = list(pairs)
    added: list[PairSpec] = []
    names: set[str] = set()
    stacked_base: set[str] = set()
    fitted = "expert map fitted on ffn_down_exp Gram sketches"
    for role in EXPERT_ROLES:
        writer = role == "ffn_down_exp"
        for bi, be in enumerate(fit.base_experts):
            bview = b.experts[be].get(role)
            if bview is None:
                continue
            targets = ([be] if by_index else [int(mex[fit.mapping[bi]])] if not fit.upcycled else
                       [int(mex[j]) for j in np.argsort(-fit.model_similarity)])
            for rank, me in enumerate(targets):
                mview = m.experts.get(me, {}).get(role)
                if mview is None:
                    continue
                copy = rank > 0
                note = (f"{fitted}: reported, not evidence" if writer else f"{fitted}: held out here")
                if copy:
                    note = "further upcycled copy of the same base tensor: counted once, reported, not evidence"
                evidence = not (writer or copy)
                if by_index:
                    note, evidence = "stacked and per-expert storage paired expert by expert (same index)", True
                if (bview.name, fit.layer) in by_base and not fit.upcycled and not bview.stacked and \
                        not mview.stacked:
                    i = by_base[bview.name, fit.layer]
                    new = replace(out[i], cand_name=mview.name, evidence=out[i].evidence and evidence,
                                  note=note if not out[i].note else f"{out[i].note}; {note}")
                    out[i] = new
                else:
                    new = _pair(base, model, bview, mview, template, writer=writer, note=note, evidence=evidence,
                                kept=kept)
                    if new is None:
                        continue
                    added.append(new)
                    if bview.stacked:
                        stacked_base.add(bview.name)
                names |= {bview.name, mview.name}
    perm = np.asarray(fit.mapping, dtype=np.int64)
    if b.router and m.router and not fit.upcycled and not by_index:
        note = "router rows mapped by the expert map (fitted on ffn_down_exp): held out here"
        if (b.router, fit.layer) in by_base:
            i = by_base[b.router, fit.layer]
            out[i] = map_rows(out[i], mex[perm], note=note)
        else:
            rp = _router_pair(base, model, bkeys, b.router, m.router, template, mex[perm])
            if rp is not None:
                added.append(replace(rp, note=note))
        names |= {b.router, m.router}
        for i, p in enumerate(out):
            if p.is_vector and p.layer == fit.layer and p.key.role in ROUTER_VECTORS and p.n_cols == len(perm):
                out[i] = map_cols(p, mex[perm], note="mapped by the expert map")
    # a stacked base tensor now paired expert by expert: its whole-tensor identity pair goes
    out = [p for p in out if not (p.base_name in stacked_base and p.key.role in STACKED)]
    return out + added, names


def _summary(fits: list[ExpertLayerFit], sketch, draws, sample, stacked: dict, params: list[int],
             slice_fits=(), repaired: int = 0) -> dict:
    matched = sum(int((f.mapping >= 0).sum()) for f in fits if f.recovered)    # in layers whose map beat the null
    total = sum(len(f.base_experts) for f in fits)
    out = {
        "method": "experts matched by linear assignment on the Pearson of off-diagonal Gram entries of their "
                  "unit-normalised ffn_down columns (order- and scale-invariant expert sketch); router held out; "
                  "tested split-half against a coupling-matched simulated null",
        "layers_searched": len(fits), "recovered": sum(f.recovered for f in fits),
        "applied": bool(params[1]), "searched_params": params[0], "aligned_params": params[1],
        "matched": matched, "base_experts": total,
        "permuted_layers": sum(f.recovered and not f.is_identity for f in fits),
        "upcycled_layers": sum(f.upcycled and f.recovered for f in fits),
        "router_consistent": sum(bool(f.router_consistent) for f in fits),
        "router_checked": sum(f.router_consistent is not None for f in fits),
        "stacked_searched": stacked["searched"], "stacked_not_searched": stacked["not_searched"],
        "repaired_layers": repaired,
        "sketch": sketch.to_dict(), "null_draws": draws, "sample": sample,
        "layers": [f.to_dict() for f in fits],
    }
    if slice_fits:      # experts cut from the dense MLP's units (alignment.slices): matched unit by unit
        from hf_provenance.alignment import slices as S

        out["layers_searched"] += len(slice_fits)
        out["recovered"] += sum(f.recovered for f in slice_fits)
        out["upcycled_layers"] += sum(f.recovered for f in slice_fits)
        out["slices"] = S.summary(slice_fits)
    return out


def _lines(fits: list[ExpertLayerFit]) -> list[str]:
    lines = []
    moe = [f for f in fits if not f.upcycled]
    up = [f for f in fits if f.upcycled]
    if moe:
        rec = [f for f in moe if f.recovered]
        matched = sum(len(f.base_experts) for f in rec)
        total = sum(len(f.base_experts) for f in moe)
        perm = sum(not f.is_identity for f in rec)
        held = [f.heldout for f in moe]
        s = (f"routed experts: matched {matched}/{total} in {len(rec)}/{len(moe)} MoE layers "
             f"({perm} permuted), held-out split-half Gram r = {np.mean([h.observed for h in held]):.2f} "
             f"(null {np.mean([h.mean for h in held]):.2f} ± {np.mean([h.sd for h in held]):.2f})")
        checked = [f for f in moe if f.router_r is not None]
        if checked:
            ok = sum(bool(f.router_consistent) for f in checked)
            rr = np.mean([f.router_r.observed for f in checked])
            word = "router consistent" if ok == len(checked) else f"router consistent in {ok}/{len(checked)} layers"
            s += (f"; {word} (router r = {rr:.2f}, null {np.mean([f.router_r.mean for f in checked]):.2f} ± "
                  f"{np.mean([f.router_r.sd for f in checked]):.2f})")
        extra = sum(len(f.unmatched_model) for f in moe)
        if extra:
            s += f"; {extra} model experts without a one-to-one counterpart (many-to-one map reported)"
        lines.append(s)
    if up:
        rec = [f for f in up if f.recovered]
        sims = np.concatenate([f.model_similarity for f in up])
        lines.append(f"upcycling: the base's dense MLP matches every expert in {len(rec)}/{len(up)} layers "
                     f"({sum(len(f.model_experts) for f in up)} experts, Gram r with the dense MLP "
                     f"{sims.min():.2f}-{sims.max():.2f}; held-out r = "
                     f"{np.mean([f.heldout.observed for f in up]):.2f}, null "
                     f"{np.mean([f.heldout.mean for f in up]):.2f} ± {np.mean([f.heldout.sd for f in up]):.2f})")
    shared = [f for f in fits if f.shared_r is not None]
    if shared:
        lines.append(f"shared experts: Gram r = {np.mean([f.shared_r.observed for f in shared]):.2f} "
                     f"(null {np.mean([f.shared_r.mean for f in shared]):.2f} ± "
                     f"{np.mean([f.shared_r.sd for f in shared]):.2f}) over {len(shared)} layers")
    return lines
