"""What a WebSocket bridge is configured with and what it counts: plain data, no I/O.

Owns the bridge's configuration (:class:`BridgeConfig`, :class:`BridgeLimits`), where a
WebSocket request goes (:class:`BridgeRoute`, the :class:`Router` protocol a front door
asks), its counters (:class:`BridgeStats`, :class:`RouteStats`) and the refusal of an
upgrade (:class:`UpgradeRefusal`). The server (:mod:`.server`), the session
(:mod:`.session`) and the gateway's router read these; nothing here opens a socket.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from websockets.http11 import Request

from sandport.bridge.targets import Target, TokenPlugin
from sandport.bridge.throttle import ThrottleConfig
from sandport.bridge.tls import TlsConfig
from sandport.errors import UsageError
from sandport.net.upstream import DEFAULT_GUEST_TIMEOUT

__all__ = [
    "BridgeConfig",
    "BridgeLimits",
    "BridgeRoute",
    "BridgeStats",
    "RouteStats",
    "Router",
    "UpgradeRefusal",
    "in_networks",
]

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
        logins: failed VNC logins per client address before it waits (429 with
            ``Retry-After``; :mod:`sandport.bridge.throttle`); None: not counted.
        guest_timeout: seconds data to the target may stay unacknowledged before the
            session closes with 1011 (:mod:`sandport.net.upstream`).
    """

    max_connections: int | None = None
    max_per_client: int | None = None
    max_message: int = 16 * 1024 * 1024
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float | None = None
    heartbeat: float | None = None
    logins: ThrottleConfig | None = field(default_factory=ThrottleConfig)
    guest_timeout: float = DEFAULT_GUEST_TIMEOUT


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeRoute:
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

    def route(self, request: Request) -> BridgeRoute:
        """The route of a claimed request.

        Raises:
            UpgradeRefusal: with the status and reason to answer.
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
        router: front-door mode: every WebSocket upgrade is routed (or refused) by it;
            every other request goes to ``app_socket``.
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
    login_blocks: int = 0  # upgrades refused: their address failed VNC logins too often
    #: Clients reset at accept, by reason (``descriptors``: the process was out of them).
    accept_refused: Counter[str] = field(default_factory=Counter)


class UpgradeRefusal(Exception):
    """A pre-upgrade refusal: HTTP status, a short error name and a message; for a target
    that failed, ``hop``: where on the path (``sandport doctor``'s hop names)."""

    def __init__(self, status: int, error: str, message: str,
                 headers: Sequence[tuple[str, str]] = (), hop: str = "") -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = tuple(headers)
        self.hop = hop



def in_networks(addr: str, nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
                ) -> bool:
    """Whether ``addr`` (an IP address as text; anything else is not) is in ``nets``."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _origin_key(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin (RFC 6454 §4), lower case, the default port
    filled in; None for what is not one (``null``, no host, a bad port)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def origin_allowed(origin: str, allowed: Sequence[str], *, scheme: str, host: str) -> bool:
    """Whether a browser's ``Origin`` may open a WebSocket here (``allowed`` not empty).

    Allowed: an origin in ``allowed``, and the server's own: the ``scheme`` of this
    connection and the ``Host`` header of this request (RFC 6454 §5: a page loaded
    from where it connects is same-origin). The Host header is the client's word, but a
    browser sends the one of the URL it connects to, so a page of another site never
    matches it; a client that is not a browser can send any Origin anyway.
    """
    key = _origin_key(origin)
    if key is None:
        return False
    if any(_origin_key(a) == key for a in allowed):
        return True
    return bool(host) and key == _origin_key(f"{scheme}://{host}")
