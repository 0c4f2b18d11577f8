"""--sample on a fine-grained MoE: experts too small to sample by rows are sampled whole, layer by layer.

Truth by construction: a base with 64 small experts per layer; a derived copy (base + noise) in which every third
expert is re-initialised (its tensors independent of the base's), so that which experts are drawn matters.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_provenance.compare import compare
from hf_provenance.factory.build import build_random
from hf_provenance.factory.transforms import apply_transform
from hf_provenance.measurement.experts import MIN_EXPERTS, expert_sample
from hf_provenance.measurement.sampling import draw

SIZES = dict(hidden=128, layers=2, intermediate=512, vocab=1024, experts=64, moe_intermediate=64, experts_per_tok=2)


def _expert_of(name: str) -> int | None:
    return int(name.split(".mlp.experts.")[1].split(".")[0]) if ".mlp.experts." in name else None


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    build_random("qwen3_moe", root / "base", seed=0, **SIZES)
    build_random("qwen3_moe", root / "independent", seed=1, **SIZES)
    apply_transform(root / "base", root / "noisy", "noise", scale=0.5)
    shutil.copytree(root / "noisy", root / "mixed")
    g = torch.Generator().manual_seed(5)
    for f in (root / "mixed").glob("*.safetensors"):
        tensors = load_file(str(f))
        for k, v in tensors.items():
            e = _expert_of(k)
            if e is not None and e % 3 == 0:
                tensors[k] = (torch.randn(v.shape, generator=g) * v.float().std()).to(v.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return {name: str(root / name) for name in ("base", "independent", "noisy", "mixed")}


def _run(model, base, **kw):
    return compare(model, [base], **kw).to_dict()["comparisons"][0]


def test_sampled_run_reads_a_stratified_sample_of_whole_experts(moe):
    from hf_provenance.schemas import validate

    full = _run(moe["mixed"], moe["base"])
    doc = compare(moe["mixed"], [moe["base"]], sample=0.1, seed=2).to_dict()
    validate(doc)  # the report contract, with its expert_sample entries
    part = doc["comparisons"][0]
    assert full["verdict"] == part["verdict"] == "derived"
    experts_full = [t for t in full["tensors"] if _expert_of(t["name"]) is not None]
    experts_part = [t for t in part["tensors"] if _expert_of(t["name"]) is not None]
    assert len(experts_full) == 2 * 64 * 3 and all(t["expert_sample"] is None for t in experts_full)
    # per layer, 6 of 64 experts (three strata of two), every tensor of each read fully, standing for 64/6
    for layer in (0, 1):
        mine = [t for t in experts_part if t["layer"] == layer]
        drawn = sorted({_expert_of(t["name"]) for t in mine})
        assert len(drawn) == 6 and len(mine) == 6 * 3
        assert sum(e < 64 / 3 for e in drawn) == 2 and sum(e >= 128 / 3 for e in drawn) == 2  # two per stratum
        assert all(t["fraction_read"] == 1.0 and t["expert_sample"]["stands_for"] == pytest.approx(64 / 6)
                   for t in mine)
    assert part["io"]["expert_sample"] == {"layers": 2, "experts": 128, "experts_read": 12, "tensors_read": 36,
                                           "tensors_not_read": 2 * 58 * 3}
    assert any("expert sampling: 12 of 128 routed experts" in line for line in part["alignment"]["lines"])
    # the experts were most of the bytes: the sampled run reads a fraction of what the full one does
    assert part["io"]["fraction_read"] < 0.35 < 0.99 < full["io"]["fraction_read"]
    # the component stands for every expert: same parameter count as the full run
    assert part["components"]["routed_experts"]["params"] == full["components"]["routed_experts"]["params"]


def test_expert_sample_intervals_cover_the_full_run(moe):
    """Across seeds, the 95% interval of the routed experts' mean Pearson covers the full-run value 85–100% of the
    time (the unit of its between-expert variance is the expert: its three tensors move together here)."""
    truth = _run(moe["mixed"], moe["base"])["components"]["routed_experts"]["pearson"]["value"]
    n, hits, values = 60, 0, []
    for seed in range(n):
        c = _run(moe["mixed"], moe["base"], sample=0.1, seed=seed)
        p = c["components"]["routed_experts"]["pearson"]
        hits += p["ci"][0] <= truth <= p["ci"][1]
        values.append(p["value"])
        for g in c["layers"]:  # wide intervals stay within [-1, 1]
            assert -1.0 <= g["pearson"]["ci"][0] <= g["pearson"]["ci"][1] <= 1.0, g
    assert np.std(values) > 0.03  # which experts are drawn matters: a zero-width interval could not pass
    assert 0.85 <= hits / n <= 1.0, hits / n
    assert abs(np.mean(values) - truth) < 0.05  # the expansion estimator is unbiased


def test_independent_moe_stays_independent_when_sampled(moe):
    full = _run(moe["independent"], moe["base"])
    part = _run(moe["independent"], moe["base"], sample=0.1, seed=1)
    assert full["verdict"] == "independent" and part["verdict"] in ("independent", "inconclusive")
    assert part["verdict"] != "derived"


def test_what_is_drawn():
    """Only experts too small to sample by rows, only in layers with enough of them, the same experts for every
    role of a layer, nothing at all without --sample."""
    from hf_provenance.alignment.keys import CanonicalKey
    from hf_provenance.alignment.plan import PairSpec

    def pair(role, layer, expert, rows, cols=64):
        return PairSpec(CanonicalKey(role, layer, expert), f"{layer}.{role}.{expert}", f"{layer}.{role}.{expert}",
                        (rows, cols), ("unit", "hidden"), "routed_experts", layer)

    pairs = ([pair(r, 0, e, 64) for e in range(32) for r in ("ffn_gate_exp", "ffn_down_exp")]
             + [pair("ffn_up_exp", 0, e, 64 * 40, 4096) for e in range(32)]    # 40 blocks: sampled by rows
             + [pair("ffn_gate_exp", 1, e, 64) for e in range(MIN_EXPERTS - 1)]  # too few experts to sample
             + [pair("attn_q", 0, None, 64)])
    rng = np.random.default_rng(0)
    samples = [draw(p.n_rows, p.n_cols * 2, 0.1, rng) for p in pairs]
    assert expert_sample(pairs, samples, None, 0) == [None] * len(pairs)
    picks = expert_sample(pairs, samples, 0.1, 0)
    small0 = [(p, d) for p, d in zip(pairs, picks) if p.layer == 0 and p.n_rows == 64 and p.key.expert is not None]
    drawn = {p.key.expert for p, d in small0 if d}
    assert len(drawn) == 4  # round(0.1 × 32) = 3, at least two strata of two
    for role in ("ffn_gate_exp", "ffn_down_exp"):
        assert {p.key.expert for p, d in small0 if d and p.key.role == role} == drawn
    assert all(d is False for p, d in small0 if p.key.expert not in drawn)
    assert all(d.experts == 32 and d.drawn == 4 for p, d in small0 if d)
    assert all(d is None for p, d in zip(pairs, picks) if p.key.role == "ffn_up_exp" or p.layer == 1
               or p.key.expert is None)


CONFIGS = sorted((__import__("pathlib").Path(__file__).parent / "fixtures" / "configs").glob("*/config.json"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.name)
def test_sample_reads_about_the_fraction_of_published_checkpoints(config):
    """From each published config's tensor shapes: the bytes `--sample 0.1` reads. Fine-grained MoEs (Qwen3-30B-A3B,
    DeepSeek-V2, GLM-4.5-Air, Solar-Open-100B) read 66–96% with every small expert read fully; drawn whole, at most
    15% (DESIGN's small tensors read fully and two blocks per stratum keep dense models near 13%)."""
    import json
    import math
    from types import SimpleNamespace

    from hf_provenance.alignment.keys import CanonicalKey
    from hf_provenance.architecture.params import components
    from hf_provenance.architecture.spec import normalise

    total = read = 0.0
    for c in components(normalise(json.loads(config.read_text()))):
        for part, shape in c.parts:
            if part in c.tied_parts:
                continue
            n = math.prod(shape)
            s = draw(shape[0], n // shape[0] * 2, 0.1, np.random.default_rng(0))
            kept = c.instances
            if c.instances > 1:  # one layer's routed experts
                pairs = [SimpleNamespace(key=CanonicalKey("ffn_gate_exp", 0, e), layer=0) for e in range(c.instances)]
                kept = sum(p is not False for p in expert_sample(pairs, [s] * c.instances, 0.1, 0))
            total += n * c.instances * c.layers
            read += n * kept * c.layers * s.fraction
    assert read / total <= 0.15, read / total


def test_units_permuted_inside_many_experts_are_recovered_with_a_subset_null(moe, tmp_path_factory, monkeypatch):
    """Units shuffled inside each of 64 experts per layer: the unit search recovers every layer's batch, its null
    simulated on MAX_NULL_GROUPS experts (every draw re-sketches each tested expert: the cost that made a
    128-expert layer take 42 s of null alone)."""
    from hf_provenance.alignment import nulls as N
    from hf_provenance.alignment import units as U

    folder = str(apply_transform(moe["noisy"], tmp_path_factory.mktemp("pu") / "pu", "permute_units"))
    for sample in (None, 0.1):
        c = _run(folder, moe["base"], sample=sample, seed=1)
        assert c["verdict"] == "derived" and "permuted" in c["relation"], c["reasons"]
        assert c["alignment"]["units"]["recovered"] == c["alignment"]["units"]["batches"] == 2
    scored, fitted = [], []
    real_scores, real_cols = U._half_scores, N.unit_cols
    monkeypatch.setattr(U, "_half_scores", lambda *a: scored.append(1) or real_scores(*a))
    monkeypatch.setattr(N, "unit_cols", lambda x: fitted.append(1) or real_cols(x))
    monkeypatch.setattr(U, "MAX_NULL_GROUPS", 5)
    c = _run(folder, moe["base"], sample=0.1, seed=1)
    assert c["alignment"]["units"]["recovered"] == 2
    # per batch: (K + 1) evaluations × 2 halves × 5 tested experts, and one fit per expert (64)
    assert len(scored) == 2 * (N.NULL_DRAWS + 1) * 2 * 5
    assert len(fitted) == 2 * 64


def test_only_the_tested_experts_keep_their_sketches_and_read_gate_and_up(moe, tmp_path_factory, monkeypatch):
    """A full unit search over 64 experts a layer fits each untested expert as soon as its down sketches are read
    and drops them; gate/up, agreement sources of the null's test only, are read for the tested experts alone
    (holding every expert's sketches had taken 2 GB for one Qwen3-30B-A3B-sized layer). The maps are the same
    as when every expert is tested: the tensors measured after them are equal."""
    from hf_provenance.alignment import units as U

    folder = str(apply_transform(moe["noisy"], tmp_path_factory.mktemp("pu2") / "pu", "permute_units"))
    reads = []
    real = U.sketch_reader

    def counting(src, pair, sketch, *, side):
        if ".experts." in pair.base_name and ("gate_proj" in pair.base_name or "up_proj" in pair.base_name):
            reads.append((pair.base_name, side))
        return real(src, pair, sketch, side=side)

    monkeypatch.setattr(U, "sketch_reader", counting)
    monkeypatch.setattr(U, "MAX_NULL_GROUPS", 5)
    few = _run(folder, moe["base"], seed=1)
    n_few, reads[:] = len(reads), []
    monkeypatch.setattr(U, "MAX_NULL_GROUPS", 1000)
    every = _run(folder, moe["base"], seed=1)
    assert n_few == 2 * 5 * 2 * 2  # layers × tested experts × (gate, up) × sides
    assert len(reads) == 2 * 64 * 2 * 2
    assert few["alignment"]["units"]["recovered"] == every["alignment"]["units"]["recovered"] == 2
    assert few["verdict"] == "derived" and "permuted" in few["relation"]
    assert [t["pearson"]["value"] for t in few["tensors"]] == [t["pearson"]["value"] for t in every["tensors"]]


def test_an_independent_moe_layer_fits_only_its_tested_experts(moe, monkeypatch):
    """Independent models: the unit test of each layer (on its tested experts) recovers nothing, so no map, which
    would not be applied, is fitted, and the experts not tested are not read. The test's statistics are the same as
    when every expert is fitted; a recovered batch is still fitted whole (above)."""
    from hf_provenance.alignment import nulls as N
    from hf_provenance.alignment import units as U
    from hf_provenance.alignment.identity import identity_plan
    from hf_provenance.sources import open_model

    monkeypatch.setattr(U, "MAX_NULL_GROUPS", 5)
    downs = []
    real = U.sketch_writer

    def counting(src, pair, sketch, *, side):
        downs.append((pair.base_name, side))
        return real(src, pair, sketch, side=side)

    monkeypatch.setattr(U, "sketch_writer", counting)
    c = _run(moe["independent"], moe["base"], seed=1)
    assert c["verdict"] == "independent"
    units = c["alignment"]["units"]
    assert units["recovered"] == 0 and units["batches"] == 2
    assert [b["groups_fitted"] for b in units["layers"]] == [0, 0]
    assert all(b["mutual_best"] is None and b["assignment_size"] is None for b in units["layers"])
    assert len([d for d in downs if ".experts." in d[0]]) == 2 * 5 * 2  # layers × tested experts × sides

    base, model = open_model(moe["base"]), open_model(moe["independent"])
    plan, _ = identity_plan(base, model)
    mkeys = U.model_keys(model)
    groups = [g for g in U.mlp_groups(plan, mkeys, None) if g.kind == "expert" and g.layer == 0]
    sketch = N.ResidualSketch.build(128, N.residual_dims(128, None, 1), k=N.SKETCH_K, seed=1)
    first = U.fit_mlp_batch(groups, base, model, sketch, full=True, seed=1, draws=19)
    every = U.fit_mlp_batch(groups, base, model, sketch, full=True, seed=1, draws=19, fit_all=True)
    assert not first.recovered and not every.recovered
    assert first.fitted == 0 and every.fitted == 64
    assert first.heldout.to_dict() == every.heldout.to_dict()
    assert {k: v.to_dict() for k, v in first.agreement.items()} == {k: v.to_dict() for k, v in every.agreement.items()}
    assert all(m is None for m in first.maps) and all(m is not None for m in every.maps)


def test_card_and_html_report_say_which_experts_were_read(moe):
    from hf_provenance.report.card import render_section
    from hf_provenance.report.html import render_html

    doc = compare(moe["mixed"], [moe["base"]], sample=0.1, seed=2).to_dict()
    line = "12 of 128 routed experts in 2 layers, whole: a stratified sample per layer"
    assert line in render_section(doc)
    assert line in render_html(doc)
    full = compare(moe["mixed"], [moe["base"]]).to_dict()
    assert "routed experts in" not in render_section(full)


@pytest.mark.parametrize("transform, source, verdict, relation", [
    ("shuffle_experts", "noisy", "derived", "permuted"),   # experts re-paired by the search, then drawn
    ("stack_experts", "base", "identical", "copy"),        # one side stacked: paired expert by expert, then drawn
])
def test_expert_sampling_follows_the_expert_pairing(moe, tmp_path_factory, transform, source, verdict, relation):
    folder = str(apply_transform(moe[source], tmp_path_factory.mktemp(transform) / "m", transform))
    c = _run(folder, moe["base"], sample=0.1, seed=4)
    assert c["verdict"] == verdict and relation in c["relation"], c["reasons"]
    assert c["io"]["expert_sample"]["experts_read"] == 12 and c["io"]["expert_sample"]["experts"] == 128
    drawn = [t for t in c["tensors"] if t["expert_sample"] is not None]
    assert len(drawn) == 36 and all(t["pearson"]["value"] > 0.85 for t in drawn)


def test_group_interval_is_the_expansion_estimators():
    """Four of ten experts drawn, one tensor each (read fully), beside a dense tensor as large as the ten experts:
    r̄ = ½·dense + ½·mean(experts), and its variance is (½)²·(1 − 4/10)·s²/4, the textbook one for a simple random
    sample's mean."""
    from types import SimpleNamespace

    from hf_provenance.measurement.experts import ExpertDraw
    from hf_provenance.statistics import aggregate
    from hf_provenance.statistics.thresholds import load

    def tensor(r, numel, draw=None):
        stat = SimpleNamespace(value=r, ci=(r, r), z=r * 1e3, p=1e-10)
        return SimpleNamespace(evidence=True, pearson=stat, cosine=SimpleNamespace(value=r), numel=numel,
                               expert_draw=draw, weight=draw.weight if draw else 1.0)

    rs = [0.9, 0.1, 0.5, 0.3]
    experts = [tensor(r, 100, ExpertDraw("blk.0", e, 10, 4)) for e, r in zip((0, 3, 5, 8), rs)]
    g = aggregate.group("x", experts + [tensor(0.7, 1000)], load())
    assert g.params == 2000
    assert g.r_mean == pytest.approx(0.5 * 0.7 + 0.5 * np.mean(rs))
    se = 0.5 * np.sqrt((1 - 4 / 10) * np.var(rs, ddof=1) / 4)
    assert g.ci == pytest.approx((g.r_mean - 1.96 * se, g.r_mean + 1.96 * se))


def test_sampled_moe_over_the_hub_fetches_only_the_drawn_experts(moe, monkeypatch, tmp_path):
    """Over HTTP range requests (the fake Hub on 127.0.0.1): the same verdict and expert sample as from disk, and
    the weight bytes served stay near what the local run reads, far below the checkpoints."""
    from hf_provenance.sources import open_model
    from tests.hub_server import FakeHub

    with FakeHub() as hub:
        hub.add_repo("org/moe-base", moe["base"])
        hub.add_repo("org/moe-mixed", moe["mixed"])
        for k, v in {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_PROVENANCE_HTTP_BACKOFF": "0",
                     "HF_PROVENANCE_RANGE_CACHE": str(tmp_path / "ranges")}.items():
            monkeypatch.setenv(k, v)
        local = _run(moe["mixed"], moe["base"], sample=0.1, seed=2)
        hub.reset_counts()
        remote = _run("org/moe-mixed", "org/moe-base", sample=0.1, seed=2)
        served = hub.served(None, ".safetensors")
    weights = sum(i.nbytes for f in (moe["base"], moe["mixed"]) for i in open_model(f).inventory.values())
    assert remote["verdict"] == local["verdict"] == "derived"
    assert remote["io"]["expert_sample"] == local["io"]["expert_sample"]
    assert sorted(t["name"] for t in remote["tensors"]) == sorted(t["name"] for t in local["tensors"])
    print(f"served {served / weights:.3f} of the weight bytes; local fraction_read {local['io']['fraction_read']:.3f}")
    assert served < 0.3 * weights, served / weights  # 0.22 here; every expert read would be about 1
