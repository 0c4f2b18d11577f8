"""Terminal output of ``inspect`` and ``arch``: rich tables on a terminal, plain aligned text when piped.

Both renderers read only the result's ``to_dict()`` (schemas ``hf-provenance.inspect/1`` and ``arch/1``) and stay
readable at 80 columns.
"""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape
from rich.table import Table

from hf_provenance.report.console import fmt_bytes, fmt_params, make_console, table

MAX_UNKNOWN_SHOWN = 20


def _n(x: int | None) -> str:
    return "—" if x is None else f"{x:,}"


def _both(x: int | None) -> str:
    """22713216 -> '22,713,216 (22.7M)'."""
    if x is None:
        return "—"
    short = fmt_params(x)
    return f"{x:,}" if short == str(x) else f"{x:,} ({short})"


def _hanging(con, rows: list[tuple[str, str]]) -> None:
    """Label / text pairs, the text wrapped with a hanging indent (plain strings; markup is escaped)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in rows:
        grid.add_row(escape(label), escape(text))
    con.print(grid)


def _bullets(con, title: str, lines: list[str]) -> None:
    if not lines:
        return
    con.print(title)
    _hanging(con, [("  -", line) for line in lines])


def _table(con, *columns: str, **kw):
    """``console.table`` with the first column (names) kept on one line."""
    t = table(con, *columns, **kw)
    t.columns[0].no_wrap = True
    return t


# ------------------------------------------------------------------------------------------------------- inspect

def _arch_rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    arch = a["architectures"][0] if a["architectures"] else "—"
    depth = f"{a['num_layers']} {'encoder' if a['encoder_only'] else 'decoder'}"
    if a["mtp_layers"]:
        depth += f" (+{a['mtp_layers']} MTP)"
    if a["moe"]:
        depth += f"; {a['num_dense_layers']} dense, {a['num_moe_layers']} MoE"
    attention = f"{a['attention']}, {a['num_heads']} heads ({a['num_kv_heads']} KV) x {a['head_dim']}"
    if a.get("mla"):
        m = a["mla"]
        attention += f"; q rank {m['q_lora_rank'] or '—'}, kv rank {m['kv_lora_rank']}"
    rows = [("family", f"{a['model_type']} ({arch})"), ("layers", depth), ("hidden size", _n(a["hidden_size"])),
            ("attention", attention)]
    if a["intermediate_size"] and (a["num_dense_layers"] or not a["moe"]):
        rows.append(("dense MLP width", f"{a['intermediate_size']:,}" + (" (gated)" if a.get("mlp_gated") else "")))
    if a["moe"]:
        m = a["moe"]
        shared = f" + {m['num_shared_experts']} shared" if m["num_shared_experts"] else ""
        rows.append(("experts", f"{m['num_experts']} routed{shared}, top-{m['experts_per_token']}, width "
                                f"{m['moe_intermediate_size']:,}"))
    rows.append(("vocabulary", f"{a['vocab_size']:,} ({'tied' if a['tie_word_embeddings'] else 'untied'} "
                               "embeddings)"))
    norm = a.get("norm") or "—"
    if a.get("norm_eps") is not None:
        norm += f" (eps {a['norm_eps']:g})"
    rows.append(("norm", norm))
    pos = a.get("position_embedding") or "—"
    if a.get("rope") and a["rope"].get("theta") is not None:
        pos += f" (theta {a['rope']['theta']:g})"
    if a.get("max_position_embeddings"):
        pos += f", {a['max_position_embeddings']:,} positions"
    rows.append(("positions", pos))
    if a.get("head"):
        rows.append(("head", a["head"]))
    if a.get("vision"):
        rows.append(("vision tower", str(a["vision"].get("model_type") or "present")))
    return rows


def _param_rows(p: dict[str, Any]) -> list[tuple[str, str, str]]:
    src = "stored elements (inventory)" if p.get("source") == "inventory" else "from config.json"
    rows = [("total_checkpoint", _both(p["total_checkpoint"]), src),
            ("transformers_equivalent", _both(p["transformers_equivalent"]),
             "no buffers, scales or MTP" if p["transformers_equivalent"] is not None else "needs config.json"),
            ("mtp", _both(p["mtp"]), "multi-token prediction block" if p["mtp"] else "")]
    active = p["active_per_token"]
    note = ""
    if active is not None:
        note = "embeddings included" if p.get("active_counts_embeddings", True) else "embeddings excluded"
        if p.get("active_non_embedding") is not None and p.get("routed_experts"):
            note += f"; {fmt_params(p['active_non_embedding'])} without"
    rows.append(("active_per_token", _both(active), note))
    return rows


def render_inspect(d: dict[str, Any], file=None) -> None:
    """Print an ``hf-provenance.inspect/1`` document for people."""
    con = make_console(file)
    m = d["model"]
    con.print(f"hf-provenance {d['tool']['version']}: inspect {escape(m['ref'])}")
    cid = m["content_id"]
    files = d["inventory"]["files"] if d.get("inventory") else []
    where = f"{m['kind']}" + (f" at revision {m['revision']}" if m.get("revision") else "")
    con.print(f"source: {where}; {cid['kind']} {cid['value'][:16]}…"
              + (f" ({len(files)} weight file{'s' if len(files) != 1 else ''})" if files else ""))

    con.print()
    if d["architecture"] is None:
        con.print("[bold]Architecture[/bold]: unknown (no config.json; inventory only)")
    else:
        con.print("[bold]Architecture[/bold]")
        con.print(escape(d["summary"] or ""))
        t = _table(con, "field", "value")
        for k, v in _arch_rows(d["architecture"]):
            t.add_row(k, escape(v))
        con.print(t)
        if d.get("moe") and d["moe"] not in (d["summary"] or ""):
            con.print(f"MoE: {escape(d['moe'])}")

    con.print()
    t = _table(con, "parameters", "count", "meaning", title="Parameters", justify=("left", "right", "left"))
    for row in _param_rows(d["params"]):
        t.add_row(*row)
    con.print(t)

    inv = d.get("inventory")
    con.print()
    if inv is None:
        con.print("[bold]Inventory[/bold]: no weight files (config only): counts above come from config.json")
    else:
        con.print(f"[bold]Inventory[/bold]: {inv['tensors']:,} tensors, {fmt_params(inv['params'])} elements, "
                  f"{fmt_bytes(inv['bytes'])}")
        for title, rows in (("by component", inv["by_component"]), ("by dtype", inv["by_dtype"])):
            t = _table(con, title, "tensors", "params", "bytes", justify=("left", "right", "right", "right"))
            for g in rows:
                t.add_row(g["name"], _n(g["tensors"]), fmt_params(g["params"]), fmt_bytes(g["bytes"]))
            con.print(t)
        unknown = inv["unknown"]
        if unknown:
            con.print(f"Unknown tensor names ({len(unknown)}; listed, never dropped):")
            _hanging(con, [("  -", f"{u['name']}: {u['reason']}") for u in unknown[:MAX_UNKNOWN_SHOWN]])
            if len(unknown) > MAX_UNKNOWN_SHOWN:
                con.print(f"  … and {len(unknown) - MAX_UNKNOWN_SHOWN} more (see --json)")
        else:
            con.print("Unknown tensor names: none (every tensor has a canonical key)")
        if inv.get("key_mapping"):
            con.print(f"Key mapping: {escape(inv['key_mapping'])}")

    con.print()
    card = d["card"]
    bases = ", ".join(card["base_model"]) or "—"
    con.print(f"[bold]Card[/bold]: base_model {escape(bases)}; relation {card['base_model_relation'] or '—'}; "
              f"license {card['license'] or '—'}")
    quant = d["quantization"] or "none"
    if d.get("inventory") and d["inventory"].get("scale_tensors"):
        quant += f" ({d['inventory']['scale_tensors']} scale tensors)"
    adapter = "none"
    if d.get("adapter"):
        a = d["adapter"]
        adapter = f"{a.get('peft_type') or 'adapter'} on {a.get('base_model_name_or_path') or '?'}"
        if a.get("r"):
            adapter += f" (r={a['r']})"
    vocab = d.get("vocab")
    con.print(f"Quantization: {escape(quant)}; adapter: {escape(adapter)}; tokenizer: "
              + (f"{vocab['size']:,} tokens ({vocab['kind']})" if vocab else "none found"))
    if d["findings"]:
        _bullets(con, f"[bold]Config vs inventory[/bold]: {len(d['findings'])} disagreement(s)", d["findings"])
    elif d["architecture"] is not None and d.get("inventory"):
        con.print("[bold]Config vs inventory[/bold]: consistent (shapes, layer count and experts agree)")
    _bullets(con, "Notes:", d["notes"])


# ------------------------------------------------------------------------------------------------------- arch

def _value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":")) if v else "—"
    return str(v)


def _shape(side: dict[str, Any] | None, scope: str) -> str:
    """'48L 128E 1280x4096': layers, experts per layer, shape of the component's first tensor."""
    if side is None:
        return "—"
    first = next(iter(side["shapes"].values()), None)
    shape = "x".join(str(x) for x in first) if first else "?"
    prefix = ""
    if scope not in ("model", "vision") or side["layers"] > 1:
        prefix += f"{side['layers']}L "
    if side["instances"] > 1:
        prefix += f"{side['instances']}E "
    return prefix + shape


def render_arch(d: dict[str, Any], file=None) -> None:
    """Print an ``hf-provenance.arch/1`` document for people."""
    con = make_console(file)
    con.print(f"hf-provenance {d['tool']['version']}: arch {escape(d['model']['ref'])} (model) vs "
              f"{escape(d['base']['ref'])} (base)")
    _hanging(con, [("model:", d["model"]["summary"]), ("base:", d["base"]["summary"])])

    con.print()
    t = _table(con, "field", "model", "base", "match", title="Configuration")
    for f in d["fields"]:
        if f["model"] is None and f["base"] is None:
            continue
        mark = "yes" if f["match"] else ("[yellow]no[/yellow]" if con.is_terminal else "no")
        t.add_row(f["name"], escape(_value(f["model"])), escape(_value(f["base"])), mark)
    con.print(t)

    con.print()
    t = _table(con, "component", "model", "base", "shapes", "comparable",
              title="Components (per-layer shapes match? comparable how?)")
    for c in d["components"]:
        match = {True: "match", False: "differ", None: "—"}[c["shapes_match"]]
        if con.is_terminal and c["shapes_match"] is False:
            match = f"[yellow]{match}[/yellow]"
        t.add_row(escape(c["label"]), _shape(c["model"], c["scope"]), _shape(c["base"], c["scope"]), match,
                  c["status"])
    con.print(t)
    con.print("L = layers holding the component, E = copies per layer (experts); the shape is the component's "
              "first tensor.")
    diffs = [f"{c['label']}: {'; '.join(c['reasons'])}" for c in d["components"] if c["reasons"]]
    _bullets(con, "Differences:", diffs)

    con.print()
    kinds = "; ".join(f"{k} {v['model']} vs {v['base']}" for k, v in d["layer_kinds"].items())
    con.print(f"Layer kinds (model vs base): {kinds}")
    con.print(f"Depth: {d['depth']['model']['layers']} vs {d['depth']['base']['layers']} decoder layers"
              + "".join(f" (+{d['depth'][s]['mtp_layers']} MTP in {s})" for s in ("model", "base")
                        if d["depth"][s]["mtp_layers"]))
    label = {c["name"]: c["label"] for c in d["components"]}
    _hanging(con, [(f"{status}:", ", ".join(label.get(n, n) for n in names) or "none")
                   for status, names in d["by_status"].items()])
    _bullets(con, "Notes:", d["notes"])


__all__ = ["render_arch", "render_inspect"]
