"""Shared fixtures: capability checks, an isolated gateway per test module, measurements.

Every gateway a test starts has its own state dir, bridge (``sp-t<hex>``) and subnet
(a free /24 inside 10.201.0.0/16), so tests never touch a gateway someone runs on the
same machine, and test files can run in parallel (pytest-xdist, --dist loadfile).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
REQUIRE_ALL = os.environ.get("SANDPORT_REQUIRE") == "all"
MEASUREMENTS: list[str] = []


def require(ok: bool, what: str, install: str) -> None:
    """Fail (SANDPORT_REQUIRE=all, as in `make test`) or skip when a capability is missing."""
    if ok:
        return
    message = f"{what} is missing: {install}"
    if REQUIRE_ALL:
        pytest.fail(f"{message} (SANDPORT_REQUIRE=all: a missing capability is a failure)")
    pytest.skip(f"{message} (set SANDPORT_REQUIRE=all to make this a failure)")


def require_root() -> None:
    """Namespaces, veth and bridges need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)."""
    require(os.geteuid() == 0, "root (CAP_NET_ADMIN + CAP_SYS_ADMIN)", "run the tests as root")


def require_programs(*names: str) -> None:
    """Each program must be on PATH; the message names the Debian package."""
    from sandport.preflight import PROGRAMS

    for name in names:
        package = PROGRAMS.get(name, {"chromium": "chromium", "chromedriver": "chromium-driver",
                                      "x11vnc": "x11vnc", "nft": "nftables"}.get(name, name))
        require(shutil.which(name) is not None, f"program {name}", f"apt-get install {package}")


def record(line: str) -> None:
    """Keep a measured figure for the end-of-run summary."""
    MEASUREMENTS.append(line)
    print(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/unit is a unit test (`make test-unit`), marked or not."""
    unit = Path(__file__).parent / "unit"
    for item in items:
        if unit in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.unit)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures tests measured (ready times, first-frame times)."""
    lines = list(MEASUREMENTS)
    # Under xdist the workers' figures come back as user properties.
    for report in terminalreporter.stats.get("passed", []):
        lines += [str(v) for k, v in getattr(report, "user_properties", []) if k == "measured"]
    if lines:
        terminalreporter.section("measured")
        for line in sorted(set(lines)):
            terminalreporter.write_line(line)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         check=False).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return nets


#: 10.201.100.0/24 - 10.201.239.0/24, less the /24s tests pick by themselves:
#: 200-209 (test_net_inspect); 240 and up are fixed subnets of single tests
#: (usernet 240/241, images 250, remote hosts 251, bench 252).
_TEST_OCTETS = [o for o in range(100, 240) if not 200 <= o <= 209]
_handed_out: list[int] = []  # this process's recent subnets, newest last


def free_test_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.201.100.0-10.201.239.0 that no interface uses (test pool range).

    A subnet only shows as used once its bridge exists, which is after the gateway
    started: each xdist worker therefore draws from its own slice of the range, and a
    process never hands out a subnet it handed out recently (a test may pick two before
    it starts either gateway).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    mine = [o for o in _TEST_OCTETS if o % count == index % count]
    used = _used_networks()
    free = [o for o in mine if o not in _handed_out[-8:] and not any(
        ipaddress.IPv4Network(f"10.201.{o}.0/24").overlaps(n) for n in used)]
    if not free:
        raise RuntimeError(f"no free /24 in 10.201.100.0-10.201.239.0 for {worker}")
    octet = free[secrets.randbelow(len(free))]
    _handed_out.append(octet)
    return ipaddress.IPv4Network(f"10.201.{octet}.0/24")


def test_net_names() -> tuple[str, ipaddress.IPv4Network]:
    """A unique bridge name and a free subnet for one test gateway."""
    return f"sp-t{secrets.token_hex(3)}", free_test_subnet()


test_net_names.__test__ = False  # type: ignore[attr-defined]


class LoopThread:
    """An event loop (uvloop) in a background thread, for sync tests of async code."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coro`` on the loop and return its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": lambda: __import__("uvloop").new_event_loop(),
    "asyncio": asyncio.new_event_loop,
}


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Run a coroutine function on a fresh loop of each kind (uvloop, asyncio), bounded.

    The two loops differ where it matters to a relay (uvloop ignores pause_reading() in
    connection_made()), so data-plane tests run on both.
    """
    factory = LOOP_FACTORIES[request.param]

    def _run(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        async def main() -> T:
            async with asyncio.timeout(timeout):
                return await fn()

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main())

    return _run


async def eventually(cond: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (bounded) until ``cond()`` holds."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def eventually_sync(cond: Callable[[], bool], within: float = 3.0) -> None:
    """Wait (bounded, blocking) until ``cond()`` holds."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


VM_SLOTS = 2  # QEMU VMs at once across every test worker: these machines have 2 cores


@contextlib.contextmanager
def vm_slot(timeout: float = 600.0) -> Iterator[None]:
    """Hold one of :data:`VM_SLOTS` places for a QEMU VM for the ``with`` block.

    Test files run in parallel (xdist); a ``flock`` on a shared file per slot keeps the
    VMs that run at once to two, whichever files they come from.
    """
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        for i in range(VM_SLOTS):
            lock = open(f"/tmp/sandport-test-vm-slot-{i}.lock", "a")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            try:
                yield
            finally:
                lock.close()
            return
        assert time.monotonic() < deadline, f"no VM slot free within {timeout:g} s"
        time.sleep(0.2)


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    """A background event loop shared by one test module."""
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def gateway_factory(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Any]]:
    """Start isolated gateways on the module's loop; all are stopped at module end."""
    from sandport.config import GatewayConfig, NetConfig
    from sandport.control.gateway import Gateway
    from sandport.errors import NetworkConflict

    require_root()
    require_programs("Xvnc", "openbox", "xsetroot", "xmessage", "crun")
    started: list[Gateway] = []

    def make(**overrides: Any) -> Gateway:
        last: Exception | None = None
        for _ in range(5):  # a parallel worker may take the same random subnet first
            bridge, subnet = test_net_names()
            settings: dict[str, Any] = {
                "listen_host": "127.0.0.1", "listen_port": 0,
                "state_dir": tmp_path_factory.mktemp("state"),
                "net": NetConfig(bridge=bridge, subnet=subnet), "ready_timeout": 60,
            }
            config = GatewayConfig(**{**settings, **overrides})
            gw = Gateway(config)
            try:
                loop_thread.run(gw.start())
            except NetworkConflict as exc:
                last = exc
                continue
            started.append(gw)
            return gw
        raise RuntimeError(f"could not find a free test subnet: {last}")

    yield make
    for gw in started:
        loop_thread.run(gw.stop())


@pytest.fixture(scope="session", autouse=True)
def _stop_vncdotool_reactor() -> Iterator[None]:
    """vncdotool runs one Twisted reactor per process; stop it once at the very end."""
    yield
    import sys

    if "vncdotool.api" in sys.modules:
        sys.modules["vncdotool.api"].shutdown()


def sandport_leftovers(
    *, bridge: str | None, sandbox_ids: list[str], state_dir: Path,
    ignore_pids: tuple[int, ...] = (),
) -> list[str]:
    """Everything of one gateway still on the machine: netns, links, nft table, processes.

    ``bridge=None`` skips the bridge (a running gateway keeps it).
    """
    left: list[str] = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=False).stdout
    for sid in sandbox_ids:
        if f"sp-{sid}" in netns:
            left.append(f"netns sp-{sid}")
        if f"sp-{sid}-v" in links:
            left.append(f"link sp-{sid}-v")
    if bridge is not None and (f" {bridge}:" in links or f" {bridge}@" in links):
        left.append(f"bridge {bridge}")
    if bridge is not None and shutil.which("nft"):
        # The table is shared by every gateway on the host (tests run in parallel):
        # what this gateway leaves are the chains named after its bridge.
        from sandport.net import antispoof
        from sandport.net.nft import own_chains

        left += [f"nft chain {c}" for c in own_chains(bridge)]
        left += [f"nft bridge chain {c}" for c in antispoof.own_chains(bridge)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or int(pid) in ignore_pids:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        tags = {f"SANDPORT_SANDBOX_ID={sid}".encode() for sid in sandbox_ids}
        if str(state_dir) in cmdline or tags.intersection(environ):
            left.append(f"process {pid}: {cmdline[:120]}")
    return left


@pytest.fixture
def leftovers() -> Callable[..., list[str]]:
    """The leftover check: ``leftovers(bridge=..., sandbox_ids=..., state_dir=...)``."""
    return sandport_leftovers


def remove_gateway_leftovers(*, bridge: str, state_dir: Path) -> None:
    """Remove what a SIGKILLed test gateway left: its sandboxes' processes, netns, bridge.

    A crashed gateway's leftovers are normally removed by the next start on the same
    state dir; a test that gives up on a gateway has no next start, so it cleans here.
    """
    import signal
    import sqlite3

    ids: list[str] = []
    db = state_dir / "sandport.db"
    if db.exists():
        with contextlib.closing(sqlite3.connect(db)) as conn:
            ids = [row[0] for row in conn.execute("SELECT id FROM sandboxes")]
    for pid_line in sandport_leftovers(bridge=None, sandbox_ids=ids, state_dir=state_dir):
        if pid_line.startswith("process "):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_line.split()[1].rstrip(":")), signal.SIGKILL)
    from sandport.sandbox import crun

    runtime = crun.Crun(shutil.which("crun") or "crun", crun.state_root(state_dir))
    for sid in ids:
        if (runtime.root / f"sp-{sid}").exists():  # its guests' container state
            subprocess.run(runtime.command("delete", "--force", f"sp-{sid}"),
                           capture_output=True, check=False)
        crun.release_ids(f"sp-{sid}")
        subprocess.run(["ip", "netns", "del", f"sp-{sid}"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", f"sp-{sid}-v"], capture_output=True, check=False)
    with contextlib.suppress(OSError):  # its crun root, once no container is left in it
        runtime.root.rmdir()
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
    # Its bridge lock and sockets in /run/sandport (a start on the bridge would reuse them).
    for leftover in Path("/run/sandport").glob(f"bridge-{bridge}.*"):
        leftover.unlink(missing_ok=True)
    if shutil.which("nft"):
        from sandport.net import antispoof, nft

        with contextlib.suppress(Exception):
            nft.remove(bridge)
        with contextlib.suppress(Exception):
            antispoof.remove(bridge)
