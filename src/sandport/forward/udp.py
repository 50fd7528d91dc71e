"""Userspace UDP relay: datagrams from a host port are relayed to a target address.

One :class:`UdpForward` owns one unconnected listening socket. Every client address
``(host, port)`` that sends to it gets one *flow*: a UDP socket connected to the target
(``connect(2)`` on a datagram socket, so the kernel drops datagrams from anyone else and
reports ICMP errors on it). Both sockets are asyncio datagram endpoints; their protocols
move datagrams between the transports directly, no task per datagram. Works with the
default asyncio loop and with uvloop.

Semantics of one flow (RFC 768 datagrams, no reliability, no ordering promise)::

    client ──► listener.datagram_received ──► flow transport.sendto() ──► target
    client ◄── listener transport.sendto(data, client) ◄── flow.datagram_received ◄── target

* Boundaries: every datagram is passed on as exactly one datagram; nothing is merged or
  split. Both loops read with buffers larger than the biggest UDP payload (asyncio
  256 KiB, uvloop 250 kB), so a :data:`MAX_DATAGRAM` datagram is never truncated.
  Zero-length datagrams are ignored: asyncio's and uvloop's ``sendto()`` drop them anyway.
* Creating a flow's socket is asynchronous (``create_datagram_endpoint``); datagrams from
  the client that arrive meanwhile are held (at most :data:`MAX_PENDING` per flow) and sent
  in order once the socket exists.
* Idle expiry: a flow that saw no datagram in either direction for ``idle_timeout`` seconds
  is closed. One sweep timer per forward (not one per datagram or per flow) checks every
  ``min(idle_timeout / 4, SWEEP_INTERVAL_MAX)`` seconds, so a flow lives at most that much
  longer than ``idle_timeout``. RFC 4787 §4.3 (REQ-5) asks NATs for at least 2 min;
  protocols that keep a mapping alive with rare keepalives need a longer timeout than the
  60 s default.
* Limit: with ``max_flows`` flows active, a datagram from a new client is dropped and
  counted (``dropped_limit``); existing flows are unaffected.
* ICMP errors (RFC 1122 §4.1.3.3): an error reported on a flow's connected socket
  (``ECONNREFUSED`` for ICMP port unreachable, ``EHOSTUNREACH``...) or a failure to create
  the socket counts as ``target_unreachable`` and closes the flow; the client's next
  datagram starts a new one.
* Overload: UDP has no backpressure. When a transport's write buffer is above
  :data:`WRITE_HIGH_WATER` (the socket's send buffer is full), datagrams for it are dropped
  and counted (``dropped_buffer``) instead of queueing without bound, like a full kernel
  buffer drops them.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

from sandport.forward.base import Forward, PortInUse, check_ports, format_addr
from sandport.net.nsock import namespace_sockets

__all__ = [
    "LISTEN_RCVBUF",
    "MAX_DATAGRAM",
    "MAX_PENDING",
    "SWEEP_INTERVAL_MAX",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "PortInUse",
    "UdpForward",
    "UdpForwardSpec",
    "UdpForwardStats",
]

log = logging.getLogger(__name__)

#: Largest UDP payload over IPv4: 65535 − 20 (IPv4 header) − 8 (UDP header), RFC 768/791.
MAX_DATAGRAM = 65535 - 20 - 8
#: Datagrams held per flow while its socket to the target is being created.
MAX_PENDING = 64
#: Upper bound of the interval between two idle sweeps, in seconds.
SWEEP_INTERVAL_MAX = 1.0
#: ``SO_RCVBUF`` requested for the listener (best effort; the kernel caps it at
#: ``net.core.rmem_max``). All clients share this one socket's receive queue.
LISTEN_RCVBUF = 4 * 1024 * 1024
#: Write buffer of one transport above which datagrams for it are dropped.
WRITE_HIGH_WATER = 256 * 1024
#: Write buffer size below which datagrams are accepted again.
WRITE_LOW_WATER = 64 * 1024
#: Default time :meth:`UdpForward.stop` waits for flow sockets still being created.
STOP_GRACE = 2.0


#: A socket address as asyncio reports it: ``(host, port)`` or ``(host, port, flow, scope)``.
_Addr = tuple[Any, ...]



async def _bind(host: str, port: int) -> socket.socket:
    """Bind a non-blocking UDP socket to the first usable address of ``host:port``.

    The forward binds the socket itself and hands it to ``create_datagram_endpoint(sock=)``:
    uvloop's own bind path wraps the error in an ``OSError`` without errno and leaves the
    failed handle to the garbage collector. No ``SO_REUSEADDR``/``SO_REUSEPORT``: a port
    someone else holds must fail, not be shared.

    Raises:
        OSError: The first bind error (``EADDRINUSE``...) or a name lookup error.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    first: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            first = first or exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        except OSError as exc:  # pragma: no cover - best effort
            log.debug("%s: SO_RCVBUF: %s", format_addr(host, port), exc)
        return sock
    raise first or OSError(f"no address to bind for {format_addr(host, port)}")


def _limit_write_buffer(transport: asyncio.BaseTransport) -> None:
    """Set :data:`WRITE_HIGH_WATER` / :data:`WRITE_LOW_WATER` on a datagram transport.

    asyncio's and uvloop's datagram transports both have the ``WriteTransport``
    flow-control methods (``pause_writing()`` is called above the high-water mark);
    typeshed's ``DatagramTransport`` does not declare them.
    """
    set_limits = getattr(transport, "set_write_buffer_limits", None)
    if set_limits is not None:
        set_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpForwardSpec:
    """What to listen on, where to relay to, and how flows are bounded.

    Attributes:
        listen_host: Host address to bind.
        listen_port: Host port to bind; 0 picks an ephemeral port (see
            :attr:`UdpForward.bound_port`).
        target_host: Address (or name) of the target service for new flows.
        target_port: Port of the target service.
        idle_timeout: Seconds without a datagram in either direction after which a flow
            is closed.
        max_flows: Most flows (client addresses) relayed at once; datagrams from further
            clients are dropped.
        name: Label used in log lines and flow ids; defaults to ``udp:<bound port>``.
        netns: the network namespace (its file) the target lives in; flow sockets are
            made there (see :mod:`sandport.net.nsock`). "": ours.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int
    target_host: str
    target_port: int
    idle_timeout: float = 60.0
    max_flows: int = 1024
    name: str = ""
    netns: str = ""

    def __post_init__(self) -> None:
        """Check ranges once, so bad configuration fails before any socket exists.

        Raises:
            ValueError: A port is out of range, the timeout is not positive or the flow
                limit is below 1.
        """
        check_ports(self.listen_port, self.target_port)
        if not self.idle_timeout > 0:  # also refuses NaN
            raise ValueError(f"idle_timeout must be > 0, not {self.idle_timeout}")
        if self.max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, not {self.max_flows}")


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpForwardStats:
    """A snapshot of a forward's counters.

    Attributes:
        flows_active: Flows currently relayed (including ones whose socket is still being
            created).
        flows_total: Flows created since start.
        datagrams_up: Datagrams received from clients and sent to targets.
        datagrams_down: Datagrams received from targets and sent to clients.
        bytes_up: Payload bytes of ``datagrams_up``.
        bytes_down: Payload bytes of ``datagrams_down``.
        dropped_limit: Datagrams from new clients dropped because ``max_flows`` flows
            were active.
        target_unreachable: Flows closed because of an ICMP error on their socket (or
            because their socket could not be created).
        expired: Flows closed after ``idle_timeout`` without traffic.
        dropped_buffer: Datagrams dropped because a user-space buffer was full (held
            while a flow's socket was created, or a write buffer above the high-water mark).
    """

    flows_active: int
    flows_total: int
    datagrams_up: int
    datagrams_down: int
    bytes_up: int
    bytes_down: int
    dropped_limit: int
    target_unreachable: int
    expired: int
    dropped_buffer: int


class _Listener(asyncio.DatagramProtocol):
    """Protocol of the host socket: hands every client datagram to the forward."""

    __slots__ = ("fwd", "lost", "transport", "write_paused")

    def __init__(self, fwd: UdpForward) -> None:
        self.fwd = fwd
        self.transport: asyncio.DatagramTransport | None = None
        self.write_paused = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.DatagramTransport, transport)
        self.transport = t
        _limit_write_buffer(t)

    def datagram_received(self, data: bytes, addr: _Addr) -> None:
        self.fwd.from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        # The listener is unconnected: Linux reports no ICMP errors on it, only local
        # send failures (e.g. a firewall's EPERM) for one reply.
        log.debug("%s: listener socket error: %r", self.fwd.name, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fwd.listener_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False


class _Flow(asyncio.DatagramProtocol):
    """One client address and its socket connected to the target."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "cid",
        "client",
        "closed",
        "connect_task",
        "down",
        "fwd",
        "last",
        "lost",
        "pending",
        "started",
        "transport",
        "up",
        "write_paused",
    )

    def __init__(self, fwd: UdpForward, cid: str, client: _Addr, now: float) -> None:
        self.fwd = fwd
        self.cid = cid
        #: The client's address exactly as the listener reported it; replies go there.
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.connect_task: asyncio.Task[None] | None = None
        #: Client datagrams received before the socket existed (at most MAX_PENDING).
        self.pending: list[bytes] = []
        #: Loop time of the last datagram in either direction (for the idle sweep).
        self.last = now
        self.started = time.monotonic()
        self.up = self.down = self.bytes_up = self.bytes_down = 0
        #: No longer active: removed from the forward's table, counters folded in.
        self.closed = False
        self.lost = False
        self.write_paused = False

    # -- asyncio.DatagramProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.DatagramTransport, transport)
        self.transport = t
        _limit_write_buffer(t)
        if self.closed:  # closed (stop, expiry) while the socket was being created
            t.close()
            return
        # Send what was held right here, before the listener can hand over another
        # datagram that would otherwise overtake them.
        pending, self.pending = self.pending, []
        for data in pending:
            if self.closed:  # an immediate send error closed the flow
                break
            if not self.send_up(data):
                self.fwd.count_dropped_buffer()

    def datagram_received(self, data: bytes, addr: _Addr) -> None:
        if not self.closed:
            self.fwd.to_client(self, data)

    def error_received(self, exc: Exception) -> None:
        if not self.closed:
            self.fwd.flow_failed(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None:
            log.debug("%s: socket lost: %r", self.cid, exc)
        self.fwd.flow_gone(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    # -- used by the forward ----------------------------------------------------------------

    def send_up(self, data: bytes) -> bool:
        """Send one client datagram to the target, or hold it until the socket exists.

        Returns:
            False if it was dropped because a buffer was full.
        """
        t = self.transport
        if t is None:
            if len(self.pending) >= MAX_PENDING:
                return False
            self.pending.append(data)
            return True
        if self.write_paused:
            return False
        t.sendto(data)  # an immediate error is reported through error_received
        if not self.closed:
            self.up += 1
            self.bytes_up += len(data)
        return True

    def finished(self) -> bool:
        """True once the flow is closed and holds no socket and no pending create step."""
        return (
            self.closed
            and self.connect_task is None
            and (self.transport is None or self.lost)
        )


class UdpForward(Forward):
    """A host UDP socket relaying every client's datagrams to a target address.

    Lifecycle is ``start() → serve → stop()``; ``async with UdpForward(spec) as fwd`` does
    both. Everything runs as callbacks on the running loop; the only task per flow is the
    step that creates its socket, and it ends as soon as the socket exists.

    Example:
        >>> spec = UdpForwardSpec(listen_port=15353, target_host="10.77.0.2", target_port=53)
        >>> async with UdpForward(spec) as fwd:  # doctest: +SKIP
        ...     await serve_forever()
    """

    def __init__(self, spec: UdpForwardSpec) -> None:
        """Prepare a forward; nothing is bound until :meth:`start`.

        Args:
            spec: Listen and target addresses, idle timeout and flow limit.
        """
        super().__init__(name=spec.name, target=(spec.target_host, spec.target_port))
        self.spec = spec
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: _Listener | None = None
        self._port: int | None = None
        self._listener_gone = asyncio.Event()
        #: Active flows by client address.
        self._flows: dict[_Addr, _Flow] = {}
        #: Every flow that still holds a socket or a create step (active or closing).
        self._live: set[_Flow] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_interval = min(spec.idle_timeout / 4, SWEEP_INTERVAL_MAX)
        self._limit_warned = False
        # Counters of closed flows; active ones are summed in at snapshot time so the
        # data path only touches attributes of its own flow per datagram.
        self._total = 0
        self._done_up = self._done_down = self._done_bytes_up = self._done_bytes_down = 0
        self._dropped_limit = 0
        self._dropped_buffer = 0
        self._unreachable = 0
        self._expired = 0

    # -- properties -------------------------------------------------------------------------

    @property
    def bound_port(self) -> int:
        """The port actually bound (the ephemeral one when ``listen_port`` was 0).

        Raises:
            RuntimeError: The forward was never started.
        """
        if self._port is None:
            raise RuntimeError("UdpForward is not started")
        return self._port

    @property
    def stats(self) -> UdpForwardStats:
        """A consistent snapshot of the counters."""
        up, down = self._done_up, self._done_down
        bytes_up, bytes_down = self._done_bytes_up, self._done_bytes_down
        for flow in self._flows.values():
            up += flow.up
            down += flow.down
            bytes_up += flow.bytes_up
            bytes_down += flow.bytes_down
        return UdpForwardStats(
            flows_active=len(self._flows),
            flows_total=self._total,
            datagrams_up=up,
            datagrams_down=down,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            dropped_limit=self._dropped_limit,
            target_unreachable=self._unreachable,
            expired=self._expired,
            dropped_buffer=self._dropped_buffer,
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener (no ``SO_REUSEADDR``; ``SO_RCVBUF`` :data:`LISTEN_RCVBUF`).

        Raises:
            PortInUse: The host port is taken.
            OSError: Any other bind failure (address not available, permission).
            RuntimeError: Already started or stopped.
        """
        if self._listener is not None or self._closing:
            raise RuntimeError("UdpForward can be started once")
        loop = asyncio.get_running_loop()
        spec = self.spec
        listener = _Listener(self)
        try:
            sock = await _bind(spec.listen_host, spec.listen_port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(spec.listen_host, spec.listen_port) from exc
            raise
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: listener, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._loop = loop
        self._listener = listener
        self._port = int(transport.get_extra_info("sockname")[1])
        if not self._label:
            self._label = f"udp:{self._port}"
        log.info(
            "%s: listening on %s/udp, relaying to %s",
            self._label,
            format_addr(spec.listen_host, self._port),
            format_addr(*self._target),
        )

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Close the listener and every flow, and wait until all sockets are closed.

        Idempotent. Datagrams still in a write buffer are discarded (UDP promises no
        delivery). Flow sockets still being created are closed as soon as they exist;
        a create step that takes longer than ``grace`` (a slow name lookup) is cancelled.

        Args:
            grace: Seconds to wait for flow sockets still being created.
        """
        self._closing = True
        # 1. No more sweeps: every flow is closed below anyway.
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        # 2. Stop receiving from clients: no new flows, no more datagrams up.
        listener = self._listener
        if listener is not None and listener.transport is not None and not listener.lost:
            listener.transport.abort()
        # 3. Close every active flow; one still being created closes when its socket exists.
        for flow in list(self._flows.values()):
            self._close_flow(flow, "forward stopping")
        # 4. Give create steps a bounded time to finish, then cancel what is left.
        tasks = [f.connect_task for f in self._live if f.connect_task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.info("%s: cancelling %d flow socket(s) still being created",
                         self._label, len(late))
                await asyncio.wait(late)
        # 5. Every transport reports connection_lost shortly after close()/abort().
        await self._idle.wait()
        if listener is not None:
            await self._listener_gone.wait()
            self._listener = None
            log.info("%s: stopped", self._label)

    # -- data path (callbacks from the protocols) -------------------------------------------

    def from_client(self, data: bytes, addr: _Addr) -> None:
        """Relay one datagram from ``addr``, creating its flow if needed."""
        if not data:
            return  # a zero-length datagram cannot be sent through a transport
        flow = self._flows.get(addr)
        if flow is None:
            if self._closing:
                return
            if len(self._flows) >= self.spec.max_flows:
                self._dropped_limit += 1
                if not self._limit_warned:
                    self._limit_warned = True
                    log.warning(
                        "%s: %d flows active (max_flows); dropping datagrams from new "
                        "clients such as %s",
                        self._label,
                        len(self._flows),
                        format_addr(addr[0], addr[1]),
                    )
                return
            flow = self._new_flow(addr)
        flow.last = self._now()
        if not flow.send_up(data):
            self._dropped_buffer += 1

    def count_dropped_buffer(self) -> None:
        """Count one datagram dropped because a buffer was full."""
        self._dropped_buffer += 1

    def to_client(self, flow: _Flow, data: bytes) -> None:
        """Relay one datagram from the target back to the flow's client."""
        if not data:
            return  # see from_client
        flow.last = self._now()
        listener = self._listener
        if listener is None or listener.transport is None or listener.lost:
            return  # stopping: the flow is closed in a moment
        if listener.write_paused:
            self._dropped_buffer += 1
            return
        listener.transport.sendto(data, flow.client)
        flow.down += 1
        flow.bytes_down += len(data)

    def flow_failed(self, flow: _Flow, exc: BaseException) -> None:
        """Count an ICMP error (or a failed socket creation) and close the flow."""
        self._unreachable += 1
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        log.warning(
            "%s: target %s unreachable: %s; closing the flow of %s",
            flow.cid,
            format_addr(*self._target),
            reason,
            format_addr(flow.client[0], flow.client[1]),
        )
        self._close_flow(flow, "target unreachable")

    def flow_gone(self, flow: _Flow) -> None:
        """A flow's socket is closed; unregister the flow if nothing else is pending."""
        if not flow.closed:  # lost without being closed by us (fatal transport error)
            self._close_flow(flow, "socket lost")
        self._maybe_finished(flow)

    def listener_lost(self, exc: Exception | None) -> None:
        """The listener's socket is closed (by :meth:`stop`, or by a fatal error)."""
        if exc is not None and not self._closing:
            log.warning("%s: listener socket lost: %r", self._label, exc)
        self._listener_gone.set()

    # -- flows ------------------------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else time.monotonic()

    def _new_flow(self, addr: _Addr) -> _Flow:
        loop = asyncio.get_running_loop()
        flow = _Flow(self, f"{self._label}#{next(self._seq)}", addr, self._now())
        self._flows[addr] = flow
        self._live.add(flow)
        self._idle.clear()
        self._total += 1
        host, port = self._target
        log.debug(
            "%s: new flow from %s to %s",
            flow.cid,
            format_addr(addr[0], addr[1]),
            format_addr(host, port),
        )
        flow.connect_task = loop.create_task(
            self._connect(flow, host, port), name=f"{flow.cid} connect"
        )
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(self._sweep_interval, self._sweep)
        return flow

    async def _connect(self, flow: _Flow, host: str, port: int) -> None:
        """Create the flow's socket connected to the target, then send what was held."""
        loop = asyncio.get_running_loop()
        try:
            try:
                if self.spec.netns:  # a container's: its socket is made in its namespace
                    sock = namespace_sockets(self.spec.netns).socket(socket.AF_INET,
                                                                     socket.SOCK_DGRAM)
                    try:
                        sock.setblocking(False)
                        sock.connect((host, port))
                    except BaseException:
                        sock.close()
                        raise
                    await loop.create_datagram_endpoint(lambda: flow, sock=sock)
                else:
                    await loop.create_datagram_endpoint(lambda: flow,
                                                        remote_addr=(host, port))
            except OSError as exc:
                if not flow.closed:
                    self.flow_failed(flow, exc)
                return
            # connection_made() ran before create_datagram_endpoint() returned; it sent
            # the datagrams held meanwhile, or closed the socket if the flow was closed.
            t = flow.transport
            if t is not None and not flow.closed:
                log.debug(
                    "%s: socket %s -> %s",
                    flow.cid,
                    t.get_extra_info("sockname"),
                    t.get_extra_info("peername"),
                )
        finally:
            flow.connect_task = None
            self._maybe_finished(flow)

    def _close_flow(self, flow: _Flow, why: str) -> None:
        """Deactivate a flow: drop it from the table, fold its counters, close its socket."""
        if flow.closed:
            return
        flow.closed = True
        if self._flows.get(flow.client) is flow:
            del self._flows[flow.client]
        if len(self._flows) < self.spec.max_flows:
            self._limit_warned = False
        self._done_up += flow.up
        self._done_down += flow.down
        self._done_bytes_up += flow.bytes_up
        self._done_bytes_down += flow.bytes_down
        if flow.pending:
            self._dropped_buffer += len(flow.pending)
            flow.pending.clear()
        log.debug(
            "%s: closed (%s) after %.3f s, up %d datagram(s) / %d B, down %d / %d B",
            flow.cid,
            why,
            time.monotonic() - flow.started,
            flow.up,
            flow.bytes_up,
            flow.down,
            flow.bytes_down,
        )
        t = flow.transport
        if t is not None and not flow.lost:
            t.close()
        self._maybe_finished(flow)

    def _maybe_finished(self, flow: _Flow) -> None:
        if flow in self._live and flow.finished():
            self._live.discard(flow)
            if not self._live:
                self._idle.set()

    def _sweep(self) -> None:
        """Close flows idle for ``idle_timeout``; re-arm while flows are left."""
        self._sweep_handle = None
        if self._closing:
            return
        idle_since = self._now() - self.spec.idle_timeout
        for flow in [f for f in self._flows.values() if f.last <= idle_since]:
            self._expired += 1
            self._close_flow(flow, f"idle for {self.spec.idle_timeout:g} s")
        if self._flows and self._loop is not None:
            self._sweep_handle = self._loop.call_later(self._sweep_interval, self._sweep)
