"""compare_specs on the comparisons people made about Solar-Open-100B, plus depth up-scaling and upcycling.

Every claim below was checked against the fixture configs: Solar-Open-100B (hidden 4096, 64 heads x 128, 8 KV heads,
48 MoE layers, 128 experts x 1280 + 1 shared, vocab 196608) and GLM-4.5-Air (hidden 4096, 96 heads x 128,
8 KV heads, 1 dense + 45 MoE layers, 128 experts x 1408 + 1 shared, vocab 151552, 1 MTP layer).
"""

from __future__ import annotations

import json

import pytest

from hf_provenance.architecture.compare import (AFTER_ALIGNMENT, DIRECT, NO_COUNTERPART, NOT_EVIDENCE_NOTE,
                                                compare_specs)
from hf_provenance.architecture.describe import describe_moe, describe_spec, human, sci
from hf_provenance.architecture.params import count_params
from hf_provenance.architecture.spec import normalise
from tests.test_architecture import LLAVA, spec_of

SOLAR = "upstage__Solar-Open-100B"


@pytest.fixture(scope="module")
def solar():
    return spec_of(SOLAR)


def cmp(a, b_name, labels=("Solar-Open-100B", "other")):
    return compare_specs(a, spec_of(b_name), labels=labels)


def test_solar_vs_glm_45_air(solar):
    c = cmp(solar, "zai-org__GLM-4.5-Air", ("Solar-Open-100B", "GLM-4.5-Air"))
    # same shapes: k/v projections (8 KV heads x 128 = 1024 rows), router (128 x 4096), norms
    for name in ("attn_k", "attn_v", "moe_router", "norm_attn", "norm_mlp", "final_norm"):
        assert c.component(name).shapes_match is True, name
    assert c.component("attn_k").a["weight"] == c.component("attn_k").b["weight"] == (1024, 4096)
    assert c.component("moe_router").a["weight"] == c.component("moe_router").b["weight"] == (128, 4096)
    # the router lives in MoE layers only: GLM's layer 0 is dense
    assert (c.component("moe_router").a_layers, c.component("moe_router").b_layers) == (48, 45)
    assert c.layer_kinds == {"dense": (0, 1), "moe": (48, 45)}
    # different shapes: q/o (64 vs 96 heads x 128), routed experts (1280 vs 1408 wide), embeddings (vocab)
    for name in ("attn_q", "attn_o", "moe_experts", "moe_shared_experts", "embed_tokens", "lm_head"):
        comp = c.component(name)
        assert comp.shapes_match is False and comp.status == AFTER_ALIGNMENT, name
    assert c.component("attn_q").a["weight"] == (8192, 4096) and c.component("attn_q").b["weight"] == (12288, 4096)
    assert c.component("attn_o").a["weight"] == (4096, 8192) and c.component("attn_o").b["weight"] == (4096, 12288)
    assert c.component("moe_experts").a["gate"] == (1280, 4096) and c.component("moe_experts").b["gate"] == (1408, 4096)
    assert c.component("embed_tokens").a["weight"] == (196608, 4096)
    assert c.component("embed_tokens").b["weight"] == (151552, 4096)
    assert "query heads 64x128 vs 96x128 (a head map bridges pruned or added heads)" in c.component("attn_q").reasons
    assert "bias only in GLM-4.5-Air" in c.component("attn_k").reasons
    # depth: 48 vs 46 decoder layers, GLM has one MTP layer on top
    assert c.depth == "depth differs: 48 vs 46 decoder layers (+1 MTP in GLM-4.5-Air)"
    assert c.component("mtp").status == NO_COUNTERPART
    assert c.component("final_norm").status == DIRECT
    assert c.component("attn_k").status == AFTER_ALIGNMENT          # same shapes, but a layer map is needed
    assert c.component("mlp_dense").status == AFTER_ALIGNMENT       # GLM's dense layer 0 vs Solar's experts
    assert c.field("hidden_size").match and not c.field("num_heads").match
    assert NOT_EVIDENCE_NOTE in c.notes


def test_solar_vs_mixtral(solar):
    c = cmp(solar, "mistralai__Mixtral-8x7B-v0.1")
    assert c.component("attn_k").shapes_match and c.component("attn_v").shapes_match   # 8 x 128 both
    assert not c.component("attn_q").shapes_match                                      # 64 vs 32 heads
    router = c.component("moe_router")
    assert router.a["weight"] == (128, 4096) and router.b["weight"] == (8, 4096) and not router.shapes_match
    assert "e_score_correction_bias only in Solar-Open-100B" in router.reasons
    experts = c.component("moe_experts")
    assert experts.b["gate"] == (14336, 4096) and (experts.a_instances, experts.b_instances) == (128, 8)
    assert "routed experts 128 vs 8 (an expert map bridges dropped or added experts)" in experts.reasons
    assert c.component("moe_shared_experts").status == NO_COUNTERPART       # Mixtral has no shared expert
    assert c.depth == "depth differs: 48 vs 32 decoder layers"


def test_solar_vs_deepseek_v2(solar):
    c = cmp(solar, "deepseek-ai__DeepSeek-V2")
    assert c.component("attn_q").status == NO_COUNTERPART     # q_proj vs MLA q_a/q_b
    assert c.component("attn_kv").status == NO_COUNTERPART and c.component("attn_k").status == NO_COUNTERPART
    assert c.component("attn_o").status == AFTER_ALIGNMENT    # (4096, 8192) vs (5120, 16384)
    assert c.component("norm_attn").a["weight"] == (4096,) and c.component("norm_attn").b["weight"] == (5120,)
    assert any(r.startswith("hidden size 4,096 vs 5,120") for r in c.component("embed_tokens").reasons)
    assert c.layer_kinds == {"dense": (0, 1), "moe": (48, 59)}
    assert c.depth == "depth differs: 48 vs 60 decoder layers"
    assert any("attention kinds differ (GQA vs MLA)" in n for n in c.notes)


def test_solar_vs_qwen2_57b(solar):
    c = cmp(solar, "Qwen__Qwen2-57B-A14B")
    assert c.component("attn_k").a["weight"] == (1024, 4096) and c.component("attn_k").b["weight"] == (512, 3584)
    shared = c.component("moe_shared_experts")
    assert shared.a["gate"] == (1280, 4096) and shared.b["gate"] == (20480, 3584)
    assert c.component("moe_shared_gate").status == NO_COUNTERPART      # only Qwen2-MoE gates its shared expert
    assert (c.component("moe_experts").a_instances, c.component("moe_experts").b_instances) == (128, 64)
    assert c.depth == "depth differs: 48 vs 28 decoder layers"


def test_depth_upscaling_mistral_to_solar_10_7b():
    c = compare_specs(spec_of("mistralai__Mistral-7B-v0.1"), spec_of("upstage__SOLAR-10.7B-v1.0"))
    per_layer = [x for x in c.components if x.scope in ("layer", "dense")]
    assert per_layer and all(x.shapes_match and x.status == AFTER_ALIGNMENT for x in per_layer)
    assert all(x.status == DIRECT for x in c.components if x.scope == "model")
    assert c.depth == "depth differs: 32 vs 48 decoder layers"


def test_upcycling_mistral_dense_to_mixtral_experts():
    c = compare_specs(spec_of("mistralai__Mistral-7B-v0.1"), spec_of("mistralai__Mixtral-8x7B-v0.1"))
    dense, experts = c.component("mlp_dense"), c.component("moe_experts")
    assert dense.status == experts.status == AFTER_ALIGNMENT
    assert dense.a == experts.b == {"gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
    assert any("upcycling" in r for r in dense.reasons)
    assert c.component("moe_router").status == NO_COUNTERPART
    assert any("upcycled from a dense model" in n for n in c.notes)


def test_self_comparison_is_all_direct(solar):
    c = compare_specs(solar, solar)
    assert {x.status for x in c.components} == {DIRECT} and all(f.match for f in c.fields)
    assert c.depth == "same depth: 48 decoder layers"


def test_vision_tower_has_no_counterpart():
    text_only = normalise({**LLAVA["text_config"], "tie_word_embeddings": False})
    c = compare_specs(normalise(LLAVA), text_only)
    assert c.component("vision_layers").status == NO_COUNTERPART
    assert c.component("attn_q").status == DIRECT


@pytest.mark.parametrize("other", ["zai-org__GLM-4.5-Air", "mistralai__Mixtral-8x7B-v0.1",
                                   "deepseek-ai__DeepSeek-V2", "Qwen__Qwen2-57B-A14B"])
def test_never_concludes_independence(solar, other):
    c = cmp(solar, other)
    text = json.dumps(c.to_dict(), allow_nan=False).lower()
    assert "from scratch" not in text and "trained independently" not in text
    assert text.count("independen") == text.count("not evidence of independence")
    assert NOT_EVIDENCE_NOTE in c.notes
    assert set(c.by_status) == {DIRECT, AFTER_ALIGNMENT, NO_COUNTERPART}


# ------------------------------------------------------------------------------------------- describe

def test_describe_glm_moe():
    spec = spec_of("zai-org__GLM-4.5-Air")
    text = describe_moe(spec, count_params(spec))
    assert text.startswith("128 routed + 1 shared experts, 8 routed active per token: C(128,8) ≈ 1.4e12 routing "
                           "combinations; MoE in 45 of 46 decoder layers (first 1 dense); 106.9B total, 13.4B active "
                           "(12.2B without embeddings)")
    assert text.endswith("plus 3.6B in the MTP block")


def test_describe_other_models():
    qwen = spec_of("Qwen__Qwen2-57B-A14B")
    assert "(shared expert 20,480 wide, expert width 2,560)" in describe_moe(qwen)
    mixtral = spec_of("mistralai__Mixtral-8x7B-v0.1")
    assert describe_moe(mixtral).startswith("8 routed experts, 2 routed active per token: C(8,2) ≈ 28 routing")
    assert describe_moe(spec_of("meta-llama__Llama-3.1-8B")) is None
    glm = spec_of("zai-org__GLM-4.5-Air")
    assert "GQA with 96 query / 8 KV heads x 128 (query width 12,288 != hidden 4,096)" in describe_spec(glm)
    v3 = spec_of("deepseek-ai__DeepSeek-V3")
    assert "MLA with 128 heads (q rank 1536, kv rank 512, qk 128+64 rope, v 128)" in describe_spec(v3)


@pytest.mark.parametrize("n, text", [(106_852_245_504, "106.9B"), (22_713_216, "22.7M"), (5120, "5,120"),
                                     (1.2e12, "1.2T")])
def test_human(n, text):
    assert human(n) == text


@pytest.mark.parametrize("x, text", [(1_430_257_188_141, "1.4e12"), (28, "28"), (9_960_000, "1.0e7"),
                                     (4_426_165_368, "4.4e9")])
def test_sci(x, text):
    assert sci(x) == text
