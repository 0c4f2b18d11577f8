"""PNG plots of a compare report (matplotlib, Agg canvas, no pyplot state): read from the report dict only.

    plots = render_plots(report.to_dict())
    plots.images      # {"layer_profile.png": b"\\x89PNG...", ...}
    plots.skipped     # {"pca": "the report carries no layer sketches ..."}

- ``layer_profile``: per layer, Pearson r̄ with its 95% interval band and cosine; the grey band is the nominal null
  band ±2σ₀ of each layer's r̄ under independence, σ₀² = Σ wᵢ² / ((mᵢ−1)(nᵢ−1)) over the layer's evidence tensors
  (wᵢ their parameter shares; the exact permutation variance of a two-axis Pearson, DESIGN §Statistics 2), with the
  derivation threshold and δ drawn for reference.
- ``components``: one cell per tensor (row: its role, column: its layer), coloured by its Pearson r.
- ``experts``: for MoE reports with per-expert tensors: layer × expert Pearson of the measured expert pairs, one
  panel per expert matrix role.
- ``layer_alignment``: which base layer was measured against which model layer: the sketch similarities the layer
  map was fitted on, with the chosen pairs boxed, when the report has a layer map; else the measured r̄ per pair.
- ``pca``: needs layer sketches, which the report does not carry: always skipped, with the reason.

Nothing here decides anything; the plots are pictures of numbers the report already holds (DESIGN §Statistics 7).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

PLOT_TITLES = {
    "layer_profile": "Layer profile",
    "components": "Per-tensor Pearson r by role and layer",
    "experts": "Expert pairs",
    "layer_alignment": "Layer alignment map",
    "pca": "PCA of layer sketches",
}
DPI = 100
_KEY = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<role>[^.]+)(?:\.e(?P<expert>\d+))?(?:\.(?P<part>.*))?$")
NO_SKETCHES = ("the report carries no layer sketches (it would need comparisons[].layer_sketches: per layer, a "
               "seeded low-dimensional projection of each model's layer weights, e.g. {\"seed\", \"dim\", \"base\": "
               "[[...] per layer], \"model\": [[...] per layer]})")


@dataclass(frozen=True)
class PlotSet:
    """Rendered plots: ``images`` (file name -> PNG bytes, in display order), ``titles`` (file name -> title),
    ``skipped`` (plot name -> why it was not drawn) and ``ranks`` (file or skipped name -> the base's rank)."""

    images: dict[str, bytes] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def listing(self, prefix: str = "") -> list[dict[str, str]]:
        """``[{"title", "path"}]`` for templates (``prefix`` joined to each file name with '/')."""
        pre = prefix.rstrip("/") + "/" if prefix else ""
        return [{"title": self.titles[name], "path": pre + name} for name in self.images]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ helpers

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(w, 6.4), h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def key_parts(t: dict[str, Any]) -> dict[str, Any]:
    """(layer, role, expert, part) of a tensor entry: its own fields when present, else read off its canonical key
    (``blk.3.ffn_down_exp.e7.weight``)."""
    m = _KEY.match(t.get("key") or "")
    d = m.groupdict() if m else {"layer": None, "role": t.get("key") or t["name"], "expert": None, "part": ""}
    expert = t.get("expert", d["expert"])
    return {"layer": t.get("layer"), "role": t.get("role") or d["role"],
            "expert": None if expert is None else int(expert), "part": d.get("part") or ""}


def layer_null_sd(tensors: list[dict[str, Any]]) -> float | None:
    """σ₀ of a layer's parameter-weighted r̄ under independence, from its evidence tensors' shapes."""
    el = [t for t in tensors if t.get("evidence") and t["pearson"].get("value") is not None and t.get("numel")]
    if not el:
        return None
    total = float(sum(t["numel"] for t in el))
    var = 0.0
    for t in el:
        shape = t.get("shape") or [t["numel"]]
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        cols = shape[-1]
        two_axes = sum(a == "arbitrary" for a in t.get("axes") or []) >= 2 and rows > 1 and cols > 1
        v = 1.0 / ((rows - 1) * (cols - 1)) if two_axes else 1.0 / max(1, t["numel"] - 1)
        var += (t["numel"] / total) ** 2 * v
    return math.sqrt(var)


def _suffix(c: dict[str, Any], many: bool) -> str:
    return f"-{c['rank']}" if many else ""


def _title(c: dict[str, Any], what: str) -> str:
    from hf_provenance.report.view import display_ref

    return f"{what}\nbase {display_ref(c['base'])} ({c['verdict']})"


# ------------------------------------------------------------------------------------------------ plots

def layer_profile(c: dict[str, Any], th: dict[str, Any]) -> bytes | str:
    layers = c.get("layers") or []
    if not layers:
        return "no per-layer tensors were compared"
    xs = [g["layer"] for g in layers]
    r = [g["pearson"]["value"] for g in layers]
    lo = [(g["pearson"].get("ci") or [None, None])[0] for g in layers]
    hi = [(g["pearson"].get("ci") or [None, None])[1] for g in layers]
    cos = [g.get("cosine") for g in layers]
    by_layer: dict[int, list] = {}
    for t in c.get("tensors") or []:
        if t.get("layer") is not None:
            by_layer.setdefault(t["layer"], []).append(t)
    sd = [layer_null_sd(by_layer.get(x, [])) for x in xs]

    nan = float("nan")
    fig = _figure(8, 4.8)
    ax = fig.add_subplot()
    band = [2 * s if s is not None else nan for s in sd]
    ax.fill_between(xs, [-b for b in band], band, color="0.6", alpha=0.45, step="mid", lw=0,
                    label="null band ±2σ₀ (independent weights)")
    ax.axhline(th["r_derived"], color="#d62728", ls="--", lw=1, label=f"derivation threshold r = {th['r_derived']}")
    ax.axhline(th["delta"], color="#2ca02c", ls=":", lw=1, label=f"δ = {th['delta']}")
    ax.axhline(-th["delta"], color="#2ca02c", ls=":", lw=1)
    ys = [v if v is not None else nan for v in r]
    if any(a is not None and b is not None for a, b in zip(lo, hi)):
        ax.fill_between(xs, [a if a is not None else nan for a in lo], [b if b is not None else nan for b in hi],
                        color="#1f77b4", alpha=0.25, lw=0, label="95% interval of r̄")
    ax.plot(xs, ys, "o-", color="#1f77b4", ms=4, lw=1.6, label="Pearson r̄")
    ax.plot(xs, [v if v is not None else nan for v in cos], "s--", color="#ff7f0e", ms=3, lw=1.2,
            label="cosine (mean)")
    finite = [v for v in ys + [v for v in cos if v is not None] if v == v]
    top = max([1.0] + finite) + 0.05
    bottom = min([-0.1] + finite) - 0.05
    ax.set_ylim(bottom, top)
    ax.set_xlabel("layer")
    ax.set_ylabel("similarity")
    if len(xs) <= 40:
        ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.set_title(_title(c, "Layer profile"), fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    return _png(fig)


def _heat(ax, grid, xlabels, ylabels, *, vmin=-1.0, vmax=1.0, annotate=True):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    cmap = _cmap()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, fontsize=7, rotation=90 if len(xlabels) > 16 else 0)
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels, fontsize=7)
    if annotate and data.size <= 400:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(v) > 0.6 else "black")
    return im


def _cmap():
    from matplotlib import colormaps

    return colormaps["coolwarm"].with_extremes(bad="#eeeeee")


def components(c: dict[str, Any]) -> bytes | str:
    tensors = [t for t in c.get("tensors") or [] if key_parts(t)["expert"] is None]
    if not tensors:
        return "no tensor was compared"
    comp_order = list((c.get("components") or {}).keys())
    rows: dict[tuple, None] = {}
    for t in tensors:
        k = key_parts(t)
        comp = t.get("component", "")
        rows[(comp_order.index(comp) if comp in comp_order else len(comp_order), comp, k["role"], k["part"])] = None
    row_keys = sorted(rows)
    layers = sorted({t["layer"] for t in tensors if t.get("layer") is not None})
    has_global = any(t.get("layer") is None for t in tensors)
    cols = (["global"] if has_global else []) + [str(x) for x in layers]
    col_of = {None: 0} if has_global else {}
    col_of.update({x: i + (1 if has_global else 0) for i, x in enumerate(layers)})
    grid = [[None] * len(cols) for _ in row_keys]
    row_of = {rk: i for i, rk in enumerate(row_keys)}
    for t in tensors:
        k = key_parts(t)
        comp = t.get("component", "")
        rk = (comp_order.index(comp) if comp in comp_order else len(comp_order), comp, k["role"], k["part"])
        grid[row_of[rk]][col_of[t.get("layer")]] = t["pearson"].get("value")
    ylabels = [f"{comp}: {role}{'.' + part if part and part != 'weight' else ''}" for _, comp, role, part in row_keys]
    fig = _figure(min(14, 3.5 + 0.45 * len(cols)), min(16, 1.5 + 0.28 * len(row_keys)))
    ax = fig.add_subplot()
    im = _heat(ax, grid, cols, ylabels)
    ax.set_xlabel("layer")
    ax.set_title(_title(c, "Pearson r per tensor"), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="Pearson r")
    return _png(fig)


def experts(c: dict[str, Any]) -> bytes | str:
    per_role: dict[str, dict[tuple[int, int], float | None]] = {}
    for t in c.get("tensors") or []:
        k = key_parts(t)
        if k["expert"] is None or t.get("layer") is None:
            continue
        per_role.setdefault(f"{k['role']}.{k['part']}" if k["part"] else k["role"], {})[(t["layer"], k["expert"])] = \
            t["pearson"].get("value")
    if not per_role:
        return ("the report has no per-expert tensors (not an MoE model, or experts stored stacked, which the report "
                "does not break down by expert)")
    roles = sorted(per_role)
    al = (c.get("alignment") or {}).get("experts")
    how = "identity expert map" if al is None else "expert map applied (see alignment.experts)"
    fig = _figure(min(16, 2.5 + 3.4 * len(roles)), 4.0)
    axes = fig.subplots(1, len(roles), squeeze=False)[0]
    im = None
    for ax, role in zip(axes, roles):
        cells = per_role[role]
        layers = sorted({l for l, _ in cells})
        exps = sorted({e for _, e in cells})
        grid = [[cells.get((l, e)) for e in exps] for l in layers]
        im = _heat(ax, grid, [str(e) for e in exps], [str(l) for l in layers])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(role, fontsize=9)
    fig.suptitle(_title(c, f"Expert pairs, Pearson r ({how})"), fontsize=10)
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02, label="Pearson r")
    return _png(fig)


def _arch_layers(c: dict[str, Any]) -> tuple[int | None, int | None]:
    for f in (c.get("architecture") or {}).get("fields") or []:
        if f.get("name") == "num_layers":
            a, b = f.get("a"), f.get("b")
            return (a if isinstance(a, int) else None), (b if isinstance(b, int) else None)
    return None, None


def layer_pairs(c: dict[str, Any]) -> list[tuple[int, int, dict[str, Any]]]:
    """(base layer, model layer, layer entry) as measured; ``layers[].layer`` is the model layer.

    Without a layer map (``alignment.layers`` null) model layer L was measured against base layer L. With one
    (``alignment.layers.map``: ``[[model j, base i or null, similarity], ...]``, alignment/layers.py) model layer j
    was measured against base layer i; layers mapped to no base layer are left out."""
    al = (c.get("alignment") or {}).get("layers")
    mapping: dict[int, int | None] | None = None
    if isinstance(al, dict) and isinstance(al.get("map"), list):
        mapping = {int(item[0]): (None if item[1] is None else int(item[1])) for item in al["map"]
                   if isinstance(item, (list, tuple)) and len(item) >= 2}
    out = []
    for g in c.get("layers") or []:
        j = g["layer"]
        i = j if mapping is None else mapping.get(j)
        if i is not None:
            out.append((i, j, g))
    return out


def layer_alignment(c: dict[str, Any]) -> bytes | str:
    al = (c.get("alignment") or {}).get("layers")
    pairs = layer_pairs(c)
    sim = al.get("similarity") if isinstance(al, dict) else None
    if not pairs and not sim:
        return "no per-layer tensors were compared"
    n_base, n_model = _arch_layers(c)
    if isinstance(al, dict) and isinstance(al.get("layers"), list) and len(al["layers"]) == 2:
        n_base, n_model = al["layers"]
    n_base = max([n_base or 0] + [b + 1 for b, _, _ in pairs])
    n_model = max([n_model or 0] + [m + 1 for _, m, _ in pairs])
    mapped = al is not None
    if sim:
        # the map was fitted on sketch similarities: show them, with the chosen pairs boxed (fit, not evidence)
        grid = [[None] * n_base for _ in range(n_model)]
        for i, row in enumerate(sim[:n_base]):
            for j, v in enumerate(row[:n_model]):
                grid[j][i] = v
        label, what = "sketch similarity", "sketch similarity (fits the map; not evidence), chosen pairs boxed"
    else:
        grid = [[None] * n_base for _ in range(n_model)]
        for b, m, g in pairs:
            grid[m][b] = g["pearson"].get("value")
        label, what = "Pearson r̄", ("layer map applied" if mapped else "identity layer map") + ", r̄ per pair"
    fig = _figure(min(12, 3.5 + 0.35 * n_base), min(12, 2.0 + 0.3 * n_model))
    ax = fig.add_subplot()
    im = _heat(ax, grid, [str(i) for i in range(n_base)], [str(i) for i in range(n_model)],
               annotate=n_base * n_model <= 400)
    if sim:
        from matplotlib.patches import Rectangle

        for b, m, _ in pairs:
            ax.add_patch(Rectangle((b - 0.5, m - 0.5), 1, 1, fill=False, ec="black", lw=1.6))
    matched_b = {b for b, _, _ in pairs}
    matched_m = {m for _, m, _ in pairs}
    for b in range(n_base):
        if b not in matched_b:
            ax.axvspan(b - 0.5, b + 0.5, color="0.35", alpha=0.35, hatch="//", lw=0)
    for m in range(n_model):
        if m not in matched_m:
            ax.axhspan(m - 0.5, m + 0.5, color="0.35", alpha=0.35, hatch="//", lw=0)
    ax.invert_yaxis()
    ax.set_xlabel("base layer (hatched: no counterpart)")
    ax.set_ylabel("model layer")
    ax.set_title(_title(c, f"Layer alignment: {what}"), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=label)
    return _png(fig)


def pca(c: dict[str, Any]) -> bytes | str:
    # Display only (DESIGN §Statistics 7); drawn only from sketches the report carries, never recomputed here.
    return NO_SKETCHES if not c.get("layer_sketches") else "layer sketches present but no PCA renderer for them yet"


def render_plots(doc: dict[str, Any]) -> PlotSet:
    """Every plot for every base; one file per plot (``-<rank>`` appended when there are several bases)."""
    th = doc["run"]["thresholds"]
    comps = sorted(doc["comparisons"], key=lambda c: c["rank"])
    many = len(comps) > 1
    images: dict[str, bytes] = {}
    titles: dict[str, str] = {}
    skipped: dict[str, str] = {}
    ranks: dict[str, int] = {}
    for c in comps:
        sfx = _suffix(c, many)
        for name, fn in (("layer_profile", lambda c=c: layer_profile(c, th)), ("components", lambda c=c: components(c)),
                         ("experts", lambda c=c: experts(c)), ("layer_alignment", lambda c=c: layer_alignment(c)),
                         ("pca", lambda c=c: pca(c))):
            out = fn()
            if isinstance(out, bytes):
                images[f"{name}{sfx}.png"] = out
                titles[f"{name}{sfx}.png"] = PLOT_TITLES[name] + (f" (base {c['rank']})" if many else "")
                ranks[f"{name}{sfx}.png"] = c["rank"]
            else:
                skipped[f"{name}{sfx}"] = out
                ranks[f"{name}{sfx}"] = c["rank"]
    return PlotSet(images, titles, skipped, ranks)


__all__ = ["NO_SKETCHES", "PLOT_TITLES", "PlotSet", "available", "key_parts", "layer_null_sd", "layer_pairs",
           "render_plots"]
