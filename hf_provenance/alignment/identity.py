"""The identity plan: pair tensors with the same canonical key and compatible shapes.

Vocabulary-indexed tensors are paired row by row through token strings; everything else needs equal shapes.
Tensors without a counterpart are listed with the reason, never dropped silently.
"""

from __future__ import annotations

import re

from hf_provenance.alignment import keys as K
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.plan import ARBITRARY, ROTARY, AlignmentPlan, PairSpec, Unmatched
from hf_provenance.alignment.vocab import VocabMap, vocab_map

ROTARY_VECTOR_ROLES = frozenset({"attn_q_norm", "attn_k_norm"})
SCALE_PARTS = ("weight_scale_inv", "weight_scale", "input_scale")
_LAYER_NUM = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def mapper_for(source) -> K.KeyMapper:
    cfg = source.config or {}
    try:
        return K.KeyMapper.from_config(cfg)
    except Exception:  # no layer count in the config: infer it from the names
        layers = [int(m.group(1)) for n in source.inventory for m in [_LAYER_NUM.search(n)] if m]
        return K.KeyMapper(str(cfg.get("model_type", "")), (max(layers) + 1) if layers else 0)


def keyed(source) -> tuple[dict, list[str], list[str]]:
    """canonical key -> tensor name for the comparable tensors; plus unknown names and skipped names.

    Every alignment stage asks for this of both sides; it is worked out once per source (and again only if its
    inventory or config object is replaced), and each caller gets its own copies. A 36k-tensor MoE checkpoint had
    paid for its names' gguf lookups six times over."""
    memo = getattr(source, "_keyed_memo", None)
    if memo is None or memo[0] is not source.inventory or memo[1] is not source.config:
        memo = (source.inventory, source.config, _keyed(source))
        try:
            source._keyed_memo = memo
        except AttributeError:  # a source that takes no attributes is simply worked out each time
            pass
    out, unknown, skipped = memo[2]
    return dict(out), list(unknown), list(skipped)


def _keyed(source) -> tuple[dict, list[str], list[str]]:
    mapper = mapper_for(source)
    mapping, unknown = mapper.map_inventory(list(source.inventory))
    out, skipped = {}, []
    for name, key in mapping.items():
        info = source.inventory[name]
        if key.part in SCALE_PARTS or not info.is_float:
            skipped.append(name)
            continue
        out[key] = name
    return out, unknown, skipped


def axes_for(key, ndim: int, layout) -> tuple[str, ...]:
    fixed = K.fixed_axis(key)
    if ndim <= 1:
        if fixed is not None:
            return (fixed[1],)
        if key.role in ROTARY_VECTOR_ROLES or (key.part == "bias" and key.role in layout.rotary_roles):
            return (ROTARY,)
        return (ARBITRARY,)
    if fixed is not None:
        return (fixed[1], ARBITRARY)
    if key.role in layout.rotary_roles and layout.rotary:
        return (ROTARY, ARBITRARY)
    return (ARBITRARY, ARBITRARY)


def _view(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) <= 1:
        return (shape[0] if shape else 1,)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return (rows, shape[-1])


def identity_plan(base, model) -> tuple[AlignmentPlan, dict]:
    """Pairs by canonical key; returns the plan and facts the verdict needs (vocab map, layer counts)."""
    kb, unknown_b, _ = keyed(base)
    km, unknown_m, _ = keyed(model)
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    tied = bool((model.config or {}).get("tie_word_embeddings")) and bool((base.config or {}).get("tie_word_embeddings"))
    pairs, unmatched = [], []
    vmap: VocabMap | None = None
    for key, bname in kb.items():
        mname = km.get(key)
        if mname is None:
            unmatched.append(Unmatched("base", bname, "no tensor with this role in the model"))
            continue
        ib, im = base.inventory[bname], model.inventory[mname]
        comp = K.component_of(key)
        axes = axes_for(key, len(ib.shape), layout)
        vb, vm = _view(ib.shape), _view(im.shape)
        if axes[0] == "vocab" and vb[1:] == vm[1:] and len(vb) == 2:
            vmap = vmap or vocab_map(base.vocab, model.vocab, vb[0], vm[0])
            if vmap.shared == 0:
                unmatched.append(Unmatched("base", bname, "no shared tokens"))
                continue
            rows_b = None if vmap.is_identity else vmap.base_rows
            rows_m = None if vmap.is_identity else vmap.model_rows
            note = None if vmap.is_identity else f"rows paired by {vmap.method}: {vmap.shared} shared"
            pairs.append(PairSpec(key, bname, mname, (vmap.shared, vb[1]), axes, comp, key.layer,
                                  base_rows=rows_b, cand_rows=rows_m, note=note))
            continue
        if vb != vm:
            unmatched.append(Unmatched("base", bname, f"shape differs ({list(ib.shape)} vs {list(im.shape)}): "
                                                      "needs alignment, not evidence of independence"))
            continue
        if tied and key.role == "output":
            unmatched.append(Unmatched("base", bname, "tied to the token embedding: counted once"))
            continue
        pairs.append(PairSpec(key, bname, mname, vb, axes, comp, key.layer))
    for key, mname in km.items():
        if key not in kb:
            unmatched.append(Unmatched("model", mname, "no tensor with this role in the base"))
    for side, names in (("base", unknown_b), ("model", unknown_m)):
        for n in names:
            unmatched.append(Unmatched(side, n, "unknown tensor name (no canonical key)"))
    facts = {"vocab": vmap, "layers": (_layers(kb), _layers(km))}
    summary = {"vocab": vmap.to_dict() if vmap else None, "method": "identity (same canonical key, same shape)"}
    return AlignmentPlan(tuple(pairs), tuple(unmatched), summary), facts


def _layers(keyed_map: dict) -> int:
    layers = {k.layer for k in keyed_map if k.layer is not None and k.role != "mtp"}
    return len(layers)
