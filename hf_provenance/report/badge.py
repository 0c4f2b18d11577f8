"""A provenance badge for the top-ranked base: a shields.io static-badge URL and a local SVG that renders offline.

    >>> badge_url(doc)            # doctest: +SKIP
    'https://img.shields.io/badge/provenance-shares_lineage_with_org%2Fbase-007ec6'
    >>> write_bytes("badge.svg", badge_svg(doc).encode())  # doctest: +SKIP

Wording and colour come from the verdict only (``view.BADGE_MESSAGE``, ``view.BADGE_COLOR``): neutral hues, because a
shared lineage is a finding, not a failure.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

LABEL = "provenance"
SHIELDS = "https://img.shields.io/badge/"


def _top(doc: dict[str, Any]) -> dict[str, Any]:
    comps = sorted(doc["comparisons"], key=lambda c: c["rank"])
    if not comps:
        raise ValueError("the report has no comparison to put on a badge")
    return comps[0]


def badge_parts(doc: dict[str, Any], comparison: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """(label, message, hex colour) for ``comparison`` (default: the top-ranked base)."""
    from hf_provenance.report.view import BADGE_COLOR, BADGE_MESSAGE, display_ref

    c = comparison or _top(doc)
    return LABEL, f"{BADGE_MESSAGE[c['verdict']]} {display_ref(c['base'])}", BADGE_COLOR[c["verdict"]]


def _shields_escape(text: str) -> str:
    # shields' static badge path: '-' and '_' are doubled, a space is '_'; the rest is percent-encoded
    text = text.replace("-", "--").replace("_", "__").replace(" ", "_")
    return quote(text, safe="_-")


def badge_url(doc: dict[str, Any], comparison: dict[str, Any] | None = None) -> str:
    label, message, color = badge_parts(doc, comparison)
    return f"{SHIELDS}{_shields_escape(label)}-{_shields_escape(message)}-{color}"


def badge_alt(doc: dict[str, Any], comparison: dict[str, Any] | None = None) -> str:
    label, message, _ = badge_parts(doc, comparison)
    return f"{label}: {message}"


# approximate advance widths (px) of Verdana at 11px, by character class
_NARROW = set("ijl.,:;!|'`")
_SEMI = set("frt()[]{}/\\ -\"")
_WIDE = set("mwMW@%")


def text_width(text: str) -> float:
    w = 0.0
    for ch in text:
        if ch in _NARROW:
            w += 3.4
        elif ch in _SEMI:
            w += 4.6
        elif ch in _WIDE:
            w += 10.0
        elif ch.isupper() or ch.isdigit():
            w += 7.4
        else:
            w += 6.6
    return w


def badge_svg(doc: dict[str, Any], comparison: dict[str, Any] | None = None) -> str:
    """A flat two-part badge as standalone SVG (no fonts or images fetched)."""
    label, message, color = badge_parts(doc, comparison)
    lw = round(text_width(label) + 12)
    mw = round(text_width(message) + 12)
    w = lw + mw
    alt = escape(f"{label}: {message}")
    lab, msg = escape(label), escape(message)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20" role="img" aria-label="{alt}">'
        f"<title>{alt}</title>"
        '<linearGradient id="g" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
        '<stop offset="1" stop-opacity=".1"/></linearGradient>'
        f'<clipPath id="c"><rect width="{w}" height="20" rx="3" fill="#fff"/></clipPath>'
        f'<g clip-path="url(#c)"><rect width="{lw}" height="20" fill="#555"/>'
        f'<rect x="{lw}" width="{mw}" height="20" fill="#{color}"/>'
        f'<rect width="{w}" height="20" fill="url(#g)"/></g>'
        '<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">'
        f'<text x="{lw / 2:.1f}" y="14">{lab}</text><text x="{lw + mw / 2:.1f}" y="14">{msg}</text></g></svg>\n'
    )


__all__ = ["LABEL", "badge_alt", "badge_parts", "badge_svg", "badge_url", "text_width"]
