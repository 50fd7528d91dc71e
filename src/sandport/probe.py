"""Readiness probes: prove a guest service answers its protocol through a given hop.

"Ready" means an RFB handshake *through the path a user takes* reached ServerInit (or, with
no password, the security types), not that a VM booted or that a port accepts. The same
sans-I/O :class:`sandport.proto.rfb.RFBClient` runs over a TCP connection (host port
forward) or over a WebSocket (the browser bridge), so each hop is checked by the same code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from sandport.net.nsock import connect_in_netns
from sandport.proto.errors import RemoteProtocolError
from sandport.proto.rfb import (
    AuthFailed,
    RFBClient,
    SecurityTypes,
    ServerInitReceived,
    ServerVersion,
    Stage,
)

log = logging.getLogger(__name__)

READ_CHUNK = 65536


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """The outcome of one probe.

    Attributes:
        ok: the handshake reached the requested stage.
        hop: what was probed, e.g. ``tcp 127.0.0.1:15901``.
        stage: how far it got: connect, version, security, auth, server-init.
        detail: what the server said, or why it failed, in words.
        elapsed: seconds the probe took.
        desktop: the desktop name from ServerInit, if reached.
        size: (width, height) from ServerInit, if reached.
    """

    ok: bool
    hop: str
    stage: str
    detail: str
    elapsed: float
    desktop: str = ""
    size: tuple[int, int] = (0, 0)


Recv = Callable[[], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]


async def run_rfb_handshake(
    recv: Recv, send: Send, *, hop: str, password: str | None, stop_at: Stage
) -> ProbeResult:
    """Drive an RFB client handshake over any byte transport.

    Args:
        recv: returns the next bytes from the server, b"" at end of stream.
        send: sends bytes to the server.
        hop: label for the result.
        password: the VNC password, or None to stop at the security types.
        stop_at: how far to go.
    """
    t0 = time.perf_counter()
    client = RFBClient(password=password, stop_at=stop_at)
    stage, detail, desktop, size = "version", "no RFB banner yet", "", (0, 0)
    try:
        while not client.done:
            data = await recv()
            if not data:
                client.receive_eof()
                break
            for event in client.receive_data(data):
                if isinstance(event, ServerVersion):
                    stage, detail = "security", f"RFB {event.version[0]}.{event.version[1]}"
                elif isinstance(event, SecurityTypes):
                    stage = "auth"
                    detail += f", security types {list(event.types)}"
                elif isinstance(event, AuthFailed):
                    return _failed(hop, f"authentication failed: {event.reason}", t0, "auth")
                elif isinstance(event, ServerInitReceived):
                    stage = "server-init"
                    desktop = event.init.name
                    size = (event.init.width, event.init.height)
                    detail += f", desktop {desktop!r} {size[0]}x{size[1]}"
            out = client.data_to_send()
            if out:
                await send(out)
    except RemoteProtocolError as exc:
        return _failed(hop, f"{type(exc).__name__}: {exc}", t0, stage)
    return ProbeResult(ok=True, hop=hop, stage=stage, detail=detail,
                       elapsed=time.perf_counter() - t0, desktop=desktop, size=size)


def _failed(hop: str, detail: str, t0: float, stage: str = "connect") -> ProbeResult:
    return ProbeResult(ok=False, hop=hop, stage=stage, detail=detail,
                       elapsed=time.perf_counter() - t0)


def _os_error_text(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the peer"
    return exc.strerror or type(exc).__name__


async def _open(host: str, port: int, netns: str = "") -> tuple[asyncio.StreamReader,
                                                                  asyncio.StreamWriter]:
    """A TCP connection to ``host:port``; ``netns``: made inside that network namespace."""
    if netns:
        sock = await connect_in_netns(asyncio.get_running_loop(), netns, host, port)
        return await asyncio.open_connection(sock=sock)
    return await asyncio.open_connection(host, port)


def _where(host: str, port: int, netns: str) -> str:
    return f"tcp {host}:{port}" + (f" in {netns}" if netns else "")


async def probe_rfb_tcp(
    host: str,
    port: int,
    *,
    password: str | None = None,
    stop_at: Stage = Stage.SERVER_INIT,
    timeout: float = 5.0,
    netns: str = "",
) -> ProbeResult:
    """RFB handshake over a TCP connection to ``host:port`` (``netns``: inside that
    network namespace)."""
    hop = _where(host, port, netns)
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(host, port, netns)
            try:

                async def send(data: bytes) -> None:
                    writer.write(data)
                    await writer.drain()

                async def recv() -> bytes:
                    return await reader.read(READ_CHUNK)

                return await run_rfb_handshake(recv, send, hop=hop, password=password,
                                               stop_at=stop_at)
            finally:
                writer.close()
    except TimeoutError:
        return _failed(hop, f"no answer in {timeout} s", t0)
    except OSError as exc:
        return _failed(hop, _os_error_text(exc), t0)


def ws_byte_stream(ws: ClientConnection) -> tuple[Recv, Send]:
    """A WebSocket's messages as a byte stream for :func:`run_rfb_handshake`: ``recv``
    gives b"" once the WebSocket is closed."""

    async def recv() -> bytes:
        try:
            message = await ws.recv()
        except WebSocketException:
            return b""
        return message if isinstance(message, bytes) else message.encode()

    async def send(data: bytes) -> None:
        await ws.send(data)

    return recv, send


async def probe_rfb_ws(
    url: str,
    *,
    password: str | None = None,
    stop_at: Stage = Stage.SERVER_INIT,
    timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> ProbeResult:
    """RFB handshake over a WebSocket (``binary`` subprotocol) to ``url`` (ws or wss)."""
    hop = f"websocket {url.split('?', 1)[0]}"
    t0 = time.perf_counter()
    try:
        extra: dict[str, Any] = {"ssl": ssl_context} if ssl_context is not None else {}
        async with asyncio.timeout(timeout), ws_connect(
            url, subprotocols=["binary"], compression=None, open_timeout=timeout,  # type: ignore[list-item]
            **extra,
        ) as ws:
            recv, send = ws_byte_stream(ws)
            return await run_rfb_handshake(recv, send, hop=hop, password=password,
                                           stop_at=stop_at)
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace")[:300] if exc.response.body else ""
        return _failed(hop, f"upgrade refused with HTTP {exc.response.status_code}: {body}", t0)
    except TimeoutError:
        return _failed(hop, f"no answer in {timeout} s", t0)
    except (OSError, WebSocketException) as exc:
        return _failed(hop, _os_error_text(exc) if isinstance(exc, OSError) else str(exc), t0)


async def wait_until(
    probe: Callable[[], Awaitable[ProbeResult]],
    *,
    timeout: float,
    give_up: Callable[[], str | None] = lambda: None,
) -> tuple[ProbeResult, int]:
    """Repeat ``probe`` until it succeeds, ``timeout`` passes or ``give_up`` says why not.

    The delay between attempts grows from 50 ms to 500 ms. Authentication failures end
    the wait at once: retrying a wrong password does not make it right.

    Returns:
        The last result and the number of attempts.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, attempts = 0.05, 0
    while True:
        attempts += 1
        result = await probe()
        if result.ok or (result.stage == "auth" and "authentication failed" in result.detail):
            return result, attempts
        reason = give_up()
        if reason is not None:
            return ProbeResult(ok=False, hop=result.hop, stage=result.stage,
                               detail=f"{reason} (last probe: {result.detail})",
                               elapsed=result.elapsed), attempts
        if loop.time() + delay > deadline:
            return result, attempts
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


async def _http_get(host: str, port: int, path: str, timeout: float,
                    netns: str = "") -> tuple[str, bytes]:
    """``(status line, body)`` of an HTTP/1.0 GET; raises OSError or TimeoutError."""
    async with asyncio.timeout(timeout):
        reader, writer = await _open(host, port, netns)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            raw = b""
            while len(raw) < 1 << 20:  # HTTP/1.0: the answer ends when the server closes
                chunk = await reader.read(65536)
                if not chunk:
                    break
                raw += chunk
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(errors="replace"), body


async def probe_tcp(host: str, port: int, *, timeout: float = 3.0,
                    netns: str = "") -> ProbeResult:
    """A TCP service accepts a connection through this hop (for services with no
    protocol sandport speaks; a forward's own listener accepting is not proof, so the
    connection must stay open: a proxy that cannot reach its target closes it at once).
    ``netns``: connect inside that network namespace (a container's)."""
    hop = _where(host, port, netns)
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(host, port, netns)
            try:
                try:  # a relay whose target refuses closes (EOF/RST) at once
                    async with asyncio.timeout(min(0.3, timeout / 4)):
                        data = await reader.read(1)
                    if not data:
                        return _failed(hop, "the connection was closed at once: nothing "
                                       "serves behind this port", t0, "open")
                except TimeoutError:
                    pass  # open and silent: a server waiting for the client to speak
                except ConnectionResetError:
                    return _failed(hop, "the connection was reset at once: nothing serves "
                                   "behind this port", t0, "open")
            finally:
                writer.close()
    except TimeoutError:
        return _failed(hop, f"no answer in {timeout:g} s", t0)
    except OSError as exc:
        return _failed(hop, _os_error_text(exc), t0)
    return ProbeResult(ok=True, hop=hop, stage="open", detail="accepts connections",
                       elapsed=time.perf_counter() - t0)


async def probe_http(host: str, port: int, *, path: str = "/",
                     timeout: float = 3.0, netns: str = "") -> ProbeResult:
    """An HTTP service answers ``GET path`` through this hop (any status below 500);
    ``netns``: asked inside that network namespace."""
    hop = f"http {host}:{port}{path}" + (f" in {netns}" if netns else "")
    t0 = time.perf_counter()
    try:
        status, _ = await _http_get(host, port, path, timeout, netns)
    except TimeoutError:
        return ProbeResult(ok=False, hop=hop, stage="connect", elapsed=time.perf_counter() - t0,
                           detail=f"no answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(ok=False, hop=hop, stage="connect", elapsed=time.perf_counter() - t0,
                           detail=exc.strerror or type(exc).__name__)
    parts = status.split()
    ok = len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isascii() \
        and parts[1].isdigit() and int(parts[1]) < 500  # a guest may answer "HTTP/1.1 ²"
    return ProbeResult(ok=ok, hop=hop, stage="http", elapsed=time.perf_counter() - t0,
                       detail=status or "no HTTP status line")


async def probe_agent_health(host: str, port: int, *, sandbox_id: str,
                             timeout: float = 3.0) -> ProbeResult:
    """GET the guest agent's ``/health``: ready when it answers 200 for ``sandbox_id``."""
    hop = f"guest agent http://{host}:{port}/health"
    t0 = time.perf_counter()
    stage, detail = "connect", ""
    try:
        status, body = await _http_get(host, port, "/health", timeout)
        stage = "http"
        if " 200 " not in f"{status} ":
            detail = f"answered {status or 'nothing'}"
        else:
            stage = "health"
            doc = json.loads(body)
            ok = doc.get("sandbox") == sandbox_id
            detail = "healthy" if ok else f"an agent of sandbox {doc.get('sandbox')!r}"
            return ProbeResult(ok=ok, hop=hop, stage=stage, detail=detail,
                               elapsed=time.perf_counter() - t0)
    except TimeoutError:
        detail = f"no answer within {timeout:g} s"
    except OSError as exc:
        detail = exc.strerror or type(exc).__name__
    except ValueError:
        detail = "not a JSON health document"
    return ProbeResult(ok=False, hop=hop, stage=stage, detail=detail,
                       elapsed=time.perf_counter() - t0)
