"""Tables for people: the one renderer of every list the ``sandport`` command prints.

Owns laying out a table in plain text: a header line naming each column, cells padded
(numbers to the right), and making it fit a terminal's width. What does not fit gives way
in this order: prose columns (a ``wrap`` column: a reason, a "why") wrap their words onto
more lines, down to a floor; then optional columns are left out, the least useful first
(each column's ``rank``); only if the columns that are always shown still do not fit are
their cells cut onto more lines. ``width=None`` (``--wide``) shows every column with every
cell on one line. Cells are text from the gateway, some of it named by users or guests: a
control character (an escape sequence, a newline) is shown as ``?``, never passed on to
the terminal.

Must not print or know a console: :func:`sandport.cli.common.print_table` prints what
:func:`layout` returns, and :func:`terminal_width` says how wide to make it.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len, chop_cells

#: Spaces between two columns.
GAP = 2
#: How narrow a wrapping column may become (unless its natural width is less).
MIN_WRAP = 16
#: The width when stdout is not a terminal and COLUMNS is not set.
DEFAULT_WIDTH = 80
#: What an empty cell shows.
EMPTY = "-"


@dataclass(frozen=True, slots=True, kw_only=True)
class Column:
    """One column of a table.

    Attributes:
        header: What the header line calls it (upper case, short).
        rank: 0: always shown; else shown if it fits once every column of a lower rank
            was placed: 1 is the most useful optional column.
        wrap: Prose whose words may wrap onto more lines when the table is too wide.
        right: Aligned to the right (numbers).
    """

    header: str
    rank: int = 0
    wrap: bool = False
    right: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """A table laid out: its lines (the header first) and the headers left out."""

    lines: tuple[str, ...]
    hidden: tuple[str, ...]


def terminal_width() -> int:
    """How wide a table may be: ``COLUMNS``, else stdout's terminal, else 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns or DEFAULT_WIDTH
    except (AttributeError, ValueError, OSError):  # not a terminal, or no fileno
        return DEFAULT_WIDTH


def clean(text: str) -> str:
    """``text`` as one line safe for a terminal: a control or format character (ESC,
    newline, a bidi override...) or a line separator becomes ``?``, any other space a
    plain space; an empty cell ``-``."""
    return "".join(_SAFE.get(unicodedata.category(ch), ch) for ch in text) or EMPTY


#: What :func:`clean` makes of a character, by Unicode category.
_SAFE = {"Cc": "?", "Cf": "?", "Cs": "?", "Co": "?", "Cn": "?", "Zl": "?", "Zp": "?",
         "Zs": " "}


def layout(columns: Sequence[Column], rows: Sequence[Sequence[str]],
           width: int | None) -> Layout:
    """Lay out ``rows`` (one cell per column) under a header, at most ``width`` cells wide.

    Args:
        columns: The columns, in the order they are shown.
        rows: The cells, as text (cleaned here).
        width: The terminal's width; None: every column, nothing wrapped (``--wide``).
    """
    if any(len(r) != len(columns) for r in rows):
        raise ValueError("every row needs one cell per column")
    cells = [[clean(c) for c in r] for r in rows]
    natural = [max([cell_len(col.header), *(cell_len(r[i]) for r in cells)])
               for i, col in enumerate(columns)]
    widths: dict[int, int]
    if width is None:
        shown = list(range(len(columns)))
        widths = dict(enumerate(natural))
    else:
        shown = [i for i, col in enumerate(columns) if col.rank == 0]
        for i in sorted((i for i, c in enumerate(columns) if c.rank),
                        key=lambda i: (columns[i].rank, i)):
            if _fit(columns, natural, sorted([*shown, i]), width) is not None:
                shown = sorted([*shown, i])
        widths = _fit(columns, natural, shown, width) or _squeeze(natural, shown, width)
    lines = [*_lines([col.header for col in columns], columns, shown, widths),
             *(line for r in cells for line in _lines(r, columns, shown, widths))]
    hidden = tuple(col.header for i, col in enumerate(columns) if i not in shown)
    return Layout(lines=tuple(lines), hidden=hidden)


def _fit(columns: Sequence[Column], natural: Sequence[int], shown: Sequence[int],
         width: int) -> dict[int, int] | None:
    """Widths of the ``shown`` columns within ``width``, wrapping prose columns down to
    their floor (widest first); None if that is not enough."""
    widths = {i: natural[i] for i in shown}
    excess = sum(widths.values()) + GAP * (len(shown) - 1) - width
    floors = {i: min(natural[i], max(cell_len(columns[i].header), MIN_WRAP))
              for i in shown if columns[i].wrap}
    while excess > 0:
        narrower = [i for i in floors if widths[i] > floors[i]]
        if not narrower:
            return None
        widest = max(narrower, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return widths


def _squeeze(natural: Sequence[int], shown: Sequence[int], width: int) -> dict[int, int]:
    """The last resort: the widest column loses a cell at a time (down to one) until the
    table fits ``width``."""
    widths = {i: natural[i] for i in shown}
    while sum(widths.values()) + GAP * (len(shown) - 1) > width:
        widest = max(shown, key=lambda i: widths[i])
        if widths[widest] == 1:
            break
        widths[widest] -= 1
    return widths


def _lines(row: Sequence[str], columns: Sequence[Column], shown: Sequence[int],
           widths: dict[int, int]) -> list[str]:
    """One row: its cells side by side, each wrapped to its column's width."""
    wrapped = {i: wrap_cell(row[i], widths[i]) for i in shown}
    height = max(len(w) for w in wrapped.values())
    lines = []
    for k in range(height):
        parts = []
        for i in shown:
            text = wrapped[i][k] if k < len(wrapped[i]) else ""
            pad = " " * (widths[i] - cell_len(text))
            parts.append(pad + text if columns[i].right else text + pad)
        lines.append((" " * GAP).join(parts).rstrip())
    return lines


def wrap_cell(text: str, width: int) -> list[str]:
    """``text`` on lines at most ``width`` cells wide: broken between words, and a word
    longer than a line cut where it reaches the edge."""
    if cell_len(text) <= width:
        return [text]
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        if line and cell_len(line) + 1 + cell_len(word) <= width:
            line += " " + word
            continue
        if line:
            lines.append(line)
        pieces = chop_cells(word, width) if cell_len(word) > width else [word]
        lines += pieces[:-1]
        line = pieces[-1]
    lines.append(line)
    return lines
