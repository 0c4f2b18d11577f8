"""Lineage among several bases: where the lineages of the model and of two bases meet, from squared distances.

With ONE base nothing of the kind can be said. Weights are symmetric (d(M, B) = d(B, M)) and a single distance
carries no shape: a sibling of the model (both fine-tuned from an unseen parent) sits at the same kind of distance
as a direct fine-tune, so a comparison against one base reports ``finetune`` and never ``common-ancestor``.

With two bases Bᵢ, Bⱼ the three points (M, Bᵢ, Bⱼ) have a shape. Fine-tune deltas of independent runs are nearly
orthogonal in high dimension, so three models reached from one junction X by independent steps form a star whose
squared branch lengths lₓ add: d²(M,Bᵢ) = l_M + lᵢ, d²(M,Bⱼ) = l_M + lⱼ, d²(Bᵢ,Bⱼ) = lᵢ + lⱼ, hence

    l_M = (d²(M,Bᵢ) + d²(M,Bⱼ) − d²(Bᵢ,Bⱼ)) / 2     and likewise lᵢ, lⱼ

Whatever the tree, l_M = ⟨Bᵢ − M, Bⱼ − M⟩ exactly (law of cosines): |M − Bᵢ|·|M − Bⱼ|·cos of the angle at M,
zero for a right angle (M at the junction), negative for an obtuse one (M between the bases). A component shared
by the runs (same recipe, same data) moves the junction off their parent by that shared drift; it is absorbed
into the branch of whichever point sits at the parent.

Only tensors along arbitrary axes enter the geometry. Vocabulary-, position- and token-type-indexed tensors are
left out: every fine-tune on new text moves the output layer and embeddings toward that text's token frequencies,
a shared low-rank direction (DESIGN §Statistics 1: those axes carry frequency structure), so runs on different
data are far from orthogonal there. For two factory fine-tunes of one parent on different domains, the lm_head
holds a quarter of the squared distance and puts the parent's branch at 0.40 of it; over all tensors the parent
reads 0.15 [0.03, 0.28] (unclear), over the others 0.08 [0.05, 0.12] (at the junction).

Readings of the branch of each vertex, relative to the largest of the three squared distances, each read from its
95% interval ("zero" inside ±``TOLERANCE``, "positive" above it, "negative" below −``NEGATIVE``; anything
straddling a bound is "unclear" and claims nothing):

| model    | base i   | base j   | reading             | relations                                              |
|----------|----------|----------|---------------------|--------------------------------------------------------|
| negative | any      | any      | ``between``         | none: M interpolates Bᵢ and Bⱼ; the merge fit decides  |
| zero     | positive | positive | ``model-junction``  | none: M lies on the path between the bases, so at      |
|          |          |          |                     | least one base descends from M (which one: not told)   |
| positive | zero     | positive | ``base-junction``   | Bⱼ ``common-ancestor`` (meets M at Bᵢ); Bᵢ direct      |
| positive | positive | positive | ``outside``         | both ``common-ancestor``: the lineages meet at a model |
|          |          |          |                     | that is not among those compared                       |

Anything else (a base between the model and the other base, two coinciding bases, an unclear branch) claims
nothing. A base is ``common-ancestor`` when any pair says so: if the junction of (M, Bᵢ, Bₖ) lies strictly inside
the path M–Bᵢ, some lineage branches off between them and Bᵢ is not M's direct relative, whatever another pair
says. Which side of a junction is older is not told by weights either; the relation says "related through a
junction", and the reasons name it.

Tolerance. The canonical star (three independent branches of equal length) gives each vertex a ratio of 1/2; a
vertex at the junction gives 0. ``TOLERANCE`` = 1/4 is the midpoint. For a junction base whose two descendants
share a drift of cosine ρ the ratio is ρ/(2(1−ρ)) (ρ when ρ > 1/2), under 1/4 while ρ < 1/3. The factory's
fine-tunes on different data share ρ ≈ 0.14 (ratio 0.08: the parent is found); on the same data ρ ≈ 0.86 (ratio
0.86): their junction is the shared drift, not the parent, and against the parent the claim is withheld (the two
siblings sit near their junction, within the tolerance) or, with longer private branches, would read
``outside``. That is the limit of any reading from distances: siblings of one recipe look like children of an
unseen model. A tolerance of 0.1 would call a parent with ρ = 0.2 a common ancestor of its own child.
tests/test_lineage.py sweeps ρ and branch lengths on synthetic vectors to hold both ends.

Negative branches. In a tree no squared branch is negative (up to the independence of the steps); an
interpolation wA + (1−w)B puts the model's at −w(1−w)·d²(A,B), never below −1/4, so "negative" has its own bound:
``NEGATIVE`` = 0.05, reached at w ≈ 0.053 (merge.MIN_WEIGHT is 0.05). A slightly negative junction (−0.002) stays
"zero".

Interval. The ratio is R = Σₜ lₜ / Σₜ Nₜ over tensors t (N the largest pair's squared distance); its 95% interval
treats tensors as the units of a ratio estimator: se = √(n/(n−1)·Σₜ (lₜ − R·Nₜ)²) / Σₜ Nₜ (linearisation; a
tensor-level jackknife gives the same order), i.e. each tensor's ratio weighted by its share of the distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_provenance.alignment.keys import fixed_axis

TOLERANCE = 0.25         # |branch² / largest pairwise d²| under this: the vertex is at the junction
NEGATIVE = 0.05          # below −this: the vertex lies between the other two (interpolation)
Z95 = 1.96
MIN_TENSORS = 2
ELIGIBLE = ("derived", "partial")

# (model, base i, base j) signs -> reading; unlisted combinations claim nothing ("undetermined")
READINGS: dict[tuple[str, str, str], str] = {
    ("zero", "positive", "positive"): "model-junction",
    ("positive", "zero", "positive"): "base-junction",
    ("positive", "positive", "zero"): "base-junction",
    ("positive", "positive", "positive"): "outside",
}


@dataclass(frozen=True)
class Branch:
    node: str            # "model" or a base ref
    ratio: float         # squared branch length / largest pairwise squared distance
    ci: tuple[float, float]
    sign: str            # zero | positive | negative | unclear
    squared: float       # the squared branch length itself (sum over tensors)

    def to_dict(self) -> dict:
        return {"node": self.node, "ratio": round(self.ratio, 6), "ci": [round(self.ci[0], 6), round(self.ci[1], 6)],
                "sign": self.sign, "squared": self.squared}


@dataclass(frozen=True)
class PairReading:
    bases: tuple[str, str]
    d2: tuple[float, float, float]          # d²(M,Bi), d²(M,Bj), d²(Bi,Bj), summed over tensors
    branches: tuple[Branch, Branch, Branch]  # model, base i, base j
    reading: str         # between | model-junction | base-junction | outside | undetermined
    junction: str | None  # "model", a base ref, "outside" or None
    tensors: int

    def to_dict(self) -> dict:
        return {"bases": list(self.bases), "tensors": self.tensors, "reading": self.reading, "junction": self.junction,
                "d2": {"model_base_i": self.d2[0], "model_base_j": self.d2[1], "base_i_base_j": self.d2[2]},
                "branches": [b.to_dict() for b in self.branches]}


@dataclass(frozen=True)
class Lineage:
    pairs: tuple[PairReading, ...]
    common_ancestor: dict[str, str]   # base ref -> the reason
    direct: dict[str, str]            # base ref -> the reason (junction base: relation stays)
    model_junction: dict[str, str]    # base ref -> the reason (model at the junction: relation stays)
    skipped: tuple[str, ...]          # why a pair or every claim was left out
    tolerance: float = TOLERANCE

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "negative_below": -NEGATIVE, "pairs": [p.to_dict() for p in self.pairs],
                "common_ancestor": sorted(self.common_ancestor), "direct": sorted(self.direct),
                "model_at_junction": bool(self.model_junction), "skipped": list(self.skipped),
                "method": "squared branch lengths of the star (model, base i, base j) from the merge pass's Gram "
                          "sums over the tensors along arbitrary axes: l_M = (d²(M,Bi) + d²(M,Bj) − d²(Bi,Bj))/2 "
                          "etc.; ratio to the largest pairwise d², 95% interval over tensors (ratio-estimator "
                          f"linearisation); 'zero' within ±{self.tolerance}, 'negative' below −{NEGATIVE}"}


def branches(d2_mi, d2_mj, d2_ij):
    """Squared branch lengths (model, base i, base j) of the star through the three points (floats or arrays)."""
    return ((d2_mi + d2_mj - d2_ij) / 2, (d2_mi + d2_ij - d2_mj) / 2, (d2_mj + d2_ij - d2_mi) / 2)


def sign_of(lo: float, hi: float, tol: float = TOLERANCE) -> str:
    """The reading of one branch ratio's interval [lo, hi]; "negative" first, since an interpolation never reaches
    −tol (see ``NEGATIVE``)."""
    if hi < -NEGATIVE:
        return "negative"
    if -tol < lo and hi < tol:
        return "zero"
    if lo >= tol:
        return "positive"
    return "unclear"


def read_triple(d2_mi: np.ndarray, d2_mj: np.ndarray, d2_ij: np.ndarray, nodes: tuple[str, str, str],
                tol: float = TOLERANCE) -> PairReading | None:
    """The reading of one (model, base i, base j) triple from per-tensor squared distances; None if degenerate."""
    per = np.stack([np.asarray(d2_mi, float), np.asarray(d2_mj, float), np.asarray(d2_ij, float)])
    tot = per.sum(1)
    p = int(np.argmax(tot))
    norm_t, norm = per[p], tot[p]
    n = per.shape[1]
    if n < MIN_TENSORS or norm <= 0:
        return None
    out = []
    for node, l_t in zip(nodes, branches(*per)):
        r = float(l_t.sum() / norm)
        u = l_t - r * norm_t
        half = Z95 * float(np.sqrt(n / (n - 1) * (u ** 2).sum())) / norm
        out.append(Branch(node, r, (r - half, r + half), sign_of(r - half, r + half, tol), float(l_t.sum())))
    signs = tuple(b.sign for b in out)
    reading = "between" if signs[0] == "negative" else READINGS.get(signs, "undetermined")
    junction = {"model-junction": "model", "outside": "outside",
                "base-junction": nodes[1] if signs[1] == "zero" else nodes[2]}.get(reading)
    return PairReading((nodes[1], nodes[2]), tuple(float(x) for x in tot), tuple(out), reading, junction, n)


def _fmt(p: PairReading, this: str | None = None) -> str:
    """The three ratios with their intervals; ``this`` base is called "this base" (reasons sit on its comparison)."""
    def label(node: str) -> str:
        return "this base" if node == this else node

    return ("branch² / largest d²: "
            + ", ".join(f"{label(b.node)} {b.ratio:.3f} [{b.ci[0]:.3f}, {b.ci[1]:.3f}]" for b in p.branches))


def fit_lineage(sums, refs: list[str], verdicts: dict[str, str], *, merge_found: bool = False,
                tol: float = TOLERANCE) -> Lineage | None:
    """Read every pair of bases whose comparisons are both derived/partial; None with fewer than two such bases.

    ``sums``: alignment.merge.GramSums of the model against ``refs`` (one pass shared with the merge fit); its
    vocabulary-, position- and token-type-indexed tensors are left out (see the module docstring).
    ``merge_found``: the merge fit found a linear merge; the tree readings are reported but claim nothing (a merge
    is not a tree: its parents' lineages meet in it).
    """
    idx = [i for i, r in enumerate(refs) if verdicts.get(r) in ELIGIBLE]
    keep = np.array([fixed_axis(k) is None for k in sums.keys], bool)
    if len(idx) < 2 or keep.sum() < MIN_TENSORS:
        return None
    g, c, mm = sums.gram[keep], sums.cross[keep], sums.mm[keep]
    pairs, skipped = [], []
    ca: dict[str, str] = {}
    direct: dict[str, str] = {}
    at_model: dict[str, str] = {}
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            i, j = idx[a], idx[b]
            d_mi = mm - 2 * c[:, i] + g[:, i, i]
            d_mj = mm - 2 * c[:, j] + g[:, j, j]
            d_ij = g[:, i, i] - 2 * g[:, i, j] + g[:, j, j]
            p = read_triple(d_mi, d_mj, d_ij, ("model", refs[i], refs[j]), tol)
            if p is None:
                skipped.append(f"{refs[i]} and {refs[j]}: fewer than {MIN_TENSORS} tensors with a distance")
                continue
            pairs.append(p)
            if merge_found:
                continue
            if p.reading == "outside":
                for x, y in ((refs[i], refs[j]), (refs[j], refs[i])):
                    ca.setdefault(x, f"common ancestor: the model's and this base's lineages meet at a model that "
                                     f"is neither, nor {y} ({_fmt(p, x)}); which side of that junction is older "
                                     f"is not told by weights")
            elif p.reading == "base-junction":
                other = refs[j] if p.junction == refs[i] else refs[i]
                ca.setdefault(other, f"common ancestor: this base's lineage meets the model's at {p.junction} "
                                     f"({_fmt(p, other)})")
                direct.setdefault(p.junction, f"direct: {other}'s lineage meets the model's at this base; none "
                                              f"branches off between them ({_fmt(p, p.junction)})")
            elif p.reading == "model-junction":
                for x, y in ((refs[i], refs[j]), (refs[j], refs[i])):
                    at_model.setdefault(x, f"the model sits at the junction of this base's and {y}'s lineages: at "
                                           f"least one of the two descends from the model, which one is not told "
                                           f"by weights ({_fmt(p, x)})")
    if merge_found:
        skipped.append("a linear merge of the bases was found: the merge relation stands, no tree reading claims")
    direct = {k: v for k, v in direct.items() if k not in ca}
    at_model = {k: v for k, v in at_model.items() if k not in ca}
    for r in refs:
        if r not in [refs[i] for i in idx]:
            skipped.append(f"{r}: verdict {verdicts.get(r)}, no lineage claim")
    return Lineage(tuple(pairs), ca, direct, at_model, tuple(skipped), tol)


def lineage_note(lin: Lineage) -> str:
    parts = [f"{p.bases[0]} & {p.bases[1]}: {p.reading}"
             + (f" at {p.junction}" if p.reading == "base-junction" else "") + f" ({_fmt(p)})" for p in lin.pairs]
    head = f"lineage geometry ('zero' within ±{lin.tolerance}, 'negative' below −{NEGATIVE})"
    tail = f"; common ancestor: {', '.join(sorted(lin.common_ancestor))}" if lin.common_ancestor else ""
    return f"{head}: " + "; ".join(parts or ["no pair readable"]) + tail


__all__ = ["NEGATIVE", "READINGS", "TOLERANCE", "Branch", "Lineage", "PairReading", "branches", "fit_lineage",
           "lineage_note", "read_triple", "sign_of"]
