"""A proxy forward out of file descriptors: every client is served or reset at once.

A real gateway (`sandport up --forward-mode proxy`) runs with ``RLIMIT_NOFILE`` 300 (about
40 spliced connections); a guest echo server sits behind one of its forwards. The test opens
far more idle connections than fit. Each one must either echo or be reset/closed within
:data:`ANSWER_WITHIN` seconds; one that says nothing for :data:`HANG` seconds hangs in the
relay's accept queue (what the relay did before it kept a spare descriptor).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from nethelpers import ECHO_SERVER, free_port, guest_server
from sandport.cli.common import LOG_FILE
from sandport.client import Client
from uphelpers import SANDPORT, up_factory  # noqa: F401

pytestmark = pytest.mark.integration

#: The gateway's descriptor limit (soft and hard).
GATEWAY_NOFILE = 300
#: Idle connections the test opens, in batches of :data:`BATCH`.
CLIENTS = 400
BATCH = 50
#: An answer (echo, reset or close) must come within this many seconds...
ANSWER_WITHIN = 2.0
#: ...and a client that hears nothing for this long hangs.
HANG = 5.0


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This process may hold every client socket (its soft limit raised to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * CLIENTS
    require(hard == resource.RLIM_INFINITY or hard >= need,
            f"a hard RLIMIT_NOFILE of {need} for the test's own clients",
            f"raise it (`ulimit -Hn {need}`, systemd LimitNOFILE={need})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _client(port: int, held: list[asyncio.StreamWriter]) -> tuple[str, float]:
    """One client: ("echo" | "reset" | "hang", seconds until the answer)."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(HANG):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"ping\n")
                data = await reader.readexactly(5)
            except (OSError, asyncio.IncompleteReadError):
                writer.close()
                return "reset", time.monotonic() - t0
    except TimeoutError:
        return "hang", time.monotonic() - t0
    except OSError:
        return "reset", time.monotonic() - t0
    assert data == b"ping\n"
    held.append(writer)  # stays open, idle: it keeps its descriptors in the relay
    return "echo", time.monotonic() - t0


async def _storm(port: int, clients: int) -> tuple[list[tuple[str, float]], int]:
    """Open ``clients`` connections in batches and hold the served ones; close them all."""
    held: list[asyncio.StreamWriter] = []
    outcomes: list[tuple[str, float]] = []
    try:
        for start in range(0, clients, BATCH):
            outcomes += await asyncio.gather(
                *(_client(port, held) for _ in range(min(BATCH, clients - start))))
    finally:
        for writer in held:
            writer.close()
    return outcomes, len(held)


def _forward(state: Path, port: int) -> dict[str, Any]:
    """The forward on ``port`` as `sandport forward list --json` shows it (the CLI)."""
    out = subprocess.run([*SANDPORT, "forward", "list", "--json", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return next(f for f in json.loads(out) if f["host"] == f"127.0.0.1:{port}")


def test_out_of_descriptors_clients_are_reset_at_once_and_accepting_goes_on(
        up_factory: Any, many_descriptors: None, tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = up_factory("--forward-mode", "proxy", state_dir=state)
    resource.prlimit(up.proc.pid, resource.RLIMIT_NOFILE, (GATEWAY_NOFILE, GATEWAY_NOFILE))
    up.wait_http()
    api = Client.from_state_dir(state)
    port = free_port()
    sb = api.create_sandbox(publish=[f"127.0.0.1:{port}:7"])
    with guest_server(f"sp-{sb.id}", ECHO_SERVER, os.devnull):
        outcomes, served = asyncio.run(_storm(port, CLIENTS))
        kinds = {k: sum(1 for o, _ in outcomes if o == k) for k in ("echo", "reset", "hang")}
        slow = sorted(t for o, t in outcomes if o == "reset" and t > ANSWER_WITHIN)
        assert kinds["hang"] == 0, f"{kinds}: clients hung in the relay's accept queue"
        assert slow == [], f"{kinds}: resets after {slow[:5]} s"
        # The limit was reached (some clients were reset) and the first ones were served.
        assert kinds["reset"] > 0 and kinds["echo"] == served > 0, kinds

        # Counted under their reason, in forward list (the CLI) and /metrics.
        fwd = _forward(state, port)
        assert fwd["failures"]["descriptors"] == kinds["reset"], (kinds, fwd["failures"])
        assert fwd["total"] >= CLIENTS, fwd
        metrics = api.call("GET", "/metrics")[0].decode().splitlines()
        counted = [line for line in metrics if line.startswith(
            f'sandport_forward_failures_total{{forward="{fwd["id"]}"')
            and 'reason="descriptors"' in line]
        assert [line.rsplit(" ", 1)[1] for line in counted] == [str(kinds["reset"])], counted

        # All closed: the relay serves new clients again.
        deadline = time.monotonic() + 10
        while _forward(state, port)["active"] and time.monotonic() < deadline:
            time.sleep(0.1)
        again, _ = asyncio.run(_storm(port, 20))
        assert [o for o, _ in again] == ["echo"] * 20, again
    up.stop()
    # The limit is said at start, and the burst in one line, not one per client.
    log = (state / LOG_FILE).read_text()
    assert f"descriptors: {GATEWAY_NOFILE} (about {GATEWAY_NOFILE // 6} spliced" in log
    assert 1 <= log.count(f"out of file descriptors (limit {GATEWAY_NOFILE}") <= 3, log[-3000:]
