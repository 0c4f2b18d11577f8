"""Residual-stream rotations: a copy whose residual basis was changed by an orthogonal matrix.

Folding the norm weights g into the matrices that read the residual and then rotating the residual stream by an
orthogonal Q (QuaRot, SpinQuant, SliceGPT do exactly this; so can anyone hiding a copy) keeps the function: every
reader W becomes W·diag(g)·Q, every writer Qᵀ·W. At real widths Q spreads each residual column over all of them, so
every statistic along the residual axis falls to null level (≈ 0.08 at hidden 1024, a randomly rotated llama copy
was called ``independent`` before this check), and no permutation search can undo it.

**Invariant.** The Gram matrix of a reader's rows with its own side's norm weights folded in, E·Eᵀ with
E = W·diag(g), is unchanged by any orthogonal Q (and by any residual permutation or sign flip): a rotated copy has
the base's row Grams, up to fine-tuning; two independently trained models do not.

**Test (Mantel).** Per reader pair: s rows (the same indices on both sides), the Pearson r of the off-diagonal
entries of the two s × s Grams. Its null relabels B's rows by the permutations its rows allow (DESIGN §Statistics 1:
under H0 B's labels along an arbitrary axis are exchangeable given A). Two families of readers:

* MLP units (gate/up of dense MLPs, shared and routed experts; a seeded contiguous block of ROWS units): an
  arbitrary axis, any relabelling is the null;
* value projections (``value_test``): rows grouped by head (the heads' attention patterns differ), so the heads are
  paired first, on signatures no relabelling inside a head changes (each head's sorted row-Gram entries), and the
  null relabels rows inside their head only. This finds a rotated copy whose MLP units and heads were permuted too.

q/k rows are not used: they carry rotary frequencies at fixed positions, structure that independent models share and
a relabelling would call evidence. Nothing is fitted to the other side, so the test cannot inflate similarity.

**Routed experts shuffled too.** Expert e of the base is tested against the model's expert that its router row
matches: each expert's signature is its router row's sorted inner products with every router row of its layer
(norm folded), invariant to the rotation and to any reordering of the experts; the experts are paired by linear
assignment on those signatures (a rotated, expert-shuffled copy pairs exactly). The pairing depends on the routers
only, so relabelling the units inside a paired expert is still exactly the null: the test stays valid.

**Decision.** A tensor clears when r ≥ r_derived, z ≥ z_derived against its null, and r exceeds every draw (as the
searches decide); the pair is a rotated copy when, in one family, at least ``MIN_CLEARED`` tensors clear and they
are at least half of that family's tests (replication). Run only when the ordinary evidence and the searches found
no lineage.

Cost: s rows of at most ``MAX_TENSORS`` MLP tensors per side (2 MB each at hidden 4096), every row of at most
``MAX_VALUE_TENSORS`` value projections, their norm vectors and the MoE layers' routers; an s × s Gram (s² · hidden
flops) and ``DRAWS`` relabellings of it per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from hf_provenance.alignment import nulls as N
from hf_provenance.alignment.assignment import linear_sum_assignment
from hf_provenance.alignment.plan import AlignmentPlan, PairSpec
from hf_provenance.alignment.units import read_rows
from hf_provenance.measurement.stream import read_indexed
from hf_provenance.measurement.readahead import _row_spans
from hf_provenance.statistics.effects import _clean
from hf_provenance.statistics.thresholds import load as load_thresholds

ROWS = 256            # rows (units) per Gram
MIN_ROWS = 32         # tensors with fewer rows are not tested
MAX_TENSORS = 32      # tensors tested per comparison, spread evenly over the layers
DRAWS = 99            # relabellings of B's rows per tensor
DRAW_CHUNK = 16       # relabellings gathered at once (16 × s² floats)
MIN_CLEARED = 2
MAX_VALUE_TENSORS = 4  # value projections tested per comparison (every row is read: all heads are paired)
MAX_VALUE_ROWS = 4096  # ... when they have at most this many rows
# MLP readers (rows = units, an arbitrary axis) and the norm whose weights multiply their columns; value projections
# are tested apart (``value_test``, with attn_norm)
READERS: dict[str, str] = {
    "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm",
    "ffn_gate_shexp": "ffn_norm", "ffn_up_shexp": "ffn_norm",
    "ffn_gate_exp": "ffn_norm", "ffn_up_exp": "ffn_norm",
}
EXPERT_METHOD = ("routed experts paired by linear assignment on their router rows' sorted inner products with every "
                 "router row of the layer (norm folded): invariant to the rotation and to the experts' order")
METHOD = ("row Gram matrices of MLP readers and value projections (each side's norm weights folded in), invariant "
          "to any orthogonal change of the residual basis; Mantel test: Pearson of the off-diagonal entries against "
          "relabellings of the model's units (value rows: within their head, the heads paired first)")
HEAD_METHOD = ("value heads paired by linear assignment on each head's sorted row-Gram entries (invariant to the "
               "rotation, to the head order and to the rows' order inside a head)")


@dataclass(frozen=True)
class GramTest:
    """One reader pair's Mantel test (``name``: the base tensor; ``model_name``: the model tensor it was paired
    with)."""

    name: str
    layer: int | None
    rows: int
    test: N.NullTest
    cleared: bool
    model_name: str | None = None
    heads: tuple[tuple[int, int], ...] | None = None  # value projections: (base head, model head) tested

    @property
    def family(self) -> str:
        return "value" if self.heads is not None else "mlp"

    def to_dict(self) -> dict:
        return {"tensor": self.name, "model_tensor": self.model_name, "layer": self.layer, "rows": self.rows,
                "gram_r": self.test.to_dict(), "cleared": self.cleared,
                "heads": None if self.heads is None else [list(h) for h in self.heads]}


@dataclass(frozen=True)
class RotationCheck:
    """Every test of one comparison, the pairings they used, and the decision (``rotated``)."""

    tests: tuple[GramTest, ...]
    expert_layers: tuple[int, ...] = ()      # MoE layers whose experts were paired through their routers
    experts_moved: int = 0                   # base experts paired with a model expert of another index

    @property
    def cleared(self) -> int:
        return sum(t.cleared for t in self.tests)

    @property
    def rotated(self) -> bool:
        """Replicated within one family of readers (MLP units or value rows): at least MIN_CLEARED tensors clear
        and at least half of that family's tests (MLP units permuted on top of the rotation leave the values)."""
        for family in ("mlp", "value"):
            tests = [t for t in self.tests if t.family == family]
            hit = sum(t.cleared for t in tests)
            if hit >= MIN_CLEARED and 2 * hit >= len(tests):
                return True
        return False

    @property
    def mean_r(self) -> float | None:
        return float(np.mean([t.test.observed for t in self.tests])) if self.tests else None

    def line(self) -> str:
        if not self.tests:
            return "residual rotation: not tested (no MLP reader or value pair with enough rows)"
        t = [x.test for x in self.tests]
        mu, sd = float(np.mean([x.mean for x in t])), float(np.mean([x.sd for x in t]))
        what = (f"rotated copy: {self.cleared}/{len(t)} tensors clear the threshold" if self.rotated else
                f"no rotated copy ({self.cleared}/{len(t)} tensors clear the threshold)")
        n_v = sum(x.family == "value" for x in self.tests)
        return (f"residual rotation: {what}; row-Gram (Mantel) r = {self.mean_r:.2f} over {len(t) - n_v} MLP reader "
                f"and {n_v} value tensors (null {mu:.2f} ± {sd:.2f})")

    def to_dict(self) -> dict:
        return {"method": METHOD, "tested": len(self.tests), "cleared": self.cleared, "rotated": self.rotated,
                "mean_r": _clean(self.mean_r), "draws": DRAWS, "rows": ROWS, "head_pairing": HEAD_METHOD,
                "expert_pairing": {"method": EXPERT_METHOD, "layers": list(self.expert_layers),
                                   "experts_moved": self.experts_moved} if self.expert_layers else None,
                "tensors": [t.to_dict() for t in self.tests]}


def _norms(plan: AlignmentPlan) -> dict[tuple[str, int | None], PairSpec]:
    return {(p.key.role, p.key.layer): p for p in plan.pairs
            if p.key.role in {*READERS.values(), "attn_norm"} and getattr(p.key, "part", "weight") == "weight"}


def _readers(plan: AlignmentPlan) -> list[PairSpec]:
    """The MLP reader pairs to test: weights with enough rows, spread evenly over the plan's order (layers)."""
    found = [p for p in plan.pairs if p.key.role in READERS and getattr(p.key, "part", "weight") == "weight"
             and len(p.shape) == 2 and p.shape[0] >= MIN_ROWS and not any(p.transposed)]
    if len(found) <= MAX_TENSORS:
        return found
    pick = np.unique(np.linspace(0, len(found) - 1, MAX_TENSORS).round().astype(int))
    return [found[i] for i in pick]


class _Own:
    """Rows of one side's matrices in that side's own residual basis (column maps, signs and fold scales are
    irrelevant to E·Eᵀ), with that side's norm weights folded in; each norm vector is read once."""

    def __init__(self, src, side: str):
        self.src, self.side = src, side
        self._vectors: dict[str, torch.Tensor] = {}

    def _norm(self, norm: PairSpec | None) -> torch.Tensor | None:
        if norm is None:
            return None
        name = norm.base_name if self.side == "base" else norm.cand_name
        if name not in self._vectors:
            self._vectors[name] = read_indexed(self.src.reader, name, None, 0, 1, raw=False, finite=True).reshape(-1)
        return self._vectors[name]

    def rows(self, pair: PairSpec, pos: np.ndarray, norm: PairSpec | None) -> torch.Tensor:
        """E = W·diag(g) for rows ``pos`` of the pair (g folded only when it fits the columns), float32."""
        view = (replace(pair, base_cols=None) if self.side == "base" else
                replace(pair, col_map=None, col_sign=None, col_scale=None))
        x = read_rows(self.src, view, pos, side=self.side).float()
        g = self._norm(norm)
        return x * g if g is not None and g.numel() == x.shape[1] else x


def _gram(x: torch.Tensor) -> torch.Tensor:
    return (x @ x.T).double()


def _pair_signatures(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Row i of ``sa`` -> the row of ``sb`` it is paired with: linear assignment on squared distances (computed
    without the (n, n, d) difference array)."""
    cost = (sa * sa).sum(1)[:, None] + (sb * sb).sum(1)[None, :] - 2.0 * sa @ sb.T
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def _centred_offdiag(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """g with the mean of its off-diagonal entries removed and a zero diagonal, and the norm of its upper triangle:
    the parts of the off-diagonal Pearson. A relabelling permutes the same entries, so only the cross term moves."""
    s = g.shape[0]
    off = ~torch.eye(s, dtype=torch.bool)
    c = torch.where(off, g - g[off].mean(), 0.0)
    return c, float(torch.sqrt(0.5 * (c * c).sum()))


def _rows(pair: PairSpec, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """The pair's generator (its relabellings come next) and its block of ROWS contiguous rows, seeded by shape."""
    n = pair.shape[0]
    s = min(ROWS, n)
    rng = np.random.default_rng([seed, 0x6A7, pair.shape[0], pair.shape[1], pair.layer or 0])
    start = int(rng.integers(0, n - s + 1))
    return rng, np.arange(start, start + s)


def _announce(base, model, blocks: list[tuple[PairSpec, int, int]]) -> None:
    """Ask each source for every tested row block ``(pair, start, stop)`` at once (remote: background range requests,
    coalesced; local: read-ahead hints), before the tests read them one by one."""
    for src, side in ((base, "base"), (model, "model")):
        prefetch = getattr(src, "prefetch", None)
        if prefetch is None:
            continue
        spans = []
        for p, start, stop in blocks:
            name, idx = (p.base_name, p.base_rows) if side == "base" else (p.cand_name, p.cand_rows)
            spans += _row_spans(name, None if idx is None else np.asarray(idx), start, stop)
        try:
            prefetch(spans)
        except Exception:  # noqa: BLE001 - a hint only: the read that follows reports any real error
            pass


def _mantel(ga: torch.Tensor, gb: torch.Tensor, perms: torch.Tensor) -> tuple[float, np.ndarray]:
    """The off-diagonal Pearson of two s × s Grams, and its values with B's rows and columns relabelled by each row
    of ``perms`` [K, s]."""
    s = ga.shape[0]
    a, na = _centred_offdiag(ga)
    b, nb = _centred_offdiag(gb)
    den = max(na * nb, N.EPS)
    observed = float(0.5 * (a * b).sum()) / den
    a32, b32 = a.float(), b.float()
    null = []
    for lo in range(0, len(perms), DRAW_CHUNK):
        p = perms[lo:lo + DRAW_CHUNK]
        rows = b32[p]                                                      # [K, s, s]: rows relabelled
        both = rows.gather(2, p.unsqueeze(1).expand(-1, s, -1))           # ... and columns
        null.append((both * a32).sum((1, 2)).double() * 0.5 / den)
    return observed, torch.cat(null).numpy()


def _decide(observed: float, null: np.ndarray, method: str, seed: int) -> tuple[N.NullTest, bool]:
    th = load_thresholds()
    test = N.NullTest("gram_r", observed, null, method=method, seed=seed)
    return test, bool(observed >= th.r_derived and (test.z or 0.0) >= th.z_derived and test.exceeds_all)


def gram_test(base, model, pair: PairSpec, norm: PairSpec | None, *, seed: int, draws: int = DRAWS,
              own: tuple[_Own, _Own] | None = None) -> GramTest:
    """The Mantel test of one reader pair's row Grams (module docstring)."""
    own_a, own_b = own or (_Own(base, "base"), _Own(model, "model"))
    rng, pos = _rows(pair, seed)
    s = len(pos)
    perms = torch.from_numpy(np.argsort(rng.random((draws, s)), axis=1))
    observed, null = _mantel(_gram(own_a.rows(pair, pos, norm)), _gram(own_b.rows(pair, pos, norm)), perms)
    test, cleared = _decide(observed, null, f"relabellings of the model's units (rows), {draws} draws", seed)
    return GramTest(pair.base_name, pair.layer, s, test, cleared)


def value_test(base, model, pair: PairSpec, norm: PairSpec | None, head_dim: int, *, seed: int,
               draws: int = DRAWS, own: tuple[_Own, _Own] | None = None) -> GramTest:
    """The Mantel test of a value projection's row Grams. Its rows are grouped by head (the heads' attention
    patterns differ), so they are not exchangeable as a whole: the heads are paired first, on signatures that no
    relabelling inside a head changes (each head's sorted row-Gram entries), and the null relabels rows inside
    their head only. Tests up to ROWS rows of paired heads."""
    own_a, own_b = own or (_Own(base, "base"), _Own(model, "model"))
    n = pair.shape[0]
    n_heads = n // head_dim
    every = np.arange(n)
    ha = own_a.rows(pair, every, norm).view(n_heads, head_dim, -1)
    hb = own_b.rows(pair, every, norm).view(n_heads, head_dim, -1)
    iu = torch.triu_indices(head_dim, head_dim)

    def signatures(h):
        return (h @ h.transpose(1, 2))[:, iu[0], iu[1]].double().sort(1).values.numpy()

    match = _pair_signatures(signatures(ha), signatures(hb))
    rng = np.random.default_rng([seed, 0x7A1, n, pair.shape[1], pair.layer or 0])
    k = max(1, min(n_heads, ROWS // head_dim))
    heads = np.sort(rng.choice(n_heads, size=k, replace=False))
    ra = torch.cat([ha[h] for h in heads])
    rb = torch.cat([hb[int(match[h])] for h in heads])
    s = ra.shape[0]
    # relabel rows inside each tested head: block offset + a permutation of the head's rows, per draw
    inner = np.argsort(rng.random((draws, k, head_dim)), axis=2) + (np.arange(k) * head_dim)[None, :, None]
    perms = torch.from_numpy(inner.reshape(draws, s))
    observed, null = _mantel(_gram(ra), _gram(rb), perms)
    test, cleared = _decide(observed, null, f"relabellings of the model's value rows inside their (paired) head, "
                            f"{draws} draws", seed)
    return GramTest(pair.base_name, pair.layer, s, test, cleared, pair.cand_name,
                    tuple((int(h), int(match[h])) for h in heads))


def _expert_pairing(own: tuple[_Own, _Own], plan: AlignmentPlan, layers: set, norms: dict
                    ) -> dict[int, np.ndarray]:
    """Per MoE layer: base expert e -> model expert index, from the routers (module docstring): each expert's
    signature is its router row's sorted inner products with every router row of the layer, norm folded."""
    out = {}
    for p in _routers(plan, layers):
        norm = norms.get(("ffn_norm", p.key.layer))
        sa, sb = (np.sort(_gram(o.rows(p, np.arange(p.shape[0]), norm)).numpy(), axis=1) for o in own)
        out[p.key.layer] = _pair_signatures(sa, sb)
    return out


def _routers(plan: AlignmentPlan, layers: set) -> list[PairSpec]:
    return [p for p in plan.pairs if p.key.role == "ffn_gate_inp" and p.key.layer in layers and len(p.shape) == 2
            and not any(p.transposed) and getattr(p.key, "part", "weight") == "weight"
            and p.base_rows is None and p.cand_rows is None]


def _through(pair: PairSpec, by_expert: dict, pairing: dict[int, np.ndarray]) -> PairSpec:
    """A routed expert's pair re-pointed at the model expert its router paired it with (unchanged otherwise)."""
    e, layer = pair.key.expert, pair.key.layer
    if e is None or layer not in pairing or e >= len(pairing[layer]):
        return pair
    other = by_expert.get((pair.key.role, layer, int(pairing[layer][e])))
    if other is None or other.shape != pair.shape:
        return pair
    return replace(pair, cand_name=other.cand_name, cand_rows=other.cand_rows)


def _values(plan: AlignmentPlan, config: dict) -> tuple[list[PairSpec], int]:
    """The value projections to test (spread over the layers) and the head dim, from the config and the shapes."""
    from hf_provenance.alignment.units import _attn_config

    cfg = _attn_config(config)
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                       and heads else None)
    n_kv = cfg.get("num_key_value_heads") or heads
    if not isinstance(head_dim, int) or not isinstance(n_kv, int) or head_dim < 4:
        return [], 0
    found = [p for p in plan.pairs if p.key.role == "attn_v" and p.key.expert is None
             and getattr(p.key, "part", "weight") == "weight" and len(p.shape) == 2 and not any(p.transposed)
             and p.shape[0] == n_kv * head_dim and p.shape[0] <= MAX_VALUE_ROWS]
    if len(found) > MAX_VALUE_TENSORS:
        found = [found[i] for i in np.unique(np.linspace(0, len(found) - 1, MAX_VALUE_TENSORS).round().astype(int))]
    return found, head_dim


def rotation_check(base, model, plan: AlignmentPlan, *, seed: int = 0) -> RotationCheck:
    """Test whether the model is a residual-rotated copy of the base (module docstring); reads ≤ MAX_TENSORS × ROWS
    rows a side, the routers of the MoE layers tested and ≤ MAX_VALUE_TENSORS value projections, each block
    announced before it is read."""
    own = (_Own(base, "base"), _Own(model, "model"))
    norms = _norms(plan)
    readers = _readers(plan)
    values, head_dim = _values(plan, base.config or {})
    moe_layers = {p.key.layer for p in readers if p.key.expert is not None}
    routers = _routers(plan, moe_layers)
    _announce(base, model, [(p, 0, p.shape[0]) for p in routers] + [(p, 0, 1) for p in norms.values()])
    pairing = _expert_pairing(own, plan, moe_layers, norms) if moe_layers else {}
    by_expert = {(p.key.role, p.key.layer, p.key.expert): p for p in plan.pairs
                 if p.key.expert is not None and p.key.role in READERS}
    readers = [_through(p, by_expert, pairing) for p in readers]
    blocks = [(p, int(pos[0]), int(pos[-1]) + 1) for p in readers for pos in [_rows(p, seed)[1]]]
    _announce(base, model, blocks + [(p, 0, p.shape[0]) for p in values])
    tests = []
    for p in readers:
        t = gram_test(base, model, p, norms.get((READERS[p.key.role], p.key.layer)), seed=seed, own=own)
        tests.append(replace(t, model_name=p.cand_name))
    for p in values:
        tests.append(value_test(base, model, p, norms.get(("attn_norm", p.key.layer)), head_dim, seed=seed,
                                own=own))
    moved = sum(int((m != np.arange(len(m))).sum()) for m in pairing.values())
    return RotationCheck(tuple(tests), tuple(sorted(pairing)), moved)


__all__ = ["rotation_check", "gram_test", "RotationCheck", "GramTest", "READERS", "ROWS", "MAX_TENSORS"]
