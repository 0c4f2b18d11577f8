"""config.json -> ArchSpec: every fixture family, aliases, contradictions, multimodal, inventory checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hf_provenance.architecture import fields as F
from hf_provenance.architecture.spec import ArchSpec, check_against_inventory, normalise
from hf_provenance.errors import ConfigError
from hf_provenance.sources.base import TensorInfo

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def load(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def spec_of(name: str) -> ArchSpec:
    return normalise(load(name), where=f"{name}/config.json")


def header_inventory(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor inventory from a safetensors header (test helper; the sources stage has the real parser)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: TensorInfo(k, v["dtype"], tuple(v["shape"]), str(path), 8 + n + v["data_offsets"][0],
                          8 + n + v["data_offsets"][1]) for k, v in header.items()}


# ------------------------------------------------------------------------------------------- fixture table
# hidden, layers, heads, kv, head_dim, attention, experts, shared, top-k, moe size, first_k_dense, vocab, tied, mtp,
# (dense layers, moe layers). Values checked by hand against each config.json (see fixtures/configs/SOURCES.md).
EXPECTED = {
    "upstage__Solar-Open-100B":
        (4096, 48, 64, 8, 128, "GQA", 128, 1, 8, 1280, 0, 196608, False, 0, (0, 48)),
    "zai-org__GLM-4.5-Air":   # 96 heads x 128 = 12288 != hidden 4096: valid because head_dim is given
        (4096, 46, 96, 8, 128, "GQA", 128, 1, 8, 1408, 1, 151552, False, 1, (1, 45)),
    "mistralai__Mixtral-8x7B-v0.1":   # experts use intermediate_size (no moe_intermediate_size key)
        (4096, 32, 32, 8, 128, "GQA", 8, 0, 2, 14336, 0, 32000, False, 0, (0, 32)),
    "deepseek-ai__DeepSeek-V2":   # MLA: head_dim = qk_nope 128 + qk_rope 64
        (5120, 60, 128, 128, 192, "MLA", 160, 2, 6, 1536, 1, 102400, False, 0, (1, 59)),
    "deepseek-ai__DeepSeek-V3":
        (7168, 61, 128, 128, 192, "MLA", 256, 1, 8, 2048, 3, 129280, False, 1, (3, 58)),
    "Qwen__Qwen2-57B-A14B":   # one shared expert of width shared_expert_intermediate_size = 20480
        (3584, 28, 28, 4, 128, "GQA", 64, 1, 8, 2560, 0, 151936, False, 0, (0, 28)),
    "Qwen__Qwen3-30B-A3B":
        (2048, 48, 32, 4, 128, "GQA", 128, 0, 8, 768, 0, 151936, False, 0, (0, 48)),
    "meta-llama__Llama-3.1-8B":
        (4096, 32, 32, 8, 128, "GQA", None, None, None, None, None, 128256, False, 0, (32, 0)),
    "mistralai__Mistral-7B-v0.1":
        (4096, 32, 32, 8, 128, "GQA", None, None, None, None, None, 32000, False, 0, (32, 0)),
    "upstage__SOLAR-10.7B-v1.0":
        (4096, 48, 32, 8, 128, "GQA", None, None, None, None, None, 32000, False, 0, (48, 0)),
    "microsoft__Phi-3.5-MoE-instruct":
        (4096, 32, 32, 8, 128, "GQA", 16, 0, 2, 6400, 0, 32064, False, 0, (0, 32)),
}


def test_every_fixture_is_in_the_table():
    assert sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_normalises(name):
    (hidden, layers, heads, kv, head_dim, attention, experts, shared, topk, moe_size, first_k, vocab, tied, mtp,
     kinds) = EXPECTED[name]
    s = spec_of(name)
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.attention) == \
        (hidden, layers, heads, kv, head_dim, attention)
    assert (s.vocab_size, s.tie_word_embeddings, s.mtp_layers) == (vocab, tied, mtp)
    assert (s.num_dense_layers, s.num_moe_layers) == kinds
    assert len(s.layer_kinds) == layers
    if experts is None:
        assert s.moe is None
    else:
        m = s.moe
        assert (m.num_experts, m.num_shared_experts, m.experts_per_token, m.moe_intermediate_size,
                m.first_k_dense) == (experts, shared, topk, moe_size, first_k)
    json.dumps(s.to_dict(), allow_nan=False)


def test_family_details():
    glm = spec_of("zai-org__GLM-4.5-Air")
    assert glm.qkv_bias and not glm.o_bias and not glm.qk_norm
    assert glm.rope.partial_rotary_factor == 0.5 and glm.rope.theta == 1e6 and glm.rope.scaling is None
    assert glm.moe.router_bias and glm.moe.norm_topk_prob and (glm.moe.n_group, glm.moe.topk_group) == (1, 1)
    assert glm.layer_kinds[:2] == ("dense", "moe")
    solar = spec_of("upstage__Solar-Open-100B")
    assert not solar.qkv_bias and solar.moe.router_bias and solar.moe.n_group is None
    assert solar.rope.scaling == {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 65536}
    v3 = spec_of("deepseek-ai__DeepSeek-V3")
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_rope_head_dim, v3.qk_nope_head_dim, v3.v_head_dim) == \
        (1536, 512, 64, 128, 128)
    assert v3.moe.router_bias and v3.moe.scoring_func == "sigmoid" and v3.moe.routed_scaling_factor == 2.5
    assert v3.layer_kinds[:4] == ("dense", "dense", "dense", "moe")
    v2 = spec_of("deepseek-ai__DeepSeek-V2")
    assert not v2.moe.router_bias and v2.moe.shared_expert_intermediate_size == 2 * 1536
    qwen2 = spec_of("Qwen__Qwen2-57B-A14B")
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.moe.shared_expert_gate
    assert qwen2.moe.shared_expert_intermediate_size == 20480 and qwen2.moe.norm_topk_prob is False
    qwen3 = spec_of("Qwen__Qwen3-30B-A3B")
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.moe.mlp_only_layers == ()
    phi = spec_of("microsoft__Phi-3.5-MoE-instruct")
    assert phi.norm == "layernorm" and phi.qkv_bias and phi.o_bias and phi.lm_head_bias   # config says rms_norm_eps
    assert phi.rope.scaling["type"] == "longrope" and len(phi.rope.scaling["long_factor"]) == 64
    llama = spec_of("meta-llama__Llama-3.1-8B")
    assert llama.norm == "rmsnorm" and llama.rope.theta == 500000.0 and llama.rope.scaling["rope_type"] == "llama3"
    assert llama.attention == "GQA" and llama.head == "lm_head" and llama.position_embedding == "rope"


def test_minilm_is_an_encoder(minilm):
    s = normalise(json.loads((Path(minilm) / "config.json").read_text()))
    assert (s.model_type, s.encoder_only, s.head, s.norm, s.position_embedding) == \
        ("bert", True, "base", "layernorm", "absolute")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.head_dim, s.attention) == (384, 6, 12, 32, "MHA")
    assert (s.type_vocab_size, s.max_position_embeddings, s.vocab_size) == (2, 512, 30522)
    assert s.qkv_bias and s.o_bias and s.mlp_bias and not s.mlp_gated and s.rope is None


# ------------------------------------------------------------------------------------------- aliases

BASE = {"model_type": "some_new_moe", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 1000, "intermediate_size": 512}


@pytest.mark.parametrize("experts_key", F.ALIASES["num_experts"])
@pytest.mark.parametrize("topk_key", ["num_experts_per_tok", "moe_topk", "num_experts_per_token"])
def test_expert_aliases(experts_key, topk_key):
    s = normalise({**BASE, experts_key: 16, topk_key: 4, "moe_intermediate_size": 64})
    assert (s.moe.num_experts, s.moe.experts_per_token, s.moe.moe_intermediate_size) == (16, 4, 64)


@pytest.mark.parametrize("shared_key", F.ALIASES["num_shared_experts"])
def test_shared_expert_aliases(shared_key):
    s = normalise({**BASE, "n_routed_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                   shared_key: 2})
    assert (s.moe.num_shared_experts, s.moe.shared_expert_intermediate_size) == (2, 128)


def test_raw_gpt2_style_keys():
    s = normalise({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
                   "n_positions": 32, "n_inner": None, "layer_norm_epsilon": 1e-5})
    assert (s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size) == (64, 2, 4, 256)
    assert (s.norm, s.position_embedding, s.max_position_embeddings, s.tie_word_embeddings) == \
        ("layernorm", "absolute", 32, True)


def test_unknown_model_type_is_normalised_from_raw_fields():
    s = normalise({**BASE, "model_type": "brand_new_arch", "layer_norm_eps": 1e-5})
    assert not s.known_family and s.model_type == "brand_new_arch"
    assert s.norm == "layernorm" and s.attention == "GQA" and s.head_dim == 32
    assert any("not in the family table" in n for n in s.notes)


def test_auto_map_is_data_only():
    cfg = load("deepseek-ai__DeepSeek-V3")
    assert "auto_map" in cfg
    assert normalise(cfg).model_type == "deepseek_v3"


def test_moe_layer_rules_follow_the_key_that_set_them():
    # Qwen-MoE: layer i is MoE when (i+1) % decoder_sparse_step == 0 and i is not in mlp_only_layers
    q = normalise({**BASE, "model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2,
                   "decoder_sparse_step": 2, "mlp_only_layers": [3], "num_hidden_layers": 6})
    assert q.layer_kinds == ("dense", "moe", "dense", "dense", "dense", "moe")
    # DeepSeek: i >= first_k_dense_replace and i % moe_layer_freq == 0
    d = normalise({**BASE, "model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 64, "first_k_dense_replace": 1, "moe_layer_freq": 2,
                   "num_hidden_layers": 6})
    assert d.layer_kinds == ("dense", "dense", "moe", "dense", "moe", "dense")


def test_multi_query_flag():
    s = normalise({**BASE, "model_type": "x", "num_key_value_heads": None, "multi_query": True})
    assert (s.num_kv_heads, s.attention) == (1, "MQA")


def test_rope_parameters_v5_layout():
    s = normalise({**BASE, "model_type": "llama", "rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}})
    assert s.rope.theta == 500000.0 and s.rope.scaling == {"rope_type": "llama3", "factor": 8.0}
    plain = normalise({**BASE, "model_type": "llama", "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope.theta == 1e4 and plain.rope.scaling is None


def test_tables_are_read_only_and_normalising_leaks_nothing():
    with pytest.raises(TypeError):
        F.ALIASES["hidden_size"] = ("x",)          # type: ignore[index]
    with pytest.raises(TypeError):
        F.FAMILIES["glm4_moe"]["o_bias"] = True    # type: ignore[index]
    before = normalise({**BASE, "model_type": "llama", "attention_bias": True})
    normalise(load("zai-org__GLM-4.5-Air"))
    normalise(load("microsoft__Phi-3.5-MoE-instruct"))
    after = normalise({**BASE, "model_type": "llama", "attention_bias": True})
    assert before == after and after.o_bias and after.norm == "rmsnorm"


# ------------------------------------------------------------------------------------------- multimodal

LLAVA = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
         "text_config": {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
                         "vocab_size": 1000},
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "intermediate_size": 256, "patch_size": 14,
                           "image_size": 224},
         "tie_word_embeddings": False}


def test_multimodal_text_backbone_and_vision_summary():
    s = normalise(LLAVA)
    assert s.model_type == "llava" and s.backbone_model_type == "llama" and s.known_family
    assert (s.hidden_size, s.num_layers, s.num_kv_heads, s.tie_word_embeddings) == (256, 2, 2, False)
    assert s.vision == {"model_type": "clip_vision_model", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                        "intermediate_size": 256, "patch_size": 14, "image_size": 224, "num_channels": None}
    json.dumps(s.to_dict(), allow_nan=False)


def test_text_config_errors_name_the_sub_config():
    bad = {**LLAVA, "text_config": {**LLAVA["text_config"], "num_key_value_heads": 3}}
    with pytest.raises(ConfigError, match=r"^cfg\.json: text_config: num_attention_heads \(4\) is not divisible"):
        normalise(bad, where="cfg.json")


# ------------------------------------------------------------------------------------------- contradictions

BAD = [
    ({"hidden_size": 4000, "num_attention_heads": 96, "num_key_value_heads": 8},
     "hidden size (4000) is not divisible by num_attention_heads (96) and no head_dim is given"),
    ({"num_key_value_heads": 3},
     "num_attention_heads (8) is not divisible by num_key_value_heads (3): query heads must split evenly over KV "
     "heads"),
    ({"hidden_size": 0}, "hidden_size is 0; it must be positive"),
    ({"vocab_size": -5}, "vocab_size is -5; it must be positive"),
    ({"intermediate_size": 20_000_000}, "intermediate_size is 20000000, above the plausible maximum 10,000,000; "
                                        "check the config for a typo"),
    ({"num_hidden_layers": 20_000}, "num_hidden_layers is 20000, above the plausible maximum 10,000; check the "
                                    "config for a typo"),
    ({"hidden_size": "4096"}, "hidden_size is '4096'; expected a whole number"),
    ({"hidden_size": 256.5}, "hidden_size is 256.5; expected a whole number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings is 'yes'; expected true or false"),
    ({"num_local_experts": 4, "num_experts_per_tok": 8}, "num_experts_per_tok is 8, more than the 4 experts"),
    ({"num_local_experts": 4}, "num_local_experts is 4 but no experts-per-token field (looked for "
                               "num_experts_per_tok, num_experts_per_token, moe_topk, moe_k, num_selected_experts, "
                               "top_k_experts)"),
    ({"hidden_size": None}, "no hidden size field (looked for hidden_size, n_embd, d_model, model_dim, dim); the "
                            "architecture cannot be described without it"),
    ({"kv_lora_rank": 64}, "kv_lora_rank is set (multi-head latent attention) but qk_rope_head_dim, "
                           "qk_nope_head_dim or v_head_dim is missing"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor is 1.5; it must lie in (0, 1]"),
]


@pytest.mark.parametrize("change, problem", BAD)
def test_contradictions_raise_config_error(change, problem):
    with pytest.raises(ConfigError) as info:
        normalise({**BASE, **change}, where="m/config.json")
    assert str(info.value) == f"m/config.json: {problem}"
    assert info.value.where == "m/config.json" and isinstance(info.value, ValueError)


def test_glm_head_layout_is_valid():
    s = spec_of("zai-org__GLM-4.5-Air")
    assert s.num_heads * s.head_dim == 12288 != s.hidden_size


def test_non_dict_config():
    with pytest.raises(ConfigError, match="config is a list"):
        normalise([1, 2])   # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- inventory checks

def _inv(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, "BF16", v, "x.safetensors", 0, 2 * max(1, __import__("math").prod(v)))
            for k, v in shapes.items()}


def test_minilm_config_agrees_with_its_tensors(minilm):
    s = normalise(json.loads((Path(minilm) / "config.json").read_text()))
    assert check_against_inventory(s, header_inventory(Path(minilm) / "model.safetensors")) == []


def test_inventory_disagreements_are_reported():
    s = normalise({**BASE, "model_type": "llama"})
    inv = _inv({"model.embed_tokens.weight": (1024, 256), "lm_head.weight": (1000, 128),
                **{f"model.layers.{i}.mlp.up_proj.weight": (512, 256) for i in range(3)}})
    assert check_against_inventory(s, inv) == [
        "model.embed_tokens.weight: 1,024 rows but config.json vocab_size is 1,000",
        "lm_head.weight: shape [1000, 128] but config.json implies [1000, 256]",
        "inventory: decoder layers 0..2 (3) but config.json has 4 layers",
    ]


def test_inventory_mtp_and_expert_counts():
    glm = spec_of("zai-org__GLM-4.5-Air")
    base = {"model.embed_tokens.weight": (151552, 4096)}
    layers = {f"model.layers.{i}.input_layernorm.weight": (4096,) for i in range(46)}
    experts = {f"model.layers.1.mlp.experts.{e}.up_proj.weight": (1408, 4096) for e in range(64)}
    msgs = check_against_inventory(glm, _inv({**base, **layers, **experts}))
    assert msgs == ["inventory: config.json declares 1 MTP layer(s) after layer 45 but the checkpoint has none "
                    "(MTP dropped)", "inventory: 64 routed experts per MoE layer but config.json has 128"]
    with_mtp = {**base, **layers, "model.layers.46.embed_tokens.weight": (151552, 4096),
                "model.layers.1.mlp.experts.gate_up_proj": (128, 2816, 4096)}
    assert check_against_inventory(glm, _inv(with_mtp)) == []


def test_per_layer_moe_pattern_list():
    s = normalise({**BASE, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_layer_freq": [0, 1, 1, 0]})
    assert s.layer_kinds == ("dense", "moe", "moe", "dense")
    with pytest.raises(ConfigError, match=r"moe_layer_freq lists 3 layers but there are 4"):
        normalise({**BASE, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_layer_freq": [0, 1, 1]})
