"""MoE upcycled from unit slices: which units of the dense MLP each expert took.

LLaMA-MoE and fine-grained upcycling (Qwen1.5-MoE) cut a dense MLP's I intermediate units into slices (contiguous,
or after a random permutation of the units) and make each expert one slice: its gate and up rows and its down
columns, often with several experts per slice when there are more experts than slices, plus noise or training.
An expert is then only part of the MLP, so the whole-MLP expert sketch of :mod:`hf_provenance.alignment.experts`
(the Gram matrix of all of an expert's down columns) cannot say which part; the units themselves must be matched.

**The map.** Per MoE layer the units of every routed expert are concatenated (expert order, then unit order) and
each is matched to the dense MLP unit with the most similar down column, with the scale-invariant unit signatures
of :mod:`hf_provenance.alignment.units` (``sketch_writer`` over the residual sketch, ``N.unit_rows``,
``best_match``): many-to-one, because a dense unit feeds one expert unit per copy of its slice. The map is read
back per expert as the base units it took: a contiguous range (in order or reordered) or "scattered".

**Fit on down, test on gate/up** (why: :mod:`hf_provenance.alignment.units`). Only ffn_down is read to fit. The
fitted map is tested split-half (fit on one half of the residual buckets, held-out r on the other) against the
coupling-matched simulated null of :mod:`hf_provenance.alignment.nulls`; a layer's map is applied only when its
held-out r clears the effect threshold and z ≥ z_derived. Applied, each expert's gate and up are measured against
the base rows it took (``base_rows``) and stay evidence; its down against the base columns it took
(``base_cols``), reported and not evidence (fitted on). A base unit is counted once: an expert whose base units
were mostly counted already (a further copy of its slice) is reported, not evidence.

Cost per layer with I dense units, U expert units, sketch width k: reading O(h·(I + U)) (ffn_down only), the map
O(U·I·k) in float32 blocks, the null O(K·u·I·k) for u ≤ 512 test units (fewer for wide layers, as in units.py).
Memory O((I + U)·k + 1024·I).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hf_provenance.alignment import keys as K
from hf_provenance.alignment import nulls as N
from hf_provenance.alignment.experts import _reading_pair, _Side, _View
from hf_provenance.alignment.identity import axes_for
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.plan import PairSpec
from hf_provenance.alignment.units import _decide, _test_units, best_match, sketch_writer
from hf_provenance.statistics.effects import _clean

COUNTED_SHARE = 0.5      # an expert is evidence when more than this share of its base units is not yet counted
ROLES = {"ffn_gate_exp": "gate", "ffn_up_exp": "up", "ffn_down_exp": "down"}   # expert role -> MLP part

__all__ = ["SliceLayerFit", "is_sliced", "fit_slices", "apply_slices", "summary", "lines"]


def is_sliced(bside: _Side, mside: _Side) -> bool:
    """A dense base layer whose model experts hold another number of units than the dense MLP: unit slices."""
    if sorted(bside.experts) != [-1]:
        return False
    dense = bside.experts[-1]["ffn_down_exp"].shape
    return any(e["ffn_down_exp"].shape != dense for e in mside.experts.values())


def describe(units: np.ndarray) -> dict:
    """An expert's base units as a slice: a contiguous range (in order or reordered) or 'scattered'."""
    units = np.asarray(units)
    uniq = np.unique(units)
    contiguous = len(uniq) == len(units) and int(uniq[-1] - uniq[0]) + 1 == len(uniq)
    return {"slice": [int(uniq[0]), int(uniq[-1]) + 1] if contiguous else "scattered",
            "in_order": bool(contiguous and np.all(np.diff(units) == 1)), "distinct": int(len(uniq)),
            "units": int(len(units))}


@dataclass(frozen=True)
class SliceLayerFit:
    layer: int
    experts: tuple[int, ...]           # model expert ids, in the order their units are concatenated
    sizes: tuple[int, ...]             # units per expert
    base_units: int                    # units of the dense MLP
    unit_map: np.ndarray               # per concatenated model unit: the dense unit it matches
    score: np.ndarray                  # per concatenated model unit: signature similarity with that unit
    heldout: N.NullTest
    agreement: N.NullTest
    recovered: bool

    def units_of(self, i: int) -> np.ndarray:
        """The dense units taken by the i-th expert (position in ``experts``), one per expert unit."""
        start = int(sum(self.sizes[:i]))
        return self.unit_map[start:start + self.sizes[i]]

    @property
    def coverage(self) -> float:
        return len(np.unique(self.unit_map)) / max(1, self.base_units)

    def to_dict(self) -> dict:
        per = {}
        start = 0
        for e, n in zip(self.experts, self.sizes):
            per[str(e)] = {**describe(self.unit_map[start:start + n]),
                           "similarity": _clean(float(np.mean(self.score[start:start + n])))}
            start += n
        sets = {tuple(np.unique(self.units_of(i)).tolist()) for i in range(len(self.experts))}
        return {"layer": self.layer, "upcycled": True, "mode": "unit slices", "recovered": self.recovered,
                "base_units": self.base_units, "model_units": int(len(self.unit_map)),
                "experts": per, "distinct_slices": len(sets), "coverage": _clean(self.coverage),
                "heldout_r": self.heldout.to_dict(), "agreement": self.agreement.to_dict()}


def fit_slices(layer: int, bside: _Side, mside: _Side, base, model, bkeys: dict, sketch: N.ResidualSketch,
               template, *, seed: int, draws: int) -> SliceLayerFit:
    """Match every expert unit of one layer to a dense unit (down columns) and test the map against the null."""
    pa = _reading_pair(base, bside.experts[-1]["ffn_down_exp"], bkeys, template, writer=True, side="base")
    a = sketch_writer(base, pa, sketch, side="base")                                   # [I, k]
    experts = tuple(sorted(mside.experts))
    parts = [sketch_writer(model, _reading_pair(model, mside.experts[e]["ffn_down_exp"], bkeys, template,
                                                writer=True, side="model"), sketch, side="model")
             for e in experts]
    b = torch.cat(parts).T.contiguous()                                                # [k, U] bucket-major
    n_units = b.shape[1]
    halves = [torch.from_numpy(h) for h in sketch.halves]
    rng = np.random.default_rng([seed, 0x511CE, layer])
    u = torch.from_numpy(np.sort(rng.choice(n_units, size=min(n_units, _test_units([a.shape[0]], draws, sketch.k)),
                                            replace=False)))
    ah = [N.unit_rows(a[:, h]) for h in halves]                                        # [I, k/2] each
    # centring over all U units commutes with a null draw (a signed permutation of buckets): centre once, then
    # each draw only gathers the test units' buckets and rescales them
    bu = (b - b.mean(1, keepdim=True)).index_select(1, u)

    def statistics(t):
        bd = bu if t is None else t.rows(bu)
        bh = [bd.index_select(0, h) for h in halves]
        bh = [x / x.norm(dim=0, keepdim=True).clamp_min(N.EPS) for x in bh]             # [k/2, u], N.unit_cols
        m = [(ah[i] @ bh[i]).argmax(0) for i in range(2)]                              # test unit -> dense unit
        held = 0.5 * (float((ah[1][m[0]] * bh[1].T).sum(1).mean()) + float((ah[0][m[1]] * bh[0].T).sum(1).mean()))
        return {"heldout": held, "agreement": float((m[0] == m[1]).float().mean())}

    stats = N.simulate(statistics, sketch, draws=draws, seed=seed + 86028121 * (layer + 1))
    sa, sb = N.unit_rows(a), N.unit_cols(b).T.contiguous()
    unit_map = best_match(sb, sa)
    score = (sb * sa[unit_map]).sum(1).numpy()
    sizes = tuple(int(p.shape[0]) for p in parts)
    return SliceLayerFit(layer, experts, sizes, int(a.shape[0]), unit_map.numpy(), score, stats["heldout"],
                         stats["agreement"], _decide(stats["heldout"]))


def _pair(base, bview: _View, mview: _View, template, units: np.ndarray, *, part: str, note: str,
          evidence: bool) -> PairSpec | None:
    """Expert matrix (maybe rows of a stacked tensor) vs the dense matrix's selected rows (gate/up) or columns
    (down), in the base's index space."""
    (hb, wb), (hm, wm) = bview.shape, mview.shape
    rows, cols = template
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    kw: dict = {}
    if part == "down":
        if hm != hb or wm != len(units):
            return None
        shape = (hb, len(units))
        kw["base_cols"] = np.asarray(units, dtype=np.int64)
        local = None
        if rows and len(rows["cand_rows"]) == hb:
            local, kw["row_sign"] = rows["cand_rows"], rows["row_sign"]
        crows = mview.through(local)
        if crows is not None:
            kw.update(base_rows=np.arange(hb), cand_rows=crows)
    else:
        if wm != wb or hm != len(units):
            return None
        shape = (len(units), wb)
        crows = mview.through(None)
        kw.update(base_rows=np.asarray(units, dtype=np.int64),
                  cand_rows=np.arange(len(units)) if crows is None else crows)
        if cols and len(cols["col_map"]) == wb:
            kw.update(cols)
    key = bview.key
    return PairSpec(key, bview.name, mview.name, shape, axes_for(key, 2, layout), K.component_of(key), key.layer,
                    evidence=evidence, note=note, **kw)


def apply_slices(pairs: list[PairSpec], fit: SliceLayerFit, b: _Side, m: _Side, base,
                 template) -> tuple[list[PairSpec], set[str]]:
    """Pair each expert's gate/up/down with the dense rows/columns it took; returns the pairs and names paired."""
    fitted = "unit-slice map fitted on ffn_down columns"
    dense = b.experts[-1]
    counted: set[int] = set()
    added: list[PairSpec] = []
    names: set[str] = set()
    for i, e in enumerate(fit.experts):
        units = fit.units_of(i)
        uniq = set(np.unique(units).tolist())
        fresh = len(uniq - counted) > COUNTED_SHARE * len(uniq)
        if fresh:
            counted |= uniq
        for role, part in ROLES.items():
            bview, mview = dense.get(role), m.experts[e].get(role)
            if bview is None or mview is None:
                continue
            if part == "down":
                note, evidence = f"{fitted}: reported, not evidence", False
            elif fresh:
                note, evidence = f"{fitted}: held out here (rows of the dense MLP this expert took)", True
            else:
                note, evidence = ("further copy of dense units already counted (replicated slice): reported, "
                                  "not evidence"), False
            p = _pair(base, bview, mview, template, units, part=part, note=note, evidence=evidence)
            if p is not None:
                added.append(p)
                names |= {bview.name, mview.name}
    return pairs + added, names


def summary(fits: list[SliceLayerFit]) -> dict:
    return {"method": "each expert unit matched to the dense unit with the most similar down column (many-to-one; "
                      "scale-invariant unit signatures over the residual sketch); gate/up held out; tested "
                      "split-half against a coupling-matched simulated null",
            "layers": [f.to_dict() for f in fits]}


def lines(fits: list[SliceLayerFit]) -> list[str]:
    if not fits:
        return []
    rec = [f for f in fits if f.recovered]
    held = [f.heldout for f in fits]
    kinds = [describe(f.units_of(i))["slice"] == "scattered" for f in fits for i in range(len(f.experts))]
    n_exp = sum(len(f.experts) for f in fits)
    sets = [f.to_dict()["distinct_slices"] for f in fits]
    return [f"upcycling from unit slices: expert units matched to the dense MLP's units in {len(rec)}/{len(fits)} "
            f"layers ({n_exp} experts; {min(sets)}-{max(sets)} distinct slices per layer, "
            f"{n_exp - sum(kinds)} contiguous, {sum(kinds)} scattered; dense units covered "
            f"{min(f.coverage for f in fits):.0%}-{max(f.coverage for f in fits):.0%}); held-out split-half down r = "
            f"{np.mean([h.observed for h in held]):.2f} (null {np.mean([h.mean for h in held]):.2f} ± "
            f"{np.mean([h.sd for h in held]):.2f})"]
