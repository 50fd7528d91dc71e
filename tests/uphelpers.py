"""`sandport up` as a subprocess, as a user runs it: the `Up` helper and its fixture.

A test module uses it with ``from uphelpers import up_factory  # noqa: F401``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import remove_gateway_leftovers, require_programs, require_root, test_net_names

SANDPORT = [sys.executable, "-m", "sandport"]
READY_TIMEOUT = 60


class Up:
    """A `sandport up` subprocess with its own state dir, bridge and subnet."""

    def __init__(self, state_dir: Path, *extra: str, bridge: str | None = None,
                 subnet: str | None = None, env: dict[str, str] | None = None) -> None:
        names = test_net_names()
        self.bridge = bridge or names[0]
        self.subnet = subnet or str(names[1])
        self.state_dir = state_dir
        self.argv = [*SANDPORT, "up", "--listen", "127.0.0.1:0", "--vnc-port", "0",
                     "--state-dir", str(state_dir), "--bridge", self.bridge,
                     "--subnet", self.subnet, *extra]
        self.seen_stderr = ""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)

    def wait_ready(self) -> dict[str, Any]:
        """Read stdout until the SANDPORT-READY line; fail with stderr if it never comes."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("SANDPORT-READY "):
                return dict(json.loads(line.split(" ", 1)[1]))
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        _, stderr = self.proc.communicate(timeout=10)
        raise AssertionError(f"no SANDPORT-READY line; stderr:\n{stderr}")

    def wait_http(self) -> None:
        """Wait until the gateway logs that its HTTP port is up (no --demo)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.seen_stderr += line
            if "Press Ctrl-C" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"gateway did not come up (exit {self.proc.poll()}); "
                             f"stderr:\n{self.seen_stderr}")

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            _, stderr = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, stderr = self.proc.communicate()
            raise AssertionError(f"gateway did not stop within 30 s:\n{stderr}") from None
        return self.proc.returncode, self.seen_stderr + stderr


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator[Any]:
    require_root()
    require_programs("Xvnc", "openbox", "xsetroot", "xmessage")
    started: list[Up] = []

    def make(*extra: str, **kw: Any) -> Up:
        up = Up(kw.pop("state_dir", tmp_path / "state"), *extra, **kw)
        started.append(up)
        return up

    yield make
    for up in started:  # a failed test must not leave a gateway or its sandboxes behind
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.communicate()
        remove_gateway_leftovers(bridge=up.bridge, state_dir=up.state_dir)
