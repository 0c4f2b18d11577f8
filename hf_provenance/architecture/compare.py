"""Two architectures side by side: field by field, component by component, layer kind by layer kind.

Each component gets the tensor shapes a checkpoint stores on each side (from ``params.components``) and a status:

* ``direct``: same shapes in the same number of layers; tensors pair up one to one.
* ``after alignment``: the shapes or counts differ in a way an alignment can bridge (layer map for another depth,
  token map for another vocabulary, unit/head/expert maps for pruned or widened layers, dense MLP vs experts for
  upcycling). ``shapes_match`` says whether the per-layer shapes already agree.
* ``no counterpart``: the component exists on one side only (vision tower, MTP block) or is built from different
  tensors (MLA's factorised projections vs a single q projection).

Nothing here is evidence about lineage: ``notes`` always says that differing shapes are not evidence of
independence (pruned, depth-upscaled, upcycled and vocabulary-changed models are derived and have other shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from hf_provenance.architecture.params import Component, components
from hf_provenance.architecture.spec import ArchSpec

DIRECT, AFTER_ALIGNMENT, NO_COUNTERPART = "direct", "after alignment", "no counterpart"

NOT_EVIDENCE_NOTE = (
    "Shapes that differ are not evidence of independence: pruned, depth-upscaled, upcycled (dense to MoE) and "
    "vocabulary-changed models are derived from their base and have other shapes. Only a comparison of the weights "
    "themselves can tell whether two models share lineage.")
SAME_SHAPES_NOTE = ("Shapes that match are not evidence of derivation either: models built from the same recipe "
                    "share shapes by design.")

# Fields compared side by side: (name in the report, getter on ArchSpec).
FIELDS: tuple[tuple[str, Callable[[ArchSpec], Any]], ...] = (
    ("model_type", lambda s: s.model_type),
    ("architectures", lambda s: list(s.architectures)),
    ("hidden_size", lambda s: s.hidden_size),
    ("num_layers", lambda s: s.num_layers),
    ("mtp_layers", lambda s: s.mtp_layers),
    ("num_dense_layers", lambda s: s.num_dense_layers),
    ("num_moe_layers", lambda s: s.num_moe_layers),
    ("attention", lambda s: s.attention),
    ("num_heads", lambda s: s.num_heads),
    ("num_kv_heads", lambda s: s.num_kv_heads),
    ("head_dim", lambda s: s.head_dim),
    ("q_lora_rank", lambda s: s.q_lora_rank),
    ("kv_lora_rank", lambda s: s.kv_lora_rank),
    ("qk_rope_head_dim", lambda s: s.qk_rope_head_dim),
    ("qk_nope_head_dim", lambda s: s.qk_nope_head_dim),
    ("v_head_dim", lambda s: s.v_head_dim),
    ("intermediate_size", lambda s: s.intermediate_size),
    ("vocab_size", lambda s: s.vocab_size),
    ("tie_word_embeddings", lambda s: s.tie_word_embeddings),
    ("norm", lambda s: s.norm),
    ("position_embedding", lambda s: s.position_embedding),
    ("rope.theta", lambda s: s.rope.theta if s.rope else None),
    ("rope.partial_rotary_factor", lambda s: s.rope.partial_rotary_factor if s.rope else None),
    ("rope.scaling", lambda s: s.rope.to_dict()["scaling"] if s.rope else None),
    ("qkv_bias", lambda s: s.qkv_bias),
    ("o_bias", lambda s: s.o_bias),
    ("qk_norm", lambda s: s.qk_norm),
    ("mlp_gated", lambda s: s.mlp_gated),
    ("hidden_act", lambda s: s.hidden_act),
    ("max_position_embeddings", lambda s: s.max_position_embeddings),
    ("moe.num_experts", lambda s: s.moe.num_experts if s.moe else None),
    ("moe.num_shared_experts", lambda s: s.moe.num_shared_experts if s.moe else None),
    ("moe.experts_per_token", lambda s: s.moe.experts_per_token if s.moe else None),
    ("moe.moe_intermediate_size", lambda s: s.moe.moe_intermediate_size if s.moe else None),
    ("moe.shared_expert_intermediate_size", lambda s: s.moe.shared_expert_intermediate_size if s.moe else None),
    ("moe.first_k_dense", lambda s: s.moe.first_k_dense if s.moe else None),
    ("moe.router_bias", lambda s: s.moe.router_bias if s.moe else None),
    ("moe.norm_topk_prob", lambda s: s.moe.norm_topk_prob if s.moe else None),
    ("moe.n_group", lambda s: s.moe.n_group if s.moe else None),
    ("moe.topk_group", lambda s: s.moe.topk_group if s.moe else None),
    ("moe.scoring_func", lambda s: s.moe.scoring_func if s.moe else None),
    ("encoder_only", lambda s: s.encoder_only),
    ("head", lambda s: s.head),
    ("vision", lambda s: None if s.vision is None else s.vision.get("model_type") or "present"),
)

# Report order of components (names not listed go last, in the order found).
ORDER: tuple[str, ...] = (
    "embed_tokens", "embed_positions", "embed_token_types", "embed_norm", "attn_q", "attn_k", "attn_v", "attn_kv",
    "attn_o", "attn_qk_norm", "norm_attn", "norm_mlp", "mlp_dense", "moe_router", "moe_experts",
    "moe_shared_experts", "moe_shared_gate", "final_norm", "lm_head", "pooler", "mlm_head", "nsp_head",
    "classifier", "mtp", "vision_embed", "vision_layers",
)

# Components that pair with each other when one side lacks the first: dense MLP <-> routed experts (upcycling).
UPCYCLING_PAIRS: dict[str, str] = {"mlp_dense": "moe_experts", "moe_experts": "mlp_dense"}


@dataclass(frozen=True)
class FieldComparison:
    name: str
    a: Any
    b: Any
    match: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "a": self.a, "b": self.b, "match": self.match}


@dataclass(frozen=True)
class ComponentComparison:
    """One component on both sides. ``a``/``b``: part -> shape of one instance (None when absent);
    ``*_layers``: layers carrying it; ``*_instances``: copies per layer (experts)."""

    name: str
    scope: str
    a: dict[str, tuple[int, ...]] | None
    b: dict[str, tuple[int, ...]] | None
    a_layers: int
    b_layers: int
    a_instances: int
    b_instances: int
    shapes_match: bool | None          # None when the component is on one side only
    status: str
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        def shapes(d):
            return None if d is None else {k: list(v) for k, v in d.items()}

        return {"name": self.name, "scope": self.scope, "a": shapes(self.a), "b": shapes(self.b),
                "a_layers": self.a_layers, "b_layers": self.b_layers, "a_instances": self.a_instances,
                "b_instances": self.b_instances, "shapes_match": self.shapes_match, "status": self.status,
                "reasons": list(self.reasons)}


@dataclass(frozen=True)
class ArchComparison:
    """Result of ``compare_specs``: what pairs up directly, after alignment, or not at all."""

    labels: tuple[str, str]
    fields: tuple[FieldComparison, ...]
    components: tuple[ComponentComparison, ...]
    layer_kinds: dict[str, tuple[int, int]]
    depth: str
    notes: tuple[str, ...]

    def component(self, name: str) -> ComponentComparison:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r}; have {', '.join(c.name for c in self.components)}")

    def field(self, name: str) -> FieldComparison:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r}")

    @property
    def by_status(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {DIRECT: [], AFTER_ALIGNMENT: [], NO_COUNTERPART: []}
        for c in self.components:
            out[c.status].append(c.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "fields": [f.to_dict() for f in self.fields],
                "components": [c.to_dict() for c in self.components],
                "layer_kinds": {k: list(v) for k, v in self.layer_kinds.items()}, "depth": self.depth,
                "by_status": self.by_status, "notes": list(self.notes)}


def _structural(parts: dict[str, tuple[int, ...]], comp: Component) -> set[str]:
    return {p for p in parts if not p.endswith("bias") and p not in comp.buffer_parts}


def _hints(name: str, a: ArchSpec, b: ArchSpec) -> list[str]:
    """What a shape difference in component ``name`` means, in the two configs' own numbers."""
    out: list[str] = []

    def differ(label: str, x: Any, y: Any, what: str) -> None:
        if x != y:
            out.append(f"{label} {x:,} vs {y:,} ({what})" if isinstance(x, int) and isinstance(y, int)
                       else f"{label} {x} vs {y} ({what})")

    if name in ("embed_tokens", "lm_head", "mlm_head"):
        differ("vocabulary", a.vocab_size, b.vocab_size, "rows pair up through a token map")
    if name == "embed_positions":
        differ("positions", a.max_position_embeddings, b.max_position_embeddings, "rows pair up by position")
    if name in ("attn_q", "attn_o") and a.attention != "MLA" and b.attention != "MLA":
        if (a.num_heads, a.head_dim) != (b.num_heads, b.head_dim):
            out.append(f"query heads {a.num_heads}x{a.head_dim} vs {b.num_heads}x{b.head_dim} "
                       "(a head map bridges pruned or added heads)")
    if name in ("attn_k", "attn_v") and (a.num_kv_heads, a.head_dim) != (b.num_kv_heads, b.head_dim):
        out.append(f"KV heads {a.num_kv_heads}x{a.head_dim} vs {b.num_kv_heads}x{b.head_dim} (a head map bridges "
                   "pruned or grouped heads)")
    if name == "mlp_dense":
        differ("MLP width", a.intermediate_size, b.intermediate_size, "a unit map bridges pruned or added units")
    if name in ("moe_experts", "moe_router") and a.moe and b.moe:
        differ("routed experts", a.moe.num_experts, b.moe.num_experts, "an expert map bridges dropped or added "
               "experts")
    if name == "moe_experts" and a.moe and b.moe:
        differ("expert width", a.moe.moe_intermediate_size, b.moe.moe_intermediate_size, "a unit map per expert")
    if name == "moe_shared_experts" and a.moe and b.moe:
        differ("shared-expert width", a.moe.shared_expert_intermediate_size, b.moe.shared_expert_intermediate_size,
               "a unit map")
    if a.hidden_size != b.hidden_size and name not in ("attn_qk_norm",):
        out.append(f"hidden size {a.hidden_size:,} vs {b.hidden_size:,} (a residual-dimension map bridges width "
                   "pruning)")
    return out


def _compare_component(name: str, ca: Component | None, cb: Component | None, a: ArchSpec, b: ArchSpec,
                       names_a: set[str], names_b: set[str], labels: tuple[str, str]) -> ComponentComparison:
    scope = (ca or cb).scope
    pa = ca.shapes if ca else None
    pb = cb.shapes if cb else None
    la, lb = (ca.layers if ca else 0), (cb.layers if cb else 0)
    ia, ib = (ca.instances if ca else 0), (cb.instances if cb else 0)
    reasons: list[str] = []
    if ca is None or cb is None:
        have, lack, other = (labels[0], labels[1], names_b) if ca else (labels[1], labels[0], names_a)
        partner = UPCYCLING_PAIRS.get(name)
        if partner and partner in other:
            reasons.append(f"only {have} has {name}; {lack} has {partner} in its place: a dense MLP pairs with "
                           "routed experts after alignment (upcycling)")
            return ComponentComparison(name, scope, pa, pb, la, lb, ia, ib, None, AFTER_ALIGNMENT, tuple(reasons))
        if name in ("attn_k", "attn_v", "attn_kv"):
            reasons.append(f"only {have} stores {name}: one side uses multi-head latent attention (joint kv_a/kv_b "
                           "projections), the other separate k/v projections")
        else:
            reasons.append(f"only {have} has {name}")
        return ComponentComparison(name, scope, pa, pb, la, lb, ia, ib, None, NO_COUNTERPART, tuple(reasons))

    sa, sb = _structural(pa, ca), _structural(pb, cb)
    common = sa & sb
    if not common:
        reasons.append(f"built from different tensors: {', '.join(sorted(sa))} vs {', '.join(sorted(sb))}")
        return ComponentComparison(name, scope, pa, pb, la, lb, ia, ib, False, NO_COUNTERPART, tuple(reasons))
    shapes_match = all(pa[p] == pb[p] for p in common) and sa == sb
    for p in sorted(sa ^ sb):
        reasons.append(f"{p} only in {labels[0] if p in sa else labels[1]}")
    for p in sorted((set(pa) ^ set(pb)) - (sa ^ sb)):
        reasons.append(f"{p} only in {labels[0] if p in pa else labels[1]}")
    for p in sorted(common):
        if pa[p] != pb[p]:
            reasons.append(f"{p}: {list(pa[p])} vs {list(pb[p])}")
    if not shapes_match or ia != ib:
        reasons += _hints(name, a, b)
    if ia != ib and name not in ("moe_experts",):
        reasons.append(f"{ia} vs {ib} instances per layer")
    if la != lb:
        reasons.append(f"in {la} vs {lb} layers (a layer map pairs them)")
    if name == "lm_head":
        for label, comp in zip(labels, (ca, cb)):
            if "weight" in comp.tied_parts:
                reasons.append(f"tied to embed_tokens in {label}")
    status = DIRECT if shapes_match and ia == ib and la == lb else AFTER_ALIGNMENT
    return ComponentComparison(name, scope, pa, pb, la, lb, ia, ib, shapes_match, status, tuple(reasons))


def _depth(a: ArchSpec, b: ArchSpec, labels: tuple[str, str]) -> str:
    mtp = [f"+{s.mtp_layers} MTP in {label}" for s, label in zip((a, b), labels) if s.mtp_layers]
    suffix = f" ({'; '.join(mtp)})" if mtp else ""
    if a.num_layers == b.num_layers:
        return f"same depth: {a.num_layers} decoder layers{suffix}"
    return f"depth differs: {a.num_layers} vs {b.num_layers} decoder layers{suffix}"


def compare_specs(a: ArchSpec, b: ArchSpec, *, labels: tuple[str, str] = ("a", "b")) -> ArchComparison:
    """Compare two architectures field by field, per component and per layer kind.

    Args:
        a, b: normalised configs.
        labels: how the two sides are named in reasons and notes (e.g. the refs).

    Returns:
        An ``ArchComparison``; ``component(name)`` looks one component up. Component names: embed_tokens,
        embed_positions, embed_token_types, embed_norm, attn_q, attn_k, attn_v (or attn_kv for MLA), attn_o,
        attn_qk_norm, norm_attn, norm_mlp, mlp_dense, moe_router, moe_experts, moe_shared_experts,
        moe_shared_gate, final_norm, lm_head, pooler, mlm_head, nsp_head, classifier, mtp, vision_embed,
        vision_layers.
    """
    fields = tuple(FieldComparison(name, get(a), get(b), get(a) == get(b)) for name, get in FIELDS)
    comps_a = {c.name: c for c in components(a)}
    comps_b = {c.name: c for c in components(b)}
    found = list(comps_a) + [n for n in comps_b if n not in comps_a]
    order = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), found.index(n)))
    names_a, names_b = set(comps_a), set(comps_b)
    compared = tuple(_compare_component(n, comps_a.get(n), comps_b.get(n), a, b, names_a, names_b, labels)
                     for n in order)
    kinds = {k: (sum(1 for x in a.layer_kinds if x == k), sum(1 for x in b.layer_kinds if x == k))
             for k in ("dense", "moe")}
    depth = _depth(a, b, labels)
    notes = [NOT_EVIDENCE_NOTE]
    if any(c.status == DIRECT for c in compared):
        notes.append(SAME_SHAPES_NOTE)
    notes.append(depth + (": a layer map is needed to pair layers (depth up-scaling and layer pruning change "
                          "depth)" if a.num_layers != b.num_layers else ""))
    if a.attention != b.attention and "MLA" in (a.attention, b.attention):
        notes.append(f"attention kinds differ ({a.attention} vs {b.attention}); conversions between them exist "
                     "(GQA to MLA), so this is not evidence of independence either")
    if (a.moe is None) != (b.moe is None):
        notes.append("one side is dense and the other MoE: MoE models upcycled from a dense model keep the dense "
                     "MLP's shapes in their experts")
    return ArchComparison(labels=tuple(labels), fields=fields, components=compared, layer_kinds=kinds,
                          depth=depth, notes=tuple(notes))
