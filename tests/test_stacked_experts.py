"""Routed experts stored stacked (transformers v5 `mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) on
one side or both: experts are searched, matched and paired expert by expert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_provenance.alignment import keys as K
from hf_provenance.alignment.experts import _unstack, expert_plan
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.compare import compare
from hf_provenance.factory import apply_transform
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.sources import open_model
from hf_provenance.statistics.tensor import summarize

STACKED = ("ffn_gate_up_exps", "ffn_down_exps")


def logits(folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(input_ids=ids).logits


def shuffled_stacked(make, family, tmp_path):
    return str(apply_transform(make(family, "stack_experts"), tmp_path / f"{family}-stacked-shuffled",
                               "shuffle_experts"))


def test_stack_experts_writes_v5_tensors_that_transformers_loads(make):
    base, folder = make("qwen3_moe"), make("qwen3_moe", "stack_experts")
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{folder}/model.safetensors")
    assert not [k for k in b if ".experts.0." in k]
    gate_up, down = b["model.layers.1.mlp.experts.gate_up_proj"], b["model.layers.1.mlp.experts.down_proj"]
    assert gate_up.shape == (4, 128, 64) and down.shape == (4, 64, 64)            # [E, 2I, H], [E, H, I]
    for e in range(4):
        head = f"model.layers.1.mlp.experts.{e}."
        assert torch.equal(gate_up[e], torch.cat([a[head + "gate_proj.weight"], a[head + "up_proj.weight"]]))
        assert torch.equal(down[e], a[head + "down_proj.weight"])
    assert torch.equal(logits(base), logits(folder))
    with pytest.raises(ValueError, match="stack_experts"):
        apply_transform(make("llama"), Path(folder).parent / "never", "stack_experts")


def test_unstack_follows_the_declared_layout():
    key = K.CanonicalKey("ffn_gate_up_exps", 3, None, "weight")
    views = _unstack(key, "gu", (4, 10, 7), layout_for("qwen3_moe"))
    assert views[2]["ffn_gate_exp"].rows.tolist() == list(range(20, 25))          # gate first, then up
    assert views[2]["ffn_up_exp"].rows.tolist() == list(range(25, 30))
    assert views[2]["ffn_up_exp"].key == K.CanonicalKey("ffn_up_exp", 3, 2, "weight")
    assert views[2]["ffn_up_exp"].shape == (5, 7)
    down = _unstack(K.CanonicalKey("ffn_down_exps", 3, None, "weight"), "d", (4, 7, 5), layout_for("qwen3_moe"))
    assert down[1]["ffn_down_exp"].rows.tolist() == list(range(7, 14))
    assert _unstack(key, "gu", (4, 7, 10), layout_for("gpt_oss")) is None          # [E, H, 2I]: not searched


@pytest.mark.parametrize("family, model_stacked, base_stacked", [
    ("qwen3_moe", True, False), ("qwen3_moe", True, True), ("qwen3_moe", False, True), ("deepseek_v3", True, False),
])
def test_shuffled_experts_matched_whatever_the_storage(make, tmp_path, family, model_stacked, base_stacked):
    folder = shuffled_stacked(make, family, tmp_path) if model_stacked else make(family, "shuffle_experts")
    base_dir = make(family, "stack_experts") if base_stacked else make(family)
    perms = json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]["perms"]
    base, model = open_model(base_dir), open_model(folder)
    plan = identity_plan(base, model)[0]
    new, summary, lines = expert_plan(base, model, plan, seed=0)
    ex = summary["experts"]
    assert ex["stacked_searched"] == sorted(STACKED) and not ex["stacked_not_searched"]
    assert ex["aligned_params"] == ex["searched_params"] > 0 and ex["matched"] == ex["base_experts"]
    for layer in ex["layers"]:
        truth = np.argsort(perms[f"layer{layer['layer']}.experts"])
        assert layer["map"] == {str(e): int(m) for e, m in enumerate(truth)}
        assert layer["recovered"] and layer["router_consistent"]
    experts = [p for p in new.pairs if p.key.role.startswith("ffn_") and p.key.role.endswith("_exp")]
    assert len(experts) == 3 * ex["base_experts"] and not [p for p in new.pairs if p.key.role in STACKED]
    assert not [u for u in new.unmatched if ".experts." in u.name]
    tensors = [summarize(m) for m in measure_plan(new, base, model, fraction=None, seed=0)]
    moe = [t for t in tensors if t.component == "routed_experts"]
    assert len(moe) == len(experts) and all(t.pearson.value > 0.9999 and t.frac_equal == 1.0 for t in moe)
    assert [t.evidence for t in moe].count(True) == 2 * ex["base_experts"]       # gate and up; down was fitted on
    c = compare(folder, [base_dir]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and "permuted" in c["relation"], c["reasons"]
    assert c["components"]["routed_experts"]["params"] == sum(t.numel for t in moe)


def test_stacked_copy_is_identical_to_per_expert_base(make):
    c = compare(make("qwen3_moe", "stack_experts"), [make("qwen3_moe")]).to_dict()["comparisons"][0]
    assert c["verdict"] == "identical" and c["relation"] == ["copy"], c["reasons"]
    assert not c["unmatched"] and c["components"]["routed_experts"]["params"] > 0
    assert any("paired expert by expert by index in 2 layers" in line for line in c["alignment"]["lines"])
    # what was compared: every weight of both checkpoints (the stacked experts too, not only the identity plan's)
    from hf_provenance.sources import open_model

    sizes = [sum(i.nbytes for i in open_model(f).inventory.values())
             for f in (make("qwen3_moe"), make("qwen3_moe", "stack_experts"))]
    assert c["io"]["bytes_total"] == sum(sizes)


def test_independent_stacked_moe_is_independent_with_its_experts_compared(make, tmp_path):
    folder = apply_transform(make("qwen3_moe", "independent"), tmp_path / "ind", "stack_experts")
    c = compare(str(folder), [make("qwen3_moe")]).to_dict()["comparisons"][0]
    assert c["verdict"] == "independent", c["reasons"]
    assert c["alignment"]["experts"]["recovered"] == 0 and c["alignment"]["experts"]["repaired_layers"] == 2
    assert c["components"]["routed_experts"]["params"] > 0 and not c["unmatched"]
