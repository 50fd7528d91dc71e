"""Every ``--help`` of the ``sandport`` command fits a terminal of 80 and of 120 columns.

Each command and subcommand of the typer app (found by walking it, so a new command is
checked without touching this file) renders its help at both widths, the way a person sees
it: ``COLUMNS`` set, no colours. What a person must never see:

- a line wider than the terminal, or a cell cut short with ``…``;
- a panel whose border is broken (a box line that starts with a border character and
  does not end with the matching one);
- a sentence broken by a hard line break: rich fills every line of a paragraph up to its
  column, so when the next line's first word would still have fitted on a line that does
  not end a sentence, the break came from a newline in the source, not from rich;
- an example (an indented line) wrapped onto a second line;
- type clutter in place of a metavar: ``<bool>``, ``<int range>``, ``[0<=x<=65535]``,
  ``INTEGER RANGE``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import typer
import typer.rich_utils
from rich.cells import cell_len
from typer.core import TyperOption
from typer.testing import CliRunner

from sandport.cli import app

pytestmark = pytest.mark.unit

WIDTHS = (80, 120)
BORDERS = {"│": "│", "╭": "╮", "╰": "╯"}
SENTENCE_END = (".", ":", ";", "!", "?")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CLUTTER = re.compile(r"<(?:bool|str|int|float|path|text|list\[\w+\])(?: range)?>"
                     r"|\[?-?[\d.]*<=x(?:<=[\d.]+)?\]?|\bx>=[\d.]+"
                     r"|\b(?:INTEGER|FLOAT|BOOLEAN|TEXT)(?: RANGE)?\b")


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every command under ``command``, itself included."""
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def render(path: tuple[str, ...], width: int) -> str:
    """``sandport PATH --help`` as a terminal ``width`` columns wide shows it."""
    # typer reads TERMINAL_WIDTH once, at import: a value from the caller's shell must not
    # decide the width here.
    with mock.patch.object(typer.rich_utils, "MAX_WIDTH", None):
        result = CliRunner().invoke(app, [*path, "--help"], prog_name="sandport",
                                    env={"COLUMNS": str(width), "TERM": "dumb",
                                         "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


def _first_word(text: str) -> str:
    return text.strip().split(" ", 1)[0]


def _hard_break(line: str, right: int, following: str) -> bool:
    """Whether ``following`` (the next line of the same text column, which ends at
    ``right``) could have started on ``line``: then rich did not break there."""
    text = line[:right].rstrip()
    if not text.strip() or text.endswith(SENTENCE_END) or not following.strip():
        return False
    return cell_len(text) + 1 + cell_len(_first_word(following)) <= right


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def problems(text: str, width: int) -> list[str]:
    """What is wrong with a rendered help, one line per finding (empty: it reads well)."""
    found: list[str] = []
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if cell_len(line) > width:
            found.append(f"line {n} is {cell_len(line)} columns wide: {line!r}")
        if "…" in line:
            found.append(f"line {n} is cut short: {line!r}")
        if CLUTTER.search(line):
            found.append(f"line {n} shows a type instead of a metavar: {line!r}")
        stripped = line.rstrip()
        if stripped[:1] in BORDERS and not stripped.endswith(BORDERS[stripped[0]]):
            found.append(f"line {n} breaks its panel's border: {line!r}")
    for n, (line, nxt) in enumerate(itertools.pairwise(lines), 1):
        if line.startswith("│") and nxt.startswith("│"):
            # Inside a panel: the next line continues a text column if it starts with
            # blanks up to that column and holds one cell (no second run of text).
            right = len(nxt.rstrip()) - 2  # the border and the panel's padding
            column = _indent(nxt[1:]) + 1
            cell = nxt[column:right]
            continues = column > 2 and cell.strip() and "  " not in cell.strip()
            if continues and "  " not in line[column:right].strip() \
                    and _hard_break(line, right, cell):
                found.append(f"lines {n}-{n + 1} break a sentence by hand: {line.strip()!r} "
                             f"/ {nxt.strip()!r}")
        elif line.strip() and nxt.strip() and line[:1] == " " and nxt[:1] == " ":
            if _indent(line) > 1:  # an example or a usage line: verbatim, never wrapped
                if _indent(nxt) < _indent(line):
                    found.append(f"lines {n}-{n + 1} wrap an example: {line.strip()!r} / "
                                 f"{nxt.strip()!r}")
            elif _hard_break(line, width - 1, nxt):
                found.append(f"lines {n}-{n + 1} break a sentence by hand: {line.strip()!r} "
                             f"/ {nxt.strip()!r}")
    return found


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(("sandport", *p)))
def test_help_fits_the_terminal(path: tuple[str, ...], width: int) -> None:
    text = render(path, width)
    assert problems(text, width) == [], text


def test_every_option_that_takes_a_value_names_it() -> None:
    """The help shows an option's metavar and no type: without one, nothing says what
    the value is."""
    root = typer.main.get_command(app)
    for path in COMMANDS:
        command = root
        for name in path:
            command = command.commands[name]
        for param in command.params:
            if isinstance(param, TyperOption) and not param.is_flag and not param.hidden:
                assert param.metavar, f"sandport {' '.join(path)} {param.opts[0]}"


def test_every_command_is_walked() -> None:
    names = {" ".join(p) for p in COMMANDS}
    for name in ("", "up", "ws", "attach", "doctor", "sandbox create", "sandbox logs",
                 "token revoke", "forward list", "image build"):
        assert name in names


@pytest.mark.parametrize(
    ("text", "finding"),
    [
        (" Run the gateway in the foreground until Ctrl-C or SIGTERM, with a long line\n"
         " here.\n", ""),
        (" With --demo it creates one desktop sandbox (Xvnc + openbox in a network\n"
         " namespace),\n waits until VNC answers\n", "break a sentence"),
        ("   sudo sandport up --listen 0.0.0.0:8700 --subnet 10.201.5.0/24 --bridge\n"
         " sp-br5\n", "wrap an example"),
        ("│ --demo   <bool>   Also create one.  │\n", "a type instead"),
        ("│ --vnc-port   PORT   Host port [0<=x<=65535]  │\n", "a type instead"),
        ("│ --publish   SPEC   [HOSTIP:]HOSTPORT:GU…    │\n", "cut short"),
        ("╭─ Options ─────\n", "border"),
        ("│ --attach  NAME  The target's network   │\n"
         "│                 is checked.            │\n", ""),
        ("│ --attach  NAME  Front a VM or                │\n"
         "│                 container.                   │\n", "break a sentence"),
        ("x" * 81 + "\n", "columns wide"),
    ],
)
def test_the_checks_catch_what_they_claim(text: str, finding: str) -> None:
    found = problems(text, 80)
    if finding:
        assert any(finding in f for f in found), found
    else:
        assert found == []


def test_a_person_reads_up_and_attach_at_80_columns(tmp_path: Path) -> None:
    """The two longest helps, saved for reading (pytest keeps tmp_path)."""
    for name in ("up", "attach"):
        text = render((name,), 80)
        (tmp_path / f"{name}-help-80.txt").write_text(text)
        assert problems(text, 80) == []
        assert "Examples" in text
