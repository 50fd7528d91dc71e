"""One atheris (libFuzzer) process for one target of ``fuzz/targets.py``.

    .venv/bin/python fuzz/harness.py TARGET [libFuzzer flags] [CORPUS_DIR ...]

sandport's modules are instrumented for coverage as they are imported; the flags and
directories are libFuzzer's (``-runs=N``, ``-timeout=S``, ``-max_len=N``; new inputs go to
the first directory). An input that raises anything but the parser's documented rejection,
or breaks an invariant (`targets.FuzzFailure`), is a crash: libFuzzer writes it out
(``-artifact_prefix``) and exits non-zero; an input that runs past ``-timeout`` is a hang.
``fuzz/run.py`` runs every target this way for ``make fuzz``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
# A skipped token-file line is logged as a warning: a million of them is only noise.
logging.disable(logging.CRITICAL)

with atheris.instrument_imports(include=["sandport"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        print(f"usage: harness.py TARGET [libFuzzer flags] [CORPUS_DIR ...]\n"
              f"targets: {' '.join(targets.TARGETS)}", file=sys.stderr)
        sys.exit(2)
    check = targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
