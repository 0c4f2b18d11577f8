"""Terminal output: rich tables on a terminal, plain aligned text when piped; readable at 80 columns."""

from __future__ import annotations

import os
import sys

from rich import box
from rich.console import Console
from rich.table import Table


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (``| head``): stop printing and say so with BrokenPipeError, which the CLI turns
        into "write the requested files, exit as usual". rich's own handler raised SystemExit(1), and 1 means
        "--fail-on matched"."""
        self.quiet = True
        raise BrokenPipeError("the reader of the terminal report went away")


def make_console(file=None) -> Console:
    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    width = None if tty else int(os.environ.get("COLUMNS", "100"))
    return _Console(file=file, force_terminal=tty, no_color=not tty or "NO_COLOR" in os.environ,
                    width=width, highlight=False, soft_wrap=False, emoji=False)


def table(console: Console, *columns: str, title: str | None = None, justify: tuple[str, ...] = ()) -> Table:
    plain = not console.is_terminal
    t = Table(title=title, box=None if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              title_justify="left", header_style="" if plain else "bold", title_style="" if plain else "bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify=justify[i] if i < len(justify) else "left", overflow="fold")
    return t


def fmt_num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_ci(stat: dict | None) -> str:
    if not stat or stat.get("value") is None:
        return "—"
    v = stat["value"]
    ci = stat.get("ci")
    if ci and ci[0] is not None and ci[1] is not None and abs(ci[1] - ci[0]) > 5e-4:
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{v:.3f}"
