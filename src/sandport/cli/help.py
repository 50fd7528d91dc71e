"""Help that fits a terminal: the typer classes every ``sandport`` command is made of.

Owns how help is rendered (paragraphs, metavars, no type clutter); ``HelpTyper`` is the
app class every command module uses. Must not touch what a command does, its options or
its messages: those live in the command modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

if TYPE_CHECKING:  # the class TyperCommand and TyperGroup share (typer vendors click)
    from typer._click.core import Command as _ClickCommand
else:
    _ClickCommand = object


# Help that fits a terminal. Typer (0.29) renders help with rich, which wraps each
# paragraph to the terminal's width but keeps the newlines of a docstring's later
# paragraphs, so a docstring wrapped at 100 columns in the source showed sentences broken
# in the middle; and it gave every parameter a type column (`<bool>`, `<int range>
# [0<=x<=65535]`, `<str>`) that left the help text a third of 80 columns. So every
# command and group is made by the classes below: a paragraph becomes one line (rich
# wraps it), indented lines (examples) stay as they are; its parameters become
# _HelpOption and _HelpArgument, which change only what the help shows: an option its
# metavar (every option that takes a value names one) and nothing for a flag, an argument
# its name. Flags have no --no-X form (it cost two more columns). Typer dedents a help's
# later paragraphs as one block, so examples keep their indent only after a paragraph of
# prose (not "Examples:" alone). tests/unit/test_cli_help.py renders every help at 80
# and 120 columns.


def _one_line_paragraphs(text: str | None) -> str | None:
    """``text`` with each paragraph on one line, except blocks of indented lines."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if all(line.startswith(" ") for line in p.splitlines())
                       else " ".join(line.strip() for line in p.splitlines())
                       for p in paragraphs)


class _HelpOption(TyperOption):
    """An option whose help shows its metavar; a flag's nothing; no range (its help
    says what fits, and a bad value is refused with the range)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None if self.is_flag else self.metavar

    def _get_number_range_help_str(self) -> str | None:
        return None


class _HelpArgument(TyperArgument):
    """An argument whose help shows its name (its metavar) and no type."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _FitsTerminal(_ClickCommand):
    """What a command and a group share: their help fits a terminal (see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _one_line_paragraphs(self.help)
        for param in self.params:
            if isinstance(param, TyperOption):
                param.__class__ = _HelpOption
            elif isinstance(param, TyperArgument):
                param.__class__ = _HelpArgument

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # made on first use
        if isinstance(option, TyperOption):
            option.__class__ = _HelpOption
        return option


class _HelpCommand(_FitsTerminal, TyperCommand):
    """A command whose help fits a terminal."""


#: The base of a command class of its own (``command(cls=...)``).
HelpCommand = _HelpCommand


class _HelpGroup(_FitsTerminal, TyperGroup):
    """A group whose help fits a terminal."""


class HelpTyper(typer.Typer):
    """A typer app whose commands and groups fit their help to a terminal."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=_HelpGroup, no_args_is_help=True, **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(*args, cls=cls or _HelpCommand, **kwargs)
