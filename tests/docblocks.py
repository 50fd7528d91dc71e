"""The fenced code blocks of README.md and docs/*.md, and the markers that say how to take them.

A block is run by tests/integration/test_docs.py unless the line just above its opening
fence is one of these HTML comments (invisible on GitHub):

* ``<!-- not run: REASON -->``: the block is not run; REASON says why and which test
  covers it instead (a diagram, a QEMU image build, a guest of another manager ...).
* ``<!-- output: PRODUCER -->``: the block shows what PRODUCER prints; test_docs.py
  compares its shape (line by line, values left open) with what PRODUCER really prints.
  Only producers in :data:`OUTPUT_PRODUCERS` are known.

Blocks without a marker must be ``sh`` or ``python`` (the languages test_docs.py runs); any
other block without a marker, a marker without its reason or an unknown producer is a
problem (:func:`problems`), so a new block cannot slip in unrun and unexplained.
Pure: no I/O beyond reading the Markdown files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = ("sh", "python")
#: Output blocks test_docs.py knows how to compare, by the producer their marker names.
OUTPUT_PRODUCERS = ("sandport up --demo", "sandport doctor --json", "sandport forward list")
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|output)\s*:?(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """One fenced code block.

    Attributes:
        path: the Markdown file, relative to the repository root.
        line: the line number (1-based) of the opening fence.
        lang: the first word of the info string ("" for none).
        text: the block's content, fences excluded, ending with a newline.
        kind: ``run`` (no marker), ``not run`` or ``output``.
        reason: the marker's text (why not run, or the output's producer).
    """

    path: str
    line: int
    lang: str
    text: str
    kind: str
    reason: str

    @property
    def where(self) -> str:
        """``path:line`` for messages."""
        return f"{self.path}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parse(text: str, path: str = "<text>") -> list[Block]:
    """Every fenced block of the Markdown ``text``, with the marker above it.

    Raises:
        ValueError: a fence is never closed.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence)
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: the fence {fence} is never closed")
        i += 1
        marker = _MARKER.match(lines[start - 1]) if start else None
        info = opening["info"].strip()
        blocks.append(Block(path=path, line=start + 1, lang=info.split()[0] if info else "",
                            text="".join(f"{line}\n" for line in body),
                            kind=marker["kind"] if marker else "run",
                            reason=marker["reason"].strip() if marker else ""))
    return blocks


def parse_file(path: Path, root: Path = ROOT) -> list[Block]:
    """:func:`parse` of one Markdown file, named relative to ``root``."""
    return parse(path.read_text(), str(path.relative_to(root)))


def problems(blocks: list[Block]) -> list[str]:
    """What is wrong with the blocks' markers, one message each (none: all is well)."""
    found = []
    for block in blocks:
        if block.kind == "run" and block.lang not in RUNNABLE:
            found.append(f"{block.where}: a {block.lang or 'plain'} block is not run: make it "
                         f"{' or '.join(RUNNABLE)}, or put `<!-- not run: REASON -->` or "
                         "`<!-- output: PRODUCER -->` on the line above it")
        elif block.kind != "run" and not block.reason:
            found.append(f"{block.where}: the `{block.kind}` marker needs its reason")
        elif block.kind == "output" and block.reason not in OUTPUT_PRODUCERS:
            found.append(f"{block.where}: no check compares output of {block.reason!r} "
                         f"(known: {', '.join(OUTPUT_PRODUCERS)})")
    return found
