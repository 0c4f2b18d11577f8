"""Rotary row orders of Q/K and norm weights folded into the next matrices: transforms, recovery, independence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_provenance.alignment import rotary as R
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.compare import compare
from hf_provenance.factory import apply_transform
from hf_provenance.factory.transforms import _half_to_interleaved
from hf_provenance.statistics.thresholds import load as load_thresholds

TH = load_thresholds()
QK = ("self_attn.q_proj", "self_attn.k_proj")


def verdict_of(model, base, **kw) -> dict:
    d = compare(str(model), [str(base)], **kw).to_dict()
    json.dumps(d, allow_nan=False)
    return d["comparisons"][0]


def logits(folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(input_ids=ids).logits


def clears(t) -> bool:
    r, z = t["pearson"]["value"], t["pearson"]["z"]
    return bool(t["evidence"] and r is not None and z is not None and abs(r) >= TH.r_derived
                and abs(z) >= TH.z_derived)


def config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


# --- row maps ------------------------------------------------------------------------------------------------------

def test_order_maps_undo_the_gguf_converter_permutation_and_dedupe():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3 * 12, 5, generator=g)               # 3 heads of 12 rows, the first 8 rotate
    cand = _half_to_interleaved(base, 3, 12, 8)               # llama.cpp's reshape/swapaxes, independent of R
    blocks = R.RowBlocks(3, 12, 0, 8)
    assert torch.equal(cand[torch.from_numpy(R.row_map(blocks, R.HALF_TO_INTERLEAVED))], base)
    assert not torch.equal(cand[torch.from_numpy(R.row_map(blocks, R.INTERLEAVED_TO_HALF))], base)
    unrotated = torch.arange(36).reshape(3, 12)[:, 8:].reshape(-1)
    assert torch.equal(cand[unrotated], base[unrotated])
    m = R.order_map(8, R.HALF_TO_INTERLEAVED)
    assert np.array_equal(R.order_map(8, R.INTERLEAVED_TO_HALF), np.argsort(m))          # inverses
    # MLA-style span at the end of a block
    mla = R.RowBlocks(2, 6, 2, 4)
    assert R.row_map(mla, R.HALF_TO_INTERLEAVED).tolist() == [0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]
    # the multiplicity counts distinct maps only: r = 4 makes the two conversions one involution, r = 2 none
    assert list(R.candidate_maps(R.RowBlocks(1, 16, 0, 16))) == list(R.CANDIDATES)
    assert list(R.candidate_maps(R.RowBlocks(1, 4, 0, 4))) == [R.IDENTITY, R.HALF_TO_INTERLEAVED]
    assert list(R.candidate_maps(R.RowBlocks(1, 2, 0, 2))) == [R.IDENTITY]


# --- transforms ----------------------------------------------------------------------------------------------------

def test_fold_norms_preserves_the_function(make):
    base, folded = make("llama"), make("llama", "fold_norms")
    ref, got = logits(base), logits(folded)
    assert torch.allclose(ref, got, atol=1e-4), float((ref - got).abs().max())
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{folded}/model.safetensors")
    plan = json.loads((Path(folded) / "factory.json").read_text())["transform"]["plan"]
    norms = [k for k in a if k.endswith("norm.weight")]
    assert sorted(plan["folded"]) == sorted(norms) and not plan["unfolded"]
    assert all(torch.equal(b[k], torch.ones_like(a[k])) and not torch.equal(a[k], b[k]) for k in norms)
    for matrix, norm in plan["readers"].items():                # W·diag(g), column by column
        assert torch.allclose(b[matrix], a[matrix] * a[norm], rtol=1e-6, atol=0)
    assert set(plan["readers"]) == {k for k in a if any(x in k for x in (
        "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"))}
    assert all(torch.equal(a[k], b[k]) for k in a if "o_proj" in k or "down_proj" in k or "embed" in k)


def test_rotary_reorder_is_a_layout_mismatch_undone_by_the_inverse_row_map(make):
    base, moved = make("llama"), make("llama", "rotary_reorder")
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{moved}/model.safetensors")
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(any(x in k for x in QK) for k in changed) and len(changed) == 8
    cfg = config(base)
    layout = layout_for("llama")
    for k in changed:
        role = "attn_q" if "q_proj" in k else "attn_k"
        blocks = R.blocks_for(role, a[k].shape[0], cfg, layout)
        assert blocks is not None and blocks.length == cfg["head_dim"]
        assert torch.equal(b[k][torch.from_numpy(R.row_map(blocks, R.HALF_TO_INTERLEAVED))], a[k])
    # transformers runs it with rotate_half: without the reverse permutation the function differs
    assert not torch.allclose(logits(base), logits(moved), atol=1e-3)


# --- recovery through compare --------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise, sample", [(0.0, None), (0.5, None), (0.0, 0.5)])
def test_rotary_reordered_copy_is_derived_with_the_order_recovered(make, noise, sample):
    c = verdict_of(make("llama", "rotary_reorder", noise=noise), make("llama"), sample=sample)
    assert c["verdict"] == "derived" and "permuted" in c["relation"], c["reasons"]
    rot = c["alignment"]["rotary"]
    assert rot["applied"] and rot["chosen"] == R.HALF_TO_INTERLEAVED and rot["multiplicity"] == 3
    assert rot["recovered"] == rot["pairs"] == 8
    assert rot["mean_r"][R.IDENTITY] < 0.2                       # the stored order shows little
    assert all(t["p_bonferroni"] is not None and t["best"] == R.HALF_TO_INTERLEAVED for t in rot["tensors"])
    assert any(line.startswith("rotary row order: half→interleaved recovered in 8/8 q and k tensors (3 candidates "
                               "tried, multiplicity counted)") for line in c["alignment"]["lines"])
    qk = [t for t in c["tensors"] if any(x in t["name"] for x in QK)]
    assert len(qk) == 8 and all(clears(t) for t in qk)
    expect = 1.0 / np.sqrt(1 + noise ** 2)                      # Pearson of x and x + s·σ·ε
    assert all(t["pearson"]["value"] == pytest.approx(expect, abs=0.03) for t in qk), [t["pearson"] for t in qk]


def test_rotary_order_composes_with_a_head_permutation(make, tmp_path):
    """Heads shuffled (GQA groups) and rows reordered inside each head: the head map from attn_output first, the
    rotary map inside the heads after it; q/k meet exactly."""
    both = apply_transform(make("llama", "permute_units"), tmp_path / "both", "rotary_reorder")
    c = verdict_of(both, make("llama"))
    assert c["verdict"] == "derived" and "permuted" in c["relation"], c["reasons"]
    assert c["alignment"]["heads"]["applied"] and c["alignment"]["rotary"]["applied"]
    qk = [t for t in c["tensors"] if any(x in t["name"] for x in QK)]
    assert qk and all(t["pearson"]["value"] > 0.999 for t in qk), [(t["name"], t["pearson"]["value"]) for t in qk]


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_norm_folded_copy_is_derived_with_the_fold_recorded(make, noise):
    c = verdict_of(make("llama", "fold_norms", noise=noise), make("llama"))
    assert c["verdict"] == "derived", c["reasons"]
    fold = c["alignment"]["norms"]
    assert fold["applied"] and fold["folded"] == 9 and fold["folded_side"] == ["model"]
    recs = {r["norm"]: r for r in fold["norms"]}
    assert recs["model.norm.weight"]["readers"] == ["lm_head.weight"]
    assert sorted(recs["model.layers.0.input_layernorm.weight"]["readers"]) == [
        f"model.layers.0.self_attn.{x}_proj.weight" for x in "kqv"]
    line = next(x for x in c["alignment"]["lines"] if x.startswith("norm folding"))
    assert "attn_norm folded into q/k/v in 4 layers" in line and "ffn_norm folded into gate/up in 4 layers" in line
    readers = [t for t in c["tensors"] if any(x in t["name"] for x in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                       "up_proj", "lm_head"))]
    assert len(readers) == 21 and all(clears(t) for t in readers)
    norms = [t for t in c["tensors"] if t["name"].endswith("norm.weight")]
    assert all(not t["evidence"] and any("folded into" in n for n in t["notes"]) for t in norms)
    if noise == 0.0:
        # the recovered scales are the base's norm weights; with the fold undone the matrices meet to rounding
        assert fold["scale_r"]["min"] > 0.999 and fold["scale_r"]["p_cauchy"] <= 0.002
        assert all(1 - t["pearson"]["value"] < 1e-6 for t in readers)    # 1.7e-4 below without the undo
    else:
        assert fold["scale_r"]["mean"] > 0.2 and fold["scale_r"]["p_cauchy"] < 0.01
        layer = [t for t in readers if "lm_head" not in t["name"]]   # lm_head's row means take part of the std
        assert all(t["pearson"]["value"] == pytest.approx(1 / np.sqrt(1.25), abs=0.03) for t in layer)


# --- independent models stay independent --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [None, "rotary_reorder", "fold_norms"])
def test_independent_models_stay_independent_with_the_rotary_and_fold_searches(make, tmp_path, variant):
    other = make("llama", "independent")
    if variant is not None:
        other = apply_transform(other, tmp_path / variant, variant)
    c = verdict_of(other, make("llama"))
    assert c["verdict"] == "independent", c["reasons"]
    assert not [t["name"] for t in c["tensors"] if clears(t)]
    rot = c["alignment"]["rotary"]                               # the candidate set was tried, nothing applied
    assert rot is not None and not rot["applied"] and rot["multiplicity"] == 3
    assert max(abs(v) for v in rot["mean_r"].values()) < 0.05
    assert any("no candidate order shows a correspondence" in x for x in c["alignment"]["lines"])
    fold = c["alignment"].get("norms")
    if variant == "fold_norms":
        # the fold is seen (structure) but the scales do not track the base's norm weights beyond the null
        # that keeps the unfolded side's own coupling (a permutation of the scales themselves would not)
        assert fold["folded"] == 9 and fold["scale_r"]["p_cauchy"] > 0.01
        assert abs(fold["scale_r"]["mean"] - fold["scale_r"]["null_mean"]) < 0.2
    else:
        assert fold is None
