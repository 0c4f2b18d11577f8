"""MLP units and attention heads: recover which hidden unit / head of the model is which of the base, per layer.

Permuting the hidden units of an MLP (rows of gate/up, columns of down), rescaling them (up×c, down÷c, c > 0) or
permuting attention heads (with their KV group under grouped-query attention) leaves the function unchanged and
drives plain similarity to ≈0. This module finds the maps and hands back a plan whose pairs carry them.

**Fit on the residual writers, test on the readers.** Each map is fitted on the matrices whose *rows* are residual
dimensions, ffn_down (units = columns) and attn_output (heads = column blocks), and the tensors that read the
residual (gate, up, q, k, v) are the held-out evidence, measured through the plan by the ordinary stream. Why this
way round rather than fitting on gate (+ up) and testing on down:

* evidence stays on two thirds of the MLP (gate and up) and on q/k/v, not on one third;
* gate and up are coupled inside each unit (they read the same input; in SwiGLU models they often point the same
  way), so a map fitted on gate would inflate a test on up; neither is touched by a down-fitted map;
* under ``sample`` a row sample of down is a sample of residual dimensions for *every* unit, so the fit reads only
  the sampled rows of down/o; fitting on gate would need every row of gate and up of both models.

The search-free check of each map is split-half: the residual dimensions read are cut into two disjoint halves,
a map fitted on one half is tested on the other (held-out r: mean per-unit Pearson), and the two half maps (plus,
without sampling, maps fitted on gate and on up) are compared for agreement. Both statistics are tested against
the coupling-matched simulated null of :mod:`hf_provenance.alignment.nulls` (never against "chance"). A batch's map
is applied to the plan only when its held-out r clears the calibrated effect threshold and z ≥ z_derived against
that null; maps of batches that do not are reported and not applied, so a search on independent models cannot
manufacture evidence.

**Signatures.** A unit's signature is its down column over the residual dimensions read, count-sketched to
k ≤ 512 buckets, centred over units and scaled to unit length (scale-invariant: rescaling hides nothing). A head's
signature is its block of attn_output columns, sketched the same way. Everything is in the base's index space after
the plan's residual map (row map and signs of down/o, column map and signs of gate/up/q).

**Cost** for n units, residual width h, sketch width k: reading O(h·n) per model (down only; gate and up too
without sampling), sketching O(h·n), matching O(n²·k) flops (mutual-best rounds, float32 blocks of 1024 rows) plus
one linear assignment on at most LAP_MAX unresolved units (O(LAP_MAX³) worst case), the null O(K·u·n·k) with
K = 99 draws and u test units (64 to 512, fewer for wide layers: K·u·n·k·sources ≤ NULL_FLOPS). Memory
O(n·k + 1024·n + LAP_MAX²). A batch of many groups (a layer's routed experts) is tested on at most MAX_NULL_GROUPS
of them first; the maps are fitted (and the other groups read) only when that test recovers a correspondence, so
an independent MoE layer reads the down (and gate/up) of 16 experts a side, not 128, and runs no assignment.
Measured (benchmarks/matching.py, 2 shared CPU cores): n = 18944, h = 3584: the map
2.7-4.2 s, the whole fit with its null 19-24 s, peak about 0.75 GiB above the process's start.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from hf_provenance.alignment.assignment import linear_sum_assignment

from hf_provenance.alignment import nulls as N
from hf_provenance.alignment.hidden import kept_dimensions
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.measurement.stream import parallel_layers, read_indexed
from hf_provenance.statistics.effects import _clean
from hf_provenance.statistics.thresholds import load as load_thresholds

LAP_MAX = 4096          # linear assignment only on at most this many unresolved units
BLOCK = 1024            # rows per float32 similarity block
MAX_ROUNDS = 32         # mutual-best rounds before the assignment
NULL_UNITS = 512        # test units per batch for the split-half statistics (at most) ...
MIN_NULL_UNITS = 64     # ... and at least
MAX_NULL_GROUPS = 16    # groups of a batch (routed experts of a layer) the null is simulated on
NULL_FLOPS = 2e11       # budget of one batch's simulated null (fewer test units for wide layers)
READ_ROWS = 256         # rows per read when sketching
PARALLEL_FIT_BYTES = 256 << 20  # sketches two sampled fits may hold at once (else one layer at a time)
IDENTITY_SHARE = 0.95

# MLP kinds: roles of (gate, up, down). Gate is optional (BERT/GPT-2 MLPs have none).
MLP_ROLES: dict[str, tuple[str, str, str]] = {
    "dense": ("ffn_gate", "ffn_up", "ffn_down"),
    "shared": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),
    "expert": ("ffn_gate_exp", "ffn_up_exp", "ffn_down_exp"),
}
_PART_OF_ROLE = {role: (kind, i) for kind, roles in MLP_ROLES.items() for i, role in enumerate(roles)}
# Attention roles: GQA/MHA (q, k, v, o) and MLA (q_b, kv_b, o).
ATTN_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_b", "attn_kv_b")

__all__ = ["Assignment", "assign", "best_match", "grouped_assign", "grouped_subset", "BatchFit", "unit_plan",
           "read_rows", "LAP_MAX", "model_keys"]


# ---------------------------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assignment:
    """perm[i]: the row of B matched with row i of A (one-to-one)."""

    perm: np.ndarray
    mutual_best: int      # rows resolved by mutual-best rounds
    rounds: int
    lap_size: int         # rows left to the linear assignment
    score: np.ndarray     # similarity of each matched pair


def assign(sa: torch.Tensor, sb: torch.Tensor, *, block: int = BLOCK, lap_max: int = LAP_MAX) -> Assignment:
    """Maximum-similarity one-to-one matching of the rows of ``sa`` [n, k] to rows of ``sb`` [n', k] (n ≤ n').

    Rows should be unit length (similarity = inner product). A mutual-best pass first (row i's best column j whose
    best row is i: both are committed), repeated on the unresolved rest while it exceeds ``lap_max``; then
    scipy's ``linear_sum_assignment`` on the rest. Similarities are computed in float32 blocks of ``block`` rows.

    Complexity: each round costs O(r·r'·k) for r, r' unresolved rows; on unrelated matrices about half the rows are
    mutual best per round, so the rounds sum to about 2·n·n'·k flops; the assignment is O(m³) worst case for
    m ≤ lap_max rows. Memory: O((n + n')·k + block·n' + m²).

    Example:
        >>> a = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> assign(a, a[[2, 0, 1, 5, 3, 4]]).perm.tolist()
        [1, 2, 0, 4, 5, 3]
    """
    n, n2 = sa.shape[0], sb.shape[0]
    if n > n2:
        raise ValueError(f"assign: A has more rows ({n}) than B ({n2}); swap the arguments")
    sa, sb = sa.float(), sb.float()
    perm = np.full(n, -1, dtype=np.int64)
    rows, cols = np.arange(n), np.arange(n2)
    mutual, rounds = 0, 0
    while len(rows) and rounds < MAX_ROUNDS:
        rounds += 1
        r_hit, c_hit = _mutual_pass(sa, sb, rows, cols, block)
        perm[r_hit] = c_hit
        mutual += len(r_hit)
        keep_r = np.ones(len(rows), bool)
        keep_r[np.searchsorted(rows, r_hit)] = False
        keep_c = np.ones(len(cols), bool)
        keep_c[np.searchsorted(cols, np.sort(c_hit))] = False
        rows, cols = rows[keep_r], cols[keep_c]
        if len(rows) <= lap_max or not len(r_hit):
            break
    lap = len(rows)
    if lap:
        cost = (sa[torch.from_numpy(rows)] @ sb[torch.from_numpy(cols)].T).numpy()
        ri, ci = linear_sum_assignment(cost, maximize=True)
        perm[rows[ri]] = cols[ci]
        del cost
    score = (sa * sb[torch.from_numpy(perm)]).sum(1).numpy()
    return Assignment(perm, mutual, rounds, lap, score)


def _mutual_pass(sa, sb, rows, cols, block) -> tuple[np.ndarray, np.ndarray]:
    sbc = sb[torch.from_numpy(cols)]
    col_best = torch.full((len(cols),), -math.inf)
    col_arg = torch.full((len(cols),), -1, dtype=torch.int64)
    row_arg = torch.empty(len(rows), dtype=torch.int64)
    for s in range(0, len(rows), block):
        sim = sa[torch.from_numpy(rows[s:s + block])] @ sbc.T
        row_arg[s:s + sim.shape[0]] = sim.argmax(1)
        cv, ca = sim.max(0)
        upd = cv > col_best
        col_best[upd] = cv[upd]
        col_arg[upd] = ca[upd] + s
    hit = (col_arg[row_arg] == torch.arange(len(rows))).numpy()
    return rows[hit], cols[row_arg.numpy()[hit]]


def best_match(sa: torch.Tensor, sb: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """For each row of ``sa``, the index of its most similar row of ``sb`` (many-to-one), in float32 blocks."""
    out = torch.empty(sa.shape[0], dtype=torch.int64)
    for s in range(0, sa.shape[0], block):
        out[s:s + block] = (sa[s:s + block] @ sb.T).argmax(1)
    return out


def grouped_assign(sim: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Head matching that respects grouped-query attention: (head map, KV-group map).

    Query heads g·group .. g·group+group-1 share KV head g, so heads can only move with their group. A group pair's
    score is the best within-group head assignment; the groups are then assigned on those scores (the square case
    of :func:`grouped_subset`).
    """
    group = max(int(group), 1)
    return grouped_subset(sim, group, group)


def grouped_subset(sim: np.ndarray, r_model: int, r_base: int) -> tuple[np.ndarray, np.ndarray]:
    """Injective head matching that keeps GQA groups together: (head map, KV-group map), model -> base; the model
    may keep fewer heads per group or fewer groups (width pruning).

    ``sim`` [H', H]: model head i vs base head j; heads g·r .. g·r+r-1 share KV head g on each side. A model group
    takes its r' ≤ r heads from one base group (best within-block assignment); model groups go to different base
    groups (assignment on those block scores). r' = r = 1 is plain multi-head attention.

    Example:
        >>> s = np.eye(4)[[3, 2]]          # model heads 0, 1 are base heads 3, 2 (base group 1, 2 heads per group)
        >>> [x.tolist() for x in grouped_subset(s, 2, 2)]
        [[3, 2], [1]]
    """
    n_m, n_b = sim.shape
    g_m, g_b = n_m // r_model, n_b // r_base
    if r_model == r_base == 1:
        _, ci = linear_sum_assignment(sim, maximize=True)
        return ci.astype(np.int64), ci.astype(np.int64)
    score = np.zeros((g_m, g_b))
    inner: dict[tuple[int, int], np.ndarray] = {}
    for a in range(g_m):
        for b in range(g_b):
            blk = sim[a * r_model:(a + 1) * r_model, b * r_base:(b + 1) * r_base]
            ri, ci = linear_sum_assignment(blk, maximize=True)
            score[a, b] = blk[ri, ci].sum()
            inner[a, b] = ci
    _, gmap = linear_sum_assignment(score, maximize=True)
    heads = np.concatenate([gmap[a] * r_base + inner[a, gmap[a]] for a in range(g_m)])
    return heads.astype(np.int64), gmap.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Reading through a plan (the base's index space)
# ---------------------------------------------------------------------------------------------------------------

def read_rows(src, pair: PairSpec, positions: np.ndarray, *, side: str) -> torch.Tensor:
    """Rows ``positions`` of the pair's compared view, float32 (NaN/Inf read as 0), in the base's index space.

    side "base": base rows (through ``base_rows``), columns through ``base_cols``; side "model": candidate rows
    through ``cand_rows``, then the column map, column signs, column scales and row signs, exactly as the
    measurement stream applies them.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if side == "base":
        idx = positions if pair.base_rows is None else np.asarray(pair.base_rows)[positions]
        x = read_indexed(src.reader, pair.base_name, idx, 0, len(idx), raw=False, finite=True).reshape(len(idx), -1)
        return x if pair.base_cols is None else x[:, torch.from_numpy(np.asarray(pair.base_cols, dtype=np.int64))]
    idx = positions if pair.cand_rows is None else np.asarray(pair.cand_rows)[positions]
    x = read_indexed(src.reader, pair.cand_name, idx, 0, len(idx), raw=False, finite=True).reshape(len(idx), -1)
    if pair.col_map is not None:
        x = x[:, torch.from_numpy(np.asarray(pair.col_map, dtype=np.int64))]
    if pair.col_sign is not None:
        x = x * torch.from_numpy(np.asarray(pair.col_sign, dtype=np.float32))
    if pair.col_scale is not None:
        x = x * torch.from_numpy(np.asarray(pair.col_scale, dtype=np.float32))
    if pair.row_sign is not None:
        x = x * torch.from_numpy(np.asarray(pair.row_sign, dtype=np.float32)[positions]).unsqueeze(1)
    return x


def _fit_bytes(batches, heads, k: int) -> int:
    """What two concurrent sampled fits may hold: twice the largest batch's float32 sketches (A and B, raw and
    centred or normalised: four [units, k] arrays a tested group; a head group's attn_output likewise)."""
    mlp = [sum(g.n_units for g in gs[:MAX_NULL_GROUPS]) for gs in batches]
    att = [g.pairs["attn_output"].n_cols for g in heads]
    return 2 * 4 * 4 * k * max(mlp + att, default=0)


def sketch_writer(src, pair: PairSpec, sketch: N.ResidualSketch, *, side: str) -> torch.Tensor:
    """Sketch of a residual-writing matrix (rows = residual dims, e.g. ffn_down): [n_cols, k]."""
    acc = torch.zeros(sketch.k, pair.n_cols)
    dims = sketch.dims
    for s in range(0, len(dims), READ_ROWS):
        chunk = dims[s:s + READ_ROWS]
        acc += sketch.sketch_rows(read_rows(src, pair, chunk, side=side), chunk)
    return acc.T.contiguous()


def sketch_reader(src, pair: PairSpec, sketch: N.ResidualSketch, *, side: str) -> torch.Tensor:
    """Sketch of a residual-reading matrix (columns = residual dims, e.g. ffn_gate): [n_rows, k]."""
    out = torch.empty(pair.n_rows, sketch.k)
    for s in range(0, pair.n_rows, READ_ROWS * 4):
        pos = np.arange(s, min(pair.n_rows, s + READ_ROWS * 4))
        out[s:s + len(pos)] = sketch.sketch_cols(read_rows(src, pair, pos, side=side))
    return out


def model_keys(model) -> dict[str, object]:
    """Tensor name -> canonical key for the model (its mapper, as the identity plan uses)."""
    from hf_provenance.alignment.identity import keyed

    km, _, _ = keyed(model)
    return {name: key for key, name in km.items()}


# ---------------------------------------------------------------------------------------------------------------
# Groups found in a plan
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class MlpGroup:
    kind: str
    layer: int | None
    expert: int | None       # base expert (routed experts)
    cand_expert: int | None
    gate: PairSpec | None = None
    up: PairSpec | None = None
    down: PairSpec | None = None
    vectors: list = field(default_factory=list)   # unit-indexed 1-D pairs (gate/up biases)

    @property
    def n_units(self) -> int:
        return self.down.n_cols

    @property
    def label(self) -> str:
        e = f".e{self.expert}" if self.expert is not None else ""
        return f"blk.{self.layer}.{self.kind}{e}"


@dataclass
class HeadGroup:
    layer: int | None
    pairs: dict = field(default_factory=dict)      # role -> weight pair
    vectors: dict = field(default_factory=dict)    # role -> bias pair
    n_heads: int = 0
    n_kv: int = 0
    block: dict = field(default_factory=dict)      # role -> rows (cols for attn_output) per head / per KV head

    @property
    def mla(self) -> bool:
        return "attn_q_b" in self.pairs or "attn_kv_b" in self.pairs


def mlp_groups(plan: AlignmentPlan, mkeys: dict, layout=None) -> list[MlpGroup]:
    """MLP groups with a 2-D down pair whose unit axis matches gate/up rows; biases indexed by unit attached.

    Pairs read through a layout transform (fused splits) and roles stored transposed (GPT-2 Conv1D) are left out:
    their rows are not units.
    """
    groups: dict[tuple, MlpGroup] = {}
    vectors = []
    for p in plan.pairs:
        hit = _PART_OF_ROLE.get(p.key.role)
        if hit is None or p.layout is not None or (layout is not None and layout.is_transposed(p.key.role)):
            continue
        kind, part = hit
        ck = mkeys.get(p.cand_name)
        gid = (kind, p.layer, p.key.expert, getattr(ck, "expert", None))
        if p.is_vector:
            if part in (0, 1):
                vectors.append((gid, p))
            continue
        if p.key.part != "weight":
            continue
        g = groups.setdefault(gid, MlpGroup(kind, p.layer, p.key.expert, gid[3]))
        setattr(g, ("gate", "up", "down")[part], p)
    out = []
    for gid, g in groups.items():
        if g.down is None:
            continue
        ok = all(x is None or (x.n_rows == g.down.n_cols and x.n_cols == g.down.n_rows) for x in (g.gate, g.up))
        if not ok:
            continue
        g.vectors = [p for vid, p in vectors if vid == gid and p.n_cols == g.n_units]
        out.append(g)
    return sorted(out, key=lambda g: (g.layer if g.layer is not None else -1, g.kind, g.expert or 0))


def _attn_config(config: dict) -> dict:
    cfg = dict(config or {})
    text = cfg.get("text_config")
    if isinstance(text, dict):
        cfg = {**text, **{k: v for k, v in cfg.items() if k != "text_config"}}
    return cfg


def head_groups(plan: AlignmentPlan, config: dict) -> tuple[list[HeadGroup], list[str]]:
    """Attention groups per layer, with head counts and per-head row blocks from the config (checked on shapes)."""
    cfg = _attn_config(config)
    notes: list[str] = []
    n_heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if not isinstance(n_heads, int) or n_heads < 2:
        return [], ["attention heads: not searched (no num_attention_heads in the config)"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    by_layer: dict[int, HeadGroup] = {}
    for p in plan.pairs:
        if p.key.role not in ATTN_ROLES or p.key.expert is not None or p.layout is not None:
            continue
        g = by_layer.setdefault(p.layer, HeadGroup(p.layer, n_heads=n_heads, n_kv=n_kv))
        if p.is_vector:
            g.vectors[p.key.role] = p
        elif p.key.part == "weight":
            g.pairs[p.key.role] = p
    out = []
    for layer, g in sorted(by_layer.items(), key=lambda x: (x[0] if x[0] is not None else -1)):
        o = g.pairs.get("attn_output")
        if o is None or o.n_cols % n_heads:
            notes.append(f"attention heads of layer {layer}: not searched (no attn_output whose columns split "
                         f"into {n_heads} heads)")
            continue
        if g.mla:
            nope, rope = cfg.get("qk_nope_head_dim"), cfg.get("qk_rope_head_dim")
            vdim = cfg.get("v_head_dim")
            g.n_kv = n_heads
            g.block = {"attn_output": o.n_cols // n_heads, "attn_q_b": (nope or 0) + (rope or 0),
                       "attn_kv_b": (nope or 0) + (vdim or 0)}
        else:
            hd = o.n_cols // n_heads
            g.block = {"attn_output": hd, "attn_q": hd, "attn_k": hd, "attn_v": hd}
        if n_heads % g.n_kv:
            notes.append(f"attention heads of layer {layer}: not searched ({n_heads} heads do not split into "
                         f"{g.n_kv} KV groups)")
            continue
        bad = [r for r, p in g.pairs.items() if r != "attn_output" and
               p.n_rows != g.block.get(r, 0) * (g.n_kv if r in ("attn_k", "attn_v") else n_heads)]
        if bad:
            notes.append(f"attention heads of layer {layer}: not searched (rows of {', '.join(bad)} do not match "
                         f"{n_heads} heads / {g.n_kv} KV heads from the config)")
            continue
        out.append(g)
    return out, notes


# ---------------------------------------------------------------------------------------------------------------
# Fitting a batch (one layer's dense MLP, its shared expert, its routed experts, or its heads)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchFit:
    """The fitted maps of one batch and their tests against the simulated null."""

    kind: str                  # dense | shared | expert | heads
    layer: int | None
    labels: tuple[str, ...]
    maps: tuple[np.ndarray | None, ...]  # per group: base unit/head i -> model unit/head (None: not fitted)
    group_maps: tuple[np.ndarray | None, ...]   # heads: KV-group map
    n_units: int
    identity_share: float
    mutual_best: int
    lap_size: int
    heldout: N.NullTest
    agreement: dict
    recovered: bool
    sources: tuple[str, ...]
    fitted: int = 1            # groups whose map was fitted (none when the batch is not recovered)

    @property
    def is_identity(self) -> bool:
        return self.identity_share >= IDENTITY_SHARE

    def to_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "groups": len(self.maps), "units": self.n_units,
                "recovered": self.recovered, "identity_share": _clean(self.identity_share) if self.fitted else None,
                "groups_fitted": self.fitted, "mutual_best": self.mutual_best if self.fitted else None,
                "assignment_size": self.lap_size if self.fitted else None,
                "heldout_r": self.heldout.to_dict(),
                "agreement": {k: v.to_dict() for k, v in self.agreement.items()},
                "fit_sources": list(self.sources)}


def _decide(held: N.NullTest) -> bool:
    th = load_thresholds()
    z = held.z
    return bool(held.observed >= th.r_derived and z is not None and z >= th.z_derived and held.exceeds_all)


def _agreement_stats(maps: dict[str, torch.Tensor]) -> dict[str, float]:
    out, vals = {}, []
    for x, y in itertools.combinations(sorted(maps), 2):
        v = float((maps[x] == maps[y]).float().mean())
        out[f"agree:{x}~{y}"] = v
        vals.append(v)
    out["agreement"] = float(np.mean(vals)) if vals else 0.0
    return out


def _split_tests(stats: dict[str, N.NullTest]) -> tuple[N.NullTest, dict]:
    held = stats["heldout"]
    agree = {k.removeprefix("agree:"): v for k, v in stats.items() if k.startswith("agree")}
    return held, agree


def _test_units(n_units: list[int], draws: int, sources_k: int) -> int:
    """Test units per group: NULL_UNITS at most, fewer for wide layers so the null stays within NULL_FLOPS."""
    cost_per_unit = 2.0 * max(1, draws) * sources_k * float(np.mean(n_units))
    total = int(np.clip(NULL_FLOPS / cost_per_unit, MIN_NULL_UNITS, NULL_UNITS))
    return max(8, total // len(n_units))


def _half_scores(t: N.SignedPermutation, ah_i: torch.Tensor, bc: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A's test units against every unit of B' = t(B) on the buckets of half h, ``ah_i @ unit_cols(B'[h])``, from
    B's bucket-centred sketch ``bc`` [k, n]: a gather of the half's rows and their norms, no transformed copy."""
    g = bc.index_select(0, t.perm.index_select(0, h))
    return (ah_i * t.sign.index_select(0, h)) @ g / torch.linalg.vector_norm(g, dim=0).clamp_min(N.EPS)


def _moved(t: N.SignedPermutation, av: torch.Tensor) -> torch.Tensor:
    """av [u, k] moved by t⁻¹: ``_moved(t, av) @ unit_cols(B) == av @ unit_cols(t(B))`` (t permutes and signs B's
    buckets, which leaves each unit's norm over all buckets unchanged)."""
    return torch.zeros_like(av).index_copy_(1, t.perm, av * t.sign)


def fit_mlp_batch(groups: list[MlpGroup], base, model, sketch: N.ResidualSketch, *, full: bool, seed: int,
                  draws: int, fit_all: bool = False) -> BatchFit:
    """Fit the unit maps of one batch (groups sharing one null: a layer's dense MLP, shared or routed experts).

    B's sketches are kept bucket-major ([k, n]) so a null draw is a row gather; A's test units are prepared once.
    The batch is tested first, on its tested groups; the maps are fitted only when the test recovers a
    correspondence (or ``fit_all``): a map that is not applied needs no assignment, and the groups not tested no
    read.
    """
    halves = [torch.from_numpy(h) for h in sketch.halves]
    n_sources = 1 + (2 if full else 0)
    rng = np.random.default_rng([seed, 0x0417, groups[0].layer or 0])
    # the null is simulated on at most MAX_NULL_GROUPS groups (a random subset of a layer's experts): every draw
    # scores each tested group's test units against all of its units, which for 128 experts of 768 units had cost
    # 42 s per layer; the statistic and its null stay the same function of the same groups, so the test is valid
    tested = list(range(len(groups)))
    if len(groups) > MAX_NULL_GROUPS:
        tested = sorted(rng.choice(len(groups), size=MAX_NULL_GROUPS, replace=False).tolist())
    per_group_u = _test_units([groups[i].n_units for i in tested], draws, n_sources * sketch.k)
    fits: dict[int, Assignment] = {}

    def read_down(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group i's down sketches: A [n, k], and B bucket-major [k, n] centred over units."""
        a_down = sketch_writer(base, groups[i].down, sketch, side="base")
        b_down = sketch_writer(model, groups[i].down, sketch, side="model").T.contiguous().float()
        return a_down, b_down - b_down.mean(1, keepdim=True)

    def fit(i: int, a_down: torch.Tensor, bc: torch.Tensor) -> None:
        fits[i] = assign(N.unit_rows(a_down), N.unit_cols(bc).T)  # unit_cols centres again: a no-op on bc

    # only the tested groups keep sketches (for the null, and for their fit after it) and have gate/up read
    # (agreement sources of the test only): 128 experts' sketches held at once had taken 2 GB for one
    # Qwen3-30B-A3B-sized layer
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    prepared = []
    for i in tested:
        g = groups[i]
        a_down, bc = kept[i] = read_down(i)
        a, b = {}, {}
        if full:
            for name in ("gate", "up"):
                pair = getattr(g, name)
                if pair is not None:
                    a[name] = sketch_reader(base, pair, sketch, side="base")
                    b[name] = sketch_reader(model, pair, sketch, side="model").T.contiguous()
        n = g.n_units
        u = torch.from_numpy(np.sort(rng.choice(n, size=min(n, per_group_u), replace=False)))
        ah = [N.unit_rows(a_down[:, h])[u] for h in halves]
        asrc = {name: N.unit_rows(a[name])[u] for name in a}
        # B as every draw needs it, prepared once. A draw is a signed permutation of B's buckets (rows): centring
        # each bucket over the units commutes with it, and a unit's norm over all buckets is unchanged by it; so
        # the down sketch is centred once (each draw only gathers a half's rows and takes their norms), the
        # agreement sources are normalised once, and the draw moves A's few test units instead of B's k × n
        # sketch (the same statistics, to 1e-6; the unit search of two 5632-wide layers 9.4 -> 6.4-6.9 s)
        bn = {name: N.unit_cols(b[name]) for name in asrc}
        prepared.append((ah, asrc, bc, bn))

    unmoved = N.SignedPermutation(torch.arange(sketch.k), torch.ones(sketch.k))

    def statistics(t):
        t = unmoved if t is None else t
        held, agree = [], []
        for ah, asrc, bc, bn in prepared:
            scores = [_half_scores(t, ah[i], bc, h) for i, h in enumerate(halves)]
            m = [sc.argmax(1) for sc in scores]
            # each half's best matches, scored on the other half
            held.append(0.5 * (float(scores[1].gather(1, m[0].unsqueeze(1)).mean()) +
                               float(scores[0].gather(1, m[1].unsqueeze(1)).mean())))
            maps = {"down/1": m[0], "down/2": m[1]}
            for name, av in asrc.items():
                maps[name] = (_moved(t, av) @ bn[name]).argmax(1)
            agree.append(_agreement_stats(maps))
        out = {"heldout": float(np.mean(held))}
        for key in agree[0]:
            out[key] = float(np.mean([x[key] for x in agree]))
        return out

    stats = N.simulate(statistics, sketch, draws=draws, seed=seed + 7919 * ((groups[0].layer or 0) + 1))
    sources = ("down",) + tuple(n for n in ("gate", "up") if n in prepared[0][1])  # asrc: the sources read
    prepared.clear()
    held, agree = _split_tests(stats)
    recovered = _decide(held)
    # the maps are fitted only now, and only when they will be applied: the test did not need them (it scores
    # best matches on held-out halves), and on independent models every assignment had been wasted work
    if recovered or fit_all:  # each group not tested is fitted as soon as its down sketches are read
        for i in range(len(groups)):
            fit(i, *(kept.pop(i) if i in kept else read_down(i)))
    kept.clear()
    done = [fits[i] for i in sorted(fits)]
    maps = tuple(fits[i].perm if i in fits else None for i in range(len(groups)))
    same = sum(int((f.perm == np.arange(len(f.perm))).sum()) for f in done)
    total = sum(len(f.perm) for f in done)
    return BatchFit(groups[0].kind, groups[0].layer, tuple(g.label for g in groups), maps,
                    tuple(None for _ in maps), groups[0].n_units, same / max(1, total),
                    sum(f.mutual_best for f in done), max((f.lap_size for f in done), default=0), held, agree,
                    recovered, sources, len(done))


def fit_heads(g: HeadGroup, base, model, sketch: N.ResidualSketch, *, full: bool, seed: int,
              draws: int) -> BatchFit:
    """Fit the head map of one layer from attn_output column blocks (q rows too without sampling), GQA-respecting.

    Sketches are bucket-major ([k, heads, block]): a null draw gathers rows; a head's signature is its
    [k, block] slab, centred over heads and scaled to unit length.
    """
    o = g.pairs["attn_output"]
    nh, r = g.n_heads, g.n_heads // g.n_kv
    halves = [torch.from_numpy(h) for h in sketch.halves]

    def heads_of(x):                      # [k, n_heads*block] -> [k, n_heads, block]
        return x.reshape(x.shape[0], nh, -1)

    a = {"o": heads_of(sketch_writer(base, o, sketch, side="base").T)}
    b = {"o": heads_of(sketch_writer(model, o, sketch, side="model").T.contiguous())}
    if full and "attn_q" in g.pairs:
        a["q"] = heads_of(sketch_reader(base, g.pairs["attn_q"], sketch, side="base").T)
        b["q"] = heads_of(sketch_reader(model, g.pairs["attn_q"], sketch, side="model").T.contiguous())

    def sig(x, h=None):                   # -> [n_heads, k·block], centred over heads, unit rows
        x = x if h is None else x.index_select(0, h)
        x = x - x.mean(1, keepdim=True)
        x = x / x.pow(2).sum((0, 2), keepdim=True).sqrt().clamp_min(N.EPS)
        return x

    def sim(xa, xb):
        return torch.einsum("bht,bgt->hg", xa, xb)

    ah = [sig(a["o"], h) for h in halves]
    asrc = {name: sig(a[name]) for name in a if name != "o"}

    def match(s):
        return torch.from_numpy(grouped_assign(s.numpy().astype(np.float64), r)[0])

    def statistics(t):
        bo = b["o"] if t is None else t.axis(b["o"], 0)
        bh = [sig(bo, h) for h in halves]
        s = [sim(ah[i], bh[i]) for i in range(2)]
        m = [match(x) for x in s]
        rows = torch.arange(nh)
        held = 0.5 * (float(s[1][rows, m[0]].mean()) + float(s[0][rows, m[1]].mean()))
        maps = {"o/1": m[0], "o/2": m[1]}
        for name, av in asrc.items():
            maps[name] = match(sim(av, sig(b[name] if t is None else t.axis(b[name], 0))))
        return {"heldout": held, **_agreement_stats(maps)}

    stats = N.simulate(statistics, sketch, draws=draws, seed=seed + 104729 * ((g.layer or 0) + 1))
    held, agree = _split_tests(stats)
    heads, groups = grouped_assign(sim(sig(a["o"]), sig(b["o"])).numpy().astype(np.float64), r)
    same = float((heads == np.arange(nh)).mean())
    return BatchFit("heads", g.layer, (f"blk.{g.layer}.heads",), (heads,), (groups,), nh, same, 0, nh, held, agree,
                    _decide(held), ("o",) + tuple(x for x in ("q",) if x in a))


# ---------------------------------------------------------------------------------------------------------------
# Applying maps to pairs
# ---------------------------------------------------------------------------------------------------------------

def expand(perm: np.ndarray, block: int) -> np.ndarray:
    """A map over blocks (heads) as a map over their rows: block i -> rows perm[i]*block .. +block-1."""
    return (np.asarray(perm)[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def map_rows(p: PairSpec, perm: np.ndarray, *, note: str, evidence: bool | None = None) -> PairSpec:
    """Compose a map on the pair's compared rows: compared row i now meets candidate row old(perm[i])."""
    perm = np.asarray(perm, dtype=np.int64)
    old = np.arange(p.n_rows) if p.cand_rows is None else np.asarray(p.cand_rows)
    return replace(p, cand_rows=old[perm], base_rows=np.arange(p.n_rows) if p.base_rows is None else p.base_rows,
                   row_sign=None if p.row_sign is None else np.asarray(p.row_sign)[perm],
                   evidence=p.evidence if evidence is None else (p.evidence and evidence), note=_note(p, note))


def map_cols(p: PairSpec, perm: np.ndarray, *, note: str, evidence: bool | None = None) -> PairSpec:
    """Compose a map on the pair's compared columns (for 1-D pairs: its elements)."""
    perm = np.asarray(perm, dtype=np.int64)
    old = np.arange(p.n_cols) if p.col_map is None else np.asarray(p.col_map)
    return replace(p, col_map=old[perm], col_sign=None if p.col_sign is None else np.asarray(p.col_sign)[perm],
                   evidence=p.evidence if evidence is None else (p.evidence and evidence), note=_note(p, note))


def _note(p: PairSpec, note: str) -> str:
    return note if not p.note else f"{p.note}; {note}"


def _apply_mlp(pairs: dict, g: MlpGroup, perm: np.ndarray) -> None:
    held = "unit map fitted on ffn_down columns: evidence along both axes here (held out)"
    for pair in (g.gate, g.up):
        if pair is not None:
            pairs[id(pair)] = map_rows(pairs[id(pair)], perm, note=held)
    pairs[id(g.down)] = map_cols(pairs[id(g.down)], perm, evidence=False,
                                 note="unit map fitted on these columns: reported, not evidence")
    for v in g.vectors:
        pairs[id(v)] = map_cols(pairs[id(v)], perm, note="unit map applied (fitted on ffn_down)")


def _apply_heads(pairs: dict, g: HeadGroup, heads: np.ndarray, groups: np.ndarray) -> None:
    held = "head map fitted on attn_output: held out here"
    for role, pair in g.pairs.items():
        by_group = role in ("attn_k", "attn_v")
        rows = expand(groups if by_group else heads, g.block[role])
        if role == "attn_output":
            pairs[id(pair)] = map_cols(pairs[id(pair)], rows, evidence=False,
                                       note="head map fitted on these columns: reported, not evidence")
        else:
            pairs[id(pair)] = map_rows(pairs[id(pair)], rows, note=held)
    for role, vec in g.vectors.items():
        if role in g.block and role != "attn_output" and vec.n_cols == len(expand(
                groups if role in ("attn_k", "attn_v") else heads, g.block[role])):
            rows = expand(groups if role in ("attn_k", "attn_v") else heads, g.block[role])
            pairs[id(vec)] = map_cols(pairs[id(vec)], rows, note="head map applied (fitted on attn_output)")


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def unit_plan(base, model, plan: AlignmentPlan, *, seed: int = 0, sample: float | None = None,
              draws: int = N.NULL_DRAWS, sketch_k: int = N.SKETCH_K, apply_all: bool = False
              ) -> tuple[AlignmentPlan, dict, list[str]] | None:
    """Search MLP unit and attention head permutations in every layer of ``plan`` (after the residual map).

    Args:
        base, model: ModelSources. plan: the plan to refine (identity, or after ``apply_residual``).
        seed: seeds the sketch, the test units and the simulated null. sample: as in ``compare``: fit from a
            sample of residual dimensions and skip the gate/up/q agreement sources (they need full reads).
        draws: simulated candidates per batch (K). sketch_k: sketch buckets (≤ 512).
        apply_all: apply every fitted map, recovered or not (diagnostics and tests only: a map that did not beat
            the null can inflate the per-tensor statistics of coupled tensors).

    Returns:
        None when there is nothing to do (no MLP/attention pairs, or every fitted map is the identity). Otherwise
        ``(plan, summary, lines)``: the plan with the maps of *recovered* batches applied (gate/up/q/k/v rows, down
        and attn_output columns, unit- and head-indexed biases; down and attn_output, on which the maps were
        fitted, get evidence=False); ``summary`` = ``{"units": ..., "heads": ...}`` for the JSON ``alignment``;
        ``lines`` for the report. Batches whose held-out r does not beat the simulated null are reported, not
        applied (``summary[...]["applied"]`` says whether anything was).

    Example:
        >>> out = unit_plan(base, model, plan, seed=0)        # doctest: +SKIP
        >>> new_plan, summary, lines = out                    # doctest: +SKIP
    """
    from hf_provenance.alignment.layouts import layout_for

    mkeys = model_keys(model)
    layout = layout_for(str((base.config or {}).get("model_type", "")))
    mlps = mlp_groups(plan, mkeys, layout)
    heads, head_notes = head_groups(plan, base.config or {})
    if not mlps and not heads:
        return None
    hidden = _attn_config(base.config or {}).get("hidden_size")
    if not isinstance(hidden, int):
        hidden = mlps[0].down.n_rows if mlps else heads[0].pairs["attn_output"].n_rows
    kept = kept_dimensions(plan)
    if kept is not None:  # a narrower residual stream: pairs are compared over the model's dimensions
        hidden = len(kept[0])
    full = sample is None or sample >= 1.0
    dims = N.residual_dims(hidden, None if full else sample, seed)
    sketch = N.ResidualSketch.build(hidden, dims, k=sketch_k, seed=seed)
    batches: dict[tuple, list[MlpGroup]] = {}
    for g in mlps:
        if g.down.n_rows != hidden:
            continue
        batches.setdefault((g.layer, g.kind), []).append(g)
    # layers are fitted independently (each batch draws its null from its own seed), so under sampling two at a
    # time: a fit is a long run of small tensor operations, which one thread cannot spread over two cores (on an
    # independent 7B pair, every layer tested and nothing found, the sampled compare took 34.4 s with one core
    # busy in the searches; 27.8 s this way, same report, same peak RSS). Full reads keep one layer at a time: their
    # fits also sketch gate and up, and two at once had doubled that compare's peak RSS (1.0 -> 2.1 GB)
    workers = 1 if full or _fit_bytes(batches.values(), heads, sketch.k) > PARALLEL_FIT_BYTES else None
    with parallel_layers(workers) as run:
        unit_fits = run(lambda gs: (fit_mlp_batch(gs, base, model, sketch, full=full, seed=seed, draws=draws,
                                                  fit_all=apply_all), gs), list(batches.values()))
        head_fits = run(lambda g: (fit_heads(g, base, model, sketch, full=full, seed=seed, draws=draws), g),
                        [g for g in heads if g.pairs["attn_output"].n_rows == hidden])
    if not unit_fits and not head_fits or all(f.is_identity for f, _ in unit_fits + head_fits):
        return None
    pairs = {id(p): p for p in plan.pairs}
    params = {"units": [0, 0], "heads": [0, 0]}      # searched, aligned
    for fit, gs in unit_fits:
        applied = (fit.recovered or apply_all) and not fit.is_identity
        for g, perm in zip(gs, fit.maps):
            n = sum(p.numel for p in (g.gate, g.up, g.down, *g.vectors) if p is not None)
            params["units"][0] += n
            if applied:
                params["units"][1] += n
                _apply_mlp(pairs, g, perm)
    for fit, g in head_fits:
        applied = (fit.recovered or apply_all) and not fit.is_identity
        n = sum(p.numel for p in (*g.pairs.values(), *g.vectors.values()))
        params["heads"][0] += n
        if applied:
            params["heads"][1] += n
            _apply_heads(pairs, g, fit.maps[0], fit.group_maps[0])
    new_pairs = tuple(pairs[id(p)] for p in plan.pairs)
    units_summary = _summary([f for f, _ in unit_fits], params["units"], sketch, draws, sample, "units")
    heads_summary = _summary([f for f, _ in head_fits], params["heads"], sketch, draws, sample, "heads")
    if heads_summary is not None:
        heads_summary["notes"] = head_notes
    summary = {"units": units_summary, "heads": heads_summary}
    lines = _lines(unit_fits, head_fits) + head_notes
    new_summary = dict(plan.summary)
    new_summary.update(summary)
    return AlignmentPlan(new_pairs, plan.unmatched, new_summary, plan.notes + tuple(lines)), summary, lines


def _summary(fits: list[BatchFit], params: list[int], sketch, draws, sample, what: str) -> dict | None:
    if not fits:
        return None
    held = [f.heldout for f in fits]
    applied = [f for f in fits if f.recovered and not f.is_identity]
    agree_p = [f.agreement["agreement"].p for f in fits if "agreement" in f.agreement]
    return {
        "method": ("unit maps fitted on ffn_down columns (sketched residual rows), linear assignment after a "
                   "mutual-best pass; tested split-half against a coupling-matched simulated null"
                   if what == "units" else
                   "head maps fitted on attn_output column blocks, KV groups kept together (GQA); tested "
                   "split-half against a coupling-matched simulated null"),
        "batches": len(fits), "recovered": sum(f.recovered for f in fits),
        "identity": sum(f.is_identity for f in fits), "applied": bool(params[1]),
        "applied_batches": len(applied), "searched_params": params[0], "aligned_params": params[1],
        "heldout_r": {"mean": _clean(np.mean([h.observed for h in held])),
                      "null_mean": _clean(np.mean([h.mean for h in held])),
                      "null_sd": _clean(np.mean([h.sd for h in held])),
                      "min_z": _clean(min((h.z for h in held if h.z is not None), default=None))},
        "agreement_p_cauchy": _clean(N.cauchy(agree_p)),
        "sketch": sketch.to_dict(), "null_draws": draws, "sample": sample,
        "layers": [f.to_dict() for f in fits],
    }


def _lines(unit_fits, head_fits) -> list[str]:
    lines = []
    by_kind: dict[str, list[BatchFit]] = {}
    for f, _ in unit_fits:
        by_kind.setdefault(f.kind, []).append(f)
    names = {"dense": "MLP units", "shared": "shared-expert units", "expert": "routed-expert units"}
    for kind, fits in by_kind.items():
        lines.append(_line(names[kind], fits, "down"))
    if head_fits:
        lines.append(_line("attention heads", [f for f, _ in head_fits], "attn_output"))
    return lines


def _line(name: str, fits: list[BatchFit], fitted: str) -> str:
    rec = sum(f.recovered for f in fits)
    ident = sum(f.recovered and f.is_identity for f in fits)
    held = [f.heldout for f in fits]
    agree = [f.agreement.get("agreement") for f in fits if f.agreement.get("agreement") is not None]
    r = np.mean([h.observed for h in held])
    mu, sd = np.mean([h.mean for h in held]), np.mean([h.sd for h in held])
    what = "permutation recovered" if rec > ident else "identity map confirmed" if rec else "no correspondence found"
    s = (f"{name}: {what} in {rec}/{len(fits)} layers, held-out split-half {fitted} r = {r:.2f} "
         f"(null {mu:.2f} ± {sd:.2f})")
    if agree:
        a = np.mean([x.observed for x in agree])
        am = np.mean([x.mean for x in agree])
        p = N.cauchy([x.p for x in agree])
        s += f"; map agreement {a:.2f} (null {am:.2f}, p = {p:.2g})"
    return s
