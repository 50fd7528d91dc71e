"""The short run of `make fuzz`: every fuzz target over its whole seed corpus, then a few
thousand coverage-guided inputs each under atheris (``fuzz/harness.py``).

The corpus (``fuzz/corpus/<target>/``) holds the unit tests' byte tables and the
reproducers (``crash-*``) of the bugs the fuzzer found; replaying it in-process gives a
plain traceback when a parser or an invariant breaks. The atheris run is the same process
`make fuzz` runs a million times per target, cut short.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from conftest import require

pytestmark = pytest.mark.unit

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
SHORT_RUNS = 3000


def _load_targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sandport_fuzz_targets", FUZZ / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGETS: dict[str, Callable[[bytes], None]] = _load_targets().TARGETS


@pytest.fixture
def quiet_token_log() -> Iterator[None]:
    """A skipped token-file line logs a warning; hundreds of them are only noise here."""
    logger = logging.getLogger("sandport.bridge.targets")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("quiet_token_log")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_seed_corpus_replays_clean(target: str) -> None:
    files = sorted((FUZZ / "corpus" / target).iterdir())
    assert files, f"fuzz/corpus/{target}/ is empty"
    for path in files:
        try:
            TARGETS[target](path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"fuzz/corpus/{target}/{path.name}: {exc!r}") from exc


def test_every_target_has_a_corpus_and_make_fuzz_runs_them_all() -> None:
    assert sorted(p.name for p in (FUZZ / "corpus").iterdir()) == sorted(TARGETS)
    run = (FUZZ / "run.py").read_text()
    assert all(f'"{t}"' in run for t in TARGETS)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_coverage_guided_run_finds_nothing(target: str, tmp_path: Path) -> None:
    require(importlib.util.find_spec("atheris") is not None, "the fuzzer atheris",
            "make setup (pip install atheris)")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "harness.py"), target, f"-runs={SHORT_RUNS}",
         "-timeout=20", "-max_len=4096", "-seed=1", f"-artifact_prefix={tmp_path}/",
         str(tmp_path),
         str(FUZZ / "corpus" / target)],
        capture_output=True, text=True, timeout=240, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{target}: exit {proc.returncode}\n" + "\n".join(
        log.splitlines()[-30:])
    assert f"Done {SHORT_RUNS} runs" in log, log[-2000:]
