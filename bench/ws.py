"""`make bench`, part 2: the WebSocket bridge next to websockify and raw TCP, interleaved.

Peers (each reaches the same target service, ``wsservice.py`` on 127.0.0.1):

    raw         plain TCP straight to the service (the baseline; no WebSocket)
    tcp-relay   plain TCP through sandport's splice TCP relay (``forwarder.py``): what any
                relay reaches here, zero-copy and without WebSocket framing (reference)
    ws-direct   the WebSocket client against the service speaking WebSocket itself, no
                bridge: the ceiling of client + service (calibration, no targets)
    websockify  Debian's websockify 0.10: ``websockify 127.0.0.1:P 127.0.0.1:TARGET``
    sandport    ``sandport ws 127.0.0.1:P 127.0.0.1:TARGET`` (same command-line shape)

Per round, for each peer in turn (A B C … A B C …): upload and download of 64 KiB binary
messages for ``--seconds`` each, 100-byte messages with 64 in flight through an echo, and
(bridges only) RSS per idle connection with ``--idle-conns`` connections open. CPU time of
the bridge's process tree is read around the transfers. Figures are medians over rounds.
The client (``wsclient.py``, one process) is ``--client raw`` by default: pre-built masked
frames on the bare transport, received frame headers parsed in place, echo replies checked
byte for byte, so it is not the limit; ``--client websockets`` is the library's client.
Prints a table and ratio lines against the targets, writes every figure to
``bench/results/ws-<UTC timestamp>.json``. Not a test: a missed target is reported, not an
error. Traffic goes only to 127.0.0.1; no namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import secrets
import select
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report
import testbed
from report import fmt, median, ratio
from testbed import BenchError, Proc, progress, starttime

ALL_PEERS = ("raw", "tcp-relay", "ws-direct", "websockify", "sandport")
CLIENTS = ("raw", "websockets")  # wsclient.py --client
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WEBSOCKIFY = "/usr/bin/websockify"
STATE_PREFIX = "ws-"  # state files in testbed.STATE_DIR: ws-<hex>.json

MESSAGE_SIZE = 64 << 10
SMALL_SIZE = 100
WINDOW = 64
IDLE_CONCURRENCY = 32  # WebSocket handshakes in flight while opening idle connections
WARMUP_SECONDS = 0.5
READY_TIMEOUT = 10.0
HELP_TIMEOUT = 15.0
CALL_GRACE = 10.0  # seconds beyond an operation's own bound before the client is restarted
SETTLE_TIMEOUT = 5.0  # bridge's per-connection children gone, after a transfer
IDLE_SETTLE_TIMEOUT = 30.0  # … after closing the idle connections
CLIENT_BUSY = 0.9  # client CPU share above which a figure is marked as the client's limit
MAX_ERROR_KINDS = 5
GB = 1e9

# Targets from the issue.
TARGET_WEBSOCKIFY_MBPS = 4.0
TARGET_RAW_MBPS = 0.6
TARGET_WEBSOCKIFY_MSGS = 1.5
TARGET_RSS_SHARE = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` fills in what was not given explicitly."""
    ap = argparse.ArgumentParser(
        prog="bench/ws.py",
        description="WebSocket-bridge benchmark: raw TCP vs the client + service ceiling "
                    "(ws-direct) vs websockify vs `sandport ws`, interleaved rounds, medians, "
                    "ratios against the targets. Writes JSON to bench/results/. Run as root.",
        epilog="Prints a table (upload and download MB/s with 64 KiB messages, msgs/s with "
               "100 B messages and 64 in flight, bridge CPU-s/GB, RSS and PSS KiB per idle "
               "connection) and ratio lines marked PASS/MISS against the issue's targets. "
               "Progress goes to stderr. Processes of a killed run are removed first.")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds (A B C … per round); default 3, --quick 1")
    ap.add_argument("--seconds", type=float, default=None,
                    help="duration of each upload, download and echo run; default 3, "
                         "--quick 1")
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help="comma-separated subset of the peers (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="fast sanity run: 1 round, 1 s runs, 30 s bound on the idle test")
    ap.add_argument("--idle-conns", type=int, default=1000,
                    help="idle WebSocket connections for the RSS test (default: %(default)s)")
    ap.add_argument("--idle-timeout", type=float, default=None,
                    help="time bound for opening them; default 60 s, --quick 30 s")
    ap.add_argument("--sandport-cmd", default=None, metavar="CMD",
                    help="command of the sandport peer, split like a shell would, followed "
                         "by 127.0.0.1:PORT 127.0.0.1:TARGET (default: .venv/bin/sandport ws;"
                         " e.g. /usr/bin/websockify to test the bench itself)")
    ap.add_argument("--client", choices=CLIENTS, default="raw",
                    help="the load generator for probe, upload, download and echo: raw "
                         "(pre-built masked frames on the transport, frame headers parsed "
                         "in place; fast enough not to be the limit) or websockets (the "
                         "library's asyncio client, itself the limit at 1-2.4 GB/s on 2 "
                         "cores); the idle test "
                         "always uses websockets (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                    help="where the JSON result goes (default: bench/results)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    if args.idle_timeout is None:
        args.idle_timeout = 30.0 if args.quick else 60.0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown or not peers:
        ap.error(f"--peers: unknown {unknown}; choose from {','.join(ALL_PEERS)}")
    args.peers = [p for p in ALL_PEERS if p in peers]  # canonical order
    if args.rounds < 1 or args.seconds <= 0 or args.idle_conns < 1 or args.idle_timeout <= 0:
        ap.error("--rounds, --seconds, --idle-conns and --idle-timeout must be positive")
    if args.sandport_cmd is not None and not shlex.split(args.sandport_cmd):
        ap.error("--sandport-cmd is empty")
    return args


# -- processes: the bridge's tree, its memory, the client worker ---------------------------


def _kib(path: str, key: str) -> int:
    """The ``key:  N kB`` value of a /proc status-like file, 0 if gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> dict[str, int]:
    """Sum of VmRSS and of Pss (KiB) over ``root`` and its live descendants.

    RSS counts pages shared between forked processes once per process (websockify forks
    one per connection); PSS splits each shared page among its sharers, so its sum is the
    tree's real share of memory.
    """
    pids = testbed.tree_pids(root)
    return {"rss_kib": sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids),
            "pss_kib": sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids),
            "procs": len(pids)}


def settle(proc: Proc | None, timeout: float, base: int = 1) -> bool:
    """Wait (bounded) until ``proc``'s tree is back to ``base`` processes (websockify's
    per-connection processes have exited and been reaped into its cutime/cstime)."""
    if proc is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive() or len(testbed.tree_pids(proc.pid)) <= base:
            return True
        time.sleep(0.02)
    return False


def idle_tree_size(proc: Proc, seconds: float = 1.0) -> int:
    """The bridge's process count at rest: the least seen within ``seconds`` (a bridge may
    keep helper processes; per-connection ones of the probe go away)."""
    deadline = time.monotonic() + seconds
    least = len(testbed.tree_pids(proc.pid))
    while least > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        least = min(least, len(testbed.tree_pids(proc.pid)))
    return least


class ClientProc(Proc):
    """``wsclient.py``: commands in on stdin, answers out on stdout, stderr to its log.

    ``on_start`` (if set) runs after every start, restarts included (the bench records the
    new pid in its state file).
    """

    on_start: Callable[[], None] | None = None
    _buf = b""

    def start(self) -> ClientProc:
        """Start it and wait for its ready line."""
        with open(self.log, "wb") as err:
            try:
                self.popen = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=err,
                                              start_new_session=True)
            except OSError as exc:
                raise BenchError(f"{self.name}: cannot start: {exc}") from exc
        self._buf = b""
        if self.on_start is not None:
            self.on_start()
        line = self._read_line(READY_TIMEOUT)
        if line is None or not json.loads(line).get("ready"):
            raise BenchError(f"{self.name}: no ready line: {self.log_tail()}")
        return self

    def _read_line(self, timeout: float) -> bytes | None:
        assert self.popen is not None
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def call(self, op: str, bound: float, **kw: Any) -> dict[str, Any]:
        """Run one operation (bounded by ``bound`` in the client); its answer.

        A client that does not answer in ``bound`` + :data:`CALL_GRACE` seconds, or died,
        is restarted and the answer is ``{"error": ...}``.
        """
        assert self.popen is not None
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(json.dumps({"op": op, "bound": bound, **kw}).encode()
                                   + b"\n")
            self.popen.stdin.flush()
            line = self._read_line(bound + CALL_GRACE)
        except OSError as exc:
            line, why = None, str(exc)
        else:
            why = "no answer" if self.alive() else f"exited ({self.popen.poll()})"
        if line is not None:
            answer: dict[str, Any] = json.loads(line)
            return answer
        tail = self.log_tail()
        self.stop()
        self.start()
        return {"error": f"client {why} for {op}{': ' + tail if tail else ''}; restarted"}

    def quit(self) -> None:
        """Ask it to close its connections and exit; then stop it in any case."""
        if self.alive() and self.popen is not None and self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.write(b'{"op": "quit"}\n')
                self.popen.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=testbed.STOP_GRACE)
        self.stop()
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()


# -- the run's processes ---------------------------------------------------------------------

@dataclass
class Peer:
    """A way from the client to the target service.

    Attributes:
        name: raw, ws-direct, websockify or sandport.
        target: what the client connects to: ``{"tcp": [host, port]}`` or ``{"ws": url}``.
        proc: the bridge process (None: no bridge).
        path: one line on how the bytes travel.
        base_procs: the bridge's process count at rest (its tree settles back to it).
    """

    name: str
    target: dict[str, Any]
    proc: Proc | None
    path: str
    base_procs: int = 1


class Bed:
    """The service, the client worker and the bridges of one run, and their teardown.

    Host processes are recorded in ``testbed.STATE_DIR/ws-<hex>.json`` in the forward
    bench's format, so either bench removes what a killed run of the other left.
    """

    def __init__(self, workdir: Path, client: str = "raw") -> None:
        self.tag = secrets.token_hex(2)
        self.workdir = workdir
        self.client_kind = client
        self.state_file = testbed.STATE_DIR / f"{STATE_PREFIX}{self.tag}.json"
        self.procs: list[Proc] = []
        self.service: Proc | None = None
        self.service_port = 0
        self.client: ClientProc | None = None

    def _record(self) -> None:
        testbed.STATE_DIR.mkdir(parents=True, exist_ok=True)
        procs = [{"pid": p.pid, "starttime": starttime(p.pid), "argv": " ".join(p.argv)}
                 for p in self.procs if p.alive()]
        state = {"owner_pid": os.getpid(), "owner_starttime": starttime(os.getpid()),
                 "ns": "", "workdir": str(self.workdir), "procs": procs}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _spawn(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        try:
            proc.start()
        finally:
            self._record()
        return proc

    def create(self) -> None:
        """The target service and the client worker."""
        self._record()
        self.service = self._spawn(Proc("wsservice", [
            sys.executable, str(BENCH_DIR / "wsservice.py"), "--host", "127.0.0.1"],
            self.workdir / "wsservice.log"))
        self.service_port = int(self.service.wait_for(r"^ready (\d+)").group(1))
        client = ClientProc("wsclient", [sys.executable, str(BENCH_DIR / "wsclient.py"),
                                         "--client", self.client_kind],
                            self.workdir / "wsclient.log")
        client.on_start = self._record
        self._spawn(client)
        self.client = client
        progress(f"service on 127.0.0.1:{self.service_port} (pid {self.service.pid}), "
                 f"client pid {client.pid} ({self.client_kind})")

    @property
    def stats_addr(self) -> list[Any]:
        """Where the client asks the service for its counters."""
        return ["127.0.0.1", self.service_port]

    def probe(self, target: dict[str, Any], proc: Proc | None) -> None:
        """Wait until one echo round trip works through ``target``; raise BenchError."""
        assert self.client is not None
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no attempt"
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                rc = proc.popen.returncode if proc.popen else None
                raise BenchError(f"exited ({rc}): {proc.log_tail() or 'no output'}")
            res = self.client.call("probe", bound=3.0, target=target)
            if res.get("ok"):
                return
            last = str(res.get("error"))
            time.sleep(0.1)
        tail = proc.log_tail() if proc is not None else ""
        raise BenchError(f"no echo through it in {READY_TIMEOUT:g} s: {last}"
                         + (f"; log: {tail}" if tail else ""))

    def start_peer(self, name: str, sandport_argv: list[str]) -> Peer:
        """Start one peer and prove an echo gets through it; raise BenchError."""
        svc = self.service_port
        if name == "raw":
            peer = Peer(name, {"tcp": ["127.0.0.1", svc]}, None,
                        "client -> TCP 127.0.0.1 -> service, no WebSocket")
        elif name == "tcp-relay":
            # The ceiling of any relay here: sandport's zero-copy (splice) TCP forward.
            proc = self._spawn(Proc(name, [sys.executable, str(BENCH_DIR / "forwarder.py"),
                                           "--forward", f"127.0.0.1:{svc}"],
                                    self.workdir / "tcp-relay.log"))
            port = int(proc.wait_for(r'"ready": \[(\d+)\]').group(1))
            peer = Peer(name, {"tcp": ["127.0.0.1", port]}, proc,
                        "client -> TCP -> sandport's splice TCP relay -> TCP -> service: "
                        "what any relay (no WebSocket) reaches on this machine")
        elif name == "ws-direct":
            peer = Peer(name, {"ws": f"ws://127.0.0.1:{svc}/"}, None,
                        "client -> WebSocket served by the service itself (no bridge)")
        else:
            port = testbed.free_port()
            argv = ([WEBSOCKIFY] if name == "websockify" else sandport_argv) + [
                f"127.0.0.1:{port}", f"127.0.0.1:{svc}"]
            proc = self._spawn(Proc(name, argv, self.workdir / f"{name}.log"))
            peer = Peer(name, {"ws": f"ws://127.0.0.1:{port}/"}, proc,
                        f"client -> WebSocket -> {shlex.join(argv)} -> TCP -> service")
        self.probe(peer.target, peer.proc)
        if peer.proc is not None:
            peer.base_procs = idle_tree_size(peer.proc)
        return peer

    def teardown(self) -> list[str]:
        """Stop everything this run started; return what could not be stopped."""
        errors: list[str] = []
        # 1. The client first: it holds connections into the bridges.
        # 2. The bridges (process groups: websockify's per-connection children too).
        # 3. The service.
        for proc in sorted(self.procs, key=lambda p: (p is not self.client,
                                                      p is self.service)):
            try:
                if isinstance(proc, ClientProc):
                    proc.quit()
                else:
                    proc.stop()
            except Exception as exc:  # every step runs; errors are reported
                errors.append(f"stop {proc.name}: {exc}")
            if proc.alive():
                errors.append(f"{proc.name} (pid {proc.pid}) is still running")
        # 4. The state file last: until here a crash leaves enough to clean up after us.
        if not errors:
            self.state_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: another run's file is in it
                testbed.STATE_DIR.rmdir()
        return errors


def cleanup_leftovers() -> None:
    """Stop the processes a killed ws bench run left (its state file says which).

    Raises:
        BenchError: another bench run (this one or the forward bench) is still active.
    """
    states = sorted(testbed.STATE_DIR.glob("*.json")) if testbed.STATE_DIR.is_dir() else []
    loaded = []
    for path in states:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        pid = state.get("owner_pid")
        if isinstance(pid, int) and pid != os.getpid() \
                and starttime(pid) == state.get("owner_starttime"):
            raise BenchError(f"another bench run is active (pid {pid}); wait for it or stop it")
        loaded.append((path, state))
    for path, state in loaded:
        if not path.name.startswith(STATE_PREFIX):
            continue  # the forward bench's: it removes its namespaces too, on its next run
        testbed.remove_recorded(state, progress)
        path.unlink(missing_ok=True)


def sandport_argv(args: argparse.Namespace) -> list[str]:
    """The sandport peer's command, without its two addresses."""
    if args.sandport_cmd:
        return shlex.split(args.sandport_cmd)
    exe = Path(sys.executable).parent / "sandport"
    return [str(exe) if exe.exists() else "sandport", "ws"]


def _last_words(text: str) -> str:
    """The last line of ``text`` that says something (rich's box characters removed)."""
    lines = [ln.strip(" │╭╮╰╯─┃━") for ln in text.splitlines()]
    lines = [ln for ln in lines if re.search(r"[A-Za-z]", ln) and ln.lower() != "error"]
    return lines[-1] if lines else "no output"


def sandport_unavailable(argv: list[str]) -> str | None:
    """Why ``argv --help`` says the command is not there (None: it is)."""
    try:
        r = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=False,
                           timeout=HELP_TIMEOUT, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{shlex.join(argv)} --help`: {exc}"
    if r.returncode != 0:
        return f"`{shlex.join(argv)} --help` exits {r.returncode}: " \
               f"{_last_words(r.stderr + r.stdout)}"
    return None


# -- measurements ----------------------------------------------------------------------------


def measured(bed: Bed, peer: Peer, op: str, bound: float, **kw: Any) -> dict[str, Any]:
    """One client operation through ``peer`` with the bridge tree's CPU time around it."""
    assert bed.client is not None
    settle(peer.proc, SETTLE_TIMEOUT, peer.base_procs)
    cpu0 = testbed.tree_cpu_seconds(peer.proc.pid) if peer.proc else None
    res = bed.client.call(op, bound=bound, target=peer.target, **kw)
    settled = settle(peer.proc, SETTLE_TIMEOUT, peer.base_procs)
    if peer.proc is not None and cpu0 is not None and peer.proc.alive():
        res["bridge_cpu_s"] = testbed.tree_cpu_seconds(peer.proc.pid) - cpu0
        res["bridge_settled"] = settled
    return res


def log_errors(text: str) -> dict[str, int]:
    """Lines of a bridge's log that name an error or exception, counted by text (the
    first :data:`MAX_ERROR_KINDS` distinct ones)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if re.search(r"error|exception|traceback", line, re.IGNORECASE):
            key = line.strip()[:200]
            if key in counts or len(counts) < MAX_ERROR_KINDS:
                counts[key] = counts.get(key, 0) + 1
    return counts


def idle_test(bed: Bed, peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    """RSS of the bridge tree with ``--idle-conns`` idle connections, per connection."""
    assert bed.client is not None
    assert peer.proc is not None
    settle(peer.proc, IDLE_SETTLE_TIMEOUT, peer.base_procs)
    log_start = len(peer.proc.log_text())
    before = tree_memory(peer.proc.pid)
    res = bed.client.call("idle_open", bound=args.idle_timeout + 20, target=peer.target,
                          count=args.idle_conns, timeout=args.idle_timeout,
                          concurrency=IDLE_CONCURRENCY, stats_addr=bed.stats_addr)
    after = tree_memory(peer.proc.pid)
    closed = bed.client.call("idle_close", bound=15.0)
    settled = settle(peer.proc, IDLE_SETTLE_TIMEOUT, peer.base_procs)
    n = res.get("target_conns") or 0
    res.update({
        "before": before, "after": after, "close": closed, "settled_after_close": settled,
        "bridge_log_errors": log_errors(peer.proc.log_text()[log_start:]),
        "rss_kib_per_conn": (after["rss_kib"] - before["rss_kib"]) / n if n > 0 else None,
        "pss_kib_per_conn": (after["pss_kib"] - before["pss_kib"]) / n if n > 0 else None,
    })
    return res


def _throughput_args(bed: Bed, op: str, seconds: float) -> dict[str, Any]:
    if op == "upload":
        return {"seconds": seconds, "size": MESSAGE_SIZE, "stats_addr": bed.stats_addr}
    return {"seconds": seconds}


def measure_round(bed: Bed, peer: Peer, args: argparse.Namespace,
                  label: str) -> dict[str, Any]:
    """One peer's share of one round: upload, download, echo, idle connections."""
    rnd: dict[str, Any] = {}
    for op in ("upload", "download"):
        res = measured(bed, peer, op, bound=args.seconds + 30,
                       **_throughput_args(bed, op, args.seconds))
        rnd[op] = res
        if res.get("error"):
            progress(f"{label} {peer.name}: {op}: ERROR {res['error']}")
        else:
            cpu = res.get("bridge_cpu_s")
            size = res["bytes"] / res["messages"] / 1024 if res.get("messages") else None
            lost = res.get("bytes_sent", 0) - res["bytes"] if op == "upload" else 0
            progress(f"{label} {peer.name}: {op} {fmt(res.get('mb_per_s'), '.0f')} MB/s, "
                     f"client busy {fmt(res.get('client_busy'), '.0%')}"
                     + (f", bridge {cpu:.2f} CPU-s" if cpu is not None else "")
                     + (f", {size:.1f} KiB per message received" if size else "")
                     + (f", {lost} B sent never reached the sink" if lost > 0 else ""))
    res = measured(bed, peer, "echo", bound=args.seconds + 30, seconds=args.seconds,
                   size=SMALL_SIZE, window=WINDOW)
    rnd["echo"] = res
    if res.get("error"):
        progress(f"{label} {peer.name}: echo: ERROR {res['error']}")
    else:
        progress(f"{label} {peer.name}: echo {fmt(res.get('msgs_per_s'), '.0f')} msgs/s, "
                 f"client busy {fmt(res.get('client_busy'), '.0%')}")
    if peer.proc is not None and peer.name != "tcp-relay":  # idle test: WebSockets only
        res = idle_test(bed, peer, args)
        rnd["idle"] = res
        if res.get("error"):
            progress(f"{label} {peer.name}: idle: ERROR {res['error']}")
        else:
            rss = res["rss_kib_per_conn"]
            progress(f"{label} {peer.name}: idle: {res['opened']} handshakes in "
                     f"{res['seconds']:.1f} s, {res['alive']} still open, "
                     f"{res['target_conns']} bridged to the service"
                     + (f", {rss:.0f} KiB RSS each" if rss is not None else "")
                     + (f", failures {res['failures']}" if res["failures"] else ""))
            for line, count in res["bridge_log_errors"].items():
                progress(f"{label} {peer.name}: idle: bridge log: {count} x {line}")
    return rnd


def warm_up(bed: Bed, peer: Peer) -> dict[str, Any]:
    """A short uncounted pass through ``peer``: upload, download, echo."""
    assert bed.client is not None
    progress(f"warm-up {peer.name} ...")
    out: dict[str, Any] = {}
    for op in ("upload", "download"):
        res = bed.client.call(op, bound=30.0, target=peer.target,
                              **_throughput_args(bed, op, WARMUP_SECONDS))
        out[op] = res.get("mb_per_s") if not res.get("error") else res["error"]
    res = bed.client.call("echo", bound=30.0, target=peer.target, seconds=WARMUP_SECONDS,
                          size=SMALL_SIZE, window=WINDOW)
    out["echo"] = res.get("msgs_per_s") if not res.get("error") else res["error"]
    return out


# -- summary -----------------------------------------------------------------------------------


def _cpu_per_gb(rnd: dict[str, Any]) -> float | None:
    """Bridge CPU seconds per GB over the round's upload and download together."""
    runs = [r for r in (rnd.get("upload"), rnd.get("download"))
            if r and not r.get("error") and r.get("bridge_cpu_s") is not None]
    nbytes = sum(r["bytes"] for r in runs)
    return sum(r["bridge_cpu_s"] for r in runs) / (nbytes / GB) if runs and nbytes else None


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per peer."""
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rounds.items():
        def pick(test: str, key: str, rs: list[dict[str, Any]] = rs) -> list[float | None]:
            return [(r.get(test) or {}).get(key) for r in rs]

        out[name] = {
            "upload_mb_s": median(pick("upload", "mb_per_s")),
            "download_mb_s": median(pick("download", "mb_per_s")),
            "msgs_per_s": median(pick("echo", "msgs_per_s")),
            "cpu_s_per_gb": median([_cpu_per_gb(r) for r in rs]),
            "rss_kib_per_conn": median(pick("idle", "rss_kib_per_conn")),
            "pss_kib_per_conn": median(pick("idle", "pss_kib_per_conn")),
            "idle_conns": median(pick("idle", "target_conns")),
            "client_busy_upload": median(pick("upload", "client_busy")),
            "client_busy_download": median(pick("download", "client_busy")),
            "client_busy_echo": median(pick("echo", "client_busy")),
            "client_user_busy_upload": median(pick("upload", "client_user_busy")),
            "client_user_busy_download": median(pick("download", "client_user_busy")),
            "upload_lost_bytes_max": max(
                (u["bytes_sent"] - u["bytes"] for u in (r.get("upload") for r in rs)
                 if u and not u.get("error") and "bytes_sent" in u), default=None),
            "errors": sorted({f"{test}: {(r.get(test) or {})['error']}"
                              for r in rs for test in ("upload", "download", "echo", "idle")
                              if (r.get(test) or {}).get("error")}),
            "download_kib_per_message": median([
                d["bytes"] / d["messages"] / 1024 if d and d.get("messages") else None
                for d in (r.get("download") for r in rs)]),
        }
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratio lines of the issue, each with its target and PASS/MISS (None: not measured)."""
    def get(peer: str, key: str) -> float | None:
        value: float | None = summary.get(peer, {}).get(key)
        return value

    def r(a: str, b: str, key: str) -> float | None:
        return ratio(get(a, key), get(b, key))

    lines = [
        ("sandport / websockify, upload MB/s", r("sandport", "websockify", "upload_mb_s"),
         ">=", TARGET_WEBSOCKIFY_MBPS),
        ("sandport / websockify, download MB/s", r("sandport", "websockify", "download_mb_s"),
         ">=", TARGET_WEBSOCKIFY_MBPS),
        ("sandport / raw TCP, upload MB/s", r("sandport", "raw", "upload_mb_s"),
         ">=", TARGET_RAW_MBPS),
        ("sandport / raw TCP, download MB/s", r("sandport", "raw", "download_mb_s"),
         ">=", TARGET_RAW_MBPS),
        ("sandport / websockify, msgs/s", r("sandport", "websockify", "msgs_per_s"),
         ">=", TARGET_WEBSOCKIFY_MSGS),
        ("sandport / websockify, RSS per idle conn",
         r("sandport", "websockify", "rss_kib_per_conn"), "<=", TARGET_RSS_SHARE),
    ]
    info = [
        ("tcp-relay / raw TCP, upload MB/s", r("tcp-relay", "raw", "upload_mb_s")),
        ("tcp-relay / raw TCP, download MB/s", r("tcp-relay", "raw", "download_mb_s")),
        ("sandport / tcp-relay, upload MB/s", r("sandport", "tcp-relay", "upload_mb_s")),
        ("sandport / tcp-relay, download MB/s", r("sandport", "tcp-relay", "download_mb_s")),
        ("sandport / ws-direct, upload MB/s", r("sandport", "ws-direct", "upload_mb_s")),
        ("sandport / ws-direct, download MB/s", r("sandport", "ws-direct", "download_mb_s")),
        ("sandport / ws-direct, msgs/s", r("sandport", "ws-direct", "msgs_per_s")),
        ("websockify / ws-direct, download MB/s",
         r("websockify", "ws-direct", "download_mb_s")),
        ("sandport / websockify, CPU-s/GB", r("sandport", "websockify", "cpu_s_per_gb")),
        ("sandport / websockify, PSS per idle conn",
         r("sandport", "websockify", "pss_kib_per_conn")),
    ]
    out: list[dict[str, Any]] = []
    for label, value, op, bound in lines:
        verdict = None
        if value is not None:
            ok = value >= bound if op == ">=" else value <= bound
            verdict = "PASS" if ok else "MISS"
        out.append({"what": label, "value": value, "target": f"{op} {bound:g}x",
                    "verdict": verdict})
    for label, value in info:
        out.append({"what": label, "value": value, "target": None, "verdict": None})
    return out


def render(summary: dict[str, dict[str, Any]], skipped: dict[str, str],
           ratio_lines: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table and the ratio lines, as printed."""
    head = ("peer", "upload MB/s", "download MB/s", "msgs/s", "CPU-s/GB", "RSS KiB/conn",
            "PSS KiB/conn", "idle conns")
    rows = [head]
    marked = False

    def busy(s: dict[str, Any], value: float | None, key: str, spec: str) -> str:
        nonlocal marked
        text = fmt(value, spec)
        if value is not None and (s.get(key) or 0) >= CLIENT_BUSY:
            marked = True
            return text + "*"
        return text

    for name in args.peers:
        if name not in summary:
            continue
        s = summary[name]
        idle = s["idle_conns"]
        rows.append((name,
                     busy(s, s["upload_mb_s"], "client_busy_upload", ".0f"),
                     busy(s, s["download_mb_s"], "client_busy_download", ".0f"),
                     busy(s, s["msgs_per_s"], "client_busy_echo", ".0f"),
                     fmt(s["cpu_s_per_gb"], ".2f"), fmt(s["rss_kib_per_conn"], ".0f"),
                     fmt(s["pss_kib_per_conn"], ".0f"),
                     "—" if idle is None else f"{idle:.0f}/{args.idle_conns}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"WebSocket-bridge bench, client {args.client}: {args.rounds} round(s), "
             f"{args.seconds:g} s per transfer, {MESSAGE_SIZE >> 10} KiB messages; echo "
             f"{SMALL_SIZE} B with {WINDOW} in flight; {args.idle_conns} idle connections; "
             "medians", ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("MB/s: 10^6 bytes per second of payload; upload counted where it arrives (the "
                 "sink), download where it arrives (the client).")
    lines.append("CPU-s/GB: CPU time of the bridge's process tree (children included) per GB "
                 "moved, upload + download; raw and ws-direct have no bridge.")
    lines.append("RSS/PSS KiB/conn: growth of the bridge tree's summed VmRSS / Pss with the "
                 "idle connections open, divided by the connections that reached the service.")
    lines.append("ws-direct: the same client against the service's own WebSocket server, "
                 "no bridge: the ceiling of client + service.")
    if marked:
        lines.append(f"  * the client process was ≥{CLIENT_BUSY:.0%} busy: the figure is "
                     "(near) the client's limit, not the peer's"
                     + (" (with the raw client mostly the kernel's send/receive work, "
                        "charged to the client's process)." if args.client == "raw" else "."))
    for name in args.peers:
        s = summary.get(name, {})
        lost = s.get("upload_lost_bytes_max")
        if lost:
            lines.append(f"{name}: upload: up to {lost} B sent were never delivered to the "
                         "service (dropped when the client closed)")
        for err in s.get("errors", []):
            lines.append(f"{name}: {err}")
    for name, reason in skipped.items():
        lines.append(f"{name}: did not run: {reason}")
    lines.append("")
    width = max(len(r["what"]) for r in ratio_lines)
    for r in ratio_lines:
        value = "n/a" if r["value"] is None else f"{r['value']:.2f}x"
        target = f"(target {r['target']})" if r["target"] else "(info)"
        verdict = r["verdict"] or ("n/a" if r["target"] else "")
        lines.append(f"{r['what'].ljust(width)}  {value:>9}  {target:<16} {verdict}".rstrip())
    return "\n".join(lines)


# -- machine ---------------------------------------------------------------------------------


# -- run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Start the service, client and peers, measure, report; always tear down."""
    started = dt.datetime.now(dt.UTC)
    machine = {**report.machine_info(
                ("uvloop", "websockets", "sandport"),
                websockify=report.package_version("websockify"),
                **{"python3-numpy": report.package_version("python3-numpy")}),
                "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))}
    rounds: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    paths: dict[str, str] = {}
    at_rest: dict[str, int] = {}
    sp_argv = sandport_argv(args)
    with tempfile.TemporaryDirectory(prefix=testbed.LOGDIR_PREFIX) as tmp:
        bed = Bed(Path(tmp), args.client)

        def body() -> Path | int:
            cleanup_leftovers()
            bed.create()
            peers = []
            for name in args.peers:
                if name == "sandport":
                    reason = sandport_unavailable(sp_argv)
                    if reason:
                        skipped[name] = reason
                        progress(f"{name}: did not run: {reason}")
                        continue
                try:
                    peer = bed.start_peer(name, sp_argv)
                except Exception as exc:  # a peer that cannot start is reported, not fatal
                    skipped[name] = str(exc) if isinstance(exc, BenchError) \
                        else f"{type(exc).__name__}: {exc}"
                    progress(f"{name}: did not run: {skipped[name]}")
                    continue
                progress(f"{name}: ready ({peer.path})")
                peers.append(peer)
                paths[name] = peer.path
                if peer.proc is not None:
                    at_rest[name] = peer.base_procs
                rounds[name] = []
            if not peers:
                progress("no peer could start; nothing to measure")
                return 1
            # Warm-up (not counted): first connections, imports, CPU clocks.
            warmup = {peer.name: warm_up(bed, peer) for peer in peers}
            for i in range(1, args.rounds + 1):
                for peer in peers:
                    label = f"round {i}/{args.rounds}"
                    progress(f"{label} {peer.name} ...")
                    rounds[peer.name].append(measure_round(bed, peer, args, label))
            summary = summarize(rounds)
            ratio_lines = ratios(summary)
            print(render(summary, skipped, ratio_lines, args), flush=True)
            result = {
                "bench": "ws",
                "timestamp": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "duration_s": round(testbed.elapsed(), 1),
                "config": {"client": args.client,
                           "rounds": args.rounds, "seconds": args.seconds,
                           "peers": args.peers, "quick": args.quick,
                           "message_size": MESSAGE_SIZE, "small_size": SMALL_SIZE,
                           "window": WINDOW, "idle_conns": args.idle_conns,
                           "idle_timeout": args.idle_timeout,
                           "idle_concurrency": IDLE_CONCURRENCY,
                           "sandport_cmd": shlex.join(sp_argv)},
                "machine": machine,
                "paths": paths,
                "bridge_procs_at_rest": at_rest,
                "skipped": skipped,
                "median": summary,
                "ratios": ratio_lines,
                "rounds": rounds,
                "warmup": warmup,
                "notes": [
                    f"client: {args.client} (wsclient.py --client); "
                    + ("pre-built masked frames written with the transport's backpressure, "
                       "received frame headers parsed in place, echo replies compared byte "
                       "by byte" if args.client == "raw" else
                       "the websockets library's asyncio client")
                    + "; the idle test always uses websockets",
                    "mb_per_s: 1e6 payload bytes per second; upload bytes counted at the sink "
                    "up to its last byte, download bytes at the client",
                    "client_busy: CPU share of the client process during the transfer "
                    "(1.0 = one core): near 1, the client is the limit; client_user_busy: "
                    "its user-space part (the rest is the kernel's socket work)",
                    "bridge_cpu_s: utime+stime(+cutime+cstime) of the bridge process tree",
                    "rss/pss_kib_per_conn: growth of the summed VmRSS / Pss of the bridge tree "
                    "with the idle connections open, per connection that reached the service",
                    "ws-direct: the service speaks WebSocket itself; no bridge",
                ],
            }
            args.out_dir.mkdir(parents=True, exist_ok=True)
            result_path: Path = args.out_dir / f"ws-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
            result_path.write_text(report.to_json(result))
            return result_path

        return testbed.finish(body, bed.teardown)


def main(argv: list[str] | None = None) -> int:
    """Entry point: arguments, root and tool checks, fd limit, signal handlers, run."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (it raises the open-file limit for 1,000 idle "
              "connections and reads the bridges' /proc entries): sudo make bench",
              file=sys.stderr)
        return 2
    missing = [m for m in ("uvloop", "websockets") if importlib.util.find_spec(m) is None]
    if "websockify" in args.peers and not os.access(WEBSOCKIFY, os.X_OK):
        missing.append(WEBSOCKIFY)
    if missing:
        print(f"bench: missing {', '.join(missing)}: run `make setup` (apt-get install "
              "websockify; the venv has uvloop and websockets), or leave the peer out with "
              "--peers", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by what we start
    testbed.interrupt_on_signals()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
