"""The model-card section: render it from a compare report, put it between stable markers, update the YAML header.

    section = render_section(report.to_dict())        # Markdown, between START and END
    text = insert_section(old_card_text, section)      # every character outside the markers kept
    change = plan_metadata(doc, text)                  # what --set-metadata would write, or MetadataConflict
    text = update_metadata(text, change)               # only base_model / base_model_relation lines change

Rendering reads the report dict only (a saved JSON report renders the same as a fresh one). Cards are handled as
text decoded from UTF-8 without newline translation, so CRLF cards, cards with a BOM and cards without a YAML
header keep every byte outside what is replaced; inserted lines use the card's own line ending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hf_provenance.errors import InputError, UsageError

START = "<!-- hf-provenance:start -->"
END = "<!-- hf-provenance:end -->"
TEMPLATE = "card_section.md.j2"


# ------------------------------------------------------------------------------------------------ render

def render_section(doc: dict[str, Any], *, plots: list[dict[str, str]] | None = None) -> str:
    """The section for ``doc`` (a compare report dict), from START to END, lines ending in ``\\n``, no final newline.

    Args:
        doc: ``CompareReport.to_dict()`` or a loaded ``compare --json`` file.
        plots: ``[{"title", "path"}]`` images to reference (paths relative to the card).
    """
    from hf_provenance.report.templates import render
    from hf_provenance.report.view import view

    text = render(TEMPLATE, START=START, END=END, plots=plots or [], **view(doc))
    text = re.sub(r"\n{3,}", "\n\n", text)  # template whitespace: at most one blank line anywhere
    return text.strip("\n")


# ------------------------------------------------------------------------------------------------ markers

def newline_of(text: str) -> str:
    """The card's line ending: CRLF when most of its line breaks are CRLF, else LF."""
    crlf = text.count("\r\n")
    return "\r\n" if crlf and crlf >= text.count("\n") - crlf else "\n"


def insert_section(card: str, section: str, *, where: str = "card") -> str:
    """Put ``section`` (from START to END) into ``card``: replacing the marked block if there is one, else appended
    after a blank line. Text outside the markers is kept character for character.

    Raises:
        InputError: the markers are unbalanced, repeated or out of order (the card needs a hand fix).
    """
    nl = newline_of(card) if card else "\n"
    block = section.replace("\r\n", "\n").replace("\n", nl)
    starts = [m.start() for m in re.finditer(re.escape(START), card)]
    ends = [m.start() for m in re.finditer(re.escape(END), card)]
    if not starts and not ends:
        if not card:
            return block + nl
        sep = "" if card.endswith(("\n", "\r")) else nl
        return card + sep + nl + block + nl
    if len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0]:
        return card[:starts[0]] + block + card[ends[0] + len(END):]
    raise InputError(where, f"found {len(starts)} '{START}' and {len(ends)} '{END}' marker(s) (expected one pair, "
                            "start before end, or none); fix the card by hand")


def extract_section(card: str) -> str | None:
    """The marked block (START..END inclusive), or None."""
    s, e = card.find(START), card.find(END)
    return card[s:e + len(END)] if s >= 0 and e > s else None


# ------------------------------------------------------------------------------------------------ YAML header

_FRONT = re.compile(r"\A(\ufeff?---[ \t]*\r?\n)(.*?)(^---[ \t]*(?:\r?\n|\Z))", re.S | re.M)
_EMPTY_FRONT = re.compile(r"\A(\ufeff?---[ \t]*\r?\n)(^---[ \t]*(?:\r?\n|\Z))", re.M)


def split_front_matter(card: str) -> tuple[str, str, str, str] | None:
    """(opening line, YAML text, closing line, rest) when the card starts with a ``---`` YAML header."""
    m = _EMPTY_FRONT.match(card)
    if m:
        return m.group(1), "", m.group(2), card[m.end():]
    m = _FRONT.match(card)
    if not m:
        return None
    return m.group(1), m.group(2), m.group(3), card[m.end():]


def read_metadata(card: str, *, where: str = "card") -> dict[str, Any]:
    """The card's YAML header as a dict ({} without one).

    Raises:
        InputError: the header is not valid YAML or not a mapping.
    """
    import yaml

    parts = split_front_matter(card)
    if parts is None:
        return {}
    try:
        data = yaml.safe_load(parts[1]) if parts[1].strip() else {}
    except yaml.YAMLError as exc:
        raise InputError(where, f"the card's YAML header is not valid YAML ({str(exc).splitlines()[0]}); "
                                "fix it before --set-metadata") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(where, "the card's YAML header is not a mapping of keys to values")
    return data


def declared_bases(meta: dict[str, Any]) -> list[str]:
    value = meta.get("base_model")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _repo_id(ref: str) -> str:
    return ref.split("@")[0].rstrip("/")


@dataclass(frozen=True)
class MetadataChange:
    """What --set-metadata writes: ``values`` (key -> new value) for the keys that change, and ``messages`` saying
    what was kept and why."""

    values: dict[str, Any] = field(default_factory=dict)
    messages: tuple[str, ...] = ()


class MetadataConflict(UsageError):
    """Raised when --set-metadata would overwrite a declared base_model that the report does not confirm (or when
    the base is not a Hub id); nothing is written."""


LINEAGE = ("identical", "derived", "partial")


def plan_metadata(doc: dict[str, Any], card: str, *, where: str = "card", replace_declared: bool = False
                  ) -> MetadataChange:
    """Decide base_model / base_model_relation from the report (DESIGN's relation mapping, ``verdict.hub_relation``).

    The top-ranked base that shares weight lineage (identical, derived or partial) becomes ``base_model`` only when
    the card declares none, or declares that same base. A declared base the report does not confirm is never
    replaced silently: ``MetadataConflict`` (exit 2) unless ``replace_declared``, and then the message says what was
    replaced. A declared relation that differs from the evidence is kept (and said) unless ``replace_declared``.
    With no base sharing lineage, nothing changes. Local bases cannot be written (``base_model`` takes Hub ids).
    """
    from hf_provenance.report.view import LOCAL_KINDS
    from hf_provenance.sources import looks_like_hub_id
    from hf_provenance.verdict import hub_relation

    meta = read_metadata(card, where=where)
    declared = declared_bases(meta)
    declared_rel = meta.get("base_model_relation")
    comps = sorted(doc["comparisons"], key=lambda c: c["rank"])
    verdict_of = {_repo_id(c["base"]["ref"]): c["verdict"] for c in comps}
    lineage = [c for c in comps if c["verdict"] in LINEAGE]
    if not lineage:
        msgs = ["base_model left as it is: no compared base shares weight lineage with this model"]
        for d in declared:
            if verdict_of.get(_repo_id(d)) == "independent":
                msgs.append(f"the card declares {d} as base_model, but the weights show no shared lineage with it "
                            "(verdict independent); not removed: edit the card if it is wrong")
        return MetadataChange({}, tuple(msgs))
    top = lineage[0]
    ref = top["base"]["ref"]
    if top["base"].get("kind") in LOCAL_KINDS or not looks_like_hub_id(ref):
        raise MetadataConflict(where, f"--set-metadata needs the base as a Hub id (org/name); the report compared "
                                      f"the local path {ref}: compare against the Hub id instead")
    new_base = _repo_id(ref)
    new_rel = hub_relation(list(top["relation"])) or "finetune"
    msgs: list[str] = []
    values: dict[str, Any] = {}
    others = [_repo_id(c["base"]["ref"]) for c in lineage[1:]]
    if others:
        msgs.append(f"also shares weight lineage with {', '.join(others)} (not added: base_model names the "
                    "top-ranked base)")
    if not declared:
        values["base_model"] = new_base
    elif new_base not in [_repo_id(d) for d in declared]:
        status = "; ".join(f"{d}: {verdict_of[_repo_id(d)]}" if _repo_id(d) in verdict_of
                           else f"{d}: not compared" for d in declared)
        if not replace_declared:
            raise MetadataConflict(where, f"the card declares base_model {', '.join(declared)} ({status}), but the "
                                          f"weights share lineage with {new_base}; base_model not changed (compare "
                                          "against the declared base too, or pass --replace-declared)")
        values["base_model"] = new_base
        msgs.append(f"replaced the declared base_model {', '.join(declared)} ({status}) with {new_base}")
    if declared_rel is None or "base_model" in values:
        if declared_rel != new_rel:
            values["base_model_relation"] = new_rel
    elif declared_rel != new_rel:
        if replace_declared:
            values["base_model_relation"] = new_rel
            msgs.append(f"replaced the declared base_model_relation {declared_rel!r} with {new_rel!r}")
        else:
            msgs.append(f"kept the declared base_model_relation {declared_rel!r}; the evidence suggests {new_rel!r} "
                        "(pass --replace-declared to change it)")
    return MetadataChange(values, tuple(msgs))


def _top_level_block(lines: list[str], key: str) -> tuple[int, int] | None:
    """[start, end) of the lines holding top-level ``key`` and its indented or '- ' continuation lines."""
    pat = re.compile(rf"^{re.escape(key)}[ \t]*:")
    for i, line in enumerate(lines):
        if pat.match(line):
            j = i + 1
            while j < len(lines) and (lines[j][:1] in (" ", "\t") or lines[j].startswith("-")) \
                    and lines[j].strip() not in ("", "---"):
                j += 1
            return i, j
    return None


def update_metadata(card: str, change: MetadataChange, *, where: str = "card") -> str:
    """Write ``change.values`` into the card's YAML header, touching only those keys' lines (a header is created at
    the top of a card without one). The result is re-parsed: every other key must be unchanged.

    Raises:
        InputError: the edited header would not parse back to the intended values (a hand edit is needed).
    """
    import yaml

    if not change.values:
        return card
    nl = newline_of(card) if card else "\n"
    before = read_metadata(card, where=where)
    parts = split_front_matter(card)
    if parts is None:
        bom = "\ufeff" if card.startswith("\ufeff") else ""
        opening, body, closing, rest = bom + "---" + nl, "", "---" + nl, card[len(bom):]
    else:
        opening, body, closing, rest = parts
    lines = body.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += nl
    for key, value in change.values.items():
        dumped = yaml.safe_dump({key: value}, default_flow_style=False, allow_unicode=True, sort_keys=False)
        new_lines = [ln + nl for ln in dumped.splitlines()]
        span = _top_level_block(lines, key)
        if span is None:
            lines.extend(new_lines)
        else:
            lines[span[0]:span[1]] = new_lines
    text = opening + "".join(lines) + closing + rest
    after = read_metadata(text, where=where)
    if after != {**before, **change.values}:
        raise InputError(where, "could not update base_model / base_model_relation in the YAML header without "
                                "changing other keys; edit them by hand")
    return text


__all__ = ["END", "START", "MetadataChange", "MetadataConflict", "declared_bases", "extract_section",
           "insert_section", "newline_of", "plan_metadata", "read_metadata", "render_section",
           "split_front_matter", "update_metadata"]
