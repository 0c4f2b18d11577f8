"""The self-contained HTML report for an audit: one file, plots and badge inlined as data URIs, inline CSS, no
script, and a Content-Security-Policy that forbids any fetch. Reads the report dict only.

    html = render_html(report.to_dict(), render_plots(report.to_dict()))
"""

from __future__ import annotations

import base64
from typing import Any

TEMPLATE = "html_report.html.j2"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(doc: dict[str, Any], plots=None, *, plots_note: str = "") -> str:
    """The HTML report of ``doc``.

    Args:
        doc: a compare report dict (``to_dict()`` or a loaded JSON report).
        plots: a ``plots.PlotSet`` (or None: no plots, and ``plots_note`` says why).
    """
    from hf_provenance.report import badge
    from hf_provenance.report.templates import render
    from hf_provenance.report.view import view

    by_rank: dict[int, list[dict[str, str]]] = {}
    skipped: dict[int, list[dict[str, str]]] = {}
    if plots is not None:
        for name, png in plots.images.items():
            by_rank.setdefault(plots.ranks[name], []).append(
                {"title": plots.titles[name], "uri": data_uri(png, "image/png")})
        for name, reason in plots.skipped.items():
            skipped.setdefault(plots.ranks[name], []).append({"name": name, "reason": reason})
    svg_uri = data_uri(badge.badge_svg(doc).encode("utf-8"), "image/svg+xml") if doc["comparisons"] else None
    return render(TEMPLATE, plots=by_rank, skipped=skipped, plots_note=plots_note, badge_svg_uri=svg_uri,
                  **view(doc))


__all__ = ["data_uri", "render_html"]
