"""Residual-width pruning (Minitron-Width, Sheared-LLaMA): the model keeps a subset of the base's hidden dimensions,
so no tensor has the base's shape. The kept dimensions are recovered from the token embeddings (fitted on half the
tokens, tested on the other half) and every tensor whose other axes kept their sizes is compared through them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_provenance.cli.main import main
from hf_provenance.compare import compare
from hf_provenance.factory import apply_transform


def _pruned(make, tmp_path, family="llama", variant="finetune", seed=0, **params) -> Path:
    return apply_transform(make(family, variant, seed=seed), tmp_path / f"{family}-{variant}-{seed}-hidden",
                           "hidden_pruned", seed=3, **params)


def _truth(folder: Path) -> list[int]:
    return json.loads((folder / "factory.json").read_text())["transform"]["plan"]["kept"]


@pytest.mark.parametrize("sample", [None, 0.1])
@pytest.mark.parametrize("family, params", [("llama", {}), ("llama", {"shuffle": True, "keep": 0.5, "noise": 0.5}),
                                            ("qwen3_moe", {"keep": 0.5, "shuffle": True})])
def test_a_fine_tune_with_a_pruned_residual_stream_is_derived_and_pruned(make, tmp_path, family, params, sample):
    """It had been 'inconclusive: no tensor could be compared'. Now derived, relation pruned, the direction from
    containment, and the kept dimensions are exactly the factory's (in order or shuffled)."""
    model = _pruned(make, tmp_path, family, **params)
    c = compare(str(model), [make(family)], sample=sample).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and "pruned" in c["relation"], c["reasons"]
    assert "fewer hidden dimensions" in c["direction"] and "model derived from base" in c["direction"]
    hidden = c["alignment"]["hidden"]
    assert hidden["applied"] and hidden["kept"] == _truth(model) and hidden["heldout_r"] > 0.8
    assert hidden["in_order"] == (not params.get("shuffle"))
    by_component = {}
    for t in c["tensors"]:
        by_component.setdefault(t["component"], []).append(t)
    assert {"attention", "lm_head", "norms"} <= set(by_component)
    emb = by_component["embeddings"][0]
    assert not emb["evidence"] and "fitted" in " ".join(emb["notes"])  # it fitted the map: reported only
    layer = [t for t in c["tensors"] if t["layer"] is not None and t["evidence"] and len(t["shape"]) == 2]
    floor = 0.8 if params.get("noise") else 0.95
    assert layer and all(t["pearson"]["value"] > floor for t in layer)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_an_independent_model_of_smaller_width_is_never_derived(make, tmp_path, family):
    """Another seed's model, pruned the same way: the held-out embedding r stays at null level, nothing is paired
    through a subset, and the verdict stays inconclusive (widths differ; nothing else to compare). The MoE's expert
    search then met experts of two residual widths and read past the narrower one's rows (a crash, exit 3)."""
    model = _pruned(make, tmp_path, family, "base", seed=1)
    for sample in (None, 0.1):
        c = compare(str(model), [make(family)], sample=sample).to_dict()["comparisons"][0]
        assert c["verdict"] == "inconclusive"
        hidden = c["alignment"]["hidden"]
        assert not hidden["applied"] and abs(hidden["heldout_r"]) < 0.1


def test_the_report_validates_and_the_cli_says_pruned(make, tmp_path, capsys):
    model = _pruned(make, tmp_path)
    report = tmp_path / "r.json"
    assert main(["compare", str(model), "--base", make("llama"), "--json", str(report)]) == 0  # validated on write
    out = capsys.readouterr().out
    assert "DERIVED" in out and "hidden dimensions: the model's 48 are a subset of the base's 64" in out
    assert json.loads(report.read_text())["comparisons"][0]["alignment"]["hidden"]["dims"] == [64, 48]


def test_the_transform_keeps_the_function_shapes_and_refuses_what_it_cannot_do(make, tmp_path):
    from safetensors.torch import load_file

    model = _pruned(make, tmp_path, "llama", "base", keep=0.5)
    cfg = json.loads((model / "config.json").read_text())
    sd = load_file(str(model / "model.safetensors"))
    assert cfg["hidden_size"] == 32 and cfg["head_dim"] == 16
    assert sd["model.embed_tokens.weight"].shape[1] == 32 and sd["model.layers.0.self_attn.o_proj.weight"].shape[0] == 32
    assert sd["model.norm.weight"].shape == (32,)
    with pytest.raises(ValueError, match="model_type"):
        apply_transform(make("bert"), tmp_path / "bert", "hidden_pruned")
    with pytest.raises(ValueError, match="keep"):
        apply_transform(make("llama"), tmp_path / "all", "hidden_pruned", keep=1.0)


@pytest.mark.parametrize("sample", [None, 0.1])
def test_units_and_heads_permuted_before_the_pruning_are_recovered_through_the_kept_dimensions(make, tmp_path,
                                                                                             sample):
    """The unit and head searches sketch the residual rows of down/o: with a narrower residual stream they now run
    over the model's kept dimensions (they had skipped every layer: the MLP passed the independence test and the
    verdict was 'partial'). The residual-permutation search is not run (the kept dimensions already map it; it had
    read the two embeddings at their two widths: exit 3)."""
    permuted = apply_transform(make("llama", "finetune"), tmp_path / "perm", "permute_units", seed=4)
    model = apply_transform(permuted, tmp_path / "perm-hidden", "hidden_pruned", seed=3)
    c = compare(str(model), [make("llama")], sample=sample).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and {"pruned", "permuted"} <= set(c["relation"])
    assert c["alignment"]["units"]["applied"] and c["alignment"]["heads"]["applied"]
    assert any("residual permutation: not searched (the kept hidden dimensions" in x for x in c["alignment"]["lines"])
    layer = [t for t in c["tensors"] if t["component"] in ("dense_mlp", "attention") and t["evidence"]]
    assert layer and all(t["pearson"]["value"] > 0.95 for t in layer)


@pytest.mark.parametrize("sample", [None, 0.1])
def test_hidden_units_and_heads_pruned_together_compare_every_tensor(make, tmp_path, sample):
    """Minitron-Width prunes the hidden size and the MLP; Sheared-LLaMA the heads as well. The unit and head subset
    search now reads the base's residual axis through the kept hidden dimensions: every tensor is compared (MLP and
    attention had stayed 'not compared'), and the direction names all three subsets."""
    hidden = apply_transform(make("llama", "finetune"), tmp_path / "hidden", "hidden_pruned", seed=3, shuffle=True)
    model = apply_transform(hidden, tmp_path / "hidden-width", "width_pruned", seed=5)
    c = compare(str(model), [make("llama")], sample=sample).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and c["relation"] == ["pruned"]
    for what in ("hidden dimensions", "MLP units", "attention heads"):
        assert what in c["direction"]
    assert not c["not_compared"] and c["alignment"]["width"]["applied"]
    layer = [t for t in c["tensors"] if t["component"] in ("dense_mlp", "attention") and t["evidence"]]
    assert len(layer) >= 4 * 5 and all(t["pearson"]["value"] > 0.95 for t in layer)


def test_real_weights_minilm_with_a_quarter_of_its_hidden_dimensions_pruned(minilm, tmp_path):
    """all-MiniLM-L6-v2 (real weights, BERT layout: position and token-type embeddings, LayerNorm biases, pooler)
    with 288 of its 384 hidden dimensions kept and Gaussian noise of 0.3x each tensor's std: derived, pruned."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "minilm-hidden"
    shutil.copytree(minilm, dst)
    weights = next(dst.glob("*.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    h = cfg["hidden_size"]
    gen = torch.Generator().manual_seed(11)
    keep = torch.randperm(h, generator=gen)[:288].sort().values
    readers = ("word_embeddings", "position_embeddings", "token_type_embeddings", "attention.self.query",
               "attention.self.key", "attention.self.value", "intermediate.dense")
    out = {}
    for name, v in load_file(str(weights)).items():
        if v.is_floating_point():
            if "pooler" in name:
                v = v[keep][:, keep] if v.ndim == 2 else v[keep]
            elif v.ndim == 2 and any(r in name for r in readers):
                v = v[:, keep]
            elif v.ndim == 2 and name.endswith("output.dense.weight"):
                v = v[keep]
            elif v.ndim == 1 and v.shape[0] == h:
                v = v[keep]
            v = v + 0.3 * v.float().std() * torch.randn(v.shape, generator=gen)
        out[name] = v.contiguous()
    save_file(out, str(weights), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**cfg, "hidden_size": 288}))
    c = compare(str(dst), [str(minilm)]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and c["relation"] == ["pruned"]
    assert c["alignment"]["hidden"]["kept"] == keep.tolist()
    layer = [t for t in c["tensors"] if t["component"] in ("attention", "dense_mlp") and t["evidence"]]
    assert len(layer) == 6 * 9 and all(0.9 < t["pearson"]["value"] < 0.99 for t in layer)


@pytest.mark.parametrize("depth, truth", [("pruned", [0, 1, 3]), ("upscaled", [0, 1, 2, 1, 2, 3])])
def test_layer_maps_read_the_base_through_the_kept_dimensions(make, tmp_path, depth, truth):
    """Sheared-LLaMA-1.3B drops layers as well as dimensions: the layer sketches had no tensor of equal shapes, so
    model layer j met base layer j. The sketches now read the base through the kept dimensions: the map is found,
    and the layer pairs are compared through them."""
    model = apply_transform(make("llama", depth), tmp_path / f"{depth}-hidden", "hidden_pruned", seed=3,
                            shuffle=True)
    c = compare(str(model), [make("llama")]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and {"pruned", depth} <= set(c["relation"])
    assert [i for _, i, _ in c["alignment"]["layers"]["map"]] == truth
    lines = c["alignment"]["lines"]
    assert any(x.startswith("hidden dimensions: the model's 48") for x in lines)
    layer = [t for t in c["tensors"] if t["layer"] is not None and t["evidence"] and len(t["shape"]) == 2]
    assert layer and all(t["pearson"]["value"] > 0.95 for t in layer)


@pytest.mark.parametrize("seed, derived", [(0, True), (1, False)])
def test_layers_hidden_units_and_heads_all_pruned(make, tmp_path, seed, derived):
    """Sheared-LLaMA-1.3B drops layers and prunes the hidden size, the heads and the MLP: no layer tensor keeps a
    shape, so the layer map had nothing to sketch and model layer j met base layer j. The writers' row Grams (over
    the kept hidden dimensions; unit and head order and subsets leave them unchanged) now give the map, and the
    width search pairs each model layer with its mapped base layer. Another seed's model pruned the same way finds
    no kept dimensions and no layer map: never derived."""
    src = make("llama", "pruned", seed=seed)
    hidden = apply_transform(src, tmp_path / "hidden", "hidden_pruned", seed=3)
    model = apply_transform(hidden, tmp_path / "all", "width_pruned", seed=5)
    c = compare(str(model), [make("llama")]).to_dict()["comparisons"][0]
    if not derived:
        assert c["verdict"] == "inconclusive" and not c["alignment"].get("layers")
        return
    assert c["verdict"] == "derived" and c["relation"] == ["pruned"]
    layers = c["alignment"]["layers"]
    assert [i for _, i, _ in layers["map"]] == [0, 1, 3] and layers["sketch"]["gram_tensors"] > 0
    assert c["alignment"]["width"]["applied"]
    layer = [t for t in c["tensors"] if t["component"] in ("dense_mlp", "attention") and t["evidence"]]
    assert len(layer) == 3 * 5 and all(t["pearson"]["value"] > 0.95 for t in layer)
    assert {(t["name"].split(".")[2], t["layer"]) for t in layer} == {("0", 0), ("1", 1), ("3", 2)}


@pytest.mark.parametrize("steps, relation", [
    ((("qwen3_moe", "finetune"), ("shuffle_experts", {}), ("hidden_pruned", {})), {"pruned", "permuted"}),
    ((("llama", "base"), ("hidden_pruned", {}), ("upcycle", {})), {"pruned", "upcycled"}),
])
def test_the_expert_search_reads_the_base_through_the_kept_dimensions(make, tmp_path, steps, relation):
    """Experts shuffled, or upcycled from a dense MLP, in a model whose hidden size was also pruned: the expert
    search had skipped every layer (two residual widths), leaving the experts unaligned or uncompared. It now reads
    the base's down rows and router columns through the kept dimensions."""
    (family, variant), *transforms = steps
    src = make(family, variant)
    for k, (name, params) in enumerate(transforms):
        src = apply_transform(src, tmp_path / f"{k}-{name}", name, seed=3 + k, **params)
    c = compare(str(src), [make(family)]).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and relation <= set(c["relation"])
    experts = [t for t in c["tensors"] if ("experts" in t["model_name"]) and t["evidence"]]
    assert experts and all(t["pearson"]["value"] > 0.95 for t in experts)
    assert not [x for x in c["not_compared"] if "experts" in x]
