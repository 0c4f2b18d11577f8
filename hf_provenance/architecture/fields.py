"""What each family calls its config fields, and what its config leaves unsaid: data, not code.

``ALIASES`` maps a canonical field to the config keys that carry it, first match wins. ``FAMILIES`` holds, per
``model_type``, the facts a family's modelling code fixes but its config.json does not state (Qwen2 always has q/k/v
biases, PhiMoE uses LayerNorm although its config says ``rms_norm_eps``, ...). Adding a family is a data edit here.

Every table is read-only (``MappingProxyType`` / tuples): a lookup can never change a table for later callers.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

# canonical field -> config keys, in order of preference. One row per field; a comment names a family that uses
# an unusual key.
ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "hidden_size": ("hidden_size", "n_embd", "d_model", "model_dim", "dim"),          # n_embd: GPT-2
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv",
                     "multi_query_group_num"),                                          # ChatGLM
    "head_dim": ("head_dim", "kv_channels"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim", "d_ff"),
    "vocab_size": ("vocab_size", "padded_vocab_size", "n_vocab"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                                "n_ctx"),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "hidden_act": ("hidden_act", "activation_function", "hidden_activation"),
    "sliding_window": ("sliding_window",),
    "type_vocab_size": ("type_vocab_size",),
    "position_embedding_type": ("position_embedding_type",),
    # norms: which key is present also tells the kind when the family table does not
    "rms_norm_eps": ("rms_norm_eps", "rms_norm_epsilon"),
    "layer_norm_eps": ("layer_norm_eps", "layer_norm_epsilon", "layernorm_epsilon", "norm_eps"),
    # biases and q/k norms
    "qkv_bias": ("attention_bias", "qkv_bias", "use_qkv_bias", "add_qkv_bias"),
    "mlp_bias": ("mlp_bias",),
    "lm_head_bias": ("lm_head_bias",),                                                  # PhiMoE
    "qk_norm": ("use_qk_norm", "qk_layernorm", "qk_norm"),
    # rotary
    "rope_theta": ("rope_theta", "rotary_emb_base", "rope_base"),
    "rope_scaling": ("rope_scaling",),
    "rope_parameters": ("rope_parameters",),                                            # transformers v5
    "partial_rotary_factor": ("partial_rotary_factor", "rotary_pct"),
    # multi-head latent attention (DeepSeek-V2/V3)
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    # mixture of experts
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "n_experts",
                    "num_routed_experts"),      # Mixtral/PhiMoE, Qwen-MoE, DeepSeek/GLM/Solar-Open, DBRX-like
    "num_shared_experts": ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"),
    "experts_per_token": ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k",
                          "num_selected_experts", "top_k_experts"),
    "moe_intermediate_size": ("moe_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size"),
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    "first_k_dense": ("first_k_dense_replace", "first_k_dense", "moe_layer_start_index"),
    "moe_layer_step": ("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step", "moe_every_n_layers"),
    "mlp_only_layers": ("mlp_only_layers",),
    "norm_topk_prob": ("norm_topk_prob",),
    "n_group": ("n_group",),
    "topk_group": ("topk_group",),
    "scoring_func": ("scoring_func",),
    "routed_scaling_factor": ("routed_scaling_factor",),
    # multi-token prediction
    "mtp_layers": ("num_nextn_predict_layers", "num_mtp_layers", "mtp_num_layers"),
})

# Which MoE layer-step key counts layers from 1: Qwen-MoE and Llama-4 put experts in layer i when (i+1) % step == 0;
# DeepSeek's moe_layer_freq uses i % step == 0 (after the first_k_dense layers).
MOE_STEP_OFFSET: Mapping[str, int] = MappingProxyType({
    "decoder_sparse_step": 1,
    "interleave_moe_layer_step": 1,
    "moe_layer_freq": 0,
    "moe_every_n_layers": 1,
})

# Config values that mean "the router has a per-expert score-correction bias" (DeepSeek-V3's noaux_tc routing).
ROUTER_BIAS_FLAGS: tuple[tuple[str, Any], ...] = (
    ("topk_method", "noaux_tc"),
    ("moe_router_enable_expert_bias", True),
)

# Config flags that mean a single key/value head (GPT-BigCode, Falcon-7B).
MQA_FLAGS: tuple[str, ...] = ("multi_query",)

# Sub-configs of multimodal models: the first present holds the text backbone / the vision tower.
TEXT_CONFIG_KEYS: tuple[str, ...] = ("text_config", "llm_config", "language_config")
VISION_CONFIG_KEYS: tuple[str, ...] = ("vision_config", "visual", "vision_tower_config")
# Keys a text_config may leave to the top level (taken from there when the text_config lacks them).
INHERITED_TEXT_KEYS: tuple[str, ...] = ("tie_word_embeddings", "vocab_size", "torch_dtype")

VISION_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "hidden_size": ("hidden_size", "embed_dim", "width"),
    "num_layers": ("num_hidden_layers", "depth", "num_layers", "layers"),
    "num_heads": ("num_attention_heads", "num_heads", "heads"),
    "intermediate_size": ("intermediate_size", "mlp_dim"),
    "patch_size": ("patch_size", "spatial_patch_size"),
    "image_size": ("image_size",),
    "num_channels": ("num_channels", "in_channels", "in_chans"),
})

# Facts the modelling code of a family fixes and its config does not say. Keys (all optional):
#   norm: "rmsnorm" | "layernorm"            qkv_bias / mlp_bias / qk_norm: default when no config key is present
#   o_bias: True | False | "qkv" (follow qkv_bias)
#   mlp_gated: gate/up/down (True) or up/down (False)
#   position_embedding: "rope" | "absolute" | "alibi" | "none"
#   encoder_only, embed_norm (LayerNorm after the embeddings), final_norm
#   router_bias (e_score_correction_bias), shared_expert_gate (Qwen2-MoE's sigmoid gate on the shared expert)
#   partial_rotary_factor: default when the config is silent
#   intermediate_default: "4x" (GPT-2: n_inner null means 4 * hidden)
#   mtp_layout: "deepseek" (MTP block = decoder layer + enorm/hnorm/eh_proj + shared_head + embed_tokens copy)
#   tie_default: the config class's tie_word_embeddings default, used when config.json omits the key
#   defaults: canonical field -> the config class's default, used when config.json omits every alias
_DECODER = {"norm": "rmsnorm", "o_bias": "qkv", "mlp_gated": True, "position_embedding": "rope",
            "encoder_only": False, "embed_norm": False, "final_norm": True, "tie_default": False}
_ENCODER = {"norm": "layernorm", "qkv_bias": True, "o_bias": True, "mlp_bias": True, "mlp_gated": False,
            "position_embedding": "absolute", "encoder_only": True, "embed_norm": True, "final_norm": False,
            "token_types": True, "tie_default": True,
            "defaults": MappingProxyType({"type_vocab_size": 2, "max_position_embeddings": 512})}


def _family(base: Mapping[str, Any], **overrides: Any) -> Mapping[str, Any]:
    return MappingProxyType({**base, **overrides})


FAMILIES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "llama": _family(_DECODER),
    "mistral": _family(_DECODER),
    "mixtral": _family(_DECODER),
    "gemma": _family(_DECODER, tie_default=True),
    "phi3": _family(_DECODER),
    "qwen2": _family(_DECODER, qkv_bias=True, o_bias=False),
    "qwen2_moe": _family(_DECODER, qkv_bias=True, o_bias=False, shared_expert_gate=True),
    "qwen3": _family(_DECODER, qk_norm=True),
    "qwen3_moe": _family(_DECODER, qk_norm=True),
    "deepseek_v2": _family(_DECODER, mtp_layout="deepseek"),
    "deepseek_v3": _family(_DECODER, router_bias=True, mtp_layout="deepseek"),
    "glm4_moe": _family(_DECODER, o_bias=False, router_bias=True, partial_rotary_factor=0.5,
                        mtp_layout="deepseek"),
    "solar_open": _family(_DECODER, o_bias=False, router_bias=True, mtp_layout="deepseek"),
    "phimoe": _family(_DECODER, norm="layernorm"),   # config says rms_norm_eps; the code builds nn.LayerNorm
    "gpt2": _family(_DECODER, norm="layernorm", qkv_bias=True, o_bias=True, mlp_bias=True, mlp_gated=False,
                    position_embedding="absolute", intermediate_default="4x", tie_default=True,
                    defaults=MappingProxyType({"max_position_embeddings": 1024})),
    "bert": _family(_ENCODER),
    "roberta": _family(_ENCODER),
    "xlm-roberta": _family(_ENCODER),
})
# Families not listed: decoder defaults, with norm and position kind read from the config's keys, and
# transformers' PreTrainedConfig default for tied embeddings.
DEFAULT_DECODER: Mapping[str, Any] = MappingProxyType({**_DECODER, "tie_default": True})

# What sits on top of the backbone, by the suffix of ``architectures[0]`` (first match wins: order matters).
HEAD_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "lm_head"),
    ("LMHeadModel", "lm_head"),
    ("ForConditionalGeneration", "lm_head"),
    ("ForMaskedLM", "mlm"),
    ("ForPreTraining", "pretraining"),        # BERT: pooler + MLM head + next-sentence head
    ("ForSequenceClassification", "classifier"),
    ("Model", "base"),                        # encoders: + pooler; decoders: no head
)

# Inventory tensor names (checkpoint layout), matched on the name's end or with a regex.
EMBEDDING_SUFFIXES: tuple[str, ...] = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight",
                                       "tok_embeddings.weight")
LM_HEAD_NAMES: tuple[str, ...] = ("lm_head.weight", "output.weight", "embed_out.weight")
LAYER_INDEX_PATTERNS: tuple[str, ...] = (r"(?:^|\.)layers\.(\d+)\.", r"(?:^|\.)layer\.(\d+)\.",
                                         r"(?:^|\.)h\.(\d+)\.", r"(?:^|\.)blocks\.(\d+)\.")
EXPERT_INDEX_PATTERN = r"\.experts\.(\d+)\."
FUSED_EXPERT_SUFFIXES: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
MTP_NAME_PATTERNS: tuple[str, ...] = (r"(?:^|\.)mtp[._]",)          # besides layers.{i >= num_layers}
VISION_NAME_MARKERS: tuple[str, ...] = ("vision", "visual", "image_encoder", "vit.", "mm_projector",
                                        "multi_modal_projector")
# Tensors a checkpoint stores that transformers keeps as buffers (not in num_parameters()).
BUFFER_SUFFIXES: tuple[str, ...] = ("position_ids", "token_type_ids", "rotary_emb.inv_freq",
                                    "e_score_correction_bias", "attn.masked_bias", "attn.bias")
# Quantisation side tensors (FP8 block scales, GPTQ/AWQ zeros and groups, bitsandbytes states).
QUANT_SUFFIXES: tuple[str, ...] = ("weight_scale_inv", "weight_scale", "input_scale", "scales", "qzeros",
                                   "g_idx", "absmax", "quant_map", "quant_state.bitsandbytes__nf4",
                                   "quant_state.bitsandbytes__fp4", "nested_absmax", "nested_quant_map")


def lookup(config: Mapping[str, Any], field: str, table: Mapping[str, tuple[str, ...]] = ALIASES
           ) -> tuple[str | None, Any]:
    """The first of ``table[field]``'s keys present in ``config`` with a non-null value: ``(key, value)``.

    Returns ``(None, None)`` when none is present. Example: ``lookup({"n_routed_experts": 128}, "num_experts")``
    gives ``("n_routed_experts", 128)``.
    """
    for key in table[field]:
        if key in config and config[key] is not None:
            return key, config[key]
    return None, None


def family(model_type: str | None) -> Mapping[str, Any]:
    """The family table row for ``model_type``, or the decoder defaults when the family is not listed."""
    return FAMILIES.get(model_type or "", DEFAULT_DECODER)
