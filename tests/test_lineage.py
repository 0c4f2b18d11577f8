"""Lineage among several bases (alignment.lineage): the star geometry of (model, base i, base j).

Synthetic vectors with known branches test the geometry and the tolerance; factory fine-tunes with known family
trees test compare(): siblings meet outside, a parent among the bases is the junction, a chain's middle model is
the junction, a model at the junction keeps its relations, a merge stays a merge, an independent base gets nothing.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from hf_provenance.alignment.keys import CanonicalKey
from hf_provenance.alignment.lineage import TOLERANCE, branches, fit_lineage, read_triple
from hf_provenance.alignment.merge import GramSums
from hf_provenance.compare import compare

# ------------------------------------------------------------------------------------------- synthetic geometry

N_TENSORS, SIZE = 24, 4096


def star(lengths: dict[str, float], seed: int = 0, drift: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Points J + step per named leaf, per tensor: independent Gaussian steps of squared length ``lengths[name]``
    (per tensor, ×SIZE-independent). ``drift[name]``: that share of the leaf's step is a direction common to every
    leaf with a drift (runs of one recipe)."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(N_TENSORS, SIZE))
    shared = rng.normal(size=(N_TENSORS, SIZE))
    out = {}
    for name, l2 in lengths.items():
        rho = (drift or {}).get(name, 0.0)
        own = rng.normal(size=(N_TENSORS, SIZE))
        step = np.sqrt(rho) * shared + np.sqrt(1 - rho) * own
        out[name] = j + np.sqrt(l2 / SIZE) * step
    return out


def triple(pts: dict[str, np.ndarray], m: str, i: str, k: str, tol: float = TOLERANCE):
    def d2(x, y):
        return ((pts[x] - pts[y]) ** 2).sum(1)

    return read_triple(d2(m, i), d2(m, k), d2(i, k), ("model", i, k), tol)


def test_branches_of_an_orthogonal_star_are_exact():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(50, 3)))  # three orthonormal steps from a centre
    centre, lm, li, lj = rng.normal(size=50), 0.7, 2.0, 1.3
    m, bi, bj = centre + np.sqrt(lm) * q[:, 0], centre + np.sqrt(li) * q[:, 1], centre + np.sqrt(lj) * q[:, 2]

    def d2(x, y):
        return float(((x - y) ** 2).sum())

    got = branches(d2(m, bi), d2(m, bj), d2(bi, bj))
    assert np.allclose(got, (lm, li, lj), atol=1e-12)


@pytest.mark.parametrize("lengths, m, i, k, reading, junction, ratios", [
    # three independent branches of one length: each branch is half of any pairwise d²
    ({"M": 1.0, "A": 1.0, "B": 1.0}, "M", "A", "B", "outside", "outside", (0.5, 0.5, 0.5)),
    # A at the junction (its own branch 0): the model is a direct derivative of A, B meets it at A
    ({"M": 1.0, "A": 0.0, "B": 1.0}, "M", "A", "B", "base-junction", "A", (0.5, 0.0, 0.5)),
    # the model at the junction: A and B hang off it
    ({"M": 0.0, "A": 1.0, "B": 1.0}, "M", "A", "B", "model-junction", "model", (0.0, 0.5, 0.5)),
    # unequal branches: still outside while the shortest holds more than a quarter of the largest d²
    ({"M": 2.0, "A": 1.5, "B": 1.0}, "M", "A", "B", "outside", "outside", (2 / 3.5, 1.5 / 3.5, 1 / 3.5)),
])
def test_star_readings_recover_known_branches(lengths, m, i, k, reading, junction, ratios):
    p = triple(star(lengths), m, i, k)
    assert p.reading == reading and p.junction == junction, p
    for b, truth in zip(p.branches, ratios):
        assert b.ratio == pytest.approx(truth, abs=0.02)
        assert b.ci[0] - 0.005 <= truth <= b.ci[1] + 0.005
        assert b.ci[1] - b.ci[0] < 0.05


@pytest.mark.parametrize("w", [0.5, 0.2, 0.07])
def test_interpolation_reads_between(w):
    """M = w·A + (1−w)·B: the model's branch is −w(1−w) of d²(A,B), read negative down to w ≈ 0.053."""
    pts = star({"A": 1.0, "B": 1.0})
    pts["M"] = w * pts["A"] + (1 - w) * pts["B"]
    p = triple(pts, "M", "A", "B")
    assert p.reading == "between" and p.junction is None
    assert p.branches[0].ratio == pytest.approx(-w * (1 - w), abs=1e-9)
    assert p.branches[0].sign == "negative"


@pytest.mark.parametrize("rho", [0.0, 0.14, 0.2])
def test_tolerance_finds_a_parent_whose_children_share_a_drift(rho):
    """The parent X of M and B, whose runs share a drift of cosine ρ: X's ratio is ρ/(2(1−ρ)), read 'zero' at the
    package tolerance 1/4 for the drift measured between the factory's fine-tunes on different data (ρ ≈ 0.14) and
    beyond; at a tolerance of 0.1 the parent's branch (0.125 at ρ = 0.2) counts as positive and the parent would
    be called a common ancestor of its own child."""
    pts = star({"M": 1.0, "X": 0.0, "B": 1.0}, drift={"M": rho, "B": rho})
    p = triple(pts, "M", "X", "B")
    assert p.branches[1].ratio == pytest.approx(rho / (2 * (1 - rho)), abs=0.02)
    assert p.reading == "base-junction" and p.junction == "X", p
    if rho == 0.2:
        assert triple(pts, "M", "X", "B", tol=0.1).reading == "outside"


def test_tolerance_does_not_put_a_sibling_at_the_junction():
    """The other end: three siblings whose branches differ up to 1 : 0.7 in squared length still read 'outside';
    a branch of a tenth of the others' reads 'zero' (the model is then as good as the junction)."""
    assert triple(star({"M": 0.7, "A": 1.0, "B": 1.0}, seed=1), "M", "A", "B").reading == "outside"
    p = triple(star({"M": 0.1, "A": 1.0, "B": 1.0}, seed=2), "M", "A", "B")
    assert p.reading == "model-junction" and p.branches[0].sign == "zero"


def gram_sums_of(pts: dict[str, np.ndarray], model: str, bases: list[str], keys=None) -> GramSums:
    m, bs = pts[model], np.stack([pts[b] for b in bases], axis=1)  # (t, k, size)
    keys = keys or tuple(CanonicalKey("ffn_down", t) for t in range(N_TENSORS))
    return GramSums(keys, np.full(N_TENSORS, SIZE, float), np.einsum("tks,tls->tkl", bs, bs),
                    np.einsum("tks,ts->tk", bs, m), (m * m).sum(1))


def test_fit_lineage_common_ancestor_wins_across_pairs_and_skips_ineligible_bases():
    """Chain X → A → D with B a sibling of A (children of X) and I unrelated. For D against A, B, X: the pair
    (B, X) puts the junction at X, but (A, X) puts A between D and X: X is common-ancestor, A direct."""
    pts = star({"A": 1.0, "B": 1.0, "X": 0.0})
    pts["D"] = pts["A"] + np.random.default_rng(9).normal(size=pts["A"].shape) * np.sqrt(1.0 / SIZE)
    pts["I"] = np.random.default_rng(10).normal(size=pts["A"].shape)
    refs = ["A", "B", "X", "I"]
    verdicts = {"A": "derived", "B": "derived", "X": "partial", "I": "independent"}
    lin = fit_lineage(gram_sums_of(pts, "D", refs), refs, verdicts)
    assert set(lin.common_ancestor) == {"B", "X"} and set(lin.direct) == {"A"}
    assert {p.bases for p in lin.pairs} == {("A", "B"), ("A", "X"), ("B", "X")}
    assert any("I: verdict independent" in s for s in lin.skipped)
    assert "at A" in lin.common_ancestor["X"] or "meets the model's at A" in lin.common_ancestor["X"]
    json.dumps(lin.to_dict(), allow_nan=False)
    # one related base left: no pair to read (with one base, a sibling looks like a direct fine-tune)
    assert fit_lineage(gram_sums_of(pts, "D", refs), refs, {**verdicts, "B": "independent", "X": "inconclusive"}) is None
    # a merge was found: the readings are reported, nothing is claimed
    lin = fit_lineage(gram_sums_of(pts, "D", refs), refs, verdicts, merge_found=True)
    assert lin.pairs and not lin.common_ancestor and not lin.direct


def test_vocabulary_indexed_tensors_stay_out_of_the_geometry():
    """An output layer whose deltas are shared by every run (token frequencies) would pull the parent off the
    junction; it is left out."""
    pts = star({"M": 1.0, "X": 0.0, "B": 1.0})
    keys = tuple(CanonicalKey("output" if t == 0 else "ffn_up", None if t == 0 else t) for t in range(N_TENSORS))
    shared = np.random.default_rng(3).normal(size=SIZE) * 20.0  # one tensor, a huge common shift
    for name in ("M", "B"):
        pts[name][0] = pts["X"][0] + shared
    lin = fit_lineage(gram_sums_of(pts, "M", ["X", "B"], keys), ["X", "B"], {"X": "derived", "B": "derived"})
    assert lin.pairs[0].reading == "base-junction" and lin.pairs[0].tensors == N_TENSORS - 1
    assert set(lin.common_ancestor) == {"B"} and set(lin.direct) == {"X"}


# ---------------------------------------------------------------------------------------- factory family trees

@pytest.fixture(scope="module")
def family(make, tmp_path_factory):
    """X the base; A, B, C fine-tunes of X on one data domain (different samples); A2 on another domain; D = A plus
    independent Gaussian noise (a direct derivative of A by construction); I independent of X."""
    from hf_provenance.factory import apply_transform

    root = tmp_path_factory.mktemp("lineage")
    f = {"X": make("llama"), "I": make("llama", "independent"),
         "A": make("llama", "finetune", data_offset=31_000), "B": make("llama", "finetune", data_offset=47_000),
         "C": make("llama", "finetune", data_offset=59_000),
         "A2": make("llama", "finetune", domain=2, data_offset=31_000)}
    f["D"] = str(apply_transform(f["A"], root / "D", "noise", scale=0.04, seed=5))
    return f


def report(model: str, bases: list[str]) -> tuple[dict, dict]:
    d = compare(model, bases).to_dict()
    json.dumps(d, allow_nan=False)
    from hf_provenance.schemas import validate

    validate(d)
    by = {c["base"]["ref"]: c for c in d["comparisons"]}
    return d, by


def branch_table(d: dict) -> str:
    return "; ".join(f"{p['reading']}: " + ", ".join(f"{b['node'].rsplit('/', 1)[-1]} {b['ratio']:.3f} "
                                                        f"[{b['ci'][0]:.3f}, {b['ci'][1]:.3f}]" for b in p["branches"])
                     for p in d["lineage"]["pairs"])


def test_three_siblings_meet_outside(family):
    """C against its siblings A and B: derived from both, through a model that is neither (their parent X)."""
    d, by = report(family["C"], [family["A"], family["B"]])
    print("\nsiblings C vs A, B:", branch_table(d))
    assert not d["merge"]["is_merge"]
    for ref in (family["A"], family["B"]):
        c = by[ref]
        assert c["verdict"] == "derived"
        assert "common-ancestor" in c["relation"] and "finetune" not in c["relation"] and "merge" not in c["relation"]
        assert c["reasons"][0].startswith("common ancestor")
    (pair,) = d["lineage"]["pairs"]
    assert pair["reading"] == "outside" and all(b["sign"] == "positive" for b in pair["branches"])
    assert any(n.startswith("lineage geometry") for n in d["notes"])


def test_parent_among_the_bases_is_the_junction(family):
    """A2 (fine-tuned on other data) against its sibling A and their parent X: X is the junction (direct), A a
    common-ancestor relative that meets A2 at X. Siblings on the *same* data share a drift that moves their
    junction off X: then no claim at all, and never common-ancestor for the parent."""
    x, a = family["X"], family["A"]
    d, by = report(family["A2"], [a, x])
    print("\nA2 vs A, X:", branch_table(d))
    assert by[x]["verdict"] == "derived" and "finetune" in by[x]["relation"]
    assert "common-ancestor" not in by[x]["relation"]
    assert any(r.startswith("direct:") for r in by[x]["reasons"])
    assert by[a]["verdict"] == "derived" and "common-ancestor" in by[a]["relation"]
    assert "finetune" not in by[a]["relation"] and f"at {x}" in by[a]["reasons"][0]
    assert d["lineage"]["direct"] == [x] and d["lineage"]["common_ancestor"] == [a]

    d, by = report(family["C"], [a, x])
    print("C vs A, X (same data):", branch_table(d))
    assert "common-ancestor" not in by[x]["relation"]
    assert d["lineage"]["pairs"][0]["branches"][2]["ratio"] > 0.5  # X far from the siblings' junction


def test_chain_middle_model_is_the_junction(family):
    """D = A + noise: A is D's direct parent; B (A's sibling) meets D at A."""
    a, b = family["A"], family["B"]
    d, by = report(family["D"], [a, b])
    print("\nchain D vs A, B:", branch_table(d))
    assert by[a]["verdict"] == "derived" and "finetune" in by[a]["relation"]
    assert "common-ancestor" not in by[a]["relation"] and any(r.startswith("direct:") for r in by[a]["reasons"])
    assert by[b]["verdict"] == "derived" and "common-ancestor" in by[b]["relation"]
    assert f"at {a}" in by[b]["reasons"][0]
    assert d["lineage"]["pairs"][0]["junction"] == a


def test_model_at_the_junction_keeps_its_relations(family):
    """X against two of its fine-tunes on different data: X sits at the junction; no common-ancestor."""
    a, a2 = family["A"], family["A2"]
    d, by = report(family["X"], [a, a2])
    print("\nparent X vs A, A2:", branch_table(d))
    assert d["lineage"]["model_at_junction"] and not d["lineage"]["common_ancestor"]
    for ref in (a, a2):
        assert by[ref]["verdict"] == "derived" and "finetune" in by[ref]["relation"]
        assert "common-ancestor" not in by[ref]["relation"]
        assert any("sits at the junction" in r for r in by[ref]["reasons"])


def test_merge_between_the_bases_stays_a_merge(family, tmp_path):
    """M = ½A + ½B lies between A and B: the model's branch is negative, the merge fit decides, nothing else."""
    a, b = family["A"], family["B"]
    shutil.copytree(a, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    sa, sb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    merged = {k: (0.5 * v + 0.5 * sb[k]).contiguous() for k, v in sa.items()}
    save_file(merged, str(tmp_path / "m" / "model.safetensors"))
    d, by = report(str(tmp_path / "m"), [a, b])
    print("\nmerge ½A + ½B vs A, B:", branch_table(d))
    assert d["merge"]["is_merge"]
    assert all("merge" in c["relation"] and "common-ancestor" not in c["relation"] for c in by.values())
    pair = d["lineage"]["pairs"][0]
    assert pair["reading"] == "between" and pair["branches"][0]["sign"] == "negative"


def test_independent_base_gets_no_lineage_claim(family):
    """C against A, B and an independent model: the siblings still meet outside; I is independent, no claim."""
    i = family["I"]
    d, by = report(family["C"], [family["A"], family["B"], i])
    assert by[i]["verdict"] == "independent" and by[i]["relation"] == []
    assert i not in d["lineage"]["common_ancestor"] + d["lineage"]["direct"]
    assert all(i not in p["bases"] for p in d["lineage"]["pairs"])
    assert all("common-ancestor" in by[r]["relation"] for r in (family["A"], family["B"]))
    assert any(s.startswith(f"{i}: verdict independent") for s in d["lineage"]["skipped"])
