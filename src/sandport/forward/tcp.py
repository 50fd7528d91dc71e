"""Userspace TCP relay: a host listener whose connections are relayed to a target address.

One :class:`TcpForward` owns the listening socket(s). Every accepted client gets exactly one
upstream connection to the current target; once it is connected, two *pumps* move the bytes,
one per direction, driven by readiness callbacks of the running loop (``add_reader`` /
``add_writer``: asyncio and uvloop alike). No transport, no stream, no task per connection:
an address-literal target is connected with a non-blocking ``connect``, a writer callback
and one timer (a name, or a target in another network namespace, takes a connect task).

Data path (``TcpForwardSpec.data_path``)::

    client ──recv──► shared buffer ──send──► upstream         (short exchanges, first bytes)
    client ──splice──► pipe from the pool ──splice──► upstream (bulk, while bytes are held)

* A connection holds two descriptors, its sockets, and no buffer: an idle direction has
  nothing but its reader registration. A read goes into the event loop thread's one shared
  buffer (:data:`~sandport.forward.pump.COPY_CHUNK`) and is sent on at once; only what the
  destination does not take is copied out and kept by that direction.
* ``splice`` (the default where ``os.splice`` exists): once a direction has moved
  :data:`~sandport.forward.pump.SPLICE_AFTER` bytes it takes a pipe from the process's
  bounded pool (:data:`~sandport.net.splice.PIPES`, HAProxy's ``tune.maxpipes``: at most a
  quarter of the descriptor limit, :data:`~sandport.net.splice.DEFAULT_MAX_PIPES` at most,
  ``PIPES.resize()`` to change it) for each wake-up: ``splice(2)`` moves the bytes from the
  source socket into the pipe and from the pipe into the destination, never through user
  space, and the pipe goes back to the pool as soon as it is empty. It stays with the
  direction only while the destination cannot take what it holds. When the pool has no pipe
  (or the kernel refuses one), that read is copied, counted once in ``fallbacks`` until a
  pipe is had again. A pipe that still holds bytes when its connection is reset is closed,
  never reused. Switching between the paths happens only between reads, when nothing is
  held, so bytes keep their order.
* ``copy``: always the shared buffer. Used when asked for, when ``os.splice`` does not
  exist, and per direction when the kernel refuses splice for it (``EINVAL``; counted in
  ``fallbacks``).

Semantics of one relayed connection (RFC 9293 terms):

* Backpressure: a pump reads from its source only while it holds nothing. When the
  destination cannot take everything (``EAGAIN``), the pump stops reading and waits for the
  destination to become writable. Per direction at most one read is held: a pipe's worth in
  kernel pages (splice) or at most :data:`COPY_CHUNK` bytes (copy). The rest waits in the
  sockets' kernel buffers, so a slow reader slows the sender down instead of growing memory.
* Half-close (RFC 9293 §3.6): end of stream from one side (FIN) is passed on as
  ``shutdown(SHUT_WR)`` once everything before it was written; the other direction keeps
  flowing. When FIN went both ways, both sockets are closed (the second FIN is the close's
  own: both receive queues are empty then, so ``close`` sends FIN, not RST).
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
* Out of file descriptors (``EMFILE``/``ENFILE``): the client is reset at once, never left
  in the kernel's accept queue, and counted as ``descriptors``. The process keeps one spare
  descriptor (:class:`_SpareDescriptor`, the nginx/libuv technique): when ``accept`` fails
  for want of descriptors, the spare is closed, the waiting client accepted and reset, the
  spare taken again; the listener keeps running, so the queue drains. A connection whose
  upstream socket cannot be made is reset under the same reason; a direction whose pipe
  cannot be made copies (counted in ``fallbacks``). One log line per
  :data:`DESCRIPTOR_LOG_INTERVAL`, not one per client. The first forward raises the
  process's limit (:func:`raise_fd_limit`: as root the hard one too, to
  :data:`HARD_NOFILE_TARGET` or ``fs.nr_open``) and logs it with the connections it fits.
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

Module layout (split along its seams; this module re-exports what importers use):
:mod:`sandport.forward.tcpspec` (spec, stats, failure reasons), :mod:`sandport.forward.pump`
(one direction's data path), :mod:`sandport.forward.link` (one connection and its
upstream); here the listener, accepting, the connection limit, the idle sweep and stop.
This module must not reach into a pump's data path; it talks to links only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import resource
import socket
import time
import weakref
from typing import TYPE_CHECKING

from sandport.forward.base import Forward, PortInUse, format_addr
from sandport.forward.link import _Link, _peer
from sandport.forward.pump import COPY_CHUNK
from sandport.forward.tcpspec import (
    CONNECT_FAILURES,
    DATA_PATHS,
    IDLE_SWEEP_MAX,
    FailureReason,
    TcpForwardSpec,
    TcpForwardStats,
    _zero_failures,
)
from sandport.forward.tcpspec import (  # re-exported: tests import it from here
    _connect_failure_reason as _connect_failure_reason,  # noqa: PLC0414
)
from sandport.net.spare import (
    ACCEPT_RETRY,
    DESCRIPTOR_LOG_INTERVAL,
    BurstLog,
    accept_failed,
    close_with_reset,
)
from sandport.net.spare import SPARE as _SPARE
from sandport.net.spare import SpareDescriptor as _SpareDescriptor  # noqa: F401 - tests

if TYPE_CHECKING:
    from sandport.forward.rfbgate import RfbGate
from sandport.net.splice import PIPES

__all__ = [
    "COPY_CHUNK",
    "DATA_PATHS",
    "FDS_PER_CONNECTION",
    "HARD_NOFILE_TARGET",
    "IDLE_SWEEP_MAX",
    "LISTEN_BACKLOG",
    "FailureReason",
    "PortInUse",
    "TcpForward",
    "TcpForwardSpec",
    "TcpForwardStats",
]

log = logging.getLogger(__name__)

#: ``listen(2)`` backlog of the host listener.
LISTEN_BACKLOG = 512
#: Default time :meth:`TcpForward.stop` lets closing connections flush before resetting them.
STOP_GRACE = 2.0
#: Accepts one readiness callback of the listener may do.
ACCEPTS_PER_WAKEUP = 64
#: A relayed connection holds two descriptors: its sockets. A direction with bytes in flight
#: on the splice path holds a pipe (two more) of the process's pool, which is bounded.
FDS_PER_CONNECTION = 2
#: Descriptors per pipe of the pool.
FDS_PER_PIPE = 2
#: Share of the descriptor limit the pipe pool may use at most: 1 / this.
PIPE_SHARE = 4
#: The hard ``RLIMIT_NOFILE`` a root gateway raises itself to (systemd's ``LimitNOFILE``
#: would do the same), bounded by ``/proc/sys/fs/nr_open``.
HARD_NOFILE_TARGET = 1 << 20
#: Bounds of :func:`fd_reserve`.
FD_RESERVE_MIN = 16
FD_RESERVE_MAX = 1024
NR_OPEN = "/proc/sys/fs/nr_open"

_monotonic = time.monotonic

#: The forwards of this process whose listeners are open (the pipe pool's kept empty pipes
#: are closed once the last one stopped).
_RUNNING: weakref.WeakSet[TcpForward] = weakref.WeakSet()


_nofile_raised = False
#: A client accepted on a descriptor at or above this number is reset (counted as
#: ``descriptors``): below the limit by :func:`fd_reserve`, so the gateway's port, its API
#: and its own files still get descriptors while the relays are full.
_fd_ceiling = 1 << 62


def _nr_open() -> int:
    """The kernel's ceiling for any process's descriptor limit (``fs.nr_open``)."""
    try:
        with open(NR_OPEN, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return HARD_NOFILE_TARGET


def raise_fd_limit() -> None:
    """Raise ``RLIMIT_NOFILE`` for the relay, once per process, and say the number.

    As root (``CAP_SYS_RESOURCE``) the hard limit goes up to :data:`HARD_NOFILE_TARGET`
    or ``fs.nr_open``, whichever is lower, as systemd's ``LimitNOFILE`` would; then the soft
    limit is raised to the hard one. A connection holds two descriptors (its sockets); the
    pipe pool is capped at a quarter of the limit (:data:`PIPE_SHARE`).
    """
    global _nofile_raised  # noqa: PLW0603 - once per process, like the kernel limit itself
    if _nofile_raised:
        return
    _nofile_raised = True
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    said = ""
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY:
        target = min(HARD_NOFILE_TARGET, _nr_open())
        if target > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, target))
            except (ValueError, OSError) as exc:  # no CAP_SYS_RESOURCE (a container)
                said = f"hard limit not raised to {target}: {exc}; "
            else:
                said = f"hard limit raised from {hard}; "
                hard = target
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, HARD_NOFILE_TARGET)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("RLIMIT_NOFILE raised from %d to %d", soft, target)
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    global _fd_ceiling  # noqa: PLW0603 - follows the process's limit, set here once
    _fd_ceiling = now - fd_reserve(now)
    PIPES.resize(min(PIPES.limit, now // (PIPE_SHARE * FDS_PER_PIPE)))
    pipes = PIPES.limit
    log.info("descriptors: %d (%sabout %d connections at %d each, plus up to %d splice "
             "pipes at %d each, %d kept for the gateway's own port and API; over it, "
             "clients are reset and counted as 'descriptors'; raise it with `ulimit -Hn` or "
             "systemd LimitNOFILE=)",
             now, said, (_fd_ceiling - pipes * FDS_PER_PIPE) // FDS_PER_CONNECTION,
             FDS_PER_CONNECTION, pipes, FDS_PER_PIPE, now - _fd_ceiling)


def fd_reserve(limit: int) -> int:
    """Descriptors the relays leave to the rest of the process (the API, the bridge, the
    state files, the subprocesses it runs): 1/64 of ``limit``, between 16 and 1024."""
    return max(FD_RESERVE_MIN, min(FD_RESERVE_MAX, limit // 64))




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
            with contextlib.suppress(OSError):  # accepted sockets inherit it (Linux)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    both. Everything runs as readiness callbacks on the running loop; a connection has no
    task (only a name or namespace target takes one for its connect step).

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
        self._loop: asyncio.AbstractEventLoop | None = None
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
        #: Out-of-descriptor events: one log line per burst.
        self._fd_log = BurstLog(DESCRIPTOR_LOG_INTERVAL)
        self._done_up = 0
        self._done_down = 0
        #: A desktop's VNC port: failed logins counted, blocked clients refused (rfbgate).
        self.rfb_gate: RfbGate | None = None

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
    def label(self) -> str:
        """The forward's name in log lines and connection ids."""
        return self._label

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
        up, down, buffered, pipes = self._done_up, self._done_down, 0, 0
        for link in self._links:
            up += link.bytes_up
            down += link.bytes_down
            buffered += link.buffered()
            pipes += link.pipes()
        return TcpForwardStats(
            pipes=pipes,
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
        self._loop = asyncio.get_running_loop()
        raise_fd_limit()
        spec = self.spec
        self._listeners = await _bind(spec.listen_host, spec.listen_port)
        _SPARE.hold()
        _RUNNING.add(self)
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
            _SPARE.unhold()
            _RUNNING.discard(self)
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
        if not _RUNNING:  # the last relay of the process: close the pool's kept pipes
            PIPES.clear()
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
                if accept_failed(lsock, exc, refused=self._refused_at_accept,
                                 pause=self._pause_accepting, label=self._label):
                    continue
                return
            self._accepted(conn)

    def _refused_at_accept(self, peer: str) -> None:
        """Out of descriptors, a waiting client was accepted on the spare and reset."""
        self._total += 1
        self.out_of_descriptors(f"reset the client from {peer} at accept")

    def _pause_accepting(self, exc: OSError) -> None:
        log.error("%s: cannot accept: %s; pausing for %g s", self._label,
                  os.strerror(exc.errno or 0), ACCEPT_RETRY)
        self._unlisten()
        self._accept_retry = asyncio.get_running_loop().call_later(
            ACCEPT_RETRY, self._resume_accept)

    def _resume_accept(self) -> None:
        self._accept_retry = None
        if not self._closing:
            self._listen()

    def _accepted(self, conn: socket.socket) -> None:
        # TCP_NODELAY comes from the listener; one syscall here, none for the id or logs.
        conn.setblocking(False)
        seq = next(self._seq)
        self._total += 1
        if conn.fileno() >= _fd_ceiling:
            # Descriptors are handed out lowest first: every one below this is in use.
            self.out_of_descriptors(f"reset the client from {_peer(conn)}: the last "
                                    "descriptors under the limit are kept for the "
                                    "gateway's own port and API")
            close_with_reset(conn)
            return
        limit = self.spec.max_connections
        if limit is not None and len(self._links) >= limit:
            self.count_failure(FailureReason.LIMIT)
            log.info("%s#%d: %d connections active (limit); resetting the client from %s",
                     self._label, seq, limit, _peer(conn))
            close_with_reset(conn)
            return
        assert self._loop is not None
        link = _Link(self, seq, conn, self._loop)
        self._links.add(link)
        self._idle.clear()
        host, port = self._target
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: accepted from %s, connecting to %s", link.cid, _peer(conn),
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

    def out_of_descriptors(self, what: str, *, refused: bool = True) -> None:
        """The process ran out of descriptors for a client: count it (under
        ``descriptors`` when it was ``refused``) and log once per burst."""
        if refused:
            self.count_failure(FailureReason.DESCRIPTORS)
        events = self._fd_log.due()
        if not events:
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.warning("%s: out of file descriptors (limit %d, %d connections on this forward): "
                    "%s; %d such event(s) since the last line, %d client(s) reset in all. "
                    "Raise the limit (`ulimit -n`, systemd LimitNOFILE=) or cap the forward "
                    "with --max-connections", self._label, soft, len(self._links), what,
                    events, self._failures[FailureReason.DESCRIPTORS.value])

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
