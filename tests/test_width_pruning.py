"""Width pruning (Minitron, Sheared-LLaMA): derived, relation pruned, the kept units and heads recovered exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.widths import grouped_subset, width_plan
from hf_provenance.compare import compare
from hf_provenance.factory import apply_transform
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.sources import open_model
from hf_provenance.statistics.tensor import summarize
from hf_provenance.statistics.thresholds import load as load_thresholds

TH = load_thresholds()
LAYERS, UNITS, HEADS, GROUPS, HD = 4, 256, 4, 2, 16     # the llama factory recipe
READERS = ("ffn_gate", "ffn_up", "attn_q", "attn_k", "attn_v")
WRITERS = ("ffn_down", "attn_output")
CASES = {                                                # params, units kept, heads kept, KV groups kept
    "units only, noise 0.3": ({"groups": 1.0, "noise": 0.3}, 128, HEADS, GROUPS),
    "heads only, noise 0.3": ({"units": 1.0, "noise": 0.3}, UNITS, 2, 1),
    "units and heads": ({}, 128, 2, 1),
    "units and heads, noise 0.3": ({"noise": 0.3}, 128, 2, 1),
}


def plan_of(folder) -> dict:
    return json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]


def rows(heads: list[int]) -> torch.Tensor:
    """The rows (columns of o_proj) of these heads or KV groups."""
    return (torch.tensor(heads)[:, None] * HD + torch.arange(HD)).reshape(-1)


def clears(t: dict) -> bool:
    r, z = t["pearson"]["value"], t["pearson"]["z"]
    return bool(t["evidence"] and r is not None and z is not None and abs(r) >= TH.r_derived
                and abs(z) >= TH.z_derived)


def test_transform_keeps_the_planned_units_and_whole_kv_groups(make):
    base, folder = make("llama"), make("llama", "width_pruned")
    cfg = json.loads((Path(folder) / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == \
        (128, 2, 1, HD)
    truth = plan_of(folder)
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{folder}/model.safetensors")
    shuffled = 0
    for layer in range(LAYERS):
        units, heads, groups = (truth[k][f"layer{layer}"] for k in ("units", "heads", "kv_groups"))
        assert len(set(units)) == 128 and set(units) <= set(range(UNITS))
        assert sorted(heads) == [g * 2 + j for g in groups for j in range(2)]       # whole groups, heads within
        shuffled += units != sorted(units)
        p = f"model.layers.{layer}."
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(b[p + f"mlp.{proj}.weight"], a[p + f"mlp.{proj}.weight"][units])
        assert torch.equal(b[p + "mlp.down_proj.weight"], a[p + "mlp.down_proj.weight"][:, units])
        assert torch.equal(b[p + "self_attn.q_proj.weight"], a[p + "self_attn.q_proj.weight"][rows(heads)])
        for proj in ("k_proj", "v_proj"):
            assert torch.equal(b[p + f"self_attn.{proj}.weight"], a[p + f"self_attn.{proj}.weight"][rows(groups)])
        assert torch.equal(b[p + "self_attn.o_proj.weight"], a[p + "self_attn.o_proj.weight"][:, rows(heads)])
    assert shuffled == LAYERS                                                    # kept units reordered
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert m.model.layers[0].mlp.down_proj.weight.shape == (64, 128)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.arange(5, 29)[None]).logits).all()


@pytest.mark.parametrize("case", list(CASES))
def test_width_pruned_copy_is_derived_with_the_kept_units_and_heads(make, case):
    params, n_units, n_heads, n_groups = CASES[case]
    folder = make("llama", "width_pruned", **params)
    truth = plan_of(folder)
    c = compare(folder, [make("llama")]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and "pruned" in c["relation"], c["reasons"]
    assert "permuted" not in c["relation"] and "finetune" not in c["relation"]
    assert c["direction"].startswith("model has fewer") and c["direction"].endswith("model derived from base")
    w = c["alignment"]["width"]
    assert w["applied"] and w["pruned_layers"] == LAYERS
    line = next(x for x in c["alignment"]["lines"] if x.startswith("width pruning: "))
    pruned_units, pruned_heads = n_units < UNITS, n_heads < HEADS
    assert (w["units"] is not None) == pruned_units and (w["heads"] is not None) == pruned_heads
    if pruned_units:
        assert f"MLP units {n_units}/{UNITS} kept in {LAYERS} layers (recovered map" in line
        for layer in w["units"]["layers"]:
            assert layer["recovered"] and layer["heldout_r"]["z"] >= TH.z_derived
            assert layer["kept"] == truth["units"][f"layer{layer['layer']}"]
    if pruned_heads:
        assert f"attention heads {n_heads}/{HEADS} (KV groups {n_groups}/{GROUPS}) kept in {LAYERS} layers" in line
        for layer in w["heads"]["layers"]:
            assert layer["recovered"] and layer["heldout_r"]["z"] >= TH.z_derived
            assert layer["kept"] == truth["heads"][f"layer{layer['layer']}"]
            assert layer["kv_groups"] == truth["kv_groups"][f"layer{layer['layer']}"]
    assert not c["unmatched"]                                   # every pruned tensor paired
    noise = params.get("noise", 0.0)
    for t in c["tensors"]:
        if t["component"] in ("dense_mlp", "attention") and len(t["shape"]) == 2:
            assert t["pearson"]["value"] == pytest.approx(1 / np.sqrt(1 + noise ** 2), abs=0.03), t["name"]
    pruned = [t for t in c["tensors"] if "fitted on" in " ".join(t["notes"] or [])]
    assert len(pruned) == LAYERS * ((3 if pruned_units else 0) + (4 if pruned_heads else 0))
    for t in pruned:
        writer = t["name"].endswith(("down_proj.weight", "o_proj.weight"))
        assert t["evidence"] != writer, t["name"]            # the map was fitted on the writers: not evidence
        assert writer or clears(t), t["name"]


def test_query_heads_pruned_within_groups_and_groups_reordered(make, tmp_path):
    """One query head kept per KV group, groups swapped: k/v keep their shape but must follow the group map."""
    base = make("llama")
    folder = tmp_path / "within"
    shutil.copytree(base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"], cfg["head_dim"] = 2, HD
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = load_file(f"{base}/model.safetensors")
    heads, groups = [3, 0], [1, 0]                       # model head 0 = base head 3 (group 1), head 1 = head 0
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.self_attn."
        sd[p + "q_proj.weight"] = sd[p + "q_proj.weight"][rows(heads)].contiguous()
        sd[p + "o_proj.weight"] = sd[p + "o_proj.weight"][:, rows(heads)].contiguous()
        for proj in ("k_proj", "v_proj"):
            sd[p + f"{proj}.weight"] = sd[p + f"{proj}.weight"][rows(groups)].contiguous()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    b, m = open_model(base), open_model(str(folder))
    plan = identity_plan(b, m)[0]
    assert any(p.key.role == "attn_k" for p in plan.pairs)           # same shape: paired, wrongly, by index
    new, summary, lines = width_plan(b, m, plan, seed=0)
    hw = summary["width"]["heads"]
    assert summary["width"]["units"] is None and hw["model_kv_groups"] == [GROUPS]
    assert lines[0].startswith(f"width pruning: attention heads 2/{HEADS} (KV groups {GROUPS}/{GROUPS}) kept in")
    for layer in hw["layers"]:
        assert layer["recovered"] and layer["kept"] == heads and layer["kv_groups"] == groups
    attn = [p for p in new.pairs if p.key.role in ("attn_q", "attn_k", "attn_v", "attn_output")]
    assert len(attn) == 4 * LAYERS
    tensors = [summarize(x) for x in measure_plan(new, b, m, fraction=None, seed=0)]
    assert all(t.pearson.value == pytest.approx(1.0, abs=1e-6) for t in tensors if t.component == "attention")
    c = compare(str(folder), [base]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and "pruned" in c["relation"], c["reasons"]


def test_grouped_subset_keeps_gqa_groups_together():
    rng = np.random.default_rng(0)
    # base: 4 groups of 3 heads; model: groups [2, 0] with 2 heads each, heads [8, 6] and [1, 0]
    truth_heads, truth_groups = np.array([8, 6, 1, 0]), np.array([2, 0])
    sim = rng.normal(0, 0.1, (4, 12))
    sim[np.arange(4), truth_heads] += 1.0
    heads, groups = grouped_subset(sim, 2, 3)
    assert heads.tolist() == truth_heads.tolist() and groups.tolist() == truth_groups.tolist()
    # a head that matches best in another group cannot leave its group: the group's total decides
    sim[0, 10] = 1.5
    heads, groups = grouped_subset(sim, 2, 3)
    assert groups.tolist() == [2, 0] and heads[0] // 3 == heads[1] // 3 == 2
    # multi-head attention (one head per group): a plain one-to-one assignment
    mha = rng.normal(0, 0.1, (3, 8))
    mha[[0, 1, 2], [5, 2, 7]] += 1.0
    assert [x.tolist() for x in grouped_subset(mha, 1, 1)] == [[5, 2, 7], [5, 2, 7]]


def test_independent_model_width_pruned_the_same_way_is_not_derived(make, tmp_path):
    folder = apply_transform(make("llama", "independent"), tmp_path / "pruned", "width_pruned")
    base, model = open_model(make("llama")), open_model(str(folder))
    plan = identity_plan(base, model)[0]
    new, summary, _ = width_plan(base, model, plan, seed=0)
    w = summary["width"]
    assert not w["applied"] and w["pruned_layers"] == 0 and w["containment"] is None
    for part in ("units", "heads"):
        for layer in w[part]["layers"]:
            assert not layer["recovered"] and layer["heldout_r"]["z"] < TH.z_derived
    assert len(new.pairs) == len(plan.pairs) and len(new.unmatched) == len(plan.unmatched)
    # even applied by force, the held-out readers measured through the fitted maps show nothing
    forced = width_plan(base, model, plan, seed=0, apply_all=True)[0]
    tensors = [summarize(x) for x in measure_plan(forced, base, model, fraction=None, seed=0)]
    readers = [t for t in tensors if t.key.startswith("blk.") and t.key.split(".")[2] in READERS]
    assert len(readers) == LAYERS * 5 and all(t.evidence for t in readers)
    assert not [t.name for t in readers if abs(t.pearson.value) >= TH.r_derived and abs(t.pearson.z) >= TH.z_derived]
    c = compare(str(folder), [make("llama")]).to_dict()["comparisons"][0]
    assert c["verdict"] in ("independent", "inconclusive") and "pruned" not in c["relation"], c["reasons"]
    assert c["alignment"]["width"]["units"]["recovered"] == 0


@pytest.mark.parametrize("seed, derived", [(0, True), (1, False)])
def test_layers_and_widths_pruned_together(make, tmp_path, seed, derived):
    """Layers dropped and every MLP and attention narrowed: no layer tensor keeps a shape, so the layer map comes
    from the writers' row Grams, and the width search pairs model layer j with its mapped base layer (it had paired
    layer numbers). Another seed's model, pruned the same way, has no layer above null level: never derived."""
    from hf_provenance.compare import compare
    from hf_provenance.factory import apply_transform

    model = apply_transform(make("llama", "pruned", seed=seed), tmp_path / "w", "width_pruned", seed=5)
    c = compare(str(model), [make("llama")]).to_dict()["comparisons"][0]
    layers = c["alignment"].get("layers") or {}
    if not derived:
        assert c["verdict"] != "derived" and not layers
        return
    assert c["verdict"] == "derived" and c["relation"] == ["pruned"]
    assert [i for _, i, _ in layers["map"]] == [0, 1, 3] and layers["sketch"]["gram_tensors"] == 14
    evidence = [t for t in c["tensors"] if t["component"] in ("dense_mlp", "attention") and t["evidence"]]
    assert {(t["name"].split(".")[2], t["layer"]) for t in evidence} == {("0", 0), ("1", 1), ("3", 2)}
    assert all(t["pearson"]["value"] > 0.95 for t in evidence)
