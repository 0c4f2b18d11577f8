"""What the card section, the HTML report and the badge say about a compare report: wording, pinned refs, the
reproduce command, hash matches. Reads only the report's ``to_dict()`` (a saved JSON report works the same); it
selects, counts and words what the report holds and never recomputes a statistic.

    >>> v = view(report.to_dict())          # doctest: +SKIP
    >>> v["comparisons"][0]["statement"]      # doctest: +SKIP
    'shares weight lineage with org/base'
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from hf_provenance.verdict import hub_relation

# DESIGN §Meaning: "derived" = shares weight lineage with the base; never an accusation the weights cannot support.
STATEMENT = {
    "identical": "has weights identical to",
    "derived": "shares weight lineage with",
    "partial": "shares weight lineage, in some components only, with",
    "independent": "shows no shared weight lineage with",
    "inconclusive": "could not be shown to share, or not to share, weight lineage with",
}
BADGE_MESSAGE = {
    "identical": "identical to",
    "derived": "shares lineage with",
    "partial": "partly shares lineage with",
    "independent": "independent of",
    "inconclusive": "inconclusive vs",
}
# badge colours: neutral hues (a lineage finding is not a pass or a failure)
BADGE_COLOR = {"identical": "8a2be2", "derived": "007ec6", "partial": "1f9e89", "independent": "6c757d",
               "inconclusive": "dfb317"}
LINEAGE = ("identical", "derived", "partial")
LOCAL_KINDS = ("folder", "file", "hf-cache")
REPORT_FILE = "provenance.json"
ALIGNMENT_PARTS = ("residual", "units", "heads", "layers", "experts", "vocab")


def display_ref(ref: dict[str, Any]) -> str:
    """The ref as a reader should see it: Hub ids as given, local paths by their last component."""
    r = ref["ref"]
    if ref.get("kind") in LOCAL_KINDS:
        return os.path.basename(r.rstrip("/\\")) or r
    return r


def pinned_ref(ref: dict[str, Any]) -> str:
    """A Hub ref pinned to the commit that was compared (``org/name@sha``); local refs as given."""
    r, rev = ref["ref"], ref.get("revision")
    if ref.get("kind") in LOCAL_KINDS or not rev:
        return r
    return f"{r.split('@')[0]}@{rev}"


def content_id(ref: dict[str, Any]) -> dict[str, Any]:
    """``{kind, value, revision, files}`` whatever form the report stored (a string is a bare value)."""
    cid = ref.get("content_id")
    if isinstance(cid, str):
        return {"kind": "content_id", "value": cid, "revision": ref.get("revision"), "files": {}}
    return {"kind": cid.get("kind", "content_id"), "value": cid.get("value", ""),
            "revision": cid.get("revision"), "files": dict(cid.get("files") or {})}


def reproduce_command(doc: dict[str, Any]) -> str:
    """The one command that measures this report again: the same refs pinned to the compared revisions, the same
    sample fraction, seed and device."""
    run = doc["run"]
    parts = ["hf-provenance", "compare", pinned_ref(doc["model"])]
    for c in doc["comparisons"]:
        parts += ["--base", pinned_ref(c["base"])]
    if run.get("sample") is not None:
        parts += ["--sample", repr(float(run["sample"]))]
    parts += ["--seed", str(run["seed"])]
    if run.get("device") not in (None, "cpu"):
        parts += ["--device", str(run["device"])]
    parts += ["--json", REPORT_FILE]
    return " ".join(shlex.quote(p) for p in parts)


def hash_matches(doc: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """The hash evidence the report holds for one base: equal per-tensor SHA-256, bit-equal tensors, equal file
    hashes in the content ids. Counts and lists only."""
    tensors = c.get("tensors") or []
    checked = [t for t in tensors if t.get("sha256_equal") is not None]
    sha_equal = [t["name"] for t in checked if t["sha256_equal"]]
    bit_equal = [t["name"] for t in tensors if t.get("bit_equal")]
    m, b = content_id(doc["model"]), content_id(c["base"])
    same_files = sorted({name for name, h in m["files"].items() if h and h in set(b["files"].values())})
    return {"n_tensors": len(tensors), "n_checked": len(checked), "sha_equal": sha_equal, "bit_equal": bit_equal,
            "same_content_id": bool(m["value"]) and m["kind"] == b["kind"] and m["value"] == b["value"],
            "content_id_kind": m["kind"], "same_files": same_files}


def statement(c: dict[str, Any]) -> str:
    return f"{STATEMENT[c['verdict']]} {display_ref(c['base'])}"


def _comparison(doc: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    arch = c.get("architecture") or {}
    fields = arch.get("fields") or []
    return {
        "c": c,
        "name": display_ref(c["base"]),
        "statement": statement(c),
        "lineage": c["verdict"] in LINEAGE,
        "hub_relation": hub_relation(list(c["relation"])) if c["verdict"] in LINEAGE else None,
        "content_id": content_id(c["base"]),
        "pinned": pinned_ref(c["base"]),
        "hashes": hash_matches(doc, c),
        "arch_error": arch.get("error"),
        "arch_fields": fields,
        "arch_mismatches": [f for f in fields if not f.get("match")],
        "arch_by_status": arch.get("by_status") or {},
        "arch_depth": arch.get("depth"),
        "maps_applied": [p for p in ALIGNMENT_PARTS if (c.get("alignment") or {}).get(p) is not None],
        "maps_not_applied": [p for p in ALIGNMENT_PARTS if (c.get("alignment") or {}).get(p) is None],
        "evidence_tensors": [t for t in (c.get("tensors") or []) if t.get("evidence")],
    }


def view(doc: dict[str, Any]) -> dict[str, Any]:
    """The context every template receives: ``doc`` (the report dict) plus wording and selections per base."""
    from hf_provenance.report import badge

    comps = sorted(doc["comparisons"], key=lambda c: c["rank"])
    top = comps[0] if comps else None
    run = doc["run"]
    return {
        "doc": doc,
        "run": run,
        "th": run["thresholds"],
        "model_name": display_ref(doc["model"]),
        "model_cid": content_id(doc["model"]),
        "model_pinned": pinned_ref(doc["model"]),
        "comparisons": [_comparison(doc, c) for c in comps],
        "top": _comparison(doc, top) if top else None,
        "reproduce": reproduce_command(doc),
        "badge_url": badge.badge_url(doc) if top else None,
        "badge_alt": badge.badge_alt(doc) if top else None,
        "date": str(run.get("started", ""))[:10],
        "sampled": run.get("sample") is not None,
    }


__all__ = ["BADGE_COLOR", "BADGE_MESSAGE", "STATEMENT", "content_id", "display_ref", "hash_matches", "pinned_ref",
           "reproduce_command", "statement", "view"]
