"""A WebSocket-to-TCP bridge server, websockify-compatible, on uvloop and sans-I/O websockets.

One listening port serves, like websockify does:

* WebSocket upgrades, bridged to a TCP or Unix-socket target (fixed, or by token: see
  :mod:`sandport.bridge.targets`), with subprotocol ``binary``, ``base64`` or none;
* plain HTTP GETs from ``web_dir`` (``--web``), e.g. the noVNC client;
* TLS on the same port, detected from the first byte (``0x16``: a TLS ClientHello), with
  the certificate re-read when its file changes (:mod:`sandport.bridge.tls`);
* as the gateway's front door (``router`` and ``app_socket``): upgrades to the paths the
  router claims are bridged here, every other request is relayed to the HTTP app.

Where websockify is weak, this server says why. Before the upgrade it answers with a
status and a JSON body: 401 (no token), 403 (unknown token, Origin not allowed), 429 /
503 with ``Retry-After`` (per-client and global connection limits), 502 (the target
refused or is unreachable), 504 (the target did not answer in time). The target is
connected *before* the upgrade is accepted, so a dead target is a 502, not a WebSocket
that opens and dies with 1006. After the upgrade every close carries a code and a reason:
1000 target closed / idle, 1001 shutting down or sandbox destroyed, 1002 protocol error,
1003 text without the base64 subprotocol, 1009 message too big, 1011 target error or
keepalive timeout.

Data path: each side is an asyncio Protocol. websockets' sans-I/O protocol answers the
opening handshake; after the 101, :class:`~sandport.proto.wsframes.FrameReader` streams
client payload to the target as it arrives, unmasked in one pass (fragments are not
reassembled, so a 1 MiB message costs no 1 MiB buffer); target bytes become one binary
message per read, a header written ahead of them. For plain ``ws://`` sessions that
direction is spliced once nothing needs to see the bytes (:mod:`.splicedown`).
Backpressure: when one side's transport buffers more than :data:`WRITE_HIGH`, the other
side stops reading.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import mimetypes
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from sandport.bridge.passthrough import MAX_HEAD, HttpPassthrough, RequestRewriter
from sandport.bridge.splicedown import SpliceDown
from sandport.bridge.targets import Target, TokenPlugin, token_from
from sandport.bridge.tls import TlsConfig, TlsContexts
from sandport.errors import PortInUseError, UsageError
from sandport.forward.tcp import SPLICE_AVAILABLE
from sandport.net.nsock import connect_in_netns
from sandport.proto.errors import RemoteProtocolError
from sandport.proto.proxyproto import ProxyHeaderParser
from sandport.proto.rfbwatch import RfbWatch, Watch
from sandport.proto.wsframes import (
    Event,
    FrameError,
    FrameReader,
    Opcode,
    close_payload,
    frame_header,
    parse_close,
)

log = logging.getLogger(__name__)
#: websockets' own per-connection lines ("connection open"); ours carry the session id.
_protocol_log = logging.getLogger(f"{__name__}.protocol")
_protocol_log.setLevel(logging.WARNING)

SUBPROTOCOLS = ("binary", "base64")
WRITE_HIGH = 1024 * 1024  # stop reading the other side above this many buffered bytes
WRITE_LOW = 256 * 1024
CLOSE_TIMEOUT = 5.0  # after our close frame, wait this long for the client's
PEEK_MAX = 536  # enough for a PROXY v1 line and a v2 header with small TLVs
TLS_FIRST_BYTES = (0x16, 0x80)  # TLS handshake record; SSLv2-style ClientHello
WEB_FILE_MAX = 64 * 1024 * 1024

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_INTERNAL = 1011
#: Close reasons when the target ends a session; the hop is ``sandport doctor``'s name for
#: where the path broke (the guest's service closed or reset it; or the guest went away).
TARGET_CLOSED = "the target closed the connection (hop: guest service)"


def target_failed(exc: BaseException) -> str:
    """The close reason for a target connection that failed mid-session."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    hop = "guest service" if isinstance(exc, ConnectionResetError) else "guest reachability"
    return f"the target connection failed: {reason} (hop: {hop})"



@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeLimits:
    """Limits of one bridge server; ``None`` means unlimited.

    Attributes:
        max_connections: WebSocket sessions at once, over all clients (503 beyond).
        max_per_client: sessions at once from one client address (429 beyond).
        max_message: largest message a client may send, in bytes (close 1009 beyond).
        connect_timeout: seconds to connect to the target (504 beyond).
        handshake_timeout: seconds for the TLS handshake and the HTTP request.
        idle_timeout: close a session after this many seconds without data either way.
        heartbeat: send a ping every this many seconds; no pong by the next one closes
            the session with 1011.
    """

    max_connections: int | None = None
    max_per_client: int | None = None
    max_message: int = 16 * 1024 * 1024
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float | None = None
    heartbeat: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Where a claimed WebSocket request goes.

    Attributes:
        target: the guest service.
        labels: ``(sandbox, port)`` for logs and per-route counters.
        starting: the sandbox is still booting: a refused connect answers 503 with
            ``Retry-After`` (try the same URL again), not 502.
        grant: the access token the session was opened with ("" for the sandbox's own);
            :meth:`WsBridge.close_sessions` closes a revoked or expired one's sessions.
        diagnosis: what ``sandport doctor`` last found broken on the way to the target
            (added to a refusal's message), or "".
    """

    target: Target
    labels: tuple[str, str] = ("", "")
    starting: bool = False
    grant: str = ""
    diagnosis: str = ""


class Router(Protocol):
    """Routes WebSocket requests of a front door (the gateway's port)."""

    def claims(self, path: str) -> bool:
        """True when a WebSocket upgrade to ``path`` (no query) is the bridge's to serve."""
        ...

    def route(self, request: Request) -> Route:
        """The route of a claimed request.

        Raises:
            Refusal: with the status and reason to answer.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeConfig:
    """What a :class:`WsBridge` serves.

    Attributes:
        listen_host, listen_port: where to listen (port 0: any free port).
        target: the fixed target, when there is no token plugin.
        tokens: the token plugin, when targets are looked up by token.
        host_token: take the token from the Host header instead of the URL.
        web_dir: serve plain GETs from this directory (``--web``).
        tls: certificate and TLS settings, or None for plain ws only.
        target_tls: connect to the target with TLS (``--ssl-target``).
        origins: allowed ``Origin`` header values; empty allows any. A request without
            Origin (not from a browser) is not checked.
        trusted_proxies: peers whose ``X-Forwarded-For`` and PROXY protocol header
            name the real client.
        limits: see :class:`BridgeLimits`.
        router: front-door mode: WebSocket upgrades to the paths it claims are bridged,
            everything else goes to ``app_socket``.
        app_socket: a Unix socket where an HTTP server (the gateway's app) answers the
            requests the bridge does not serve itself.
        zero_copy: splice the guest's bytes to plain ``ws://`` clients (see
            :mod:`sandport.bridge.splicedown`) instead of copying them through Python.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    target: Target | None = None
    tokens: TokenPlugin | None = None
    host_token: bool = False
    web_dir: Path | None = None
    tls: TlsConfig | None = None
    target_tls: bool = False
    origins: tuple[str, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limits: BridgeLimits = field(default_factory=BridgeLimits)
    router: Router | None = None
    app_socket: str | None = None
    zero_copy: bool = True

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.target, self.tokens, self.router)) != 1:
            raise UsageError("give exactly one of a target, a token plugin or a router")


@dataclass(slots=True)
class RouteStats:
    """Counters of one route (a sandbox's port) or of a whole bridge."""

    sessions_active: int = 0
    sessions_total: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0
    closed: Counter[str] = field(default_factory=Counter)  # by reason
    #: RFB targets: seconds from the 101 to the server's ServerInit (sum and count), and
    #: handshakes the server refused (a wrong VNC password, mostly).
    rfb_ready_seconds: float = 0.0
    rfb_ready_count: int = 0
    rfb_failed: int = 0


@dataclass(slots=True)
class BridgeStats:
    """Counters of one bridge server (all sessions since start)."""

    routes: dict[tuple[str, str], RouteStats] = field(default_factory=dict)
    passthrough: int = 0  # connections handed to the HTTP app
    spliced: int = 0  # sessions whose downstream went zero-copy
    sessions_active: int = 0
    sessions_total: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0
    web_requests: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # by HTTP status
    closed: Counter[str] = field(default_factory=Counter)  # by reason


class Refusal(Exception):
    """A pre-upgrade refusal: HTTP status, a short error name and a message; for a target
    that failed, ``hop``: where on the path (``sandport doctor``'s hop names)."""

    def __init__(self, status: int, error: str, message: str,
                 headers: Sequence[tuple[str, str]] = (), hop: str = "") -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = tuple(headers)
        self.hop = hop


def json_response(status: int, doc: dict[str, Any],
                  headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A complete HTTP response with a JSON body; the connection closes after it."""
    body = (json.dumps(doc) + "\n").encode()
    h = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                 ("Connection", "close"), ("Cache-Control", "no-store"), *headers])
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return Response(status, phrase, h, body)


def _select_subprotocol(protocol: ServerProtocol,
                        offered: Sequence[Subprotocol]) -> Subprotocol | None:
    for name in SUBPROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    return None


_PROXY_V1 = b"PROXY "
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_signature(head: bytes) -> bool | None:
    """Whether ``head`` starts with a PROXY v1/v2 signature; None: too short to tell."""
    for sig in (_PROXY_V1, _PROXY_V2):
        if head.startswith(sig):
            return True
        if len(head) < len(sig) and sig.startswith(head):
            return None
    return False


def _in_networks(addr: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
                 ) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


class WsBridge:
    """The server: ``await start()``, then ``await stop()`` (or ``async with``)."""

    def __init__(self, config: BridgeConfig) -> None:
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
        self._sessions: set[_Session] = set()
        self._per_client: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        #: Client addresses from PROXY headers of sockets still waiting for their first byte.
        self._proxied: dict[int, tuple[str, int]] = {}
        self._closing = False
        #: Called with no arguments whenever a session ends (for --run-once and friends).
        self.on_session_end: Callable[[], None] | None = None
        self.bound_port = 0

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
                raise PortInUseError(host, self.config.listen_port,
                                     what="WebSocket port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"{host} is not an address of this machine") from None
            raise
        sock.setblocking(False)
        self._sock = sock
        self.bound_port = sock.getsockname()[1]
        self._loop.add_reader(sock.fileno(), self._accept)
        cfg = self.config
        log.info("%s: listening on %s:%d%s, %s%s", self.label, host, self.bound_port,
                 " (ws and wss)" if cfg.tls else "",
                 f"target {cfg.target}" if cfg.target else "targets by token",
                 f", web {cfg.web_dir}" if cfg.web_dir else "")

    async def stop(self) -> None:
        """Stop accepting, close every session with 1001 and wait for them (bounded)."""
        self._closing = True
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
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
                log.warning("%s: accept: %s", self.label, exc)
                return
            conn.setblocking(False)
            fd = conn.fileno()
            timer = self._loop.call_later(self.config.limits.handshake_timeout,
                                          self._first_bytes_timeout, fd)
            self._pending[fd] = (conn, timer)
            self._loop.add_reader(fd, self._on_first_bytes, fd)

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
                and _in_networks(client[0], self.config.trusted_proxies):
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
            body = json.dumps({"error": "tls_required",
                               "message": "this port takes only TLS: use wss:// or https://"})
            with contextlib.suppress(OSError):
                sock.send(f"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                          f"{body}".encode())
            sock.close()
            return
        session = _Session(self, f"{self.label}#{next(self._seq)}", client, tls)
        assert self._loop is not None
        ctx = self._tls.context() if tls and self._tls is not None else None
        self._spawn(self._connect_client(session, sock, ctx), session.cid)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_client(self, session: _Session, sock: socket.socket,
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

    def admit(self, session: _Session) -> None:
        """Count a session that is about to connect its target, or refuse it.

        Raises:
            Refusal: 503 over the global limit, 429 over the per-client limit.
        """
        lim = self.config.limits
        if self._closing:
            raise Refusal(503, "shutting_down", "the bridge is shutting down",
                          [("Retry-After", "5")])
        if lim.max_connections is not None and len(self._sessions) >= lim.max_connections:
            raise Refusal(503, "too_many_sessions",
                          f"the bridge has its limit of {lim.max_connections} sessions open",
                          [("Retry-After", "5")])
        ip = session.client[0]
        if lim.max_per_client is not None and self._per_client[ip] >= lim.max_per_client:
            raise Refusal(429, "too_many_sessions_from_client",
                          f"{ip} has its limit of {lim.max_per_client} sessions open",
                          [("Retry-After", "5")])
        self._sessions.add(session)
        self._per_client[ip] += 1
        self.stats.sessions_active = len(self._sessions)
        if session.route is not None and session.route.labels != ("", ""):
            rs = self.stats.routes.setdefault(session.route.labels, RouteStats())
            rs.sessions_active += 1
            session.route_stats = rs

    def release(self, session: _Session) -> None:
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

    def resolve(self, request: Request) -> Route:
        """The route of a request (fixed, by token, or by the router).

        Raises:
            Refusal: 401 without a token, 403 for an unknown token, or the router's.
        """
        if self.config.router is not None:
            return self.config.router.route(request)
        if self.config.target is not None:
            return Route(target=self.config.target)
        assert self.config.tokens is not None
        token = token_from(request.path, request.headers.get("Host"),
                           host_token=self.config.host_token)
        if token is None:
            where = "the Host header" if self.config.host_token else \
                "?token=T or the last path segment"
            raise Refusal(401, "token_missing", f"no token: this bridge needs one in {where}")
        target = self.config.tokens.lookup(token)
        if target is None:
            raise Refusal(403, "token_unknown", "the token is not valid here")
        return Route(target=target)

    async def connect_target(self, session: _Session, target: Target) -> None:
        """Connect the session's target.

        Raises:
            Refusal: 502 refused or unreachable, 504 timed out.
        """
        assert self._loop is not None
        loop = self._loop
        proto = _TargetSide(session)
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
            raise Refusal(504, "target_timeout",
                          f"the target {target} did not answer within "
                          f"{self.config.limits.connect_timeout:g} s",
                          hop="guest reachability") from None
        except ConnectionRefusedError:
            raise Refusal(502, "target_refused",
                          f"the target {target} refused the connection "
                          "(nothing listens there)", hop="guest service") from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise Refusal(502, "target_unreachable",
                          f"the target {target} is unreachable: {reason}",
                          hop="guest reachability") from None
        session.target = proto

    def web_response(self, request: Request) -> Response:
        """A plain GET: a file of ``web_dir``, or why not."""
        self.stats.web_requests += 1
        root = self.config.web_dir
        if root is None:
            return json_response(426, {
                "error": "upgrade_required",
                "message": "this is a WebSocket bridge: connect with a WebSocket client "
                           "(or start it with --web DIR to serve files)"},
                [("Upgrade", "websocket")])
        rel = unquote(urlsplit(request.path).path).lstrip("/")
        path = (root / rel).resolve()
        base = root.resolve()
        if path != base and base not in path.parents:
            return json_response(404, {"error": "not_found", "message": "no such file"})
        if path.is_dir():
            path = path / "index.html"
        try:
            size = path.stat().st_size
            if size > WEB_FILE_MAX or not path.is_file():
                raise FileNotFoundError
            body = path.read_bytes()
        except OSError:
            return json_response(404, {"error": "not_found",
                                       "message": f"no file {'/' + rel!r} here"})
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript",
                                                  "application/json"):
            ctype += "; charset=utf-8"
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Connection", "close"), ("Cache-Control", "no-cache")])
        return Response(200, "OK", headers, body)


class _TargetSide(asyncio.Protocol):
    """The target connection of a session."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's too
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        transport.pause_reading()  # until the upgrade is answered

    def data_received(self, data: bytes) -> None:
        if not self.session.upgraded:
            # Before the 101 (uvloop ignores pause_reading() in connection_made()): keep
            # what the guest said first (an RFB banner) for after the upgrade.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.session.from_target(data)

    def eof_received(self) -> bool:
        self.session.close(CLOSE_NORMAL, TARGET_CLOSED)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.session.close(CLOSE_NORMAL, TARGET_CLOSED)
        else:
            self.session.close(CLOSE_INTERNAL, target_failed(exc))

    def pause_writing(self) -> None:
        self.session.pause_client()

    def resume_writing(self) -> None:
        self.session.resume_client()


class _Session(asyncio.Protocol):
    """One client connection: the HTTP request, then (after the upgrade) the bridge."""

    def __init__(self, bridge: WsBridge, cid: str, client: tuple[str, int], tls: bool) -> None:
        self.bridge = bridge
        self.cid = cid
        self.client = client
        self.tls = tls
        lim = bridge.config.limits
        self.ws = ServerProtocol(subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
                                 select_subprotocol=_select_subprotocol,
                                 max_size=lim.max_message, logger=_protocol_log)
        self.transport: asyncio.Transport | None = None
        self.target: _TargetSide | None = None
        self.route: Route | None = None
        self.route_stats: RouteStats | None = None
        #: Front-door mode: collect the request head to decide: bridge or HTTP app.
        self._sniffing = bridge.config.app_socket is not None
        self._head = bytearray()
        self.subprotocol: str | None = None
        self.admitted = False
        self.upgraded = False
        self.closed = False
        self.close_reason = ""
        self.b64_carry = b""
        #: After the 101: the client's frames (websockets' protocol did the handshake).
        self.frames = FrameReader(lim.max_message)
        self.close_sent = False
        #: Watches an RFB handshake go by (VNC targets) until ServerInit; then None.
        self.rfb: RfbWatch | None = RfbWatch()
        #: Plain ws: the target→client direction spliced once nothing needs to see it.
        self._zc: SpliceDown | None = None
        #: Whether this session may ever splice (set at the upgrade: plain ws, binary).
        self._zc_possible = False
        self.upgraded_at = 0.0
        self.last_activity = time.monotonic()
        self.ping_outstanding = False
        self._timers: list[asyncio.TimerHandle] = []
        self.to_target = 0
        self.to_client = 0
        self.started = time.monotonic()

    # -- client transport callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's too
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.bridge.config.limits.handshake_timeout,
                                            self._handshake_timeout))

    def data_received(self, data: bytes) -> None:
        if self._sniffing:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._respond(json_response(431, {
                        "error": "request_too_large",
                        "message": f"the request head is over {MAX_HEAD} bytes"}))
                return
            self._sniffing = False
            data, self._head = bytes(self._head), bytearray()
            if not self._claimed_upgrade(data[:end]):
                self._pass_through(data)
                return
        if self.upgraded:
            self._receive_frames(data)
            return
        self.ws.receive_data(data)
        self._process()

    def _receive_frames(self, data: bytes) -> None:
        """The hot path: client frames to the target, control frames answered."""
        try:
            events = self.frames.receive_data(data)
        except FrameError as exc:
            self.close(exc.code, exc.reason)
            return
        pieces: list[bytes] = []
        for kind, op, payload, last in events:
            if kind is Event.DATA:
                if self.closed:
                    continue
                piece: bytes | None = payload
                error = ""
                if self.subprotocol == "base64":  # text; binary messages holding base64 too
                    piece = self._b64_decode(payload, final=last)
                    if piece is None:
                        error = "base64 subprotocol: the message is not base64"
                elif op is Opcode.TEXT:
                    error = ("text messages are not accepted: send binary (or ask for the "
                             "base64 subprotocol)")
                if error:  # what came before still reaches the target
                    self._to_target(pieces)
                    self.close(CLOSE_UNSUPPORTED, error)
                    return
                if piece:
                    pieces.append(piece)
            elif kind is Event.PING:
                if not self.close_sent:
                    self._send_frame(Opcode.PONG, payload)
            elif kind is Event.PONG:
                self.ping_outstanding = False
            else:
                # What came before the close frame goes to the target first.
                self._to_target(pieces)
                pieces = []
                self._on_client_close(payload)
                return
        self._to_target(pieces)

    def _to_target(self, pieces: list[bytes]) -> None:
        target = self.target.transport if self.target is not None else None
        if not pieces or target is None or target.is_closing():
            return
        if self.rfb is not None:
            for piece in pieces:
                self._watch(self.rfb.from_client(piece))
        n = sum(map(len, pieces))
        target.writelines(pieces)
        self.last_activity = time.monotonic()
        self.to_target += n
        self.bridge.stats.bytes_to_target += n
        if self.route_stats is not None:
            self.route_stats.bytes_to_target += n

    def _on_client_close(self, payload: bytes) -> None:
        try:
            code, reason = parse_close(payload)
        except FrameError as exc:
            self.close(exc.code, exc.reason)
            return
        if not self.closed:
            self.closed = True
            detail = "" if code is None else f" ({code} {reason})".replace(" )", ")")
            self.close_reason = f"the client closed{detail}"
        if not self.close_sent:  # echo the close (section 5.5.1), then end the TCP side
            self.close_sent = True
            self._send_frame(Opcode.CLOSE, b"" if code is None else close_payload(code, ""))
        self._close_target()
        if self._zc is not None:
            self._zc.stop()  # its descriptor would keep the connection open
        if self.transport is not None:
            self.transport.close()  # the server closes TCP first (section 7.1.1)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self._zc is not None and not self._zc.stopped:
            self._zc.send(frame_header(opcode, len(payload)) + payload)
        elif self.transport is not None:
            self.transport.writelines((frame_header(opcode, len(payload)), payload))

    def _claimed_upgrade(self, head: bytes) -> bool:
        router = self.bridge.config.router
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if router is None or len(parts) != 3 or parts[0] != b"GET":
            return False
        upgrade = any(line.lower().startswith(b"upgrade:") and b"websocket" in line.lower()
                      for line in lines[1:])
        path = parts[1].split(b"?", 1)[0].decode("latin-1")
        return upgrade and router.claims(path)

    def _pass_through(self, data: bytes) -> None:
        """Hand this connection to the HTTP app (the requests are not the bridge's)."""
        for t in self._timers:
            t.cancel()
        self.closed = True
        self._finished = True
        assert self.transport is not None
        assert self.bridge.config.app_socket is not None
        self.bridge.stats.passthrough += 1
        trusted = _in_networks(self.client[0], self.bridge.config.trusted_proxies)
        relay = HttpPassthrough(self.cid, self.transport, self.bridge.config.app_socket,
                                RequestRewriter(self.client[0], "https" if self.tls else
                                                "http", trusted=trusted))
        self.transport.set_protocol(relay)
        self.bridge._spawn(relay.start(data), f"{self.cid} http")

    def eof_received(self) -> bool:
        if self._sniffing:
            if self.transport is not None:
                self.transport.close()
            return False
        if self.upgraded:  # the client's TCP side ended without a close frame
            if not self.closed:
                self.closed = True
                self.close_reason = "the client went away"
            self._close_target()
            return False
        self.ws.receive_eof()
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = self.close_reason or (
                "the client went away" if exc is None else f"the client connection failed: "
                f"{getattr(exc, 'strerror', None) or exc}")
        self._finish()

    def pause_writing(self) -> None:
        if self.target is not None and self.target.transport is not None:
            self.target.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.target is not None and self.target.transport is not None and self.upgraded:
            self.target.transport.resume_reading()

    def pause_client(self) -> None:
        """The target's buffer is full: stop reading the client."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        """The target drained: read the client again."""
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- events -------------------------------------------------------------------------------

    def _process(self) -> None:
        """Before the upgrade: the request, or websockets' own answer to a bad one."""
        for event in self.ws.events_received():
            if isinstance(event, Request):
                if self.transport is not None:
                    self.transport.pause_reading()
                self.bridge._spawn(self._handle_request(event), f"{self.cid} handshake")
        self._flush()
        if self.ws.state is State.CLOSED or self.ws.close_expected():
            # Not an HTTP request websockets could parse: it answered (or not); end.
            self.closed = True
            self.close_reason = self.close_reason or "not a valid request"
            if self.transport is not None:
                self.transport.close()

    def _b64_decode(self, chunk: bytes, *, final: bool) -> bytes | None:
        data = self.b64_carry + chunk
        cut = len(data) if final else len(data) - len(data) % 4
        self.b64_carry = data[cut:]
        try:
            return base64.b64decode(data[:cut], validate=True)
        except (binascii.Error, ValueError):
            return None

    def from_target(self, data: bytes) -> None:
        """Bytes from the target: one message to the client."""
        if self.closed or not self.upgraded:
            return
        self.last_activity = time.monotonic()
        self.to_client += len(data)
        self.bridge.stats.bytes_to_client += len(data)
        if self.route_stats is not None:
            self.route_stats.bytes_to_client += len(data)
        if self.subprotocol == "base64":
            self._send_frame(Opcode.TEXT, base64.b64encode(data))
        else:
            self._send_frame(Opcode.BINARY, data)
        if self.rfb is not None:
            self._watch(self.rfb.from_server(data))
        if self._zc_possible and self._zc is None and self._zero_copy_ready():
            self._start_zero_copy()

    # -- zero-copy downstream (plain ws) ------------------------------------------------------

    def _zero_copy_ready(self) -> bool:
        """Whether the target→client bytes may bypass Python from now on."""
        target = self.target.transport if self.target is not None else None
        return (self.rfb is None and not self.closed
                and self.transport is not None and not self.transport.is_closing()
                and self.transport.get_write_buffer_size() == 0
                and target is not None and not target.is_closing())

    def _start_zero_copy(self) -> None:
        assert self.transport is not None
        assert self.target is not None
        assert self.target.transport is not None
        client = self.transport.get_extra_info("socket")
        target = self.target.transport.get_extra_info("socket")
        if client is None or target is None:
            return
        self.target.transport.pause_reading()  # from now on SpliceDown reads the target
        try:
            self._zc = SpliceDown(client.fileno(), target.fileno(), on_data=self._spliced,
                                  on_target_end=self._zc_target_end,
                                  on_client_error=self._zc_client_error)
        except OSError as exc:  # out of descriptors or pipes: stay on the copy path
            log.warning("%s: no zero-copy downstream: %s", self.cid, exc)
            self.target.transport.resume_reading()
            return
        self.bridge.stats.spliced += 1
        log.debug("%s: downstream spliced (zero-copy)", self.cid)

    def _spliced(self, n: int) -> None:
        self.last_activity = time.monotonic()
        self.to_client += n
        self.bridge.stats.bytes_to_client += n
        if self.route_stats is not None:
            self.route_stats.bytes_to_client += n

    def _zc_target_end(self, exc: OSError | None) -> None:
        if exc is None:
            self.close(CLOSE_NORMAL, TARGET_CLOSED)
        else:
            self.close(CLOSE_INTERNAL, target_failed(exc))

    def _zc_client_error(self, exc: OSError) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = f"the client connection failed: {exc.strerror or exc}"
        self.abort()

    def _watch(self, state: Watch) -> None:
        if state is Watch.WATCHING:
            return
        self.rfb = None
        rs = self.route_stats
        if state is Watch.SERVER_INIT:
            took = time.monotonic() - self.upgraded_at
            log.info("%s: RFB ServerInit %.0f ms after the upgrade", self.cid, took * 1000)
            if rs is not None:
                rs.rfb_ready_seconds += took
                rs.rfb_ready_count += 1
        elif state is Watch.FAILED:
            log.info("%s: the RFB server refused the handshake (wrong password?)", self.cid)
            if rs is not None:
                rs.rfb_failed += 1

    def _flush(self) -> None:
        if self.transport is None:
            return
        out = self.ws.data_to_send()
        if out:
            for chunk in out:
                if chunk:
                    self.transport.write(chunk)
                elif self.transport.can_write_eof() and not self.tls:  # EOF from the protocol
                    with contextlib.suppress(OSError, RuntimeError):
                        self.transport.write_eof()

    # -- handshake ----------------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if not self.upgraded and not self.closed and not self.admitted:
            log.info("%s: no complete request from %s within %.0f s: closed", self.cid,
                     self.client[0], self.bridge.config.limits.handshake_timeout)
            self.abort()

    def _real_client(self, request: Request) -> None:
        trusted = self.bridge.config.trusted_proxies
        if not trusted or not _in_networks(self.client[0], trusted):
            return
        hops = [h.strip() for h in ",".join(request.headers.get_all("X-Forwarded-For"))
                .split(",") if h.strip()]
        for hop in reversed(hops):  # rightmost first: the closest proxy appended it
            if not _in_networks(hop, trusted):
                with contextlib.suppress(ValueError):
                    self.client = (str(ipaddress.ip_address(hop)), 0)
                return

    async def _handle_request(self, request: Request) -> None:
        bridge = self.bridge
        try:
            for name in ("Host", "Upgrade", "Origin", "Sec-WebSocket-Key"):
                if len(request.headers.get_all(name)) > 1:
                    raise Refusal(400, "bad_request", f"the request has more than one {name} "
                                                      "header")
            self._real_client(request)
            if request.headers.get("Upgrade", "").lower() != "websocket":
                self._respond(bridge.web_response(request))
                return
            origins = bridge.config.origins
            origin = request.headers.get("Origin")
            # Browsers always send Origin; other clients (probes, scripts) send none.
            if origins and origin is not None and origin not in origins:
                raise Refusal(403, "origin_not_allowed",
                              f"Origin {origin!r} is not allowed (cross-site WebSocket "
                              f"requests are refused; allowed: {', '.join(origins)})")
            route = bridge.resolve(request)
            target = route.target
            self.route = route
            response = self.ws.accept(request)
            if response.status_code != 101:  # not a valid WebSocket handshake
                self._respond(response)
                return
            bridge.admit(self)
            self.admitted = True
            try:
                await bridge.connect_target(self, target)
            except Refusal as r:
                bridge.release(self)
                self.admitted = False
                if route.starting and r.status in (502, 504):
                    raise Refusal(503, "not_ready", f"the sandbox is starting: {r.message}; "
                                  "try the same URL again", [("Retry-After", "2")],
                                  hop=r.hop) from None
                if route.diagnosis:
                    r.message = f"{r.message}; sandport doctor: {route.diagnosis}"
                raise
            except BaseException:
                bridge.release(self)
                self.admitted = False
                raise
            if self.closed:  # the client went away while we connected
                self._close_target()
                return
            self.subprotocol = response.headers.get("Sec-WebSocket-Protocol")
            self.ws.send_response(response)
            self.upgraded = True
            self.upgraded_at = time.monotonic()
            self._zc_possible = (bridge.config.zero_copy and SPLICE_AVAILABLE
                                 and not self.tls and self.subprotocol != "base64")
            if self.ws.events_received() or self.ws.reader.buffer:
                # Frames before our 101: RFC 6455 section 4.1 forbids them.
                self._flush()
                self.close(1002, "data sent before the handshake response")
                return
            bridge.stats.sessions_total += 1
            if self.route_stats is not None:
                self.route_stats.sessions_total += 1
            self._flush()
            log.info("%s: %s%s -> %s (%s%s)", self.cid, self.client[0],
                     f":{self.client[1]}" if self.client[1] else "", target,
                     self.subprotocol or "no subprotocol", ", TLS" if self.tls else "")
            self._start_timers()
            assert self.target is not None
            assert self.target.transport is not None
            early, self.target.early = self.target.early, []
            for chunk in early:
                self.from_target(chunk)
            self.target.transport.resume_reading()
            if self.transport is not None:
                self.transport.resume_reading()
        except Refusal as r:
            bridge.stats.refused[r.status] += 1
            log.info("%s: %s refused: %d %s", self.cid, self.client[0], r.status, r.message)
            doc = {"error": r.error, "message": r.message}
            if r.hop:
                doc["hop"] = r.hop
            self._respond(json_response(r.status, doc, r.headers))
        except Exception:  # a bug must not leave the client waiting for an answer
            log.exception("%s: handling the request from %s failed", self.cid, self.client[0])
            if self.upgraded:
                self.close(CLOSE_INTERNAL, "internal error in the bridge")
            else:
                bridge.stats.refused[500] += 1
                self._respond(json_response(500, {
                    "error": "internal", "message": "the bridge failed to handle this request; "
                    "its log has the details"}))

    def _respond(self, response: Response) -> None:
        self.ws.send_response(response)
        self._flush()
        self.closed = True
        self.close_reason = f"HTTP {response.status_code}"
        if self.transport is not None:
            self.transport.close()

    # -- timers -------------------------------------------------------------------------------

    def _start_timers(self) -> None:
        lim = self.bridge.config.limits
        loop = asyncio.get_running_loop()
        if lim.idle_timeout:
            self._timers.append(loop.call_later(lim.idle_timeout, self._check_idle))
        if lim.heartbeat:
            self._timers.append(loop.call_later(lim.heartbeat, self._heartbeat))

    def _check_idle(self) -> None:
        lim = self.bridge.config.limits
        assert lim.idle_timeout is not None
        left = self.last_activity + lim.idle_timeout - time.monotonic()
        if self.closed:
            return
        if left <= 0:
            self.close(CLOSE_NORMAL, f"idle for {lim.idle_timeout:g} s")
            return
        self._timers.append(asyncio.get_running_loop().call_later(left, self._check_idle))

    def _heartbeat(self) -> None:
        lim = self.bridge.config.limits
        assert lim.heartbeat is not None
        if self.closed or not self.upgraded:
            return
        if self.ping_outstanding:
            self.close(CLOSE_INTERNAL, f"keepalive: no pong within {lim.heartbeat:g} s")
            return
        self.ping_outstanding = True
        self._send_frame(Opcode.PING, b"sandport")
        self._timers.append(asyncio.get_running_loop().call_later(lim.heartbeat,
                                                                  self._heartbeat))

    # -- ending -------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code`` and ``reason`` (once), and the target."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.upgraded and not self.close_sent:
            self.close_sent = True
            self._send_frame(Opcode.CLOSE, close_payload(code, reason))
            if self.transport is not None:
                loop = asyncio.get_running_loop()
                self._timers.append(loop.call_later(CLOSE_TIMEOUT, self.abort))
        elif self.transport is not None:
            self.transport.close()
        self._close_target()

    def abort(self) -> None:
        """Drop both connections now."""
        self.closed = True
        if self._zc is not None:
            self._zc.stop()
        if self.transport is not None:
            self.transport.abort()
        if self.target is not None and self.target.transport is not None:
            self.target.transport.abort()
        self._finish()

    def _close_target(self) -> None:
        if self._zc is not None:
            self._zc.stop_target()
        if self.target is not None and self.target.transport is not None:
            self.target.transport.close()

    _finished = False

    def _finish(self) -> None:
        if self._finished:
            return
        if self.transport is not None and not self.transport.is_closing():
            return
        self._finished = True
        for t in self._timers:
            t.cancel()
        if self._zc is not None:
            self._zc.stop()
        self._close_target()
        if self.admitted:
            self.bridge.release(self)
            self.bridge.stats.closed[self.close_reason or "closed"] += 1
            if self.route_stats is not None:
                self.route_stats.closed[_reason_kind(self.close_reason)] += 1
            log.info("%s: closed: %s (to target %d B, to client %d B, %.1f s)", self.cid,
                     self.close_reason or "closed", self.to_target, self.to_client,
                     time.monotonic() - self.started)


def _reason_kind(reason: str) -> str:
    """A close reason as a short label for counters (the text without its numbers)."""
    if not reason:
        return "closed"
    for kind in ("target closed", "idle", "keepalive", "shutting down", "client closed",
                 "client went away", "target connection failed", "not base64",
                 "text messages", "HTTP"):
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"
