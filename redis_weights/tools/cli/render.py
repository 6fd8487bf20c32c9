"""Output of the ``redis-weights`` command: boxed tables on a terminal, plain aligned text when piped, JSON.

Every value shown comes from Redis or from a file someone else wrote: ``printable``
escapes what a terminal would act on (escape sequences, other control and format
characters, line breaks), tables never parse their cells as rich markup, and JSON
has no ``NaN``/``Infinity`` (not JSON: ``null`` instead).
"""

from __future__ import annotations

import json
import math
import os
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})  # controls, format (bidi), separators


def printable(value: object) -> str:
    """``str(value)`` with every character a terminal could act on written as a Python escape (``\\x1b``)."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
        for ch in text
    )


def is_tty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that takes colours and boxes (not ``TERM=dumb``)."""
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                out: TextIO | None = None) -> None:  # fmt: skip
    """A boxed table on a terminal (rich), plain aligned columns otherwise."""
    out = out or sys.stdout
    cells = [[("" if c is None else printable(c)) for c in row] for row in rows]
    title = None if title is None else printable(title)
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text  # plain text: a cell is never parsed as markup ("policy[/].bias")

        table = Table(title=Text(title) if title else None, title_justify="left", header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*map(Text, row))
        Console(file=out).print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        out.write(title + "\n")
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def print_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout (the ``--json`` output); a float that is no number is ``null``."""
    json.dump(_finite(doc), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def json_line(doc: Any) -> str:
    """``doc`` as one line of JSON (``watch --json``), with the same rule as ``print_json``."""
    return json.dumps(_finite(doc))


def _finite(doc: Any) -> Any:
    """``doc`` with every NaN or infinite float replaced by None."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite(v) for v in doc]
    return doc
