#!/usr/bin/env python3
"""The sandport guest agent: runs inside a sandbox and speaks for it.

The gateway starts one agent in every sandbox (inside the sandbox's network namespace; later
inside a VM image). The agent

- answers ``GET /health`` with what the sandbox is doing: the sockets that listen in its
  network namespace, the processes that live in it, and how reporting to the gateway goes;
- relays ``POST /credentials`` from guest programs (loopback clients only) to the gateway,
  authenticated with the sandbox's agent token, and hands back the gateway's answer
  unchanged, so a guest program learns at once when the gateway refuses (the incident
  where an agent POSTed credentials to an endpoint that did not exist went unnoticed);
- reports the health document to the gateway at start and every few seconds.

It is standard-library only and runs as a plain script (``python3 -I -S agent.py``): it must
not import sandport or anything from site-packages, so it can be copied into a VM image.

Configuration (environment variables, resolved once at start):

=================================  ========  =================================================
``SANDPORT_SANDBOX_ID``            required  the sandbox id (letters, digits, ``._-``; ≤ 64)
``SANDPORT_GATEWAY_URL``           required  the gateway's agent endpoint base URL,
                                             e.g. ``http://10.201.3.1:7411``
``SANDPORT_AGENT_TOKEN``           required  the per-sandbox bearer token for the gateway
``SANDPORT_AGENT_LISTEN``          optional  ``HOST:PORT`` to listen on (IP literal; IPv6 in
                                             brackets), default ``0.0.0.0:7412``
``SANDPORT_AGENT_REPORT_INTERVAL`` optional  seconds between reports (float), default ``10``;
                                             ``0`` disables periodic reports (the start
                                             report is still sent)
=================================  ========  =================================================

Exit codes: 0 after SIGTERM/SIGINT, 1 when the listen address cannot be bound, 2 for missing
or invalid configuration (one line on stderr).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal, NamedTuple

log = logging.getLogger("sandport.agent")

ENV_SANDBOX_ID = "SANDPORT_SANDBOX_ID"
ENV_GATEWAY_URL = "SANDPORT_GATEWAY_URL"
ENV_TOKEN = "SANDPORT_AGENT_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_LISTEN = "SANDPORT_AGENT_LISTEN"
ENV_REPORT_INTERVAL = "SANDPORT_AGENT_REPORT_INTERVAL"

DEFAULT_LISTEN = "0.0.0.0:7412"
DEFAULT_REPORT_INTERVAL = "10"

#: Largest ``POST /credentials`` body the agent accepts (bytes).
MAX_CREDENTIALS_BODY = 64 * 1024
#: A refused body up to this size is read and discarded before answering, so the client
#: reads the error instead of a connection reset.
DRAIN_LIMIT = 1024 * 1024
#: Largest gateway answer the agent reads (bytes); a longer one counts as not JSON.
MAX_GATEWAY_BODY = 1024 * 1024
#: Longest cmdline reported per process (characters).
MAX_CMDLINE = 4096

CREDENTIALS_TIMEOUT = 10.0
REPORT_TIMEOUT = 5.0
#: Socket timeout for one client connection to the agent (slow clients cannot pin a thread).
CLIENT_TIMEOUT = 15.0
#: How often serve_forever() looks for a shutdown request; bounds the exit time on SIGTERM.
POLL_INTERVAL = 0.2

SANDBOX_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,19}")

#: /proc/net/{tcp,udp}[6] ``st`` column (include/net/tcp_states.h): a TCP socket in LISTEN,
#: and an unconnected (bound, listening) UDP socket, shown as TCP_CLOSE; ``ss -l`` uses the same.
TCP_LISTEN = 0x0A
UDP_UNCONNECTED = 0x07
PROC_NET_FILES: tuple[tuple[str, Literal["tcp", "udp"]], ...] = (
    ("tcp", "tcp"),
    ("tcp6", "tcp"),
    ("udp", "udp"),
    ("udp6", "udp"),
)

JSONObject = dict[str, Any]


class ConfigError(ValueError):
    """The agent's environment is missing a variable or holds an invalid value."""


class BadBody(ValueError):
    """A request body the agent refuses (400); ``name`` is the short error name.

    Args:
        name: ``bad_json`` or ``not_an_object``.
        message: what is wrong, in words.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """The agent's configuration, resolved once from the environment.

    Attributes:
        sandbox_id: the sandbox this agent speaks for.
        gateway_url: the gateway's agent endpoint base URL, without a trailing slash.
        token: the bearer token the gateway expects from this sandbox's agent.
        listen_host: IP literal the agent's HTTP server binds to.
        listen_port: TCP port the agent's HTTP server binds to.
        report_interval: seconds between reports; 0 sends only the start report.
    """

    sandbox_id: str
    gateway_url: str
    token: str
    listen_host: str = "0.0.0.0"
    listen_port: int = 7412
    report_interval: float = 10.0

    def __repr__(self) -> str:
        # Never show the token, not even in a traceback.
        return (
            f"AgentConfig(sandbox_id={self.sandbox_id!r}, gateway_url={self.gateway_url!r}, "
            f"listen={self.listen}, report_interval={self.report_interval:g})"
        )

    @property
    def listen(self) -> str:
        """The listen address as ``HOST:PORT`` (IPv6 in brackets)."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def gateway_endpoint(self, suffix: str) -> str:
        """The gateway URL of this sandbox's ``/api/sandboxes/{id}/{suffix}`` endpoint."""
        sandbox = urllib.parse.quote(self.sandbox_id, safe="")
        return f"{self.gateway_url}/api/sandboxes/{sandbox}/{suffix}"

    @property
    def credentials_url(self) -> str:
        """Where ``POST /credentials`` bodies are forwarded."""
        return self.gateway_endpoint("credentials")

    @property
    def report_url(self) -> str:
        """Where health reports are POSTed."""
        return self.gateway_endpoint("agent/report")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentConfig:
        """Resolve the configuration from environment variables.

        Args:
            env: the environment, e.g. ``os.environ``.

        Returns:
            The resolved configuration.

        Raises:
            ConfigError: naming every missing or invalid variable, on one line.
        """
        problems: list[str] = []

        def required(name: str, what: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                problems.append(f"{name} is not set ({what})")
            return value

        sandbox_id = required(ENV_SANDBOX_ID, "the sandbox id")
        if sandbox_id and not SANDBOX_ID_RE.fullmatch(sandbox_id):
            problems.append(
                f"{ENV_SANDBOX_ID}={sandbox_id!r} is not a sandbox id "
                "(letters, digits, '.', '_', '-'; at most 64)"
            )
        gateway_url = required(ENV_GATEWAY_URL, "the gateway URL, e.g. http://10.201.3.1:7411")
        if gateway_url:
            try:
                gateway_url = parse_gateway_url(gateway_url)
            except ValueError as exc:
                problems.append(f"{ENV_GATEWAY_URL}: {exc}")
        token = required(ENV_TOKEN, "the agent's bearer token for the gateway")
        if token and any(c.isspace() or not c.isprintable() for c in token):
            problems.append(f"{ENV_TOKEN} contains whitespace or control characters")
        listen_text = env.get(ENV_LISTEN, "").strip() or DEFAULT_LISTEN
        host, port = "", 0
        try:
            host, port = parse_listen(listen_text)
        except ValueError as exc:
            problems.append(f"{ENV_LISTEN}={listen_text!r}: {exc}")
        interval_text = env.get(ENV_REPORT_INTERVAL, "").strip() or DEFAULT_REPORT_INTERVAL
        interval = 0.0
        try:
            interval = parse_interval(interval_text)
        except ValueError as exc:
            problems.append(f"{ENV_REPORT_INTERVAL}={interval_text!r}: {exc}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(
            sandbox_id=sandbox_id,
            gateway_url=gateway_url,
            token=token,
            listen_host=host,
            listen_port=port,
            report_interval=interval,
        )


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[V6]:PORT`` for IPv6) into an IP literal and a port.

    Args:
        text: e.g. ``0.0.0.0:7412``, ``127.0.0.1:0`` or ``[::]:7412``.

    Returns:
        ``(host, port)``; the port may be 0 (any free port).

    Raises:
        ValueError: the text is not an IP literal and a port in 0-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:7412 or [::]:7412")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (write IPv6 as [::1]:7412)") from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{port_text!r} is not a port number (0-65535)")
    return host, int(port_text)


def parse_gateway_url(text: str) -> str:
    """Check the gateway base URL and return it without a trailing slash.

    Raises:
        ValueError: not an absolute http(s) URL with a host, or it carries user:password,
            a query or a fragment (the agent authenticates with its token only).
    """
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain user:password@ (the agent sends its bearer token)")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} must not have a query or fragment")
    return text.rstrip("/")


def parse_interval(text: str) -> float:
    """Parse the report interval in seconds (a finite float ≥ 0; 0 disables periodic reports).

    Raises:
        ValueError: not a number, negative, or not finite.
    """
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number of seconds >= 0")
    return value


# --------------------------------------------------------------------------- /proc readers


class ListeningSocket(NamedTuple):
    """One socket that listens in the agent's network namespace."""

    proto: Literal["tcp", "udp"]
    address: str
    port: int

    def as_json(self) -> JSONObject:
        """The socket as it appears in the health document."""
        return {"proto": self.proto, "address": self.address, "port": self.port}


def decode_proc_net_address(
    field: str, byteorder: Literal["little", "big"] = sys.byteorder
) -> tuple[str, int]:
    """Decode a /proc/net/{tcp,udp}[6] address column such as ``0100007F:1F90``.

    The kernel prints the address as 32-bit words in host byte order (``%08X`` each: one word
    for IPv4, four for IPv6) and the port already converted to host order (``%04X``).

    Args:
        field: the ``local_address`` column.
        byteorder: the byte order of the kernel that wrote it (this machine's by default).

    Returns:
        ``(address, port)``, the address in its usual text form (``127.0.0.1``, ``::``).

    Raises:
        ValueError: the column is malformed.
    """
    host_hex, sep, port_hex = field.partition(":")
    if not sep or len(port_hex) != 4 or len(host_hex) not in (8, 32):
        raise ValueError(f"not a /proc/net address: {field!r}")
    words = [int(host_hex[i : i + 8], 16).to_bytes(4, byteorder)
             for i in range(0, len(host_hex), 8)]
    family = socket.AF_INET if len(words) == 1 else socket.AF_INET6
    return socket.inet_ntop(family, b"".join(words)), int(port_hex, 16)


def parse_proc_net_line(
    line: str,
    proto: Literal["tcp", "udp"],
    byteorder: Literal["little", "big"] = sys.byteorder,
) -> ListeningSocket | None:
    """Parse one line of /proc/net/{tcp,tcp6,udp,udp6}.

    Args:
        line: e.g. ``"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 ..."``.
        proto: ``tcp`` for tcp/tcp6 files, ``udp`` for udp/udp6 files.
        byteorder: the byte order of the kernel that wrote the line.

    Returns:
        The socket if it listens (TCP state LISTEN, or an unconnected UDP socket with a
        port), otherwise None: the header line, connections, malformed lines.
    """
    fields = line.split()
    if len(fields) < 4 or not fields[0].endswith(":"):
        return None
    try:
        state = int(fields[3], 16)
        address, port = decode_proc_net_address(fields[1], byteorder)
    except ValueError:
        return None
    wanted = TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED
    if state != wanted or port == 0:
        return None
    return ListeningSocket(proto=proto, address=address, port=port)


def listening_sockets(proc_net_dir: str | os.PathLike[str] = "/proc/net",
                      byteorder: Literal["little", "big"] = sys.byteorder,
                      ) -> list[ListeningSocket]:
    """The TCP and UDP sockets that listen in this process's network namespace.

    Reads ``tcp``, ``tcp6``, ``udp`` and ``udp6`` under ``proc_net_dir`` (/proc/net shows the
    reader's own namespace, in the host's byte order); a file that is missing (e.g. IPv6
    disabled) is skipped.

    Returns:
        Deduplicated sockets, sorted by protocol, port, then address.
    """
    found: set[ListeningSocket] = set()
    for name, proto in PROC_NET_FILES:
        try:
            text = (Path(proc_net_dir) / name).read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            sock = parse_proc_net_line(line, proto, byteorder=byteorder)
            if sock is not None:
                found.add(sock)
    return sorted(found, key=lambda s: (s.proto, s.port, s.address))


class ProcessInfo(NamedTuple):
    """One process in the agent's network namespace."""

    pid: int
    name: str
    cmdline: str

    def as_json(self) -> JSONObject:
        """The process as it appears in the health document."""
        return {"pid": self.pid, "name": self.name, "cmdline": self.cmdline}


def _netns_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def netns_processes(proc_dir: str | os.PathLike[str] = "/proc") -> list[ProcessInfo]:
    """Every process in the same network namespace as this one.

    A process belongs when its ``/proc/PID/ns/net`` is the same namespace as
    ``/proc/self/ns/net`` (same ``st_dev`` and ``st_ino``). Processes that exit while being
    read, or whose namespace cannot be read (another user's, without privileges), are skipped.

    Args:
        proc_dir: where procfs is mounted.

    Returns:
        Processes sorted by pid; ``cmdline`` has its NUL separators as spaces (empty for
        kernel threads and zombies) and is cut at :data:`MAX_CMDLINE` characters.

    Raises:
        OSError: this process's own namespace cannot be read (no procfs).
    """
    proc = Path(proc_dir)
    own = _netns_key(proc / "self" / "ns" / "net")
    found: list[ProcessInfo] = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        pid_dir = proc / entry
        try:
            if _netns_key(pid_dir / "ns" / "net") != own:
                continue
            name = (pid_dir / "comm").read_text(encoding="utf-8", errors="replace").rstrip("\n")
            raw = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", errors="replace")
        found.append(ProcessInfo(pid=int(entry), name=name, cmdline=cmdline[:MAX_CMDLINE]))
    found.sort(key=lambda p: p.pid)
    return found


def is_loopback_client(host: str) -> bool:
    """Whether a client address (as ``client_address[0]`` gives it) is a loopback address.

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``, seen on dual-stack sockets) counts as
    its IPv4 address; a zone (``fe80::1%eth0``) is ignored; anything unparsable is not loopback.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def json_type_name(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages (``an array``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> JSONObject:
    """Parse a request body that must be one JSON object (RFC 8259, UTF-8).

    Raises:
        BadBody: ``bad_json`` (not UTF-8, a syntax error and where, NaN/Infinity) or
            ``not_an_object`` (which JSON type the body is instead).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody("bad_json", f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadBody("bad_json", f"the body is not valid JSON: {exc.msg} "
                      f"(line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:  # NaN, Infinity
        raise BadBody("bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadBody("not_an_object",
                      f"the body must be a JSON object {{...}}, got {json_type_name(value)}")
    return value


# --------------------------------------------------------------------------- gateway client


class GatewayAnswer(NamedTuple):
    """What the gateway answered to a POST (any status, including 4xx and 5xx)."""

    status: int
    body: bytes
    content_type: str
    location: str = ""


class GatewayUnreachable(Exception):
    """No HTTP answer from the gateway: refused, timed out, reset, not HTTP."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the bearer token elsewhere, or drop the body."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


# No proxies (an http_proxy variable in the guest must not see the token), no redirects.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def _read_capped(stream: IO[bytes]) -> bytes:
    return stream.read(MAX_GATEWAY_BODY + 1)


def _describe_os_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def post_json(url: str, body: bytes, token: str, timeout: float) -> GatewayAnswer:
    """POST a JSON body to the gateway with the agent's bearer token.

    Args:
        url: the gateway endpoint.
        body: the JSON bytes, sent unchanged.
        token: the agent token, sent as ``Authorization: Bearer <token>``.
        timeout: seconds for connecting and for each read.

    Returns:
        The gateway's status, body (at most :data:`MAX_GATEWAY_BODY` + 1 bytes), content type
        and, for a redirect, its Location.

    Raises:
        GatewayUnreachable: no HTTP answer; the message names the URL and the OS error.
    """
    request = urllib.request.Request(  # noqa: S310 - http(s):// checked by parse_gateway_url
        url,
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "sandport-agent",
        },
    )
    try:
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return GatewayAnswer(
                    status=int(response.status),
                    body=_read_capped(response),
                    content_type=response.headers.get_content_type(),
                )
        except urllib.error.HTTPError as exc:
            with exc:
                return GatewayAnswer(
                    status=exc.code,
                    body=_read_capped(exc),
                    content_type=exc.headers.get_content_type() if exc.headers else "",
                    location=exc.headers.get("Location", "") if exc.headers else "",
                )
    except urllib.error.URLError as exc:
        reason = _describe_os_error(exc.reason, timeout) if isinstance(exc.reason, BaseException) \
            else str(exc.reason)
        raise GatewayUnreachable(f"cannot reach the gateway at {url}: {reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise GatewayUnreachable(
            f"cannot reach the gateway at {url}: {_describe_os_error(exc, timeout)}"
        ) from exc


def _is_json(body: bytes) -> bool:
    if not body or len(body) > MAX_GATEWAY_BODY:
        return False
    try:
        json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:
        return False
    return True


def relay_answer(answer: GatewayAnswer, url: str) -> tuple[int, JSONObject | bytes | None]:
    """Turn the gateway's answer into the agent's answer to its client.

    A JSON body comes back unchanged with the gateway's status (2xx, 4xx, 5xx alike); 204 comes
    back without a body. A redirect is a 502 (the agent does not follow redirects). A body that
    is not JSON is a 502 for a success status, and for an error status the status is kept and
    the body becomes a JSON error that quotes the start of it.

    Returns:
        ``(status, body)``: body bytes to send as they are, a JSON object, or None (no body).
    """
    status = answer.status
    if 300 <= status < 400:
        where = f" to {answer.location}" if answer.location else ""
        return 502, {
            "error": "gateway_redirect",
            "message": f"the gateway at {url} answered {status} (a redirect{where}); the agent "
            f"does not follow redirects: check {ENV_GATEWAY_URL}",
        }
    if status == HTTPStatus.NO_CONTENT:
        return status, None
    if _is_json(answer.body):
        return status, answer.body
    what = f"{answer.content_type or 'no content type'}, {len(answer.body)} bytes"
    if status < 300:
        return 502, {
            "error": "gateway_bad_response",
            "message": f"the gateway at {url} answered {status} with a body that is not JSON "
            f"({what})",
        }
    snippet = answer.body[:200].decode("utf-8", errors="replace")
    return status, {
        "error": "gateway_error",
        "message": f"the gateway at {url} answered {status} with a body that is not JSON "
        f"({what}): {snippet!r}",
    }


# --------------------------------------------------------------------------- the agent


class GatewayStatus:
    """How reporting to the gateway goes; shared by the report thread and request threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_report_at: float | None = None
        self._last_error = ""

    def succeeded(self, at: float) -> str:
        """Record a successful report at unix time ``at``; return the error it clears."""
        with self._lock:
            previous, self._last_error = self._last_error, ""
            self._last_report_at = at
            return previous

    def failed(self, error: str) -> None:
        """Record why the last report failed."""
        with self._lock:
            self._last_error = error

    def as_json(self, url: str) -> JSONObject:
        """The ``gateway`` part of the health document."""
        with self._lock:
            return {"url": url, "last_report_at": self._last_report_at,
                    "last_error": self._last_error}


class Agent:
    """The agent's state and behaviour, independent of the HTTP server.

    Args:
        config: the resolved configuration.
        proc_dir: where procfs is mounted (/proc; a test may point elsewhere).
    """

    def __init__(self, config: AgentConfig, proc_dir: str = "/proc") -> None:
        self.config = config
        self.proc_dir = proc_dir
        self.started = time.monotonic()
        self.gateway = GatewayStatus()
        #: Set on shutdown; ends the report loop.
        self.stop = threading.Event()

    def health(self) -> JSONObject:
        """The health document (``GET /health`` and the body of every report)."""
        return {
            "sandbox": self.config.sandbox_id,
            "ok": True,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "listening": [s.as_json() for s in listening_sockets(f"{self.proc_dir}/net")],
            "processes": [p.as_json() for p in netns_processes(self.proc_dir)],
            "gateway": self.gateway.as_json(self.config.gateway_url),
        }

    def report_once(self) -> bool:
        """POST the health document to the gateway once; record and log the outcome.

        Returns:
            Whether the gateway accepted it (2xx). Never raises.
        """
        url = self.config.report_url
        try:
            body = json.dumps(self.health()).encode()
            answer = post_json(url, body, self.config.token, REPORT_TIMEOUT)
            if 200 <= answer.status < 300:
                cleared = self.gateway.succeeded(time.time())
                if cleared:
                    log.info("report to %s succeeded again", url)
                return True
            error = f"the gateway at {url} answered {answer.status} to the report"
            if _is_json(answer.body):
                error += f": {answer.body[:300].decode('utf-8', errors='replace')}"
        except GatewayUnreachable as exc:
            error = str(exc)
        except Exception as exc:  # never let the report thread die
            error = f"report to {url} failed: {type(exc).__name__}: {exc}"
        self.gateway.failed(error)
        if self.config.report_interval > 0:
            log.warning("%s (next try in %gs)", error, self.config.report_interval)
        else:
            log.warning("%s", error)
        return False

    def report_loop(self) -> None:
        """Report now, then every ``report_interval`` seconds until :attr:`stop` is set."""
        while not self.stop.is_set():
            self.report_once()
            if self.config.report_interval <= 0 or self.stop.wait(self.config.report_interval):
                return

    def forward_credentials(self, raw: bytes) -> tuple[int, JSONObject | bytes | None]:
        """Forward a checked credentials body, unchanged, to the gateway.

        Returns:
            The agent's answer: see :func:`relay_answer`; 502 ``gateway_unreachable`` when the
            gateway gives no HTTP answer.
        """
        url = self.config.credentials_url
        try:
            answer = post_json(url, raw, self.config.token, CREDENTIALS_TIMEOUT)
        except GatewayUnreachable as exc:
            log.warning("credentials not forwarded: %s", exc)
            return 502, {"error": "gateway_unreachable", "message": str(exc)}
        status, body = relay_answer(answer, url)
        if answer.status >= 300:
            log.warning("credentials: the gateway at %s answered %d", url, answer.status)
        return status, body


# --------------------------------------------------------------------------- HTTP server


def _error(name: str, message: str) -> JSONObject:
    return {"error": name, "message": message}


#: path -> allowed methods. The handler methods are named ``_<method>_<path without />``.
ROUTES: dict[str, tuple[str, ...]] = {"/health": ("GET",), "/credentials": ("POST",)}


class AgentHandler(BaseHTTPRequestHandler):
    """One HTTP request to the agent. JSON in, JSON out; one log line per request."""

    server: AgentServer
    server_version = "sandport-agent"
    timeout = CLIENT_TIMEOUT
    _body_read = False

    def version_string(self) -> str:
        """The Server header: ``sandport-agent`` (no Python version)."""
        return self.server_version

    # -- dispatch

    def do_GET(self) -> None:
        """Dispatch a GET."""
        self._dispatch()

    def do_POST(self) -> None:
        """Dispatch a POST."""
        self._dispatch()

    def do_HEAD(self) -> None:
        """Dispatch a HEAD (always 404 or 405: no route allows it)."""
        self._dispatch()

    def do_PUT(self) -> None:
        """Dispatch a PUT (404 or 405)."""
        self._dispatch()

    def do_PATCH(self) -> None:
        """Dispatch a PATCH (404 or 405)."""
        self._dispatch()

    def do_DELETE(self) -> None:
        """Dispatch a DELETE (404 or 405)."""
        self._dispatch()

    def do_OPTIONS(self) -> None:
        """Dispatch an OPTIONS (404 or 405)."""
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        allowed = ROUTES.get(path)
        if allowed is None:
            self._refuse(404, _error("not_found", f"no such endpoint: {self._log_path()}; "
                                     f"the agent serves {', '.join(sorted(ROUTES))}"))
            return
        if self.command not in allowed:
            allow = ", ".join(allowed)
            self._refuse(
                405,
                _error("method_not_allowed", f"{path} allows {allow}, not {self.command}"),
                headers={"Allow": allow},
            )
            return
        try:
            if path == "/health":
                self._send_json(200, self.server.agent.health())
            else:
                self._credentials()
        except Exception as exc:
            log.error("%s %s failed: %s: %s", self.command, path, type(exc).__name__, exc)
            self._refuse(500, _error("internal_error", f"{type(exc).__name__}: {exc}"))

    # -- POST /credentials

    def _credentials(self) -> None:
        client = self.client_address[0]
        if not is_loopback_client(client):
            self._refuse(403, _error(
                "forbidden", f"POST /credentials is accepted from loopback clients only, "
                f"not from {client}"))
            return
        raw = self._read_body(MAX_CREDENTIALS_BODY)
        if raw is None:
            return
        try:
            parse_json_object(raw)
        except BadBody as exc:
            self._send_json(400, _error(exc.name, str(exc)))
            return
        status, body = self.server.agent.forward_credentials(raw)
        self._send_json(status, body)

    def _content_length(self) -> int | None:
        """The declared body length, or None when absent or invalid (checked by the caller)."""
        values = self.headers.get_all("Content-Length") or []
        if len(set(values)) != 1 or not CONTENT_LENGTH_RE.fullmatch(values[0].strip()):
            return None
        return int(values[0].strip())

    def _read_body(self, limit: int) -> bytes | None:
        """Read the request body of at most ``limit`` bytes; on a problem answer and return None."""
        if "Transfer-Encoding" in self.headers:
            self._refuse(411, _error(
                "length_required", "chunked bodies are not accepted; send a Content-Length"))
            return None
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._refuse(411, _error("length_required", "a Content-Length header is required"))
            return None
        length = self._content_length()
        if length is None:
            shown = ", ".join(repr(v) for v in values)[:100]
            self._refuse(400, _error(
                "bad_content_length", f"Content-Length must be one non-negative integer, "
                f"got {shown}"))
            return None
        if length > limit:
            self._refuse(413, _error(
                "body_too_large", f"the body is {length} bytes; the limit is {limit} bytes"))
            return None
        self._body_read = True
        raw = self.rfile.read(length)
        if len(raw) < length:
            self._send_json(400, _error(
                "incomplete_body", f"the body ended after {len(raw)} of {length} bytes"))
            return None
        return raw

    # -- responses

    def _refuse(self, status: int, body: JSONObject, headers: Mapping[str, str] | None = None
                ) -> None:
        """Answer with an error without having read the body: discard a small one first, so
        the client reads the answer rather than a connection reset."""
        if not self._body_read:
            self._body_read = True
            length = self._content_length()
            if length is not None and length <= DRAIN_LIMIT:
                with contextlib.suppress(OSError):
                    self.rfile.read(length)
        self._send_json(status, body, headers)

    def _send_json(
        self,
        status: int,
        body: JSONObject | bytes | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        data = body if isinstance(body, bytes) else b""
        if isinstance(body, dict):
            data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """Answer a request http.server rejects itself (malformed, too long, unknown method)
        with a JSON error instead of an HTML page."""
        self.close_connection = True
        try:
            name = HTTPStatus(code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            name = "error"
        self._send_json(code, _error(name, message or explain or name))

    # -- logging: one line per request, never headers or bodies

    def _log_path(self) -> str:
        path = urllib.parse.urlsplit(getattr(self, "path", "") or "").path or "-"
        return path.encode("ascii", "backslashreplace").decode("ascii")[:200]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log ``METHOD PATH STATUS`` for the request (no query string, headers or body)."""
        status = int(code) if isinstance(code, int) else code
        method = (getattr(self, "command", None) or "-").encode("ascii", "backslashreplace")
        log.info("%s %s %s (client %s)", method.decode("ascii")[:20], self._log_path(), status,
                 self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        """Route http.server's own messages (timeouts, bad requests) to the agent's log."""
        log.info("%s (client %s)", format % args, self.client_address[0])


class AgentServer(ThreadingHTTPServer):
    """The agent's HTTP server: one thread per connection, threads never block exit.

    Args:
        agent: the agent whose endpoints it serves.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        host, port = agent.config.listen_host, agent.config.listen_port
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), AgentHandler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the listen address."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a broken connection in one line instead of a traceback."""
        exc = sys.exc_info()[1]
        log.warning("connection from %s failed: %s: %s", client_address[0],
                    type(exc).__name__, exc)


# --------------------------------------------------------------------------- main


def serve(config: AgentConfig) -> int:
    """Run the agent until SIGTERM or SIGINT.

    Order: install signal handlers (a signal during startup still ends cleanly) → bind the
    server → start the report thread (the first report goes out once the server listens) →
    serve → on a signal: stop the report loop, stop serving (≤ :data:`POLL_INTERVAL`), close
    the listening socket. In-flight requests and a pending report run in daemon threads and do
    not delay the exit.

    Returns:
        0 after a signal, 1 when the listen address cannot be bound.
    """
    agent = Agent(config)
    server: AgentServer | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.stop.set()
        if server is not None:
            # shutdown() waits for serve_forever() to return, so not from this (main) thread.
            threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = AgentServer(agent)
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc)
        return 1
    try:
        bound = config.listen.rpartition(":")[0] + f":{server.server_port}"
        log.info("listening on %s; reporting to %s every %gs", bound, config.report_url,
                 config.report_interval)
        reporter = threading.Thread(target=agent.report_loop, name="report", daemon=True)
        reporter.start()
        if not agent.stop.is_set():
            server.serve_forever(poll_interval=POLL_INTERVAL)
        log.info("stopping")
    finally:
        agent.stop.set()
        server.server_close()
    return 0


USAGE = """usage: agent.py  (no arguments; configured by environment variables)

  SANDPORT_SANDBOX_ID              the sandbox id (required)
  SANDPORT_GATEWAY_URL             the gateway's agent endpoint base URL (required)
  SANDPORT_AGENT_TOKEN             bearer token for the gateway (required)
  SANDPORT_AGENT_LISTEN            HOST:PORT to listen on (default 0.0.0.0:7412)
  SANDPORT_AGENT_REPORT_INTERVAL   seconds between reports, 0 = start report only (default 10)
"""


def _setup_logging(sandbox_id: str) -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s sandport-agent[{sandbox_id}] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the agent: resolve the configuration, then serve until a signal.

    Args:
        argv: command-line arguments (without the program name); only ``-h``/``--help``.
        environ: the environment (``os.environ`` by default).

    Returns:
        The exit code: 0 after SIGTERM/SIGINT, 1 when the listen address cannot be bound,
        2 for a usage or configuration error (one line on stderr).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    if args:
        sys.stderr.write(f"sandport-agent: takes no arguments (got {' '.join(args)!r}); "
                         "it is configured by SANDPORT_* environment variables, see --help\n")
        return 2
    try:
        config = AgentConfig.from_env(os.environ if environ is None else environ)
    except ConfigError as exc:
        sys.stderr.write(f"sandport-agent: invalid configuration: {exc}\n")
        return 2
    _setup_logging(config.sandbox_id)
    return serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
