"""Terminal summary of a compare report: verdict per base, component table, layer profile, alignment, I/O.
Reads only the report's ``to_dict()``."""

from __future__ import annotations

from hf_provenance.report.console import fmt_bytes, fmt_ci, fmt_num, fmt_params, make_console, table

MAX_LAYER_ROWS = 24


def render_compare(d: dict, file=None) -> None:
    con = make_console(file)
    run = d["run"]
    mode = "full read" if not run.get("sample") else f"sample {run['sample']:g} of row blocks"
    con.print(f"hf-provenance {d['tool']['version']}: {d['model']['ref']} against "
              f"{len(d['comparisons'])} base(s) ({mode}, seed {run['seed']}, device {run['device']})")
    for c in d["comparisons"]:
        con.print()
        rel = ", ".join(c["relation"]) or "—"
        con.print(f"[bold]#{c['rank']} base {c['base']['ref']}[/bold]: [bold]{c['verdict'].upper()}[/bold]"
                  f" (relation: {rel})")
        con.print(f"  direction: {c['direction']}")
        for r in c["reasons"]:
            con.print(f"  - {r}")
        decl = c.get("declared") or {}
        if decl.get("message"):
            con.print(f"  declared: {decl['message']}")
        rt = c.get("rule_of_thumb") or {}
        if rt.get("verdict") and rt["verdict"] != "not applicable":
            con.print(f"  rule of thumb (not used): mean layer cosine {fmt_num(rt.get('mean_layer_cosine'))}, "
                      f"embeddings {fmt_num(rt.get('embedding_cosine'))} ⇒ {rt['verdict']}")
        comps = c.get("components") or {}
        if comps:
            t = table(con, "component", "tensors", "params", "Pearson r̄ [95% CI]", "cosine", "evid.",
                      justify=("left", "right", "right", "left", "right", "right"))
            for name, g in comps.items():
                r = fmt_ci(g["pearson"]) if g["pearson"]["value"] is not None else (
                    f"({fmt_num(g.get('pearson_reported'))})" if g.get("pearson_reported") is not None else "—")
                t.add_row(name, str(g["n_tensors"]), fmt_params(g["params"]), r,
                          fmt_num(g["cosine"]), f"{g['n_evidence']}/{g['n_tensors']}")
            con.print(t)
        layers = c.get("layers") or []
        if layers:
            t = table(con, "layer", "cosine", "Pearson", "reading", "typical fine-tune",
                      justify=("right", "right", "left", "left", "left"))
            shown = layers if len(layers) <= MAX_LAYER_ROWS else _summarise(layers)
            for g in shown:
                if g is None:
                    t.add_row("…", "", "", "", "")
                    continue
                t.add_row(str(g["layer"]), fmt_num(g["cosine"]), fmt_ci(g["pearson"]), g.get("band") or "—",
                          g.get("typical_finetune") or "—")
            con.print(t)
        for line in (c.get("alignment") or {}).get("lines", []):
            con.print(f"  alignment: {line}")
        if c.get("unmatched"):
            con.print(f"  not compared: {len(c['unmatched'])} tensor(s), e.g. "
                      f"{c['unmatched'][0]['name']} ({c['unmatched'][0]['reason']})")
        io = c["io"]
        br = io["bytes_read"]
        con.print(f"  read {fmt_bytes(br['model'])} of the model and {fmt_bytes(br['base'])} of the base "
                  f"({io['fraction_read']:.0%} of {fmt_bytes(io['bytes_total'])}) in {io['seconds']:.1f} s")


def _summarise(layers: list[dict]) -> list[dict | None]:
    head, tail = layers[:8], layers[-8:]
    worst = sorted(layers[8:-8], key=lambda g: (g["pearson"]["value"] if g["pearson"]["value"] is not None else 9))[:4]
    worst = sorted(worst, key=lambda g: g["layer"])
    return head + [None] + worst + [None] + tail
