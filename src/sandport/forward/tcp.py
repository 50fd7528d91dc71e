"""Userspace TCP relay: a host listener whose connections are relayed to a target address.

One :class:`TcpForward` owns one listening socket. Every accepted client gets exactly one
upstream connection to the current target; two :class:`asyncio.Protocol` objects (one per
socket) are then paired and move bytes between the transports directly: no streams, no
per-connection task once the upstream is connected. Works with the default asyncio loop and
with uvloop.

Semantics of one relayed connection (RFC 9293 terms)::

    client ──► [client half] ──write──► upstream transport ──► target
    client ◄── client transport ◄──write── [upstream half] ◄── target

* Backpressure: when a transport's write buffer rises above :data:`WRITE_HIGH_WATER`, its
  protocol's ``pause_writing()`` pauses *reading* on the other half; ``resume_writing()``
  (buffer below :data:`WRITE_LOW_WATER`) resumes it. Per direction at most one high-water
  mark plus one socket read is held in user space.
* Half-close (RFC 9293 §3.6): a FIN from one side is passed on as ``write_eof()``
  (``shutdown(SHUT_WR)``) once everything before it was sent; the other direction keeps
  flowing. When both directions have seen FIN, both transports are closed (after flushing).
* Reset: when one side is lost with an error (RST, write error) the other side is aborted
  with ``SO_LINGER {on, 0}``, so it sees a RST too instead of a clean FIN. A clean loss
  closes the other side gracefully after its pending writes.
* Connect failure (refused, unreachable, timeout): the client is reset and counted under
  its reason in ``failures`` (``ECONNREFUSED`` → ``refused``; ``EHOSTUNREACH``,
  ``ENETUNREACH`` and any other connect error → ``unreachable``; no handshake within
  ``connect_timeout`` or ``ETIMEDOUT`` → ``timeout``). ``failed_connects`` is their sum.
* Failure counters (``TcpForwardStats.failures``, keys from :class:`FailureReason`): the
  three connect reasons above, plus ``limit`` (rejected by ``max_connections``), ``idle``
  (closed by ``idle_timeout``) and ``reset`` (a relayed connection that ended because one
  side was lost with an error: RST, write error; counted once per connection).
* Idle timeout (``TcpForwardSpec.idle_timeout``): a paired connection that moved no byte in
  either direction for that long is closed on both sides (gracefully; reset instead when
  bytes are still stuck in a write buffer, since a peer that does not read would hold the
  close forever) and counted as ``idle``. Cheap by design: ``data_received`` only stores a
  monotonic timestamp on the link; one timer per forward sweeps all links every
  ``min(`` :data:`IDLE_SWEEP_MAX` ``, idle_timeout / 4)`` seconds, so a silent connection is
  closed between ``idle_timeout`` and ``idle_timeout + sweep`` after its last byte.
* Connection limit (``TcpForwardSpec.max_connections``): a client accepted while that many
  connections are active (connecting or relaying) is reset at once (``SO_LINGER {1, 0}``,
  so it sees RST), never connected upstream, and counted as ``limit``; existing connections
  are untouched. ``total`` still counts it.
* PROXY protocol (``TcpForwardSpec.proxy_protocol`` = 1 or 2; HAProxy spec, built with
  :mod:`sandport.proto.proxyproto`): the first bytes written to the upstream are a PROXY
  header with the client's address and port as source and the listener's address and port
  (``getsockname()`` of the accepted socket) as destination, before any client byte. An
  IPv4-mapped IPv6 pair (dual-stack listener) is sent as TCP4. Should the endpoints not be
  IP addresses, the header says UNKNOWN (v1) / UNSPEC (v2). The header is not counted in
  ``bytes_up``.
* Nothing sent by either side before the pair exists is lost or reordered: the client is
  held (reading paused) while the upstream connects. ``pause_reading()`` called from
  ``connection_made()`` is ignored by uvloop (it starts reading right after
  ``connection_made`` returns; cf. CPython gh-103607 for the same bug in asyncio), so a
  half that is not yet paired keeps whatever arrives (at most one read) plus a pending EOF,
  pauses itself, and hands both over when the pair is formed.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import itertools
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Final, cast

from sandport.forward.base import Forward, PortInUse, check_ports, format_addr
from sandport.proto.proxyproto import ProxyHeader

__all__ = [
    "IDLE_SWEEP_MAX",
    "LISTEN_BACKLOG",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "FailureReason",
    "PortInUse",
    "TcpForward",
    "TcpForwardSpec",
    "TcpForwardStats",
]

log = logging.getLogger(__name__)

#: ``listen(2)`` backlog of the host listener.
LISTEN_BACKLOG = 512
#: Write buffer size of one transport above which the other half stops reading.
WRITE_HIGH_WATER = 256 * 1024
#: Write buffer size below which the other half reads again.
WRITE_LOW_WATER = 64 * 1024
#: Default time :meth:`TcpForward.stop` lets closing connections flush before resetting them.
STOP_GRACE = 2.0
#: Longest interval between two idle sweeps (shorter for short idle timeouts: ``idle / 4``).
IDLE_SWEEP_MAX = 1.0

#: ``struct linger {int l_onoff; int l_linger;}`` = {1, 0}: close(2) sends RST, drops the buffer.
_LINGER_RESET = struct.pack("ii", 1, 0)
_PROXY_VERSIONS: Final = (1, 2)


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
    #: A relayed connection ended because one side was lost with an error (RST).
    RESET = "reset"


#: Reasons that count as a failed upstream connect (``failed_connects``).
CONNECT_FAILURES: Final = (FailureReason.REFUSED, FailureReason.UNREACHABLE, FailureReason.TIMEOUT)
_ERRNO_REASONS: Final = {
    errno.ECONNREFUSED: FailureReason.REFUSED,
    errno.EHOSTUNREACH: FailureReason.UNREACHABLE,
    errno.ENETUNREACH: FailureReason.UNREACHABLE,
    errno.ETIMEDOUT: FailureReason.TIMEOUT,
}
#: asyncio reports several failed addresses of one name as a single OSError without errno
#: ("Multiple exceptions: [Errno 111] ..., [Errno 111] ..."); the errnos are in its text.
_ERRNO_IN_TEXT: Final = re.compile(r"\[Errno (\d+)\]")


def _connect_failure_reason(exc: OSError) -> FailureReason:
    """Map a failed ``create_connection`` to a :class:`FailureReason`."""
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
        listen_host: Host address to bind.
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

    def __post_init__(self) -> None:
        """Check ranges once, so bad configuration fails before any socket exists.

        Raises:
            ValueError: A port is out of range, a timeout is not positive, the connection
                limit is below 1 or the PROXY protocol version is not 1 or 2.
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

    @property
    def idle_sweep_interval(self) -> float | None:
        """Seconds between idle sweeps: ``min(IDLE_SWEEP_MAX, idle_timeout / 4)``, or None."""
        if self.idle_timeout is None:
            return None
        return min(IDLE_SWEEP_MAX, self.idle_timeout / 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpForwardStats:
    """A snapshot of a forward's counters.

    Attributes:
        active: Connections accepted and not yet fully closed (including ones still
            connecting upstream).
        total: Connections accepted since start.
        bytes_up: Bytes received from clients and passed to targets.
        bytes_down: Bytes received from targets and passed to clients.
        failed_connects: Upstream connects that failed: the sum of ``failures`` for
            ``refused``, ``unreachable`` and ``timeout``.
        buffered: Bytes currently held in user space by the relay (write buffers of all
            live transports plus data held before pairing). Bounded by backpressure.
        failures: Count per :class:`FailureReason` value (every key present).
    """

    active: int
    total: int
    bytes_up: int
    bytes_down: int
    failed_connects: int
    buffered: int
    failures: dict[str, int] = field(default_factory=_zero_failures)


class _Half(asyncio.Protocol):
    """Protocol of one socket of a relayed connection; forwards its input to the peer."""

    __slots__ = (
        "early",
        "eof",
        "link",
        "lost",
        "made",
        "nbytes",
        "out",
        "peer",
        "transport",
        "write_paused",
    )

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        #: The peer's transport once paired; what data_received writes to.
        self.out: asyncio.Transport | None = None
        #: Data received before pairing (at most one read: the half pauses itself).
        self.early: list[bytes] = []
        self.nbytes = 0
        self.made = False
        self.lost = False
        self.eof = False
        self.write_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        self.made = True
        # Effective on asyncio; uvloop ignores it here (see module docstring).
        t.pause_reading()
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # pragma: no cover - the socket vanished under us
                log.debug("%s: TCP_NODELAY: %s", self.link.cid, exc)
        self.link.half_made(self)

    def data_received(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            self.nbytes += len(data)
            self.link.last_activity = _monotonic()
            out.write(data)
            return
        # Not paired yet: hold the data and stop reading until the pair exists.
        self.early.append(data)
        transport = self.transport
        if transport is not None:
            transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None:
            peer.send_eof()
            if peer.eof:
                self.link.close("both sides sent FIN")
        # Keep the transport open: the other direction may still be flowing.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.out = None
        if exc is not None:
            self.link.count_reset()
        peer = self.peer
        if peer is not None and not peer.lost:
            if exc is not None:
                log.debug(
                    "%s: %s side lost: %r; resetting the other side", self.link.cid, self.side, exc
                )
                peer.reset()
            else:
                peer.close()
        self.link.half_lost(self, exc)

    def pause_writing(self) -> None:
        # Our transport's buffer is full: stop the half that feeds it.
        self.write_paused = True
        peer = self.peer
        if peer is not None:
            peer.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer
        if peer is not None:
            peer.resume()

    # -- used by the link and the peer ------------------------------------------------------

    @property
    def side(self) -> str:
        """``client`` or ``upstream``, for logs."""
        return "client" if self is self.link.client else "upstream"

    def pause(self) -> None:
        """Stop reading from this socket (no-op after its FIN: the transport stopped already)."""
        t = self.transport
        if t is not None and not self.eof:
            t.pause_reading()

    def resume(self) -> None:
        """Read again, unless this socket sent FIN or the peer's write buffer is full."""
        t = self.transport
        peer = self.peer
        if t is None or peer is None or self.eof or peer.write_paused:
            return
        # resume_reading() on a transport after EOF would read the EOF again; eof guards it.
        t.resume_reading()

    def send_eof(self) -> None:
        """Half-close the write side of this socket after its buffer drains."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        if t.can_write_eof():
            t.write_eof()
        else:  # pragma: no cover - TCP transports can always write EOF
            t.close()

    def close(self) -> None:
        """Close this socket gracefully: pending writes are sent first, then FIN."""
        t = self.transport
        if t is not None and not self.lost:
            t.close()

    def reset(self) -> None:
        """Abort this socket with RST (``SO_LINGER {1, 0}``), dropping pending writes."""
        t = self.transport
        if t is None or self.lost:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError as exc:  # pragma: no cover - the socket vanished under us
                log.debug("%s: SO_LINGER: %s", self.link.cid, exc)
        t.abort()

    def buffered(self) -> int:
        """Bytes this half holds in user space: its transport's write buffer and early data."""
        n = sum(len(b) for b in self.early)
        t = self.transport
        if t is not None and not self.lost:
            n += t.get_write_buffer_size()
        return n


_monotonic = time.monotonic


class _Link:
    """One relayed connection: the client half, the upstream half and the connect step."""

    __slots__ = (
        "cid",
        "client",
        "connect_task",
        "counted_reset",
        "finished",
        "fwd",
        "idled",
        "last_activity",
        "started",
        "upstream",
    )

    def __init__(self, fwd: TcpForward, cid: str) -> None:
        self.fwd = fwd
        self.cid = cid
        self.client = _Half(self)
        self.upstream: _Half | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.finished = False
        self.started = _monotonic()
        #: When a byte last moved in either direction (set at pairing, then per read).
        self.last_activity = self.started
        #: The idle sweep closed this link (so it is counted once).
        self.idled = False
        self.counted_reset = False

    def half_made(self, half: _Half) -> None:
        """A transport was created for ``half``; for the client half, start the connect."""
        if half is not self.client:
            return
        fwd = self.fwd
        limit = fwd.spec.max_connections
        if limit is not None and fwd.active_count >= limit and not fwd.closing:
            fwd.reject(self, limit)
            return
        fwd.link_started(self)
        if fwd.closing:
            log.debug("%s: forward is stopping; refusing the client", self.cid)
            half.reset()
            return
        host, port = fwd.target
        peer = half.transport.get_extra_info("peername") if half.transport else None
        log.debug(
            "%s: accepted from %s, connecting to %s", self.cid, peer, format_addr(host, port)
        )
        self.connect_task = asyncio.get_running_loop().create_task(
            self._connect(host, port), name=f"{self.cid} connect"
        )

    async def _connect(self, host: str, port: int) -> None:
        """Connect upstream (bounded by the spec's timeout), then pair the halves."""
        loop = asyncio.get_running_loop()
        timeout = self.fwd.spec.connect_timeout
        try:
            try:
                async with asyncio.timeout(timeout):
                    await loop.create_connection(self._new_upstream, host, port)
            except TimeoutError:
                self._connect_failed(
                    host, port, f"no answer within {timeout:g} s", FailureReason.TIMEOUT
                )
                return
            except OSError as exc:
                text = os.strerror(exc.errno) if exc.errno else str(exc)
                self._connect_failed(host, port, text, _connect_failure_reason(exc))
                return
            except asyncio.CancelledError:
                # stop() or the client went away; create_connection closed its transport.
                self.client.reset()
                raise
            self._pair()
        finally:
            self.connect_task = None
            self.maybe_finished()

    def _new_upstream(self) -> _Half:
        half = _Half(self)
        self.upstream = half
        return half

    def _connect_failed(self, host: str, port: int, text: str, reason: FailureReason) -> None:
        self.fwd.count_failure(reason)
        log.warning(
            "%s: connect to %s failed (%s): %s; resetting the client",
            self.cid,
            format_addr(host, port),
            reason,
            text,
        )
        self.client.reset()

    def _pair(self) -> None:
        """Join both halves, hand over anything that arrived early, and start reading."""
        client, upstream = self.client, self.upstream
        # create_connection() returns after the factory and connection_made() ran, so
        # upstream and both transports exist; the check keeps mypy and odd loops honest.
        ct = client.transport
        ut = upstream.transport if upstream is not None else None
        if (
            upstream is None
            or ct is None
            or ut is None
            or client.lost
            or upstream.lost
            or self.fwd.closing
        ):
            log.debug("%s: gone before the upstream connection was paired", self.cid)
            client.reset()
            if upstream is not None:
                upstream.close()
            return
        client.peer, upstream.peer = upstream, client
        client.out, upstream.out = ut, ct
        self.last_activity = _monotonic()
        log.debug("%s: connected to %s", self.cid, ut.get_extra_info("peername"))
        version = self.fwd.spec.proxy_protocol
        if version is not None:
            # Before anything the client sent: the upstream reads the header first.
            header = _proxy_header(version, ct)
            log.debug("%s: PROXY header %r", self.cid, header)
            ut.write(bytes(header))
        for half, out in ((client, ut), (upstream, ct)):
            if half.early or half.eof:
                log.debug(
                    "%s: handing over %d early byte(s)%s from the %s side",
                    self.cid,
                    sum(map(len, half.early)),
                    " and FIN" if half.eof else "",
                    half.side,
                )
            for chunk in half.early:
                half.nbytes += len(chunk)
                out.write(chunk)
            half.early.clear()
        # A FIN that arrived early goes out after the early data, like any other FIN.
        if client.eof:
            upstream.send_eof()
        if upstream.eof:
            client.send_eof()
        if client.eof and upstream.eof:
            self.close("both sides sent FIN before pairing")
            return
        client.resume()
        upstream.resume()

    def close(self, why: str) -> None:
        """Close both sockets gracefully (each flushes its write buffer first)."""
        log.debug("%s: closing: %s", self.cid, why)
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def idle_out(self, idle_for: float) -> None:
        """Close a link the idle sweep found silent; reset it if bytes are stuck in a buffer."""
        self.idled = True
        self.fwd.count_failure(FailureReason.IDLE)
        stuck = self.buffered()
        log.info(
            "%s: no data for %.1f s; %s",
            self.cid,
            idle_for,
            f"resetting ({stuck} B unsent)" if stuck else "closing",
        )
        if stuck:
            self.reset()
        else:
            self.close("idle")

    def count_reset(self) -> None:
        """Count a socket of this link lost with an error, once per link."""
        if not self.counted_reset:
            self.counted_reset = True
            self.fwd.count_failure(FailureReason.RESET)

    def reset(self) -> None:
        """Abort both sockets with RST and cancel a pending connect."""
        task = self.connect_task
        if task is not None:
            task.cancel()
        self.client.reset()
        if self.upstream is not None:
            self.upstream.reset()

    def half_lost(self, half: _Half, exc: Exception | None) -> None:
        """Account for a lost socket; a client lost while connecting cancels the connect."""
        if half is self.client and self.connect_task is not None:
            self.connect_task.cancel()
        if exc is not None and half.peer is None:  # a paired half logged it already
            log.debug("%s: %s side lost: %r", self.cid, half.side, exc)
        self.maybe_finished()

    def maybe_finished(self) -> None:
        """Unregister the link once no socket and no connect step is left."""
        if self.finished or self.connect_task is not None:
            return
        if not (self.client.lost or not self.client.made):
            return
        up = self.upstream
        if up is not None and up.made and not up.lost:
            return
        self.finished = True
        self.fwd.link_finished(self)
        log.debug(
            "%s: closed after %.3f s, up %d B, down %d B",
            self.cid,
            _monotonic() - self.started,
            self.client.nbytes,
            up.nbytes if up is not None else 0,
        )

    def buffered(self) -> int:
        """Bytes held in user space for this connection."""
        n = self.client.buffered()
        if self.upstream is not None:
            n += self.upstream.buffered()
        return n


def _proxy_endpoint(sockaddr: object) -> tuple[str, int] | None:
    """``(host, port)`` of an IP socket address (2- or 4-tuple), else ``None``."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None
    host, port = sockaddr[0], sockaddr[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    return host, port


def _proxy_header(version: int, client: asyncio.Transport) -> ProxyHeader:
    """The PROXY header for a client transport: its peer as source, its local end as dest."""
    source = _proxy_endpoint(client.get_extra_info("peername"))
    destination = _proxy_endpoint(client.get_extra_info("sockname"))
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


class TcpForward(Forward):
    """A host TCP listener relaying every connection to a target address.

    Lifecycle is ``start() → serve → stop()``; ``async with TcpForward(spec) as fwd`` does
    both. Everything runs as callbacks on the running loop; the only task per connection is
    the upstream connect step, and it ends when the pair is formed.

    Example:
        >>> spec = TcpForwardSpec(listen_port=15901, target_host="10.77.0.2", target_port=5901)
        >>> async with TcpForward(spec) as fwd:  # doctest: +SKIP
        ...     await serve_forever()
    """

    def __init__(self, spec: TcpForwardSpec) -> None:
        """Prepare a forward; nothing is bound until :meth:`start`.

        Args:
            spec: Listen and target addresses and timeouts.
        """
        super().__init__(name=spec.name, target=(spec.target_host, spec.target_port))
        self.spec = spec
        self._server: asyncio.Server | None = None
        self._seq = itertools.count(1)
        self._links: set[_Link] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Counters of finished connections; live ones are summed in at snapshot time so the
        # data path only touches one attribute of its own protocol object per chunk.
        self._total = 0
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
        if self._server is None or not self._server.sockets:
            raise RuntimeError("TcpForward is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def active_count(self) -> int:
        """Connections accepted and not yet fully closed (what ``max_connections`` bounds)."""
        return len(self._links)

    @property
    def stats(self) -> TcpForwardStats:
        """A consistent snapshot of the counters."""
        up, down, buffered = self._done_up, self._done_down, 0
        for link in self._links:
            up += link.client.nbytes
            if link.upstream is not None:
                down += link.upstream.nbytes
            buffered += link.buffered()
        return TcpForwardStats(
            active=len(self._links),
            total=self._total,
            bytes_up=up,
            bytes_down=down,
            failed_connects=sum(self._failures[r] for r in CONNECT_FAILURES),
            buffered=buffered,
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
        if self._server is not None or self._closing:
            raise RuntimeError("TcpForward can be started once")
        loop = asyncio.get_running_loop()
        spec = self.spec
        try:
            self._server = await loop.create_server(
                self._new_client,
                host=spec.listen_host,
                port=spec.listen_port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(spec.listen_host, spec.listen_port) from exc
            raise
        if not self._label:
            self._label = f"tcp:{self.bound_port}"
        log.info(
            "%s: listening on %s, relaying to %s",
            self._label,
            format_addr(spec.listen_host, self.bound_port),
            format_addr(*self._target),
        )
        self._schedule_sweep()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Close the listener and every connection, and wait until all are gone.

        Idempotent. Established connections are closed gracefully (pending writes are
        flushed, then FIN); whatever has not finished after ``grace`` seconds is reset.
        Pending upstream connects are cancelled and their clients reset.

        Args:
            grace: Seconds closing connections may take to flush before they are reset.
        """
        self._closing = True
        server = self._server
        # 1. Stop accepting and sweeping. Connections accepted before this have their
        #    connection_made queued with call_soon; one loop pass lets them register (they
        #    reset themselves).
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if server is not None:
            server.close()
        await asyncio.sleep(0)
        # 2. Cancel connects in progress (their clients are reset) and close the rest.
        for link in list(self._links):
            if link.connect_task is not None:
                link.reset()
            else:
                link.close("forward stopping")
        # 3. Give flushing connections a bounded time, then reset what is left.
        if self._links:
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                log.info(
                    "%s: %d connection(s) did not drain in %g s; resetting",
                    self._label,
                    len(self._links),
                    grace,
                )
                for link in list(self._links):
                    link.reset()
        # 4. Every transport reports connection_lost shortly after abort().
        await self._idle.wait()
        # 5. The server object last: on 3.12+ wait_closed() waits for its connections.
        if server is not None:
            await server.wait_closed()
            log.info("%s: stopped", self._label)

    # -- callbacks from links ---------------------------------------------------------------

    def _new_client(self) -> _Half:
        link = _Link(self, f"{self._label}#{next(self._seq)}")
        return link.client

    def reject(self, link: _Link, limit: int) -> None:
        """Reset a client accepted over ``max_connections``; it never goes upstream."""
        self._total += 1
        self.count_failure(FailureReason.LIMIT)
        log.info("%s: %d connections active (limit); resetting the client", link.cid, limit)
        link.client.reset()

    def link_started(self, link: _Link) -> None:
        """Register a link whose client transport exists."""
        self._links.add(link)
        self._total += 1
        self._idle.clear()

    def link_finished(self, link: _Link) -> None:
        """Unregister a link whose sockets are all closed; fold its byte counts in."""
        self._links.discard(link)
        self._done_up += link.client.nbytes
        if link.upstream is not None:
            self._done_down += link.upstream.nbytes
        if not self._links:
            self._idle.set()

    def count_failure(self, reason: FailureReason) -> None:
        """Count one failure under ``reason``."""
        self._failures[reason.value] += 1

    # -- idle sweep -------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        interval = self.spec.idle_sweep_interval
        if interval is None or self._closing:
            return
        loop = asyncio.get_running_loop()
        self._sweep_handle = loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close every paired link that has been silent for ``idle_timeout``; re-arm."""
        self._sweep_handle = None
        idle = self.spec.idle_timeout
        if idle is None or self._closing:
            return
        now = _monotonic()
        for link in list(self._links):
            # Only relaying links: a connecting one is bounded by connect_timeout.
            ct = link.client.transport
            if link.idled or link.client.peer is None or ct is None or ct.is_closing():
                continue
            silent = now - link.last_activity
            if silent >= idle:
                link.idle_out(silent)
        self._schedule_sweep()
