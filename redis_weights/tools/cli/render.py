"""Output of the ``redis-weights`` command: boxed tables on a terminal, plain aligned text when piped, JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO


def is_tty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that takes colours and boxes (not ``TERM=dumb``)."""
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                out: TextIO | None = None) -> None:  # fmt: skip
    """A boxed table on a terminal (rich), plain aligned columns otherwise."""
    out = out or sys.stdout
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        out.write(title + "\n")
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def print_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout (the ``--json`` output)."""
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
