"""A proxy forward and its descriptor limit: raised at start, and every client served or
reset at once when it is reached.

A root gateway raises its own hard ``RLIMIT_NOFILE`` when its first relay starts (as
systemd's ``LimitNOFILE`` would) and says the number in its log. Then, cut to 300 (about
100 connections at two descriptors each) with a guest echo server behind one of its
forwards, the test opens far more idle connections than fit. Each one must either echo or
be reset/closed within :data:`ANSWER_WITHIN` seconds; one that says nothing for
:data:`HANG` seconds hangs in the relay's accept queue (what the relay did before it kept a
spare descriptor).
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

#: The gateway's descriptor limit (soft and hard) once its relay runs.
GATEWAY_NOFILE = 300
#: The limit a root gateway is started with (`prlimit --nofile=1024:4096`).
START_NOFILE = (1024, 4096)
#: What it raises the hard limit to: 2**20, or the kernel's ceiling if that is lower.
HARD_TARGET = 1 << 20
#: capability(7) number of CAP_SYS_RESOURCE (raising a hard rlimit needs it).
CAP_SYS_RESOURCE = 24
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


def _nofile(pid: int) -> tuple[int, int]:
    """Soft and hard ``Max open files`` of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def _forward(state: Path, port: int) -> dict[str, Any]:
    """The forward on ``port`` as `sandport forward list --json` shows it (the CLI)."""
    out = subprocess.run([*SANDPORT, "forward", "list", "--json", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return next(f for f in json.loads(out) if f["host"] == f"127.0.0.1:{port}")


def test_out_of_descriptors_clients_are_reset_at_once_and_accepting_goes_on(
        up_factory: Any, many_descriptors: None, tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = up_factory("--forward-mode", "proxy", state_dir=state)
    up.wait_http()
    api = Client.from_state_dir(state)
    port = free_port()
    sb = api.create_sandbox(publish=[f"127.0.0.1:{port}:7"])
    # The relays run (the gateway raised its limit when the first started): cut it now.
    resource.prlimit(up.proc.pid, resource.RLIMIT_NOFILE, (GATEWAY_NOFILE, GATEWAY_NOFILE))
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
        # Idle connections hold no splice pipe; none of them had to copy for want of one.
        assert (fwd["pipes"], fwd["fallbacks"]) == (0, 0), fwd
        for family in ("sandport_forward_pipes", "sandport_forward_copy_fallbacks_total"):
            held = [line for line in metrics
                    if line.startswith(f'{family}{{forward="{fwd["id"]}"')]
            assert [line.rsplit(" ", 1)[1] for line in held] == ["0"], (family, held)

        # All closed: the relay serves new clients again.
        deadline = time.monotonic() + 10
        while _forward(state, port)["active"] and time.monotonic() < deadline:
            time.sleep(0.1)
        again, _ = asyncio.run(_storm(port, 20))
        assert [o for o, _ in again] == ["echo"] * 20, again
    up.stop()
    # The burst is said in one line, not one per client.
    log = (state / LOG_FILE).read_text()
    assert 1 <= log.count(f"out of file descriptors (limit {GATEWAY_NOFILE}") <= 3, log[-3000:]


def _has_cap_sys_resource() -> bool:
    """Whether this process may raise a hard rlimit (``CAP_SYS_RESOURCE`` effective)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def test_root_gateway_raises_its_hard_descriptor_limit_and_says_so(
        up_factory: Any, tmp_path: Path) -> None:
    """Started with 1024:4096 (`prlimit --nofile=1024:4096`), a root gateway's first relay
    raises the hard limit to 2**20 (or fs.nr_open), the soft one with it, and its log says
    the number and what it fits. Where root lacks CAP_SYS_RESOURCE (a container) the
    kernel refuses: the gateway goes up to the hard limit and says why it stopped there."""
    state = tmp_path / "state"
    up = up_factory("--forward-mode", "proxy", state_dir=state)
    resource.prlimit(up.proc.pid, resource.RLIMIT_NOFILE, START_NOFILE)
    up.wait_http()
    assert _nofile(up.proc.pid) == START_NOFILE  # nothing raised before a relay runs
    api = Client.from_state_dir(state)
    sb = api.create_sandbox(publish=[f"127.0.0.1:{free_port()}:7"])
    assert any(f["mode"] == "proxy" for f in sb.doc["forwards"]), sb.doc["forwards"]
    want = min(HARD_TARGET, int(Path("/proc/sys/fs/nr_open").read_text()))
    may = _has_cap_sys_resource()
    got = _nofile(up.proc.pid)
    up.stop()
    log = (state / LOG_FILE).read_text()
    line = next((x for x in log.splitlines() if "descriptors: " in x), "")
    if may:
        assert got == (want, want)
        said = f"descriptors: {want} (hard limit raised from {START_NOFILE[1]}; about "
    else:
        assert got == (START_NOFILE[1], START_NOFILE[1])
        said = f"descriptors: {START_NOFILE[1]} (hard limit not raised to {want}: "
    assert said in line, log[-3000:]
    assert "connections at 2 each" in line, line
