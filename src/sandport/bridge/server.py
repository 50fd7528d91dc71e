"""A WebSocket-to-TCP bridge server, websockify-compatible, on uvloop and sans-I/O websockets.

One listening port serves, like websockify does:

* WebSocket upgrades, bridged to a TCP or Unix-socket target (fixed, or by token: see
  :mod:`sandport.bridge.targets`), with subprotocol ``binary``, ``base64`` or none;
* plain HTTP GETs from ``web_dir`` (``--web``), e.g. the noVNC client (:mod:`.web`);
* TLS on the same port, detected from the first byte (``0x16``: a TLS ClientHello), with
  the certificate re-read when its file changes (:mod:`sandport.bridge.tls`);
* as the gateway's front door (``router`` and ``app_socket``): every WebSocket upgrade,
  the first request of a connection or a later one, is checked and bridged here; every
  other request is relayed to the HTTP app (:mod:`.passthrough`).

This module is the front door: it owns the listening socket, the first bytes of each
connection (a PROXY header from a trusted proxy, then TLS or plain), the set of open
sessions with their limits, the route of a request and the connection to its target.
What happens on one connection after that is the session's (:mod:`.session`); the
configuration and counters are plain data (:mod:`.model`).

Where websockify is weak, this server says why. Before the upgrade it answers with a
status and a JSON body: 401 (no token), 403 (unknown token, Origin not allowed), 429 /
503 with ``Retry-After`` (per-client and global connection limits), 502 (the target
refused or is unreachable), 504 (the target did not answer in time). The target is
connected *before* the upgrade is accepted, so a dead target is a 502, not a WebSocket
that opens and dies with 1006. After the upgrade every close carries a code and a reason:
1000 target closed / idle, 1001 shutting down or sandbox destroyed, 1002 protocol error,
1003 text without the base64 subprotocol, 1009 message too big, 1011 target error or
keepalive timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import math
import os
import resource
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Final

from websockets.http11 import Request, Response

from sandport.bridge.model import (
    BridgeConfig,
    BridgeRoute,
    BridgeStats,
    RouteStats,
    UpgradeRefusal,
    in_networks,
)
from sandport.bridge.session import CLOSE_TIMEOUT, TargetSide, WsSession
from sandport.bridge.targets import Target, token_from
from sandport.bridge.throttle import LoginThrottle
from sandport.bridge.tls import TlsContexts
from sandport.bridge.web import json_response, static_response
from sandport.errors import PortInUseError, UsageError
from sandport.net.nsock import connect_in_netns
from sandport.net.spare import (
    ACCEPT_RETRY,
    DESCRIPTOR_LOG_INTERVAL,
    SPARE,
    BurstLog,
    accept_failed,
)
from sandport.proto.errors import RemoteProtocolError
from sandport.proto.proxyproto import ProxyHeaderParser
from sandport.proto.wsframes import CLOSE_GOING_AWAY

__all__ = ["WsBridge"]

log = logging.getLogger(__name__)

PEEK_MAX: Final = 536  # enough for a PROXY v1 line and a v2 header with small TLVs
TLS_FIRST_BYTES: Final = (0x16, 0x80)  # TLS handshake record; SSLv2-style ClientHello
_PROXY_V1: Final = b"PROXY "
_PROXY_V2: Final = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_signature(head: bytes) -> bool | None:
    """Whether ``head`` starts with a PROXY v1/v2 signature; None: too short to tell."""
    for sig in (_PROXY_V1, _PROXY_V2):
        if head.startswith(sig):
            return True
        if len(head) < len(sig) and sig.startswith(head):
            return None
    return False


class WsBridge:
    """The server: ``await start()``, then ``await stop()`` (or ``async with``)."""

    def __init__(self, config: BridgeConfig, *, logins: LoginThrottle | None = None) -> None:
        """``logins``: a throttle shared with others (the gateway's relay); by default
        the bridge makes its own from ``config.limits.logins``."""
        self.config = config
        self.stats = BridgeStats()
        self._tls = TlsContexts(config.tls) if config.tls is not None else None
        self._target_ssl: ssl.SSLContext | None = None
        if config.target_tls:
            self._target_ssl = ssl.create_default_context()
            self._target_ssl.check_hostname = False
            self._target_ssl.verify_mode = ssl.CERT_NONE
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = itertools.count(1)
        self._sessions: set[WsSession] = set()
        self._per_client: Counter[str] = Counter()
        #: Failed VNC logins by client address (None: not counted).
        self.logins = logins if logins is not None else LoginThrottle(config.limits.logins) \
            if config.limits.logins is not None else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        #: Client addresses from PROXY headers of sockets still waiting for their first byte.
        self._proxied: dict[int, tuple[str, int]] = {}
        self._closing = False
        #: Called with no arguments whenever a session ends (for --run-once and friends).
        self.on_session_end: Callable[[], None] | None = None
        self.bound_port = 0
        #: Clients reset for want of descriptors: one log line per burst.
        self._fd_log = BurstLog(DESCRIPTOR_LOG_INTERVAL)
        self._accept_retry: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> WsBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def label(self) -> str:
        """``ws:PORT`` for logs."""
        return f"ws:{self.bound_port}"

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            PortInUseError: the port is taken.
            UsageError: the address is not one of this machine's.
        """
        self._loop = asyncio.get_running_loop()
        host = self.config.listen_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.config.listen_port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                what = "gateway port" if self.config.router is not None else "WebSocket port"
                raise PortInUseError(host, self.config.listen_port, what=what) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"{host} is not an address of this machine") from None
            raise
        sock.setblocking(False)
        self._sock = sock
        self.bound_port = sock.getsockname()[1]
        SPARE.hold()  # out of descriptors, a client is still accepted and reset at once
        self._loop.add_reader(sock.fileno(), self._accept)
        cfg = self.config
        log.info("%s: listening on %s:%d%s, %s%s", self.label, host, self.bound_port,
                 (" (wss only)" if cfg.tls.ssl_only else " (ws and wss)") if cfg.tls else "",
                 f"target {cfg.target}" if cfg.target else "targets by token",
                 f", web {cfg.web_dir}" if cfg.web_dir else "")

    async def stop(self) -> None:
        """Stop accepting, close every session with 1001 and wait for them (bounded)."""
        self._closing = True
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            SPARE.unhold()
        for fd, (sock, timer) in list(self._pending.items()):
            timer.cancel()
            if self._loop is not None:
                self._loop.remove_reader(fd)
            sock.close()
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in list(self._sessions):
            session.close(CLOSE_GOING_AWAY, "the bridge is shutting down")
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self._sessions):
            session.abort()

    def close_sessions(self, sandbox: str, code: int, reason: str,
                       grant: str | None = None) -> int:
        """Close every session to ``sandbox`` (its route's first label) with a reason;
        with ``grant``, only those opened with that access token."""
        closing = [x for x in self._sessions
                   if x.route is not None and x.route.labels[0] == sandbox
                   and (grant is None or x.route.grant == grant)]
        for session in closing:
            session.close(code, reason)
        return len(closing)

    # -- accepting ----------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._sock is not None
        assert self._loop is not None
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if accept_failed(self._sock, exc, refused=self._out_of_descriptors,
                                 pause=self._pause_accepting, label=self.label):
                    continue
                return
            conn.setblocking(False)
            fd = conn.fileno()
            timer = self._loop.call_later(self.config.limits.handshake_timeout,
                                          self._first_bytes_timeout, fd)
            self._pending[fd] = (conn, timer)
            self._loop.add_reader(fd, self._on_first_bytes, fd)

    def _out_of_descriptors(self, peer: str) -> None:
        """A client was reset at accept for want of descriptors: count it, and log once
        per burst (not once per client)."""
        self.stats.accept_refused["descriptors"] += 1
        burst = self._fd_log.due()
        if burst:
            log.warning("%s: out of file descriptors (limit %d, %d sessions open): reset %d "
                        "new client(s) at accept since the last line (the latest from %s), "
                        "%d in all. Raise the limit (`ulimit -n`, systemd LimitNOFILE=) or "
                        "cap the sessions (a session limit)", self.label,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0], len(self._sessions),
                        burst, peer, self.stats.accept_refused["descriptors"])

    def _pause_accepting(self, exc: OSError) -> None:
        """No descriptor even with the spare given back, or no memory: stop accepting for
        :data:`ACCEPT_RETRY` seconds instead of spinning on the listener."""
        log.error("%s: cannot accept: %s; pausing for %g s", self.label,
                  os.strerror(exc.errno or 0), ACCEPT_RETRY)
        assert self._sock is not None
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())

        def resume() -> None:
            self._accept_retry = None
            if self._sock is not None and self._loop is not None and not self._closing:
                self._loop.add_reader(self._sock.fileno(), self._accept)

        self._accept_retry = self._loop.call_later(ACCEPT_RETRY, resume)

    def _drop_pending(self, fd: int) -> socket.socket | None:
        self._proxied.pop(fd, None)
        entry = self._pending.pop(fd, None)
        if entry is None:
            return None
        sock, timer = entry
        timer.cancel()
        assert self._loop is not None
        self._loop.remove_reader(fd)
        return sock

    def _retry_later(self, fd: int) -> None:
        """Peek again shortly: the bytes so far stay readable, so the reader would spin."""
        assert self._loop is not None
        self._loop.remove_reader(fd)

        def rearm() -> None:
            if fd in self._pending and self._loop is not None:
                self._loop.add_reader(fd, self._on_first_bytes, fd)

        self._loop.call_later(0.005, rearm)

    def _first_bytes_timeout(self, fd: int) -> None:
        sock = self._drop_pending(fd)
        if sock is not None:
            log.info("%s: a client sent nothing for %.0f s: closed", self.label,
                     self.config.limits.handshake_timeout)
            sock.close()

    def _on_first_bytes(self, fd: int) -> None:
        """Peek: a PROXY header from a trusted proxy, then TLS or plain HTTP."""
        entry = self._pending.get(fd)
        if entry is None:
            return
        sock = entry[0]
        try:
            head = sock.recv(PEEK_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._drop_pending(fd)
            sock.close()
            return
        if not head:
            self._drop_pending(fd)
            sock.close()
            return
        peer = sock.getpeername()
        client = (str(peer[0]), int(peer[1]))
        if fd not in self._proxied and self.config.trusted_proxies \
                and in_networks(client[0], self.config.trusted_proxies):
            kind = _proxy_signature(bytes(head))
            if kind is None:  # too short to tell yet
                self._retry_later(fd)
                return
        else:
            kind = False
        if kind:
            parser = ProxyHeaderParser()
            try:
                header = parser.receive_data(bytes(head))
            except RemoteProtocolError as exc:
                log.info("%s: bad PROXY header from %s: %s", self.label, client[0], exc)
                self._drop_pending(fd)
                sock.close()
                return
            if header is None:
                if len(head) >= PEEK_MAX:
                    self._drop_pending(fd)
                    sock.close()
                else:
                    self._retry_later(fd)  # the rest of the header is on its way
                return
            used = len(head) - len(parser.trailing_data())
            sock.recv(used)  # consume exactly the header
            if header.source is not None:
                client = header.source
            if not parser.trailing_data():
                self._proxied[fd] = client  # wait for the first byte of the real stream
                return
            head = parser.trailing_data()
        client = self._proxied.pop(fd, client)
        self._drop_pending(fd)
        tls = head[0] in TLS_FIRST_BYTES
        if tls and self._tls is None:
            log.info("%s: %s sent a TLS ClientHello but this bridge has no certificate "
                     "(--cert): closed", self.label, client[0])
            sock.close()
            return
        if not tls and self._tls is not None and self._tls.config.ssl_only:
            refusal = json_response(400, {
                "error": "tls_required",
                "message": "this port takes only TLS: use wss:// or https://"})
            with contextlib.suppress(OSError):
                sock.send(refusal.serialize())
            sock.close()
            return
        session = WsSession(self, f"{self.label}#{next(self._seq)}", client, tls)
        assert self._loop is not None
        ctx = self._tls.context() if tls and self._tls is not None else None
        self.spawn(self._connect_client(session, sock, ctx), session.cid)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` as a task this bridge tracks (and cancels when it stops)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_client(self, session: WsSession, sock: socket.socket,
                              ctx: ssl.SSLContext | None) -> None:
        assert self._loop is not None
        try:
            if ctx is not None:
                await self._loop.connect_accepted_socket(
                    lambda: session, sock, ssl=ctx,
                    ssl_handshake_timeout=self.config.limits.handshake_timeout)
            else:
                await self._loop.connect_accepted_socket(lambda: session, sock)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.info("%s: TLS handshake with %s failed: %s", session.cid, session.client[0],
                     exc)
            sock.close()

    # -- sessions -----------------------------------------------------------------------------

    def admit(self, session: WsSession) -> None:
        """Count a session that is about to connect its target, or refuse it.

        Raises:
            UpgradeRefusal: 503 over the global limit, 429 over the per-client limit.
        """
        lim = self.config.limits
        if self._closing:
            raise UpgradeRefusal(503, "shutting_down", "the bridge is shutting down",
                          [("Retry-After", "5")])
        if lim.max_connections is not None and len(self._sessions) >= lim.max_connections:
            raise UpgradeRefusal(503, "too_many_sessions",
                          f"the bridge has its limit of {lim.max_connections} sessions open",
                          [("Retry-After", "5")])
        ip = session.client[0]
        wait = self.logins.retry_after(session.login_key, time.monotonic()) \
            if self.logins else 0.0
        if wait > 0:
            self.stats.login_blocks += 1
            after = str(math.ceil(wait))
            where = f" to sandbox {session.route.labels[0]}" \
                if session.route is not None and session.route.labels[0] else ""
            raise UpgradeRefusal(429, "too_many_failed_logins",
                                 f"{ip} failed VNC authentication{where} too often: its new "
                                 f"sessions there are refused for {after} s more",
                                 [("Retry-After", after)])
        if lim.max_per_client is not None and self._per_client[ip] >= lim.max_per_client:
            raise UpgradeRefusal(429, "too_many_sessions_from_client",
                          f"{ip} has its limit of {lim.max_per_client} sessions open",
                          [("Retry-After", "5")])
        self._sessions.add(session)
        self._per_client[ip] += 1
        self.stats.sessions_active = len(self._sessions)
        if session.route is not None and session.route.labels != ("", ""):
            rs = self.stats.routes.setdefault(session.route.labels, RouteStats())
            rs.sessions_active += 1
            session.route_stats = rs

    def release(self, session: WsSession) -> None:
        """Forget a session (idempotent)."""
        if session in self._sessions:
            self._sessions.discard(session)
            ip = session.client[0]
            self._per_client[ip] -= 1
            if self._per_client[ip] <= 0:
                del self._per_client[ip]
            self.stats.sessions_active = len(self._sessions)
            if session.route_stats is not None:
                session.route_stats.sessions_active -= 1
            if self.on_session_end is not None:
                self.on_session_end()

    def resolve(self, request: Request) -> BridgeRoute:
        """The route of a request (fixed, by token, or by the router).

        Raises:
            UpgradeRefusal: 401 without a token, 403 for an unknown token, or the router's.
        """
        if self.config.router is not None:
            return self.config.router.route(request)
        if self.config.target is not None:
            return BridgeRoute(target=self.config.target)
        assert self.config.tokens is not None
        token = token_from(request.path, request.headers.get("Host"),
                           host_token=self.config.host_token)
        if token is None:
            where = "the Host header" if self.config.host_token else \
                "?token=T or the last path segment"
            raise UpgradeRefusal(401, "token_missing",
                                 f"no token: this bridge needs one in {where}")
        target = self.config.tokens.lookup(token)
        if target is None:
            raise UpgradeRefusal(403, "token_unknown", "the token is not valid here")
        return BridgeRoute(target=target)

    async def connect_target(self, session: WsSession, target: Target) -> None:
        """Connect the session's target.

        Raises:
            UpgradeRefusal: 502 refused or unreachable, 504 timed out.
        """
        assert self._loop is not None
        loop = self._loop
        proto = TargetSide(session)
        try:
            async with asyncio.timeout(self.config.limits.connect_timeout):
                if target.path:
                    await loop.create_unix_connection(lambda: proto, target.path,
                                                      ssl=self._target_ssl,
                                                      server_hostname="" if self._target_ssl
                                                      else None)
                elif target.netns:  # a container's: the socket is made in its namespace
                    sock = await connect_in_netns(loop, target.netns, target.host,
                                                  target.port)
                    try:
                        await loop.create_connection(
                            lambda: proto, sock=sock, ssl=self._target_ssl,
                            server_hostname=target.host if self._target_ssl else None)
                    except BaseException:
                        sock.close()
                        raise
                else:
                    await loop.create_connection(lambda: proto, target.host, target.port,
                                                 ssl=self._target_ssl)
        except TimeoutError:
            raise UpgradeRefusal(504, "target_timeout",
                          f"the target {target} did not answer within "
                          f"{self.config.limits.connect_timeout:g} s",
                          hop="guest reachability") from None
        except ConnectionRefusedError:
            raise UpgradeRefusal(502, "target_refused",
                          f"the target {target} refused the connection "
                          "(nothing listens there)", hop="guest service") from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise UpgradeRefusal(502, "target_unreachable",
                          f"the target {target} is unreachable: {reason}",
                          hop="guest reachability") from None
        session.target = proto

    def web_response(self, request: Request) -> Response:
        """A plain GET: a file of ``web_dir``, or why not."""
        self.stats.web_requests += 1
        return static_response(self.config.web_dir, request)
