"""Cost of the unit, head and expert matching (alignment/units.py, experts.py) on synthetic layers of real sizes.

    python benchmarks/matching.py [--cases layer4096,mlp18944,moe128] [--draws 99] [--repeats 3] [--json FILE]

Each part of each case runs in its own process (peak RSS from VmHWM, minus the RSS after imports) on *synthetic*
sources: rows are generated on demand from seeded generators, so no matrix is ever held whole and the numbers are
those of the matching itself (sketching, mutual-best rounds, linear assignment, simulated null), with generation
standing in for reading. Each case is run twice: a derived candidate (units/heads/experts permuted, then Gaussian
noise of 0.5x the std) and an independent one (unrelated random matrices, the costlier case: fewer mutual-best
pairs, a larger assignment).

Cases:
  layer4096  hidden 4096: an MLP of 4096 units and 32 heads (8 KV groups of 4, head_dim 128). Reference in the
             same run: scipy's linear_sum_assignment on the dense 4096x4096 similarity of the unsketched down
             columns (what a plain approach does), reported as a ratio.
  mlp18944   Qwen2.5-7B's MLP: hidden 3584, 18944 units (dense reference skipped: its float64 cost matrix
             alone is 2.9 GB).
  moe128     Qwen3-30B-A3B's MoE layer: hidden 2048, 128 experts of 768 units, router.
Each case also runs the unit fit with sample=0.1 (fewer residual rows read, no gate/up agreement sources), and
``match_only``: the unit map alone (mutual-best rounds and assignment on the sketches, no null), the part that is
comparable with the dense reference.
Every part is repeated (``--repeats``, interleaved); the line shows the median wall time and, in brackets, the
minimum (on a shared machine the minimum is the better estimate of the cost) and the largest peak.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("layer4096", "mlp18944", "moe128")


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class Synthetic:
    """A source whose tensors' rows are generated on demand; a derived source maps rows/columns of another.

    ``derive[name] = (source name, row map or None, column map or None)``: row r of ``name`` is row
    ``row_map[r]`` of the source tensor with its columns taken through ``col_map``, plus ``noise`` x N(0, 1).
    """

    def __init__(self, shapes: dict, seed: int, *, of: Synthetic | None = None, derive: dict | None = None,
                 noise: float = 0.5):
        from hf_provenance.sources.base import TensorInfo

        self.shapes, self.seed, self.of, self.derive, self.noise = shapes, seed, of, derive or {}, noise
        self.inventory = {n: TensorInfo(n, "F32", tuple(s), "synthetic", 0, 4 * int(np.prod(s)))
                          for n, s in shapes.items()}
        self.reader = self
        self.config = {}
        self.bytes_read = 0
        self.seconds = 0.0          # time spent generating rows (stands in for reading)
        self._g = torch.Generator()

    def _row(self, name: str, r: int, cols: int) -> torch.Tensor:
        self._g.manual_seed(_seed(self.seed, name, r))
        return torch.randn(cols, generator=self._g)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._read(name, start, stop)
        finally:
            self.seconds += time.perf_counter() - t0

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        cols = self.shapes[name][1]
        self.bytes_read += (stop - start) * cols * 4
        out = torch.empty(stop - start, cols)
        for i, r in enumerate(range(start, stop)):
            if self.of is None or name not in self.derive:
                out[i] = self._row(name, r, cols)
                continue
            src, rows, cmap = self.derive[name]
            x = self.of._row(src, int(rows[r]) if rows is not None else r, cols)
            if cmap is not None:
                x = x[cmap]
            out[i] = x + self.noise * self._row(name, r, cols)
        return out


def _pair(name, shape, role, layer=0, expert=None):
    from hf_provenance.alignment.keys import CanonicalKey, component_of
    from hf_provenance.alignment.plan import PairSpec

    key = CanonicalKey(role, layer, expert)
    return PairSpec(key, name, name, tuple(shape), ("arbitrary", "arbitrary"), component_of(key), layer)


def _mlp(h: int, n: int, derived: bool, g: torch.Generator):
    shapes = {"gate": (n, h), "up": (n, h), "down": (h, n)}
    a = Synthetic(shapes, 1)
    perm = torch.randperm(n, generator=g)
    derive = {"gate": ("gate", perm.numpy(), None), "up": ("up", perm.numpy(), None), "down": ("down", None, perm)}
    b = Synthetic(shapes, 2, of=a, derive=derive) if derived else Synthetic(shapes, 3)
    return a, b, perm


def _timed(fn, *sources):
    """(result, seconds of matching): wall time minus the time the sources spent generating rows."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t - sum(s.seconds for s in sources)


def run_units(h: int, n: int, derived: bool, draws: int, sample: float | None) -> dict:
    from hf_provenance.alignment import nulls as N
    from hf_provenance.alignment.units import MlpGroup, fit_mlp_batch

    a, b, perm = _mlp(h, n, derived, torch.Generator().manual_seed(0))
    group = MlpGroup("dense", 0, None, None, _pair("gate", (n, h), "ffn_gate"), _pair("up", (n, h), "ffn_up"),
                     _pair("down", (h, n), "ffn_down"))
    sketch = N.ResidualSketch.build(h, N.residual_dims(h, sample, 0), seed=0)
    fit, secs = _timed(lambda: fit_mlp_batch([group], a, b, sketch, full=sample is None, seed=0, draws=draws),
                       a, b)
    truth = torch.argsort(perm).numpy()
    # a batch that is not recovered fits no map (maps[0] None): the assignment would not be applied
    exact = None if fit.maps[0] is None else float(np.mean(fit.maps[0] == truth))
    return {"seconds": secs, "recovered": fit.recovered, "exact": exact,
            "mutual_best": fit.mutual_best if fit.fitted else None,
            "assignment_size": fit.lap_size if fit.fitted else None,
            "heldout_r": fit.heldout.observed, "null": [fit.heldout.mean, fit.heldout.sd]}


def run_match(h: int, n: int, derived: bool, draws: int) -> dict:
    """The unit map alone (mutual-best rounds + linear assignment on the sketches), without the null."""
    from hf_provenance.alignment import nulls as N
    from hf_provenance.alignment.units import assign, sketch_writer

    a, b, perm = _mlp(h, n, derived, torch.Generator().manual_seed(0))
    down = _pair("down", (h, n), "ffn_down")
    sketch = N.ResidualSketch.build(h, np.arange(h), seed=0)
    sa = N.unit_rows(sketch_writer(a, down, sketch, side="base"))
    sb = N.unit_rows(sketch_writer(b, down, sketch, side="model"))
    fit, secs = _timed(lambda: assign(sa, sb))
    return {"seconds": secs, "exact": float(np.mean(fit.perm == torch.argsort(perm).numpy())),
            "mutual_best": fit.mutual_best, "rounds": fit.rounds, "assignment_size": fit.lap_size}


def run_heads(h: int, heads: int, kv: int, derived: bool, draws: int) -> dict:
    from hf_provenance.alignment import nulls as N
    from hf_provenance.alignment.units import HeadGroup, expand, fit_heads

    hd = h // heads
    g = torch.Generator().manual_seed(1)
    groups = torch.randperm(kv, generator=g)
    r = heads // kv
    hmap = torch.cat([groups[j] * r + torch.randperm(r, generator=g) for j in range(kv)])
    rows = torch.from_numpy(expand(hmap.numpy(), hd))
    shapes = {"q": (h, h), "o": (h, h)}
    a = Synthetic(shapes, 11)
    b = (Synthetic(shapes, 12, of=a, derive={"q": ("q", rows.numpy(), None), "o": ("o", None, rows)})
         if derived else Synthetic(shapes, 13))
    grp = HeadGroup(0, {"attn_q": _pair("q", (h, h), "attn_q"), "attn_output": _pair("o", (h, h), "attn_output")},
                    {}, heads, kv, {"attn_q": hd, "attn_output": hd})
    sketch = N.ResidualSketch.build(h, np.arange(h), seed=0)
    fit, secs = _timed(lambda: fit_heads(grp, a, b, sketch, full=True, seed=0, draws=draws), a, b)
    return {"seconds": secs, "recovered": fit.recovered,
            "exact": float(np.mean(fit.maps[0] == torch.argsort(hmap).numpy()))}


def run_reference(h: int, n: int, derived: bool) -> dict:
    """Dense linear assignment on the full similarity of the unsketched down columns (the plain approach)."""
    from scipy.optimize import linear_sum_assignment

    a, b, perm = _mlp(h, n, derived, torch.Generator().manual_seed(0))
    da, db = a.read_rows("down", 0, h), b.read_rows("down", 0, h)

    def solve():
        xa = torch.nn.functional.normalize(da.T - da.T.mean(0), dim=1)
        xb = torch.nn.functional.normalize(db.T - db.T.mean(0), dim=1)
        return linear_sum_assignment((xa @ xb.T).double().numpy(), maximize=True)[1]

    ci, secs = _timed(solve)
    return {"seconds": secs, "exact": float(np.mean(ci == torch.argsort(perm).numpy()))}


def run_experts(h: int, e: int, n: int, derived: bool, draws: int) -> dict:
    from hf_provenance.alignment import nulls as N
    from hf_provenance.alignment.experts import _Side, fit_layer

    g = torch.Generator().manual_seed(2)
    eperm = torch.randperm(e, generator=g)
    shapes = {"router": (e, h)}
    for i in range(e):
        shapes[f"down.{i}"] = (h, n)
    a = Synthetic(shapes, 21)
    if derived:   # experts shuffled, units shuffled inside each expert, then noise
        derive = {"router": ("router", eperm.numpy(), None)}
        for j in range(e):
            derive[f"down.{j}"] = (f"down.{int(eperm[j])}", None, torch.randperm(n, generator=g))
        b = Synthetic(shapes, 22, of=a, derive=derive)
    else:
        b = Synthetic(shapes, 23)
    side = _Side({i: {"ffn_down_exp": f"down.{i}"} for i in range(e)}, "router", None)
    sketch = N.ResidualSketch.build(h, np.arange(h), k=128, seed=0)
    fit, secs = _timed(lambda: fit_layer(1, side, side, a, b, {}, sketch, ({}, {}), seed=0, draws=draws),
                       a, b)
    truth = torch.argsort(eperm).numpy()
    return {"seconds": secs, "recovered": fit.recovered, "router_consistent": fit.router_consistent,
            "exact": float(np.mean(fit.mapping == truth)), "heldout_r": fit.heldout.observed,
            "null": [fit.heldout.mean, fit.heldout.sd]}


PARTS = {
    "layer4096": {"units": lambda d, k: run_units(4096, 4096, d, k, None),
                  "match_only": lambda d, k: run_match(4096, 4096, d, k),
                  "units_sampled": lambda d, k: run_units(4096, 4096, d, k, 0.1),
                  "heads": lambda d, k: run_heads(4096, 32, 8, d, k),
                  "reference_dense_lap": lambda d, k: run_reference(4096, 4096, d)},
    "mlp18944": {"units": lambda d, k: run_units(3584, 18944, d, k, None),
                 "match_only": lambda d, k: run_match(3584, 18944, d, k),
                 "units_sampled": lambda d, k: run_units(3584, 18944, d, k, 0.1)},
    "moe128": {"experts": lambda d, k: run_experts(2048, 128, 768, d, k)},
}


def child(case: str, part: str, derived: bool, draws: int) -> dict:
    base_rss = _vm("VmRSS")
    out = PARTS[case][part](derived, draws)
    out["peak_rss_mb"] = _vm("VmHWM") / 2 ** 20
    out["peak_over_start_mb"] = (_vm("VmHWM") - base_rss) / 2 ** 20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--draws", type=int, default=99)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default=None, help="comma-separated subset of each case's parts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=3, metavar=("CASE", "PART", "DERIVED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2] == "1", args.draws)))
        return
    results = []
    for case in args.cases.split(","):
        for derived in (True, False):
            wanted = [p for p in PARTS[case] if args.parts is None or p in args.parts.split(",")]
            runs: dict[str, list] = {part: [] for part in wanted}
            for _ in range(args.repeats):
                for part in wanted:
                    cmd = [sys.executable, __file__, "--child", case, part, "1" if derived else "0",
                           "--draws", str(args.draws)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    runs[part].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            res = {"case": case, "derived": derived}
            for part, rs in runs.items():
                secs = sorted(r["seconds"] for r in rs)
                res[part] = {**rs[0], "seconds": float(np.median(secs)), "seconds_min": secs[0],
                             "seconds_all": secs, "peak_over_start_mb": max(r["peak_over_start_mb"] for r in rs),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
            results.append(res)
            print(_line(res), flush=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "draws": args.draws, "repeats": args.repeats, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=2))


def _line(r: dict) -> str:
    kind = "derived" if r["derived"] else "independent"
    parts = []
    for name in ("units", "units_sampled", "match_only", "heads", "experts", "reference_dense_lap"):
        if name in r:
            x = r[name]
            rec = f", recovered {x['recovered']}" if "recovered" in x else ""
            exact = "no map fitted" if x.get("exact") is None else f"exact {x['exact']:.3f}"
            parts.append(f"{name} {x['seconds']:.1f} s [min {x['seconds_min']:.1f}], peak +"
                         f"{x['peak_over_start_mb']:.0f} MB ({exact}{rec})")
    ref = r.get("reference_dense_lap")
    for name in ("units", "match_only"):
        if ref and name in r:
            parts.append(f"dense LAP / {name} (min times) = {ref['seconds_min'] / r[name]['seconds_min']:.2f}")
    return f"{r['case']:<10} {kind:<11} " + "; ".join(parts)


if __name__ == "__main__":
    main()
