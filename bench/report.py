"""What both benches share when they report: formatting, medians, ratios, machine facts.

``first_line`` runs a command for one line of version text; ``machine_info`` collects what
the figures depend on (CPU, kernel, Python, package versions, git commit, load at start).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted, or an em dash when there is none."""
    return "—" if value is None else format(value, spec)


def median(values: list[float | None]) -> float | None:
    """The median of the values that exist."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` when both exist and ``b`` is not zero."""
    return a / b if a is not None and b else None


def first_line(argv: list[str]) -> str | None:
    """The first non-empty line a command prints (stdout, then stderr), or None."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in (r.stdout + r.stderr).splitlines()
             if ln.strip() and not ln.startswith("Failed to send")]  # pasta's syslog noise
    return lines[0].strip() if lines else None


def package_version(name: str) -> str | None:
    """The installed Debian package's version."""
    return first_line(["dpkg-query", "-W", "-f", "${Version}", name])


def machine_info(dists: tuple[str, ...], **tools: str | None) -> dict[str, Any]:
    """What the figures depend on: the machine, ``dists`` (Python distributions) and
    ``tools`` (versions the caller looked up)."""
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        **tools,
        "git_commit": first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "git_dirty": bool(first_line(["git", "-C", str(REPO), "status", "--porcelain",
                                      "--", "src"])),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def to_json(result: dict[str, Any]) -> str:
    """Indented JSON, with lists of plain numbers (samples) kept on one line."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]",
                  lambda m: "[" + ",".join(v.strip() for v in m.group(1).split(",")) + "]",
                  text) + "\n"
