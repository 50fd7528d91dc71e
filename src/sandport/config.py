"""Configuration: a frozen dataclass tree, resolved once.

The CLI only maps flags onto these objects; everything the CLI does can be done from
Python by building a :class:`GatewayConfig` and handing it to
:class:`sandport.control.gateway.Gateway`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sandport.bridge.throttle import ThrottleConfig
from sandport.bridge.tls import TlsConfig
from sandport.errors import UsageError
from sandport.net.upstream import DEFAULT_GUEST_TIMEOUT

DEFAULT_STATE_DIR = Path("/var/lib/sandport")
DEFAULT_BRIDGE = "sp-br0"
DEFAULT_SUBNET = ipaddress.IPv4Network("10.201.0.0/24")
DEFAULT_LISTEN = ("127.0.0.1", 8700)
DEFAULT_AGENT_PORT = 7411
#: GatewayConfig.guest_privileges: guest programs in an unprivileged container (default),
#: or, only when asked for by this loud name, as host root (see docs/security.md).
GUEST_UNPRIVILEGED = "unprivileged"
GUEST_HOST_ROOT_UNSAFE = "host-root-UNSAFE"
DEFAULT_IMAGE_CACHE = Path("/var/cache/sandport/images")  # guest images (sandbox.images)
IFNAMSIZ = 15  # Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
#: The agent port's limits (guests are hostile): content bytes of one request (reports
#: and credentials are small), seconds a request head may take, seconds a connection may
#: stay silent both ways, connections open at once from one source address (a sandbox).
AGENT_MAX_BODY = 64 * 1024
AGENT_HEAD_TIMEOUT = 10.0
AGENT_IDLE_TIMEOUT = 10.0  # between requests the agent app's own 5 s keep-alive ends first
AGENT_MAX_PER_SOURCE = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class NetConfig:
    """Host networking for sandboxes.

    Attributes:
        bridge: the bridge that holds the gateway address; sandbox links are its ports.
        subnet: the sandbox address pool; the first host address is the gateway's. A
            string (``"10.201.5.0/24"``) is taken too and turned into the network.

    Raises:
        UsageError: the bridge name or the subnet is not usable (with why).
    """

    bridge: str = DEFAULT_BRIDGE
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET

    def __post_init__(self) -> None:
        if not isinstance(self.subnet, ipaddress.IPv4Network):
            object.__setattr__(self, "subnet", _ipv4_network(self.subnet))
        if not self.bridge.startswith("sp-") or len(self.bridge) > IFNAMSIZ:
            raise UsageError(
                f"bridge name {self.bridge!r} must start with 'sp-' and be at most "
                f"{IFNAMSIZ} characters"
            )
        if self.subnet.prefixlen > 29 or self.subnet.prefixlen < 16:
            raise UsageError(
                f"subnet {self.subnet} must be between /16 and /29 to hold a gateway "
                "and sandboxes"
            )

    @property
    def gateway_ip(self) -> ipaddress.IPv4Address:
        """The bridge's own address: the first host address of the subnet."""
        return self.subnet.network_address + 1


def _ipv4_network(value: object) -> ipaddress.IPv4Network:
    """``value`` (a string like ``10.201.5.0/24``) as the subnet of a :class:`NetConfig`."""
    if not isinstance(value, str):
        raise UsageError(f"subnet {value!r} ({type(value).__name__}) is not an IPv4 network "
                         "like '10.201.5.0/24'")
    try:
        return ipaddress.IPv4Network(value)
    except ValueError as exc:
        raise UsageError(f"subnet {value!r} is not an IPv4 network like '10.201.5.0/24': "
                         f"{exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentLimits:
    """What one sandbox's guest may cost the agent port (its front enforces them).

    Attributes:
        max_body: content bytes a request may carry, chunked or not (over: 413).
        head_timeout: seconds from a connection (or a later request's first byte) to the
            end of its request head (over: 408 and closed).
        idle_timeout: seconds without a byte either way before a connection is closed.
        max_per_source: connections open at once from one address (over: 429, closed).
    """

    max_body: int = AGENT_MAX_BODY
    head_timeout: float = AGENT_HEAD_TIMEOUT
    idle_timeout: float = AGENT_IDLE_TIMEOUT
    max_per_source: int = AGENT_MAX_PER_SOURCE

    def __post_init__(self) -> None:
        if self.max_body < 0 or self.max_per_source < 1:
            raise UsageError("agent limits: max_body must be >= 0 and max_per_source >= 1")
        if not (self.head_timeout > 0 and self.idle_timeout > 0):
            raise UsageError("agent limits: the head and idle timeouts must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Everything a gateway needs, resolved before it starts.

    Attributes:
        listen_host: address of the HTTP port (noVNC, WebSocket bridge, API).
        listen_port: the HTTP port; 0 picks a free one.
        state_dir: SQLite store, per-sandbox files and logs; locked while a gateway runs.
        net: bridge and address pool.
        forward_host: address that host port forwards bind to.
        public_host: host name written into URLs; defaults to ``listen_host``.
        public_url: ``http(s)://host[:port]`` where clients reach the gateway (its name,
            a reverse proxy): every link handed out (desktop and token links, WebSocket
            URLs) starts with it, and its origin may open desktop WebSockets whatever
            ``origins`` says. None: the listen address; for a wildcard listen
            (``0.0.0.0``, ``::``) this host's address on its default route.
        ready_timeout: seconds a sandbox may take to answer its protocol.
        probe_interval: seconds between readiness probes of a ready sandbox (it turns
            ``degraded`` when one fails, ``ready`` again when one succeeds).
        forward_mode: ``auto``, ``kernel`` or ``proxy`` for host port forwards.
        tls: certificate for https:// and wss:// on the HTTP port (plain http and ws stay
            served on the same port unless ``tls.ssl_only``).
        origins: ``Origin`` values allowed to open bridge WebSockets; empty allows any.
        trusted_proxies: networks whose X-Forwarded-For / PROXY header names the client.
        ws_max_sessions, ws_max_per_client: bridge session limits (None: none).
        vnc_logins: failed VNC logins per client address before its new desktop
            sessions wait (:mod:`sandport.bridge.throttle`); None: not counted.
        secret_key_file: the key that seals secrets at rest (64 hex digits); None keeps
            it in ``<state dir>/secret.key``, created at the first start (mode 0600).
        agent_port: where guest agents reach the gateway: this port on the bridge
            address (sandboxes only; agent routes only).
        agent_limits: body cap, head and idle timeouts, per-sandbox connection cap of
            the agent port.
        image_cache: where the qemu backend finds (and builds) its guest images.
        qemu_accel: ``auto`` (kvm where usable and not paravirtual, else tcg), ``kvm``
            or ``tcg``.
        attach_subnets: the networks targets may be attached in (``sandport attach``);
            none by default: sandport relays into no network it was not told about.
        attach_grace: seconds an attached target may stay ``degraded`` (not answering)
            before it is ``failed`` with the doctor's reason.
        guest_timeout: seconds data the relay or the bridge sent to a guest may stay
            unacknowledged (the guest gone without a word, or reading nothing) before
            that connection is given up (:mod:`sandport.net.upstream`).
        guest_privileges: ``unprivileged`` (default): a netns sandbox's guest programs
            run in a crun container of their own (user namespace on an unprivileged host
            uid range, no capabilities, seccomp, no host secrets in view).
            ``host-root-UNSAFE`` runs them as host root with every capability: only for
            a guest you would give root on this host.
    """

    listen_host: str = DEFAULT_LISTEN[0]
    listen_port: int = DEFAULT_LISTEN[1]
    state_dir: Path = DEFAULT_STATE_DIR
    net: NetConfig = field(default_factory=NetConfig)
    forward_host: str = "127.0.0.1"
    public_host: str | None = None
    public_url: str | None = None
    ready_timeout: float = 60.0
    probe_interval: float = 5.0
    forward_mode: str = "auto"
    tls: TlsConfig | None = None
    origins: tuple[str, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ws_max_sessions: int | None = None
    ws_max_per_client: int | None = None
    vnc_logins: ThrottleConfig | None = field(default_factory=ThrottleConfig)
    secret_key_file: Path | None = None
    agent_port: int = DEFAULT_AGENT_PORT
    agent_limits: AgentLimits = field(default_factory=AgentLimits)
    image_cache: Path = DEFAULT_IMAGE_CACHE
    qemu_accel: str = "auto"
    attach_subnets: tuple[ipaddress.IPv4Network, ...] = ()
    attach_grace: float = 60.0
    guest_timeout: float = DEFAULT_GUEST_TIMEOUT
    guest_privileges: str = GUEST_UNPRIVILEGED

    def __post_init__(self) -> None:
        if self.public_url is not None:
            object.__setattr__(self, "public_url", _check_public_url(self.public_url))
        if self.guest_privileges not in (GUEST_UNPRIVILEGED, GUEST_HOST_ROOT_UNSAFE):
            raise UsageError(
                f"guest_privileges {self.guest_privileges!r} must be {GUEST_UNPRIVILEGED!r} "
                f"or {GUEST_HOST_ROOT_UNSAFE!r}"
            )

    @property
    def scheme(self) -> str:
        """``https`` when the HTTP port has a certificate."""
        return "https" if self.tls is not None else "http"

    @property
    def url_host(self) -> str:
        """The host part used in URLs printed for people."""
        host = connect_host(self.public_host or self.listen_host)
        return f"[{host}]" if ":" in host else host


def _check_public_url(text: str) -> str:
    """``text`` without a trailing ``/``, if it is ``http(s)://host[:port]``.

    Raises:
        UsageError: another scheme, no host, a bad port, or a path, query or user part
            (links are made at the root of the URL: serve the gateway at the root of a
            host name, not under a path prefix).
    """
    usage = (f"public URL {text!r} must be http://HOST[:PORT] or https://HOST[:PORT], "
             "e.g. https://sandport.example.com or http://192.0.2.10:8700")
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise UsageError(usage) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or (
            port is not None and not 0 < port < 65536):
        raise UsageError(usage)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username \
            or parts.password is not None:
        raise UsageError(f"{usage} (no path, query or user: the gateway's links start at "
                         "the root of the host; a reverse proxy must serve it at a root)")
    return f"{parts.scheme}://{parts.netloc}"


def connect_host(bind_host: str) -> str:
    """An address this host can connect to for a listener bound to ``bind_host``.

    A wildcard bind (``0.0.0.0``, ``::``) is reached through loopback; others as they are.
    """
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)


def parse_hostport(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``PORT``.

    Raises:
        UsageError: with the accepted syntax, if ``text`` is none of those.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = default_host, text
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"{text!r} is not an address: use HOST:PORT, e.g. 127.0.0.1:8700"
        ) from None
    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} in {text!r} is outside 0-65535")
    return host, port
