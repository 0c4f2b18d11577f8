"""Mixture-of-experts: shuffled experts, router consistency, upcycling, independent MoEs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_provenance.alignment.experts import expert_plan, gram_sketch
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.units import unit_plan
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.sources import open_model
from hf_provenance.statistics import aggregate
from hf_provenance.statistics.tensor import summarize
from hf_provenance.statistics.thresholds import load as load_thresholds
from hf_provenance.verdict import decide

TH = load_thresholds()
MLP = ("ffn_gate", "ffn_up", "ffn_down")


def perms_of(folder) -> dict:
    return json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]["perms"]


def measure(plan, base, model):
    tensors = [summarize(m) for m in measure_plan(plan, base, model, fraction=None, seed=0)]
    comps = aggregate.by(tensors, lambda t: t.component, TH)
    verdict = decide(tensors, comps, TH, aligned_params=plan.compared_params, containment={}, sampled=False,
                     not_compared=[])
    return tensors, verdict


def clears(t) -> bool:
    r, z = t.pearson.value, t.pearson.z
    return bool(t.evidence and r is not None and z is not None and abs(r) >= TH.r_derived and abs(z) >= TH.z_derived)


def opened(base_dir, model_dir):
    base, model = open_model(str(base_dir)), open_model(str(model_dir))
    return base, model, identity_plan(base, model)[0]


def logits(folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_gram_sketch_ignores_unit_order_and_scale():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(96, 32, generator=g)
    c = torch.exp(torch.randn(96, 1, generator=g))
    moved = (s * c)[torch.randperm(96, generator=g)]
    assert torch.allclose(gram_sketch(s), gram_sketch(moved), atol=1e-5)


@pytest.mark.parametrize("family, variant, base_family", [
    ("qwen3_moe", "shuffle_experts", None), ("deepseek_v3", "shuffle_experts", None), ("llama", "upcycle", None),
])
def test_expert_transforms_preserve_the_function(make, family, variant, base_family):
    ref, got = logits(make(family)), logits(make(family, variant))
    assert torch.allclose(ref, got, atol=1e-4), float((ref - got).abs().max())


def test_upcycle_writes_a_mixtral(make):
    folder = Path(make("llama", "upcycle", experts=4))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4
    meta = json.loads((folder / "factory.json").read_text())
    assert meta["truth"]["relation"] == ["upcycled"] and meta["truth"]["direction_evident"]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_shuffled_experts_matched_exactly_and_router_consistent(make, family):
    folder = make(family, "shuffle_experts")
    base, model, plan = opened(make(family), folder)
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    json.dumps(summary, allow_nan=False)
    ex = summary["experts"]
    assert ex["aligned_params"] == ex["searched_params"] > 0
    perms = perms_of(folder)
    for layer in ex["layers"]:
        truth = np.argsort(perms[f"layer{layer['layer']}.experts"])
        assert layer["map"] == {str(e): int(m) for e, m in enumerate(truth)}
        assert layer["recovered"] and layer["router_consistent"]
        assert min(layer["similarity"].values()) > 0.999 and not layer["unmatched_model_experts"]
        assert layer["router_r"]["value"] > 0.999 and layer["router_r"]["z"] > TH.z_derived
    assert ex["matched"] == ex["base_experts"] and ex["router_consistent"] == ex["router_checked"] == len(ex["layers"])
    assert lines[0].startswith(f"routed experts: matched {ex['matched']}/{ex['matched']}")
    assert "router consistent" in lines[0]
    if family == "deepseek_v3":
        assert any(line.startswith("shared experts: Gram r = 1.00") for line in lines)
    tensors, verdict = measure(new, base, model)
    moe = [t for t in tensors if t.component in ("routed_experts", "router") and len(t.shape) == 2]
    assert moe and all(t.pearson.value > 0.999 for t in moe)
    assert all(not t.evidence for t in moe if "down_proj" in t.name)      # the expert map was fitted on these
    assert verdict.verdict in ("identical", "derived")
    assert unit_plan(base, model, new, seed=0) is None                  # units inside experts are in place


def test_shuffled_permuted_noisy_moe_recovered_then_units(make, tmp_path):
    """Experts shuffled, units and heads permuted inside, then noise: experts first, then units, then derived."""
    from hf_provenance.factory import apply_transform

    shuffled = make("qwen3_moe", "shuffle_experts")
    folder = apply_transform(shuffled, tmp_path / "both", "permute_units", noise=0.5)
    base, model, plan = opened(make("qwen3_moe"), folder)
    plan, summary, _ = expert_plan(base, model, plan, seed=0)
    perms = perms_of(shuffled)
    for layer in summary["experts"]["layers"]:
        truth = np.argsort(perms[f"layer{layer['layer']}.experts"])
        assert layer["map"] == {str(e): int(m) for e, m in enumerate(truth)} and layer["router_consistent"]
    new, units, lines = unit_plan(base, model, plan, seed=0)
    assert units["units"]["recovered"] == units["units"]["batches"] and units["heads"]["recovered"] == 2
    tensors, verdict = measure(new, base, model)
    assert verdict.verdict == "derived", verdict.reasons
    gate_up = [t for t in tensors if t.component == "routed_experts" and t.evidence]
    assert len(gate_up) == 16 and all(clears(t) for t in gate_up)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_independent_moes_stay_independent(make, family):
    base, model, plan = opened(make(family), make(family, "independent"))
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    ex = summary["experts"]
    assert ex["recovered"] == 0 and not ex["applied"] and ex["router_consistent"] == 0
    for layer in ex["layers"]:
        assert layer["heldout_r"]["z"] < TH.z_derived
        for name in ("agreement", "router_agreement"):
            assert layer[name]["p"] >= 0.01
    assert [p.cand_name for p in new.pairs] == [p.cand_name for p in plan.pairs]   # nothing applied
    forced = expert_plan(base, model, plan, seed=0, apply_all=True)[0]
    tensors, _ = measure(forced, base, model)
    assert not [t.name for t in tensors if clears(t)]


def test_upcycled_model_matches_every_expert_to_the_dense_mlp(make):
    folder = make("llama", "upcycle", noise=0.3)
    base, model, plan = opened(make("llama"), folder)
    assert not [p for p in plan.pairs if p.key.role in MLP]              # the identity plan pairs no MLP
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    ex = summary["experts"]
    assert ex["upcycled_layers"] == 4 and ex["recovered"] == 4
    for layer in ex["layers"]:
        assert layer["upcycled"] and min(layer["model_similarity"].values()) > 0.9
        assert set(layer["model_best_base"].values()) == {-1}               # many-to-one onto the dense MLP
    assert lines[0].startswith("upcycling: the base's dense MLP matches every expert in 4/4 layers")
    mlp = [p for p in new.pairs if p.key.role in MLP]
    assert len(mlp) == 4 * 3 * 4
    evidence = [p for p in mlp if p.evidence]
    assert len(evidence) == 4 * 2 and all(p.key.role in ("ffn_gate", "ffn_up") for p in evidence)  # one copy counts
    left = {u.name for u in new.unmatched}
    assert not [n for n in left if "experts" in n or "mlp." in n]
    tensors, verdict = measure(new, base, model)
    assert verdict.verdict == "derived"
    ffn = [t for t in tensors if t.component == "dense_mlp"]
    assert all(t.pearson.value == pytest.approx(1 / np.sqrt(1.09), abs=0.03) for t in ffn)


def test_independent_dense_base_is_not_an_upcycling_source(make):
    base, model, plan = opened(make("llama", "independent"), make("llama", "upcycle", noise=0.3))
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    assert summary["experts"]["recovered"] == 0 and not summary["experts"]["applied"]
    assert not [p for p in new.pairs if p.key.role in MLP]


def test_expert_pruned_and_shuffled_moe_pairs_its_router_through_the_map(make, tmp_path):
    """One routed expert dropped per layer (router rows too), the rest shuffled: the routers differ in shape, so
    the identity plan cannot pair them; the expert map pairs the router rows it keeps."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from hf_provenance.compare import compare

    src, base = Path(make("qwen3_moe", "shuffle_experts")), make("qwen3_moe")
    dst = tmp_path / "dropped"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    cfg = json.loads((dst / "config.json").read_text())
    n = cfg["num_local_experts"]
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out = {}
    for k, v in sd.items():
        m = re.search(r"experts\.(\d+)\.", k)
        if m and int(m.group(1)) == n - 1:
            continue
        out[k] = (v[: n - 1] if k.endswith("mlp.gate.weight") else v).contiguous()
    cfg["num_local_experts"] = n - 1
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(dst / "model.safetensors"))
    d = compare(str(dst), [base]).to_dict()["comparisons"][0]
    assert d["verdict"] == "derived" and "permuted" in d["relation"]
    routers = [t for t in d["tensors"] if t["name"].endswith("mlp.gate.weight")]
    assert len(routers) == cfg["num_hidden_layers"] and all(t["pearson"]["value"] > 0.5 for t in routers)
    assert all(layer["router_consistent"] for layer in d["alignment"]["experts"]["layers"])


@pytest.mark.parametrize("family, variant", [("qwen3_moe", "pruned"), ("deepseek_v3", "pruned"),
                                             ("deepseek_v3", "upscaled")])
def test_experts_shuffled_after_a_layer_map_are_paired(make, tmp_path, family, variant):
    """A layer-pruned or up-scaled MoE whose routed experts were then shuffled. With one expert left in place, its
    tensors took the component's mean over r_derived, so the comparison was 'settled' and never searched
    experts: one routed expert at null level among matching ones now triggers the search. The search paired
    experts by layer *number* (the pruned base layer's against the model's), and a base layer repeated by the
    up-scaling had one pair for all its copies: it now follows the layer map, each model layer on its own."""
    from hf_provenance.compare import compare
    from hf_provenance.factory import apply_transform

    mapped = make(family, variant)
    shuffled = apply_transform(mapped, tmp_path / "shuffled", "shuffle_experts", seed=6)
    perms = json.loads((shuffled / "factory.json").read_text())["transform"]["plan"]["perms"]
    assert any(p != sorted(p) for p in perms.values())
    assert variant != "pruned" or any(p[0] == 0 for p in perms.values())
    c = compare(str(shuffled), [make(family)]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and {"permuted", variant} <= set(c["relation"])
    experts = [t for t in c["tensors"] if t["component"] == "routed_experts" and t["evidence"]]
    assert experts and all(t["pearson"]["value"] > 0.99 for t in experts)
    # experts are searched in the base layer the layer map chose: the pruned layer's never meet the model's
    # (they had been paired by layer number, and every model expert was measured twice)
    model_names = [t["model_name"] for t in c["tensors"]]
    assert len(model_names) == len(set(model_names))
    kept = {i for _, i, _ in c["alignment"]["layers"]["map"] if i is not None}
    assert {int(t["name"].split(".")[2]) for t in c["tensors"] if t["layer"] is not None} == kept
