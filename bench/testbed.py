"""The bench's testbed: a namespace with the guest services, the peers, and their teardown.

::

    host netns                                          sp-bench-<hex>
    ──────────                                          ──────────────
    client ─► 127.0.0.1:P ─► peer ─► sp-bench-<hex>h ══ sp-bench-<hex>g ─► iperf3 -s :5201
              (kernel DNAT, sandport proxy,   10.201.x.1/30    10.201.x.2/30   byteserver :5202
               socat, pasta)
    client ─────────────────────────────────────────────► (direct: no peer)

Everything the bench creates carries the prefix ``sp-bench-`` (namespace, veth, nft chains
``pre-/out-/post-sp-bench-<hex>h``), and every host process it starts is recorded in a state
file under :data:`STATE_DIR`, so :func:`cleanup_leftovers` can remove what a SIGKILLed run
left. Bench code, not product: it shells out to ``ip`` and ``nft``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sandport.net import nft

PREFIX = "sp-bench-"
LOGDIR_PREFIX = "sp-bench-logs-"  # the run's temporary directory for process logs
STATE_DIR = Path("/run/sandport-bench")
SUPERNET = ipaddress.IPv4Network("10.201.0.0/16")
FIRST_SUBNET = ipaddress.IPv4Network("10.201.250.0/30")
IPERF_PORT = 5201
BYTE_PORT = 5202
BENCH_DIR = Path(__file__).resolve().parent
CMD_TIMEOUT = 15.0
READY_TIMEOUT = 10.0
STOP_GRACE = 3.0
PROBE_TIMEOUT = 1.0
_NFT_CHAIN = re.compile(r"^(?:pre|out|post)-(sp-bench-[0-9a-f]{4}h)$")

_t0 = time.monotonic()


def elapsed() -> float:
    """Seconds since the bench started."""
    return time.monotonic() - _t0


def progress(msg: str) -> None:
    """A progress line on stderr, with seconds since the bench started."""
    print(f"[{elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # Only the first signal interrupts; later ones must not cut the teardown short.
    for sig in HANDLED_SIGNALS:
        if signal.getsignal(sig) is _raise_interrupt:
            signal.signal(sig, _teardown_in_progress)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _teardown_in_progress(signum: int, frame: FrameType | None) -> None:
    progress(f"{signal.Signals(signum).name} ignored: tearing down, please wait")


def interrupt_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, once.

    SIGINT too: a shell starts background jobs with SIGINT ignored, and a run must still
    be stoppable by it. SIGHUP stays ignored under nohup.
    """
    for sig in HANDLED_SIGNALS:
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_interrupt)


def protect_teardown() -> None:
    """From now on those signals only say that the teardown is running.

    No signal may cut a teardown short (the processes it stops are in sessions of their
    own, so a second Ctrl-C reaches only the bench).
    """
    for sig in HANDLED_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _teardown_in_progress)


class BenchError(Exception):
    """Something the bench needs did not work; the message says what.

    ``status`` is the exit status it means: 1, or 2 when the machine cannot run it.
    """

    status = 1


def finish(body: Callable[[], Path | int | None], teardown: Callable[[], list[str]],
           failed: str = "bench failed") -> int:
    """Run a bench's ``body``, then always its ``teardown``; the exit status.

    ``body`` returns the result file it wrote (or an exit status of its own). An
    interrupt is 130, a :class:`BenchError` its ``status``, an error the teardown
    reports 1. From the teardown on, signals only say that it runs
    (:func:`protect_teardown`).
    """
    written: Path | int | None = None
    errors: list[str] = []
    try:
        written = body()
    except KeyboardInterrupt as exc:
        progress(f"interrupted ({exc or 'SIGINT'}); tearing down, no result written")
        return 130
    except BenchError as exc:
        progress(f"{failed}: {exc}")
        return exc.status
    finally:
        protect_teardown()
        progress("teardown ...")
        errors = teardown()
        for err in errors:
            progress(f"teardown: {err}")
    if isinstance(written, int):
        return written
    if written is not None:
        print(f"\nwrote {written}", flush=True)
    return 1 if errors else 0


def sh(argv: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
    """Run a short command, return its stdout; raise :class:`BenchError` with its stderr."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                           start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{' '.join(argv)}: {exc}") from exc
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def _json(argv: list[str]) -> list[dict[str, object]]:
    out = sh(argv, check=False).strip()
    if not out:
        return []
    data = json.loads(out)
    return data if isinstance(data, list) else []


# -- processes and CPU time ------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def starttime(pid: int) -> int | None:
    """When the process started (clock ticks after boot): with the pid, its identity, which
    an exec does not change and a recycled pid does not share."""
    fields = _stat(pid)
    return int(fields[19]) if fields is not None else None


def remove_recorded(state: dict[str, Any], log: Callable[[str], None]) -> None:
    """Kill the processes a run's state file recorded (if they are still the same
    programs: pid and start time) and remove its log directory."""
    for proc in state.get("procs", []):
        pid, cmd = proc.get("pid"), proc.get("argv")
        if isinstance(pid, int) and starttime(pid) == proc.get("starttime"):
            log(f"leftover: killing {cmd} (pid {pid})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    workdir = Path(str(state.get("workdir", "")))
    if workdir.name.startswith(LOGDIR_PREFIX) and workdir.is_dir():
        log(f"leftover: removing {workdir}")
        shutil.rmtree(workdir, ignore_errors=True)


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 100_000:  # bounded even if /proc changed under us
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of a process tree, reaped children included.

    A reaped child's time sits in its parent's cutime/cstime; a live one's in its own
    utime/stime. Summing utime+stime+cutime+cstime over the live tree counts each exactly
    once (socat forks one child per connection).
    """
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:  # fields[11:15] = utime stime cutime cstime
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


def host_cpu_seconds() -> float:
    """Busy CPU seconds of the whole host since boot, from /proc/stat (all but idle, iowait).

    guest and guest_nice are already part of user and nice, so they are not added again.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class Proc:
    """One process the bench started, in its own session (process group = its pid)."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        """Start it with stdout and stderr to its log file."""
        with open(self.log, "wb") as out:
            try:
                self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise BenchError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        return self

    @property
    def pid(self) -> int:
        """Its pid (it was started)."""
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        """Still running."""
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        """Its output so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of its output, without pasta's syslog noise, on one line."""
        keep = [ln for ln in self.log_text().splitlines()
                if ln.strip() and not ln.startswith("Failed to send")]
        return " | ".join(keep[-lines:])

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """Wait until its output matches ``pattern``; raise if it exits or times out."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.log_text())
            if m:
                return m
            if not self.alive():
                rc = self.popen.returncode if self.popen else None
                raise BenchError(f"{self.name} exited ({rc}): {self.log_tail()}")
            time.sleep(0.05)
        raise BenchError(f"{self.name}: not ready after {timeout:g} s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after :data:`STOP_GRACE`; reap it."""
        if self.popen is None or self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that left the group (none of ours do) would still be in the tree.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


# -- peers ------------------------------------------------------------------------------------

@dataclass
class Peer:
    """A way from the host to the guest services.

    Attributes:
        name: direct, kernel, proxy, socat or pasta.
        iperf: address the iperf3 client connects to.
        byte: address the connection-rate client connects to.
        procs: forwarder processes whose CPU time is the peer's (empty: no process).
        path: one line on how the bytes travel.
    """

    name: str
    iperf: tuple[str, int]
    byte: tuple[str, int]
    procs: list[Proc] = field(default_factory=list)
    path: str = ""

    def cpu_seconds(self) -> float:
        """CPU seconds of the forwarder processes (and their children) so far."""
        return sum(tree_cpu_seconds(p.pid) for p in self.procs if p.alive())

    def settle(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until the forwarders' per-connection children are gone, so their
        CPU time has been reaped into the parent's cutime/cstime."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(tree_pids(p.pid)) <= 1 for p in self.procs if p.alive()):
                return
            time.sleep(0.02)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def probe(addr: tuple[str, int], timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``addr`` answers like the byte server: connect, read one byte."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(addr, timeout=PROBE_TIMEOUT) as s:
                if s.recv(1):
                    return
                last = "closed without a byte"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{addr[0]}:{addr[1]} does not answer through this path: {last}")


# -- the testbed -------------------------------------------------------------------------------

def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the host's addresses and routes."""
    nets = []
    for link in _json(["ip", "-j", "-4", "addr"]):
        infos = link.get("addr_info", [])
        for info in infos if isinstance(infos, list) else []:
            if isinstance(info, dict) and "local" in info:
                nets.append(ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
                            .network)
    for route in _json(["ip", "-j", "-4", "route", "show", "table", "all"]):
        dst = str(route.get("dst", "default"))
        if dst != "default" and re.fullmatch(r"[\d.]+(/\d+)?", dst):
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    """The first /30 in 10.201.0.0/16, from 10.201.250.0/30 on, that nothing on the host uses."""
    used = used_networks()
    base = int(SUPERNET.network_address)
    first = int(FIRST_SUBNET.network_address) - base
    for i in range(SUPERNET.num_addresses // 4):
        net = ipaddress.IPv4Network((base + (first + 4 * i) % SUPERNET.num_addresses, 30))
        if not any(net.overlaps(u) for u in used):
            return net
    raise BenchError("no free /30 in 10.201.0.0/16")


def _owner_alive(state: dict[str, object]) -> bool:
    pid = state.get("owner_pid")
    return isinstance(pid, int) and pid != os.getpid() and \
        starttime(pid) == state.get("owner_starttime")


def cleanup_leftovers(log: Callable[[str], None]) -> None:
    """Remove what a crashed or killed bench run left: processes, namespaces, links, chains.

    Raises:
        BenchError: another bench run is still active (its state file's owner is alive).
    """
    states = sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []
    for path in states:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if _owner_alive(state):
            raise BenchError(f"another bench run is active (pid {state['owner_pid']}); "
                             "wait for it or stop it")
    # 1. Host processes of dead runs (forwarder, socat, pasta), if still the same programs.
    for path in states:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        remove_recorded(state, log)
        path.unlink(missing_ok=True)
    # 2. Namespaces: their processes first (guest servers), then the namespace.
    for ns in _json(["ip", "-j", "netns", "list"]):
        name = str(ns.get("name", ""))
        if name.startswith(PREFIX):
            log(f"leftover: deleting netns {name}")
            for pid in sh(["ip", "netns", "pids", name], check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh(["ip", "netns", "del", name], check=False)
    # 3. nft chains of a bench bridge (before the link: nft.remove looks them up by name).
    bridges = set()
    out = sh(["nft", "-j", "list", "table", nft.FAMILY, nft.TABLE], check=False).strip()
    if out:
        for item in json.loads(out).get("nftables", []):
            chain = item.get("chain") if isinstance(item, dict) else None
            if isinstance(chain, dict):
                m = _NFT_CHAIN.match(str(chain.get("name", "")))
                if m:
                    bridges.add(m.group(1))
    for bridge in sorted(bridges):
        log(f"leftover: removing nft chains of {bridge}")
        nft.remove(bridge)
    # 4. Links (a veth whose namespace is gone is gone too; this catches the rest).
    for link in _json(["ip", "-j", "link"]):
        name = str(link.get("ifname", ""))
        if name.startswith(PREFIX):
            log(f"leftover: deleting link {name}")
            sh(["ip", "link", "del", name], check=False)


class Testbed:
    """The namespace, veth pair, guest servers and peers of one bench run.

    ``create()`` builds, ``teardown()`` removes everything, in reverse order, and is safe to
    call after a partial ``create()`` and more than once.
    """

    def __init__(self, workdir: Path, log: Callable[[str], None]) -> None:
        self.tag = secrets.token_hex(2)
        self.ns = f"{PREFIX}{self.tag}"
        self.veth_host = f"{self.ns}h"
        self.veth_guest = f"{self.ns}g"
        self.workdir = workdir
        self.log = log
        self.state_file = STATE_DIR / f"{self.tag}.json"
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_ip = ""
        self.guest_ip = ""
        self.guest_procs: list[Proc] = []
        self.peer_procs: list[Proc] = []
        self.nft_applied = False

    # -- bookkeeping ------------------------------------------------------------------------

    def _record(self) -> None:
        """Write the state file: who owns the run and which host processes it started."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        procs = [{"pid": p.pid, "starttime": starttime(p.pid), "argv": " ".join(p.argv)}
                 for p in self.peer_procs + self.guest_procs if p.alive()]
        state = {"owner_pid": os.getpid(), "owner_starttime": starttime(os.getpid()),
                 "ns": self.ns, "workdir": str(self.workdir), "procs": procs}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _spawn(self, name: str, argv: list[str], *, guest: bool) -> Proc:
        proc = Proc(name, argv, self.workdir / f"{name}.log")
        (self.guest_procs if guest else self.peer_procs).append(proc)
        proc.start()
        self._record()
        return proc

    # -- build ------------------------------------------------------------------------------

    def create(self) -> None:
        """Namespace, veth pair with a free /30, and the guest servers, ready to serve."""
        self._record()
        self.subnet = pick_subnet()
        hosts = list(self.subnet.hosts())
        self.host_ip, self.guest_ip = str(hosts[0]), str(hosts[1])
        plen = self.subnet.prefixlen
        self.log(f"testbed: netns {self.ns}, {self.veth_host} {self.host_ip}/{plen} <-> "
                 f"{self.veth_guest} {self.guest_ip}/{plen}")
        sh(["ip", "netns", "add", self.ns])
        sh(["ip", "link", "add", self.veth_host, "type", "veth", "peer", "name",
            self.veth_guest, "netns", self.ns])
        sh(["ip", "addr", "add", f"{self.host_ip}/{plen}", "dev", self.veth_host])
        sh(["ip", "link", "set", self.veth_host, "up"])
        sh(["ip", "-n", self.ns, "addr", "add", f"{self.guest_ip}/{plen}", "dev",
            self.veth_guest])
        sh(["ip", "-n", self.ns, "link", "set", self.veth_guest, "up"])
        sh(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        self.start_guest_servers()

    def start_guest_servers(self) -> None:
        """iperf3 -s and the byte server inside the namespace (on every address, so the
        namespace's loopback serves pasta's spliced path too)."""
        for proc in self.guest_procs:
            proc.stop()
        self.guest_procs.clear()
        netns = ["ip", "netns", "exec", self.ns]
        iperf = self._spawn("iperf3-server", [*netns, "iperf3", "-s", "-p", str(IPERF_PORT),
                                              "--forceflush"], guest=True)
        byte = self._spawn("byteserver", [*netns, sys.executable,
                                          str(BENCH_DIR / "byteserver.py"),
                                          "--port", str(BYTE_PORT)], guest=True)
        iperf.wait_for(r"Server listening")
        byte.wait_for(r"^ready")
        probe((self.guest_ip, BYTE_PORT))

    def restart_iperf_server(self) -> None:
        """Start a fresh iperf3 server (after one got stuck "busy")."""
        for proc in [p for p in self.guest_procs if p.name == "iperf3-server"]:
            proc.stop()
            self.guest_procs.remove(proc)
        iperf = self._spawn("iperf3-server", ["ip", "netns", "exec", self.ns, "iperf3", "-s",
                                              "-p", str(IPERF_PORT), "--forceflush"],
                            guest=True)
        iperf.wait_for(r"Server listening")

    def start_peer(self, name: str) -> Peer:
        """Start one peer and prove it reaches the byte server; raise :class:`BenchError`."""
        g = self.guest_ip
        if name == "direct":
            peer = Peer(name, (g, IPERF_PORT), (g, BYTE_PORT),
                        path=f"client -> {g} over the veth, no forwarder")
        elif name == "kernel":
            p1, p2 = free_port(), free_port()
            rules = [nft.DnatRule(host_ip="127.0.0.1", host_port=p1, guest_ip=g,
                                  guest_port=IPERF_PORT),
                     nft.DnatRule(host_ip="127.0.0.1", host_port=p2, guest_ip=g,
                                  guest_port=BYTE_PORT)]
            self.nft_applied = True  # before apply: a half-applied ruleset is removed too
            nft.apply(self.veth_host, rules)
            peer = Peer(name, ("127.0.0.1", p1), ("127.0.0.1", p2),
                        path=f"nft DNAT in table ip {nft.TABLE}, chains *-{self.veth_host}")
        elif name == "proxy":
            proc = self._spawn("proxy", [sys.executable, str(BENCH_DIR / "forwarder.py"),
                                         "--forward", f"{g}:{IPERF_PORT}",
                                         "--forward", f"{g}:{BYTE_PORT}"], guest=False)
            m = proc.wait_for(r'^\{"ready": \[(\d+), (\d+)\]')
            peer = Peer(name, ("127.0.0.1", int(m.group(1))), ("127.0.0.1", int(m.group(2))),
                        [proc], path="sandport TcpForward under uvloop, own process")
        elif name == "socat":
            procs, ports = [], []
            for target in (IPERF_PORT, BYTE_PORT):
                port = free_port()
                procs.append(self._spawn(f"socat-{target}", [
                    "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                    f"TCP:{g}:{target}"], guest=False))
                ports.append(port)
            peer = Peer(name, ("127.0.0.1", ports[0]), ("127.0.0.1", ports[1]), procs,
                        path="socat, one forked process per connection")
        elif name == "pasta":
            p1, p2 = free_port(), free_port()
            # --runas 0: pasta otherwise drops to nobody and cannot join the namespace.
            proc = self._spawn("pasta", [
                "pasta", "-f", "--runas", "0", "--netns", f"/run/netns/{self.ns}",
                "-t", f"127.0.0.1/{p1}:{IPERF_PORT}", "-t", f"127.0.0.1/{p2}:{BYTE_PORT}",
                "-u", "none", "-T", "none", "-U", "none"], guest=False)
            peer = Peer(name, ("127.0.0.1", p1), ("127.0.0.1", p2), [proc],
                        path="pasta, spliced to the namespace's loopback (not the veth)")
        else:
            raise BenchError(f"unknown peer {name!r}")
        try:
            probe(peer.byte)
        except BenchError as exc:
            tails = "; ".join(f"{p.name}: {p.log_tail()}" for p in peer.procs if p.log_tail())
            raise BenchError(f"{exc}{'; ' + tails if tails else ''}") from exc
        return peer

    # -- teardown ---------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Remove everything this run created; return what could not be removed."""
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # every step runs; errors are reported
                errors.append(f"{what}: {exc}")

        # 1. Peers first: they hold connections into the namespace.
        for proc in reversed(self.peer_procs):
            step(f"stop {proc.name}", proc.stop)
        # 2. Kernel forwards: our chains (and the table, if no one else has chains in it).
        if self.nft_applied:
            step("nft.remove", lambda: nft.remove(self.veth_host))
        # 3. Guest servers, then anything else still running in the namespace.
        for proc in reversed(self.guest_procs):
            step(f"stop {proc.name}", proc.stop)

        def kill_ns_pids() -> None:
            for pid in sh(["ip", "netns", "pids", self.ns], check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

        step("kill namespace processes", kill_ns_pids)
        # 4. The veth pair (deleting one end deletes both), then the namespace.
        links = {str(x.get("ifname")) for x in _json(["ip", "-j", "link"])}
        if self.veth_host in links:
            step("delete veth", lambda: sh(["ip", "link", "del", self.veth_host]))
        netns = {str(x.get("name")) for x in _json(["ip", "-j", "netns", "list"])}
        if self.ns in netns:
            step("delete netns", lambda: sh(["ip", "netns", "del", self.ns]))
        # 5. The state file last: until here a crash leaves enough to clean up after us.
        if not errors:
            step("state file", self._remove_state)
        return errors

    def _remove_state(self) -> None:
        self.state_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another run's file is in it
            STATE_DIR.rmdir()
