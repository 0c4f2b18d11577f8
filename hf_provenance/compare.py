"""compare(MODEL, BASES): the pipeline of DESIGN from refs to a CompareReport.

source → architecture → alignment → measurement → statistics → verdict. Each base is opened, compared and closed
in turn, so two bases are never held together; only row blocks of the current pair are in memory.
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone

import numpy as np

from hf_provenance import __version__
from hf_provenance.alignment.hidden import hidden_plan
from hf_provenance.alignment.identity import identity_plan
from hf_provenance.alignment.fused import layout_plan
from hf_provenance.alignment.experts import expert_plan, experts_relayout
from hf_provenance.alignment.layers import layer_plan, narrow, widen
from hf_provenance.alignment.units import unit_plan
from hf_provenance.alignment.widths import is_width_pruned, width_plan
from hf_provenance.alignment.norms import norm_plan
from hf_provenance.alignment.rotary import qk_lag, rotary_plan
from hf_provenance.alignment.rotation import rotation_check
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.lineage import fit_lineage, lineage_note
from hf_provenance.alignment.merge import fit_merge, gram_sums, r2_note
from hf_provenance.alignment.residual import apply_residual, embedding_pair, fit_residual, residual_axis_params
from hf_provenance.errors import UsageError
from hf_provenance.formats import check_adapter, unreadable_format
from hf_provenance.measurement.stream import measure_plan
from hf_provenance.result import Comparison, CompareReport, ModelRef
from hf_provenance.statistics import aggregate, folk
from hf_provenance.statistics.tensor import summarize
from hf_provenance.statistics.thresholds import load as load_thresholds
from hf_provenance.verdict import Verdict, decide, hub_relation
from hf_provenance.verdict import rotated as rotated_verdict


def _ref(src) -> ModelRef:
    return ModelRef(src.ref, src.revision, src.content_id.to_dict(), src.kind)


def _arch(base, model) -> dict | None:
    if not base.config or not model.config:
        return None
    try:
        from hf_provenance.architecture import compare_specs, normalise

        return compare_specs(normalise(base.config), normalise(model.config)).to_dict()
    except Exception as exc:  # noqa: BLE001 - the architecture table is context, never a verdict input
        return {"error": str(exc)}


def _evaluate(plan, base, model, *, sample, seed, device, progress, th, skipped=None):
    # each pair's statistics are computed on the thread that measured it, while the next pairs are read
    tensors = measure_plan(plan, base, model, fraction=sample, seed=seed, device=device, progress=progress,
                           then=lambda m: summarize(m, seed=seed), skipped=skipped)
    tensors.sort(key=lambda t: (t.layer if t.layer is not None else -1, t.name))
    components = aggregate.by(tensors, lambda t: t.component, th)
    layer_groups = aggregate.by([t for t in tensors if t.layer is not None], lambda t: t.layer, th)
    return tensors, components, [layer_groups[k] for k in sorted(layer_groups)]


def _residual_search(plan, base, model, facts, *, seed, sample, lines, layered):
    """Fit the residual map; returns (plan to measure or None, fit, parameters the search covers)."""
    emb = embedding_pair(plan)
    if emb is None:
        lines.append("residual permutation: not searched (no token embedding pair to fit it from)")
        return None, None, 0
    if emb.base_cols is not None:  # hidden_plan already mapped each model dimension to a base one
        lines.append("residual permutation: not searched (the kept hidden dimensions already map the residual "
                     "stream)")
        return None, None, 0
    norm = layout_for(str((base.config or {}).get("model_type", ""))).norm
    fit = fit_residual(emb, base, model, signs=norm == "rmsnorm", seed=seed, sample=sample)
    if fit is None:
        lines.append(f"residual permutation: not searched (only {emb.n_rows} shared tokens)")
        return None, None, 0
    covered = residual_axis_params(plan, emb.n_cols)
    flips = f", {fit.flips} sign flips" if fit.sign is not None else ""
    if fit.is_identity and fit.heldout_r is not None:  # (an all-zero embedding "maps" to the identity too)
        lines.append(f"residual permutation: identity recovered for {fit.identity_share:.0%} of {emb.n_cols} dims "
                     f"(held-out r = {fit.heldout_r:.3f})")
        return None, fit, covered
    if fit.heldout_r is not None and fit.heldout_r >= load_thresholds().r_derived:
        if not layered:  # layer sketches are position-based: redo the layer map through the residual map
            again = layer_plan(base, model, plan, facts, seed=seed, sample=sample, residual=fit)
            if again is not None:
                plan = again[0]
                lines += again[2]
        new_plan, covered = apply_residual(widen(plan), fit, emb.n_cols)  # layer-mapped pairs: all their rows
        new_plan = narrow(new_plan)
        lines.append(f"residual permutation recovered for {emb.n_cols} dims{flips}: held-out embedding r = "
                     f"{fit.heldout_r:.3f} (identity map: {fit.heldout_r_identity:.3f}); applied to every layer")
        return new_plan, fit, covered
    r = "undefined" if fit.heldout_r is None else f"{fit.heldout_r:.3f}"
    lines.append(f"residual permutation: searched, no correspondence found (held-out embedding r = {r} "
                 f"< {load_thresholds().r_derived})")
    return None, fit, covered


def _same_lfs_files(model, base) -> bool:
    """Both Hub revisions list weight files whose LFS sha256 are the same multiset: identical bytes."""
    fa, fb = model.content_id.files, base.content_id.files
    if model.content_id.kind != "hub" or base.content_id.kind != "hub" or not fa or not fb:
        return False
    wa = sorted(v for k, v in fa.items() if k.endswith(".safetensors"))
    wb = sorted(v for k, v in fb.items() if k.endswith(".safetensors"))
    return bool(wa) and wa == wb


def _shortcut(model, base, verdict: Verdict, alignment_line: str, extra: dict | None = None) -> Comparison:
    """A comparison decided without measuring weights (equal LFS hashes, adapters)."""
    th = load_thresholds()
    empty = aggregate.group("overall", [], th)
    io = {"bytes_read": {"model": 0, "base": 0}, "bytes_total": 0, "fraction_read": 0.0, "seconds": 0.0}
    alignment = {"residual": None, "units": None, "heads": None, "layers": None, "experts": None, "vocab": None,
                 "rotation": None, "lines": [alignment_line]}
    alignment.update(extra or {})
    return Comparison(base=_ref(base), verdict=verdict, components={}, layers=(), overall=empty, tensors=(),
                      alignment=alignment, architecture=_arch(base, model), io=io,
                      declared=_declared(model, base, verdict), rule_of_thumb=folk.rule_of_thumb(None, None))


def compare_one(model, base, *, sample: float | None, seed: int, device: str, progress=None) -> Comparison:
    th = load_thresholds()
    t0 = time.perf_counter()
    if _same_lfs_files(model, base):
        v = Verdict("identical", ("copy",), "direction not determined by weights (identical)",
                    ("every weight file has the same LFS sha256 on both sides: identical without reading weights",))
        return _shortcut(model, base, v, "not needed: equal LFS sha256 certify identical bytes")
    if model.adapter is not None:
        chk = check_adapter(model, base)
        if chk.matches_base:
            v = Verdict("derived", ("adapter",), "the adapter is applied to the base: model derived from base",
                        (f"LoRA adapter: {chk.modules_checked} target modules fit the base's shapes "
                         "(by construction, not weight evidence)",
                         f"adapter_config declares base_model_name_or_path = {chk.base_declared}"))
        else:
            v = Verdict("inconclusive", (), "not determined",
                        ("LoRA adapter does not fit this base: " + "; ".join(chk.mismatches[:3]),))
        return _shortcut(model, base, v, "LoRA adapter checked by construction", {"adapter": chk.to_dict()})
    read0 = (model.reader.bytes_read, base.reader.bytes_read)
    fetched0 = (getattr(model, "bytes_fetched", 0), getattr(base, "bytes_fetched", 0))
    plan, facts = identity_plan(base, model)
    layer_lines: list[str] = []
    pruned_hidden = hidden_plan(base, model, plan, seed=seed, sample=sample)  # a narrower residual stream
    hidden_relation: list[str] = []
    if pruned_hidden is not None:
        plan, hidden_summary, hidden_lines, hidden_vocab = pruned_hidden
        layer_lines += hidden_lines
        if (hidden_summary.get("hidden") or {}).get("applied"):
            hidden_relation = ["pruned"]
            facts = {**facts, "vocab": facts["vocab"] or hidden_vocab}
    found = layer_plan(base, model, plan, facts, seed=seed, sample=sample)
    if found is not None:  # layers renumbered, dropped or repeated: pair each model layer with its base layer
        plan, _, found_lines = found
        layer_lines = layer_lines + found_lines
    plan, _, layout_lines = layout_plan(base, model, plan)  # fused tensors split, Conv1D [in, out] read transposed
    layer_lines = layer_lines + layout_lines
    folded = norm_plan(base, model, plan, seed=seed, sample=sample)  # norm weights folded into the next matrices
    if folded is not None:
        plan, _, fold_lines = folded
        layer_lines = layer_lines + fold_lines
    layer_rel = list((plan.summary.get("layers") or {}).get("relation", []))
    unread: list = []  # small routed-expert tensors of the experts not drawn (--sample)
    tensors, components, layers = _evaluate(plan, base, model, sample=sample, seed=seed, device=device,
                                            progress=progress, th=th, skipped=unread)
    vmap = facts["vocab"]
    lay_b, lay_m = facts["layers"]
    containment = {"layers": (lay_b, lay_m), "layer_relation": layer_rel}
    if hidden_relation:  # containment (DESIGN): the model's residual dimensions are a subset of the base's
        containment["width"] = {"hidden dimensions": plan.summary["hidden"]["dims"]}

    def _emb(ts):
        return [t for t in ts if t.component == "embeddings" and t.key.startswith("token_embd")]

    emb = _emb(tensors)
    if vmap is not None:
        containment["vocab"] = (vmap.base_size, vmap.model_size)
        if emb and emb[0].rowhash_jaccard is not None:
            containment["vocab_rows_unchanged"] = emb[0].rowhash_jaccard == 1.0
        containment["vocab_changed"] = bool(vmap.base_only or vmap.model_only or not vmap.is_identity)
    def _not_compared(p) -> list[str]:
        return [f"{u.side} tensor {u.name}: {u.reason}" for u in p.unmatched
                if "counted once" not in u.reason and "buffer" not in u.reason]

    not_compared = _not_compared(plan)
    fmt = unreadable_format(model) or unreadable_format(base)
    if fmt:
        packed = [n for src in (model, base) if unreadable_format(src)
                  for n, info in src.inventory.items() if not info.is_float]
        not_compared.insert(0, f"{len(packed)} packed tensors: not comparable (format {fmt})")
    kwargs = dict(containment=containment, sampled=bool(sample), not_compared=not_compared,
                  quantized=model.quantization, unreadable_format=fmt)
    lines = [f"identity plan: {len(plan.pairs)} tensor pairs by canonical key; "
             f"{len(plan.unmatched)} without counterpart"]
    if vmap is not None:
        lines.append(f"vocabulary: {vmap.shared} shared rows by {vmap.method} "
                     f"(base {vmap.base_size}, model {vmap.model_size})")
    lines += layer_lines
    verdict = decide(tensors, components, th, aligned_params=0, extra_relations=hidden_relation, **kwargs)
    summary = dict(plan.summary)
    upcycling = _is_moe(model) and not _is_moe(base)
    total_params = sum(g.params for g in components.values()) or 1
    # a derived verdict with a large component showing nothing: units, heads or experts may be permuted there
    # (routed experts and the router are searched whatever their share: shuffling experts is cheap and common)
    expert_r = [abs(t.pearson.value) for t in tensors
                if t.component == "routed_experts" and t.evidence and t.pearson.value is not None]
    weak = verdict.verdict == "derived" and (any(
        g.r_mean is not None and abs(g.r_mean) < th.r_derived
        and (g.params > 0.1 * total_params or name in ("routed_experts", "router"))
        for name, g in components.items())
        # most routed experts at null level while some match: shuffled experts, a few of them left in place (the
        # component's mean then clears r_derived). A minority at null level reads as re-initialised experts, not
        # worth a search that reads every expert's down projection
        or (bool(expert_r) and sum(r < th.r_derived for r in expert_r) >= 0.5 * len(expert_r)))
    settled = verdict.verdict in ("derived", "identical") and not weak
    rotary_wanted = settled and qk_lag(tensors, th)  # q/k far below v/o: a rotary row reorder, say
    relayout = experts_relayout(base, model, plan)  # experts stacked on one side only: the identity plan paired none
    narrower = is_width_pruned(base, model, plan)  # fewer MLP units / heads in the model: pruned tensors unpaired
    reported = plan
    if not settled or upcycling or rotary_wanted or relayout or narrower:
        new_plan, fit, covered = ((None, None, 0) if settled else
                                  _residual_search(plan, base, model, facts, seed=seed, sample=sample,
                                                   lines=lines, layered=found is not None))
        extra = ["permuted"] if new_plan is not None else []
        # the searches fit maps on whole tensors: layer-mapped pairs get back the rows their layer sketch read,
        # and lose them again (on either side, through the maps found) before anything is measured
        work = widen(new_plan if new_plan is not None else plan)
        searched, applied, repaired = 0, False, False
        steps = (expert_plan,) if settled else (expert_plan, unit_plan)
        steps += (width_plan,) if narrower else ()  # same-shape maps first, then the subsets the model kept
        steps += (rotary_plan,) if rotary_wanted or not settled else ()  # inside heads, after any head map
        for step in steps:  # experts first: unit maps inside experts assume the expert pairing
            out = step(base, model, work, seed=seed, sample=sample)
            if out is None:
                continue
            work, part_summary, part_lines = out
            lines += part_lines
            summary.update(part_summary)
            for part in part_summary.values():
                if isinstance(part, dict):
                    searched += int(part.get("searched_params") or 0)
                    applied |= bool(part.get("applied"))
                    repaired |= bool(part.get("repaired_layers"))
                    if part.get("upcycled_layers"):
                        extra.append("upcycled")
                    if part.get("pruned_layers"):  # width pruning: relation and containment (verdict's direction)
                        extra.append("pruned")
                        containment["width"] = {**(containment.get("width") or {}), **(part.get("containment") or {})}
        work = narrow(work)
        if applied and not {"upcycled", "pruned"} & set(extra):  # (unit subsets of width pruning: not permuted)
            extra.append("permuted")
        extra = hidden_relation + extra
        if new_plan is not None or applied or repaired:
            unread.clear()
            tensors, components, layers = _evaluate(work, base, model, sample=sample, seed=seed, device=device,
                                                    progress=progress, th=th, skipped=unread)
            reported = work
            kwargs["not_compared"] = ([not_compared[0]] if fmt else []) + _not_compared(work)
            summary = {**dict(work.summary), **{k: v for k, v in summary.items() if k not in work.summary}}
        elif fit is not None:
            summary["residual"] = fit.to_dict()
        verdict = decide(tensors, components, th, aligned_params=max(covered, searched),
                         extra_relations=list(dict.fromkeys(extra)), **kwargs)
    else:
        lines.append("permutation search: not needed (the identity plan already shows shared lineage)")
    if verdict.verdict in ("independent", "inconclusive") and not fmt:
        # neither the evidence nor the permutation searches found lineage: a rotated residual basis would hide it
        check = rotation_check(base, model, reported, seed=seed)
        summary["rotation"] = check.to_dict()
        lines.append(check.line())
        if check.rotated:
            verdict = rotated_verdict(verdict, check, th)
    overall = aggregate.group("overall", [t for t in tensors if t.evidence], th)
    n_layers = max(lay_b, lay_m, 1)
    layer_cos = [g.cos_mean for g in layers if g.cos_mean is not None]  # none where every layer is all zeros
    mean_layer_cos = float(np.mean(layer_cos)) if layer_cos else None
    emb = _emb(tensors)
    emb_cos = emb[0].cosine.value if emb else None
    bytes_model = model.reader.bytes_read - read0[0]
    bytes_base = base.reader.bytes_read - read0[1]
    # the tensors the reported plan compares (a fused or stacked tensor once); reads also count alignment's and
    # those of an evaluation redone after a search, so fraction_read can pass 1
    total = (sum(base.inventory[n].nbytes for n in {p.base_name for p in reported.pairs})
             + sum(model.inventory[n].nbytes for n in {p.cand_name for p in reported.pairs}))
    io = {"bytes_read": {"model": bytes_model, "base": bytes_base}, "bytes_total": total,
          "fraction_read": (bytes_model + bytes_base) / total if total else 0.0,
          "seconds": time.perf_counter() - t0}
    if hasattr(model, "bytes_fetched") or hasattr(base, "bytes_fetched"):
        io["bytes_fetched"] = {"model": getattr(model, "bytes_fetched", 0) - fetched0[0],
                               "base": getattr(base, "bytes_fetched", 0) - fetched0[1]}
    drawn = {t.expert_draw.population: t.expert_draw for t in tensors if t.expert_draw is not None}
    if drawn:
        n_all, n_read = sum(d.experts for d in drawn.values()), sum(d.drawn for d in drawn.values())
        io["expert_sample"] = {"layers": len(drawn), "experts": n_all, "experts_read": n_read,
                               "tensors_read": sum(t.expert_draw is not None for t in tensors),
                               "tensors_not_read": len(unread)}
        lines.append(f"expert sampling: {n_read} of {n_all} routed experts read whole (a stratified sample in each "
                     f"of {len(drawn)} layers: their tensors are under 30 row blocks); each stands for the experts "
                     "of its layer not read, and the intervals include the between-expert variance")
    alignment = {"residual": None, "units": None, "heads": None, "layers": None, "experts": None, "rotation": None}
    alignment.update(summary)
    alignment["lines"] = lines
    return Comparison(
        base=_ref(base), verdict=verdict, components=components,
        layers=tuple(layers), layer_readings=tuple(_layer_reading(g, n_layers) for g in layers), overall=overall,
        tensors=tuple(tensors), alignment=alignment, architecture=_arch(base, model), io=io,
        declared=_declared(model, base, verdict), rule_of_thumb=folk.rule_of_thumb(mean_layer_cos, emb_cos),
        unmatched=tuple(u.to_dict() for u in reported.unmatched))


def _is_moe(src) -> bool:
    cfg = src.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    merged = {**text, **cfg}
    return any(isinstance(merged.get(k), int) and merged.get(k) > 1
               for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))


def _layer_reading(g, n_layers: int) -> dict:
    pos = folk.depth_position(int(g.name), n_layers)
    lo, hi = folk.FINETUNE_PROFILE[pos]
    return {"band": folk.band(g.cos_mean), "position": pos, "typical_finetune": f"{lo:.2f}-{hi:.2f} ({pos})"}


def _declared(model, base, verdict) -> dict:
    declared = list(model.card.base_model)
    rel = model.card.base_model_relation
    is_declared = any(_same_ref(d, base.ref) for d in declared)
    implied = hub_relation(list(verdict.relation)) if verdict.verdict in ("derived", "identical", "partial") else None
    msg = None
    if is_declared:
        if verdict.verdict in ("independent",):
            msg = f"the card declares {base.ref} as base_model, but the weights show no shared lineage"
        elif verdict.verdict == "inconclusive":
            msg = f"the card declares {base.ref} as base_model; the weights could not confirm it"
        else:
            msg = f"the card declares {base.ref} as base_model: confirmed by the weights"
            if rel and implied and rel != implied:
                msg += f"; declared relation '{rel}' but the evidence suggests '{implied}'"
    return {"base_model": declared, "base_model_relation": rel, "is_declared_base": is_declared,
            "implied_relation": implied, "message": msg}


def _same_ref(a: str, b: str) -> bool:
    return a.split("@")[0].rstrip("/") == b.split("@")[0].rstrip("/")


def compare(model_ref: str, base_refs: list[str] | None = None, *, sample: float | None = None, seed: int = 0,
            device: str = "cpu", open_fn=None, progress=None) -> CompareReport:
    from hf_provenance.sources import open_model

    open_fn = open_fn or open_model
    if sample is not None and not (0.0 < sample <= 1.0):
        raise UsageError("--sample", f"must be in (0, 1], got {sample}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    model = open_fn(model_ref)
    notes = []
    if not base_refs:
        base_refs = list(model.card.base_model)
        if not base_refs:
            raise UsageError(model_ref, "the model card declares no base_model: pass --base BASE")
        notes.append(f"bases taken from the model card's base_model: {', '.join(base_refs)}")
    comparisons, opened = [], []
    for ref in base_refs:
        base = open_fn(ref)
        comparisons.append(compare_one(model, base, sample=sample, seed=seed, device=device, progress=progress))
        opened.append(base)
    merge = lineage = None
    if len(opened) >= 2:
        sums = gram_sums(model, opened, fraction=sample, seed=seed)  # one pass: merge fit and lineage both read it
        fit = fit_merge(model, opened, list(base_refs), sums=sums)
        if fit is not None:
            merge = fit.to_dict()
            notes.append(r2_note(fit))
            if fit.is_merge:
                comparisons = [_with_merge(c, fit) for c in comparisons]
        lin = fit_lineage(sums, [c.base.ref for c in comparisons],
                          {c.base.ref: c.verdict.verdict for c in comparisons},
                          merge_found=bool(fit is not None and fit.is_merge))
        if lin is not None:
            lineage = lin.to_dict()
            notes.append(lineage_note(lin))
            comparisons = [_with_lineage(c, lin) for c in comparisons]
    ranked = sorted(range(len(comparisons)), key=lambda i: _rank_key(comparisons[i]))
    from dataclasses import replace

    comparisons = [replace(comparisons[i], rank=r + 1) for r, i in enumerate(ranked)]
    th = load_thresholds()
    run = {"command": " ".join(shlex.quote(a) for a in ["hf-provenance"] + sys.argv[1:]) if sys.argv else "",
           "seed": seed, "sample": sample, "device": device, "started": started,
           "seconds": time.perf_counter() - t0, "thresholds": th.to_dict()}
    return CompareReport({"name": "hf-provenance", "version": __version__}, run, _ref(model),
                         tuple(comparisons), tuple(notes), merge=merge, lineage=lineage)


def _with_merge(c: Comparison, fit) -> Comparison:
    """A base with a clear weight in a linear merge: relation ``merge`` added, with the weights as the reason."""
    from dataclasses import replace

    if c.base.ref not in fit.members or c.verdict.verdict not in ("derived", "partial"):
        return c
    i = fit.bases.index(c.base.ref)
    rel = tuple(r for r in c.verdict.relation if r != "finetune")
    reason = (f"linear merge: weight {fit.weights[i]:.3f} [{fit.ci[i][0]:.3f}, {fit.ci[i][1]:.3f}] on this base, "
              f"R² = {fit.r2:.4f} with every base vs {max(fit.r2_single):.4f} for the best one alone")
    verdict = replace(c.verdict, relation=tuple(dict.fromkeys(rel + ("merge",))),
                      reasons=(reason,) + c.verdict.reasons[:2])
    return replace(c, verdict=verdict)


def _with_lineage(c: Comparison, lin) -> Comparison:
    """A base whose lineage meets the model's elsewhere: ``common-ancestor`` instead of ``finetune``, with the
    geometry as the reason. A base at the junction, or a model at it, keeps its relation and gains the reason."""
    from dataclasses import replace

    ref = c.base.ref
    if ref in lin.common_ancestor:
        rel = tuple(r for r in c.verdict.relation if r != "finetune")
        verdict = replace(c.verdict, relation=tuple(dict.fromkeys(rel + ("common-ancestor",))),
                          reasons=(lin.common_ancestor[ref],) + c.verdict.reasons[:2])
        return replace(c, verdict=verdict)
    reason = lin.direct.get(ref) or lin.model_junction.get(ref)
    if reason is None:
        return c
    return replace(c, verdict=replace(c.verdict, reasons=c.verdict.reasons + (reason,)))


def _rank_key(c: Comparison):
    order = {"identical": 0, "derived": 1, "partial": 2, "inconclusive": 3, "independent": 4}
    eff = c.overall.r_abs_mean or 0.0
    return (order[c.verdict.verdict] if c.verdict.verdict == "identical" else 1, -eff)
