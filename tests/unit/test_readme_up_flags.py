"""README's sentence "`sandport up --help` lists every flag: ..." names exactly the flags
``sandport up`` has: a newcomer reading it neither looks for a flag that is gone nor misses
one (``--demo``, ``--attach-subnet``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from sandport.cli import app

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_lists_every_flag_of_sandport_up_and_no_other() -> None:
    text = README.read_text()
    start = text.index("`sandport up --help` lists every flag:")
    sentence = text[start:text.index(".\n", start)].split(":", 1)[1]
    named = {flag for item in re.findall(r"`([^`]+)`", sentence) for flag in item.split("/")}
    up = typer.main.get_command(app).commands["up"]  # type: ignore[attr-defined]
    real = {opt for param in up.params if not getattr(param, "hidden", False)
            for opt in param.opts if opt.startswith("-")}
    assert named == real, (f"README names {sorted(named - real)} that `sandport up` lacks "
                           f"and misses {sorted(real - named)}")
