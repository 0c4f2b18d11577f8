"""Architectures in words, with the numbers actually computed (never published figures).

Example::

    >>> describe_moe(spec, count_params(spec))   # GLM-4.5-Air
    '128 routed + 1 shared experts, 8 routed active per token: C(128,8) ≈ 1.4e12 routing combinations; MoE in 45
    of 46 decoder layers (first 1 dense); 106.9B total, 13.4B active (12.2B without embeddings)'
"""

from __future__ import annotations

import math

from hf_provenance.architecture.params import ParamCounts
from hf_provenance.architecture.spec import ArchSpec


def human(n: int | float) -> str:
    """1.0691e11 -> '106.9B', 22713216 -> '22.7M', 5120 -> '5,120'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{int(n):,}"


def sci(x: int | float) -> str:
    """Two significant figures in e-notation without '+': 1430257188141 -> '1.4e12'; below a million, exact."""
    if abs(x) < 1_000_000:
        return f"{int(x):,}" if float(x).is_integer() else f"{x:.3g}"
    exp = int(math.floor(math.log10(abs(x))))
    mant = x / 10 ** exp
    if round(mant, 1) >= 10:
        mant, exp = mant / 10, exp + 1
    return f"{mant:.1f}e{exp}"


def describe_moe(spec: ArchSpec, counts: ParamCounts | None = None) -> str | None:
    """The MoE structure in one sentence, or None for a dense model."""
    moe = spec.moe
    if moe is None:
        return None
    experts = f"{moe.num_experts} routed"
    if moe.num_shared_experts:
        experts += f" + {moe.num_shared_experts} shared"
    e, k = moe.num_experts, moe.experts_per_token
    text = f"{experts} experts, {k} routed active per token: C({e},{k}) ≈ {sci(math.comb(e, k))} routing combinations"
    if moe.shared_expert_intermediate_size and moe.shared_expert_intermediate_size != \
            moe.num_shared_experts * moe.moe_intermediate_size:
        text += (f" (shared expert {moe.shared_expert_intermediate_size:,} wide, expert width "
                 f"{moe.moe_intermediate_size:,})")
    n_moe = spec.num_moe_layers
    if n_moe == spec.num_layers:
        text += f"; MoE in all {spec.num_layers} decoder layers"
    else:
        text += f"; MoE in {n_moe} of {spec.num_layers} decoder layers"
        if moe.first_k_dense:
            text += f" (first {moe.first_k_dense} dense)"
    if counts is not None:
        text += f"; {human(counts.transformers_equivalent)} total, {human(counts.active_per_token)} active " \
                f"({human(counts.active_non_embedding)} without embeddings)"
        if counts.mtp:
            text += f", plus {human(counts.mtp)} in the MTP block"
    return text


def describe_attention(spec: ArchSpec) -> str:
    if spec.attention == "MLA":
        q = f"q rank {spec.q_lora_rank}" if spec.q_lora_rank else "full-rank q"
        return (f"MLA with {spec.num_heads} heads ({q}, kv rank {spec.kv_lora_rank}, "
                f"qk {spec.qk_nope_head_dim}+{spec.qk_rope_head_dim} rope, v {spec.v_head_dim})")
    text = f"{spec.attention} with {spec.num_heads} query / {spec.num_kv_heads} KV heads x {spec.head_dim}"
    width = spec.num_heads * spec.head_dim
    if width != spec.hidden_size:
        text += f" (query width {width:,} != hidden {spec.hidden_size:,})"
    return text


def describe_counts(counts: ParamCounts) -> str:
    text = f"{human(counts.transformers_equivalent)} parameters (transformers count)"
    if counts.total_checkpoint != counts.transformers_equivalent:
        extra = []
        if counts.mtp:
            extra.append(f"{human(counts.mtp)} MTP")
        if counts.buffers:
            extra.append(f"{human(counts.buffers)} buffers")
        if counts.quantization_scales:
            extra.append(f"{human(counts.quantization_scales)} quantisation scales")
        text += f", {human(counts.total_checkpoint)} in the checkpoint"
        if extra:
            text += f" (incl. {', '.join(extra)})"
    if counts.routed_experts:
        text += f"; {human(counts.active_per_token)} active per token " \
                f"({human(counts.active_non_embedding)} without embeddings)"
    return text


def describe_spec(spec: ArchSpec, counts: ParamCounts | None = None) -> str:
    """A one-paragraph summary: family, depth, width, attention, vocabulary, MoE, counts."""
    arch = spec.architectures[0] if spec.architectures else spec.model_type
    depth = f"{spec.num_layers} {'encoder' if spec.encoder_only else 'decoder'} layers"
    if spec.mtp_layers:
        depth += f" (+{spec.mtp_layers} MTP)"
    parts = [f"{spec.model_type} ({arch}): {depth}, hidden {spec.hidden_size:,}", describe_attention(spec),
             f"vocabulary {spec.vocab_size:,} ({'tied' if spec.tie_word_embeddings else 'untied'} embeddings)"]
    moe = describe_moe(spec, counts)
    if moe:
        parts.append(moe)
    elif counts is not None:
        parts.append(describe_counts(counts))
    if spec.vision is not None:
        parts.append(f"vision tower {spec.vision.get('model_type') or ''} ({spec.vision.get('num_layers')} layers, "
                     f"hidden {spec.vision.get('hidden_size')})".replace("  ", " "))
    return "; ".join(parts)
