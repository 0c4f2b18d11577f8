"""MLP unit and attention head maps: transforms that hide them, their recovery, and the coupling-matched null."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats as st

from hf_provenance.alignment import nulls as N
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.residual import apply_residual, embedding_pair, fit_residual
from hf_provenance.alignment.units import assign, expand, grouped_assign, unit_plan
from hf_provenance.factory.transforms import couple_units_state_dict
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.sources import open_model
from hf_provenance.statistics import aggregate
from hf_provenance.statistics.tensor import summarize
from hf_provenance.statistics.thresholds import load as load_thresholds
from hf_provenance.verdict import decide
from tests.helpers import permute_residual

TH = load_thresholds()


# --- helpers ---------------------------------------------------------------------------------------------------

def perms_of(folder) -> dict:
    return json.loads((Path(folder) / "factory.json").read_text())["transform"]["plan"]["perms"]


def measure(plan, base, model, sample=None):
    tensors = [summarize(m) for m in measure_plan(plan, base, model, fraction=sample, seed=0)]
    comps = aggregate.by(tensors, lambda t: t.component, TH)
    verdict = decide(tensors, comps, TH, aligned_params=plan.compared_params, containment={}, sampled=bool(sample),
                     not_compared=[])
    return tensors, verdict


def clears(t) -> bool:
    r, z = t.pearson.value, t.pearson.z
    return bool(t.evidence and r is not None and z is not None and abs(r) >= TH.r_derived and abs(z) >= TH.z_derived)


def pair_of(plan, name_part: str):
    hits = [p for p in plan.pairs if name_part in p.base_name and not p.is_vector]
    assert len(hits) == 1, (name_part, [p.base_name for p in hits])
    return hits[0]


def logits(folder, masked=False):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    m = cls.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(input_ids=ids).logits


def run(base_dir, model_dir, **kw):
    base, model = open_model(str(base_dir)), open_model(str(model_dir))
    plan, _ = identity_plan(base, model)
    return base, model, plan, unit_plan(base, model, plan, seed=0, **kw)


# --- matching primitives -----------------------------------------------------------------------------------------

def test_assign_recovers_a_noisy_permutation_through_mutual_best_rounds_and_lap():
    g = torch.Generator().manual_seed(0)
    n, k = 3000, 64
    a = torch.randn(n, k, generator=g)
    perm = torch.randperm(n, generator=g)
    b = a[perm] + 0.8 * torch.randn(n, k, generator=g)      # row perm[j] of a sits at row j of b
    sa, sb = N.unit_rows(a), N.unit_rows(b)
    fit = assign(sa, sb, lap_max=256, block=512)
    truth = torch.argsort(perm).numpy()                      # a's row i is b's row argsort(perm)[i]
    assert fit.mutual_best > 0 and fit.lap_size <= 256 and fit.rounds >= 1
    assert (fit.perm == truth).mean() > 0.99
    assert sorted(fit.perm.tolist()) == list(range(n))       # one-to-one


def test_assign_fast_path_equals_plain_linear_assignment():
    """The mutual-best rounds commit only pairs the full assignment also makes (well-separated case)."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(1)
    a = N.unit_rows(torch.randn(400, 32, generator=g))
    b = N.unit_rows(a[torch.randperm(400, generator=g)] + 0.05 * torch.randn(400, 32, generator=g))
    _, ci = linear_sum_assignment((a @ b.T).numpy(), maximize=True)
    assert np.array_equal(assign(a, b, lap_max=8).perm, ci)
    assert np.array_equal(assign(a, b, lap_max=10_000).perm, ci)
    # unrelated rows: the greedy rounds cost little against the optimum
    c = N.unit_rows(torch.randn(400, 32, generator=g))
    sim = (a @ c.T).numpy()
    ri, ci = linear_sum_assignment(sim, maximize=True)
    fast = assign(a, c, lap_max=8)
    assert fast.score.sum() >= 0.9 * sim[ri, ci].sum()


def test_grouped_assign_moves_heads_only_with_their_kv_group():
    rng = np.random.default_rng(0)
    n, r = 8, 4                                            # 8 query heads, 2 KV groups of 4
    sim = rng.normal(size=(n, n)) * 0.1
    truth = np.array([6, 4, 7, 5, 1, 3, 0, 2])             # group 0 -> group 1 and back, heads shuffled inside
    sim[np.arange(n), truth] += 1.0
    heads, groups = grouped_assign(sim, r)
    assert heads.tolist() == truth.tolist() and groups.tolist() == [1, 0]
    # a tempting cross-group match is refused: heads of one base group land in one model group
    sim2 = sim.copy()
    sim2[0, 0] += 5.0
    heads2, _ = grouped_assign(sim2, r)
    assert len({int(h) // r for h in heads2[:4]}) == 1


def test_sketch_bucket_permutation_is_a_signed_residual_permutation():
    """The null's core claim: a signed permutation of the buckets = the sketch of S·P·x for some residual P."""
    h = 640
    sk = N.ResidualSketch.build(h, np.arange(h), k=64, seed=3)
    assert sk.per_bucket == 10 and not sk.exact
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(0))
    t = sk.draw(np.random.default_rng(1))
    # build the residual signed permutation: bucket j's dims receive bucket perm[j]'s dims, signs to match
    members = {b: np.nonzero(sk.bucket == b)[0] for b in range(sk.k)}
    src = np.arange(h)
    eta = np.ones(h, np.float32)
    for j in range(sk.k):
        for d, d2 in zip(members[j], members[int(t.perm[j])]):
            src[d] = d2
            eta[d] = float(t.sign[j]) * sk.sign[d] * sk.sign[d2]
    moved = x[:, torch.from_numpy(src)] * torch.from_numpy(eta)
    assert torch.allclose(sk.sketch_cols(moved), t.cols(sk.sketch_cols(x)), atol=1e-5)
    # rows too (ffn_down is sketched over rows): same permutation
    assert torch.allclose(sk.sketch_rows(moved.T.contiguous(), np.arange(h)).T,
                          t.cols(sk.sketch_rows(x.T.contiguous(), np.arange(h)).T), atol=1e-5)
    # draws never mix the halves (split-half statistics stay defined)
    half0 = set(sk.halves[0].tolist())
    assert all((int(t.perm[j]) in half0) == (j in half0) for j in range(sk.k))


def test_null_test_p_value_and_z():
    t = N.NullTest("x", 0.5, np.array([0.0, 0.1, -0.1, 0.6]))
    assert t.p == pytest.approx(2 / 5) and not t.exceeds_all
    t = N.NullTest("x", 0.9, np.zeros(99) + np.linspace(-0.01, 0.01, 99))
    assert t.p == pytest.approx(0.01) and t.exceeds_all and t.z > 100


def test_a_null_that_cannot_change_the_decision_is_short_and_a_prefix_of_the_full_one():
    """Decisions need the observed statistic ≥ r_derived: below it the null only informs the report, so
    SHORT_DRAWS of the same candidates are drawn; at or above it, every draw (the decision needs them)."""
    sk = N.ResidualSketch.build(256, np.arange(256), k=32, seed=0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))

    def stats(level, other=0.0):
        def f(t):
            y = x if t is None else t.rows(x)
            if t is None:
                return {"heldout": level, "other": other}
            return {"heldout": float(y[:, 0].mean()), "other": float(y[:, 1].mean())}
        return f

    low = N.simulate(stats(TH.r_derived - 0.01), sk, draws=99, seed=4)
    high = N.simulate(stats(TH.r_derived), sk, draws=99, seed=4)
    assert len(low["heldout"].draws) == N.SHORT_DRAWS and len(high["heldout"].draws) == 99
    assert np.array_equal(low["other"].draws, high["other"].draws[:N.SHORT_DRAWS])
    assert "candidates only" in low["heldout"].method and "candidates only" not in high["heldout"].method
    # any decisive statistic at the threshold keeps the whole null; no decisive statistic: always whole
    both = ("heldout", "other")
    assert len(N.simulate(stats(0.0, TH.r_derived), sk, draws=99, decisive=both)["other"].draws) == 99
    assert len(N.simulate(stats(0.0, 0.0), sk, draws=99, decisive=both)["other"].draws) == N.SHORT_DRAWS
    assert len(N.simulate(stats(0.0), sk, draws=99, decisive=())["heldout"].draws) == 99


# --- transforms: function-preserving ---------------------------------------------------------------------------

@pytest.mark.parametrize("family, variant", [
    ("llama", "permute_units"), ("qwen3_moe", "permute_units"), ("deepseek_v3", "permute_units"),
    ("bert", "permute_units"), ("llama", "rescale_units"), ("qwen3_moe", "rescale_units"),
    ("deepseek_v3", "rescale_units"),
])
def test_unit_transforms_preserve_the_function(make, family, variant):
    base, model = make(family), make(family, variant)
    masked = family == "bert"
    ref, got = logits(base, masked), logits(model, masked)
    assert torch.allclose(ref, got, atol=1e-4), float((ref - got).abs().max())
    a, b = load_file(f"{base}/model.safetensors"), load_file(f"{model}/model.safetensors")
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed                                     # the tensors did move
    assert all(("mlp" in k or "attn" in k or "attention" in k or "intermediate" in k or "output.dense" in k)
               for k in changed)


def test_rescale_units_refuses_ungated_mlps(make, tmp_path):
    from hf_provenance.factory import apply_transform

    with pytest.raises(ValueError, match="no gated MLP"):
        apply_transform(make("bert"), tmp_path / "x", "rescale_units")


def test_permute_units_records_gqa_respecting_head_maps(make):
    folder = make("llama", "permute_units")
    perms = perms_of(folder)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    r = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    for layer in range(cfg["num_hidden_layers"]):
        heads, groups = perms[f"layer{layer}.heads"], perms[f"layer{layer}.kv_groups"]
        assert sorted(heads) == list(range(cfg["num_attention_heads"]))
        assert [h // r for h in heads] == [g for g in groups for _ in range(r)]   # heads stay in their group


# --- recovery --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "bert"])
def test_permuted_copy_maps_recovered_exactly_and_tensors_meet(make, family):
    folder = make(family, "permute_units")
    base, model, plan, out = run(make(family), folder)
    assert out is not None
    new, summary, lines = out
    json.dumps(summary, allow_nan=False)                     # JSON-safe for alignment.units / alignment.heads
    perms = perms_of(folder)
    for name, perm in perms.items():
        inv = np.argsort(perm)
        layer = int(name.split(".")[0].removeprefix("layer"))
        if name.endswith(".mlp") or ".expert" in name or name.endswith(".shared"):
            role = {"mlp": ("mlp.gate_proj" if family != "bert" else "intermediate.dense"),
                    "shared": "mlp.shared_experts.gate_proj"}
            kind = name.split(".")[1]
            if kind == "expert":
                e = int(name.split(".expert")[-1])
                part = f"layers.{layer}.mlp.experts.{e}.gate_proj"
            else:
                part = f"{'layers' if family != 'bert' else 'layer'}.{layer}.{role[kind]}."
            assert np.array_equal(pair_of(new, part).cand_rows, inv), name
        elif name.endswith(".heads"):
            o = pair_of(new, f".{layer}.self_attn.o_proj" if family != "bert" else f".{layer}.attention.output.dense")
            block = o.n_cols // len(perm)
            assert np.array_equal(o.col_map, expand(inv, block)), name
    assert summary["units"]["recovered"] == summary["units"]["batches"]
    assert summary["heads"]["recovered"] == summary["heads"]["batches"]
    assert any(line.startswith("MLP units: permutation recovered") or line.startswith("routed-expert units")
               for line in lines)
    tensors, verdict = measure(new, base, model)
    moved = [t for t in tensors if t.component in ("attention", "dense_mlp", "routed_experts", "shared_experts")
             and len(t.shape) == 2]
    assert moved and all(t.pearson.value > 0.999 for t in moved), [(t.name, t.pearson.value) for t in moved]
    fitted = [t for t in moved if not t.evidence]
    assert fitted and all(("down" in t.name or "o_proj" in t.name or "output.dense" in t.name) for t in fitted)
    assert verdict.verdict in ("identical", "derived")          # bit-equal once the maps are applied


def test_identity_is_best_returns_none(make):
    base, model, plan, out = run(make("llama"), make("llama", "noise", scale=0.3))
    assert out is None


def test_noisy_permuted_copy_mostly_recovered_and_derived(make):
    folder = make("llama", "permute_units", noise=0.5)
    base, model, plan, out = run(make("llama"), folder)
    new, summary, lines = out
    perms = perms_of(folder)
    hits = [np.mean(pair_of(new, f"layers.{L}.mlp.gate_proj").cand_rows == np.argsort(perms[f"layer{L}.mlp"]))
            for L in range(4)]
    assert min(hits) > 0.9, hits
    for layer in summary["units"]["layers"]:
        assert layer["recovered"] and layer["heldout_r"]["z"] > 20
    tensors, verdict = measure(new, base, model)
    assert verdict.verdict == "derived", verdict.reasons
    gate_up = [t for t in tensors if t.component == "dense_mlp" and t.evidence]
    assert gate_up and all(clears(t) for t in gate_up)
    # Pearson of x and x + 0.5σε is 1/√1.25 = 0.894
    assert all(t.pearson.value == pytest.approx(0.894, abs=0.03) for t in gate_up)


def test_rescaled_and_permuted_copy_recovered(make, tmp_path):
    """Scale-invariant signatures: up×c, down÷c per unit hides nothing."""
    from hf_provenance.factory import apply_transform

    permuted = make("llama", "permute_units")
    folder = apply_transform(permuted, tmp_path / "rescaled", "rescale_units", spread=1.5)
    base, model, plan, out = run(make("llama"), folder)
    new, summary, _ = out
    perms = perms_of(permuted)
    for layer in range(4):
        assert np.array_equal(pair_of(new, f"layers.{layer}.mlp.gate_proj").cand_rows,
                              np.argsort(perms[f"layer{layer}.mlp"]))
    tensors, verdict = measure(new, base, model)
    assert verdict.verdict == "derived"
    gates = [t for t in tensors if "gate_proj" in t.name]
    assert all(t.pearson.value > 0.999 for t in gates)          # gate rows untouched by the rescaling


def test_rescaled_copy_is_derived(make):
    base, model = open_model(make("llama")), open_model(make("llama", "rescale_units"))
    plan, _ = identity_plan(base, model)
    assert unit_plan(base, model, plan, seed=0) is None        # units in place: the identity map is best
    tensors, verdict = measure(plan, base, model)
    assert verdict.verdict == "derived"


def test_units_recovered_after_the_residual_map(make, tmp_path):
    """Residual dims permuted and sign-flipped on top of units and heads: the maps compose in base index space."""
    permuted = make("llama", "permute_units", noise=0.2)
    dst = tmp_path / "both"
    permute_residual(Path(permuted), dst)
    base, model = open_model(make("llama")), open_model(str(dst))
    plan, _ = identity_plan(base, model)
    fit = fit_residual(embedding_pair(plan), base, model, signs=True, seed=0)
    assert fit.heldout_r > 0.9
    plan, _ = apply_residual(plan, fit, embedding_pair(plan).n_cols)
    new, summary, _ = unit_plan(base, model, plan, seed=0)
    perms = perms_of(permuted)
    for layer in range(4):
        assert np.mean(pair_of(new, f"layers.{layer}.mlp.gate_proj").cand_rows
                       == np.argsort(perms[f"layer{layer}.mlp"])) > 0.95
    tensors, verdict = measure(new, base, model)
    assert verdict.verdict == "derived"
    held = [t for t in tensors if t.evidence and t.component in ("attention", "dense_mlp")]
    assert held and all(t.pearson.value > 0.9 for t in held)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Random-init llama with a residual width above the sampled minimum (so sampling reads fewer rows)."""
    from hf_provenance.factory import apply_transform, build_random

    root = tmp_path_factory.mktemp("wide")
    base = build_random("llama", root / "base", seed=0, hidden=1024, layers=1, intermediate=1536, vocab=256,
                        dtype="float32", heads=8, kv_heads=2)
    perm = apply_transform(base, root / "perm", "permute_units", noise=0.5)
    return str(base), str(perm)


def test_sampled_fit_reads_a_sample_of_down_rows_and_still_recovers(wide):
    base_dir, perm_dir = wide
    base, model = open_model(base_dir), open_model(perm_dir)
    plan, _ = identity_plan(base, model)
    before = model.reader.bytes_read
    new, summary, _ = unit_plan(base, model, plan, seed=0, sample=0.1)
    read = model.reader.bytes_read - before
    down = model.inventory["model.layers.0.mlp.down_proj.weight"].nbytes
    o = model.inventory["model.layers.0.self_attn.o_proj.weight"].nbytes
    assert read <= 0.55 * (down + o)                          # 512 of 1024 residual rows, nothing else
    assert summary["units"]["sketch"]["dims_read"] == 512 and summary["units"]["layers"][0]["fit_sources"] == ["down"]
    truth = np.argsort(perms_of(perm_dir)["layer0.mlp"])
    assert np.mean(pair_of(new, "mlp.gate_proj").cand_rows == truth) > 0.99
    tensors, verdict = measure(new, base, model, sample=0.1)
    assert verdict.verdict == "derived"


# --- independent models stay independent --------------------------------------------------------------------------

def _check_independent(base, model, plan, out, *, draws):
    new, summary, lines = out
    json.dumps(summary, allow_nan=False)
    assert summary["units"]["searched_params"] > 0 and summary["units"]["aligned_params"] == 0
    assert summary["units"]["recovered"] == 0 and summary["heads"]["recovered"] == 0
    assert not summary["units"]["applied"] and not summary["heads"]["applied"]
    assert all("no correspondence found" in line for line in lines[:2])
    for what in ("units", "heads"):
        for layer in summary[what]["layers"]:
            assert layer["heldout_r"]["z"] < TH.z_derived
            # below the effect threshold no null can change the decision: the short null, said in its method
            short = layer["heldout_r"]["value"] < TH.r_derived
            assert short == ("candidates only" in layer["heldout_r"]["null_method"])
            for name, a in layer["agreement"].items():
                assert a["p"] >= 0.01, (what, layer["layer"], name, a)
                assert a["n"] == (min(draws, N.SHORT_DRAWS) if short else draws)
    tensors, verdict = measure(new, base, model)
    assert not [t.name for t in tensors if clears(t)]
    return summary


@pytest.mark.parametrize("family, seeds", [("llama", None), ("llama", (5, 6)), ("qwen3_moe", None),
                                           ("deepseek_v3", None)])
def test_independent_models_stay_independent_with_matching_enabled(make, family, seeds):
    if seeds is None:
        a, b = make(family), make(family, "independent")
    else:
        a, b = make(family, seed=seeds[0]), make(family, seed=seeds[1])
    base, model, plan, out = run(a, b, draws=99)
    _check_independent(base, model, plan, out, draws=99)
    # even when every fitted map is applied regardless of its test, nothing clears on natural models
    forced = unit_plan(base, model, plan, seed=0, apply_all=True)[0]
    tensors, _ = measure(forced, base, model)
    assert not [t.name for t in tensors if clears(t)]


def _couple(src: str, dst: Path, seed: int) -> None:
    shutil.copytree(src, dst)
    sd = couple_units_state_dict(load_file(f"{src}/model.safetensors"), seed)
    save_file(sd, f"{dst}/model.safetensors")


def test_coupled_independent_models_stay_independent_where_chance_would_not(make, tmp_path):
    """gate and up maps agree on most units of two *independent* coupled models: a "chance" test (binomial with
    p = 1/n) calls that overwhelming; the coupling-matched null does not, and the maps are not applied."""
    _couple(make("llama"), tmp_path / "a", 1)
    _couple(make("llama", "independent"), tmp_path / "b", 2)
    draws = 199
    base, model, plan, out = run(tmp_path / "a", tmp_path / "b", draws=draws)
    summary = _check_independent(base, model, plan, out, draws=draws)
    units = summary["units"]["layers"][0]
    gu = units["agreement"]["gate~up"]
    n_units, n_test = 256, 256
    chance_p = st.binom.sf(round(gu["value"] * n_test) - 1, n_test, 1 / n_units)
    assert gu["value"] > 0.5 and chance_p < 1e-100            # chance would say "derived" ...
    assert gu["p"] >= 0.01 and gu["null_mean"] > 0.5          # ... the simulated null reproduces the coupling
    # the danger the gate guards against: forcing the down-fitted maps onto coupled models inflates gate/up
    forced = unit_plan(base, model, plan, seed=0, apply_all=True, draws=19)[0]
    tensors, _ = measure(forced, base, model)
    inflated = [t for t in tensors if t.evidence and ("gate_proj" in t.name or "up_proj" in t.name)]
    assert np.mean([t.pearson.value for t in inflated]) > 0.05


def test_null_draws_move_a_test_units_not_b():
    # a draw t signs and permutes B's buckets; the unit search scores A's test units against unit_cols(t(B)) on
    # each half of the buckets, and the agreement sources against unit_cols(t(B)) on all of them. Both are
    # computed without transforming B: from B centred once (half scores) or normalised once (moved A)
    from hf_provenance.alignment import units as U

    g = torch.Generator().manual_seed(3)
    k, n, u = 64, 50, 7
    b = torch.randn(k, n, generator=g) + 0.5  # an offset per unit, as real sketches have
    t = N.SignedPermutation(torch.randperm(k, generator=g), torch.randint(0, 2, (k,), generator=g).float() * 2 - 1)
    for h in (torch.randperm(k, generator=g)[: k // 2].sort().values, torch.arange(k // 2, k)):
        ah = torch.randn(u, k // 2, generator=g)
        expected = ah @ N.unit_cols(t.rows(b).index_select(0, h))
        got = U._half_scores(t, ah, b - b.mean(1, keepdim=True), h)
        assert torch.allclose(got, expected, atol=1e-5)
    av = torch.randn(u, k, generator=g)
    assert torch.allclose(U._moved(t, av) @ N.unit_cols(b), av @ N.unit_cols(t.rows(b)), atol=1e-5)
    # the identity draw leaves A as it is
    same = N.SignedPermutation(torch.arange(k), torch.ones(k))
    assert torch.equal(U._moved(same, av), av)


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """Three layers with noisy permuted MLP units and heads: several batches for the per-layer fits."""
    from hf_provenance.factory import apply_transform, build_random

    root = tmp_path_factory.mktemp("layered")
    base = build_random("llama", root / "base", seed=0, hidden=512, layers=3, intermediate=768, vocab=256,
                        dtype="float32", heads=8, kv_heads=2)
    return str(base), str(apply_transform(base, root / "perm", "permute_units", noise=0.5))


@pytest.mark.parametrize("sample", [None, 0.1])
def test_layers_fitted_two_at_a_time_give_the_one_thread_result(layered, monkeypatch, sample):
    # under sampling the layers' fits run on two threads (full reads keep one: their sketches are bigger); the maps,
    # the tests and their nulls must be those of one thread, whatever finishes first
    from hf_provenance.alignment import units as U
    from hf_provenance.measurement import stream

    used = []
    real = U.parallel_layers
    monkeypatch.setattr(U, "parallel_layers", lambda workers=None: used.append(workers) or real(workers))
    base_dir, perm_dir = layered

    def run():
        base, model = open_model(base_dir), open_model(perm_dir)
        plan, _ = identity_plan(base, model)
        new, summary, _ = unit_plan(base, model, plan, seed=3, sample=sample)
        return json.dumps(summary, sort_keys=True, default=str), [
            (p.base_name, None if p.cand_rows is None else np.asarray(p.cand_rows).tolist()) for p in new.pairs]

    two = run()
    monkeypatch.setattr(stream, "WORKERS", 1)
    one = run()
    assert used == [1, 1] if sample is None else used == [None, None]
    assert two == one
    truth = np.argsort(perms_of(perm_dir)["layer2.mlp"])
    rows = dict(two[1])["model.layers.2.mlp.gate_proj.weight"]
    assert np.mean(np.asarray(rows) == truth) > 0.99  # and the maps are right
