"""Plain-text tables for the end-of-command summaries (train, eval, convert).

One renderer: the first column left-aligned, the others right-aligned, an optional
title row and header row, all boxed with ``+---+`` lines.
"""
from __future__ import annotations

from typing import Optional, Sequence


def format_grid(header: Optional[Sequence[str]], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """A table of ``rows`` under an optional ``header`` row and ``title``."""
    body = [list(map(str, r)) for r in rows]
    lines = body if header is None else [list(map(str, header)), *body]
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]

    def fmt(r: list[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "| " + " | ".join(cells) + " |"

    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    if title:
        out += ["| " + title.ljust(len(line) - 4) + " |", line]
    if header is not None:
        out += [fmt(lines[0]), line]
    out += [fmt(r) for r in body]
    out.append(line)
    return "\n".join(out)


def format_table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """A two-column (name, value) table."""
    return format_grid(None, rows, title)
