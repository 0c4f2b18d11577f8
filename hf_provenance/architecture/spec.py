"""config.json normalised into one ``ArchSpec``, whatever a family calls its fields.

Field names come from the alias table in ``fields.py``; facts a family's code fixes but its config omits come from
``fields.FAMILIES``. An unknown ``model_type`` is normalised from the raw keys with decoder defaults (and says so in
``notes``); only real contradictions raise ``ConfigError``.

Example::

    >>> spec = normalise({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    ...                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    ...                   "intermediate_size": 14336})
    >>> spec.attention, spec.head_dim
    ('GQA', 128)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from hf_provenance.architecture import fields as F
from hf_provenance.errors import ConfigError

MAX_SIZE = 10_000_000
MAX_LAYERS = 10_000


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts layout. ``shared_expert_intermediate_size`` is the total width of the shared MLP
    (DeepSeek/GLM store ``n_shared_experts`` experts fused as one MLP of n × ``moe_intermediate_size`` rows)."""

    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    first_k_dense: int = 0
    moe_layer_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    norm_topk_prob: bool | None = None
    router_bias: bool = False          # e_score_correction_bias, one per routed expert
    n_group: int | None = None
    topk_group: int | None = None
    scoring_func: str | None = None
    routed_scaling_factor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts, "experts_per_token": self.experts_per_token,
            "moe_intermediate_size": self.moe_intermediate_size, "num_shared_experts": self.num_shared_experts,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "shared_expert_gate": self.shared_expert_gate, "first_k_dense": self.first_k_dense,
            "moe_layer_step": self.moe_layer_step, "mlp_only_layers": list(self.mlp_only_layers),
            "norm_topk_prob": self.norm_topk_prob, "router_bias": self.router_bias, "n_group": self.n_group,
            "topk_group": self.topk_group, "scoring_func": self.scoring_func,
            "routed_scaling_factor": self.routed_scaling_factor,
        }


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: base ``theta``, the scaling dict as published (None when unscaled), rotated fraction."""

    theta: float | None
    scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "scaling": _json_safe(self.scaling),
                "partial_rotary_factor": self.partial_rotary_factor}


@dataclass(frozen=True)
class ArchSpec:
    """One model's architecture, family-independent.

    ``head_dim`` is the config's ``head_dim`` when given, else hidden/heads; for MLA it is the query/key head size
    (qk_nope_head_dim + qk_rope_head_dim) and ``v_head_dim`` the value head size. ``layer_kinds`` has one entry,
    "dense" or "moe", per decoder layer; MTP layers are counted in ``mtp_layers``, never in ``num_layers``.
    ``head`` is what sits on the backbone: "lm_head" | "base" | "mlm" | "pretraining" | "classifier".
    ``raw`` is the config dict normalised (kept for meta instantiation; not part of ``to_dict`` or equality).
    """

    model_type: str
    architectures: tuple[str, ...]
    hidden_size: int
    num_layers: int
    attention: str                    # "MHA" | "GQA" | "MQA" | "MLA"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int | None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    tie_word_embeddings: bool = False
    norm: str = "rmsnorm"             # "rmsnorm" | "layernorm"
    norm_eps: float | None = None
    position_embedding: str = "rope"  # "rope" | "absolute" | "alibi" | "none"
    rope: RopeSpec | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    mlp_gated: bool = True
    lm_head_bias: bool = False
    qk_norm: bool = False
    hidden_act: str | None = None
    max_position_embeddings: int | None = None
    sliding_window: int | None = None
    moe: MoESpec | None = None
    mtp_layers: int = 0
    layer_kinds: tuple[str, ...] = ()
    encoder_only: bool = False
    type_vocab_size: int | None = None
    embed_norm: bool = False
    final_norm: bool = True
    head: str = "lm_head"
    num_labels: int | None = None
    vision: dict[str, Any] | None = None
    backbone_model_type: str | None = None
    known_family: bool = True
    notes: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for k in self.layer_kinds if k == "moe")

    @property
    def num_dense_layers(self) -> int:
        return sum(1 for k in self.layer_kinds if k == "dense")

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim is not None else self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type, "backbone_model_type": self.backbone_model_type,
            "known_family": self.known_family, "architectures": list(self.architectures),
            "hidden_size": self.hidden_size, "num_layers": self.num_layers, "attention": self.attention,
            "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "mla": None if self.attention != "MLA" else {
                "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
                "qk_rope_head_dim": self.qk_rope_head_dim, "qk_nope_head_dim": self.qk_nope_head_dim,
                "v_head_dim": self.v_head_dim},
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings, "norm": self.norm, "norm_eps": self.norm_eps,
            "position_embedding": self.position_embedding,
            "rope": None if self.rope is None else self.rope.to_dict(),
            "qkv_bias": self.qkv_bias, "o_bias": self.o_bias, "mlp_bias": self.mlp_bias,
            "mlp_gated": self.mlp_gated, "lm_head_bias": self.lm_head_bias, "qk_norm": self.qk_norm,
            "hidden_act": self.hidden_act, "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "moe": None if self.moe is None else self.moe.to_dict(),
            "mtp_layers": self.mtp_layers, "layer_kinds": list(self.layer_kinds),
            "num_dense_layers": self.num_dense_layers, "num_moe_layers": self.num_moe_layers,
            "encoder_only": self.encoder_only, "type_vocab_size": self.type_vocab_size,
            "embed_norm": self.embed_norm, "final_norm": self.final_norm, "head": self.head,
            "num_labels": self.num_labels, "vision": _json_safe(self.vision), "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------- helpers

def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Reader:
    """Reads canonical fields from one config dict and validates them, naming the key in every message."""

    def __init__(self, config: Mapping[str, Any], where: str, defaults: Mapping[str, Any] | None = None):
        self.config = config
        self.where = where
        self.defaults = defaults or {}

    def raw(self, name: str, table: Mapping[str, tuple[str, ...]] = F.ALIASES) -> tuple[str | None, Any]:
        key, value = F.lookup(self.config, name, table)
        if key is None and table is F.ALIASES and name in self.defaults:
            return f"{name} (family default)", self.defaults[name]
        return key, value

    def int(self, name: str, *, required: bool = False, limit: int | None = MAX_SIZE,
            allow_zero: bool = False, table: Mapping[str, tuple[str, ...]] = F.ALIASES) -> int | None:
        key, value = self.raw(name, table)
        if key is None:
            if required:
                raise ConfigError(self.where, f"no {name.replace('_', ' ')} field (looked for "
                                  f"{', '.join(table[name])}); the architecture cannot be described without it")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(self.where, f"{key} is {value!r}; expected a whole number")
        value = int(value)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(self.where, f"{key} is {value}; it must be positive")
        if limit is not None and value > limit:
            raise ConfigError(self.where, f"{key} is {value}, above the plausible maximum {limit:,}; "
                              "check the config for a typo")
        return value

    def bool(self, name: str) -> bool | None:
        key, value = self.raw(name)
        if key is None:
            return None
        if not isinstance(value, bool):
            raise ConfigError(self.where, f"{key} is {value!r}; expected true or false")
        return value

    def float(self, name: str) -> float | None:
        key, value = self.raw(name)
        if key is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(self.where, f"{key} is {value!r}; expected a number")
        return float(value)

    def str(self, name: str) -> str | None:
        key, value = self.raw(name)
        return None if key is None else str(value)


def _split_text_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any] | None, str | None]:
    """(text backbone config, vision config or None, key the text config came from)."""
    vision = next((config[k] for k in F.VISION_CONFIG_KEYS if isinstance(config.get(k), Mapping)), None)
    for key in F.TEXT_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, Mapping):
            text = dict(sub)
            for inherited in F.INHERITED_TEXT_KEYS:
                if inherited not in text and inherited in config:
                    text[inherited] = config[inherited]
            return text, vision, key
    return dict(config), vision, None


def _vision_summary(vision: Mapping[str, Any], where: str) -> dict[str, Any]:
    r = _Reader(vision, where)
    out: dict[str, Any] = {"model_type": vision.get("model_type")}
    for name in F.VISION_ALIASES:
        out[name] = r.int(name, table=F.VISION_ALIASES)
    return out


def _rope(cfg: Mapping[str, Any], r: _Reader, fam: Mapping[str, Any]) -> RopeSpec:
    theta = r.float("rope_theta")
    scaling = None
    _, scaling_raw = r.raw("rope_scaling")
    _, params = r.raw("rope_parameters")
    partial = r.float("partial_rotary_factor")
    if isinstance(params, Mapping):          # transformers v5 layout: theta, type and factors in one dict
        params = dict(params)
        theta = params.pop("rope_theta", theta)
        partial = params.pop("partial_rotary_factor", partial)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if isinstance(scaling_raw, Mapping):
        scaling = dict(scaling_raw)
    if partial is None:
        partial = fam.get("partial_rotary_factor", 1.0)
    if not 0.0 < float(partial) <= 1.0:
        raise ConfigError(r.where, f"partial_rotary_factor is {partial}; it must lie in (0, 1]")
    return RopeSpec(theta=None if theta is None else float(theta), scaling=scaling,
                    partial_rotary_factor=float(partial))


def _layer_kinds(num_layers: int, moe: MoESpec | None, step_offset: int) -> tuple[str, ...]:
    if moe is None:
        return ("dense",) * num_layers
    kinds = []
    for i in range(num_layers):
        is_moe = (i >= moe.first_k_dense and i not in moe.mlp_only_layers
                  and (i + step_offset) % moe.moe_layer_step == 0)
        kinds.append("moe" if is_moe else "dense")
    return tuple(kinds)


def _moe(r: _Reader, fam: Mapping[str, Any], intermediate: int | None, num_layers: int
         ) -> tuple[MoESpec | None, int]:
    num_experts = r.int("num_experts", allow_zero=True)
    if not num_experts:
        return None, 0
    k = r.int("experts_per_token")
    if k is None:
        raise ConfigError(r.where, f"{r.raw('num_experts')[0]} is {num_experts} but no experts-per-token field "
                          f"(looked for {', '.join(F.ALIASES['experts_per_token'])})")
    if k > num_experts:
        key = r.raw("experts_per_token")[0]
        raise ConfigError(r.where, f"{key} is {k}, more than the {num_experts} experts")
    size = r.int("moe_intermediate_size") or intermediate
    if size is None:
        raise ConfigError(r.where, "an MoE config needs moe_intermediate_size or intermediate_size")
    n_shared = r.int("num_shared_experts", allow_zero=True)
    shared_size = r.int("shared_expert_intermediate_size", allow_zero=True)
    if shared_size:
        n_shared = n_shared or 1
    elif n_shared:
        shared_size = n_shared * size
    step_key, step_raw = r.raw("moe_layer_step")
    _, only = r.raw("mlp_only_layers")
    if only is not None and (not isinstance(only, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in only)):
        raise ConfigError(r.where, f"mlp_only_layers is {only!r}; expected a list of layer indices")
    if isinstance(step_raw, (list, tuple)):
        # a per-layer 0/1 pattern (Megatron-style moe_layer_freq): layers flagged 0 are dense
        if len(step_raw) != num_layers:
            raise ConfigError(r.where, f"{step_key} lists {len(step_raw)} layers but there are {num_layers}")
        only = sorted(set(only or ()) | {i for i, flag in enumerate(step_raw) if not flag})
        step, step_key = 1, None
    else:
        step = r.int("moe_layer_step") or 1
    first_k = r.int("first_k_dense", allow_zero=True, limit=MAX_LAYERS) or 0
    router_bias = bool(fam.get("router_bias", False)) or any(
        r.config.get(key) == value for key, value in F.ROUTER_BIAS_FLAGS)
    moe = MoESpec(
        num_experts=num_experts, experts_per_token=k, moe_intermediate_size=size,
        num_shared_experts=n_shared or 0, shared_expert_intermediate_size=shared_size or 0,
        shared_expert_gate=bool(fam.get("shared_expert_gate", False)) and bool(shared_size),
        first_k_dense=first_k, moe_layer_step=step, mlp_only_layers=tuple(sorted(only or ())),
        norm_topk_prob=r.bool("norm_topk_prob"), router_bias=router_bias,
        n_group=r.int("n_group"), topk_group=r.int("topk_group"), scoring_func=r.str("scoring_func"),
        routed_scaling_factor=r.float("routed_scaling_factor"),
    )
    if moe.n_group and num_experts % moe.n_group:
        raise ConfigError(r.where, f"n_group ({moe.n_group}) does not divide the {num_experts} routed experts")
    return moe, F.MOE_STEP_OFFSET.get(step_key or "", 0)


def _head(architectures: tuple[str, ...]) -> str:
    arch = architectures[0] if architectures else ""
    for suffix, head in F.HEAD_BY_SUFFIX:
        if arch.endswith(suffix):
            return head
    return "lm_head"


# --------------------------------------------------------------------------------------------------- normalise

def normalise(config: Mapping[str, Any], *, where: str = "config.json") -> ArchSpec:
    """Normalise a config.json dict into an ``ArchSpec``.

    Args:
        config: the parsed config.json (``auto_map`` and any code references are ignored: data only).
        where: the file or ref the config came from, used in error messages.

    Returns:
        The ``ArchSpec``. A multimodal config's ``text_config`` is the backbone; its ``vision_config`` is
        summarised in ``vision``.

    Raises:
        ConfigError: when the config contradicts itself (heads not dividing the hidden size with no
            ``head_dim``, heads not divisible by KV heads, top-k above the expert count) or holds absurd values.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(where, f"config is a {type(config).__name__}, expected a JSON object")
    text, vision_cfg, text_key = _split_text_config(config)
    text_where = f"{where}: {text_key}" if text_key else where
    model_type = str(config.get("model_type") or text.get("model_type") or "unknown")
    backbone_type = str(text.get("model_type") or model_type)
    known = backbone_type in F.FAMILIES
    fam = F.family(backbone_type)
    notes: list[str] = []
    if not known:
        notes.append(f"model_type {backbone_type!r} is not in the family table: normalised from the raw fields "
                     "with decoder defaults (pre-norm, gated MLP, no o_proj bias unless attention_bias)")
    r = _Reader(text, text_where, fam.get("defaults"))
    arch_raw = config.get("architectures") or text.get("architectures") or ()
    architectures = tuple(str(a) for a in arch_raw) if isinstance(arch_raw, (list, tuple)) else (str(arch_raw),)

    hidden = r.int("hidden_size", required=True)
    num_layers = r.int("num_layers", required=True, limit=MAX_LAYERS)
    heads = r.int("num_heads", required=True)
    vocab = r.int("vocab_size", required=True)
    kv = r.int("num_kv_heads")
    if kv is None:
        kv = 1 if any(text.get(flag) is True for flag in F.MQA_FLAGS) else heads
    if heads % kv:
        raise ConfigError(text_where, f"{r.raw('num_heads')[0]} ({heads}) is not divisible by "
                          f"{r.raw('num_kv_heads')[0]} ({kv}): query heads must split evenly over KV heads")

    kv_lora = r.int("kv_lora_rank")
    q_lora = r.int("q_lora_rank")
    rope_dim = r.int("qk_rope_head_dim", allow_zero=True)
    nope_dim = r.int("qk_nope_head_dim", allow_zero=True)
    v_dim = r.int("v_head_dim")
    if kv_lora is not None:
        attention = "MLA"
        if rope_dim is None or nope_dim is None or v_dim is None:
            raise ConfigError(text_where, "kv_lora_rank is set (multi-head latent attention) but qk_rope_head_dim, "
                              "qk_nope_head_dim or v_head_dim is missing")
        head_dim = rope_dim + nope_dim
        if head_dim <= 0:
            raise ConfigError(text_where, "qk_rope_head_dim + qk_nope_head_dim must be positive")
    else:
        attention = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")
        q_lora = rope_dim = nope_dim = v_dim = None
        head_dim = r.int("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(text_where, f"hidden size ({hidden}) is not divisible by "
                                  f"{r.raw('num_heads')[0]} ({heads}) and no head_dim is given")
            head_dim = hidden // heads

    intermediate = r.int("intermediate_size", allow_zero=True)
    if intermediate is None and fam.get("intermediate_default") == "4x":
        intermediate = 4 * hidden
    moe, step_offset = _moe(r, fam, intermediate, num_layers)
    layer_kinds = _layer_kinds(num_layers, moe, step_offset)
    if moe is not None and "moe" not in layer_kinds:
        notes.append(f"{moe.num_experts} experts are declared but no decoder layer is an MoE layer "
                     f"(first_k_dense={moe.first_k_dense}, step={moe.moe_layer_step})")
    if "dense" in layer_kinds and not intermediate:
        raise ConfigError(text_where, "dense MLP layers need intermediate_size, which is missing or 0")

    rms_key, _ = r.raw("rms_norm_eps")
    ln_key, _ = r.raw("layer_norm_eps")
    norm = fam.get("norm") if known else ("layernorm" if ln_key and not rms_key else "rmsnorm")
    norm_eps = r.float("rms_norm_eps") if rms_key else r.float("layer_norm_eps")

    pos_kind = str(fam.get("position_embedding", "rope"))
    _, pos_type = r.raw("position_embedding_type")
    if any(text.get(flag) is True for flag in ("alibi", "use_alibi")):
        pos_kind = "alibi"
    elif pos_type in ("absolute", "relative_key", "relative_key_query"):
        pos_kind = str(pos_type)
    elif not known and r.raw("rope_theta")[0] is None and r.raw("rope_parameters")[0] is None \
            and r.raw("max_position_embeddings")[0] in ("n_positions", "n_ctx"):
        pos_kind = "absolute"
    rope = _rope(text, r, fam) if pos_kind == "rope" else None

    qkv_bias = r.bool("qkv_bias")
    if qkv_bias is None:
        qkv_bias = bool(fam.get("qkv_bias", False))
    o_rule = fam.get("o_bias", "qkv")
    o_bias = qkv_bias if o_rule == "qkv" else bool(o_rule)
    mlp_bias = r.bool("mlp_bias")
    if mlp_bias is None:
        mlp_bias = bool(fam.get("mlp_bias", False))
    qk_norm = r.bool("qk_norm")
    if qk_norm is None:
        qk_norm = bool(fam.get("qk_norm", False))
    mtp = r.int("mtp_layers", allow_zero=True, limit=MAX_LAYERS) or 0
    if mtp and fam.get("mtp_layout") != "deepseek":
        notes.append(f"{mtp} MTP layer(s) declared; their tensors are assumed to follow DeepSeek's layout "
                     "(decoder layer + enorm/hnorm/eh_proj + shared_head + embed_tokens copy)")

    encoder_only = bool(fam.get("encoder_only", False))
    type_vocab = r.int("type_vocab_size", allow_zero=True) if encoder_only or fam.get("token_types") else None
    head = _head(architectures)
    num_labels = None
    if head == "classifier":
        id2label = config.get("id2label")
        labels = config.get("num_labels")
        num_labels = len(id2label) if isinstance(id2label, Mapping) and id2label else (
            labels if isinstance(labels, int) and not isinstance(labels, bool) and labels > 0 else 2)
    tie = r.bool("tie_word_embeddings")
    if tie is None:
        tie = bool(fam.get("tie_default", True))
        if head in ("lm_head", "mlm", "pretraining"):
            notes.append(f"tie_word_embeddings is not set: the family default ({'tied' if tie else 'untied'}) "
                         "is assumed")

    vision = None
    if vision_cfg is not None:
        vision = _vision_summary(vision_cfg, f"{where}: vision_config")
    max_pos = r.int("max_position_embeddings", limit=None)
    sliding = text.get("sliding_window") if isinstance(text.get("sliding_window"), int) and not isinstance(
        text.get("sliding_window"), bool) else None

    return ArchSpec(
        model_type=model_type, architectures=architectures, hidden_size=hidden, num_layers=num_layers,
        attention=attention, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
        intermediate_size=intermediate, q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=nope_dim, v_head_dim=v_dim, tie_word_embeddings=tie, norm=str(norm), norm_eps=norm_eps,
        position_embedding=pos_kind, rope=rope, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        mlp_gated=bool(fam.get("mlp_gated", True)), lm_head_bias=bool(r.bool("lm_head_bias")), qk_norm=qk_norm,
        hidden_act=r.str("hidden_act"), max_position_embeddings=max_pos, sliding_window=sliding, moe=moe,
        mtp_layers=mtp, layer_kinds=layer_kinds, encoder_only=encoder_only,
        type_vocab_size=type_vocab or None, embed_norm=bool(fam.get("embed_norm", False)),
        final_norm=bool(fam.get("final_norm", True)), head=head, num_labels=num_labels, vision=vision,
        backbone_model_type=backbone_type, known_family=known, notes=tuple(notes), raw=dict(config),
    )


# --------------------------------------------------------------------------------------------------- inventory

def _shape(info: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(info, "shape", info))


def _is_vision(name: str) -> bool:
    return any(marker in name for marker in F.VISION_NAME_MARKERS)


def layer_index(name: str) -> int | None:
    """The decoder layer index in a tensor name (``model.layers.12.mlp...`` -> 12), or None."""
    for pattern in F.LAYER_INDEX_PATTERNS:
        m = re.search(pattern, name)
        if m:
            return int(m.group(1))
    return None


def check_against_inventory(spec: ArchSpec, inventory: Mapping[str, Any]) -> list[str]:
    """Where the config disagrees with the tensor shapes: one ``"<tensor or config>: <problem>"`` line each.

    Checks embedding rows against ``vocab_size`` and columns against ``hidden_size``, the LM head, the decoder
    layer count (MTP layers expected after the last decoder layer) and the routed-expert count. Vision-tower tensors
    are skipped. An empty list means no disagreement was found.

    Args:
        spec: the normalised config.
        inventory: tensor name -> ``TensorInfo`` (anything with ``.shape``) or a shape tuple.
    """
    problems: list[str] = []
    text_names = [n for n in inventory if not _is_vision(n)]
    layered = {n: layer_index(n) for n in text_names}
    emb = [n for n in text_names if n.endswith(F.EMBEDDING_SUFFIXES)
           and (layered[n] is None or layered[n] < spec.num_layers)]
    for name in emb:
        shape = _shape(inventory[name])
        if len(shape) != 2:
            problems.append(f"{name}: shape {list(shape)} is not a 2-D embedding matrix")
            continue
        if shape[0] != spec.vocab_size:
            problems.append(f"{name}: {shape[0]:,} rows but config.json vocab_size is {spec.vocab_size:,}")
        if shape[1] != spec.hidden_size:
            problems.append(f"{name}: {shape[1]:,} columns but config.json hidden_size is {spec.hidden_size:,}")
    if not emb and text_names:
        problems.append(f"inventory: no token-embedding tensor found (looked for names ending in "
                        f"{', '.join(F.EMBEDDING_SUFFIXES)})")
    for name in text_names:
        if name in F.LM_HEAD_NAMES:
            shape = _shape(inventory[name])
            if len(shape) == 2 and (shape[0] != spec.vocab_size or shape[1] != spec.hidden_size):
                problems.append(f"{name}: shape {list(shape)} but config.json implies "
                                f"[{spec.vocab_size}, {spec.hidden_size}]")
    indices = {i for i in layered.values() if i is not None}
    if indices:
        found = max(indices) + 1
        expected_mtp = spec.num_layers + spec.mtp_layers
        if found == spec.num_layers and spec.mtp_layers:
            problems.append(f"inventory: config.json declares {spec.mtp_layers} MTP layer(s) after layer "
                            f"{spec.num_layers - 1} but the checkpoint has none (MTP dropped)")
        elif found not in (spec.num_layers, expected_mtp):
            problems.append(f"inventory: decoder layers 0..{found - 1} ({found}) but config.json has "
                            f"{spec.num_layers} layers" + (f" + {spec.mtp_layers} MTP" if spec.mtp_layers else ""))
    if spec.moe is not None:
        experts = set()
        fused_rows = set()
        for name in text_names:
            if layered[name] is not None and layered[name] >= spec.num_layers:
                continue
            m = re.search(F.EXPERT_INDEX_PATTERN, name)
            if m:
                experts.add(int(m.group(1)))
            elif name.endswith(F.FUSED_EXPERT_SUFFIXES) or any(name.endswith(s + ".weight")
                                                                  for s in F.FUSED_EXPERT_SUFFIXES):
                shape = _shape(inventory[name])
                if len(shape) == 3:
                    fused_rows.add(shape[0])
        n = (max(experts) + 1) if experts else (fused_rows.pop() if len(fused_rows) == 1 else None)
        if n is not None and n != spec.moe.num_experts:
            problems.append(f"inventory: {n} routed experts per MoE layer but config.json has "
                            f"{spec.moe.num_experts}")
    return problems
