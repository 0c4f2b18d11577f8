"""Residual-stream rotations at a real width: truth by construction.

A random orthogonal change of the residual basis (norms folded first) keeps the function; at hidden 1024 it leaves
every per-tensor statistic along the residual axis below the derivation threshold, so before the row-Gram test such a
copy was called ``independent``. Two seeds of the same architecture are independent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.rotation import MIN_CLEARED, READERS, ROWS, rotation_check
from hf_provenance.compare import compare
from hf_provenance.factory.build import build_random
from hf_provenance.factory.transforms import apply_transform, rotate_residual_state_dict
from hf_provenance.schemas import validate
from hf_provenance.sources import open_model
from hf_provenance.statistics.thresholds import load as load_thresholds

TH = load_thresholds()
SIZES = dict(hidden=1024, layers=2, intermediate=2048, vocab=1024)


def _rewrite(src, dst, fn):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    save_file({k: v.contiguous() for k, v in fn(sd).items()}, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation")
    base = build_random("llama", root / "base", seed=0, **SIZES)
    build_random("llama", root / "independent", seed=1, **SIZES)
    _rewrite(base, root / "rotated", rotate_residual_state_dict)
    apply_transform(root / "rotated", root / "rotated-noisy", "noise", scale=0.5)
    apply_transform(root / "rotated", root / "rotated-permuted", "permute_units", seed=5)
    return {name: str(root / name) for name in ("base", "independent", "rotated", "rotated-noisy",
                                                "rotated-permuted")}


def _run(model, base, **kw):
    return compare(model, [base], **kw).to_dict()


def test_rotated_copy_function_is_the_base_s(wide):
    """The construction keeps the function: same logits (float32 forward on both)."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(12).reshape(1, -1)
    out = [AutoModelForCausalLM.from_pretrained(wide[n], dtype=torch.float32)(ids).logits for n in ("base", "rotated")]
    assert torch.allclose(out[0], out[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("which, sample", [("rotated", None), ("rotated", 0.1), ("rotated-noisy", None)])
def test_rotated_copy_is_derived_by_the_row_gram_test(wide, which, sample):
    doc = _run(wide[which], wide["base"], sample=sample, seed=1)
    validate(doc)
    c = doc["comparisons"][0]
    assert c["verdict"] == "derived" and c["relation"] == ["permuted"], c["reasons"]
    assert c["reasons"][0].startswith("residual stream rotated")
    # what the ordinary evidence saw: nothing above the derivation threshold in any component
    assert all(abs(g["pearson"]["value"]) < TH.r_derived for g in c["components"].values()
               if g["pearson"]["value"] is not None)
    rot = c["alignment"]["rotation"]
    # gate and up of both layers, and both value projections (two heads each, paired in place)
    assert rot["rotated"] and rot["cleared"] == rot["tested"] == 6
    assert [t["heads"] for t in rot["tensors"] if t["heads"]] == [[[0, 0], [1, 1]]] * 2
    for t in rot["tensors"]:
        assert t["cleared"] and t["gram_r"]["value"] >= (0.999 if which == "rotated" else 0.3)
        assert t["gram_r"]["z"] >= TH.z_derived and t["gram_r"]["n"] == 99
    assert any(line.startswith("residual rotation: rotated copy") for line in c["alignment"]["lines"])


def test_rotated_copy_with_permuted_units_and_heads_is_found_by_its_value_heads(wide):
    """MLP units and attention heads permuted on top of the rotation (function kept): the MLP Grams no longer line
    up, but each value head's sorted row-Gram entries pair the heads again, and the value Grams agree."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(12).reshape(1, -1)
    out = [AutoModelForCausalLM.from_pretrained(wide[n], dtype=torch.float32)(ids).logits
           for n in ("base", "rotated-permuted")]
    assert torch.allclose(out[0], out[1], atol=2e-2, rtol=2e-2)
    c = _run(wide["rotated-permuted"], wide["base"])["comparisons"][0]
    assert c["verdict"] == "derived" and c["relation"] == ["permuted"], c["reasons"]
    rot = c["alignment"]["rotation"]
    mlp = [t for t in rot["tensors"] if t["heads"] is None]
    values = [t for t in rot["tensors"] if t["heads"] is not None]
    assert not any(t["cleared"] for t in mlp) and len(values) == 2 and all(t["cleared"] for t in values)
    assert any(h[0] != h[1] for t in values for h in t["heads"])  # a permuted head found where it went
    assert "2 of 2 value tensors" in c["reasons"][0]


def test_independent_seeds_stay_independent_with_the_rotation_tested(wide):
    c = _run(wide["independent"], wide["base"])["comparisons"][0]
    assert c["verdict"] == "independent", c["reasons"]
    rot = c["alignment"]["rotation"]
    assert rot["tested"] > 0 and rot["cleared"] == 0 and not rot["rotated"]
    assert all(abs(t["gram_r"]["z"]) < 4 for t in rot["tensors"])


def test_a_derived_pair_skips_the_rotation_check(wide):
    c = _run(wide["base"], wide["base"])["comparisons"][0]
    assert c["verdict"] == "identical" and c["alignment"]["rotation"] is None


def test_gram_test_folds_each_side_s_own_norm_weights(wide, tmp_path):
    """The test folds each side's
    norm weights into its own rows: the rotated copy's norms are ones and its readers carry the base's weights, so
    the Grams agree exactly only when the base's own norm weights are folded into its rows."""
    from hf_provenance.alignment.rotation import _norms, _readers, gram_test

    base, rot = open_model(wide["base"]), open_model(wide["rotated"])
    plan, _ = identity_plan(base, rot)
    readers, norms = _readers(plan), _norms(plan)
    assert {p.key.role for p in readers} == {"ffn_gate", "ffn_up"} and len(readers) == 4
    p = readers[0]
    norm = norms[(READERS[p.key.role], p.key.layer)]
    folded = gram_test(base, rot, p, norm, seed=0)
    unfolded = gram_test(base, rot, p, None, seed=0)
    assert folded.test.observed > 0.999 and folded.rows == ROWS
    assert unfolded.test.observed < folded.test.observed


def test_the_null_relabels_units_and_is_calibrated_on_independent_models(wide):
    """Two independent seeds: every tensor's Mantel z is near N(0, 1); the decision needs MIN_CLEARED tensors."""
    base, ind = open_model(wide["base"]), open_model(wide["independent"])
    plan, _ = identity_plan(base, ind)
    zs = [t.test.z for seed in range(3) for t in rotation_check(base, ind, plan, seed=seed).tests]
    assert len(zs) == 18 and np.max(np.abs(zs)) < 4 and MIN_CLEARED >= 2


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation-moe")
    sizes = dict(hidden=1024, layers=1, intermediate=2048, vocab=1024, experts=8, moe_intermediate=64,
                 experts_per_tok=2)
    base = build_random("qwen3_moe", root / "base", seed=0, **sizes)
    build_random("qwen3_moe", root / "independent", seed=1, **sizes)
    _rewrite(base, root / "rotated", rotate_residual_state_dict)
    apply_transform(root / "rotated", root / "rotated-shuffled", "shuffle_experts", seed=3)
    return {name: str(root / name) for name in ("base", "independent", "rotated", "rotated-shuffled")}


def test_rotated_moe_copy_keeps_the_function_and_is_derived_by_its_experts(moe):
    """Routed experts (and the router) read the rotated residual too: the function is kept, and the Grams of the
    experts' gate/up rows (64 units each) find the copy; independent seeds stay independent."""
    from transformers import AutoModelForCausalLM

    ids = torch.arange(12).reshape(1, -1)
    out = [AutoModelForCausalLM.from_pretrained(moe[n], dtype=torch.float32)(ids).logits for n in ("base", "rotated")]
    assert torch.allclose(out[0], out[1], atol=2e-2, rtol=2e-2)
    c = _run(moe["rotated"], moe["base"])["comparisons"][0]
    assert c["verdict"] == "derived" and c["relation"] == ["permuted"], c["reasons"]
    rot = c["alignment"]["rotation"]
    assert rot["rotated"] and rot["tested"] == 17 and rot["cleared"] == 17  # 8 experts × (gate, up), value
    assert sum("experts" in t["tensor"] for t in rot["tensors"]) == 16
    c = _run(moe["independent"], moe["base"])["comparisons"][0]
    assert c["verdict"] == "independent" and c["alignment"]["rotation"]["cleared"] == 0


def test_every_tested_block_is_announced_before_the_first_read(wide, monkeypatch):
    """On the Hub each read is a round trip: the check asks each source for all its row blocks at once (coalesced
    background range requests; read-ahead hints locally) before reading them one by one."""
    from hf_provenance.alignment import rotation as R

    base, model = open_model(wide["base"]), open_model(wide["independent"])
    plan, _ = identity_plan(base, model)
    log = []
    for side, src in (("base", base), ("model", model)):
        real = src.prefetch
        monkeypatch.setattr(src, "prefetch", lambda spans, side=side, real=real: log.append((side, list(spans)))
                            or real(spans), raising=False)
    real_read = R.read_rows
    monkeypatch.setattr(R, "read_rows", lambda *a, **k: log.append(("read",)) or real_read(*a, **k))
    vector_reads = []
    real_vector = base.reader.read_rows
    monkeypatch.setattr(base.reader, "read_rows", lambda name, *a: vector_reads.append(name) or real_vector(name, *a))
    check = rotation_check(base, model, plan, seed=3)
    first_read = next(i for i, e in enumerate(log) if e[0] == "read")
    assert all(e[0] == "read" for e in log[first_read:])  # every announcement comes before the first read
    announced = {side: {s for e in log[:first_read] if e[0] == side for s in e[1]} for side in ("base", "model")}
    for t in check.tests:
        pair = next(p for p in plan.pairs if p.base_name == t.name)
        start, stop = (0, pair.shape[0]) if t.heads is not None else (R._rows(pair, 3)[1][0], None)
        stop = stop if stop is not None else start + t.rows
        assert (t.name, start, stop) in announced["base"] and (t.name, start, stop) in announced["model"]
    # the norm vectors folded into the rows are announced too, and each is read once (on the base side here)
    norms = {p.base_name for p in R._norms(plan).values()}
    assert norms and all((n, 0, 1) in announced["base"] for n in norms)
    assert sorted(v for v in vector_reads if v in norms) == sorted(norms)
    assert len(log) - first_read == 2 * len(check.tests)


def test_rotated_copy_with_shuffled_experts_is_paired_through_its_routers(moe):
    """Experts shuffled on top of the rotation: each base expert is paired with the model expert whose router row
    has the same sorted inner products with the layer's router rows (rotation- and order-invariant), then tested.
    Compared index by index, the same copy is not found."""
    from hf_provenance.alignment import rotation as R

    c = _run(moe["rotated-shuffled"], moe["base"])["comparisons"][0]
    assert c["verdict"] == "derived" and c["relation"] == ["permuted"], c["reasons"]
    rot = c["alignment"]["rotation"]
    assert rot["rotated"] and rot["cleared"] == rot["tested"] == 17
    moved = rot["expert_pairing"]["experts_moved"]
    assert rot["expert_pairing"]["layers"] == [0] and moved >= 4
    assert sum(t["model_tensor"] != t["tensor"] for t in rot["tensors"]) == 2 * moved  # gate and up of each
    base, model = open_model(moe["base"]), open_model(moe["rotated-shuffled"])
    plan, _ = identity_plan(base, model)
    by_index = R.RotationCheck(tuple(R.gram_test(base, model, p, None, seed=0) for p in R._readers(plan)))
    assert len(by_index.tests) == 16 and not by_index.rotated
