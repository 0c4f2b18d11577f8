"""MoE upcycled from unit slices (LLaMA-MoE, fine-grained upcycling): derived, relation upcycled, the slice map exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_provenance.alignment.experts import expert_plan
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.slices import describe
from hf_provenance.alignment.units import unit_plan
from hf_provenance.compare import compare
from hf_provenance.factory import apply_transform
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.sources import open_model
from hf_provenance.statistics.tensor import summarize
from hf_provenance.statistics.thresholds import load as load_thresholds

TH = load_thresholds()
MLP = ("ffn_gate", "ffn_up", "ffn_down")
LAYERS, UNITS = 4, 256                          # the llama factory recipe: 4 layers of 256 intermediate units
CASES = {                                       # params, units per expert, noise
    "partition": ({"n_experts": 4}, 64, 0.0),
    "two copies per slice": ({"n_experts": 8, "slices": 4}, 64, 0.0),
    "shuffled units, noise": ({"n_experts": 4, "slices": 2, "noise": 0.3, "shuffle": True}, 128, 0.3),
}


def truth_of(folder) -> dict:
    return json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]["units"]


def clears(t) -> bool:
    r, z = t.pearson.value, t.pearson.z
    return bool(t.evidence and r is not None and z is not None and abs(r) >= TH.r_derived and abs(z) >= TH.z_derived)


def test_transform_cuts_each_expert_from_its_slice(make):
    base, folder = make("llama"), make("llama", "upcycle_slices", n_experts=8, slices=4)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["intermediate_size"] == 64
    truth = truth_of(folder)
    assert truth["layer2"][5] == truth["layer2"][1] == list(range(64, 128))      # expert e = slice e mod 4
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{folder}/model.safetensors")
    for e, units in enumerate(truth["layer2"]):
        moe = f"model.layers.2.block_sparse_moe.experts.{e}."
        assert torch.equal(b[moe + "w1.weight"], a["model.layers.2.mlp.gate_proj.weight"][units])
        assert torch.equal(b[moe + "w3.weight"], a["model.layers.2.mlp.up_proj.weight"][units])
        assert torch.equal(b[moe + "w2.weight"], a["model.layers.2.mlp.down_proj.weight"][:, units])
    shuffled = truth_of(make("llama", "upcycle_slices", n_experts=4, shuffle=True))["layer0"]
    assert sorted(sum(shuffled, [])) == list(range(UNITS)) and shuffled[0] != list(range(64))
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.arange(5, 29)[None]).logits).all()


@pytest.mark.parametrize("case", list(CASES))
def test_unit_slice_upcycling_recovers_the_slice_map(make, case):
    params, size, noise = CASES[case]
    folder = make("llama", "upcycle_slices", **params)
    truth = truth_of(folder)
    base, model = open_model(make("llama")), open_model(folder)
    plan = identity_plan(base, model)[0]
    assert not [p for p in plan.pairs if p.key.role in MLP]
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    ex = summary["experts"]
    assert ex["upcycled_layers"] == ex["recovered"] == LAYERS and ex["applied"]
    assert lines[0].startswith(f"upcycling from unit slices: expert units matched to the dense MLP's units in "
                               f"{LAYERS}/{LAYERS} layers")
    n_exp = params["n_experts"]
    for layer in ex["slices"]["layers"]:
        units = truth[f"layer{layer['layer']}"]
        assert layer["recovered"] and layer["heldout_r"]["z"] > TH.z_derived and layer["coverage"] == 1.0
        assert layer["distinct_slices"] == params.get("slices", n_exp)
        for e in range(n_exp):
            got = layer["experts"][str(e)]
            assert {k: got[k] for k in ("slice", "in_order", "distinct", "units")} == describe(np.array(units[e]))
            if not params.get("shuffle"):
                s = e % layer["distinct_slices"]
                assert got["slice"] == [s * size, (s + 1) * size] and got["in_order"]
    # the unit map itself, as the plan carries it: each expert's gate/up rows and down columns of the dense MLP
    mlp = [p for p in new.pairs if p.key.role in MLP]
    assert len(mlp) == LAYERS * n_exp * 3
    for p in mlp:
        e = int(p.cand_name.split(".experts.")[1].split(".")[0])
        taken = p.base_cols if p.key.role == "ffn_down" else p.base_rows
        assert taken.tolist() == truth[f"layer{p.layer}"][e]
    evidence = [p for p in mlp if p.evidence]          # every dense row counted once, whatever the copies
    assert len(evidence) == LAYERS * 2 * params.get("slices", n_exp)
    assert {p.key.role for p in evidence} == {"ffn_gate", "ffn_up"}
    tensors = [summarize(m) for m in measure_plan(new, base, model, fraction=None, seed=0)]
    ffn = [t for t in tensors if t.component == "dense_mlp"]
    assert len(ffn) == len(mlp)
    assert all(t.pearson.value == pytest.approx(1 / np.sqrt(1 + noise ** 2), abs=0.03) for t in ffn)
    assert all(clears(t) for t in ffn if t.evidence)
    assert unit_plan(base, model, new, seed=0) is None        # the units inside each expert are in place
    c = compare(folder, [make("llama")]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and "upcycled" in c["relation"], c["reasons"]
    assert c["alignment"]["experts"]["slices"]["layers"][0]["recovered"]


def test_independent_dense_model_upcycled_the_same_way_is_not_derived(make, tmp_path):
    folder = apply_transform(make("llama", "independent"), tmp_path / "moe", "upcycle_slices", n_experts=8,
                             slices=4)
    base, model = open_model(make("llama")), open_model(str(folder))
    plan = identity_plan(base, model)[0]
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    ex = summary["experts"]
    assert ex["recovered"] == ex["upcycled_layers"] == 0 and not ex["applied"]
    for layer in ex["slices"]["layers"]:
        assert not layer["recovered"] and layer["heldout_r"]["z"] < TH.z_derived and layer["coverage"] < 0.8
    assert not [p for p in new.pairs if p.key.role in MLP]
    forced = expert_plan(base, model, plan, seed=0, apply_all=True)[0]
    tensors = [summarize(m) for m in measure_plan(forced, base, model, fraction=None, seed=0)]
    assert [t for t in tensors if t.component == "dense_mlp" and t.evidence]
    assert not [t.name for t in tensors if clears(t)]
    c = compare(str(folder), [make("llama")]).to_dict()["comparisons"][0]
    assert c["verdict"] == "independent" and "upcycled" not in c["relation"], c["reasons"]
