"""The verdict for one base: identical | derived | partial | independent | inconclusive (DESIGN §Meaning).

Only statistics decide; architecture differences never do. ``independent`` is an equivalence test: alignment was
attempted on components covering at least ``coverage_independent`` of the compared parameters and the upper bound
of their aligned effect is below δ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_provenance.statistics.aggregate import GroupEffect, group, is_evidence
from hf_provenance.statistics.tensor import TensorResult
from hf_provenance.statistics.thresholds import Thresholds

VERDICTS = ("identical", "derived", "partial", "independent", "inconclusive")
# The Hub's base_model_relation for each of our relations (DESIGN: relation mapping)
HUB_RELATION = {"quantized": "quantized", "cast": "quantized", "merge": "merge", "adapter": "adapter"}


def hub_relation(relations: list[str]) -> str | None:
    """The card's base_model_relation implied by our relations (quantized/cast → quantized, ...; rest → finetune)."""
    for rel in ("adapter", "merge", "quantized", "cast"):
        if rel in relations:
            return HUB_RELATION[rel]
    return "finetune" if relations else None


@dataclass(frozen=True)
class Verdict:
    verdict: str
    relation: tuple[str, ...]
    direction: str
    reasons: tuple[str, ...]
    not_compared: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "relation": list(self.relation), "direction": self.direction,
                "reasons": list(self.reasons), "not_compared": list(self.not_compared)}


def _fmt_r(g: GroupEffect) -> str:
    ci = f" [{g.ci[0]:.3f}, {g.ci[1]:.3f}]" if g.ci and g.ci[0] != g.ci[1] else ""
    return f"r̄ = {g.r_mean:.3f}{ci}"


def decide(tensors: list[TensorResult], components: dict[str, GroupEffect], th: Thresholds, *,
           aligned_params: int, containment: dict, sampled: bool, not_compared: list[str],
           quantized: str | None = None, extra_relations: list[str] | None = None,
           unreadable_format: str | None = None) -> Verdict:
    """containment: {"layers": (base, model), "vocab": (base_rows, model_rows), "vocab_rows_unchanged": bool|None,
    "moe": (base_is_moe, model_is_moe), "width": {what: (base, model)}} as observed; ``not_compared`` lists what
    could not be compared and why."""
    nc = tuple(not_compared)
    if not tensors:
        return Verdict("inconclusive", (), "not determined", ("no tensor could be compared",) + nc[:2], nc)
    rel: list[str] = list(extra_relations or [])
    direction = "direction not determined by weights"
    lay_b, lay_m = containment.get("layers", (None, None))
    voc_b, voc_m = containment.get("vocab", (None, None))
    layer_rel = containment.get("layer_relation") or []
    if "permuted" in layer_rel:
        rel.append("permuted")
    if lay_b and lay_m and lay_m < lay_b:
        rel.append("pruned")
        direction = f"model has fewer layers ({lay_m} vs {lay_b}): model derived from base"
    elif lay_b and lay_m and lay_m > lay_b:
        rel.append("upscaled")
        direction = f"model has more layers ({lay_m} vs {lay_b}) built from the base's: model derived from base"
    if voc_b and voc_m and voc_m > voc_b and containment.get("vocab_rows_unchanged") is not False:
        rel.append("vocab-extended")
        direction = f"model's vocabulary extends the base's ({voc_m} vs {voc_b} rows): model derived from base"
    elif voc_b and voc_m and voc_m < voc_b:
        rel.append("vocab-pruned")
        direction = f"model's vocabulary is a subset of the base's ({voc_m} vs {voc_b} rows): model derived from base"
    elif containment.get("vocab_changed"):
        rel.append("vocab-changed")
    if "upcycled" in rel and direction.startswith("direction not"):
        # containment (DESIGN): experts built from a dense MLP's units point from the dense base to the MoE
        direction = "model's experts are built from the base's dense MLP (dense → MoE): model derived from base"
    width = containment.get("width") or {}    # {"MLP units": [base, model], ...} from a recovered width map
    if width and direction.startswith("direction not"):
        # containment (DESIGN): the model's units / heads are a subset of the base's
        per = {what: "" if what == "hidden dimensions" else " per layer" for what in width}  # the residual: once
        direction = (f"model has fewer {' and '.join(width)} ("
                     f"{'; '.join(f'{m} vs {b} {what}{per[what]}' for what, (b, m) in width.items())}, a subset of "
                     "the base's): model derived from base")

    all_equal = all(t.frac_equal == 1.0 for t in tensors)
    if "vocab-changed" in rel:  # not a DESIGN relation: it only stops an "identical" over re-paired rows
        rel.remove("vocab-changed")
        all_equal = False
    if all_equal and not nc and not rel:
        same_dtype = all(t.dtype[0] == t.dtype[1] for t in tensors)
        if sampled:
            rows = sum(max(1, round(t.fraction_read * (t.shape[0] if len(t.shape) > 1 else 1))) for t in tensors)
            reason = (f"identical in the sampled rows: all {rows} rows read are equal; by the rule of three, at "
                      f"most {3 / rows:.2%} of rows could differ undetected (95% upper bound)")
        else:
            reason = "every tensor decodes bit-equal" + ("" if same_dtype else " (lossless re-encoding)")
        return Verdict("identical", ("copy",), "direction not determined by weights (identical)", (reason,), nc)

    cast_all = all((t.cast_equal or 0.0) == 1.0 for t in tensors)
    if cast_all and any(t.dtype[0] != t.dtype[1] for t in tensors):
        rel.insert(0, "cast")
        target = sorted({t.dtype[1] for t in tensors if t.dtype[0] != t.dtype[1]})
        direction = (f"model's weights are the base's re-rounded to {', '.join(target)}: "
                     "model derived from base (lower precision)")
        reasons = [f"every tensor equals the base re-rounded to {', '.join(target)} (round to nearest even)"]
        return Verdict("derived", tuple(dict.fromkeys(rel)), direction, tuple(reasons), nc)
    if quantized:
        rel.append("quantized")

    elig = [g for g in components.values() if g.r_mean is not None]
    elig_params = sum(g.params for g in elig)
    derived = [g for g in elig if g.derived]
    indep = [g for g in elig if g.below_delta]
    overall = group("overall", [t for t in tensors if t.evidence], th)
    reasons: list[str] = []
    for g in sorted(derived, key=lambda g: (-g.params, -abs(g.r_mean)))[:3]:
        reasons.append(f"{g.name}: {_fmt_r(g)} over {g.n_tensors} tensors; {g.n_evidence} clear the threshold "
                       f"(|r| ≥ {th.r_derived}, |z| ≥ {th.z_derived})")
    if derived:
        d_params = sum(g.params for g in derived)
        if d_params >= 0.5 * elig_params or not indep:
            changed = any(t.frac_equal < 1.0 for t in tensors if t.evidence)
            structural = {"pruned", "upscaled", "vocab-extended", "vocab-pruned", "cast", "quantized"}
            if changed and not structural & set(rel):
                rel.append("finetune")
            verdict = "derived"
        else:
            verdict = "partial"
            for g in indep[:2]:
                reasons.append(f"{g.name}: |r̄| ≤ {g.abs_upper:.3f} (upper bound) < δ = {th.delta}: no shared lineage "
                               "detected there")
        return Verdict(verdict, tuple(dict.fromkeys(rel)), direction, tuple(reasons[:3]), nc)

    coverage = aligned_params / max(1, elig_params) if elig_params else 0.0
    if unreadable_format:  # the packed weights were not compared: never contradict a card with "independent"
        reasons = [f"the quantised weights (format {unreadable_format}) are not comparable yet; what could be "
                   "compared shows no shared lineage, which says nothing about the packed tensors"]
        return Verdict("inconclusive", (), "not determined", tuple(reasons + list(nc))[:3], nc)
    if overall.abs_upper is not None and overall.abs_upper < th.delta and coverage >= th.coverage_independent:
        reasons = [f"aligned effect over {overall.n_tensors} tensors: mean |r| beyond its null level ≤ "
                   f"{overall.abs_upper:.3f} (95% upper bound) < δ = {th.delta}",
                   f"no tensor clears the derivation threshold (|r| ≥ {th.r_derived}, |z| ≥ {th.z_derived})",
                   f"permutation alignment attempted on {coverage:.0%} of the compared parameters"]
        return Verdict("independent", (), "not applicable", tuple(reasons), nc)
    reasons = []
    if overall.abs_upper is not None and overall.abs_upper >= th.delta:
        reasons.append(f"effect |r̄| up to {overall.abs_upper:.3f} is neither below δ = {th.delta} nor replicated "
                       "above the derivation threshold")
    if coverage < th.coverage_independent:
        reasons.append(f"permutation alignment covered {coverage:.0%} of compared parameters (< "
                       f"{th.coverage_independent:.0%}): a permuted copy cannot be excluded")
    if not elig:
        reasons.append("no tensor with an arbitrary axis could be compared")
    # no lineage claimed, so no relation (a layer-count difference between unrelated families is not "pruned")
    return Verdict("inconclusive", (), "not determined", tuple((reasons + list(nc))[:3]), nc)


def rotated(prev: Verdict, check, th: Thresholds) -> Verdict:
    """The verdict when the residual-rotation check (``alignment.rotation``) finds a rotated copy where the ordinary
    evidence and the permutation searches found nothing: derived, relation ``permuted`` (DESIGN's closed relation
    list has no ``rotated``; an orthogonal change of basis generalises the signed permutation)."""
    parts = []
    for family, what in (("mlp", "MLP reader"), ("value", "value")):
        tests = [t for t in check.tests if t.family == family]
        if tests:
            parts.append(f"{sum(t.cleared for t in tests)} of {len(tests)} {what} tensors")
    hit = [t.test.observed for t in check.tests if t.cleared]
    reasons = (f"residual stream rotated: the row Gram matrices of {' and '.join(parts)} agree with the base's "
               f"(Mantel r̄ = {sum(hit) / len(hit):.3f} where they clear r ≥ {th.r_derived}, z ≥ {th.z_derived} "
               "against relabellings of the model's units)",
               "an orthogonal change of the residual basis (norms folded first, as QuaRot, SpinQuant and SliceGPT "
               "do) keeps these Grams and takes every per-tensor statistic along the residual axis to null level",
               "relation 'permuted': the residual basis was changed by an orthogonal transform, of which a signed "
               "permutation is the special case")
    return Verdict("derived", ("permuted",), "direction not determined by weights", reasons, prev.not_compared)


__all__ = ["Verdict", "decide", "hub_relation", "rotated", "VERDICTS", "is_evidence"]
