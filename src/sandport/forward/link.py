"""One relayed TCP connection: a client socket, its upstream connect, then two pumps.

Owns :class:`_Link` (connect with timeout and failure reason, the PROXY header, pairing the
two :class:`~sandport.forward.pump._Pump` s, half-close, reset, idle-out, accounting) and its
helpers: :func:`_open_connection` (a name, or a network namespace), :func:`_proxy_header`
and :func:`_peer`. An address literal in our own namespace is connected without a task:
a non-blocking ``connect``, a writer callback and one timer. It must not touch the
listener, accepting or the forward's counters directly: it reports to its
:class:`~sandport.forward.tcp.TcpForward` (``count_failure``, ``count_fallback``,
``out_of_descriptors``, ``link_finished``) and reads its ``spec`` and ``closing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from sandport.forward.base import format_addr
from sandport.forward.pump import _Pump
from sandport.forward.tcpspec import FailureReason, _connect_failure_reason
from sandport.net.nsock import namespace_sockets
from sandport.net.spare import close_with_reset as _close_with_reset
from sandport.net.upstream import bound_upstream
from sandport.proto.proxyproto import ProxyHeader

if TYPE_CHECKING:
    from sandport.forward.rfbgate import _Handshake
    from sandport.forward.tcp import TcpForward

#: Same logger as before the split (``sandport.forward.tcp``): one name for the relay's log.
log = logging.getLogger("sandport.forward.tcp")

_monotonic = time.monotonic
_DEBUG = logging.DEBUG
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN)
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


@functools.lru_cache(maxsize=64)
def _literal_family(host: str) -> int:
    """The address family of an IP literal, 0 for a name (resolved per connect)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return 0
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class _Link:
    """One relayed connection: the client socket, the connect step, then two pumps."""

    __slots__ = (
        "client",
        "connect_task",
        "connect_timer",
        "connect_writer",
        "connecting",
        "counted_reset",
        "down",
        "finished",
        "fwd",
        "gate",
        "idled",
        "last_activity",
        "loop",
        "pre_down",
        "pre_up",
        "seq",
        "started",
        "up",
        "upstream",
    )

    def __init__(self, fwd: TcpForward, seq: int, client: socket.socket,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.fwd = fwd
        self.loop = loop
        #: Number of the connection on its forward (the id is built when a line is logged).
        self.seq = seq
        self.client = client
        self.upstream: socket.socket | None = None
        self.up: _Pump | None = None
        self.down: _Pump | None = None
        #: The connect step of a name or a namespace target (else None).
        self.connect_task: asyncio.Task[None] | None = None
        #: The upstream socket of an address literal while its handshake is pending.
        self.connecting: socket.socket | None = None
        self.connect_timer: asyncio.TimerHandle | None = None
        #: The connect writer is still registered on the (now connected) upstream.
        self.connect_writer = False
        self.finished = False
        self.started = _monotonic()
        #: When a byte last moved in either direction (set at pairing, then per read).
        self.last_activity = self.started
        #: The idle sweep closed this link (so it is counted once).
        self.idled = False
        self.counted_reset = False
        self.gate: _Handshake | None = None  # a desktop's VNC port: see forward.rfbgate
        #: Bytes relayed before the pumps (the RFB gate's handshake), each way.
        self.pre_up = self.pre_down = 0

    # -- connecting -------------------------------------------------------------------------

    @property
    def cid(self) -> str:
        """The connection's id in log lines: ``<forward name>#<n>``."""
        return f"{self.fwd.label}#{self.seq}"

    def connect(self, host: str, port: int) -> None:
        """Start the upstream connect; the pumps start when it succeeds."""
        family = _literal_family(host)
        if family and not self.fwd.spec.netns:
            self._connect_now(family, host, port)
            return
        self.connect_task = self.loop.create_task(
            self._connect(host, port), name=f"{self.cid} connect"
        )

    def _connect_now(self, family: int, host: str, port: int) -> None:
        """An address literal: a non-blocking connect, finished by a writer callback."""
        try:  # SOCK_NONBLOCK: non-blocking from the start, no ioctl of its own
            sock = socket.socket(family, _STREAM_NONBLOCK)
        except OSError as exc:
            self._connect_failed(host, port, os.strerror(exc.errno or 0),
                                 _connect_failure_reason(exc))
            return
        err = sock.connect_ex((host, port))
        if err == 0:
            self._pair(sock)
            return
        if err not in _IN_PROGRESS:
            sock.close()
            self._connect_failed(host, port, os.strerror(err),
                                 _connect_failure_reason(OSError(err, os.strerror(err))))
            return
        self.connecting = sock
        loop = self.loop
        loop.add_writer(sock.fileno(), self._on_connect_writable, host, port)
        self.connect_timer = loop.call_later(self.fwd.spec.connect_timeout,
                                             self._connect_timed_out, host, port)

    def _stop_connecting(self) -> socket.socket | None:
        sock, self.connecting = self.connecting, None
        if sock is not None:
            self.loop.remove_writer(sock.fileno())
        timer, self.connect_timer = self.connect_timer, None
        if timer is not None:
            timer.cancel()
        return sock

    def _on_connect_writable(self, host: str, port: int) -> None:
        sock = self.connecting
        if sock is None:  # pragma: no cover - reset() unregistered us first
            return
        self.connecting = None
        timer, self.connect_timer = self.connect_timer, None
        if timer is not None:
            timer.cancel()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.loop.remove_writer(sock.fileno())
            sock.close()
            self._connect_failed(host, port, os.strerror(err),
                                 _connect_failure_reason(OSError(err, os.strerror(err))))
            return
        # The pumps register the upstream's reader before the connect writer goes, so the
        # loop keeps one poll handle for the socket instead of closing and making another.
        self.upstream = sock
        self.connect_writer = True
        self._pair(sock)
        self._drop_connect_writer()

    def _drop_connect_writer(self) -> None:
        """Unregister the connect step's writer, unless the up pump took it over."""
        if self.connect_writer:
            self.connect_writer = False
            up = self.up
            if up is None or not up.writing:
                assert self.upstream is not None
                self.loop.remove_writer(self.upstream.fileno())

    def _connect_timed_out(self, host: str, port: int) -> None:
        self.connect_timer = None
        sock = self._stop_connecting()
        if sock is not None:
            sock.close()
        self._connect_failed(host, port, f"no answer within {self.fwd.spec.connect_timeout:g} s",
                             FailureReason.TIMEOUT)

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
        if reason is FailureReason.DESCRIPTORS:  # counted, and logged once per burst
            self.fwd.out_of_descriptors(f"no socket to {format_addr(host, port)}: {text}; "
                                        "reset the client")
            self.connect_task = None
            self.finish(reset=True)
            return
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
        if self.gate is None:  # not the gate handing back a link it watched: set up once
            with contextlib.suppress(OSError):
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bound_upstream(upstream, self.fwd.spec.guest_timeout)  # a silent guest: given up
            if self.fwd.rfb_gate is not None:  # RFB handshake first
                self._drop_connect_writer()  # the gate registers its own callbacks (or closes)
                self.gate = self.fwd.rfb_gate.watch(self, upstream)  # it calls _pair again
                return
        prefix = b""
        version = self.fwd.spec.proxy_protocol
        if version is not None:
            header = _proxy_header(version, self.client)
            log.debug("%s: PROXY header %r", self.cid, header)
            prefix = bytes(header)
        self.up = _Pump(self, self.client, upstream, "up", prefix)
        self.down = _Pump(self, upstream, self.client, "down", b"")
        self._open_data_path(self.up, self.down)
        self.last_activity = _monotonic()
        if log.isEnabledFor(_DEBUG):
            log.debug("%s: connected to %s (%s)", self.cid, _peer(upstream),
                      "splice" if self.up.may_splice else "copy")
        self.up.start()
        if not self.finished:
            self.down.start()

    def _open_data_path(self, up: _Pump, down: _Pump) -> None:
        """Splice or copy: a spliced direction copies its first bytes and takes a pipe from
        the pool only once bulk data flows (and gives it back whenever nothing is in
        flight); nothing is allocated here."""
        if self.fwd.spec.splice:
            up.use_splice()
            down.use_splice()

    # -- events from the pumps --------------------------------------------------------------

    def fell_back(self, why: str | None) -> None:
        """A pump could not splice (``why``; None: the pool had no pipe for it); it relays
        with recv/send instead."""
        self.fwd.count_fallback()
        if why is None:
            log.debug("%s: no pipe free in the pool; copying for now", self.cid)
        else:
            log.info("%s: %s; copying with recv/send instead", self.cid, why)

    def out_of_pipes(self, exc: OSError) -> None:
        """The kernel refused a new pipe for want of descriptors (the pump copies)."""
        self.fwd.out_of_descriptors(f"{self.cid} relays on the copy path (no pipe: "
                                    f"{os.strerror(exc.errno or 0)})", refused=False)

    def failed(self, pump: _Pump, exc: OSError, doing: str) -> None:
        """A socket failed: reset both sides, count it once."""
        log.debug("%s: %s %s side: %r; resetting both sides", self.cid, doing,
                  "source" if doing == "reading" else "destination", exc)
        self.count_reset()
        self.finish(reset=True)

    def fin_passed(self, pump: _Pump) -> bool:
        """``pump`` passes a FIN on. Once both directions are done the sockets close (and
        True: the closing itself sends that FIN, no ``shutdown`` needed)."""
        other = self.down if pump is self.up else self.up
        if other is not None and other.fin_sent:
            self.finish(reset=False)
            return True
        return False

    def pump_drained(self) -> None:
        """A draining pump wrote its last byte; close when both are done."""
        if all(p is None or (p.draining and not p.held()) for p in (self.up, self.down)):
            self.finish(reset=False)

    # -- ending -----------------------------------------------------------------------------

    def close(self, why: str) -> None:
        """Stop reading; close both sockets once what the relay holds is written."""
        log.debug("%s: closing: %s", self.cid, why)
        if self.connect_task is not None or self.connecting is not None:
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
        sock = self._stop_connecting()
        if sock is not None:
            _close_with_reset(sock)
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
        if self.gate is not None:
            self.gate.close()
        pending = self._stop_connecting()
        if pending is not None:
            _close_with_reset(pending)
        for pump in (self.up, self.down):
            if pump is not None:
                pump.close()
        self._drop_connect_writer()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:
                _close_with_reset(sock)
            else:
                sock.close()
        self.fwd.link_finished(self)
        if log.isEnabledFor(_DEBUG):
            log.debug("%s: %s after %.3f s, up %d B, down %d B", self.cid,
                      "reset" if reset else "closed", _monotonic() - self.started,
                      self.bytes_up, self.bytes_down)

    # -- accounting -------------------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        """Bytes read from the client."""
        return (self.up.nbytes if self.up is not None else 0) + self.pre_up

    @property
    def bytes_down(self) -> int:
        """Bytes read from the upstream."""
        return (self.down.nbytes if self.down is not None else 0) + self.pre_down

    @property
    def relaying(self) -> bool:
        """Both pumps exist and the link is not closing."""
        return self.up is not None and not self.finished and not self.up.draining

    def buffered(self) -> int:
        """Bytes the relay holds for this connection."""
        return sum(p.held() for p in (self.up, self.down) if p is not None)

    def pipes(self) -> int:
        """Pipes of the pool this connection holds now (0 to 2)."""
        return sum(p.holds_pipe() for p in (self.up, self.down) if p is not None)


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

