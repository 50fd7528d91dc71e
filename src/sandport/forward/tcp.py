"""Userspace TCP relay: a host listener whose connections are relayed to a target address.

One :class:`TcpForward` owns the listening socket(s). Every accepted client gets exactly one
upstream connection to the current target; once it is connected, two *pumps* move the bytes,
one per direction, driven by readiness callbacks of the running loop (``add_reader`` /
``add_writer``: asyncio and uvloop alike). No transport, no stream, no per-connection task
once the pair exists.

Data path (``TcpForwardSpec.data_path``)::

    client ──splice──► pipe ──splice──► upstream      (one pipe per direction)
    client ◄──splice── pipe ◄──splice── upstream

* ``splice`` (the default where ``os.splice`` exists): ``splice(2)`` moves the bytes from the
  source socket into a pipe and from the pipe into the destination socket; they never reach
  user space, Python only schedules. The pipe is sized to :data:`~sandport.net.splice.PIPE_SIZE`.
* ``copy``: ``recv_into`` a fixed buffer of :data:`COPY_CHUNK` bytes and ``send`` it on. Used
  when asked for, when ``os.splice`` does not exist, and per connection when the kernel
  refuses the pipe (fd limit) or splice itself (``EINVAL``); counted in ``fallbacks``.

Semantics of one relayed connection (RFC 9293 terms):

* Backpressure: a pump reads from its source only while its pipe (or buffer) is empty. When
  the destination cannot take everything (``EAGAIN``), the pump stops reading and waits for
  the destination to become writable. Per direction at most one read is held: a pipe's
  worth in kernel pages (splice) or :data:`COPY_CHUNK` bytes (copy). The rest waits in the
  sockets' kernel buffers, so a slow reader slows the sender down instead of growing memory.
* Half-close (RFC 9293 §3.6): end of stream from one side (FIN) is passed on as
  ``shutdown(SHUT_WR)`` once everything before it was written; the other direction keeps
  flowing. When FIN went both ways, both sockets are closed.
* Reset: when a socket fails (RST, ``EPIPE``, any other error) both sockets are closed with
  ``SO_LINGER {on, 0}``, so the other peer sees a RST too instead of a clean FIN. Counted
  once per connection as ``reset``.
* Connect failure (refused, unreachable, timeout): the client is reset and counted under its
  reason in ``failures`` (``ECONNREFUSED`` → ``refused``; ``EHOSTUNREACH``, ``ENETUNREACH``
  and any other connect error → ``unreachable``; no handshake within ``connect_timeout`` or
  ``ETIMEDOUT`` → ``timeout``). ``failed_connects`` is their sum.
* Idle timeout (``TcpForwardSpec.idle_timeout``): a relayed connection that moved no byte in
  either direction for that long is closed on both sides (gracefully; reset instead when
  bytes are still held by the relay, since a peer that does not read would hold the close
  forever) and counted as ``idle``. Each read stores a monotonic timestamp on the link; one
  timer per forward sweeps all links every ``min(`` :data:`IDLE_SWEEP_MAX` ``, idle / 4)``
  seconds, so a silent connection is closed between ``idle`` and ``idle + sweep``.
* Connection limit (``TcpForwardSpec.max_connections``): a client accepted while that many
  connections are active (connecting or relaying) is reset at once, never connected
  upstream, and counted as ``limit``; existing connections are untouched. ``total`` still
  counts it.
* PROXY protocol (``TcpForwardSpec.proxy_protocol`` = 1 or 2; HAProxy spec, built with
  :mod:`sandport.proto.proxyproto`): the first bytes written to the upstream are a PROXY
  header with the client's address and port as source and the listener's address and port
  (``getsockname()`` of the accepted socket) as destination, before any client byte. An
  IPv4-mapped IPv6 pair (dual-stack listener) is sent as TCP4. Should the endpoints not be
  IP addresses, the header says UNKNOWN (v1) / UNSPEC (v2). The header is not counted in
  ``bytes_up``.
* Nothing a side sends before the pair exists is lost or reordered: the client socket is
  not read until the upstream is connected, so early bytes and an early FIN wait in the
  kernel and are relayed in order.
* Every log line of a connection carries its id, ``<forward name>#<n>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import itertools
import logging
import os
import re
import resource
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Final

from sandport.forward.base import Forward, PortInUse, check_ports, format_addr
from sandport.net.nsock import namespace_sockets
from sandport.net.splice import SPLICE_AVAILABLE, SPLICE_FLAGS, open_pipe
from sandport.proto.proxyproto import ProxyHeader

__all__ = [
    "COPY_CHUNK",
    "DATA_PATHS",
    "IDLE_SWEEP_MAX",
    "LISTEN_BACKLOG",
    "FailureReason",
    "PortInUse",
    "TcpForward",
    "TcpForwardSpec",
    "TcpForwardStats",
]

log = logging.getLogger(__name__)

KiB = 1024
#: ``listen(2)`` backlog of the host listener.
LISTEN_BACKLOG = 512
#: Buffer per direction of the copy data path: the most one ``recv`` holds.
COPY_CHUNK = 256 * KiB
#: Default time :meth:`TcpForward.stop` lets closing connections flush before resetting them.
STOP_GRACE = 2.0
#: Longest interval between two idle sweeps (shorter for short idle timeouts: ``idle / 4``).
IDLE_SWEEP_MAX = 1.0
#: Reads one readiness callback may do before yielding to other connections.
READS_PER_WAKEUP = 4
#: Accepts one readiness callback of the listener may do.
ACCEPTS_PER_WAKEUP = 64
#: Seconds the listener pauses when the process is out of file descriptors.
ACCEPT_RETRY = 0.5
#: Data paths a spec may ask for; ``auto`` is ``splice`` where the platform has it.
DATA_PATHS: Final = ("auto", "splice", "copy")

#: ``struct linger {int l_onoff; int l_linger;}`` = {1, 0}: close(2) sends RST, drops the buffer.
_LINGER_RESET = struct.pack("ii", 1, 0)
_PROXY_VERSIONS: Final = (1, 2)
#: Out of descriptors or memory: pause accepting instead of spinning on the listener.
_ACCEPT_PAUSE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_monotonic = time.monotonic


class FailureReason(enum.StrEnum):
    """Why a connection failed or was ended by the relay: the keys of ``failures``."""

    #: Upstream connect answered with RST (``ECONNREFUSED``).
    REFUSED = "refused"
    #: Upstream connect failed otherwise (``EHOSTUNREACH``, ``ENETUNREACH``, name lookup...).
    UNREACHABLE = "unreachable"
    #: No upstream handshake within ``connect_timeout`` (or ``ETIMEDOUT``).
    TIMEOUT = "timeout"
    #: Rejected because ``max_connections`` connections were active.
    LIMIT = "limit"
    #: Closed after ``idle_timeout`` seconds without a byte in either direction.
    IDLE = "idle"
    #: A relayed connection ended because one side failed (RST, write error).
    RESET = "reset"


#: Reasons that count as a failed upstream connect (``failed_connects``).
CONNECT_FAILURES: Final = (FailureReason.REFUSED, FailureReason.UNREACHABLE, FailureReason.TIMEOUT)
_ERRNO_REASONS: Final = {
    errno.ECONNREFUSED: FailureReason.REFUSED,
    errno.EHOSTUNREACH: FailureReason.UNREACHABLE,
    errno.ENETUNREACH: FailureReason.UNREACHABLE,
    errno.ETIMEDOUT: FailureReason.TIMEOUT,
}
#: Several failed addresses of one name are reported as a single OSError without errno
#: ("Multiple exceptions: [Errno 111] ..., [Errno 111] ..."); the errnos are in its text.
_ERRNO_IN_TEXT: Final = re.compile(r"\[Errno (\d+)\]")


def _connect_failure_reason(exc: OSError) -> FailureReason:
    """Map a failed upstream connect to a :class:`FailureReason`."""
    if exc.errno is not None:
        return _ERRNO_REASONS.get(exc.errno, FailureReason.UNREACHABLE)
    reasons = {
        _ERRNO_REASONS.get(int(n), FailureReason.UNREACHABLE)
        for n in _ERRNO_IN_TEXT.findall(str(exc))
    }
    return reasons.pop() if len(reasons) == 1 else FailureReason.UNREACHABLE


def _zero_failures() -> dict[str, int]:
    return dict.fromkeys((r.value for r in FailureReason), 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpForwardSpec:
    """What to listen on and where to relay to.

    Attributes:
        listen_host: Host address to bind (a name binds every address it resolves to).
        listen_port: Host port to bind; 0 picks an ephemeral port (see
            :attr:`TcpForward.bound_port`).
        target_host: Address (or name) of the target service for new connections.
        target_port: Port of the target service.
        connect_timeout: Seconds allowed for the upstream TCP handshake.
        name: Label used in log lines and connection ids; defaults to ``tcp:<bound port>``.
        idle_timeout: Seconds without a byte in either direction after which a relayed
            connection is closed (counted as ``idle``); ``None``: never.
        max_connections: Most connections active at once; further clients are reset at
            accept (counted as ``limit``); ``None``: no limit.
        proxy_protocol: Send a PROXY protocol header of this version (1 or 2) to the
            upstream before any client byte; ``None``: send none.
        data_path: ``splice`` (zero-copy through a pipe), ``copy`` (recv/send) or ``auto``
            (splice where the platform has it).
        netns: the network namespace (its file: /run/netns/NAME, /proc/PID/ns/net) the
            target lives in, a container's; upstream sockets are made there. "": ours.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int
    target_host: str
    target_port: int
    connect_timeout: float = 5.0
    name: str = ""
    idle_timeout: float | None = None
    max_connections: int | None = None
    proxy_protocol: int | None = None
    data_path: str = "auto"
    netns: str = ""

    def __post_init__(self) -> None:
        """Check ranges once, so bad configuration fails before any socket exists.

        Raises:
            ValueError: A port is out of range, a timeout is not positive, the connection
                limit is below 1, the PROXY protocol version is not 1 or 2, or the data path
                is unknown or not available here.
        """
        check_ports(self.listen_port, self.target_port)
        if not self.connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0, not {self.connect_timeout}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 or None, not {self.idle_timeout}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1 or None, not {self.max_connections}")
        if self.proxy_protocol is not None and self.proxy_protocol not in _PROXY_VERSIONS:
            raise ValueError(f"proxy_protocol must be 1, 2 or None, not {self.proxy_protocol}")
        if self.data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {', '.join(DATA_PATHS)}, "
                             f"not {self.data_path!r}")
        if self.data_path == "splice" and not SPLICE_AVAILABLE:
            raise ValueError("data_path 'splice' needs os.splice (Linux, Python >= 3.10)")

    @property
    def idle_sweep_interval(self) -> float | None:
        """Seconds between idle sweeps: ``min(IDLE_SWEEP_MAX, idle_timeout / 4)``, or None."""
        if self.idle_timeout is None:
            return None
        return min(IDLE_SWEEP_MAX, self.idle_timeout / 4)

    @property
    def splice(self) -> bool:
        """Whether connections start on the splice data path."""
        return self.data_path != "copy" and SPLICE_AVAILABLE


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpForwardStats:
    """A snapshot of a forward's counters.

    Attributes:
        active: Connections accepted and not yet fully closed (including ones still
            connecting upstream).
        total: Connections accepted since start.
        bytes_up: Bytes received from clients and passed on to targets.
        bytes_down: Bytes received from targets and passed on to clients.
        failed_connects: Upstream connects that failed: the sum of ``failures`` for
            ``refused``, ``unreachable`` and ``timeout``.
        buffered: Bytes the relay currently holds (in its pipes or copy buffers) because a
            destination could not take them yet. Bounded by backpressure: at most one
            pipe or buffer per direction of each connection.
        fallbacks: Connections that could not use splice and ran on the copy data path.
        failures: Count per :class:`FailureReason` value (every key present).
    """

    active: int
    total: int
    bytes_up: int
    bytes_down: int
    failed_connects: int
    buffered: int
    fallbacks: int = 0
    failures: dict[str, int] = field(default_factory=_zero_failures)



class _Pump:
    """One direction of a relayed connection: source socket → pipe (or buffer) → destination.

    Reads only while nothing is pending, so at most one read is ever held; when the
    destination would block, reading stops until it is writable again.
    """

    __slots__ = (
        "buf",
        "capacity",
        "dfd",
        "draining",
        "dst",
        "eof",
        "fin_sent",
        "link",
        "loop",
        "nbytes",
        "off",
        "pending",
        "pipe_r",
        "pipe_w",
        "prefix",
        "reading",
        "sfd",
        "side",
        "src",
        "writing",
    )

    def __init__(
        self, link: _Link, src: socket.socket, dst: socket.socket, side: str, prefix: bytes
    ) -> None:
        self.link = link
        self.loop = link.loop
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        #: ``up`` (client → upstream) or ``down`` (upstream → client), for logs.
        self.side = side
        #: Bytes to write before anything read from the source (the PROXY header).
        self.prefix = prefix
        self.pipe_r = self.pipe_w = -1
        self.buf: memoryview | None = None
        self.capacity = COPY_CHUNK
        #: Bytes read from the source and not yet written (in the pipe or the buffer).
        self.pending = 0
        #: Offset of the pending bytes in the copy buffer.
        self.off = 0
        #: Bytes read from the source.
        self.nbytes = 0
        self.eof = False
        self.fin_sent = False
        self.draining = False
        self.reading = False
        self.writing = False

    # -- set-up -----------------------------------------------------------------------------

    def open(self, splice: bool) -> None:
        """Take a pipe for splice, or a buffer when splice is off or the pipe is refused."""
        if splice:
            try:
                self.pipe_r, self.pipe_w, self.capacity = open_pipe()
                return
            except OSError as exc:
                self.link.fell_back(f"no pipe for the {self.side} direction: {exc}")
        self._use_copy()

    def _use_copy(self) -> None:
        self._close_pipe()
        self.buf = memoryview(bytearray(COPY_CHUNK))
        self.capacity = COPY_CHUNK

    def _close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1

    def start(self) -> None:
        """Write the prefix, then start reading the source."""
        if self._flush():
            self._want_read()

    # -- readiness callbacks ----------------------------------------------------------------

    def _on_readable(self) -> None:
        link = self.link
        for _ in range(READS_PER_WAKEUP):
            try:
                if self.pipe_w >= 0:
                    n = os.splice(self.sfd, self.pipe_w, self.capacity, flags=SPLICE_FLAGS)
                else:
                    assert self.buf is not None
                    n = self.src.recv_into(self.buf)
                    self.off = 0
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.pipe_w >= 0 and self.pending == 0:
                    link.fell_back(f"splice refused the {self.side} direction: {exc}")
                    self._use_copy()
                    continue
                link.failed(self, exc, "reading")
                return
            if n == 0:
                self._got_eof()
                return
            self.nbytes += n
            self.pending = n
            link.last_activity = _monotonic()
            if not self._flush():
                return

    def _on_writable(self) -> None:
        if not self._flush():
            return
        if self.eof:
            self._send_fin()
        elif self.draining:
            self.link.pump_drained()
        else:
            self._want_read()

    # -- moving bytes -----------------------------------------------------------------------

    def _flush(self) -> bool:
        """Write the prefix and everything pending; False when the destination would block.

        Registers for writability when it would block, and stops reading meanwhile.
        """
        try:
            while self.prefix:
                k = self.dst.send(self.prefix)
                self.prefix = self.prefix[k:]
            while self.pending:
                if self.pipe_r >= 0:
                    k = os.splice(self.pipe_r, self.dfd, self.pending, flags=SPLICE_FLAGS)
                else:
                    assert self.buf is not None
                    k = self.dst.send(self.buf[self.off : self.off + self.pending])
                    self.off += k
                if k <= 0:  # pragma: no cover - a TCP socket never accepts 0 bytes
                    raise BlockingIOError
                self.pending -= k
        except BlockingIOError:
            self._stop_read()
            self._want_write()
            return False
        except OSError as exc:
            self.link.failed(self, exc, "writing")
            return False
        self._stop_write()
        return True

    def _got_eof(self) -> None:
        self.eof = True
        self._stop_read()
        if not self.pending and not self.prefix:
            self._send_fin()

    def _send_fin(self) -> None:
        if self.fin_sent:
            return
        self.fin_sent = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the peer is gone already; its own pump reports that
            log.debug("%s: FIN %s: %s", self.link.cid, self.side, exc)
        self.link.fin_passed()

    # -- registration -----------------------------------------------------------------------

    def _want_read(self) -> None:
        if not self.reading and not self.eof and not self.draining:
            self.reading = True
            self.loop.add_reader(self.sfd, self._on_readable)

    def _stop_read(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sfd)

    def _want_write(self) -> None:
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dfd, self._on_writable)

    def _stop_write(self) -> None:
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dfd)

    # -- ending -----------------------------------------------------------------------------

    def drain(self) -> bool:
        """Stop reading; True when nothing is left to write (else the writer finishes it)."""
        self.draining = True
        self._stop_read()
        return not self.pending and not self.prefix

    def held(self) -> int:
        """Bytes read and not yet written, plus an unsent prefix."""
        return self.pending + len(self.prefix)

    def close(self) -> None:
        """Unregister from the loop and release the pipe (the link closes the sockets)."""
        self._stop_read()
        self._stop_write()
        self._close_pipe()
        self.buf = None
        self.pending = 0


class _Link:
    """One relayed connection: the client socket, the connect step, then two pumps."""

    __slots__ = (
        "cid",
        "client",
        "connect_task",
        "counted_reset",
        "down",
        "finished",
        "fwd",
        "idled",
        "last_activity",
        "loop",
        "started",
        "up",
        "upstream",
    )

    def __init__(self, fwd: TcpForward, cid: str, client: socket.socket) -> None:
        self.fwd = fwd
        self.loop = asyncio.get_running_loop()
        self.cid = cid
        self.client = client
        self.upstream: socket.socket | None = None
        self.up: _Pump | None = None
        self.down: _Pump | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.finished = False
        self.started = _monotonic()
        #: When a byte last moved in either direction (set at pairing, then per read).
        self.last_activity = self.started
        #: The idle sweep closed this link (so it is counted once).
        self.idled = False
        self.counted_reset = False

    # -- connecting -------------------------------------------------------------------------

    def connect(self, host: str, port: int) -> None:
        """Start the upstream connect; the pumps start when it succeeds."""
        self.connect_task = self.loop.create_task(
            self._connect(host, port), name=f"{self.cid} connect"
        )

    async def _connect(self, host: str, port: int) -> None:
        timeout = self.fwd.spec.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                sock = await _open_connection(self.loop, host, port, self.fwd.spec.netns)
        except TimeoutError:
            self._connect_failed(host, port, f"no answer within {timeout:g} s",
                                 FailureReason.TIMEOUT)
        except OSError as exc:
            text = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
            self._connect_failed(host, port, text, _connect_failure_reason(exc))
        except asyncio.CancelledError:
            # stop() or reset(): the client gets a RST.
            self.connect_task = None
            self.finish(reset=True)
            raise
        else:
            self.connect_task = None
            self._pair(sock)
        finally:
            self.connect_task = None

    def _connect_failed(self, host: str, port: int, text: str, reason: FailureReason) -> None:
        self.fwd.count_failure(reason)
        log.warning("%s: connect to %s failed (%s): %s; resetting the client",
                    self.cid, format_addr(host, port), reason, text)
        self.connect_task = None
        self.finish(reset=True)

    def _pair(self, upstream: socket.socket) -> None:
        """Start both pumps; the PROXY header (if any) goes first on the upstream."""
        self.upstream = upstream
        if self.finished or self.fwd.closing:
            log.debug("%s: forward stopping; dropping the new upstream connection", self.cid)
            self.finish(reset=True)
            return
        with contextlib.suppress(OSError):
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        prefix = b""
        version = self.fwd.spec.proxy_protocol
        if version is not None:
            header = _proxy_header(version, self.client)
            log.debug("%s: PROXY header %r", self.cid, header)
            prefix = bytes(header)
        splice = self.fwd.spec.splice
        self.up = _Pump(self, self.client, upstream, "up", prefix)
        self.down = _Pump(self, upstream, self.client, "down", b"")
        self.up.open(splice)
        self.down.open(splice)
        self.last_activity = _monotonic()
        log.debug("%s: connected to %s (%s)", self.cid, _peer(upstream),
                  "splice" if self.up.pipe_w >= 0 else "copy")
        self.up.start()
        if not self.finished:
            self.down.start()

    # -- events from the pumps --------------------------------------------------------------

    def fell_back(self, why: str) -> None:
        """A pump could not splice; it relays with recv/send instead."""
        self.fwd.count_fallback()
        log.info("%s: %s; copying with recv/send instead", self.cid, why)

    def failed(self, pump: _Pump, exc: OSError, doing: str) -> None:
        """A socket failed: reset both sides, count it once."""
        log.debug("%s: %s %s side: %r; resetting both sides", self.cid, doing,
                  "source" if doing == "reading" else "destination", exc)
        self.count_reset()
        self.finish(reset=True)

    def fin_passed(self) -> None:
        """A FIN was passed on; once both directions are done the sockets close."""
        if self.up is not None and self.down is not None and self.up.fin_sent \
                and self.down.fin_sent:
            self.finish(reset=False)

    def pump_drained(self) -> None:
        """A draining pump wrote its last byte; close when both are done."""
        if all(p is None or (p.draining and not p.held()) for p in (self.up, self.down)):
            self.finish(reset=False)

    # -- ending -----------------------------------------------------------------------------

    def close(self, why: str) -> None:
        """Stop reading; close both sockets once what the relay holds is written."""
        log.debug("%s: closing: %s", self.cid, why)
        if self.connect_task is not None:
            self.reset()
            return
        drained = [p.drain() for p in (self.up, self.down) if p is not None]
        if all(drained):
            self.finish(reset=False)

    def reset(self) -> None:
        """Abort both sockets with RST and cancel a pending connect."""
        task = self.connect_task
        if task is not None:
            task.cancel()  # its handler finishes the link
            return
        self.finish(reset=True)

    def idle_out(self, idle_for: float) -> None:
        """Close a link the idle sweep found silent; reset it if bytes are held."""
        self.idled = True
        self.fwd.count_failure(FailureReason.IDLE)
        stuck = self.buffered()
        log.info("%s: no data for %.1f s; %s", self.cid, idle_for,
                 f"resetting ({stuck} B unsent)" if stuck else "closing")
        if stuck:
            self.reset()
        else:
            self.close("idle")

    def count_reset(self) -> None:
        """Count this link as ended by a failed socket, once."""
        if not self.counted_reset:
            self.counted_reset = True
            self.fwd.count_failure(FailureReason.RESET)

    def finish(self, *, reset: bool) -> None:
        """Release everything: pumps, pipes, sockets (RST when ``reset``); unregister."""
        if self.finished:
            return
        self.finished = True
        for pump in (self.up, self.down):
            if pump is not None:
                pump.close()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self.fwd.link_finished(self)
        log.debug("%s: %s after %.3f s, up %d B, down %d B", self.cid,
                  "reset" if reset else "closed", _monotonic() - self.started,
                  self.bytes_up, self.bytes_down)

    # -- accounting -------------------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        """Bytes read from the client."""
        return self.up.nbytes if self.up is not None else 0

    @property
    def bytes_down(self) -> int:
        """Bytes read from the upstream."""
        return self.down.nbytes if self.down is not None else 0

    @property
    def relaying(self) -> bool:
        """Both pumps exist and the link is not closing."""
        return self.up is not None and not self.finished and not self.up.draining

    def buffered(self) -> int:
        """Bytes the relay holds for this connection."""
        return sum(p.held() for p in (self.up, self.down) if p is not None)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return format_addr(str(host), int(port))


async def _open_connection(
    loop: asyncio.AbstractEventLoop, host: str, port: int, netns: str = ""
) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` (each resolved address in turn),
    made in the network namespace at ``netns`` if one is given (a container's).

    Raises:
        OSError: The connect failed; for several addresses, one error naming every errno.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs: list[tuple[int, Any]] = [(family, addr) for family, _, _, _, addr in infos]
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        addrs = [(family, (host, port))]
    errors: list[OSError] = []
    for af, sockaddr in addrs:
        sock = namespace_sockets(netns).socket(af, socket.SOCK_STREAM) if netns else \
            socket.socket(af, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1:
        raise errors[0]
    raise OSError("Multiple exceptions: " + ", ".join(str(e) for e in errors))


def _proxy_endpoint(sockaddr: object) -> tuple[str, int] | None:
    """``(host, port)`` of an IP socket address (2- or 4-tuple), else ``None``."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None
    host, port = sockaddr[0], sockaddr[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    return host, port


def _proxy_header(version: int, client: socket.socket) -> ProxyHeader:
    """The PROXY header for a client socket: its peer as source, its local end as dest."""
    try:
        source = _proxy_endpoint(client.getpeername())
        destination = _proxy_endpoint(client.getsockname())
    except OSError:
        source = destination = None
    if source is None or destination is None:
        return ProxyHeader(version=version)  # UNKNOWN / UNSPEC: endpoints not IP
    try:
        src_ip, dst_ip = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    except ValueError:
        return ProxyHeader(version=version)
    if isinstance(src_ip, ipaddress.IPv6Address) and isinstance(dst_ip, ipaddress.IPv6Address):
        src4, dst4 = src_ip.ipv4_mapped, dst_ip.ipv4_mapped
        if src4 is not None and dst4 is not None:  # dual-stack listener, IPv4 client
            source, destination = (str(src4), source[1]), (str(dst4), destination[1])
    return ProxyHeader.for_stream(source, destination, version=version)


_nofile_raised = False


def raise_fd_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, once per process.

    A spliced connection holds six descriptors (two sockets, two pipes); the common soft
    limit of 1024 would cap a forward at ~170 connections.
    """
    global _nofile_raised  # noqa: PLW0603 - once per process, like the kernel limit itself
    if _nofile_raised:
        return
    _nofile_raised = True
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("RLIMIT_NOFILE raised from %d to %d", soft, target)


async def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening non-blocking sockets on every address ``host`` resolves to.

    With port 0 all of them share the port the first one got.

    Raises:
        PortInUse: The port is taken.
        OSError: Any other bind failure.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    seen: set[tuple[int, object]] = set()
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" alone serves IPv4 too (like docker); a specific v6 address only v6.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                0 if sockaddr[0] == "::" and len(infos) == 1 else 1)
            addr = sockaddr
            if port == 0 and len(socks) > 1:
                addr = (sockaddr[0], socks[0].getsockname()[1], *sockaddr[2:])
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port) from exc
                raise
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class TcpForward(Forward):
    """A host TCP listener relaying every connection to a target address.

    Lifecycle is ``start() → serve → stop()``; ``async with TcpForward(spec) as fwd`` does
    both. Everything runs as readiness callbacks on the running loop; the only task per
    connection is the upstream connect step, and it ends when the pumps start.

    Example:
        >>> spec = TcpForwardSpec(listen_port=15901, target_host="10.77.0.2", target_port=5901)
        >>> async with TcpForward(spec) as fwd:  # doctest: +SKIP
        ...     await serve_forever()
    """

    def __init__(self, spec: TcpForwardSpec) -> None:
        """Prepare a forward; nothing is bound until :meth:`start`.

        Args:
            spec: Listen and target addresses, timeouts, limits and data path.
        """
        super().__init__(name=spec.name, target=(spec.target_host, spec.target_port))
        self.spec = spec
        self._listeners: list[socket.socket] = []
        self._started = False
        self._seq = itertools.count(1)
        self._links: set[_Link] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._accept_retry: asyncio.TimerHandle | None = None
        # Counters of finished connections; live ones are summed in at snapshot time so the
        # data path only touches its own pump per read.
        self._total = 0
        self._fallbacks = 0
        self._failures = _zero_failures()
        self._done_up = 0
        self._done_down = 0

    # -- properties -------------------------------------------------------------------------

    @property
    def bound_port(self) -> int:
        """The port actually bound (the ephemeral one when ``listen_port`` was 0).

        Raises:
            RuntimeError: The forward is not started.
        """
        if not self._listeners:
            raise RuntimeError("TcpForward is not started")
        port: int = self._listeners[0].getsockname()[1]
        return port

    @property
    def data_path(self) -> str:
        """``splice`` or ``copy``: what new connections start on."""
        return "splice" if self.spec.splice else "copy"

    @property
    def active_count(self) -> int:
        """Connections accepted and not yet fully closed (what ``max_connections`` bounds)."""
        return len(self._links)

    @property
    def stats(self) -> TcpForwardStats:
        """A consistent snapshot of the counters."""
        up, down, buffered = self._done_up, self._done_down, 0
        for link in self._links:
            up += link.bytes_up
            down += link.bytes_down
            buffered += link.buffered()
        return TcpForwardStats(
            active=len(self._links),
            total=self._total,
            bytes_up=up,
            bytes_down=down,
            failed_connects=sum(self._failures[r] for r in CONNECT_FAILURES),
            buffered=buffered,
            fallbacks=self._fallbacks,
            failures=dict(self._failures),
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener (``SO_REUSEADDR``, backlog :data:`LISTEN_BACKLOG`).

        Raises:
            PortInUse: The host port is taken.
            OSError: Any other bind failure (address not available, permission).
            RuntimeError: Already started or stopped.
        """
        if self._started or self._closing:
            raise RuntimeError("TcpForward can be started once")
        self._started = True
        raise_fd_limit()
        spec = self.spec
        self._listeners = await _bind(spec.listen_host, spec.listen_port)
        if not self._label:
            self._label = f"tcp:{self.bound_port}"
        self._listen()
        log.info("%s: listening on %s, relaying to %s (%s)", self._label,
                 format_addr(spec.listen_host, self.bound_port), format_addr(*self._target),
                 self.data_path)
        self._schedule_sweep()

    def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for lsock in self._listeners:
            loop.add_reader(lsock.fileno(), self._on_accept, lsock)

    def _unlisten(self) -> None:
        loop = asyncio.get_running_loop()
        for lsock in self._listeners:
            loop.remove_reader(lsock.fileno())

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Close the listener and every connection, and wait until all are gone.

        Idempotent. Established connections are closed gracefully (what the relay holds is
        written first, then FIN); whatever has not finished after ``grace`` seconds is
        reset. Pending upstream connects are cancelled and their clients reset.

        Args:
            grace: Seconds closing connections may take to flush before they are reset.
        """
        already = self._closing
        self._closing = True
        for handle in (self._sweep_handle, self._accept_retry):
            if handle is not None:
                handle.cancel()
        self._sweep_handle = self._accept_retry = None
        listeners, self._listeners = self._listeners, []
        if listeners:
            loop = asyncio.get_running_loop()
            for lsock in listeners:
                loop.remove_reader(lsock.fileno())
                lsock.close()
        for link in list(self._links):
            link.close("forward stopping")
        if self._links:
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                log.info("%s: %d connection(s) did not drain in %g s; resetting",
                         self._label, len(self._links), grace)
                for link in list(self._links):
                    link.reset()
        await self._idle.wait()  # cancelled connects finish on their next loop pass
        if listeners and not already:
            log.info("%s: stopped", self._label)

    # -- accepting --------------------------------------------------------------------------

    def _on_accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    log.error("%s: cannot accept: %s; pausing for %g s", self._label,
                              os.strerror(exc.errno or 0), ACCEPT_RETRY)
                    self._unlisten()
                    self._accept_retry = asyncio.get_running_loop().call_later(
                        ACCEPT_RETRY, self._resume_accept)
                    return
                log.debug("%s: accept: %s", self._label, exc)  # e.g. ECONNABORTED
                continue
            self._accepted(conn)

    def _resume_accept(self) -> None:
        self._accept_retry = None
        if not self._closing:
            self._listen()

    def _accepted(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = f"{self._label}#{next(self._seq)}"
        self._total += 1
        limit = self.spec.max_connections
        if limit is not None and len(self._links) >= limit:
            self.count_failure(FailureReason.LIMIT)
            log.info("%s: %d connections active (limit); resetting the client from %s",
                     cid, limit, _peer(conn))
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            conn.close()
            return
        link = _Link(self, cid, conn)
        self._links.add(link)
        self._idle.clear()
        host, port = self._target
        log.debug("%s: accepted from %s, connecting to %s", cid, _peer(conn),
                  format_addr(host, port))
        link.connect(host, port)

    # -- callbacks from links ---------------------------------------------------------------

    def link_finished(self, link: _Link) -> None:
        """Unregister a link whose sockets are closed; fold its byte counts in."""
        self._links.discard(link)
        self._done_up += link.bytes_up
        self._done_down += link.bytes_down
        if not self._links:
            self._idle.set()

    def count_failure(self, reason: FailureReason) -> None:
        """Count one failure under ``reason``."""
        self._failures[reason.value] += 1

    def count_fallback(self) -> None:
        """Count one direction of a connection that could not splice."""
        self._fallbacks += 1

    # -- idle sweep -------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        interval = self.spec.idle_sweep_interval
        if interval is None or self._closing:
            return
        loop = asyncio.get_running_loop()
        self._sweep_handle = loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close every relaying link that has been silent for ``idle_timeout``; re-arm."""
        self._sweep_handle = None
        idle = self.spec.idle_timeout
        if idle is None or self._closing:
            return
        now = _monotonic()
        for link in list(self._links):
            # Only relaying links: a connecting one is bounded by connect_timeout.
            if link.idled or not link.relaying:
                continue
            silent = now - link.last_activity
            if silent >= idle:
                link.idle_out(silent)
        self._schedule_sweep()
