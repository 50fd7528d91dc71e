"""The code blocks of README.md and docs/*.md: each is run by tests/integration/test_docs.py
or says, on the line above it, why not (tests/docblocks.py has the convention)."""

from __future__ import annotations

from pathlib import Path

import pytest

from docblocks import OUTPUT_PRODUCERS, doc_files, parse, parse_file, problems

pytestmark = pytest.mark.unit

SAMPLE = """# Title

```sh
sandport forward list
```

<!-- not run: a diagram -->
```
a --> b
```

<!-- output: sandport up --demo -->
````text
```nested```
````
<!--not run-->
```python
print(1)
```

    ```sh
    indented four: code, not a fence
    ```
"""


def test_blocks_their_languages_and_markers() -> None:
    blocks = parse(SAMPLE, "x.md")
    assert [(b.line, b.lang, b.kind, b.reason) for b in blocks] == [
        (3, "sh", "run", ""),
        (8, "", "not run", "a diagram"),
        (13, "text", "output", "sandport up --demo"),
        (17, "python", "not run", ""),
    ]
    assert blocks[0].text == "sandport forward list\n"
    assert blocks[2].text == "```nested```\n"


def test_what_is_a_problem() -> None:
    blocks = parse(SAMPLE + "\n```json\n{}\n```\n<!-- output: cat -->\n```\nx\n```\n", "x.md")
    assert problems(blocks) == [
        "x.md:17: the `not run` marker needs its reason",
        "x.md:25: a json block is not run: make it sh or python, or put "
        "`<!-- not run: REASON -->` or `<!-- output: PRODUCER -->` on the line above it",
        f"x.md:29: no check compares output of 'cat' (known: {', '.join(OUTPUT_PRODUCERS)})",
    ]


def test_an_unclosed_fence_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"x\.md:1: the fence ``` is never closed"):
        parse("```sh\nls\n", "x.md")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_every_block_of_the_docs_is_run_or_says_why_not(path: Path) -> None:
    assert problems(parse_file(path)) == []
