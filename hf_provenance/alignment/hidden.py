"""Residual-width pruning: the model keeps a subset of the base's hidden dimensions.

Minitron (Llama-3.1-Minitron-4B-Width: hidden 4096 → 3072) and Sheared-LLaMA (hidden 4096 → 2560) prune the
residual stream itself: every tensor that reads or writes it, the embeddings, lm_head and every norm, loses the
same dimensions. No tensor then has the base's shape, so the identity plan compares nothing (``inconclusive``),
although most of the numbers are the base's.

The kept dimensions are found like a residual permutation (``residual``), from the token-embedding columns over half
of the shared tokens: the Pearson of each model column with each base column (H' × H), a mutual-best pass, then a
rectangular linear assignment (each model dimension gets a distinct base dimension; their order may be permuted
too, and for RMSNorm models their signs flipped), tested on the other half of the tokens. Only when that held-out r
reaches r_derived are the tensors paired: the base side is read through the kept dimensions on its residual axis
(``base_cols`` for readers and 1-D vectors, ``base_rows`` for writers), so that tensors whose other axes kept their
sizes (attention with all its heads, an MLP with all its units, norms, lm_head) compare element for element. The
embedding columns fitted the map: reported, never evidence. Tensors whose other axes were pruned too stay listed as
not compared.
"""

from __future__ import annotations

import numpy as np
import torch

from hf_provenance.alignment.identity import _view, axes_for, keyed
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment import keys as K
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.alignment.residual import RESIDUAL_BIASES, RESIDUAL_IN, RESIDUAL_NORMS, RESIDUAL_OUT, \
    column_correlation, match_columns, split_tokens
from hf_provenance.alignment.vocab import vocab_map
from hf_provenance.measurement.accumulate import PairAccumulator
from hf_provenance.measurement.stream import read_indexed
from hf_provenance.statistics import effects as fx
from hf_provenance.statistics.thresholds import load as load_thresholds

FIT_CHUNK = 4096  # token rows per read


def narrower_hidden(base, model) -> tuple[str, str, int, int] | None:
    """(base embedding, model embedding, H, H') when the model's token embedding has fewer columns than the base's."""
    kb, km = keyed(base)[0], keyed(model)[0]
    key = next((k for k in kb if k.role == "token_embd" and k.part == "weight"), None)
    if key is None or key not in km:
        return None
    sb, sm = _view(base.inventory[kb[key]].shape), _view(model.inventory[km[key]].shape)
    if len(sb) != 2 or len(sm) != 2 or not 0 < sm[1] < sb[1]:
        return None
    return kb[key], km[key], sb[1], sm[1]


def fit_hidden(base, model, bname: str, mname: str, *, signs: bool, seed: int = 0, sample: float | None = None
               ) -> dict | None:
    """The kept base dimension of each model dimension, fitted and tested on the token embeddings (see module)."""
    ib, im = base.inventory[bname], model.inventory[mname]
    vmap = vocab_map(base.vocab, model.vocab, ib.shape[0], im.shape[0])
    h, h2 = ib.shape[-1], im.shape[-1]
    split = split_tokens(vmap.shared, h, seed=seed, sample=sample, tag=0x41DD)
    if split is None:
        return None
    fit_pos, test_pos = split
    rows_b, rows_m = np.asarray(vmap.base_rows), np.asarray(vmap.model_rows)

    def blocks(pos):
        for s in range(0, len(pos), FIT_CHUNK):
            p = pos[s:s + FIT_CHUNK]
            a = read_indexed(base.reader, bname, rows_b[p], 0, len(p), raw=False, finite=True)
            b = read_indexed(model.reader, mname, rows_m[p], 0, len(p), raw=False, finite=True)
            yield a.reshape(len(p), h).double(), b.reshape(len(p), h2).double()

    # (H', H): model dimension × base dimension
    corr = column_correlation(((b, a) for a, b in blocks(fit_pos)), h2, h)
    keep, mutual = match_columns(np.abs(corr) if signs else corr)
    sign = np.where(corr[np.arange(h2), keep] < 0, -1.0, 1.0) if signs else None
    if sign is not None and not (sign < 0).any():
        sign = None
    acc = PairAccumulator(n_cols=h2, keep_blocks=False, sketch=False)
    cols = torch.from_numpy(keep)
    flip = None if sign is None else torch.from_numpy(sign)
    for a, b in blocks(test_pos):
        b = b if flip is None else b * flip
        acc.update(a[:, cols].float(), b.float())
    heldout = fx.ratio(*fx.centred_parts(acc.totals, acc.col_a.numpy(), acc.col_b.numpy(), h2))
    return {"keep": keep, "sign": sign, "heldout_r": heldout, "fit_tokens": len(fit_pos), "test_tokens": len(test_pos),
            "mutual_best": mutual, "dims": [int(h), int(h2)], "vocab": vmap,
            "in_order": bool(np.all(np.diff(keep) > 0))}


def hidden_plan(base, model, plan: AlignmentPlan, *, seed: int = 0, sample: float | None = None
                ) -> tuple[AlignmentPlan, dict, list[str], object] | None:
    """Pair the tensors of a model whose residual stream keeps a subset of the base's dimensions (see module).

    Returns None when the model's embedding is not narrower than the base's; otherwise ``(plan, summary, lines,
    vocab)``, the plan unchanged (but for the summary) when the held-out r stays under r_derived; ``vocab`` is the
    embeddings' VocabMap the fit paired tokens by (None when too few shared tokens), for the verdict's vocabulary
    containment.
    """
    found = narrower_hidden(base, model)
    if found is None:
        return None
    bname, mname, h, h2 = found
    norm = layout_for(str((base.config or {}).get("model_type", ""))).norm
    fit = fit_hidden(base, model, bname, mname, signs=norm == "rmsnorm", seed=seed, sample=sample)
    if fit is None:
        return plan, {}, [f"hidden dimensions: model {h2} of the base's {h}, not searched (too few shared tokens)"], \
            None
    r = fit["heldout_r"]
    summary = {"hidden": {"dims": fit["dims"], "heldout_r": fx._clean(r), "fit_tokens": fit["fit_tokens"],
                          "test_tokens": fit["test_tokens"], "mutual_best": fit["mutual_best"],
                          "in_order": fit["in_order"], "sign_flips": 0 if fit["sign"] is None else
                          int((fit["sign"] < 0).sum()),
                          "method": "rectangular linear assignment of the model's embedding columns to the base's, "
                                    "fitted on half the shared tokens, tested on the other half"}}
    r_txt = "undefined" if r is None else f"{r:.3f}"
    if r is None or r < load_thresholds().r_derived:
        summary["hidden"]["applied"] = False
        line = f"hidden dimensions: model {h2} of the base's {h}; no subset found (held-out embedding r = {r_txt})"
        return AlignmentPlan(plan.pairs, plan.unmatched, {**plan.summary, **summary}, plan.notes), summary, [line], \
            fit["vocab"]
    new_pairs, paired = _pairs(base, model, fit, h, h2)
    summary["hidden"].update(applied=True, pairs=len(new_pairs), kept=[int(x) for x in fit["keep"]],
                             signs=None if fit["sign"] is None else [int(x) for x in fit["sign"]])
    unmatched = tuple(u for u in plan.unmatched if u.name not in paired)
    order = "in the base's order" if fit["in_order"] else "reordered"
    lines = [f"hidden dimensions: the model's {h2} are a subset of the base's {h} ({order}; held-out embedding "
             f"r = {r_txt} over {fit['test_tokens']} tokens); {len(new_pairs)} tensors paired through the kept "
             "dimensions (the embedding fitted them: reported, not evidence)"]
    new_summary = {**plan.summary, **summary}
    return AlignmentPlan(plan.pairs + tuple(new_pairs), unmatched, new_summary, plan.notes + tuple(lines)), \
        summary, lines, fit["vocab"]


def kept_dimensions(plan: AlignmentPlan) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """(kept base dimension per model dimension, signs or None, base width) when ``hidden_plan`` applied a map."""
    found = plan.summary.get("hidden") or {}
    if not found.get("applied"):
        return None
    signs = found.get("signs")
    return (np.asarray(found["kept"], dtype=np.int64), None if signs is None else np.asarray(signs, dtype=np.float32),
            int(found["dims"][0]))


def _pairs(base, model, fit: dict, h: int, h2: int) -> tuple[list[PairSpec], set[str]]:
    """Pairs for the tensors whose shapes agree once the base is read through the kept dimensions."""
    kb, km = keyed(base)[0], keyed(model)[0]
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    tied = all(bool((src.config or {}).get("tie_word_embeddings")) for src in (base, model))
    kept = (fit["keep"], fit["sign"], h)
    out, paired = [], set()
    for key, bname in kb.items():
        mname = km.get(key)
        if mname is None or (tied and key.role == "output"):  # tied to the embedding: counted once
            continue
        if _view(base.inventory[bname].shape) == _view(model.inventory[mname].shape):
            continue  # the identity plan already paired it (or refused it for another reason)
        p = through_kept(key, bname, mname, base, model, kept, layout, fit["vocab"])
        if p is not None:
            out.append(p)
            paired |= {bname, mname}
    return out, paired


def residual_view(role: str, shape: tuple[int, ...], kept) -> tuple[int, ...]:
    """A base tensor's 2-D view (or 1-D length) as seen through the kept dimensions (its residual axis narrowed)."""
    if kept is None:
        return shape
    h, h2 = kept[2], len(kept[0])
    if len(shape) == 1:
        return (h2,) if shape[0] == h and (role in RESIDUAL_NORMS or role in RESIDUAL_BIASES) else shape
    if role in RESIDUAL_IN and shape[1] == h:
        return (shape[0], h2)
    if role in RESIDUAL_OUT and shape[0] == h:
        return (h2, shape[1])
    return shape


def through_kept(key, bname: str, mname: str, base, model, kept, layout, vmap=None, *, layer: int | None = None,
                 note: str | None = None) -> PairSpec | None:
    """One base tensor against the model's, the base read through the kept hidden dimensions on its residual axis
    (``kept`` = ``kept_dimensions``); None when their shapes still differ. ``layer``: the model layer (layer maps)."""
    keep, sign, h = kept
    h2 = len(keep)
    sb, sm = _view(base.inventory[bname].shape), _view(model.inventory[mname].shape)
    role, axes = key.role, axes_for(key, len(base.inventory[bname].shape), layout)
    if layout.is_transposed(role):  # GPT-2's Conv1D [in, out]: its rows are not what the role's rows mean
        return None
    kw: dict = {}
    note = note or "base read through the model's kept hidden dimensions"
    if len(sb) == 1 and sb[0] == h and sm[0] == h2 and (role in RESIDUAL_NORMS or (
            role in RESIDUAL_BIASES and key.part == "bias")):
        kw = dict(base_cols=keep, col_sign=sign if role in RESIDUAL_BIASES else None)  # a vector's elements
        shape = (h2,)
    elif len(sb) == 2 and role in RESIDUAL_IN and sb[1] == h and sm[1] == h2 and (
            sb[0] == sm[0] or axes[0] == "vocab"):
        kw = dict(base_cols=keep, col_sign=sign)
        shape = (sb[0], h2)
        if axes[0] == "vocab":
            if vmap is None or vmap.shared == 0:
                return None
            kw.update(base_rows=np.asarray(vmap.base_rows), cand_rows=np.asarray(vmap.model_rows))
            shape = (vmap.shared, h2)
        if role == "token_embd":
            kw["evidence"] = False
            note = "the kept hidden dimensions were fitted on these columns: reported, not evidence"
    elif len(sb) == 2 and role in RESIDUAL_OUT and sb[0] == h and sm[0] == h2 and sb[1] == sm[1]:
        kw = dict(base_rows=keep, row_sign=sign)
        shape = (h2, sb[1])
    else:
        return None
    layer = key.layer if layer is None else layer
    return PairSpec(key, bname, mname, shape, axes, K.component_of(key), layer, note=note, **kw)


__all__ = ["fit_hidden", "hidden_plan", "kept_dimensions", "narrower_hidden", "residual_view", "through_kept"]
