"""Parameter counts, derived from an ``ArchSpec`` (so they work for configs transformers rejects).

``components(spec)`` lists every component with the tensor shapes a checkpoint stores for it (per-expert shapes,
un-fused q/k/v); both the counts here and ``compare.compare_specs`` read it. ``count_params`` gives the counts DESIGN
defines:

* ``transformers_equivalent``: what transformers' ``model.num_parameters()`` gives (no buffers such as
  ``position_ids`` or ``e_score_correction_bias``, no quantisation scales, no MTP).
* ``mtp``: the multi-token-prediction block as checkpoints store it (DeepSeek layout: a decoder layer, enorm, hnorm,
  eh_proj, shared_head, and copies of the embedding and output head).
* ``total_checkpoint``: every tensor element. From an inventory when there is one; otherwise
  ``transformers_equivalent + mtp + buffers`` where ``buffers`` are the persistent buffers checkpoints are known
  to store (router ``e_score_correction_bias``; ``position_ids`` cannot be known from a config).
* ``active_per_token``: routed experts count ``experts_per_token / num_experts``; shared experts, dense layers,
  attention and embeddings count fully (``active_counts_embeddings`` is True); ``active_non_embedding`` drops the
  token/position embeddings and an untied LM head. MTP is not active in ordinary decoding and is left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from hf_provenance.architecture import fields as F
from hf_provenance.architecture.spec import ArchSpec, layer_index

Shape = tuple[int, ...]
# position kinds that store a learned (positions x hidden) table (BERT's relative_key kinds keep it too)
LEARNED_POSITIONS = frozenset({"absolute", "relative_key", "relative_key_query"})


@dataclass(frozen=True)
class Component:
    """One architectural component and the tensors one instance of it stores.

    ``scope``: "model" (once), "layer" (every decoder layer), "dense" / "moe" (layers of that kind), "mtp" (each
    MTP layer) or "vision". ``instances`` repeats it within a layer (routed experts: ``num_experts``).
    ``buffer_parts`` are stored by checkpoints but kept as buffers by transformers; ``tied_parts`` share storage with
    another component and are not counted again; ``estimated`` marks shapes guessed from a partial config.
    """

    name: str
    scope: str
    parts: tuple[tuple[str, Shape], ...]
    layers: int = 1
    instances: int = 1
    buffer_parts: frozenset[str] = frozenset()
    tied_parts: frozenset[str] = frozenset()
    estimated: bool = False

    @property
    def shapes(self) -> dict[str, Shape]:
        return dict(self.parts)

    def _sum(self, include) -> int:
        per = sum(math.prod(shape) for part, shape in self.parts if include(part))
        return per * self.instances * self.layers

    @property
    def numel(self) -> int:
        """Parameters (as transformers counts them) over all instances and layers."""
        return self._sum(lambda p: p not in self.buffer_parts and p not in self.tied_parts)

    @property
    def buffer_numel(self) -> int:
        return self._sum(lambda p: p in self.buffer_parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope, "layers": self.layers, "instances": self.instances,
                "parts": {p: list(s) for p, s in self.parts}, "buffer_parts": sorted(self.buffer_parts),
                "tied_parts": sorted(self.tied_parts), "estimated": self.estimated, "numel": self.numel}


# ----------------------------------------------------------------------------------------------- components

def _norm(spec: ArchSpec, size: int, prefix: str = "") -> list[tuple[str, Shape]]:
    parts = [(f"{prefix}weight", (size,))]
    if spec.norm == "layernorm":
        parts.append((f"{prefix}bias", (size,)))
    return parts


def _linear(out: int, inp: int, bias: bool, name: str = "weight") -> list[tuple[str, Shape]]:
    parts = [(name, (out, inp))]
    if bias:
        parts.append((f"{name[:-6]}bias" if name.endswith("weight") else f"{name}_bias", (out,)))
    return parts


def _mlp(spec: ArchSpec, width: int, bias: bool) -> list[tuple[str, Shape]]:
    h = spec.hidden_size
    parts: list[tuple[str, Shape]] = []
    if spec.mlp_gated:
        parts += _linear(width, h, bias, "gate")
    parts += _linear(width, h, bias, "up")
    parts += _linear(h, width, bias, "down")
    return parts


def _attention(spec: ArchSpec) -> list[tuple[str, tuple[tuple[str, Shape], ...]]]:
    h, heads = spec.hidden_size, spec.num_heads
    out: list[tuple[str, tuple[tuple[str, Shape], ...]]] = []
    if spec.attention == "MLA":
        qk, v = spec.head_dim, spec.value_head_dim
        if spec.q_lora_rank:
            q = _linear(spec.q_lora_rank, h, spec.qkv_bias, "q_a") + [("q_a_norm", (spec.q_lora_rank,))] + \
                [("q_b", (heads * qk, spec.q_lora_rank))]
        else:
            q = [("weight", (heads * qk, h))]
        kv = _linear(spec.kv_lora_rank + spec.qk_rope_head_dim, h, spec.qkv_bias, "kv_a") + \
            [("kv_a_norm", (spec.kv_lora_rank,)), ("kv_b", (heads * (spec.qk_nope_head_dim + v), spec.kv_lora_rank))]
        out += [("attn_q", tuple(q)), ("attn_kv", tuple(kv)),
                ("attn_o", tuple(_linear(h, heads * v, spec.o_bias)))]
    else:
        d, kvh = spec.head_dim, spec.num_kv_heads
        out += [("attn_q", tuple(_linear(heads * d, h, spec.qkv_bias))),
                ("attn_k", tuple(_linear(kvh * d, h, spec.qkv_bias))),
                ("attn_v", tuple(_linear(kvh * d, h, spec.qkv_bias))),
                ("attn_o", tuple(_linear(h, heads * d, spec.o_bias)))]
        if spec.qk_norm:
            out.append(("attn_qk_norm", (("q_norm", (d,)), ("k_norm", (d,)))))
    return out


def _layer(spec: ArchSpec, kind: str, layers: int, scope_all: str, scope_kind: str) -> list[Component]:
    """The components of ``layers`` decoder layers of ``kind`` ("dense" | "moe")."""
    h = spec.hidden_size
    comps = [Component(name, scope_all, parts, layers=layers) for name, parts in _attention(spec)]
    comps += [Component("norm_attn", scope_all, tuple(_norm(spec, h)), layers=layers),
              Component("norm_mlp", scope_all, tuple(_norm(spec, h)), layers=layers)]
    if kind == "dense":
        comps.append(Component("mlp_dense", scope_kind, tuple(_mlp(spec, spec.intermediate_size or 0,
                                                                     spec.mlp_bias)), layers=layers))
        return comps
    moe = spec.moe
    assert moe is not None
    router = [("weight", (moe.num_experts, h))]
    buffers = frozenset()
    if moe.router_bias:
        router.append(("e_score_correction_bias", (moe.num_experts,)))
        buffers = frozenset({"e_score_correction_bias"})
    comps.append(Component("moe_router", scope_kind, tuple(router), layers=layers, buffer_parts=buffers))
    comps.append(Component("moe_experts", scope_kind, tuple(_mlp(spec, moe.moe_intermediate_size, spec.mlp_bias)),
                           layers=layers, instances=moe.num_experts))
    if moe.shared_expert_intermediate_size:
        comps.append(Component("moe_shared_experts", scope_kind,
                               tuple(_mlp(spec, moe.shared_expert_intermediate_size, spec.mlp_bias)), layers=layers))
    if moe.shared_expert_gate:
        comps.append(Component("moe_shared_gate", scope_kind, (("weight", (1, h)),), layers=layers))
    return comps


def _mtp(spec: ArchSpec) -> Component:
    """One component for the MTP block(s), parts prefixed by the layer component they belong to."""
    h, v = spec.hidden_size, spec.vocab_size
    kind = "moe" if spec.moe is not None and "moe" in spec.layer_kinds else "dense"
    parts: list[tuple[str, Shape]] = [("embed_tokens", (v, h)), ("enorm", (h,)), ("hnorm", (h,)),
                                      ("eh_proj", (h, 2 * h))]
    buffers = set()
    for comp in _layer(spec, kind, 1, "layer", kind):
        for part, shape in comp.parts:
            for i in range(comp.instances):
                name = f"{comp.name}.{part}" if comp.instances == 1 else f"{comp.name}.{i}.{part}"
                parts.append((name, shape))
                if part in comp.buffer_parts:
                    buffers.add(name)
    parts += [(f"shared_head_norm.{p}", s) for p, s in _norm(spec, h)] + [("shared_head_head", (v, h))]
    return Component("mtp", "mtp", tuple(parts), layers=spec.mtp_layers, buffer_parts=frozenset(buffers))


def _vision(spec: ArchSpec) -> list[Component]:
    vis = spec.vision or {}
    vh, vl = vis.get("hidden_size"), vis.get("num_layers")
    if not vh or not vl:
        return [Component("vision_tower", "vision", (), estimated=True)]
    vi = vis.get("intermediate_size") or 4 * vh
    p = vis.get("patch_size") or 14
    c = vis.get("num_channels") or 3
    img = vis.get("image_size")
    embed: list[tuple[str, Shape]] = [("patch_embed", (vh, c * p * p)), ("patch_embed_bias", (vh,))]
    if img:
        embed.append(("position_embed", ((img // p) ** 2 + 1, vh)))
    layer: list[tuple[str, Shape]] = []
    for name in ("q", "k", "v", "o"):
        layer += _linear(vh, vh, True, f"{name}_weight")
    layer += [("up", (vi, vh)), ("up_bias", (vi,)), ("down", (vh, vi)), ("down_bias", (vh,)),
              ("norm1", (vh,)), ("norm1_bias", (vh,)), ("norm2", (vh,)), ("norm2_bias", (vh,))]
    return [Component("vision_embed", "vision", tuple(embed), estimated=True),
            Component("vision_layers", "vision", tuple(layer), layers=vl, estimated=True)]


def components(spec: ArchSpec) -> tuple[Component, ...]:
    """Every component of ``spec`` with its checkpoint-layout shapes, in model order."""
    h, v = spec.hidden_size, spec.vocab_size
    comps: list[Component] = [Component("embed_tokens", "model", (("weight", (v, h)),))]
    if spec.position_embedding in LEARNED_POSITIONS and spec.max_position_embeddings:
        comps.append(Component("embed_positions", "model", (("weight", (spec.max_position_embeddings, h)),)))
    if spec.type_vocab_size:
        comps.append(Component("embed_token_types", "model", (("weight", (spec.type_vocab_size, h)),)))
    if spec.embed_norm:
        comps.append(Component("embed_norm", "model", tuple(_norm(spec, h))))
    n_dense, n_moe = spec.num_dense_layers, spec.num_moe_layers
    if n_dense and n_moe:
        # attention and norms are alike in both kinds: list them once, over every decoder layer
        dense = _layer(spec, "dense", n_dense, "layer", "dense")
        comps += [Component(c.name, "layer", c.parts, layers=spec.num_layers) for c in dense if c.scope == "layer"]
        comps += [c for c in dense if c.scope == "dense"]
        comps += [c for c in _layer(spec, "moe", n_moe, "layer", "moe") if c.scope == "moe"]
    elif n_moe:
        comps += _layer(spec, "moe", n_moe, "layer", "moe")
    else:
        comps += _layer(spec, "dense", spec.num_layers, "layer", "dense")
    if spec.final_norm:
        comps.append(Component("final_norm", "model", tuple(_norm(spec, h))))
    comps += _head_components(spec)
    if spec.mtp_layers:
        comps.append(_mtp(spec))
    if spec.vision is not None:
        comps += _vision(spec)
    return tuple(comps)


def _head_components(spec: ArchSpec) -> list[Component]:
    h, v = spec.hidden_size, spec.vocab_size
    out: list[Component] = []
    pooler = Component("pooler", "model", (("weight", (h, h)), ("bias", (h,))))
    mlm = Component("mlm_head", "model", (("transform", (h, h)), ("transform_bias", (h,)), ("norm", (h,)),
                                          ("norm_bias", (h,)), ("decoder", (v, h)), ("bias", (v,))),
                    tied_parts=frozenset({"decoder"}) if spec.tie_word_embeddings else frozenset())
    if spec.head == "lm_head":
        parts = _linear(v, h, spec.lm_head_bias)
        tied = frozenset({"weight"}) if spec.tie_word_embeddings else frozenset()
        out.append(Component("lm_head", "model", tuple(parts), tied_parts=tied))
    elif spec.encoder_only and spec.head == "base":
        out.append(pooler)
    elif spec.head == "mlm":
        out.append(mlm)
    elif spec.head == "pretraining":
        out += [pooler, mlm, Component("nsp_head", "model", (("weight", (2, h)), ("bias", (2,))))]
    elif spec.head == "classifier":
        n = spec.num_labels or 2
        if spec.encoder_only:
            out += [pooler, Component("classifier", "model", (("weight", (n, h)), ("bias", (n,))))]
        else:
            out.append(Component("classifier", "model", (("weight", (n, h)),)))
    return out


# ----------------------------------------------------------------------------------------------- counts

@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model (see the module docstring for each definition)."""

    total_checkpoint: int
    transformers_equivalent: int
    mtp: int
    active_per_token: int
    active_non_embedding: int
    embedding: int                       # token (+ position, token-type) embeddings and an untied LM head
    routed_experts: int                  # all routed-expert parameters (decoder layers, not MTP)
    buffers: int                         # persistent buffers in total_checkpoint (router bias, position_ids)
    quantization_scales: int             # scale/zero tensors in total_checkpoint (inventory only)
    analytic_transformers_equivalent: int
    source: str                          # "config" | "inventory"
    exact: bool                          # False when some shapes were estimated (vision tower)
    active_counts_embeddings: bool = True
    meta_checked: bool | None = None     # None: not attempted or unavailable; True: meta agreed; False: disagreed
    meta_num_parameters: int | None = None
    per_component: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_checkpoint": self.total_checkpoint, "transformers_equivalent": self.transformers_equivalent,
            "mtp": self.mtp, "active_per_token": self.active_per_token,
            "active_non_embedding": self.active_non_embedding,
            "active_counts_embeddings": self.active_counts_embeddings, "embedding": self.embedding,
            "routed_experts": self.routed_experts, "buffers": self.buffers,
            "quantization_scales": self.quantization_scales,
            "analytic_transformers_equivalent": self.analytic_transformers_equivalent, "source": self.source,
            "exact": self.exact, "meta_checked": self.meta_checked, "meta_num_parameters": self.meta_num_parameters,
            "per_component": dict(self.per_component), "notes": list(self.notes),
        }


def _ends_with(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _is_mtp_name(name: str, num_layers: int) -> bool:
    idx = layer_index(name)
    if idx is not None and idx >= num_layers and not any(m in name for m in F.VISION_NAME_MARKERS):
        return True
    return any(re.search(p, name) for p in F.MTP_NAME_PATTERNS)


def _inventory_split(spec: ArchSpec, inventory: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(total, mtp, buffers, quantisation scales) element counts of an inventory."""
    total = mtp = buffers = scales = 0
    for name, info in inventory.items():
        n = math.prod(int(d) for d in getattr(info, "shape", info))
        total += n
        if _ends_with(name, F.QUANT_SUFFIXES):
            scales += n
        elif _ends_with(name, F.BUFFER_SUFFIXES):
            buffers += n
        elif _is_mtp_name(name, spec.num_layers):
            mtp += n
    return total, mtp, buffers, scales


def count_params(spec: ArchSpec, *, inventory: Mapping[str, Any] | None = None,
                 cross_check: bool = False) -> ParamCounts:
    """Count ``spec``'s parameters.

    Args:
        spec: the normalised config.
        inventory: tensor name -> ``TensorInfo`` (or shape); when given, ``total_checkpoint``, ``mtp``,
            ``buffers`` and ``quantization_scales`` come from the stored tensors.
        cross_check: also instantiate the transformers class on the meta device (``meta.meta_layout``) and
            compare; when it works, ``transformers_equivalent`` is transformers' own count.

    Example::

        >>> counts = count_params(normalise(config))
        >>> counts.transformers_equivalent, counts.active_per_token
    """
    comps = components(spec)
    notes: list[str] = []
    per_component: dict[str, int] = {}
    for c in comps:
        if c.scope not in ("mtp",):
            per_component[c.name] = per_component.get(c.name, 0) + c.numel
    analytic = sum(c.numel for c in comps if c.scope != "mtp")
    exact = not any(c.estimated for c in comps)
    if not exact:
        notes.append("vision tower shapes are estimated from vision_config (ViT layout assumed, projector not "
                     "counted): the analytic count is approximate")
    routed = sum(c.numel for c in comps if c.name == "moe_experts")
    routed_active = 0
    if spec.moe is not None and routed:
        routed_active = routed // spec.moe.num_experts * spec.moe.experts_per_token
    embedding = sum(c.numel for c in comps if c.name in ("embed_tokens", "embed_positions", "embed_token_types"))
    embedding += sum(math.prod(c.shapes["weight"]) for c in comps
                     if c.name == "lm_head" and "weight" not in c.tied_parts)
    mtp_params = sum(c.numel for c in comps if c.scope == "mtp")
    buffers = sum(c.buffer_numel for c in comps)

    te = analytic
    meta_checked: bool | None = None
    meta_n: int | None = None
    if cross_check:
        from hf_provenance.architecture.meta import meta_layout

        layout, reason = meta_layout(spec.raw or {})
        if layout is None:
            notes.append(f"not cross-checked with transformers: {reason}")
        else:
            meta_n = layout.num_parameters
            meta_checked = meta_n == analytic
            te = meta_n
            if not meta_checked:
                notes.append(f"transformers ({layout.model_class}) counts {meta_n:,} parameters, the analytic count "
                             f"is {analytic:,} (difference {meta_n - analytic:+,}); transformers' count is used")

    active = te - routed + routed_active
    quant = 0
    source = "config"
    if inventory is not None:
        source = "inventory"
        total, mtp_inv, buffers, quant = _inventory_split(spec, inventory)
        if spec.mtp_layers and not mtp_inv:
            notes.append(f"config declares {spec.mtp_layers} MTP layer(s) but the inventory has none")
        elif mtp_inv and mtp_inv != mtp_params and spec.mtp_layers:
            notes.append(f"MTP tensors hold {mtp_inv:,} elements; the config implies {mtp_params:,}")
        mtp_params = mtp_inv
        rest = total - mtp_params - buffers - quant
        if rest != te:
            notes.append(f"the inventory holds {rest:,} parameter elements outside MTP, buffers and scales; "
                         f"transformers_equivalent is {te:,} ({rest - te:+,}: tied weights stored twice, packed "
                         "quantisation, or tensors the config does not describe)")
        if quant:
            notes.append("quantised checkpoint: total_checkpoint counts stored elements (packed integers count "
                         "once per stored element, not per weight)")
    else:
        total = te + mtp_params + buffers
        if spec.raw.get("quantization_config"):
            notes.append("config declares quantization_config: scale tensors are not counted without an inventory")
    if spec.mtp_layers:
        notes.append("MTP layers are not counted as active per token (ordinary decoding does not run them)")
    return ParamCounts(
        total_checkpoint=total, transformers_equivalent=te, mtp=mtp_params, active_per_token=active,
        active_non_embedding=active - embedding, embedding=embedding, routed_experts=routed, buffers=buffers,
        quantization_scales=quant, analytic_transformers_equivalent=analytic, source=source, exact=exact,
        meta_checked=meta_checked, meta_num_parameters=meta_n, per_component=per_component, notes=tuple(notes),
    )
