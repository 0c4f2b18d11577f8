"""Jinja2 templates of the card section and the HTML report, loaded from files with ``StrictUndefined``.

The templates live in the repository's top-level ``templates/`` folder, which the wheel installs as the package
``hf_provenance.templates`` (pyproject: package-dir). Installed, they are read through ``importlib.resources``;
from a source checkout (no such package importable) the top-level folder is used.

    >>> env = environment()
    >>> env.get_template("card_section.md.j2")  # doctest: +SKIP

A missing value is an error, never a blank (``StrictUndefined``). ``*.html.j2`` templates are autoescaped;
Markdown templates escape text from the report with the ``md`` filter.
"""

from __future__ import annotations

import functools
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from hf_provenance.report.console import fmt_bytes, fmt_params

PACKAGE = "hf_provenance.templates"
CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "templates"


def template_root():
    """Where the templates are: the installed package ``hf_provenance.templates``, else the checkout's folder.

    Raises:
        FileNotFoundError: neither exists (a broken install: the wheel must ship ``templates/*.j2``).
    """
    try:
        root = resources.files(PACKAGE)
        if root.joinpath("card_section.md.j2").is_file():
            return root
    except (ModuleNotFoundError, TypeError):  # not installed as a package (a source checkout)
        pass
    if (CHECKOUT_DIR / "card_section.md.j2").is_file():
        return CHECKOUT_DIR
    raise FileNotFoundError(f"the report templates are missing: neither the package {PACKAGE} nor {CHECKOUT_DIR} "
                            "holds card_section.md.j2 (reinstall hf-provenance)")


class _ResourceLoader(jinja2.BaseLoader):
    """Loads templates through ``importlib.resources`` (works from a wheel, a zip or a folder)."""

    def __init__(self, root):
        self.root = root

    def get_source(self, environment, template):
        node = self.root
        for part in template.split("/"):
            if part in ("", ".", ".."):
                raise jinja2.TemplateNotFound(template)
            node = node.joinpath(part)
        if not node.is_file():
            raise jinja2.TemplateNotFound(template)
        return node.read_text(encoding="utf-8"), str(node), lambda: True


# ------------------------------------------------------------------------------------------------ filters

# ASCII punctuation that can start Markdown syntax anywhere in a line (CommonMark lets any of it be
# backslash-escaped); '$' because GitHub and the Hub render $…$ as math.
_MD_INLINE = re.compile(r"([\\`*_\[\]<>|~&$])")
_MD_LINE_START = re.compile(r"^([#+\-=>!])")


def md(value: Any) -> str:
    """Escape text for Markdown (inline, table cells too): punctuation escaped, line breaks made spaces."""
    text = " ".join(str(value).split("\n"))
    text = text.replace("\r", " ")
    text = _MD_INLINE.sub(r"\\\1", text)
    text = _MD_LINE_START.sub(r"\\\1", text)
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", text)


def code(value: Any) -> str:
    """An inline code span that holds ``value`` verbatim, whatever backticks it contains."""
    text = " ".join(str(value).splitlines())
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_cell(value: Any) -> str:
    """An inline code span inside a GFM table cell: pipes escaped (GFM splits cells on '|' even in code spans)."""
    return code(value).replace("|", "\\|")


def fence(value: Any) -> str:
    """A code fence longer than any backtick run in ``value`` (at least three)."""
    longest = max((len(m) for m in re.findall(r"`+", str(value))), default=0)
    return "`" * max(3, longest + 1)


def num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return "—"
    return f"{x:.{digits}f}"


def ci(stat: dict | None, digits: int = 3) -> str:
    """``0.997 [0.995, 0.998]``; the interval is left out when it has zero width (a full read)."""
    if not stat or stat.get("value") is None:
        return "—"
    v = stat["value"]
    bounds = stat.get("ci")
    if bounds and bounds[0] is not None and bounds[1] is not None and abs(bounds[1] - bounds[0]) >= 0.5 * 10 ** -digits:
        return f"{v:.{digits}f} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"
    return f"{v:.{digits}f}"


def pvalue(p: float | None) -> str:
    if p is None:
        return "—"
    if p <= 1e-300:
        return "< 1e-300"
    if p < 1e-3:
        return f"{p:.1e}"
    return f"{p:.3f}"


def val(x: Any) -> str:
    """A configuration value for a table cell: lists joined, None as a dash, booleans as yes/no."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (list, tuple)):
        return ", ".join(val(i) for i in x) or "—"
    if isinstance(x, dict):
        return ", ".join(f"{k}={val(v)}" for k, v in x.items()) or "—"
    return str(x)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def short(value: str | None, n: int = 16) -> str:
    if not value:
        return "—"
    return value if len(value) <= n else value[:n] + "…"


FILTERS = {"md": md, "code": code, "code_cell": code_cell, "fence": fence, "num": num, "ci": ci, "pvalue": pvalue,
           "params": fmt_params, "nbytes": fmt_bytes, "pct": pct, "short": short, "val": val}


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    """The shared environment: StrictUndefined, autoescape for ``*.html.j2``, the report filters."""
    env = jinja2.Environment(
        loader=_ResourceLoader(template_root()),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2", "html"), default_for_string=False,
                                            default=False),
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    return env


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` (e.g. ``card_section.md.j2``) with ``context``."""
    return environment().get_template(name).render(**context)


__all__ = ["FILTERS", "PACKAGE", "code", "environment", "fence", "md", "render", "template_root"]
