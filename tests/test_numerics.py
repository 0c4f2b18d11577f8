"""Hostile numbers and hostile configs: defined results, never a NaN in a verdict or JSON, no code executed."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_provenance.cli.main import main
from hf_provenance.compare import compare


@pytest.fixture(scope="module")
def pair(make):
    return make("llama"), make("llama", "finetune")


def _edit(src: str, dst, fn) -> str:
    shutil.copytree(src, dst)
    sd = load_file(f"{dst}/model.safetensors")
    sd = {k: fn(k, v).contiguous() for k, v in sd.items()}
    save_file(sd, f"{dst}/model.safetensors")
    return str(dst)


def _strict_json(report) -> dict:
    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # raises on NaN/Inf
    return d["comparisons"][0]


def test_nan_inf_zero_constant_and_denormal_tensors(pair, tmp_path):
    base, ft = pair

    def poison(name, v):
        if name.endswith("layers.0.self_attn.q_proj.weight"):
            v = v.clone()
            v[0, 0], v[1, 1], v[2, 2] = float("nan"), float("inf"), float("-inf")
        elif name.endswith("layers.0.mlp.up_proj.weight"):
            v = v.clone()
            v[0] = float("inf")  # a row of +Inf against signed values: Inf - Inf inside the products
        elif name.endswith("layers.1.self_attn.k_proj.weight"):
            v = torch.zeros_like(v)
        elif name.endswith("layers.1.self_attn.v_proj.weight"):
            v = torch.full_like(v, 0.25)
        elif name.endswith("layers.2.self_attn.o_proj.weight"):
            v = v * 1e-40  # float32 denormals
        return v

    model = _edit(ft, tmp_path / "poisoned", poison)
    with warnings.catch_warnings():  # non-finite values are counted and masked, never a warning line on stderr
        warnings.simplefilter("error")
        c = _strict_json(compare(model, [base]))
    assert c["verdict"] == "derived"  # the rest of the evidence stands
    by_name = {t["name"]: t for t in c["tensors"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert any("NaN/Inf" in n for n in q["notes"]) and q["pearson"]["value"] is not None
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        t = by_name[name]
        assert t["pearson"]["value"] is None and not t["evidence"]
        assert any("undefined" in n for n in t["notes"])
    o = by_name["model.layers.2.self_attn.o_proj.weight"]
    assert o["pearson"]["value"] is not None and o["pearson"]["value"] > 0.9  # scale-free: denormals still correlate


@pytest.mark.parametrize("sample", [None, 0.1])
def test_all_zero_checkpoints_give_defined_reports(pair, tmp_path, sample):
    """Every tensor zero (a placeholder upload, a sparse file): no layer has a defined cosine, and the mean layer
    cosine had become NaN (the JSON was refused as a bug, exit 3). Zero against zero is bit-equal: identical;
    zero against a trained model has no evidence either way: inconclusive, never derived or independent."""
    base, _ = pair
    zero = _edit(base, tmp_path / "zero", lambda n, v: torch.zeros_like(v))
    zero2 = shutil.copytree(zero, tmp_path / "zero2")
    c = _strict_json(compare(str(zero2), [zero], sample=sample))
    assert c["verdict"] == "identical"
    assert c["rule_of_thumb"]["mean_layer_cosine"] is None
    c = _strict_json(compare(zero, [base], sample=sample))
    assert c["verdict"] == "inconclusive"
    assert all(t["pearson"]["value"] is None and not t["evidence"] for t in c["tensors"])
    argv = ["compare", str(zero2), "--base", zero, "--json", str(tmp_path / "r.json")]
    assert main(argv + (["--sample", str(sample)] if sample else [])) == 0
    assert json.loads((tmp_path / "r.json").read_text())["comparisons"][0]["verdict"] == "identical"


def test_nan_elements_match_only_nan(pair, tmp_path):
    """Non-finite elements are left out of the sums (set to 0 on both sides); those zeros had been counted as equal
    elements, so a model whose every weight is NaN came out `identical` to its base. Now an element is equal only
    when both sides hold it (NaN with NaN): a copy that carries the base's NaNs is still identical."""
    base, _ = pair
    nan = _edit(base, tmp_path / "nan", lambda n, v: torch.full_like(v, float("nan")))
    for sample in (None, 0.1):
        c = _strict_json(compare(nan, [base], sample=sample))
        assert c["verdict"] == "inconclusive", c["reasons"]
        assert all(t["frac_equal"] == 0 and not t["bit_equal"] for t in c["tensors"])

    def holes(name, v):
        v = v.clone()
        v.view(-1)[::7] = float("nan")
        v.view(-1)[3::11] = float("inf")
        return v

    holed = _edit(base, tmp_path / "holed", holes)
    twin = shutil.copytree(holed, tmp_path / "twin")
    c = _strict_json(compare(str(twin), [holed]))
    assert c["verdict"] == "identical" and all(t["frac_equal"] == 1 for t in c["tensors"])
    c = _strict_json(compare(holed, [base]))  # the base's values where the model has holes: not equal there
    assert c["verdict"] == "derived" and all(t["frac_equal"] < 1 for t in c["tensors"])
    norm = next(t for t in c["tensors"] if t["name"].endswith("layers.0.input_layernorm.weight"))
    assert norm["cosine"]["value"] is not None and any("NaN/Inf" in n for n in norm["notes"])


def test_mixed_dtypes_between_the_two_models(pair, tmp_path):
    base, ft = pair
    half = _edit(ft, tmp_path / "f16", lambda n, v: v.half() if v.is_floating_point() else v)
    c = _strict_json(compare(half, [base]))
    assert c["verdict"] == "derived"
    assert {tuple(t["dtype"]) for t in c["tensors"]} == {("F32", "F16")}


def test_auto_map_config_is_data_and_model_code_never_runs(make, tmp_path, capsys):
    """A config with auto_map and a malicious modeling file next to it: inspect/arch/compare never import it."""
    src = make("llama")
    evil = tmp_path / "evil"
    shutil.copytree(src, evil)
    canary = tmp_path / "canary"
    (evil / "modeling_evil.py").write_text(f"open({str(canary)!r}, 'w').write('pwned')\n")
    (evil / "configuration_evil.py").write_text(f"open({str(canary)!r}, 'w').write('pwned')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (evil / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text(json.dumps(cfg))
    shutil.copy(evil / "modeling_evil.py", tmp_path / "config_only")
    assert main(["inspect", str(evil)]) == 0
    assert main(["inspect", str(tmp_path / "config_only")]) == 0
    assert main(["arch", str(evil), src]) == 0
    assert main(["compare", str(evil), "--base", src]) == 0
    capsys.readouterr()
    assert not canary.exists()
