"""``hf-provenance demo``: build a tiny model family whose lineage is known, and show what the tool finds.

The factory (``hf_provenance.factory``) pre-trains a small Llama, then derives a fine-tune, a bf16 cast, a copy with
one layer dropped and one with an extended vocabulary, and pre-trains an independent model from other seeds. The
demo inspects the base, compares the pruned model's architecture with the base's, compares each variant's weights
with the base, and ends with a table of verdicts beside what each model is by construction.

Models live in the factory cache (``--cache-dir``, ``$HF_PROVENANCE_FACTORY_CACHE`` or
``~/.cache/hf-provenance/factory``), so a second run skips the training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from hf_provenance.report.console import make_console, table

FAMILY = "llama"
# (variant, what it is by construction)
VARIANTS: tuple[tuple[str, str], ...] = (
    ("finetune", "the base trained 30 more steps on shifted data"),
    ("independent", "same recipe and data language, other seeds"),
    ("bf16", "the base's weights rounded to bfloat16"),
    ("pruned", "the base with one decoder layer dropped"),
    ("vocab_extended", "the base with new token rows appended"),
)


def _expected(folder: Path) -> str:
    """What the factory says a comparison with the base should find (its ``factory.json`` ``truth``)."""
    try:
        truth = json.loads((folder / "factory.json").read_text(encoding="utf-8")).get("truth") or {}
    except (OSError, ValueError):
        return "—"
    verdict = truth.get("verdict") or "—"
    rel = ", ".join(truth.get("relation") or [])
    return f"{verdict} ({rel})" if rel else verdict


def _effect(c: dict[str, Any]) -> str:
    stat = (c.get("overall") or {}).get("pearson") or {}
    value = stat.get("value")
    return "—" if value is None else f"r̄ {value:.3f}"


def _section(con, title: str) -> None:
    con.print()
    if con.is_terminal:
        con.rule(title, align="left")
    else:
        con.print(f"== {title} ==")


def run_demo(*, cache_dir: str | None = None, file=None) -> int:
    """Run the demo, printing to ``file`` (stdout); returns the exit code (0)."""
    from hf_provenance.arch_report import arch_report
    from hf_provenance.compare import compare
    from hf_provenance.factory import build, cache_root
    from hf_provenance.inspect_model import inspect_model
    from hf_provenance.report.terminal_inspect import _hanging, render_arch, render_inspect

    con = make_console(file)
    t0 = time.perf_counter()
    con.print("[bold]hf-provenance demo[/bold]: a tiny Llama family whose lineage is known by construction")
    con.print(f"Building (or reusing) the models in {escape(str(cache_root(cache_dir)))} …")
    paths = {"base": build(FAMILY, "base", cache_dir=cache_dir)}
    for variant, _ in VARIANTS:
        paths[variant] = build(FAMILY, variant, cache_dir=cache_dir)
    con.print(f"{len(paths)} models ready in {time.perf_counter() - t0:.1f} s "
              "(the factory caches them: a second run skips the training)")
    base = str(paths["base"])

    _section(con, "1. inspect: what is the base model?")
    render_inspect(inspect_model(base).to_dict(), file)

    _section(con, "2. arch: the pruned model's architecture against the base's")
    render_arch(arch_report(str(paths["pruned"]), base).to_dict(), file)

    _section(con, "3. compare: each variant's weights against the base")
    rows = []
    for variant, what in VARIANTS:
        d = compare(str(paths[variant]), [base]).to_dict()
        c = d["comparisons"][0]
        rel = ", ".join(c["relation"]) or "—"
        con.print(f"[bold]{variant}[/bold]: {escape(what)}")
        lines = [("  verdict:", f"{c['verdict'].upper()} ({rel}), effect {_effect(c)}; read "
                                f"{c['io']['fraction_read']:.0%} of the bytes in {c['io']['seconds']:.1f} s")]
        lines += [("  why:" if i == 0 else "", reason) for i, reason in enumerate(c["reasons"][:2])]
        lines.append(("  direction:", c["direction"]))
        _hanging(con, lines)
        rows.append((variant, c["verdict"], rel, _effect(c), _expected(paths[variant])))

    con.print()
    t = table(con, "model", "verdict", "relation", "effect", "built as", title="Verdicts against the base")
    for row in rows:
        t.add_row(*row)
    con.print(t)
    con.print("effect: parameter-weighted mean Pearson r over every compared tensor (means removed along arbitrary "
              "axes); 'built as' is what the factory recorded when it made the model.")
    con.print(f"Demo finished in {time.perf_counter() - t0:.1f} s. Try it on your own models: "
              "hf-provenance compare MODEL --base BASE")
    return 0


__all__ = ["run_demo", "VARIANTS", "FAMILY"]
