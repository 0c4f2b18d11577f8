"""Layout alignment: split fused tensors and undo transposed storage, as each family's declared layout says.

The identity plan pairs tensors with the same canonical key and the same shape. Two families that store the same
weights differently defeat it:

* **Fused tensors.** Phi-3 stores ``qkv_proj = [q; k; v]`` and ``gate_up_proj = [gate; up]`` where Llama stores
  four tensors; GPT-2's ``c_attn`` is ``[q; k; v]`` while GPT-BigCode's is ``[q_h; k_h; v_h]`` per head; transformers
  v5 stacks experts as ``gate_up_proj [E, 2I, H]``. Each piece of a fused tensor is a set of its *output rows*
  (``FusedSplit.indices``, sizes from the config's heads, KV heads and head_dim), so a piece is an ordinary pair
  whose ``base_rows`` / ``cand_rows`` select those rows (element indices for a fused bias). A fused tensor on one
  side is split against the other side's separate tensors; fused on both sides with different splits (modes,
  sizes or orientation), both are split and paired piece by piece; fused on both sides the same way, the identity
  pair stands.
* **Transposed storage.** GPT-2's ``Conv1D`` stores ``[in, out]`` where ``nn.Linear`` stores ``[out, in]``. The pair
  is compared in ``[out, in]`` orientation; the transposed side is marked ``transpose:base`` / ``transpose:cand`` in
  ``PairSpec.layout`` and measurement reads it through a bounded column window
  (``measurement/transposed.py``, which says why: every GPT-2 matrix is read once, larger ones in passes). A square
  transposed tensor (``c_proj [H, H]``) has the same shape on both sides, so the identity plan paired it element
  by element against the wrong orientation: that pair is replaced too.

Pieces take the piece's canonical key (``attn_q``, ``ffn_up``...), so their null axes are the piece's own: q/k rows
are rotary where the base's layout has rotary (``identity.axes_for``), the rest arbitrary. A fused tensor whose
split does not add up (config heads x head_dim against the stored rows) is refused with the reason as an
``Unmatched`` entry, never split by guess. Piece pairs carry ``layout`` ("split:attn_qkv:concat>per_head"), which
keeps them out of the unit and head searches (their rows are not a layer's units in file order).

Not handled (listed, never guessed): fused biases stored 2-D per expert (gpt-oss ``gate_up_proj_bias [E, 2I]``:
pieces would be columns), and stacked fused experts against per-expert tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from hf_provenance.alignment import keys as K
from hf_provenance.alignment.identity import axes_for, keyed
from hf_provenance.alignment.layouts import FusedSplit, Layout, layout_for_config
from hf_provenance.alignment.plan import (
    TRANSPOSE_BASE,
    TRANSPOSE_CAND,
    AlignmentPlan,
    PairSpec,
    Unmatched,
)

METHOD = "declared family layouts (alignment/layouts.py): fused tensors split by output rows, Conv1D read transposed"


@dataclass(frozen=True)
class _Side:
    label: str            # "base" | "model"
    src: Any
    keyed: dict           # CanonicalKey -> tensor name
    layout: Layout
    heads: dict           # n_heads, n_kv_heads, head_dim (None when the config does not say)


def heads_of(config: dict | None) -> dict:
    """Query heads, KV heads and head_dim of a config.json dict (the normalised spec, else its raw fields)."""
    cfg = dict(config or {})
    try:
        from hf_provenance.architecture import normalise

        spec = normalise(cfg)
        return {"n_heads": spec.num_heads, "n_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    except Exception:  # noqa: BLE001 - e.g. GPT-BigCode leaves n_inner null: read the few fields we need
        from hf_provenance.architecture.fields import ALIASES, MQA_FLAGS

        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        merged = {**text, **cfg}

        def field(name):
            for alias in ALIASES[name]:
                v = merged.get(alias)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
            return None

        heads, hidden = field("num_heads"), field("hidden_size")
        kv = field("num_kv_heads") or (1 if any(merged.get(f) is True for f in MQA_FLAGS) else heads)
        hd = field("head_dim") or (hidden // heads if heads and hidden and hidden % heads == 0 else None)
        return {"n_heads": heads, "n_kv_heads": kv, "head_dim": hd}


def _side(label: str, src) -> _Side:
    return _Side(label, src, keyed(src)[0], layout_for_config(src.config), heads_of(src.config))


def _transposed(side: _Side, key, name: str) -> bool:
    return (key.part != "bias" and len(side.src.inventory[name].shape) >= 2
            and side.layout.is_transposed(key.role))


def _view(side: _Side, name: str, transposed: bool) -> tuple[int, ...]:
    """The tensor's compared 2-D view: rows = output features (stacked over experts), columns = inputs."""
    shape = tuple(side.src.inventory[name].shape)
    if len(shape) <= 1:
        return (shape[0] if shape else 1,)
    if transposed:
        return (math.prod(shape[:-2]) * shape[-1], shape[-2])
    return (math.prod(shape[:-1]), shape[-1])


def _pieces(side: _Side, split: FusedSplit, key, name: str) -> list[np.ndarray] | str:
    """Rows (elements for a vector) of each piece in the fused tensor's compared view, or why it cannot split."""
    shape = tuple(side.src.inventory[name].shape)
    if len(shape) >= 2 and key.part == "bias":
        return f"a fused bias stored {list(shape)} would split along columns, which pairs do not select"
    if len(shape) <= 1:
        total, stack = (shape[0] if shape else 1), 1
    else:
        total = shape[-1] if _transposed(side, key, name) else shape[-2]
        stack = math.prod(shape[:-2])
    try:
        idx = split.indices(total, **side.heads)
    except ValueError as exc:
        h = side.heads
        return f"{exc} (config: {h['n_heads']} heads, {h['n_kv_heads']} KV heads, head_dim {h['head_dim']})"
    return [np.concatenate([e * total + np.asarray(ix, dtype=np.int64) for e in range(stack)]) for ix in idx]


def _layer_links(plan: AlignmentPlan) -> list[tuple[int | None, int | None]]:
    """(base layer, model layer) pairs: the layer map when one was applied, else the same numbers."""
    layers = (plan.summary or {}).get("layers")
    if isinstance(layers, dict) and layers.get("map"):
        return [(None, None)] + [(i, j) for j, i, *_ in layers["map"] if i is not None]
    return []


class _Builder:
    def __init__(self, base: _Side, model: _Side, plan: AlignmentPlan):
        self.b, self.m, self.plan = base, model, plan
        self.new: list[PairSpec] = []
        self.drop: set[tuple[str, str]] = set()       # (base name, model name) identity pairs replaced
        self.consumed: set[tuple[str, str]] = set()   # (side, name) unmatched entries resolved
        self.refused: list[Unmatched] = []
        self.fused: dict[tuple, set] = {}             # (role, base mode, model mode, sizes) -> layers
        self.transposed: dict[tuple, set] = {}        # (side, role) -> layers

    def pair(self, key, bname, mname, brows, mrows, tb, tm, token: str | None, note: str,
             stored: tuple[str, str] | None = None) -> str | None:
        """Add one pair in [out, in] orientation; returns why not when the two views do not match.

        ``stored``: the (base, model) roles of the stored tensors (the fused role for a piece), for the summary."""
        vb, vm = _view(self.b, bname, tb), _view(self.m, mname, tm)
        nb = len(brows) if brows is not None else vb[0]
        nm = len(mrows) if mrows is not None else vm[0]
        if nb != nm or vb[1:] != vm[1:]:
            what = "elements" if len(vb) == 1 else "rows x columns"
            return (f"{key.role}: {nb}{'' if len(vb) == 1 else f' x {vb[1]}'} vs "
                    f"{nm}{'' if len(vm) == 1 else f' x {vm[1]}'} {what} after the declared layouts")
        shape = (nb,) if len(vb) == 1 else (nb, vb[1])
        tokens = [t for t, on in ((TRANSPOSE_BASE, tb), (TRANSPOSE_CAND, tm)) if on] + ([token] if token else [])
        self.new.append(PairSpec(key, bname, mname, shape, axes_for(key, len(shape), self.b.layout),
                                 K.component_of(key), key.layer, base_rows=brows, cand_rows=mrows,
                                 layout=";".join(tokens) or None, note=note))
        for side, role, t in zip(("base", "model"), stored or (key.role, key.role), (tb, tm)):
            if t:
                self.transposed.setdefault((side, role), set()).add(key.layer)
        return None

    def refuse(self, side: str, name: str, reason: str) -> None:
        self.consumed.add((side, name))
        self.refused.append(Unmatched(side, name, reason))


def layout_plan(base, model, plan: AlignmentPlan) -> tuple[AlignmentPlan, dict | None, list[str]]:
    """The plan with fused tensors split and transposed ones marked, per each side's declared layout.

    Returns ``(plan, summary, lines)``; the plan is ``plan`` itself, summary None and lines empty when the two
    families store every paired tensor the same way (the identity plan stands).
    """
    sb, sm = _side("base", base), _side("model", model)
    links = _layer_links(plan)
    to_model: dict = {}
    to_base: dict = {}
    for i, j in links:
        to_model.setdefault(i, []).append(j)
        to_base.setdefault(j, []).append(i)
    bld = _Builder(sb, sm, plan)
    split_roles = {s.role for s in sb.layout.fused} | {s.role for s in sm.layout.fused}

    def counterparts(key, mapping):
        layers = mapping.get(key.layer, []) if links else [key.layer]
        return [replace(key, layer=layer) for layer in layers]

    for kb_, bname in sb.keyed.items():
        for km_ in counterparts(kb_, to_model):
            mname = sm.keyed.get(km_)
            if mname is not None:
                if kb_.role in split_roles:
                    _both_fused(bld, kb_, km_, bname, mname)
                else:
                    _transposed_only(bld, kb_, km_, bname, mname)
            elif sb.layout.split_for(kb_.role) is not None:
                _one_fused(bld, fused_side=sb, other=sm, fkey=kb_, fname=bname, okey=km_)
    for km_, mname in sm.keyed.items():
        if sm.layout.split_for(km_.role) is None:
            continue
        for kb_ in counterparts(km_, to_base):
            if kb_ not in sb.keyed:
                _one_fused(bld, fused_side=sm, other=sb, fkey=km_, fname=mname, okey=kb_)

    if not bld.new and not bld.refused:
        return plan, None, []
    touched_b = {n for s, n in bld.consumed if s == "base"}
    touched_m = {n for s, n in bld.consumed if s == "model"}
    pairs = [p for p in plan.pairs
             if (p.base_name, p.cand_name) not in bld.drop and p.base_name not in touched_b
             and p.cand_name not in touched_m]
    pairs += bld.new
    unmatched = [u for u in plan.unmatched if (u.side, u.name) not in bld.consumed] + bld.refused
    summary = _summary(bld)
    full = dict(plan.summary)
    full["layout"] = summary
    return AlignmentPlan(tuple(pairs), tuple(unmatched), full, tuple(plan.notes)), summary, _lines(bld, summary)


def _same_split(bld: _Builder, sb_split, sm_split, kb_, km_, bname, mname) -> bool:
    tb, tm = _transposed(bld.b, kb_, bname), _transposed(bld.m, km_, mname)
    return sb_split == sm_split and tb == tm and _view(bld.b, bname, tb) == _view(bld.m, mname, tm)


def _both_fused(bld: _Builder, kb_, km_, bname: str, mname: str) -> None:
    """The fused role on both sides: keep the identity pair when stored alike, else pair piece by piece."""
    split_b = bld.b.layout.split_for(kb_.role) or bld.m.layout.split_for(kb_.role)
    split_m = bld.m.layout.split_for(kb_.role) or split_b
    if _same_split(bld, split_b, split_m, kb_, km_, bname, mname):
        return
    if split_b.pieces != split_m.pieces:
        bld.refuse("base", bname, f"fused {kb_.role}: pieces {split_b.pieces} in the base vs {split_m.pieces} "
                                  "in the model: not split")
        return
    rows_b, rows_m = _pieces(bld.b, split_b, kb_, bname), _pieces(bld.m, split_m, km_, mname)
    for side, name, rows in (("base", bname, rows_b), ("model", mname, rows_m)):
        if isinstance(rows, str):
            bld.refuse(side, name, f"fused {kb_.role} not split: {rows}")
            bld.drop.add((bname, mname))
            return
    tb, tm = _transposed(bld.b, kb_, bname), _transposed(bld.m, km_, mname)
    token = f"split:{kb_.role}:{split_b.mode}>{split_m.mode}"
    note = (f"piece of fused {kb_.role}: base {split_b.mode}, model {split_m.mode}"
            + (" (read transposed)" if tb or tm else ""))
    problems = []
    for piece, rb, rm in zip(split_b.pieces, rows_b, rows_m):
        why = bld.pair(replace(km_, role=piece), bname, mname, rb, rm, tb, tm, token, note, (kb_.role, km_.role))
        if why:
            problems.append(why)
    bld.drop.add((bname, mname))
    bld.consumed.update({("base", bname), ("model", mname)})
    if problems:
        bld.refused.append(Unmatched("base", bname, f"fused {kb_.role}: " + "; ".join(problems)))
    bld.fused.setdefault((kb_.role, split_b.mode, split_m.mode, split_b.pieces), set()).add(km_.layer)


def _transposed_only(bld: _Builder, kb_, km_, bname: str, mname: str) -> None:
    """The same unfused role stored [in, out] on one side and [out, in] on the other: compare it transposed."""
    tb, tm = _transposed(bld.b, kb_, bname), _transposed(bld.m, km_, mname)
    if tb == tm:
        return
    why = bld.pair(km_, bname, mname, None, None, tb, tm, None,
                   f"{'base' if tb else 'model'} stored [in, out] (Conv1D): compared as [out, in]")
    bld.drop.add((bname, mname))
    bld.consumed.update({("base", bname), ("model", mname)})
    if why:
        bld.refused.append(Unmatched("base", bname, f"transposed layout: {why}"))


def _one_fused(bld: _Builder, *, fused_side: _Side, other: _Side, fkey, fname: str, okey) -> None:
    """A fused tensor on one side, its pieces as separate tensors on the other."""
    split = fused_side.layout.split_for(fkey.role)
    present = [(p, other.keyed.get(replace(okey, role=p))) for p in split.pieces]
    present = [(p, n) for p, n in present if n is not None]
    if not present:
        return
    rows = _pieces(fused_side, split, fkey, fname)
    if isinstance(rows, str):
        bld.refuse(fused_side.label, fname, f"fused {fkey.role} not split: {rows}")
        return
    fused_is_base = fused_side.label == "base"
    tf = _transposed(fused_side, fkey, fname)
    token = f"split:{fkey.role}:" + (f"{split.mode}>none" if fused_is_base else f"none>{split.mode}")
    problems = []
    by_piece = dict(zip(split.pieces, rows))
    out_key = fkey if not fused_is_base else okey  # pairs are keyed by the model's layer
    for piece, oname in present:
        pkey = replace(out_key, role=piece)
        to = _transposed(other, pkey, oname)
        note = f"piece {piece} of the {fused_side.label}'s fused {fkey.role} ({split.mode})"
        if fused_is_base:
            why = bld.pair(pkey, fname, oname, by_piece[piece], None, tf, to, token, note, (fkey.role, piece))
        else:
            why = bld.pair(pkey, oname, fname, None, by_piece[piece], to, tf, token, note, (piece, fkey.role))
        if why:
            problems.append(why)
        bld.consumed.add((other.label, oname))
    bld.consumed.add((fused_side.label, fname))
    missing = [p for p in split.pieces if p not in dict(present)]
    if missing or problems:
        reasons = problems + ([f"pieces {', '.join(missing)} have no counterpart in the {other.label}"]
                              if missing else [])
        bld.refused.append(Unmatched(fused_side.label, fname, f"fused {fkey.role}: " + "; ".join(reasons)))
    modes = (split.mode, None) if fused_is_base else (None, split.mode)
    bld.fused.setdefault((fkey.role, *modes, split.pieces), set()).add(out_key.layer)


def _short(pieces: tuple[str, ...]) -> str:
    """attn_q, attn_k, attn_v -> q/k/v; ffn_gate, ffn_up -> gate/up."""
    parts = [p.split("_") for p in pieces]
    k = 0
    while all(len(x) > k + 1 for x in parts) and len({x[k] for x in parts}) == 1:
        k += 1
    return "/".join("_".join(x[k:]) for x in parts)


def _count(layers: set) -> str:
    n = len([x for x in layers if x is not None])
    if n:
        return f"{n} layer{'s' if n != 1 else ''}"
    return "the model"


def _summary(bld: _Builder) -> dict:
    fused = [{"role": role, "base_mode": mb, "model_mode": mm, "pieces": list(pieces),
              "layers": sorted(x for x in layers if x is not None)}
             for (role, mb, mm, pieces), layers in sorted(bld.fused.items(), key=lambda kv: str(kv[0]))]
    transposed = [{"side": side, "role": role, "layers": sorted(x for x in layers if x is not None)}
                  for (side, role), layers in sorted(bld.transposed.items(), key=lambda kv: str(kv[0]))]
    return {"method": METHOD,
            "base": {"model_type": bld.b.layout.model_type, "declared": bld.b.layout.declared, **bld.b.heads},
            "model": {"model_type": bld.m.layout.model_type, "declared": bld.m.layout.declared, **bld.m.heads},
            "fused": fused, "transposed": transposed, "pairs": len(bld.new),
            "refused": [u.to_dict() for u in bld.refused]}


def _lines(bld: _Builder, summary: dict) -> list[str]:
    lines = []
    for (role, mb, mm, pieces), layers in sorted(bld.fused.items(), key=lambda kv: str(kv[0])):
        where = (f"on both sides (base {mb}, model {mm})" if mb and mm else
                 f"in the base ({mb})" if mb else f"in the model ({mm})")
        lines.append(f"fused layout: {role} split into {_short(pieces)} {where} for {_count(layers)}")
    for side in ("base", "model"):
        roles = {r: ls for (s, r), ls in bld.transposed.items() if s == side}
        if roles:
            layers = set().union(*roles.values())
            lines.append(f"transposed layout: {', '.join(sorted(roles))} stored [in, out] (Conv1D) in the {side}, "
                         f"compared as [out, in] for {_count(layers)}")
    for u in bld.refused:
        lines.append(f"layout not applied to {u.side} tensor {u.name}: {u.reason}")
    return lines


__all__ = ["METHOD", "heads_of", "layout_plan"]
