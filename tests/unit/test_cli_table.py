"""The table renderer of the CLI's lists: a header, the terminal's width, --wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rich.cells import cell_len

from sandport.cli.table import Column, clean, layout, terminal_width, wrap_cell

pytestmark = pytest.mark.unit

COLUMNS = (
    Column(header="ID"),
    Column(header="NAME", rank=3),
    Column(header="HOST"),
    Column(header="CONNS", rank=1, right=True),
    Column(header="WHY", rank=2, wrap=True),
)
ROWS = [
    ("f1", "vnc", "127.0.0.1:15901", "1,234", "auto: nft DNAT serves this (local and remote "
                                               "clients)"),
    ("f2", "8080/tcp", "0.0.0.0:18080", "7", "asked for"),
]


def test_wide_shows_every_column_each_row_on_one_line() -> None:
    table = layout(COLUMNS, ROWS, None)
    assert table.hidden == ()
    assert table.lines == (
        "ID  NAME      HOST             CONNS  WHY",
        "f1  vnc       127.0.0.1:15901  1,234  auto: nft DNAT serves this (local and remote "
        "clients)",
        "f2  8080/tcp  0.0.0.0:18080        7  asked for",
    )


def test_prose_wraps_before_a_column_is_left_out() -> None:
    table = layout(COLUMNS, ROWS, 60)
    assert table.hidden == ()
    assert table.lines == (
        "ID  NAME      HOST             CONNS  WHY",
        "f1  vnc       127.0.0.1:15901  1,234  auto: nft DNAT serves",
        "                                      this (local and remote",
        "                                      clients)",
        "f2  8080/tcp  0.0.0.0:18080        7  asked for",
    )


@pytest.mark.parametrize(("width", "hidden"), [
    (80, ()),
    (50, ("NAME",)),          # WHY (rank 2) fits, wrapped to its floor; NAME (3) does not
    (36, ("WHY",)),           # WHY does not fit even wrapped; NAME, after it, does
    (30, ("NAME", "WHY")),    # CONNS (rank 1) still fits
    (24, ("NAME", "CONNS", "WHY")),
])
def test_the_least_useful_columns_give_way_first(width: int, hidden: tuple[str, ...]) -> None:
    table = layout(COLUMNS, ROWS, width)
    assert table.hidden == hidden
    assert all(cell_len(line) <= width for line in table.lines), table.lines
    header = table.lines[0].split()
    assert header == [c.header for c in COLUMNS if c.header not in hidden]


def test_columns_that_always_show_are_cut_only_as_the_last_resort() -> None:
    table = layout(COLUMNS, ROWS, 12)
    assert table.hidden == ("NAME", "CONNS", "WHY")
    assert all(cell_len(line) <= 12 for line in table.lines), table.lines
    assert "".join(line[4:].strip() for line in table.lines[1:3]) == "127.0.0.1:15901"


def test_cells_are_one_safe_line_wide_characters_counted_as_two() -> None:
    rows = [("a\x1b[2Jb", "名前 vm", "h\nINFO forged", "", "bidi\u202eevil\u2028x")]
    table = layout(COLUMNS, rows, None)
    assert "\x1b" not in "".join(table.lines) and len(table.lines) == 2
    assert table.lines[1] == "a?[2Jb  名前 vm  h?INFO forged      -  bidi?evil?x"
    assert table.lines[0].index("HOST") == cell_len("a?[2Jb  名前 vm  ")
    assert clean("") == "-" and clean("a\u00a0b") == "a b"


def test_a_word_longer_than_its_column_is_cut_at_the_edge() -> None:
    assert wrap_cell("see http://example.test/a/very/long/path now", 12) == [
        "see", "http://examp", "le.test/a/ve", "ry/long/path", "now"]
    assert wrap_cell("short", 12) == ["short"]
    assert wrap_cell("名前名前名前", 5) == ["名前", "名前", "名前"]


def test_rows_must_match_the_columns() -> None:
    with pytest.raises(ValueError, match="one cell per column"):
        layout(COLUMNS, [("f1",)], 80)


def test_the_width_is_columns_else_80_when_stdout_is_no_terminal() -> None:
    program = "from sandport.cli.table import terminal_width; print(terminal_width())"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    for extra, expected in (({}, "80"), ({"COLUMNS": "132"}, "132"),
                            ({"COLUMNS": "wide"}, "80")):
        r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                           env={**env, **extra}, timeout=60, check=True)
        assert r.stdout.strip() == expected, (extra, r.stdout)
    assert terminal_width() > 0
