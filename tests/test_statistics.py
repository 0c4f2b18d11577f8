"""The statistics against truths known by construction: null calibration, sampling intervals, combination."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats

from hf_provenance.measurement.accumulate import PairAccumulator, SimHasher, row_hashes, simhash_distance
from hf_provenance.measurement.sampling import draw
from hf_provenance.statistics import effects as fx
from hf_provenance.statistics.aggregate import bonferroni, cauchy_combine


def _r_z(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    acc = PairAccumulator(n_cols=a.shape[1], keep_blocks=False, sketch=False)
    for s in range(0, a.shape[0], 37):  # odd block size: the streamed sums must not depend on blocking
        acc.update(a[s:s + 37], b[s:s + 37])
    r = fx.ratio(*fx.centred_parts(acc.totals, acc.col_a.numpy(), acc.col_b.numpy(), a.shape[1]))
    return r, fx.z_two_axes(r, a.shape[0], a.shape[1])


def test_streamed_double_centred_pearson_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 40, generator=g) + torch.randn(300, 1, generator=g) + torch.randn(1, 40, generator=g)
    b = 0.5 * a + torch.randn(300, 40, generator=g) + 3.0
    r, _ = _r_z(a, b)
    ad = a.double() - a.double().mean(1, keepdim=True) - a.double().mean(0, keepdim=True) + a.double().mean()
    bd = b.double() - b.double().mean(1, keepdim=True) - b.double().mean(0, keepdim=True) + b.double().mean()
    direct = float((ad * bd).sum() / (ad.norm() * bd.norm()))
    assert r == pytest.approx(direct, abs=1e-6)  # float32 block products, float64 sums


def _structured(rng: np.random.Generator, m: int, n: int, kind: str) -> torch.Tensor:
    if kind == "row_scale":  # heavy row-scale heterogeneity, drawn per model
        x = rng.standard_normal((m, n)) * np.exp(rng.normal(0, 1.0, (m, 1)))
    elif kind == "low_rank":  # rank-8 plus a little noise
        x = rng.standard_normal((m, 8)) @ rng.standard_normal((8, n)) + 0.3 * rng.standard_normal((m, n))
    else:  # column scales and a mean
        x = rng.standard_normal((m, n)) * np.exp(rng.normal(0, 0.7, (1, n))) + 1.0
    return torch.from_numpy(x.astype(np.float32))


def test_nominal_p_values_are_roughly_uniform_under_independence():
    """KS test over 240 independent structured pairs: row-scale heterogeneity, low rank, column scales."""
    rng = np.random.default_rng(1)
    ps = []
    for i in range(240):
        kind = ("row_scale", "low_rank", "col_scale")[i % 3]
        a = _structured(rng, 96, 48, kind)
        b = _structured(rng, 96, 48, kind)
        _, z = _r_z(a, b)
        ps.append(fx.two_sided_p(z))
    ks = stats.kstest(ps, "uniform")
    assert ks.pvalue > 0.01, ks
    assert np.mean(np.array(ps) < 0.05) < 0.1


def test_one_axis_null_is_calibrated_with_shared_row_structure():
    """Rows shared by both models (like token frequency) inflate the two-axis z but not the one-axis z."""
    rng = np.random.default_rng(2)
    zs_one, zs_two = [], []
    for _ in range(60):
        freq = np.exp(rng.normal(0, 1.0, (400, 1)))  # the same row scales in both models
        a = torch.from_numpy((freq * rng.standard_normal((400, 32))).astype(np.float32))
        b = torch.from_numpy((freq * rng.standard_normal((400, 32))).astype(np.float32))
        acc = PairAccumulator(n_cols=32, keep_blocks=False, sketch=True, seed=int(rng.integers(1 << 30)))
        acc.update(a, b)
        ca, cb = acc.col_a.numpy(), acc.col_b.numpy()
        num, da, db = fx.centred_parts(acc.totals, ca, cb, 32)
        zs_one.append(fx.z_one_axis(num, acc.sketch_acc.numpy(), ca, cb, 400, 32, acc._g.numpy().astype(float)))
        zs_two.append(fx.z_two_axes(fx.ratio(num, da, db), 400, 32))
    assert 0.7 < np.std(zs_one) < 1.4
    assert np.std(zs_two) > np.std(zs_one)


def test_permutation_test_1d():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200)
    p_dep, z_dep = fx.permutation_test_1d(a, a + 0.5 * rng.standard_normal(200), n_perm=999)
    assert p_dep == pytest.approx(1 / 1000) and z_dep > 6
    ps = [fx.permutation_test_1d(rng.standard_normal(50), rng.standard_normal(50), n_perm=199, seed=i)[0]
          for i in range(100)]
    assert 0.02 < np.mean(np.array(ps) < 0.1) < 0.2
    # constant vectors: undefined, not NaN in a verdict
    p, z = fx.permutation_test_1d(np.ones(10), rng.standard_normal(10))
    assert np.isnan(p) and np.isnan(z)


def test_cauchy_combination_and_bonferroni():
    assert cauchy_combine([0.5]) == pytest.approx(0.5)
    assert cauchy_combine([1e-300, 0.9]) < 1e-200
    assert cauchy_combine([0.01] * 10) == pytest.approx(0.01, rel=0.05)  # identical p-values keep their level
    assert bonferroni([0.01, 0.5]) == pytest.approx(0.02)
    assert cauchy_combine([]) is None


def test_sampling_blocks_and_strata():
    rng = np.random.default_rng(0)
    full = draw(1000, 4096, 0.1, rng)  # 64-row blocks of 256 KiB: 16 blocks < 30 → read fully
    assert full.full and full.rows_read == 1000
    s = draw(100_000, 1024, 0.1, rng)  # 256 rows per block, 391 blocks
    assert not s.full and 0.08 < s.fraction < 0.12
    assert all(b - a >= 64 for a, b in s.blocks[:-1])
    assert len(set(s.strata)) == len(s.stratum_sizes)
    assert all(s.strata.count(h) == 2 for h in set(s.strata))


@pytest.mark.parametrize("n_cols", [256, 3000, 40])  # one bucket per column group; narrow tensors use row groups
def test_simhash_tracks_correlation_and_survives_bf16(n_cols):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, n_cols, generator=g)

    def digest(x):
        h = SimHasher(n_cols, seed=5)
        for s in range(0, 512, 100):
            h.update(x[s:s + 100], s)
        return h.digest()

    da = digest(a)
    assert digest(a) == da  # deterministic
    assert simhash_distance(da, digest(a.bfloat16().float())) <= 8
    assert simhash_distance(da, digest(-a)) == 256
    for rho in (0.9, 0.5, 0.0):
        b = rho * a + np.sqrt(1 - rho ** 2) * torch.randn(512, n_cols, generator=g)
        expected = 256 * np.arccos(rho) / np.pi
        assert abs(simhash_distance(da, digest(b)) - expected) < 30


def test_row_hashes_exact_and_dtype_independent():
    x = torch.randn(10, 16)
    h = row_hashes(x)
    assert len(set(h.tolist())) == 10
    y = x.clone()
    y[3, 5] = torch.nextafter(y[3, 5], torch.tensor(10.0))
    h2 = row_hashes(y)
    assert (h == h2).sum() == 9 and h[3] != h2[3]
    xb = x.bfloat16()
    assert np.array_equal(row_hashes(xb), row_hashes(xb.float()))


@pytest.fixture(scope="module")
def sampled_pair(tmp_path_factory):
    """A derived pair large enough to be sampled: effect varies along the rows (so strata matter)."""
    d = tmp_path_factory.mktemp("sampled")
    g = torch.Generator().manual_seed(0)
    rows, cols = 120_000, 64
    a = torch.randn(rows, cols, generator=g)
    noise_scale = torch.linspace(0.3, 3.0, rows).unsqueeze(1)
    b = a + noise_scale * torch.randn(rows, cols, generator=g)
    for name, t in (("base", a), ("model", b)):
        (d / name).mkdir()
        save_file({"model.layers.0.mlp.down_proj.weight": t.contiguous()}, str(d / name / "model.safetensors"))
    ad = a.double() - a.double().mean(1, keepdim=True) - a.double().mean(0, keepdim=True) + a.double().mean()
    bd = b.double() - b.double().mean(1, keepdim=True) - b.double().mean(0, keepdim=True) + b.double().mean()
    return str(d / "base"), str(d / "model"), float((ad * bd).sum() / (ad.norm() * bd.norm()))


def test_sampled_intervals_cover_the_full_value(sampled_pair):
    """Across 120 seeds the 95% interval of the sampled Pearson covers the full-read value 90-98% of the time."""
    from hf_provenance.compare import compare

    base, model, direct = sampled_pair
    full = compare(model, [base]).to_dict()["comparisons"][0]["tensors"][0]
    truth = full["pearson"]["value"]
    assert truth == pytest.approx(direct, abs=1e-6)  # the streamed full read is the exact value
    assert full["fraction_read"] == 1.0
    hits, fractions = 0, []
    n = 120
    for seed in range(n):
        t = compare(model, [base], sample=0.1, seed=seed).to_dict()["comparisons"][0]["tensors"][0]
        lo, hi = t["pearson"]["ci"]
        hits += lo <= truth <= hi
        fractions.append(t["fraction_read"])
    print(f"coverage {hits}/{n} = {hits / n:.3f}, mean fraction read {np.mean(fractions):.3f}")
    assert 0.90 <= hits / n <= 0.98, hits / n
    assert 0.08 < np.mean(fractions) < 0.13


def test_simhash_and_sums_through_the_stream_equal_direct_ones(sampled_pair):
    """The stream fuses the SimHash projection with the column sums on its loader threads: same digests and the
    same Pearson as hashing and summing the tensors directly."""
    from safetensors.torch import load_file

    from hf_provenance.alignment.identity import identity_plan
    from hf_provenance.measurement.stream import measure_plan
    from hf_provenance.sources import open_model

    base_dir, model_dir, direct_r = sampled_pair
    base, model = open_model(base_dir), open_model(model_dir)
    plan, _ = identity_plan(base, model)
    (m,) = measure_plan(plan, base, model, fraction=None, seed=3)
    for digest, folder in ((m.simhash_a, base_dir), (m.simhash_b, model_dir)):
        x = next(iter(load_file(f"{folder}/model.safetensors").values()))
        h = SimHasher(x.shape[1], seed=3)
        for s in range(0, x.shape[0], 777):
            h.update(x[s:s + 777], s)
        assert digest == h.digest()
    r = fx.ratio(*fx.centred_parts(m.acc.totals, m.acc.col_a.numpy(), m.acc.col_b.numpy(), 64))
    assert r == pytest.approx(direct_r, abs=1e-6)
    assert 0 < simhash_distance(m.simhash_a, m.simhash_b) < 128


def test_delete_one_block_values_equal_a_direct_recomputation(sampled_pair):
    """The jackknife's delete-one statistics, formed for all blocks at once from the kept block sums, equal the
    statistic recomputed from the tensors' rows with block b dropped and its stratum's other blocks reweighted."""
    from safetensors.torch import load_file

    from hf_provenance.alignment.identity import identity_plan
    from hf_provenance.measurement.accumulate import unshift
    from hf_provenance.measurement.stream import measure_plan
    from hf_provenance.sources import open_model
    from hf_provenance.statistics.tensor import _loo

    base_dir, model_dir, _ = sampled_pair
    plan, _ = identity_plan(open_model(base_dir), open_model(model_dir))
    (m,) = measure_plan(plan, open_model(base_dir), open_model(model_dir), fraction=0.1, seed=5)
    a, b = (next(iter(load_file(f"{d}/model.safetensors").values())).double() for d in (base_dir, model_dir))
    blocks, strata = m.sample.blocks, np.array(m.sample.strata)
    assert len(blocks) == len(strata) >= 8 and len(set(strata.tolist())) >= 4
    n = a.shape[1]

    def sums(x, y):  # the SCALARS and column sums of rows x, y, computed directly
        rx, ry = x.sum(1), y.sum(1)
        t = [x.shape[0], x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(), (rx * ry).sum(),
             (rx * rx).sum(), (ry * ry).sum()]
        return np.array([float(v) for v in t]), x.sum(0).numpy(), y.sum(0).numpy()

    per = [sums(a[s:e], b[s:e]) for s, e in blocks]
    expect_r, expect_c = [], []
    for i, h in enumerate(strata):
        mates = [j for j in range(len(blocks)) if strata[j] == h and j != i]
        w = (len(mates) + 1) / len(mates)
        parts = [tuple(w * p for p in per[j]) for j in mates] + [per[j] for j in range(len(blocks)) if strata[j] != h]
        t, ca, cb = (sum(p[k] for p in parts) for k in range(3))
        expect_r.append(fx.ratio(*fx.centred_parts(t, ca, cb, n)))
        expect_c.append(fx.cosine(t))
    got_r, got_c = _loo(m.acc, strata, lambda t, ca, cb: fx.ratios(*fx.centred_parts(t, ca, cb, n)),
                        lambda t, ca, cb: fx.cosines(unshift(t, n, m.acc.shift_a, m.acc.shift_b)))
    np.testing.assert_allclose(got_r, expect_r, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_c, expect_c, rtol=0, atol=1e-6)
    assert np.ptp(got_r) > 1e-4  # the blocks differ (noise grows along the rows): a constant would not pass


def test_stratified_jackknife_interval_equals_its_formula():
    """v = Σ_h (1 − n_h/N_h)(n_h − 1)/n_h Σ_b (θ_(hb) − θ̄_h)², Student t with Σ(n_h − 1) df; a stratum of one
    block adds neither variance nor a degree of freedom."""
    loo = [0.1, 0.3, 0.2, 0.6, 0.5, 0.4]
    strata, sizes = [0, 0, 1, 1, 1, 2], [10, 12, 5]
    m1 = (0.2 + 0.6 + 0.5) / 3
    v = (1 - 2 / 10) * (1 / 2) * ((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) \
        + (1 - 3 / 12) * (2 / 3) * ((0.2 - m1) ** 2 + (0.6 - m1) ** 2 + (0.5 - m1) ** 2)
    half = stats.t.ppf(0.975, 3) * np.sqrt(v)
    lo, hi = fx.jackknife_ci(0.35, loo, strata, sizes, fisher_scale=False)
    assert (lo, hi) == pytest.approx((0.35 - half, 0.35 + half), abs=1e-12)
    lo, hi = fx.jackknife_ci(0.35, loo, strata, sizes)  # on Fisher's z scale
    zl = np.arctanh(loo)
    vz = (1 - 2 / 10) * (1 / 2) * np.sum((zl[:2] - zl[:2].mean()) ** 2) \
        + (1 - 3 / 12) * (2 / 3) * np.sum((zl[2:5] - zl[2:5].mean()) ** 2)
    hz = stats.t.ppf(0.975, 3) * np.sqrt(vz)
    assert (lo, hi) == pytest.approx((np.tanh(np.arctanh(0.35) - hz), np.tanh(np.arctanh(0.35) + hz)), abs=1e-12)


def test_t_quantiles_match_scipy_without_importing_it():
    # exact series for df <= EXACT_DF, Cornish-Fisher beyond: both within 1e-9 of scipy across the range used
    from scipy.special import stdtrit

    from hf_provenance.statistics.tdist import EXACT_DF, t_quantile

    dfs = [*range(1, 2 * EXACT_DF + 10), 1000, 10**5]
    for df in dfs:
        for q in (0.51, 0.6, 0.9, 0.975, 0.995, 0.9995, 0.025, 0.3):
            assert t_quantile(df, q) == pytest.approx(float(stdtrit(df, q)), rel=1e-9, abs=1e-12), (df, q)
    assert t_quantile(0, 0.975) == float("inf") and t_quantile(7, 0.5) == 0.0
    with pytest.raises(ValueError):
        t_quantile(3, 1.0)


def test_a_sampled_compare_does_not_import_scipy(sampled_pair):
    # scipy.special cost every sampled run 0.09-0.16 s of import for the intervals' t quantiles
    import subprocess
    import sys

    base, model, _ = sampled_pair
    code = ("import sys; from hf_provenance.compare import compare; "
            f"t = compare({model!r}, [{base!r}], sample=0.1).comparisons[0].tensors[0]; "
            "assert t.pearson.ci is not None and t.fraction_read < 0.2, t.fraction_read; "
            "print(sorted(m for m in sys.modules if m.startswith('scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("blocks", [1, 3])
def test_cpu_and_accelerator_reductions_give_the_same_sums(blocks):
    # the CPU reduces a group with numpy, an accelerator with torch (_device_sums, run here on CPU tensors): both
    # must give the same per-block sums, equal-element count and extremes of the differences
    from hf_provenance.measurement import accumulate as acc_mod

    g = torch.Generator().manual_seed(5)
    a = torch.randn(blocks * 40, 96, generator=g).bfloat16().float()
    b = a.clone()
    b[::3] += 0.25 * torch.randn(b[::3].shape, generator=g).bfloat16().float()
    acc = PairAccumulator(n_cols=96, keep_blocks=True, sketch=False)
    sa, sb = acc.side(a, "a", blocks), acc.side(b, "b", blocks)
    d = (sa.raw - sb.raw).reshape(-1)
    cpu_blocks, cpu_tot = acc_mod._cpu_sums(sa, sb, d, blocks, 40)
    dev_blocks, dev_tot = acc_mod._device_sums(sa, sb, d, blocks, 40)
    assert cpu_blocks.shape == dev_blocks.shape == (8, blocks)
    np.testing.assert_allclose(cpu_blocks, dev_blocks, rtol=1e-5, atol=1e-3)
    assert cpu_tot[1] == dev_tot[1] == int((a == b).sum()) > 0  # equal elements, exactly
    assert cpu_tot[0] == pytest.approx(dev_tot[0], rel=1e-5)
    assert (cpu_tot[2], cpu_tot[3]) == (dev_tot[2], dev_tot[3]) == (-float(d.min()), float(d.max()))
