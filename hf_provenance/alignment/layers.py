"""Layer maps: which base layer each model layer came from (pruning, depth up-scaling, reordering).

Pruned models drop layers (ShortGPT, LaCo), up-scaled ones repeat them (SOLAR 10.7B: "candidate 0-23 ← base 0-23,
24-47 ← base 8-31"; Kim et al. 2023, arXiv:2312.15166). Pairing tensors by layer *number* then compares unrelated
layers. This module finds the map in three steps:

1. **Sketches.** For every 2-D layer tensor present in both models with equal shapes, a seeded block of at
   most half its rows (≈ ``SKETCH_ELEMS`` numbers, never fewer than ``MIN_SKETCH_ROWS`` rows) is read through the
   source's reader (bytes counted). The block depends on the seed, role and shape only, so base layer i and model
   layer j read the same rows. Each sketch is double-centred (row and column means removed, DESIGN §Statistics 2).
   Per-expert tensors and the router are used only for layers that have nothing else (an expert permutation would
   blur them); 1-D vectors never (norm weights share structure across the layers of one model).
2. **Similarity.** ``S[i, j]`` = mean over the shared tensors of the sketches' Pearson. Under H0 (unrelated layers)
   each term has mean 0 and variance exactly 1/((k−1)(C−1)) for a k×C sketch (permutation moments of the
   double-centred Pearson), so ``S`` has a known null sd σ[i, j] ≈ 1/√(sketch size · tensors).
3. **Dynamic programming** over model layers j: each maps to one base layer with a step from the previous mapped
   layer p: next (p+1, free), repeat (p, up-scaling), skip (> p+1, pruning), backward (< p, up-scaling's second
   copy), or to *no counterpart* (the layer's similarity is at null level). A mapped cell gains
   S[i, j] − Z_NULL·σ[i, j], no counterpart gains 0, steps cost ``PENALTIES`` × the median threshold. O(L_base ×
   L_model) with prefix/suffix maxima.

Statistics (DESIGN §3): the sketch similarity *fits* the map and is never evidence. Evidence comes from measuring
the mapped pairs afterwards on the rows outside the sketch (each sketched pair's row map excludes its sketch rows).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from hf_provenance.alignment import keys as K
from hf_provenance.alignment.hidden import kept_dimensions, residual_view, through_kept
from hf_provenance.alignment.identity import _view, axes_for, keyed
from hf_provenance.alignment.layouts import layout_for
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec, Unmatched
from hf_provenance.alignment.residual import RESIDUAL_IN as _RESIDUAL_IN
from hf_provenance.alignment.residual import RESIDUAL_OUT as _RESIDUAL_OUT
from hf_provenance.alignment.residual import apply_residual
from hf_provenance.measurement.stream import read_indexed

SKETCH_ELEMS = 4096          # numbers per tensor sketch (rows × columns), before the row limits
MIN_SKETCH_ROWS = 8
MIN_ROWS = 4                 # tensors with fewer rows are not sketched (double-centring needs rows)
Z_NULL = 6.0                 # a layer pair is a counterpart only above Z_NULL null sds
PENALTIES = {"next": 0.0, "repeat": 0.25, "skip": 0.5, "back": 1.0}   # × the median no-counterpart threshold
SECONDARY_ROLES = frozenset({"ffn_gate_inp", "exp_probs_b", "ffn_gate_inp_shexp"})
METHOD = ("layer sketches (seeded row blocks, double-centred Pearson, mean over tensors); dynamic programming "
          "over model layers with steps next / repeat / skip / backward / no counterpart")

Slot = tuple  # (role, expert, part, rows, cols): one tensor position inside a layer, shape included


def _secondary(role: str) -> bool:
    return role in SECONDARY_ROLES or role.endswith("_exp") or role.endswith("_exps")


@dataclass(frozen=True)
class LayerAlignment:
    """The fitted layer map and everything the report shows about it."""

    base_layers: int
    model_layers: int
    similarity: np.ndarray        # S[i_base, j_model], NaN where no tensor is comparable
    null_sd: np.ndarray           # σ[i, j]
    mapping: tuple[int | None, ...]  # base layer of each model layer (None: no counterpart)
    steps: tuple[str, ...]        # step that led to each model layer: start/next/repeat/skip/back/none
    sketch_rows: dict             # slot -> sorted sketch row indices (base index space)
    bytes_read: dict = field(default_factory=dict)
    bytes_total: dict = field(default_factory=dict)
    tensors_sketched: dict = field(default_factory=dict)
    seed: int = 0
    residual: bool = False        # the model's sketches were mapped through a residual-permutation fit
    gram_tensors: int = 0         # writers whose row Grams gave S (no layer tensor shared a shape)

    @property
    def threshold(self) -> float:
        finite = self.null_sd[np.isfinite(self.null_sd)]
        return float(Z_NULL * np.median(finite)) if finite.size else math.inf

    @property
    def is_diagonal(self) -> bool:
        """Identity layer numbering is already the best map (equal counts, each layer itself or unmatched)."""
        return self.base_layers == self.model_layers and all(i in (j, None) for j, i in enumerate(self.mapping))

    @property
    def found(self) -> bool:
        return any(i is not None for i in self.mapping)

    def relation(self) -> list[str]:
        used = Counter(i for i in self.mapping if i is not None)
        assigned = [i for i in self.mapping if i is not None]
        rel = []
        unused = self.unused_base_layers()
        none = self.mapping.count(None)
        if len(unused) > none:
            rel.append("pruned")
        if any(c > 1 for c in used.values()):
            rel.append("upscaled")
        elif assigned != sorted(assigned):
            rel.append("permuted")
        return rel

    def unused_base_layers(self) -> list[int]:
        used = {i for i in self.mapping if i is not None}
        return [i for i in range(self.base_layers) if i not in used]

    def segments(self) -> list[dict]:
        out: list[dict] = []
        for j, i in enumerate(self.mapping):
            s = None if i is None else _f(self.similarity[i, j])
            last = out[-1] if out else None
            if last is not None and last["model"][1] == j - 1 and (
                    (i is None and last["base"] is None) or
                    (i is not None and last["base"] is not None and last["base"][1] == i - 1)):
                last["model"][1] = j
                if i is not None:
                    last["base"][1] = i
                    last["_s"].append(s)
                continue
            out.append({"model": [j, j], "base": None if i is None else [i, i], "_s": [] if s is None else [s]})
        for seg in out:
            vals = [v for v in seg.pop("_s") if v is not None]
            seg["similarity"] = float(np.mean(vals)) if vals else None
        return out

    def to_dict(self) -> dict:
        sim = [[_f(v) for v in row] for row in self.similarity]
        best = []
        for j in range(self.model_layers):
            col = self.similarity[:, j]
            if np.isfinite(col).any():
                i = int(np.nanargmax(col))
                best.append([j, i, _f(col[i])])
            else:
                best.append([j, None, None])
        total = sum(self.bytes_total.values())
        read = sum(self.bytes_read.values())
        finite = self.null_sd[np.isfinite(self.null_sd)]
        return {
            "method": METHOD,
            "layers": [self.base_layers, self.model_layers],
            "map": [[j, i, None if i is None else _f(self.similarity[i, j])] for j, i in enumerate(self.mapping)],
            "steps": list(self.steps),
            "segments": self.segments(),
            "best_per_layer": best,
            "relation": self.relation(),
            "unused_base_layers": self.unused_base_layers(),
            "no_counterpart_model_layers": [j for j, i in enumerate(self.mapping) if i is None],
            "similarity": sim,
            "null": {"sd": _f(np.median(finite)) if finite.size else None, "threshold": _f(self.threshold),
                     "z": Z_NULL, "method": (f"relabelling the model's rows of each writer's row Gram, {GRAM_DRAWS} "
                                            "draws" if self.gram_tensors else
                                            "exact permutation variance of the double-centred Pearson, "
                                            "1/((k-1)(C-1)) per k×C sketch, averaged over tensors")},
            "penalties": {k: v * self.threshold for k, v in PENALTIES.items()} if finite.size else None,
            "sketch": {"elements_per_tensor": SKETCH_ELEMS, "min_rows": MIN_SKETCH_ROWS,
                       "tensors": dict(self.tensors_sketched), "gram_tensors": self.gram_tensors,
                       "bytes_read": dict(self.bytes_read),
                       "bytes_total": dict(self.bytes_total),
                       "fraction_read": (read / total) if total else None, "seed": self.seed,
                       "residual_map_applied": self.residual},
            "evidence": "the sketch similarity fits the map and is not evidence; mapped pairs are measured on the "
                        "rows outside the sketch",
        }

    def lines(self) -> list[str]:
        segs = []
        for seg in self.segments():
            m = _range(*seg["model"])
            segs.append(f"{m} ← none" if seg["base"] is None else f"{m} ← base {_range(*seg['base'])}")
        rel = self.relation()
        why = []
        if "upscaled" in rel:
            twice = sorted(i for i, c in Counter(i for i in self.mapping if i is not None).items() if c > 1)
            why.append(f"up-scaled: base layer{'s' if len(twice) > 1 else ''} {_list(twice)} used more than once")
        if "pruned" in rel:
            unused = self.unused_base_layers()
            why.append(f"pruned: base layer{'s' if len(unused) > 1 else ''} {_list(unused)} without counterpart")
        if "permuted" in rel:
            why.append("layers reordered")
        none = [j for j, i in enumerate(self.mapping) if i is None]
        if none:
            why.append(f"model layer{'s' if len(none) > 1 else ''} {_list(none)} at null level")
        head = f"layers: model {', '.join(segs)}" + (f" ({'; '.join(why)})" if why else "")
        d = self.to_dict()
        mapped = [s for _, i, s in d["map"] if s is not None]
        sk = d["sketch"]
        frac = f"{sk['fraction_read']:.2%}" if sk["fraction_read"] is not None else "n/a"
        what = (f"the row Grams of {self.gram_tensors} attn_output/ffn_down tensors (unit and head order and subsets "
                "leave them unchanged)" if self.gram_tensors else
                f"sketches of {sum(self.tensors_sketched.values())} tensors")
        return [head,
                f"layer map fitted on {what} "
                f"({sum(self.bytes_read.values()):,} bytes, {frac} of the layer tensors' bytes): mean similarity of "
                f"mapped layers {np.mean(mapped) if mapped else float('nan'):.3f}, null sd {d['null']['sd'] or 0:.4f}, "
                f"no counterpart below {self.threshold:.3f}",
                "the sketch similarity is not evidence: mapped pairs are measured on the rows outside the sketch"]


def _f(x) -> float | None:
    """JSON-safe float (None for NaN/inf), rounded to 6 decimals: sketch values are not exact to more."""
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _range(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}–{b}"


def _list(xs: list[int]) -> str:
    """0, 1, 2, 5 -> '0–2, 5'."""
    out, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            out.append(_range(start, x))
            start = None
    return ", ".join(out)


# ---- sketches -------------------------------------------------------------------------------------------------

def layer_slots(source) -> dict[int, dict[tuple, str]]:
    """layer -> {(role, expert, part): tensor name} for the comparable decoder/encoder layer tensors (no MTP)."""
    out: dict[int, dict[tuple, str]] = {}
    for key, name in keyed(source)[0].items():
        if key.layer is None or key.role == "mtp":
            continue
        out.setdefault(key.layer, {})[(key.role, key.expert, key.part)] = name
    return out


def sketch_rows(slot: Slot, seed: int, sample: float | None = None) -> np.ndarray | None:
    """The sketch's rows for one slot: a contiguous block at a seeded offset, the same for every layer and both
    models; None when the tensor is too small. Rows are an arbitrary axis, so a block is as good a sample for the
    null as scattered rows, and costs one read."""
    role, expert, part, rows, cols = slot
    if rows < MIN_ROWS:
        return None
    k = max(MIN_SKETCH_ROWS, math.ceil(SKETCH_ELEMS / max(1, cols)))
    if sample is not None:
        k = min(k, max(MIN_SKETCH_ROWS, math.ceil(sample * rows)))
    k = min(k, rows // 2)
    rng = np.random.default_rng([seed, zlib.crc32(f"{role}|{expert}|{part}|{rows}x{cols}".encode())])
    start = int(rng.integers(0, rows - k + 1))
    return np.arange(start, start + k)  # one contiguous block: one read (one range request) per tensor


def _read_sketch(source, name: str, rows: np.ndarray, cols: int, residual=None, role: str = "",
                 hidden: int = 0, kept=None) -> np.ndarray | None:
    """Double-centred, unit-norm sketch vector; the model side can be mapped through a residual fit first, the base
    side read through the kept hidden dimensions of a narrower model (``kept``: ``hidden.kept_dimensions``)."""
    idx, sign_rows = rows, None
    if residual is not None and role in _RESIDUAL_OUT and hidden and _n_rows(source, name) % hidden == 0:
        reps = rows // hidden
        idx = reps * hidden + residual.perm[rows % hidden]
        sign_rows = None if residual.sign is None else residual.sign[rows % hidden]
    narrowed = kept is not None and residual_view(role, _view(source.inventory[name].shape), kept) != \
        _view(source.inventory[name].shape)
    if narrowed and role in _RESIDUAL_OUT and _n_rows(source, name) == kept[2]:
        idx = kept[0][rows]
        sign_rows = None if kept[1] is None else kept[1][rows]
    x = read_indexed(source.reader, name, idx, 0, len(idx), raw=False, finite=True).reshape(len(idx), -1).double()
    if narrowed and role in _RESIDUAL_IN and x.shape[1] == kept[2]:
        x = x[:, torch.from_numpy(kept[0])]
        if kept[1] is not None:
            x = x * torch.from_numpy(kept[1].astype(np.float64))
    if residual is not None and role in _RESIDUAL_IN and cols == hidden:
        x = x[:, torch.from_numpy(residual.perm)]
        if residual.sign is not None:
            x = x * torch.from_numpy(residual.sign.astype(np.float64))
    if sign_rows is not None:
        x = x * torch.from_numpy(sign_rows.astype(np.float64)).unsqueeze(1)
    x = x - x.mean(1, keepdim=True)
    x = x - x.mean(0, keepdim=True)
    norm = float(x.norm())
    if not math.isfinite(norm) or norm <= 1e-30:
        return None
    return (x.reshape(-1) / norm).numpy()


def _n_rows(source, name: str) -> int:
    return source.inventory[name].n_rows


def _sketch_all(source, slots_by_layer, wanted: dict, *, residual=None, hidden: int = 0, kept=None) -> dict:
    """slot -> {layer: sketch vector} for the wanted slots (slot -> rows)."""
    todo = []  # (layer, slot, tensor, rows, row length)
    for layer, slots in slots_by_layer.items():
        for (role, expert, part), name in slots.items():
            view = residual_view(role, _view(source.inventory[name].shape), kept)
            slot = (role, expert, part, *view)
            if len(view) == 2 and wanted.get(slot) is not None:
                todo.append((layer, slot, name, wanted[slot], view[1]))
    prefetch = getattr(source, "prefetch", None)
    if prefetch is not None and residual is None:  # every sketch's rows asked for at once, then read one by one
        spans = [(name, int(rows[0]), int(rows[-1]) + 1) for _, slot, name, rows, _ in todo
                 if len(rows) and (kept is None or slot[0] not in _RESIDUAL_OUT)]
        if spans:
            prefetch(spans)
    out: dict = {}
    for layer, slot, name, rows, cols in todo:
        vec = _read_sketch(source, name, rows, cols, residual, slot[0], hidden, kept)
        if vec is not None:
            out.setdefault(slot, {})[layer] = vec
    return out


GRAM_ROLES = ("attn_output", "ffn_down")  # residual writers: their rows' Gram ignores the unit / head axis
GRAM_ROWS = 64
GRAM_DRAWS = 40


def _gram_similarity(base, model, lb_slots, lm_slots, lb: int, lm: int, *, seed: int, kept=None,
                     rows_used: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """S and its null sd from the residual writers' row Grams, for models none of whose layer tensors share a
    shape (Sheared-LLaMA-1.3B drops layers *and* prunes hidden size, heads and MLP units).

    The writer's k residual rows (a seeded block, the base's through the kept dimensions) are compared by their
    cosine Gram, k × k: the unit and head axis is summed over, so neither its order nor a subset of it matters. The
    similarity is the Pearson of the Grams' off-diagonal entries; its null sd comes from relabelling the model's k
    rows (a Mantel test), GRAM_DRAWS draws. Fits the map only, like the other sketches; never evidence.
    Returns (S, sd, tensors read); ``rows_used`` (a dict) receives slot -> the compared rows each writer lent.
    """
    total, var, count = np.zeros((lb, lm)), np.zeros((lb, lm)), np.zeros((lb, lm))
    used = 0
    for role in GRAM_ROLES:
        grams = []
        for src, slots, side in ((base, lb_slots, "base"), (model, lm_slots, "model")):
            out = {}
            for layer, sl in slots.items():
                name = sl.get((role, None, "weight"))
                if name is not None and len(src.inventory[name].shape) == 2:
                    out[layer] = name
            grams.append(out)
        if not grams[0] or not grams[1]:
            continue
        h2 = {model.inventory[n].shape[0] for n in grams[1].values()}
        hb = {base.inventory[n].shape[0] for n in grams[0].values()}
        if len(h2) != 1 or len(hb) != 1:
            continue
        h2, hb = h2.pop(), hb.pop()
        if kept is not None and (hb, h2) != (kept[2], len(kept[0])) or kept is None and hb != h2:
            continue
        k = min(GRAM_ROWS, h2 // 2)
        if k < 8:
            continue
        start = int(np.random.default_rng([seed, zlib.crc32(role.encode())]).integers(0, h2 - k + 1))
        rows_m = np.arange(start, start + k)
        rows_b, signs = (rows_m, None) if kept is None else (kept[0][rows_m], None if kept[1] is None else
                                                               kept[1][rows_m])
        iu = np.triu_indices(k, 1)

        def gram(src, name, rows, sign):
            x = read_indexed(src.reader, name, rows, 0, len(rows), raw=False, finite=True).double()
            if sign is not None:
                x = x * torch.from_numpy(sign.astype(np.float64)).unsqueeze(1)
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
            return (x @ x.T).numpy()

        def unit(c):
            v = c[iu] - c[iu].mean()
            n = float(np.linalg.norm(v))
            return v / n if n > 1e-12 and np.isfinite(n) else None

        vb = {i: unit(gram(base, n, rows_b, signs)) for i, n in grams[0].items()}
        cm = {j: gram(model, n, rows_m, None) for j, n in grams[1].items()}
        vm = {j: unit(c) for j, c in cm.items()}
        ib = [i for i in sorted(vb) if vb[i] is not None]
        im = [j for j in sorted(vm) if vm[j] is not None]
        if not ib or not im:
            continue
        B, M = np.stack([vb[i] for i in ib]), np.stack([vm[j] for j in im])
        rng = np.random.default_rng([seed, 0x6A4D])
        null = []
        for _ in range(GRAM_DRAWS):
            p = rng.permutation(k)
            null.append(B @ np.stack([unit(cm[j][np.ix_(p, p)]) for j in im]).T)
        grid = np.ix_(ib, im)
        used += len(ib) + len(im)
        if rows_used is not None:  # the writers' rows fitted the map: left out of their evidence (model shapes)
            for n in grams[1].values():
                rows_used[(role, None, "weight", *_view(model.inventory[n].shape))] = rows_m
        total[grid] += B @ M.T
        var[grid] += np.var(np.stack(null), axis=0)
        count[grid] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(count > 0, total / np.maximum(count, 1), np.nan),
                np.where(count > 0, np.sqrt(var) / np.maximum(count, 1), np.nan), used)


def _similarity(sk_b: dict, sk_m: dict, rows: dict, lb: int, lm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum of Pearson, sum of null variances, count) over the slots sketched on both sides."""
    total = np.zeros((lb, lm))
    var = np.zeros((lb, lm))
    count = np.zeros((lb, lm))
    for slot, by_b in sk_b.items():
        by_m = sk_m.get(slot)
        if not by_m:
            continue
        ib, im = sorted(by_b), sorted(by_m)
        B = np.stack([by_b[i] for i in ib])
        M = np.stack([by_m[j] for j in im])
        k, c = len(rows[slot]), slot[4]
        grid = np.ix_(ib, im)
        total[grid] += B @ M.T
        var[grid] += 1.0 / max(1, (k - 1) * (c - 1))
        count[grid] += 1
    return total, var, count


# ---- dynamic programming --------------------------------------------------------------------------------------

def fit_map(similarity: np.ndarray, null_sd: np.ndarray, *, z: float = Z_NULL,
            penalties: dict[str, float] | None = None) -> tuple[list[int | None], list[str]]:
    """Best piecewise-monotone map of model layers (columns) onto base layers (rows); O(L_base × L_model).

    A mapped cell gains ``S − z·σ``; no counterpart gains 0; steps from the previous mapped base layer p cost
    ``penalties`` × the median of ``z·σ``: next (p+1), repeat (p), skip (> p+1), back (< p). A model layer without
    counterpart either keeps p (an inserted layer) or consumes p+1 (an unrecognisable one), at no cost.
    """
    lb, lm = similarity.shape
    pen = dict(PENALTIES if penalties is None else penalties)
    finite = null_sd[np.isfinite(null_sd)]
    tau = z * float(np.median(finite)) if finite.size else 0.0
    cost = {k: v * tau for k, v in pen.items()}
    gain = np.where(np.isfinite(similarity) & np.isfinite(null_sd), similarity - z * null_sd, -np.inf)
    NEG = -np.inf
    # state index s = p + 1: 0 is "before the first base layer", s = i + 1 is "last mapped base layer i"
    V = np.full(lb + 1, NEG)
    V[0] = 0.0
    back_ptr = []  # per j: (choice code per state, previous state per state)
    for j in range(lm):
        # best predecessor for assigning base layer q (state q+1), by step kind
        nxt = V[:lb]                                   # from state q (p = q-1)
        rep = V[1:] - cost["repeat"]                   # from state q+1
        pre = np.maximum.accumulate(V)                 # pre[s] = max V[0..s]
        pre_arg = _running_arg(V, forward=True)
        skip = np.full(lb, NEG)
        skip_from = np.zeros(lb, dtype=np.int64)
        if lb > 1:
            skip[1:] = pre[:lb - 1] - cost["skip"]     # from states 0..q-1 (p <= q-2)
            skip_from[1:] = pre_arg[:lb - 1]
        suf = np.maximum.accumulate(V[::-1])[::-1]     # suf[s] = max V[s..]
        suf_arg = _running_arg(V, forward=False)
        bk = np.full(lb, NEG)
        bk_from = np.zeros(lb, dtype=np.int64)
        if lb > 1:
            bk[:lb - 1] = suf[2:] - cost["back"]       # from states q+2.. (p >= q+1)
            bk_from[:lb - 1] = suf_arg[2:]
        q = np.arange(lb)
        cands = np.stack([nxt, rep, skip, bk])         # order = tie preference
        froms = np.stack([q, q + 1, skip_from, bk_from])
        kind = cands.argmax(0)
        assign = cands[kind, q] + gain[:, j]
        assign_from = froms[kind, q]
        # no counterpart: keep state s, or advance s -> s+1
        keep = V.copy()
        adv = np.full(lb + 1, NEG)
        adv[1:] = V[:lb]
        new = np.full(lb + 1, NEG)
        code = np.zeros(lb + 1, dtype=np.int64)
        prev = np.zeros(lb + 1, dtype=np.int64)
        # assignment states 1..lb
        new[1:], code[1:], prev[1:] = assign, kind, assign_from
        better = keep > new
        new[better], code[better], prev[better] = keep[better], 4, np.arange(lb + 1)[better]
        better = adv > new
        new[better], code[better], prev[better] = adv[better], 5, (np.arange(lb + 1) - 1)[better]
        back_ptr.append((code, prev))
        V = new
    s = int(np.argmax(V))
    mapping: list[int | None] = [None] * lm
    steps: list[str] = [""] * lm
    names = {0: "next", 1: "repeat", 2: "skip", 3: "back", 4: "none", 5: "none"}
    for j in range(lm - 1, -1, -1):
        code, prev = back_ptr[j]
        c = int(code[s])
        if c < 4:
            mapping[j] = s - 1
        steps[j] = names[c]
        s = int(prev[s])
    first = next((j for j, i in enumerate(mapping) if i is not None), None)
    if first is not None and steps[first] == "next" and mapping[first] == 0:
        steps[first] = "start"
    return mapping, steps


def _running_arg(v: np.ndarray, *, forward: bool) -> np.ndarray:
    """Index of the running maximum (prefix when forward, suffix otherwise); ties keep the first index visited."""
    n = len(v)
    out = np.zeros(n, dtype=np.int64)
    best, arg = -np.inf, 0
    rng = range(n) if forward else range(n - 1, -1, -1)
    for s in rng:
        if v[s] > best:
            best, arg = v[s], s
        out[s] = arg
    return out


# ---- the entry points -----------------------------------------------------------------------------------------

def align_layers(base, model, *, seed: int = 0, sample: float | None = None, residual=None,
                 kept=None) -> LayerAlignment | None:
    """Sketch both models' layers, build S and fit the map. None when either model has no layer tensors.

    ``residual``: a :class:`~hf_provenance.alignment.residual.ResidualFit` to apply to the model's sketches when the
    model's residual stream is permuted (fit it first); ``plan_from_alignment`` applies it to the layer pairs too.
    """
    lb_slots, lm_slots = layer_slots(base), layer_slots(model)
    if not lb_slots or not lm_slots:
        return None
    lb, lm = max(lb_slots) + 1, max(lm_slots) + 1
    hidden = int(len(residual.perm)) if residual is not None else 0
    read0 = (base.reader.bytes_read, model.reader.bytes_read)

    def shapes(src, by_layer, kept=None):
        out = {}
        for layer, slots in by_layer.items():
            for (role, expert, part), name in slots.items():
                view = residual_view(role, _view(src.inventory[name].shape), kept)
                if len(view) == 2:
                    out.setdefault((role, expert, part, *view), set()).add(layer)
        return out

    shp_b, shp_m = shapes(base, lb_slots, kept), shapes(model, lm_slots)
    common = [s for s in shp_b if s in shp_m]
    rows = {s: r for s in common for r in [sketch_rows(s, seed, sample)] if r is not None}
    primary = {s: r for s, r in rows.items() if not _secondary(s[0])}
    # secondary slots (experts, router) only when some layer has no primary slot on either side
    needs = any(not any(s in primary for s in shp_b if layer in shp_b[s]) for layer in lb_slots) or \
        any(not any(s in primary for s in shp_m if layer in shp_m[s]) for layer in lm_slots)
    wanted = dict(primary)
    if needs:
        wanted.update({s: r for s, r in rows.items() if _secondary(s[0])})
    sk_b = _sketch_all(base, lb_slots, wanted, kept=kept)
    sk_m = _sketch_all(model, lm_slots, wanted, residual=residual, hidden=hidden)
    total, var, count = _similarity({s: v for s, v in sk_b.items() if s in primary},
                                    {s: v for s, v in sk_m.items() if s in primary}, wanted, lb, lm)
    if needs:
        t2, v2, c2 = _similarity({s: v for s, v in sk_b.items() if s not in primary},
                                 {s: v for s, v in sk_m.items() if s not in primary}, wanted, lb, lm)
        use2 = count == 0
        total[use2], var[use2], count[use2] = t2[use2], v2[use2], c2[use2]
    with np.errstate(invalid="ignore", divide="ignore"):
        S = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        sd = np.where(count > 0, np.sqrt(var) / np.maximum(count, 1), np.nan)
    gram_tensors, gram_rows = 0, {}
    if np.isnan(S).all():  # no layer tensor of equal shapes (units or heads pruned too): the writers' row Grams
        S, sd, gram_tensors = _gram_similarity(base, model, lb_slots, lm_slots, lb, lm, seed=seed, kept=kept,
                                               rows_used=gram_rows)
    mapping, steps = fit_map(S, sd)
    if not gram_tensors and None in mapping and any(i is not None for i in mapping):
        # a model layer at null level beside mapped ones: its units or heads may be permuted, which the row sketches
        # (the same row indices on both sides) cannot see; the writers' row Grams can. Kept only if they map more.
        tried: dict = {}
        Sg, sdg, used = _gram_similarity(base, model, lb_slots, lm_slots, lb, lm, seed=seed, kept=kept,
                                         rows_used=tried)
        if used:
            mg, stg = fit_map(Sg, sdg)
            if sum(i is not None for i in mg) > sum(i is not None for i in mapping):
                S, sd, mapping, steps, gram_tensors, gram_rows = Sg, sdg, mg, stg, used, tried
    for slot, rows in gram_rows.items():  # the Gram rows that fitted the map leave the evidence (not a rejected try's)
        wanted[slot] = np.union1d(wanted[slot], rows) if wanted.get(slot) is not None else rows
    layer_bytes = {
        "base": sum(base.inventory[n].nbytes for sl in lb_slots.values() for n in sl.values()),
        "model": sum(model.inventory[n].nbytes for sl in lm_slots.values() for n in sl.values())}
    return LayerAlignment(
        lb, lm, S, sd, tuple(mapping), tuple(steps), wanted,
        bytes_read={"base": base.reader.bytes_read - read0[0], "model": model.reader.bytes_read - read0[1]},
        bytes_total=layer_bytes,
        tensors_sketched={"base": sum(len(v) for v in sk_b.values()), "model": sum(len(v) for v in sk_m.values())},
        seed=seed, residual=residual is not None, gram_tensors=gram_tensors)


def _exclude_sketch_rows(p: PairSpec, sketch: dict) -> PairSpec:
    """The pair measured only on the rows its sketch did not read (the sketch fitted the map: DESIGN §3).
    The whole pair stays in ``wide``, with the stored rows the sketch read on each side (``widen``, ``narrow``)."""
    rows = sketch.get((p.key.role, p.key.expert, p.key.part, *p.shape)) if not p.is_vector else None
    if rows is None:
        return p
    raw = (_raw_rows(p.base_rows, rows), _raw_rows(p.cand_rows, rows))
    rest = np.setdiff1d(np.arange(p.shape[0]), rows)
    note = f"{p.note}; {len(rows)} sketch rows used to fit the layer map are excluded"
    return _keep_rows(replace(p, sketch_raw=raw), rest, note)


def _raw_rows(index: np.ndarray | None, positions: np.ndarray) -> np.ndarray:
    """The stored rows behind compared rows ``positions`` of a side (``index``: its row map, None = identity)."""
    positions = np.asarray(positions, dtype=np.int64)
    return positions if index is None else np.asarray(index, dtype=np.int64)[positions]


def _keep_rows(whole: PairSpec, keep: np.ndarray, note: str) -> PairSpec:
    """``whole`` compared on its rows ``keep`` only; ``whole`` itself stays reachable as ``wide``."""
    keep = np.asarray(keep, dtype=np.int64)
    return replace(whole, shape=(len(keep), whole.shape[1]), base_rows=_raw_rows(whole.base_rows, keep),
                   cand_rows=_raw_rows(whole.cand_rows, keep),
                   row_sign=None if whole.row_sign is None else np.asarray(whole.row_sign)[keep],
                   note=note, wide=whole, sketch_raw=None)


def widen(plan: AlignmentPlan) -> AlignmentPlan:
    """Layer-mapped pairs with all their rows again, for the unit, head, expert and width searches: they fit maps
    on whole tensors (a unit map covers every unit; the layer sketch's rows are not theirs to drop). Each keeps the
    stored rows its sketch read (``sketch_raw``), so that ``narrow`` leaves them out of the evidence afterwards."""
    if not any(p.wide is not None for p in plan.pairs):
        return plan
    return replace(plan, pairs=tuple(p.wide if p.wide is not None else p for p in plan.pairs))


def narrow(plan: AlignmentPlan) -> AlignmentPlan:
    """Undo ``widen`` after the searches, through whatever maps they composed: a compared row is dropped when the
    layer sketch read its stored row on either side (a unit map pairs base row i with a model row that the sketch
    may have read against another base row; neither side's sketched rows are evidence)."""
    pairs = []
    for p in plan.pairs:
        if p.sketch_raw is None:
            pairs.append(p)
            continue
        n = p.shape[0]
        hit = (np.isin(_raw_rows(p.base_rows, np.arange(n)), p.sketch_raw[0])
               | np.isin(_raw_rows(p.cand_rows, np.arange(n)), p.sketch_raw[1]))
        note = f"{p.note}; {int(hit.sum())} rows read by the layer-map sketch (either side) are excluded"
        pairs.append(_keep_rows(p, np.flatnonzero(~hit), note))
    return replace(plan, pairs=tuple(pairs))


def plan_from_alignment(al: LayerAlignment, base, model, plan: AlignmentPlan, *, residual=None,
                        kept=None) -> AlignmentPlan:
    """The plan with every layer pair re-made through the map: model layer j's tensors against its base layer's
    (same role/expert/part, equal shapes), sketched rows excluded from the rows measured. Non-layer pairs and
    non-layer unmatched entries of ``plan`` are kept. With ``residual`` the layer pairs carry the residual map
    (``apply_residual``'s semantics; applying it again to the whole plan leaves them unchanged)."""
    lb_slots, lm_slots = layer_slots(base), layer_slots(model)
    layer_names = ({n for sl in lb_slots.values() for n in sl.values()},
                   {n for sl in lm_slots.values() for n in sl.values()})
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    pairs = [p for p in plan.pairs if p.key.layer is None or p.key.role == "mtp"]
    unmatched = [u for u in plan.unmatched
                 if u.name not in (layer_names[0] if u.side == "base" else layer_names[1])]
    seen_base: set[str] = set()
    layer_pairs: list[PairSpec] = []
    for j, i in enumerate(al.mapping):
        mslots = lm_slots.get(j, {})
        if i is None:
            for name in mslots.values():
                unmatched.append(Unmatched("model", name, f"model layer {j} has no counterpart in the base "
                                                          "(layer sketches at null level)"))
            continue
        bslots = lb_slots.get(i, {})
        for slot, mname in mslots.items():
            bname = bslots.get(slot)
            if bname is None:
                unmatched.append(Unmatched("model", mname, f"no tensor with this role in base layer {i} "
                                                           f"(mapped to model layer {j})"))
                continue
            ib, im = base.inventory[bname], model.inventory[mname]
            vb, vm = _view(ib.shape), _view(im.shape)
            role, expert, part = slot
            key = K.CanonicalKey(role, j, expert, part)
            note = f"model layer {j} ← base layer {i} (layer map)"
            if vb != vm:
                p = None if kept is None else through_kept(key, bname, mname, base, model, kept, layout, layer=j,
                                                           note=f"{note}; base read through the kept hidden dimensions")
                if p is None:
                    unmatched.append(Unmatched("model", mname, f"shape differs from base layer {i}'s "
                                                               f"({list(ib.shape)} vs {list(im.shape)})"))
                    continue
                layer_pairs.append(p)
            else:
                layer_pairs.append(PairSpec(key, bname, mname, vb, axes_for(key, len(ib.shape), layout),
                                            K.component_of(key), j, note=note))
            seen_base.add(bname)
    for i in sorted({i for i in al.mapping if i is not None}):
        for bname in lb_slots.get(i, {}).values():
            if bname not in seen_base:
                unmatched.append(Unmatched("base", bname, "no tensor with this role in the model layers mapped "
                                                          f"from base layer {i}"))
    if residual is not None:
        layer_pairs = list(apply_residual(AlignmentPlan(tuple(layer_pairs)), residual, len(residual.perm))[0].pairs)
    pairs.extend(_exclude_sketch_rows(p, al.sketch_rows) for p in layer_pairs)
    for i in al.unused_base_layers():
        for name in lb_slots.get(i, {}).values():
            unmatched.append(Unmatched("base", name, f"base layer {i} has no counterpart in the model (layer map)"))
    summary = dict(plan.summary)
    summary["layers"] = al.to_dict()
    return AlignmentPlan(tuple(pairs), tuple(unmatched), summary, tuple(plan.notes))


def layer_plan(base, model, plan: AlignmentPlan, facts: dict, *, seed: int = 0, sample: float | None = None,
               residual=None) -> tuple[AlignmentPlan, dict, list[str]] | None:
    """A plan that pairs each model layer with the base layer it came from, or None.

    None when the identity layer numbering is already the best map (equal layer counts, diagonal map), when no
    layer pair rises above the null (nothing to map: unrelated models, or a permutation to undo first), or when a
    model has no layer tensors. Otherwise ``(plan, summary, lines)``: the new AlignmentPlan (its ``summary["layers"]``
    is ``summary``), the JSON dict (``method``, ``map`` [[model layer, base layer, similarity]...], ``segments``,
    ``best_per_layer``, ``relation``, ``similarity`` matrix, ``null``, ``sketch`` with bytes read...) and report
    lines such as ``layers: model 0–23 ← base 0–23, 24–47 ← base 8–31 (up-scaled: ...)``.

    ``facts["layers"]`` (base, model layer counts from ``identity_plan``) is checked against the layers found here.
    ``sample`` caps each sketch at that fraction of the tensor's rows (never under ``MIN_SKETCH_ROWS``). ``residual``
    (a ResidualFit, when the model's residual stream was found permuted): sketches and the layer pairs go through
    it; ``apply_residual`` on the returned plan then maps the remaining pairs and leaves the layer pairs as they are.
    """
    lay = facts.get("layers") if facts else None
    if lay and (not lay[0] or not lay[1]):
        return None
    kept = kept_dimensions(plan)  # a narrower residual stream (hidden_plan): the base read through it
    al = align_layers(base, model, seed=seed, sample=sample, residual=residual, kept=kept)
    if al is None or not al.found or al.is_diagonal:
        return None
    new_plan = plan_from_alignment(al, base, model, plan, residual=residual, kept=kept)
    summary = new_plan.summary["layers"]
    lines = al.lines()
    if lay and tuple(lay) != (al.base_layers, al.model_layers):
        lines.append(f"note: layer counts {tuple(lay)} from the identity plan differ from the numbering found "
                     f"({al.base_layers}, {al.model_layers}): some layer numbers hold no comparable tensor")
    return new_plan, summary, lines


__all__ = ["LayerAlignment", "align_layers", "fit_map", "layer_plan", "layer_slots", "plan_from_alignment",
           "sketch_rows", "SKETCH_ELEMS", "Z_NULL", "PENALTIES"]
