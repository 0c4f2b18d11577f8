"""Canonical keys (hf_provenance.alignment.keys) and declared layouts (hf_provenance.alignment.layouts).

Tiny models are built on the meta device (no weight memory) once per session; their state_dict names are the
inventories. Real published names (Mixtral, Qwen2-MoE, DeepSeek-V3 FP8 + MTP, GLM-4.5-Air MTP, MiniLM) are checked
too, the MiniLM ones read from the real checkpoint's header.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_provenance
from hf_provenance.alignment import keys as K
from hf_provenance.alignment.keys import (
    ARCH_BY_MODEL_TYPE,
    CanonicalKey,
    KeyMapper,
    component_of,
    fixed_axis,
    is_norm,
    is_position_indexed,
    is_vocab_indexed,
    resolve_arch,
)
from hf_provenance.alignment.layouts import LAYOUTS, FusedSplit, Layout, layout_for
from hf_provenance.errors import ConfigError

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
ROOT = Path(hf_provenance.__file__).resolve().parent.parent


def _ck(role, layer=None, expert=None, part="weight"):
    return CanonicalKey(role, layer, expert, part)


# ---------------------------------------------------------------------------------------------------------------
# Tiny factory models (meta device), built once
# ---------------------------------------------------------------------------------------------------------------

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
# config overrides of the factory's families (also saved to disk below)
_FAMILY_KW = {
    "llama": {},
    "qwen3_moe": dict(num_experts=4, **_MOE),
    "deepseek_v3": dict(num_hidden_layers=3, n_routed_experts=4, first_k_dense_replace=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                        topk_group=1, num_nextn_predict_layers=1, **_MOE),
    "bert_mlm": {},
}


def _build(name: str):
    """(model_type, n_layers, num_experts, state_dict names) of one tiny family."""
    import transformers as T

    def make(cfg_cls, model_cls, **kw):
        cfg = cfg_cls(**{**_TEXT, **kw})
        with torch.device("meta"):
            model = model_cls(cfg)
        return cfg, list(model.state_dict().keys())

    if name == "llama":
        cfg, names = make(T.LlamaConfig, T.LlamaForCausalLM)
        return "llama", 2, None, names
    if name == "mixtral":
        cfg, names = make(T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2)
        return "mixtral", 2, 4, names
    if name == "qwen3_moe":
        cfg, names = make(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, **_FAMILY_KW[name])
        return "qwen3_moe", 2, 4, names
    if name == "qwen2_moe":
        cfg, names = make(T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, num_experts=4, shared_expert_intermediate_size=64,
                          **_MOE)
        return "qwen2_moe", 2, 4, names
    if name == "deepseek_v3":
        cfg, names = make(T.DeepseekV3Config, T.DeepseekV3ForCausalLM, **_FAMILY_KW[name])
        return "deepseek_v3", 3, 4, names
    if name == "glm4_moe":
        cfg, names = make(T.Glm4MoeConfig, T.Glm4MoeForCausalLM, n_routed_experts=4, n_group=1, topk_group=1,
                          first_k_dense_replace=1, use_qk_norm=True, **_MOE)
        return "glm4_moe", 2, 4, names
    if name == "solar_open":
        cfg, names = make(T.SolarOpenConfig, T.SolarOpenForCausalLM, n_routed_experts=4, n_group=1, topk_group=1,
                          **_MOE)
        return "solar_open", 2, 4, names
    if name == "phi3":
        cfg, names = make(T.Phi3Config, T.Phi3ForCausalLM)
        return "phi3", 2, None, names
    if name == "gemma3_text":
        cfg, names = make(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=16)
        return "gemma3_text", 2, None, names
    if name == "gemma3":
        cfg = T.Gemma3Config(
            text_config={**_TEXT, "vocab_size": 300, "head_dim": 16},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298,
        )
        with torch.device("meta"):
            names = list(T.Gemma3ForConditionalGeneration(cfg).state_dict())
        return "gemma3", 2, None, names
    if name == "gpt_oss":
        cfg, names = make(T.GptOssConfig, T.GptOssForCausalLM, num_local_experts=4, head_dim=16,
                          intermediate_size=32)
        return "gpt_oss", 2, 4, names
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1,
                           eos_token_id=2)
        with torch.device("meta"):
            names = list(T.GPT2LMHeadModel(cfg).state_dict())
        return "gpt2", 2, None, names
    if name == "bert_mlm":
        cfg, names = make(T.BertConfig, T.BertForMaskedLM)
        return "bert", 2, None, names
    if name == "bert":
        cfg, names = make(T.BertConfig, T.BertModel)
        return "bert", 2, None, names
    raise KeyError(name)


FAMILIES = ("llama", "mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe", "solar_open", "phi3",
            "gemma3_text", "gemma3", "gpt_oss", "gpt2", "bert_mlm", "bert")


@pytest.fixture(scope="session")
def factory():
    return {name: _build(name) for name in FAMILIES}


def _mapper(spec) -> KeyMapper:
    model_type, n_layers, n_experts, _ = spec
    return KeyMapper(model_type, n_layers, num_experts=n_experts)


# ---------------------------------------------------------------------------------------------------------------
# Every tensor of every factory family
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_factory_tensor_has_a_key(factory, family):
    spec = factory[family]
    mapper = _mapper(spec)
    names = spec[3]
    mapped, unknown = mapper.map_inventory(names)
    assert unknown == [], {n: mapper.explain(n) for n in unknown}
    assert set(mapped) == set(names)
    assert len(set(mapped.values())) == len(names)  # injective
    # the family's own gguf table (or a declared rewrite) resolves everything: no fallback for known families
    fallbacks = {n: mapper.explain(n) for n in names if mapper.explain(n).startswith("fallback")}
    assert fallbacks == {}
    assert mapper.arch_source == "table"


SAVED = ("llama", "qwen3_moe", "deepseek_v3", "bert_mlm")  # the factory's families


@pytest.mark.parametrize("family", SAVED)
def test_every_saved_tensor_has_a_key(family, tmp_path):
    """What save_pretrained writes (transformers v5 writes experts back per expert), read from the file header."""
    import transformers as T
    from safetensors import safe_open

    model_type, n_layers, n_experts, meta_names = _build(family)
    cfg = T.AutoConfig.for_model(model_type, **{**_TEXT, **_FAMILY_KW[family]})
    torch.manual_seed(0)
    model = (T.AutoModelForMaskedLM if family == "bert_mlm" else T.AutoModelForCausalLM).from_config(cfg)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    mapper = KeyMapper(model_type, n_layers, num_experts=n_experts)
    mapped, unknown = mapper.map_inventory(names)
    assert unknown == [], {n: mapper.explain(n) for n in unknown}
    if n_experts:
        per_expert = [k for k in mapped.values() if k.role in ("ffn_gate_exp", "ffn_up_exp", "ffn_down_exp")]
        stacked = [k for k in mapper.map_inventory(meta_names)[0].values() if k.role.endswith("_exps")]
        # on disk one tensor per expert and projection; in memory two stacked tensors per MoE layer
        assert len(per_expert) == 3 * n_experts * (len(stacked) // 2)
        assert {k.expert for k in per_expert} == set(range(n_experts))


EXPECTED: dict[str, dict[str, CanonicalKey]] = {
    "llama": {
        "model.embed_tokens.weight": _ck("token_embd"),
        "model.layers.1.self_attn.q_proj.weight": _ck("attn_q", 1),
        "model.layers.1.self_attn.k_proj.weight": _ck("attn_k", 1),
        "model.layers.1.self_attn.v_proj.weight": _ck("attn_v", 1),
        "model.layers.1.self_attn.o_proj.weight": _ck("attn_output", 1),
        "model.layers.0.mlp.gate_proj.weight": _ck("ffn_gate", 0),
        "model.layers.0.mlp.up_proj.weight": _ck("ffn_up", 0),
        "model.layers.0.mlp.down_proj.weight": _ck("ffn_down", 0),
        "model.layers.0.input_layernorm.weight": _ck("attn_norm", 0),
        "model.layers.0.post_attention_layernorm.weight": _ck("ffn_norm", 0),
        "model.norm.weight": _ck("output_norm"),
        "lm_head.weight": _ck("output"),
    },
    "mixtral": {
        "model.layers.1.mlp.gate.weight": _ck("ffn_gate_inp", 1),
        "model.layers.1.mlp.experts.gate_up_proj": _ck("ffn_gate_up_exps", 1),
        "model.layers.1.mlp.experts.down_proj": _ck("ffn_down_exps", 1),
    },
    "qwen3_moe": {
        "model.layers.0.self_attn.q_norm.weight": _ck("attn_q_norm", 0),
        "model.layers.0.self_attn.k_norm.weight": _ck("attn_k_norm", 0),
        "model.layers.1.mlp.gate.weight": _ck("ffn_gate_inp", 1),
        "model.layers.1.mlp.experts.gate_up_proj": _ck("ffn_gate_up_exps", 1),
        "model.layers.1.mlp.experts.down_proj": _ck("ffn_down_exps", 1),
        "model.layers.1.post_attention_layernorm.weight": _ck("ffn_norm", 1),
    },
    "qwen2_moe": {
        "model.layers.0.self_attn.q_proj.bias": _ck("attn_q", 0, part="bias"),
        "model.layers.0.mlp.gate.weight": _ck("ffn_gate_inp", 0),
        "model.layers.0.mlp.shared_expert.gate_proj.weight": _ck("ffn_gate_shexp", 0),
        "model.layers.0.mlp.shared_expert.up_proj.weight": _ck("ffn_up_shexp", 0),
        "model.layers.0.mlp.shared_expert.down_proj.weight": _ck("ffn_down_shexp", 0),
        "model.layers.0.mlp.shared_expert_gate.weight": _ck("ffn_gate_inp_shexp", 0),
    },
    "deepseek_v3": {
        # first_k_dense_replace=1: layer 0 is a dense MLP
        "model.layers.0.mlp.gate_proj.weight": _ck("ffn_gate", 0),
        "model.layers.0.mlp.down_proj.weight": _ck("ffn_down", 0),
        "model.layers.1.self_attn.q_a_proj.weight": _ck("attn_q_a", 1),
        "model.layers.1.self_attn.q_a_layernorm.weight": _ck("attn_q_a_norm", 1),
        "model.layers.1.self_attn.q_b_proj.weight": _ck("attn_q_b", 1),
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": _ck("attn_kv_a_mqa", 1),
        "model.layers.1.self_attn.kv_a_layernorm.weight": _ck("attn_kv_a_norm", 1),
        "model.layers.1.self_attn.kv_b_proj.weight": _ck("attn_kv_b", 1),
        "model.layers.1.self_attn.o_proj.weight": _ck("attn_output", 1),
        "model.layers.2.mlp.gate.weight": _ck("ffn_gate_inp", 2),
        "model.layers.2.mlp.gate.e_score_correction_bias": _ck("exp_probs_b", 2, part="bias"),
        "model.layers.2.mlp.experts.gate_up_proj": _ck("ffn_gate_up_exps", 2),
        "model.layers.2.mlp.experts.down_proj": _ck("ffn_down_exps", 2),
        "model.layers.2.mlp.shared_experts.gate_proj.weight": _ck("ffn_gate_shexp", 2),
        "model.layers.2.mlp.shared_experts.up_proj.weight": _ck("ffn_up_shexp", 2),
        "model.layers.2.mlp.shared_experts.down_proj.weight": _ck("ffn_down_shexp", 2),
    },
    "glm4_moe": {
        "model.layers.0.mlp.up_proj.weight": _ck("ffn_up", 0),
        "model.layers.1.mlp.gate.e_score_correction_bias": _ck("exp_probs_b", 1, part="bias"),
        "model.layers.1.self_attn.q_norm.weight": _ck("attn_q_norm", 1),
        # gguf's glm4moe calls it post_attention_norm; it is the pre-MLP norm, as in llama
        "model.layers.1.post_attention_layernorm.weight": _ck("ffn_norm", 1),
    },
    "solar_open": {
        "model.layers.0.self_attn.q_proj.weight": _ck("attn_q", 0),
        "model.layers.0.mlp.gate.weight": _ck("ffn_gate_inp", 0),
        "model.layers.0.mlp.gate.e_score_correction_bias": _ck("exp_probs_b", 0, part="bias"),
        "model.layers.0.mlp.shared_experts.down_proj.weight": _ck("ffn_down_shexp", 0),
        "model.layers.1.post_attention_layernorm.weight": _ck("ffn_norm", 1),
    },
    "phi3": {
        "model.layers.0.self_attn.qkv_proj.weight": _ck("attn_qkv", 0),
        "model.layers.0.mlp.gate_up_proj.weight": _ck("ffn_gate_up", 0),
        "model.layers.0.mlp.down_proj.weight": _ck("ffn_down", 0),
    },
    "gemma3_text": {
        "model.layers.0.post_attention_layernorm.weight": _ck("post_attention_norm", 0),  # a true post-norm
        "model.layers.0.pre_feedforward_layernorm.weight": _ck("ffn_norm", 0),
        "model.layers.0.post_feedforward_layernorm.weight": _ck("post_ffw_norm", 0),
    },
    "gemma3": {
        "model.language_model.layers.1.self_attn.q_proj.weight": _ck("attn_q", 1),
        "model.language_model.embed_tokens.weight": _ck("token_embd"),
        "model.language_model.norm.weight": _ck("output_norm"),
        "lm_head.weight": _ck("output"),
        "model.vision_tower.encoder.layers.0.self_attn.k_proj.weight":
            _ck("vision", part="encoder.layers.0.self_attn.k_proj.weight"),
        "model.multi_modal_projector.mm_input_projection_weight": _ck("vision", part="mm_input_projection_weight"),
    },
    "gpt_oss": {
        "model.layers.0.self_attn.sinks": _ck("attn_sinks", 0),
        "model.layers.0.mlp.router.weight": _ck("ffn_gate_inp", 0),
        "model.layers.0.mlp.router.bias": _ck("ffn_gate_inp", 0, part="bias"),
        "model.layers.0.mlp.experts.gate_up_proj": _ck("ffn_gate_up_exps", 0),
        "model.layers.0.mlp.experts.gate_up_proj_bias": _ck("ffn_gate_up_exps", 0, part="bias"),
        "model.layers.0.mlp.experts.down_proj": _ck("ffn_down_exps", 0),
        "model.layers.0.mlp.experts.down_proj_bias": _ck("ffn_down_exps", 0, part="bias"),
        "model.layers.0.post_attention_layernorm.weight": _ck("ffn_norm", 0),
    },
    "gpt2": {
        "transformer.wte.weight": _ck("token_embd"),
        "transformer.wpe.weight": _ck("position_embd"),
        "transformer.h.1.attn.c_attn.weight": _ck("attn_qkv", 1),
        "transformer.h.1.attn.c_attn.bias": _ck("attn_qkv", 1, part="bias"),
        "transformer.h.1.attn.c_proj.weight": _ck("attn_output", 1),
        "transformer.h.1.mlp.c_fc.weight": _ck("ffn_up", 1),
        "transformer.h.1.mlp.c_proj.weight": _ck("ffn_down", 1),
        "transformer.h.1.ln_1.bias": _ck("attn_norm", 1, part="bias"),
        "transformer.h.1.ln_2.weight": _ck("ffn_norm", 1),
        "transformer.ln_f.weight": _ck("output_norm"),
    },
    "bert_mlm": {
        "bert.embeddings.word_embeddings.weight": _ck("token_embd"),
        "bert.embeddings.position_embeddings.weight": _ck("position_embd"),
        "bert.embeddings.token_type_embeddings.weight": _ck("token_types"),
        "bert.embeddings.LayerNorm.weight": _ck("token_embd_norm"),
        "bert.encoder.layer.1.attention.self.query.weight": _ck("attn_q", 1),
        "bert.encoder.layer.1.attention.output.dense.bias": _ck("attn_output", 1, part="bias"),
        "bert.encoder.layer.1.attention.output.LayerNorm.weight": _ck("attn_output_norm", 1),
        "bert.encoder.layer.1.intermediate.dense.weight": _ck("ffn_up", 1),
        "bert.encoder.layer.1.output.dense.weight": _ck("ffn_down", 1),
        "bert.encoder.layer.1.output.LayerNorm.bias": _ck("layer_output_norm", 1, part="bias"),
        "cls.predictions.bias": _ck("mlm_bias", part="bias"),
        "cls.predictions.transform.dense.weight": _ck("mlm_dense"),
        "cls.predictions.transform.dense.bias": _ck("mlm_dense", part="bias"),
        "cls.predictions.transform.LayerNorm.weight": _ck("mlm_norm"),
        "cls.predictions.decoder.weight": _ck("mlm_decoder"),
        "cls.predictions.decoder.bias": _ck("mlm_decoder", part="bias"),
    },
    "bert": {
        "embeddings.word_embeddings.weight": _ck("token_embd"),
        "encoder.layer.0.attention.self.value.bias": _ck("attn_v", 0, part="bias"),
        "pooler.dense.weight": _ck("pooler"),
        "pooler.dense.bias": _ck("pooler", part="bias"),
    },
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_expected_keys(factory, family):
    spec = factory[family]
    mapper = _mapper(spec)
    names = set(spec[3])
    for name, want in EXPECTED[family].items():
        assert name in names, f"{family}: transformers no longer produces {name!r}"
        assert mapper.key(name) == want, (name, mapper.explain(name))


# ---------------------------------------------------------------------------------------------------------------
# Published checkpoint names
# ---------------------------------------------------------------------------------------------------------------

PUBLISHED = [
    # Mixtral-8x7B on disk (per-expert, v4 names; transformers v5 fuses them when loading)
    ("mixtral", 32, 0, 8, "model.layers.0.block_sparse_moe.experts.3.w1.weight", _ck("ffn_gate_exp", 0, 3)),
    ("mixtral", 32, 0, 8, "model.layers.0.block_sparse_moe.experts.3.w2.weight", _ck("ffn_down_exp", 0, 3)),
    ("mixtral", 32, 0, 8, "model.layers.31.block_sparse_moe.experts.7.w3.weight", _ck("ffn_up_exp", 31, 7)),
    ("mixtral", 32, 0, 8, "model.layers.0.block_sparse_moe.gate.weight", _ck("ffn_gate_inp", 0)),
    # Phi-3.5-MoE (LayerNorm with bias, lm_head bias)
    ("phimoe", 32, 0, 16, "model.layers.5.block_sparse_moe.experts.15.w2.weight", _ck("ffn_down_exp", 5, 15)),
    ("phimoe", 32, 0, 16, "model.layers.5.input_layernorm.bias", _ck("attn_norm", 5, part="bias")),
    ("phimoe", 32, 0, 16, "lm_head.bias", _ck("output", part="bias")),
    # Qwen2-57B-A14B
    ("qwen2_moe", 28, 0, 64, "model.layers.2.mlp.shared_expert.gate_proj.weight", _ck("ffn_gate_shexp", 2)),
    ("qwen2_moe", 28, 0, 64, "model.layers.2.mlp.shared_expert_gate.weight", _ck("ffn_gate_inp_shexp", 2)),
    ("qwen2_moe", 28, 0, 64, "model.layers.2.mlp.experts.63.up_proj.weight", _ck("ffn_up_exp", 2, 63)),
    # Qwen3-30B-A3B
    ("qwen3_moe", 48, 0, 128, "model.layers.47.mlp.experts.127.down_proj.weight", _ck("ffn_down_exp", 47, 127)),
    ("qwen3_moe", 48, 0, 128, "model.layers.47.self_attn.k_norm.weight", _ck("attn_k_norm", 47)),
    # DeepSeek-V3 (FP8 with 128x128 block scales, one MTP layer at index 61)
    ("deepseek_v3", 61, 1, 256, "model.layers.3.mlp.gate.e_score_correction_bias", _ck("exp_probs_b", 3, part="bias")),
    ("deepseek_v3", 61, 1, 256, "model.layers.3.mlp.shared_experts.up_proj.weight", _ck("ffn_up_shexp", 3)),
    ("deepseek_v3", 61, 1, 256, "model.layers.3.mlp.shared_experts.up_proj.weight_scale_inv",
     _ck("ffn_up_shexp", 3, part="weight_scale_inv")),
    ("deepseek_v3", 61, 1, 256, "model.layers.3.mlp.experts.255.gate_proj.weight", _ck("ffn_gate_exp", 3, 255)),
    ("deepseek_v3", 61, 1, 256, "model.layers.3.mlp.experts.255.gate_proj.weight_scale_inv",
     _ck("ffn_gate_exp", 3, 255, "weight_scale_inv")),
    ("deepseek_v3", 61, 1, 256, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
     _ck("attn_kv_a_mqa", 0, part="weight_scale_inv")),
    ("deepseek_v3", 61, 1, 256, "model.layers.0.self_attn.q_b_proj.weight", _ck("attn_q_b", 0)),
    ("deepseek_v3", 61, 1, 256, "model.layers.60.mlp.experts.0.down_proj.weight", _ck("ffn_down_exp", 60, 0)),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.enorm.weight", _ck("mtp", 0, part="enorm.weight")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.hnorm.weight", _ck("mtp", 0, part="hnorm.weight")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.eh_proj.weight", _ck("mtp", 0, part="eh_proj.weight")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.embed_tokens.weight", _ck("mtp", 0, part="embed_tokens.weight")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.shared_head.head.weight",
     _ck("mtp", 0, part="shared_head.head.weight")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.mlp.experts.3.down_proj.weight",
     _ck("mtp", 0, part="mlp.experts.3.down_proj.weight")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.mlp.experts.3.down_proj.weight_scale_inv",
     _ck("mtp", 0, part="mlp.experts.3.down_proj.weight_scale_inv")),
    ("deepseek_v3", 61, 1, 256, "model.layers.61.self_attn.q_a_proj.weight",
     _ck("mtp", 0, part="self_attn.q_a_proj.weight")),
    # GLM-4.5-Air (46 layers + 1 MTP layer, qkv bias)
    ("glm4_moe", 46, 1, 128, "model.layers.45.self_attn.q_proj.bias", _ck("attn_q", 45, part="bias")),
    ("glm4_moe", 46, 1, 128, "model.layers.46.eh_proj.weight", _ck("mtp", 0, part="eh_proj.weight")),
    ("glm4_moe", 46, 1, 128, "model.layers.46.shared_head.norm.weight", _ck("mtp", 0, part="shared_head.norm.weight")),
    ("glm4_moe", 46, 1, 128, "model.layers.46.mlp.experts.0.up_proj.weight",
     _ck("mtp", 0, part="mlp.experts.0.up_proj.weight")),
    ("glm4_moe", 46, 1, 128, "model.layers.1.mlp.experts.127.up_proj.weight", _ck("ffn_up_exp", 1, 127)),
    # Solar-Open-100B (GLM-4.5-style layers, 48 layers, 128 experts)
    ("solar_open", 48, 0, 128, "model.layers.47.mlp.experts.5.gate_proj.weight", _ck("ffn_gate_exp", 47, 5)),
    ("solar_open", 48, 0, 128, "model.layers.47.mlp.gate.e_score_correction_bias",
     _ck("exp_probs_b", 47, part="bias")),
    # BERT checkpoints from the TF era
    ("bert", 12, 0, None, "bert.embeddings.LayerNorm.gamma", _ck("token_embd_norm")),
    ("bert", 12, 0, None, "bert.encoder.layer.11.output.LayerNorm.beta", _ck("layer_output_norm", 11, part="bias")),
    ("bert", 12, 0, None, "cls.seq_relationship.weight", _ck("nsp_head")),
    ("bert", 12, 0, None, "bert.pooler.dense.weight", _ck("pooler")),
    # GPT-2 checkpoints carry the causal-mask buffers
    ("gpt2", 12, 0, None, "h.11.attn.bias", _ck("causal_mask", 11, part="bias")),
    ("gpt2", 12, 0, None, "h.11.attn.masked_bias", _ck("causal_mask", 11, part="masked_bias")),
    ("gpt2", 12, 0, None, "h.11.attn.c_attn.weight", _ck("attn_qkv", 11)),
    ("gpt2", 12, 0, None, "wte.weight", _ck("token_embd")),
    # Qwen3-Next style MTP module
    ("qwen3_next", 48, 1, 512, "mtp.layers.0.self_attn.q_proj.weight", _ck("mtp", 0, part="self_attn.q_proj.weight")),
    ("qwen3_next", 48, 1, 512, "mtp.fc.weight", _ck("mtp", 0, part="fc.weight")),
]


@pytest.mark.parametrize("model_type,n_layers,mtp,n_experts,name,want", PUBLISHED,
                         ids=[row[4] for row in PUBLISHED])
def test_published_names(model_type, n_layers, mtp, n_experts, name, want):
    mapper = KeyMapper(model_type, n_layers, mtp_layers=mtp, num_experts=n_experts)
    assert mapper.key(name) == want, mapper.explain(name)
    assert not mapper.explain(name).startswith("fallback"), mapper.explain(name)


def test_mtp_layer_is_never_a_decoder_layer():
    mapper = KeyMapper("deepseek_v3", 61, mtp_layers=1, num_experts=256)
    names = ["model.layers.61.enorm.weight", "model.layers.61.eh_proj.weight",
             "model.layers.61.mlp.experts.3.down_proj.weight", "model.layers.60.self_attn.o_proj.weight"]
    mapped, unknown = mapper.map_inventory(names)
    assert unknown == []
    assert [mapped[n].role for n in names] == ["mtp", "mtp", "mtp", "attn_output"]
    assert all(mapped[n].layer == 0 for n in names[:3])
    assert mapped["model.layers.61.mlp.experts.3.down_proj.weight"].to_str() == "mtp.0.mlp.experts.3.down_proj.weight"
    assert mapper.explain("model.layers.61.enorm.weight") == "mtp"


def test_layers_beyond_declared_count_are_unknown():
    no_mtp = KeyMapper("deepseek_v3", 61)
    assert no_mtp.key("model.layers.61.enorm.weight") is None
    assert "beyond n_layers=61" in no_mtp.explain("model.layers.61.enorm.weight")
    one_mtp = KeyMapper("deepseek_v3", 61, mtp_layers=1)
    assert one_mtp.key("model.layers.62.enorm.weight") is None
    assert one_mtp.key("model.layers.61.enorm.weight") == _ck("mtp", 0, part="enorm.weight")
    two_mtp = KeyMapper("deepseek_v3", 61, mtp_layers=2)
    assert two_mtp.key("model.layers.62.enorm.weight") == _ck("mtp", 1, part="enorm.weight")
    assert one_mtp.key("mtp.layers.1.fc.weight") is None
    assert "beyond mtp_layers=1" in one_mtp.explain("mtp.layers.1.fc.weight")
    # a fused-expert name beyond n_layers goes the same way
    assert KeyMapper("qwen3_moe", 2).key("model.layers.2.mlp.experts.gate_up_proj") is None


def test_expert_index_extracted_and_bounded():
    mapper = KeyMapper("mixtral", 32, num_experts=8)
    key = mapper.key("model.layers.4.block_sparse_moe.experts.7.w2.weight")
    assert key == _ck("ffn_down_exp", 4, 7) and key.to_str() == "blk.4.ffn_down_exp.e7.weight"
    assert mapper.key("model.layers.4.block_sparse_moe.experts.8.w2.weight") is None
    assert "beyond num_experts=8" in mapper.explain("model.layers.4.block_sparse_moe.experts.8.w2.weight")
    unbounded = KeyMapper("mixtral", 32)
    assert unbounded.key("model.layers.4.block_sparse_moe.experts.8.w2.weight") == _ck("ffn_down_exp", 4, 8)
    # an expert index on a tensor that is not a routed expert is not silently accepted
    assert mapper.key("model.layers.4.self_attn.experts.3.q_proj.weight") is None


def test_deepseek_fp8_inventory_one_layer():
    """One FP8 DeepSeek-V3 MoE layer: every weight has a weight_scale_inv companion, same key bar the part."""
    mapper = KeyMapper("deepseek_v3", 61, mtp_layers=1, num_experts=4)
    fp8 = ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
           "self_attn.o_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
           "mlp.shared_experts.down_proj"]
    fp8 += [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    names = [f"model.layers.5.{m}.{s}" for m in fp8 for s in ("weight", "weight_scale_inv")]
    names += [f"model.layers.5.{n}" for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                               "self_attn.q_a_layernorm.weight", "self_attn.kv_a_layernorm.weight",
                                               "mlp.gate.weight", "mlp.gate.e_score_correction_bias")]
    mapped, unknown = mapper.map_inventory(names)
    assert unknown == []
    for module in fp8:
        w = mapped[f"model.layers.5.{module}.weight"]
        s = mapped[f"model.layers.5.{module}.weight_scale_inv"]
        assert (w.role, w.layer, w.expert) == (s.role, s.layer, s.expert)
        assert (w.part, s.part) == ("weight", "weight_scale_inv")
    experts = {mapped[n].expert for n in names if mapped[n].role == "ffn_gate_exp"}
    assert experts == {0, 1, 2, 3}


def test_minilm_checkpoint_every_tensor(minilm):
    from safetensors import safe_open

    with safe_open(str(minilm / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    config = json.loads((minilm / "config.json").read_text())
    mapper = KeyMapper.from_config(config)
    assert (mapper.arch, mapper.n_layers) == ("bert", 6)
    mapped, unknown = mapper.map_inventory(names)
    assert unknown == [], {n: mapper.explain(n) for n in unknown}
    assert len(mapped) == len(names) == 104
    assert mapped["embeddings.position_ids"] == _ck("position_ids", part="")
    assert mapped["encoder.layer.0.attention.self.query.weight"] == _ck("attn_q", 0)
    assert mapped["encoder.layer.5.output.LayerNorm.weight"] == _ck("layer_output_norm", 5)
    assert mapped["pooler.dense.bias"] == _ck("pooler", part="bias")
    components = {component_of(k) for k in mapped.values()}
    assert components == {"embeddings", "position_embeddings", "attention", "norms", "dense_mlp", "pooler", "other"}


def test_unknown_names_are_listed_with_a_reason():
    mapper = KeyMapper("llama", 2)
    mapped, unknown = mapper.map_inventory(["foo.bar", "model.layers.0.self_attn.q_proj.weight", "model.rotary.xyz"])
    assert unknown == ["foo.bar", "model.rotary.xyz"]
    assert list(mapped) == ["model.layers.0.self_attn.q_proj.weight"]
    assert mapper.explain("foo.bar") == "unknown: no rewrite rule and no gguf mapping"
    assert mapper.key("foo.bar") is None


def test_two_names_on_one_key_are_both_unknown():
    mapper = KeyMapper("llama", 2)
    names = ["model.layers.0.self_attn.q_proj.weight", "layers.0.attention.wq.weight", "model.norm.weight"]
    mapped, unknown = mapper.map_inventory(names)
    assert unknown == sorted(names[:2])
    assert list(mapped) == ["model.norm.weight"]
    assert "same key blk.0.attn_q.weight" in mapper.explain("layers.0.attention.wq.weight")


def test_fallback_is_stated_and_recorded():
    mapper = KeyMapper("totally_new_family", 2)
    assert (mapper.arch, mapper.arch_source) == ("llama", "fallback")
    assert "fallback" in mapper.arch_note
    assert mapper.key("model.layers.0.self_attn.q_proj.weight") == _ck("attn_q", 0)
    assert mapper.explain("model.layers.0.self_attn.q_proj.weight") == "gguf:llama"
    # llama lacks q_a_proj: the superset (deepseek2 among others) resolves it, and says so
    assert mapper.key("model.layers.1.self_attn.q_a_proj.weight") == _ck("attn_q_a", 1)
    assert mapper.explain("model.layers.1.self_attn.q_a_proj.weight") == "fallback:superset"
    # a known family whose arch lacks a tensor falls back to llama before the superset
    qwen3 = KeyMapper("qwen3", 2)
    assert qwen3.key("model.layers.0.block_sparse_moe.experts.1.w1.weight") == _ck("ffn_gate_exp", 0, 1)
    assert qwen3.explain("model.layers.0.block_sparse_moe.experts.1.w1.weight") == "fallback:llama"
    # a model_type that is itself a gguf arch name
    assert resolve_arch("starcoder") == ("starcoder", "gguf-name")


def test_arch_table_resolves_in_installed_gguf():
    from gguf import MODEL_ARCH_NAMES

    names = set(MODEL_ARCH_NAMES.values())
    missing = {mt: arch for mt, arch in ARCH_BY_MODEL_TYPE.items() if arch not in names}
    assert missing == {}
    assert resolve_arch("solar_open") == ("glm4moe", "table")
    assert resolve_arch("deepseek_v3") == ("deepseek2", "table")
    assert resolve_arch("mixtral") == ("llama", "table")


@pytest.mark.parametrize("folder,arch,n_layers,mtp,experts", [
    ("deepseek-ai__DeepSeek-V3", "deepseek2", 61, 1, 256),
    ("zai-org__GLM-4.5-Air", "glm4moe", 46, 1, 128),
    ("upstage__Solar-Open-100B", "glm4moe", 48, 0, 128),
    ("mistralai__Mixtral-8x7B-v0.1", "llama", 32, 0, 8),
    ("Qwen__Qwen3-30B-A3B", "qwen3moe", 48, 0, 128),
    ("Qwen__Qwen2-57B-A14B", "qwen2moe", 28, 0, 64),
    ("microsoft__Phi-3.5-MoE-instruct", "phimoe", 32, 0, 16),
    ("meta-llama__Llama-3.1-8B", "llama", 32, 0, None),
    ("upstage__SOLAR-10.7B-v1.0", "llama", 48, 0, None),
])
def test_from_published_config(folder, arch, n_layers, mtp, experts):
    config = json.loads((CONFIGS / folder / "config.json").read_text())
    mapper = KeyMapper.from_config(config)
    assert (mapper.arch, mapper.n_layers, mapper.mtp_layers, mapper.num_experts) == (arch, n_layers, mtp, experts)


def test_constructor_validation():
    with pytest.raises(ValueError, match="n_layers"):
        KeyMapper("llama", -1)
    with pytest.raises(ValueError, match="mtp_layers"):
        KeyMapper("llama", 2, mtp_layers=-1)
    with pytest.raises(ValueError, match="num_experts"):
        KeyMapper("llama", 2, num_experts=0)
    with pytest.raises(ConfigError, match="num_hidden_layers") as info:
        KeyMapper.from_config({"model_type": "llama"})
    assert info.value.where == "config.json (model_type 'llama')" and info.value.exit_code == 2


# ---------------------------------------------------------------------------------------------------------------
# gguf tables: build order cannot change a map; gguf's class tables stay untouched
# ---------------------------------------------------------------------------------------------------------------

_ORDER_SCRIPT = r"""
import json, sys
import gguf
mode, order = sys.argv[1], sys.argv[2].split(",")
if mode == "ours":
    from hf_provenance.alignment.keys import gguf_map
    build = lambda name: gguf_map(name, 3).mapping
else:  # gguf's own class, to show the leak the test guards against
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    build = lambda name: gguf.TensorNameMap(by_name[name], 3).mapping
maps = {name: sorted([k, v[0].name, v[1]] for k, v in build(name).items()) for name in order}
print(json.dumps({"maps": maps,
                  "ffn_norm": list(gguf.TensorNameMap.block_mappings_cfg[gguf.MODEL_TENSOR.FFN_NORM])}))
"""


def _run_order(mode: str, order: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT, mode, order], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout)


def test_build_order_does_not_change_maps_in_fresh_processes():
    # arctic is the arch with overrides in gguf's arch_block_mappings_cfg (they replace FFN_NORM's patterns)
    a_first = _run_order("ours", "arctic,llama,glm4moe")
    b_first = _run_order("ours", "llama,glm4moe,arctic")
    assert a_first["maps"] == b_first["maps"]
    assert a_first["ffn_norm"] == b_first["ffn_norm"]
    assert "model.layers.{bid}.post_attention_layernorm" in a_first["ffn_norm"]  # class table untouched
    llama = {k: v for k, *v in a_first["maps"]["llama"]}
    arctic = {k: v for k, *v in a_first["maps"]["arctic"]}
    assert llama["model.layers.0.post_attention_layernorm"] == ["FFN_NORM", "blk.0.ffn_norm"]
    assert arctic["model.layers.0.residual_layernorm"] == ["FFN_NORM", "blk.0.ffn_norm"]  # override still applied
    assert arctic["model.layers.0.post_attention_layernorm"] == ["FFN_NORM_EXP", "blk.0.ffn_norm_exps"]


def test_gguf_own_class_does_leak_so_the_guard_matters():
    leaked = _run_order("gguf", "arctic,llama")
    clean = _run_order("gguf", "llama,arctic")
    assert leaked["maps"]["llama"] != clean["maps"]["llama"]
    assert "model.layers.{bid}.post_attention_layernorm" not in leaked["ffn_norm"]


def test_gguf_class_tables_unchanged_in_process():
    from gguf import TensorNameMap

    before = {name: copy.deepcopy(getattr(TensorNameMap, name)) for name in K._GGUF_TABLES}
    for arch in ("arctic", "llama", "deepseek2", "glm4moe", "bert"):
        K.gguf_map(arch, 4)
    K.superset_map(2)
    after = {name: getattr(TensorNameMap, name) for name in K._GGUF_TABLES}
    assert after == before
    assert before == K._PRISTINE
    assert K.GGUF_TABLE_WARNINGS == ()
    assert K.gguf_map("llama", 4).mapping == K.IsolatedTensorNameMap(K._ARCH_BY_NAME["llama"], 4).mapping


# ---------------------------------------------------------------------------------------------------------------
# The key object and the role tables
# ---------------------------------------------------------------------------------------------------------------


def test_key_text_dict_and_order():
    assert _ck("ffn_down_exp", 3, 7).to_str() == "blk.3.ffn_down_exp.e7.weight"
    assert _ck("token_embd").to_str() == "token_embd.weight"
    assert _ck("attn_q", 0, part="weight_scale_inv").to_str() == "blk.0.attn_q.weight_scale_inv"
    assert _ck("position_ids", part="").to_str() == "position_ids"
    assert _ck("mtp", 0, part="enorm.weight").to_str() == "mtp.0.enorm.weight"
    assert _ck("ffn_gate_up_exps", 2).to_dict() == {"role": "ffn_gate_up_exps", "layer": 2, "expert": None,
                                                     "part": "weight"}
    keys = [_ck("attn_q", 1), _ck("attn_q", 0, part="bias"), _ck("attn_q", 0)]
    assert sorted(keys) == [_ck("attn_q", 0, part="bias"), _ck("attn_q", 0), _ck("attn_q", 1)]
    with pytest.raises(ValueError, match="layer"):
        CanonicalKey("attn_q", -1)
    with pytest.raises(ValueError, match="role"):
        CanonicalKey("", 0)
    with pytest.raises(Exception):
        _ck("attn_q").role = "attn_k"  # frozen


@pytest.mark.parametrize("key,component", [
    (_ck("token_embd"), "embeddings"),
    (_ck("position_embd"), "position_embeddings"),
    (_ck("attn_kv_b", 3), "attention"),
    (_ck("attn_q_norm", 3), "norms"),
    (_ck("ffn_gate_up", 3), "dense_mlp"),
    (_ck("ffn_up_exp", 3, 5), "routed_experts"),
    (_ck("ffn_gate_up_exps", 3), "routed_experts"),
    (_ck("ffn_down_shexp", 3), "shared_experts"),
    (_ck("ffn_gate_inp", 3), "router"),
    (_ck("exp_probs_b", 3, part="bias"), "router"),
    (_ck("ffn_gate_inp_shexp", 3), "router"),
    (_ck("output"), "lm_head"),
    (_ck("output_norm"), "final_norm"),
    (_ck("mtp", 0, part="eh_proj.weight"), "mtp"),
    (_ck("vision", part="encoder.layers.0.mlp.fc1.weight"), "vision"),
    (_ck("pooler"), "pooler"),
    (_ck("mlm_bias", part="bias"), "mlm_head"),
    (_ck("position_ids", part=""), "other"),
    (_ck("ssm_conv1d", 0), "other"),
    (_ck("attn_sub_norm", 0), "norms"),
])
def test_component_of(key, component):
    assert component_of(key) == component
    assert key.component == component


def test_norms_and_fixed_axes():
    norms = [_ck("attn_norm", 0), _ck("ffn_norm", 0, part="bias"), _ck("attn_q_norm", 0), _ck("attn_k_norm", 0),
             _ck("attn_q_a_norm", 0), _ck("attn_kv_a_norm", 0), _ck("output_norm"), _ck("token_embd_norm"),
             _ck("layer_output_norm", 0), _ck("post_ffw_norm", 0), _ck("mlm_norm"),
             _ck("mtp", 0, part="enorm.weight"), _ck("mtp", 0, part="shared_head.norm.weight"),
             _ck("mtp", 0, part="input_layernorm.weight"), _ck("mtp", 0, part="self_attn.kv_a_layernorm.weight"),
             _ck("ssm_norm", 0), _ck("attn_sub_norm", 0), _ck("pre_ffw_norm_2", 0)]  # last three: name pattern
    assert all(is_norm(k) for k in norms), [k for k in norms if not is_norm(k)]
    not_norms = [_ck("attn_q", 0), _ck("token_embd"), _ck("mtp", 0, part="eh_proj.weight"),
                 _ck("mtp", 0, part="mlp.experts.3.down_proj.weight"), _ck("exp_probs_b", 0, part="bias")]
    assert not any(is_norm(k) for k in not_norms)

    vocab = [_ck("token_embd"), _ck("output"), _ck("output", part="bias"), _ck("mlm_bias", part="bias"),
             _ck("mlm_decoder"), _ck("mtp", 0, part="embed_tokens.weight"),
             _ck("mtp", 0, part="shared_head.head.weight")]
    assert all(is_vocab_indexed(k) for k in vocab)
    assert all(fixed_axis(k)[0] == 0 for k in vocab)
    assert not is_vocab_indexed(_ck("position_embd")) and is_position_indexed(_ck("position_embd"))
    assert fixed_axis(_ck("position_embd")) == (0, "position")
    assert fixed_axis(_ck("token_types")) == (0, "token_type")
    for key in (_ck("attn_q", 0), _ck("ffn_down_exp", 0, 1), _ck("mlm_dense"), _ck("mtp", 0, part="eh_proj.weight")):
        assert fixed_axis(key) is None and not is_vocab_indexed(key) and not is_position_indexed(key)


def test_every_role_in_factory_has_a_listed_component(factory):
    """No role of a factory family falls through to 'other' except buffers."""
    for spec in factory.values():
        mapper = _mapper(spec)
        mapped, _ = mapper.map_inventory(spec[3])
        others = {k.role for k in mapped.values() if component_of(k) == "other"}
        assert others <= {"position_ids", "causal_mask", "attn_rot_embd", "rope_freqs"}, (spec[0], others)


# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------


def test_layout_fallback_is_stated():
    layout = layout_for("not_a_family")
    assert layout.declared is False and layout.model_type == "not_a_family"
    assert "no declared layout" in layout.note
    assert layout_for("llama").declared is True
    assert all(isinstance(v, Layout) and v.model_type == k for k, v in LAYOUTS.items())
    json.dumps([v.to_dict() for v in LAYOUTS.values()], allow_nan=False)


def test_layout_every_factory_family_is_declared(factory):
    for model_type, *_ in factory.values():
        assert layout_for(model_type).declared, model_type


def test_fused_split_indices():
    qkv = layout_for("phi3").split_for("attn_qkv")
    assert qkv.sizes_for(32, n_heads=2, n_kv_heads=1, head_dim=8) == (16, 8, 8)
    q, k, v = qkv.indices(32, n_heads=2, n_kv_heads=1, head_dim=8)
    assert (q, k, v) == (tuple(range(16)), tuple(range(16, 24)), tuple(range(24, 32)))
    gpt2 = layout_for("gpt2").split_for("attn_qkv")
    assert gpt2.indices(12) == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))
    assert layout_for("gpt_oss").split_for("ffn_gate_up_exps").indices(8) == ((0, 2, 4, 6), (1, 3, 5, 7))
    neox = layout_for("gpt_neox").split_for("attn_qkv").indices(12, head_dim=2)
    assert neox == ((0, 1, 6, 7), (2, 3, 8, 9), (4, 5, 10, 11))
    with pytest.raises(ValueError, match="equal parts"):
        layout_for("llama").split_for("ffn_gate_up").sizes_for(7)
    with pytest.raises(ValueError, match="mode"):
        FusedSplit("x", ("a", "b"), "zigzag")
    assert layout_for("llama").split_for("attn_q") is None


def test_layout_orientation_matches_gpt2_conv1d():
    import transformers as T

    cfg = T.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=64)
    with torch.device("meta"):
        model = T.GPT2LMHeadModel(cfg)
    sd = model.state_dict()
    layout = layout_for("gpt2")
    w, b = sd["transformer.h.0.attn.c_attn.weight"], sd["transformer.h.0.attn.c_attn.bias"]
    assert w.shape[layout.out_axis("attn_qkv", "weight", w.ndim)] == 3 * 64
    assert b.shape[layout.out_axis("attn_qkv", "bias", b.ndim)] == 3 * 64
    up = sd["transformer.h.0.mlp.c_fc.weight"]
    assert tuple(up.shape) == (64, 256) and layout.out_axis("ffn_up", "weight", 2) == 1
    assert layout_for("llama").out_axis("ffn_up", "weight", 2) == 0


def _expert_forward_by_layout(layout: Layout, params: dict, e: int, x: torch.Tensor, act) -> torch.Tensor:
    """One expert's output computed only from the declared layout (split + orientation)."""
    split = layout.split_for("ffn_gate_up_exps")
    w = params["gate_up"][e]
    axis = layout.out_axis("ffn_gate_up_exps", "weight", 3) - 1  # slicing one expert drops axis 0
    g_idx, u_idx = (torch.tensor(i) for i in split.indices(w.shape[axis]))
    wg, wu = w.index_select(axis, g_idx), w.index_select(axis, u_idx)
    mm = (lambda inp, m: inp @ m) if layout.is_transposed("ffn_gate_up_exps") else (lambda inp, m: inp @ m.T)
    gate, up = mm(x, wg), mm(x, wu)
    if "gate_up_bias" in params:
        b = params["gate_up_bias"][e]
        gate, up = gate + b[g_idx], up + b[u_idx]
    h = act(gate, up)
    down = params["down"][e]
    out = h @ down if layout.is_transposed("ffn_down_exps") else h @ down.T
    if "down_bias" in params:
        out = out + params["down_bias"][e]
    return out


def test_layout_matches_transformers_v5_fused_experts():
    """The declared split (gate first, axis 1, [E, 2I, H]) reproduces MixtralExperts / Qwen3MoeExperts / gpt-oss."""
    import transformers as T
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    x = torch.randn(5, 16, dtype=torch.float64)
    silu = torch.nn.functional.silu
    cases = [
        ("mixtral", MixtralExperts(T.MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=3))),
        ("qwen3_moe", Qwen3MoeExperts(T.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=3))),
    ]
    for model_type, module in cases:
        module = module.double()
        for p in module.parameters():
            torch.nn.init.normal_(p)
        layout = layout_for(model_type)
        assert tuple(module.gate_up_proj.shape) == (3, 16, 16)  # [E, 2I, H]
        idx, wts = torch.full((5, 1), 2), torch.ones(5, 1, dtype=torch.float64)
        got = module(x, idx, wts)
        params = {"gate_up": module.gate_up_proj.detach(), "down": module.down_proj.detach()}
        want = _expert_forward_by_layout(layout, params, 2, x, lambda g, u: silu(g) * u)
        torch.testing.assert_close(got, want)

    cfg = T.GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8)
    module = GptOssExperts(cfg).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layout = layout_for("gpt_oss")
    assert tuple(module.gate_up_proj.shape) == (3, 16, 16)  # [E, H, 2I]
    got = module(x, torch.full((5, 1), 1), torch.ones(5, 1, dtype=torch.float64))
    params = {"gate_up": module.gate_up_proj.detach(), "down": module.down_proj.detach(),
              "gate_up_bias": module.gate_up_proj_bias.detach(), "down_bias": module.down_proj_bias.detach()}

    def glu(g, u):
        g = g.clamp(max=module.limit)
        u = u.clamp(min=-module.limit, max=module.limit)
        return (u + 1) * g * torch.sigmoid(g * module.alpha)

    torch.testing.assert_close(got, _expert_forward_by_layout(layout, params, 1, x, glu))


def test_layout_matches_phi3_gate_up():
    import transformers as T
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(0)
    mlp = Phi3MLP(T.Phi3Config(hidden_size=16, intermediate_size=8, pad_token_id=None)).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    split = layout_for("phi3").split_for("ffn_gate_up")
    w = mlp.gate_up_proj.weight.detach()
    g_idx, u_idx = (list(i) for i in split.indices(w.shape[layout_for("phi3").out_axis("ffn_gate_up", "weight", 2)]))
    want = (torch.nn.functional.silu(x @ w[g_idx].T) * (x @ w[u_idx].T)) @ mlp.down_proj.weight.detach().T
    torch.testing.assert_close(mlp(x), want)


def test_keys_are_worked_out_once_per_source_and_each_caller_gets_its_own_copy(make, monkeypatch):
    """Every alignment stage asks ``keyed`` for both sides; the names are resolved once per source (and again when
    its inventory object is replaced), and a caller that edits what it got changes nothing for the next one."""
    from hf_provenance.alignment import identity
    from hf_provenance.sources import open_model

    calls = []
    real = identity.mapper_for
    monkeypatch.setattr(identity, "mapper_for", lambda src: calls.append(src) or real(src))
    src = open_model(make("llama"))
    first = identity.keyed(src)
    key = next(iter(first[0]))
    first[0].clear()
    first[2].append("edited")
    second = identity.keyed(src)
    assert len(calls) == 1 and key in second[0] and "edited" not in second[2]
    src.inventory = dict(src.inventory)
    assert identity.keyed(src)[0] == second[0] and len(calls) == 2
