"""Plain-text tables for the end-of-command summaries (train, eval, convert).

One renderer: the first column left-aligned, the others right-aligned, an optional
title row and header row, all boxed with ``+---+`` lines. A cell longer than
``max_cell`` characters wraps onto more lines (at spaces; a path stays whole), and a
title longer than the table wraps inside its box, so no line leaves the box.
"""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

MAX_CELL = 60  # characters per line of a cell before it wraps
MIN_TITLE = 40  # a narrow table widens to give its title at least this many characters a line


def format_grid(header: Optional[Sequence[str]], rows: Sequence[Sequence[str]], title: str | None = None,
                max_cell: int = MAX_CELL) -> str:
    """A table of ``rows`` under an optional ``header`` row and ``title``."""
    body = [[_wrap(str(c), max_cell) for c in r] for r in rows]
    head = None if header is None else [_wrap(str(c), max_cell) for c in header]
    lines = body if head is None else [head, *body]
    widths = [max(len(part) for r in lines for part in r[i]) for i in range(len(lines[0]))]
    if title:
        inner = sum(widths) + 3 * (len(widths) - 1)
        widths[-1] += max(0, min(len(title), MIN_TITLE) - inner)

    def fmt(r: list[list[str]]) -> list[str]:
        height = max(len(c) for c in r)
        out = []
        for k in range(height):
            parts = [c[k] if k < len(c) else "" for c in r]
            cells = [p.ljust(w) if i == 0 or len(c) > 1 else p.rjust(w)  # wrapped text reads left-aligned
                     for i, (p, w, c) in enumerate(zip(parts, widths, r))]
            out.append("| " + " | ".join(cells) + " |")
        return out

    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    if title:
        out += ["| " + t.ljust(len(line) - 4) + " |" for t in textwrap.wrap(title, len(line) - 4)] + [line]
    if head is not None:
        out += [*fmt(head), line]
    for r in body:
        out += fmt(r)
    out.append(line)
    return "\n".join(out)


def format_table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """A two-column (name, value) table."""
    return format_grid(None, rows, title)


def _wrap(text: str, width: int) -> list[str]:
    if len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [text]
