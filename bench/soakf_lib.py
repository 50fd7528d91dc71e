"""The fault soak's parts: a `sandport up` under test, its guest service, clients, samplers.

Shared by ``bench/soak_faults.py`` (the full scenarios) and
``tests/integration/test_soak_faults.py`` (their short versions). Bench code, not product:
it runs the CLI as a subprocess and shells out to ``ip``.

::

    client ─► 127.0.0.1:K ─► nft DNAT (kernel forward) ─────────────┐
    client ─► [::1]:P ─────► the gateway's relay (proxy forward) ───┼─► sp-<id> :7000
    client ─► ws://127.0.0.1:L/s/<id>/ports/7000/ws ─► the bridge ──┘   soakf_guest.py

One sandbox (the netns backend's desktop profile) carries both forwards of guest port
7000: ``--forward-mode auto`` makes the IPv4 one a kernel forward and the IPv6 one a
proxy forward (kernel forwards are IPv4 only), so one gateway has both kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soakf_guest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Close

from sandport.client import Client
from sandport.sandbox.procs import NSEXEC

BENCH_DIR = Path(__file__).resolve().parent
GUEST_PORT = 7000
READY_LINE = "Press Ctrl-C"  # `sandport up` prints it once its HTTP port serves
UP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 1.0
PROBE_GAP = 0.02  # seconds between probes while waiting for a path to come back
CHUNK = 2048  # paced stream: bytes per send, each way
INTERVAL = 0.2  # paced stream: seconds between sends
OPEN_BATCH = 50  # connections opened at once


def now() -> float:
    """The monotonic clock every figure uses."""
    return time.monotonic()


# -- the gateway -----------------------------------------------------------------------------

class Gateway:
    """`sandport up` as a subprocess, with its stderr lines timed as they come."""

    def __init__(self, workdir: Path, *, state_dir: Path, bridge: str, subnet: str,
                 listen_port: int, extra: tuple[str, ...] = ()) -> None:
        self.workdir, self.state_dir = workdir, state_dir
        self.bridge, self.subnet, self.listen_port = bridge, subnet, listen_port
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.lines: list[str] = []
        self.runs = 0

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "sandport", "up", "--listen",
                f"127.0.0.1:{self.listen_port}", "--state-dir", str(self.state_dir),
                "--bridge", self.bridge, "--subnet", self.subnet, "--forward-mode", "auto",
                *self.extra]

    def start(self) -> None:
        """Start it (``started_at`` is taken just before the exec)."""
        self.runs += 1
        self.ready_at = None
        ready = threading.Event()
        log = open(self.workdir / f"gateway-{self.runs}.log", "wb")  # noqa: SIM115
        self.started_at = now()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            with log:
                for raw in proc.stderr:
                    log.write(raw)
                    log.flush()
                    line = raw.decode(errors="replace")
                    self.lines.append(line)
                    if READY_LINE in line and self.ready_at is None:
                        self.ready_at = now()
                        ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True, name="gateway-stderr").start()
        self._ready = ready

    def wait_ready(self, timeout: float = UP_TIMEOUT) -> float:
        """Seconds from process start to its ready line; raise if it exits first."""
        self._ready.wait(timeout)
        if self.ready_at is None:
            raise RuntimeError(f"`sandport up` did not come up (exit "
                               f"{self.proc.poll() if self.proc else None}): "
                               f"{''.join(self.lines[-8:])}")
        return self.ready_at - self.started_at

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> float:
        """SIGKILL (no cleanup at all); the time it was sent."""
        assert self.proc is not None
        t = now()
        self.proc.kill()
        self.proc.wait(10)
        return t

    def stop(self) -> int | None:
        """SIGTERM and wait (it removes every sandbox, link and rule it made)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def traceback_lines(self) -> list[str]:
        """Lines of its stderr and log file that show a Python traceback."""
        text = "".join(self.lines)
        with contextlib.suppress(OSError):
            text += (self.state_dir / "gateway.log").read_text(errors="replace")
        return [ln.rstrip() for ln in text.splitlines() if "Traceback (most recent" in ln
                or (ln.startswith(("  File ", "Error", "Exception")) and "sandport" in ln)]

    def client(self) -> Client:
        return Client.from_state_dir(self.state_dir)

    def metrics(self, match: Callable[[str], bool]) -> dict[str, float]:
        """The /metrics samples whose line ``match`` accepts (name{labels} -> value)."""
        api = self.client()
        req = urllib.request.Request(f"http://127.0.0.1:{self.listen_port}/metrics",
                                     headers={"Authorization": f"Bearer {api.admin_token}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and match(line):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    """Open descriptors of ``pid``."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


class Sampler:
    """RSS (and descriptors) of one process, sampled every ``period`` s in a thread."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, fds = rss_kib(self.pid), fd_count(self.pid)
            if rss is not None and fds is not None:
                self.samples.append((now(), rss, fds))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def rss_between(self, t0: float, t1: float) -> list[int]:
        return [r for t, r, _ in self.samples if t0 <= t <= t1]

    def summary(self, t0: float, t1: float, steady_from: float | None = None) -> dict[str, Any]:
        """RSS over [t0, t1]: first, max, growth; growth within the steady part too."""
        vals = self.rss_between(t0, t1)
        out: dict[str, Any] = {"samples": len(vals)}
        if vals:
            out.update(first_kib=vals[0], max_kib=max(vals), last_kib=vals[-1],
                       growth_kib=max(vals) - vals[0])
        if steady_from is not None:
            steady = self.rss_between(steady_from, t1)
            if steady:
                out["steady_growth_kib"] = max(steady) - steady[0]
                out["steady_last_minus_first_kib"] = steady[-1] - steady[0]
        fds = [f for t, _, f in self.samples if t0 <= t <= t1]
        if fds:
            out["max_fds"] = max(fds)
        return out


# -- the guest service -------------------------------------------------------------------------

class Guest:
    """``soakf_guest.py`` inside the sandbox's namespace; its per-connection reports."""

    def __init__(self, workdir: Path, netns: str) -> None:
        self.workdir, self.netns = workdir, netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.log = self.workdir / f"guest-{self.runs}.jsonl"
        out = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(NSEXEC), self.netns, "/tmp", "--",
             sys.executable, "-I", str(BENCH_DIR / "soakf_guest.py"), "--port",
             str(GUEST_PORT), "--chunk", str(CHUNK), "--interval", str(INTERVAL)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        out.close()
        deadline = now() + 15
        while now() < deadline:
            if self.log.read_bytes().startswith(b"ready"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"guest service did not start: {self.log.read_text()[-500:]}")

    def kill(self) -> float:
        """SIGKILL the guest service (its sockets are reset by the namespace's kernel)."""
        assert self.proc is not None
        t = now()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def reports(self) -> dict[str, dict[str, Any]]:
        """Connection id -> the guest's last report of it, over every run of the service."""
        out: dict[str, dict[str, Any]] = {}
        for run in range(1, self.runs + 1):
            path = self.workdir / f"guest-{run}.jsonl"
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    if line.startswith("{"):
                        doc = json.loads(line)
                        out[doc["id"]] = doc
        return out


# -- clients -----------------------------------------------------------------------------------

@dataclass
class Stream:
    """One client connection's view: bytes each way, how and when it ended."""

    id: str
    kind: str  # kernel, proxy, ws
    sent: int = 0
    recv: int = 0
    bad: int = 0
    end: str = ""  # eof, rst, ws 1011 'reason', error: ...
    ended_at: float | None = None
    recv_marks: dict[str, int] = field(default_factory=dict)

    def finish(self, how: str) -> None:
        if not self.end:
            self.end, self.ended_at = how, now()

    def take(self, data: bytes) -> None:
        self.bad += soakf_guest.mismatches(self.recv, data)
        self.recv += len(data)


class _Client:
    """What both stream clients share: a sending and a reading task, a bounded finish."""

    def __init__(self, st: Stream, mode: str) -> None:
        self.st, self.mode = st, mode
        self.stop_sending = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def run(self, *, read: bool = True, paced: bool = True) -> None:
        """Start sending (paced, or as fast as the connection takes) and reading."""
        self.tasks.append(asyncio.ensure_future(self._send(paced)))
        if read:
            self.tasks.append(asyncio.ensure_future(self._read()))

    async def _send(self, paced: bool) -> None:
        size = CHUNK if paced else 65536
        try:
            while not self.stop_sending.is_set() and not self.st.end:
                await self._write(soakf_guest.chunk(self.st.sent, size))
                self.st.sent += size
                if paced:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop_sending.wait(), INTERVAL)
        except Exception as exc:
            self._ended_by(exc)

    async def _read(self) -> None:
        try:
            await self._read_all()
        except Exception as exc:
            self._ended_by(exc)

    async def finish(self, timeout: float) -> None:
        """Stop sending, say so (half-close, close frame), read to the end (bounded),
        then close."""
        self.stop_sending.set()
        if not self.st.end:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._say_done(), timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True),
                                   timeout)
        self.close()

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self._drop()

    async def open(self) -> None:
        raise NotImplementedError

    async def _write(self, data: bytes) -> None:
        raise NotImplementedError

    async def _read_all(self) -> None:
        raise NotImplementedError

    async def _say_done(self) -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    def _ended_by(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionResetError):
            self.st.finish("rst")
        elif isinstance(exc, BrokenPipeError):
            self.st.finish("epipe")
        else:
            self.st.finish(f"error: {type(exc).__name__}: {exc}")


class TcpClient(_Client):
    """A stream client over TCP: header, then paced pattern both ways (or the mode's)."""

    def __init__(self, st: Stream, addr: tuple[str, int], mode: str = "stream") -> None:
        super().__init__(st, mode)
        self.addr = addr
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(*self.addr), CONNECT_TIMEOUT)
        self.writer.write(f"{self.mode} {self.st.id}\n".encode())

    async def _write(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def _read_all(self) -> None:
        assert self.reader is not None
        while data := await self.reader.read(65536):
            self.st.take(data)
        self.st.finish("eof")

    async def _say_done(self) -> None:
        assert self.writer is not None
        await self.writer.drain()
        if self.writer.can_write_eof():
            self.writer.write_eof()

    def _drop(self) -> None:
        if self.writer is not None:
            if self.st.end == "eof":
                self.writer.close()
            else:
                self.writer.transport.abort()


class WsClient(_Client):
    """A stream client through the WebSocket bridge: binary messages both ways."""

    def __init__(self, st: Stream, url: str, mode: str = "stream") -> None:
        super().__init__(st, mode)
        self.url = url
        self.ws: ClientConnection | None = None

    async def open(self) -> None:
        self.ws = await asyncio.wait_for(connect(
            self.url, subprotocols=["binary"], compression=None,  # type: ignore[list-item]
            max_size=None, ping_interval=None, proxy=None, max_queue=4,
            open_timeout=CONNECT_TIMEOUT, close_timeout=2), CONNECT_TIMEOUT)
        await self.ws.send(f"{self.mode} {self.st.id}\n".encode())

    def _ended_by(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionClosed):
            self._closed_with(exc.rcvd)
        else:
            super()._ended_by(exc)

    def _closed_with(self, rcvd: Close | None) -> None:
        self.st.finish(f"ws {rcvd.code} {rcvd.reason!r}" if rcvd is not None
                       else "ws 1006 (no close frame)")

    async def _write(self, data: bytes) -> None:
        assert self.ws is not None
        await self.ws.send(data)

    async def _read_all(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            self.st.take(msg if isinstance(msg, bytes) else msg.encode())
        self._closed_with(self.ws.protocol.close_rcvd)

    async def _say_done(self) -> None:
        assert self.ws is not None
        await self.ws.close()

    def _drop(self) -> None:
        if self.ws is not None:
            self.ws.transport.abort()


AnyClient = TcpClient | WsClient


# -- the bed: gateway + sandbox + guest ---------------------------------------------------------

@dataclass
class Paths:
    """Where each kind of client connects."""

    kernel: tuple[str, int]
    proxy: tuple[str, int]
    ws: str  # the bridge URL of guest port 7000, token included

    def client(self, kind: str, st: Stream, mode: str = "stream") -> AnyClient:
        if kind == "ws":
            return WsClient(st, self.ws, mode)
        return TcpClient(st, self.kernel if kind == "kernel" else self.proxy, mode)


class Bed:
    """One gateway, one sandbox with a kernel and a proxy forward of port 7000, the guest.

    ``create()`` builds it; ``teardown()`` removes everything (also after a ``kill -9``:
    a gateway started again on the same state dir adopts what is left and its SIGTERM
    removes it) and is safe after a partial ``create()``.
    """

    def __init__(self, workdir: Path, *, bridge: str, subnet: str, listen_port: int,
                 kernel_port: int, proxy_port: int, log: Callable[[str], None],
                 extra: tuple[str, ...] = ()) -> None:
        self.workdir, self.log = workdir, log
        self.kernel_port, self.proxy_port = kernel_port, proxy_port
        self.gw = Gateway(workdir, state_dir=workdir / "state", bridge=bridge, subnet=subnet,
                          listen_port=listen_port, extra=extra)
        self.sandbox = ""
        self.guest: Guest | None = None
        self.paths: Paths | None = None

    @property
    def netns(self) -> str:
        return f"sp-{self.sandbox}"

    @property
    def veth(self) -> str:
        """The host end of the sandbox's veth pair (the netns backend names it so)."""
        return f"sp-{self.sandbox}-v"

    def create(self) -> Paths:
        self.gw.start()
        up = self.gw.wait_ready()
        self.log(f"gateway up in {up:.2f} s (pid {self.gw.pid}, bridge {self.gw.bridge}, "
                 f"subnet {self.gw.subnet})")
        sb = self.gw.client().create_sandbox(publish=[
            f"127.0.0.1:{self.kernel_port}:{GUEST_PORT}",
            f"[::1]:{self.proxy_port}:{GUEST_PORT}"])
        self.sandbox = sb.id
        modes = {f["host"]: f["mode"] for f in sb.doc["forwards"]}
        want = {f"127.0.0.1:{self.kernel_port}": "kernel", f"[::1]:{self.proxy_port}": "proxy"}
        if any(modes.get(h) != m for h, m in want.items()):
            raise RuntimeError(f"forward modes are {modes}, wanted {want}")
        self.guest = Guest(self.workdir, self.netns)
        self.guest.start()
        self.paths = Paths(
            kernel=("127.0.0.1", self.kernel_port), proxy=("::1", self.proxy_port),
            ws=f"ws://127.0.0.1:{self.gw.listen_port}/s/{sb.id}/ports/{GUEST_PORT}/ws"
               f"?token={sb.doc['token']}")
        self.log(f"sandbox {sb.id} ready; guest service on :{GUEST_PORT}; kernel forward "
                 f"127.0.0.1:{self.kernel_port}, proxy forward [::1]:{self.proxy_port}")
        return self.paths

    def link(self, up: bool) -> None:
        """The sandbox's link: host end of its veth up or down."""
        subprocess.run(["ip", "link", "set", self.veth, "up" if up else "down"], check=True,
                       capture_output=True, timeout=15)

    def teardown(self) -> list[str]:
        """Remove everything; what could not be removed."""
        errors: list[str] = []
        if self.guest is not None:
            with contextlib.suppress(Exception):
                self.guest.stop()
        if self.sandbox:
            with contextlib.suppress(Exception):
                self.link(True)
        if self.gw.proc is not None and not self.gw.alive() and self.gw.proc.returncode \
                == -signal.SIGKILL:
            # Killed: a new start on the same state dir adopts what is left, and stops it.
            try:
                self.gw.start()
                self.gw.wait_ready()
            except Exception as exc:
                errors.append(f"restart for cleanup: {exc}")
        code = self.gw.stop()
        if code not in (0, None):
            errors.append(f"gateway exit {code}: {''.join(self.gw.lines[-5:]).strip()}")
        left = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                              check=False).stdout
        if self.sandbox and self.veth in left:
            errors.append(f"link {self.veth} left behind")
        if f" {self.gw.bridge}:" in left:
            errors.append(f"bridge {self.gw.bridge} left behind")
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=False).stdout
        if self.sandbox and self.netns in netns.split():
            errors.append(f"netns {self.netns} left behind")
        return errors


# -- opening many clients ------------------------------------------------------------------------

async def open_all(paths: Paths, kind: str, count: int, prefix: str,
                   mode: str = "stream") -> tuple[list[AnyClient], list[str]]:
    """Open ``count`` clients of one kind, :data:`OPEN_BATCH` at a time."""
    clients: list[AnyClient] = []
    errors: list[str] = []
    for start in range(0, count, OPEN_BATCH):
        batch = [paths.client(kind, Stream(f"{prefix}-{kind}-{i}", kind), mode)
                 for i in range(start, min(count, start + OPEN_BATCH))]
        results = await asyncio.gather(*(c.open() for c in batch), return_exceptions=True)
        for c, r in zip(batch, results, strict=True):
            if isinstance(r, BaseException):
                errors.append(f"{c.st.id}: {type(r).__name__}: {r}")
            else:
                clients.append(c)
    return clients, errors


async def probe_once(paths: Paths, kind: str, tag: str) -> str | None:
    """One new connection of ``kind``: header ``probe``, wait for ``ok``; None if it worked,
    else why not."""
    st = Stream(f"probe-{tag}", kind)
    c = paths.client(kind, st, "probe")
    try:
        await asyncio.wait_for(c.open(), PROBE_TIMEOUT)
        if isinstance(c, TcpClient):
            assert c.reader is not None
            line = await asyncio.wait_for(c.reader.readexactly(3), PROBE_TIMEOUT)
        else:
            assert c.ws is not None
            line = b""
            while len(line) < 3:
                msg = await asyncio.wait_for(c.ws.recv(), PROBE_TIMEOUT)
                line += msg if isinstance(msg, bytes) else msg.encode()
        return None if line[:3] == b"ok\n" else f"answered {line[:3]!r}"
    except InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}"
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionClosed,
            InvalidHandshake) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        c.close()


async def wait_until_works(paths: Paths, kind: str, deadline: float) -> tuple[float | None,
                                                                              str, int]:
    """Probe ``kind`` every :data:`PROBE_GAP` s until one works: (when, last error, tries)."""
    last, tries = "", 0
    while now() < deadline:
        tries += 1
        err = await probe_once(paths, kind, f"{kind}-{tries}")
        if err is None:
            return now(), last, tries
        last = err
        await asyncio.sleep(PROBE_GAP)
    return None, last, tries


def end_kind(end: str) -> str:
    """A client's end, grouped for counting: eof, rst, ws <code>, error, none."""
    if not end:
        return "none (still open)"
    if end.startswith("client gave up"):
        return "gave up"
    if end.startswith("ws "):
        return " ".join(end.split()[:2])
    return end if end in ("eof", "rst", "epipe") else "error"


def count_by(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
