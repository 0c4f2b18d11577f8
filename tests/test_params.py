"""Parameter counts: analytic vs transformers on the meta device, published totals, inventory-based totals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_provenance.architecture.meta import auto_class_names, meta_layout
from hf_provenance.architecture.params import components, count_params
from hf_provenance.architecture.spec import normalise
from hf_provenance.sources.base import TensorInfo
from tests.test_architecture import EXPECTED, header_inventory, load, spec_of

REPO = Path(__file__).resolve().parents[1]


def approx(value: float, published: float, rel: float = 0.02) -> bool:
    return abs(value - published) <= rel * published


# ------------------------------------------------------------------------------------------- MiniLM (real weights)

def test_minilm_counts(minilm):
    spec = normalise(json.loads((Path(minilm) / "config.json").read_text()))
    assert count_params(spec).transformers_equivalent == 22_713_216
    inv = header_inventory(Path(minilm) / "model.safetensors")
    counts = count_params(spec, inventory=inv, cross_check=True)
    # transformers' BertModel.num_parameters(); the checkpoint also stores the 512-entry position_ids buffer
    assert counts.meta_checked is True and counts.meta_num_parameters == 22_713_216
    assert (counts.transformers_equivalent, counts.total_checkpoint, counts.buffers) == \
        (22_713_216, 22_713_728, 512)
    assert (counts.mtp, counts.quantization_scales, counts.source) == (0, 0, "inventory")
    assert counts.active_per_token == 22_713_216        # dense: everything is active
    assert counts.embedding == (30522 + 512 + 2) * 384
    assert counts.notes == ()
    json.dumps(counts.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------------------------- analytic == meta

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_analytic_count_equals_transformers_meta_count(name):
    spec = spec_of(name)
    layout, reason = meta_layout(spec.raw)
    assert reason is None, reason
    counts = count_params(spec, cross_check=True)
    assert counts.analytic_transformers_equivalent == layout.num_parameters
    assert counts.meta_checked is True and counts.transformers_equivalent == layout.num_parameters


TINY = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 211, "max_position_embeddings": 64}
TINY_FAMILIES = {
    "llama tied + biases": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                            "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    "llama base model": {"model_type": "llama", "architectures": ["LlamaModel"]},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 24},
    "gemma (config default tie)": {"model_type": "gemma", "architectures": ["GemmaForCausalLM"], "head_dim": 16,
                                   "hidden_act": "gelu_pytorch_tanh"},
    "phi3": {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "pad_token_id": 0},
    "gpt2 (own keys only)": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64,
                             "n_layer": 2, "n_head": 4, "n_inner": None, "n_positions": 32, "n_ctx": 32,
                             "vocab_size": 211, "bos_token_id": 0, "eos_token_id": 0},
    "bert masked-lm": {"model_type": "bert", "architectures": ["BertForMaskedLM"], "num_key_value_heads": None},
    "bert pretraining": {"model_type": "bert", "architectures": ["BertForPreTraining"], "num_key_value_heads": None},
    "bert classifier": {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
                        "num_key_value_heads": None, "id2label": {"0": "a", "1": "b", "2": "c"}},
    "roberta": {"model_type": "roberta", "architectures": ["RobertaModel"], "num_key_value_heads": None},
    "mixtral": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen2_moe sparse step + mlp_only": {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 2, "mlp_only_layers": [2], "num_hidden_layers": 4},
    "qwen3_moe": {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "deepseek_v2 without q_lora": {
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 2, "first_k_dense_replace": 1,
        "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4, "n_group": 2, "topk_group": 1},
    "deepseek_v3": {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4, "n_group": 2, "topk_group": 1, "num_nextn_predict_layers": 1},
    "glm4_moe": {"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 4,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                 "first_k_dense_replace": 1, "head_dim": 32, "attention_bias": True, "use_qk_norm": True},
    "phimoe": {"model_type": "phimoe", "architectures": ["PhiMoEForCausalLM"], "num_local_experts": 4,
               "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True},
}


@pytest.mark.parametrize("label", sorted(TINY_FAMILIES))
def test_tiny_family_configs_match_transformers(label):
    cfg = {**(TINY if "gpt2" not in label else {}), **TINY_FAMILIES[label]}
    spec = normalise(cfg)
    layout, reason = meta_layout(cfg)
    assert reason is None, reason
    assert count_params(spec).analytic_transformers_equivalent == layout.num_parameters, label


# ------------------------------------------------------------------------------------------- published totals
# (name, total, active, which active figure the publisher counts, source)
PUBLISHED = [
    ("zai-org__GLM-4.5-Air", 106e9, 12e9, "non_embedding",
     "zai-org GLM-4.5-Air model card / GLM-4.5 blog: 106B total, 12B active (matches the non-embedding count)"),
    ("deepseek-ai__DeepSeek-V3", 671e9, 37e9, "all", "DeepSeek-V3 technical report: 671B total, 37B activated"),
    ("mistralai__Mixtral-8x7B-v0.1", 46.7e9, 12.9e9, "all",
     "Mistral AI 'Mixtral of experts' blog: 46.7B total, 12.9B used per token"),
    ("Qwen__Qwen3-30B-A3B", 30.5e9, 3.3e9, "all", "Qwen3-30B-A3B model card: 30.5B total, 3.3B activated"),
    ("Qwen__Qwen2-57B-A14B", 57e9, 14e9, "all", "Qwen2 technical report: 57B total, 14B activated"),
    ("meta-llama__Llama-3.1-8B", 8.03e9, None, None, "HF safetensors metadata of meta-llama/Llama-3.1-8B: 8.03B"),
    ("mistralai__Mistral-7B-v0.1", 7.24e9, None, None, "HF safetensors metadata of Mistral-7B-v0.1: 7.24B"),
    ("upstage__SOLAR-10.7B-v1.0", 10.7e9, None, None, "SOLAR 10.7B paper (arXiv 2312.15166): 10.7B"),
    ("microsoft__Phi-3.5-MoE-instruct", 41.9e9, 6.6e9, "all",
     "Phi-3.5-MoE-instruct model card: 16x3.8B, 6.6B active; HF metadata 41.9B"),
    ("deepseek-ai__DeepSeek-V2", 236e9, 21e9, "all", "DeepSeek-V2 paper (arXiv 2405.04434): 236B total, 21B active"),
    ("upstage__Solar-Open-100B", 102.6e9, 12e9, "all",
     "Solar-Open-100B model card (SOURCES.md): 'Total Parameters: 102.6B', 'Active Parameters: 12B (per token)'"),
]


@pytest.mark.parametrize("name, total, active, kind, source", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_totals(name, total, active, kind, source):
    counts = count_params(spec_of(name))
    assert approx(counts.transformers_equivalent, total), (counts.transformers_equivalent, source)
    if active is not None:
        got = counts.active_per_token if kind == "all" else counts.active_non_embedding
        assert approx(got, active), (got, source)
    else:
        assert counts.active_per_token == counts.transformers_equivalent


def test_deepseek_v3_mtp_and_checkpoint_total():
    # README_WEIGHTS.md of deepseek-ai/DeepSeek-V3: 685B on the Hub = 671B main model + 14B MTP; the MTP module has
    # 11.5B unique parameters besides its copies of the 0.9B embedding and 0.9B output head.
    spec = spec_of("deepseek-ai__DeepSeek-V3")
    counts = count_params(spec)
    assert counts.transformers_equivalent == 671_026_404_352      # transformers 5.x num_parameters()
    assert approx(counts.total_checkpoint, 685e9, 0.01)
    embed = 129280 * 7168
    assert approx(counts.mtp - 2 * embed, 11.5e9)
    assert counts.buffers == 59 * 256                              # e_score_correction_bias, 58 MoE + 1 MTP layer
    assert counts.total_checkpoint == counts.transformers_equivalent + counts.mtp + counts.buffers
    assert any("MTP layers are not counted as active" in n for n in counts.notes)


def test_active_formula_is_exact_for_mixtral():
    counts = count_params(spec_of("mistralai__Mixtral-8x7B-v0.1"))
    expert = 3 * 4096 * 14336
    assert counts.routed_experts == 32 * 8 * expert
    assert counts.active_per_token == counts.transformers_equivalent - 32 * 6 * expert
    assert counts.active_non_embedding == counts.active_per_token - 2 * 32000 * 4096
    assert counts.active_counts_embeddings is True


def test_glm_components_add_up():
    spec = spec_of("zai-org__GLM-4.5-Air")
    comps = {c.name: c for c in components(spec)}
    assert comps["moe_experts"].instances == 128 and comps["moe_experts"].layers == 45
    assert comps["mlp_dense"].layers == 1 and comps["attn_q"].layers == 46
    assert comps["attn_q"].shapes == {"weight": (12288, 4096), "bias": (12288,)}
    assert comps["attn_o"].shapes == {"weight": (4096, 12288)}
    counts = count_params(spec)
    assert sum(counts.per_component.values()) == counts.transformers_equivalent == 106_852_245_504


# ------------------------------------------------------------------------------------------- inventory

def _info(name, shape, dtype="BF16"):
    return TensorInfo(name, dtype, tuple(shape), "x.safetensors", 0, max(1, math.prod(shape)))


def test_inventory_counts_fp8_scales_buffers_and_mtp():
    cfg = {**TINY, **TINY_FAMILIES["deepseek_v3"]}
    spec = normalise(cfg)
    analytic = count_params(spec)
    inv = {}
    for comp in components(spec):          # one tensor per part, layer and expert, named so layers >= 3 are MTP
        for layer in range(comp.layers):
            for i in range(comp.instances):
                prefix = (f"model.layers.{spec.num_layers + layer}.mtp" if comp.scope == "mtp"
                          else f"model.{comp.name}.{layer}.{i}")
                for part, shape in comp.parts:
                    if part not in comp.tied_parts:
                        inv[f"{prefix}.{part}"] = _info(f"{prefix}.{part}", shape)
    inv["model.layers.0.self_attn.o_proj.weight_scale_inv"] = _info("s", (1, 1), "F32")
    counts = count_params(spec, inventory=inv)
    assert counts.quantization_scales == 1
    assert counts.mtp == analytic.mtp
    assert counts.total_checkpoint == analytic.total_checkpoint + 1
    assert counts.buffers == analytic.buffers
    assert any("quantised checkpoint" in n for n in counts.notes)


def test_config_only_quantised_note():
    counts = count_params(spec_of("deepseek-ai__DeepSeek-V3"))
    assert counts.source == "config" and counts.quantization_scales == 0
    assert any("scale tensors are not counted" in n for n in counts.notes)


# ------------------------------------------------------------------------------------------- meta fallbacks

def test_llama_config_rejects_glm_head_layout_and_counts_still_work():
    cfg = {**load("zai-org__GLM-4.5-Air"), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    layout, reason = meta_layout(cfg)
    assert layout is None
    assert reason.startswith("transformers rejects the config: ") and "not a multiple" in reason
    counts = count_params(normalise(cfg), cross_check=True)
    assert counts.meta_checked is None and counts.transformers_equivalent > 100e9
    assert any(n.startswith("not cross-checked with transformers: transformers rejects") for n in counts.notes)


def test_unknown_model_type_has_no_meta_layout():
    layout, reason = meta_layout({"model_type": "not_a_real_family_xyz", "auto_map": {"AutoConfig": "evil.Cfg"}})
    assert layout is None and "does not know model_type 'not_a_real_family_xyz'" in reason
    assert meta_layout({})[1] == "config has no model_type"


def test_remote_code_is_never_used():
    layout, _ = meta_layout({**TINY, **TINY_FAMILIES["deepseek_v3"],
                             "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}})
    assert layout.model_class == "DeepseekV3ForCausalLM" and layout.auto_class == "AutoModelForCausalLM"
    assert type(layout).__module__ == "hf_provenance.architecture.meta"


@pytest.mark.parametrize("arch, first", [
    ("LlamaForCausalLM", "AutoModelForCausalLM"), ("GPT2LMHeadModel", "AutoModelForCausalLM"),
    ("BertForMaskedLM", "AutoModelForMaskedLM"), ("BertModel", "AutoModel"),
    ("LlavaForConditionalGeneration", "AutoModelForImageTextToText"), ("Weird", "AutoModelForCausalLM")])
def test_auto_class_table(arch, first):
    assert auto_class_names([arch])[0] == first


def test_deepseek_v3_meta_instantiation_stays_under_1_gib():
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(REPO)!r})
        from hf_provenance.architecture.meta import meta_layout
        cfg = json.load(open({str(REPO / 'tests/fixtures/configs/deepseek-ai__DeepSeek-V3/config.json')!r}))
        layout, reason = meta_layout(cfg)
        hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
        print(json.dumps({{"n": layout.num_parameters, "hwm_kb": int(hwm),
                           "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 671_026_404_352
    # VmHWM counts this process's pages since exec; ru_maxrss also carries the parent's RSS at fork time (a big
    # pytest process), so it is reported but not asserted
    assert result["hwm_kb"] < 1024 * 1024, result


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "bert"])
def test_transformers_equivalent_matches_transformers_for_factory_families(make, family):
    """The factory's real checkpoints: our count from config.json equals transformers' own num_parameters()."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from hf_provenance.architecture import count_params, normalise
    from hf_provenance.sources import open_model

    folder = make(family)
    cfg = json.load(open(f"{folder}/config.json"))
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    expected = auto.from_pretrained(folder).num_parameters()
    counts = count_params(normalise(cfg), inventory=open_model(folder).inventory)
    assert counts.transformers_equivalent == expected
