"""The soak's clients: many idle TCP connections, many RFB sessions over WebSockets.

Both open their connections in batches (each batch concurrently), keep them all open,
verify each one with a round trip once all are open, and close them all. Every await is
bounded by a timeout: a connection that hangs is counted as an error with its reason,
never waited for. Errors are counted by reason (``Counter``), in words a reader can act on.

Bench code, not product: it uses sandport's sans-I/O RFB client through
:func:`sandport.probe.run_rfb_handshake`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from sandport.probe import run_rfb_handshake
from sandport.proto.rfb.messages import Stage

#: The echo token's length: 8 random bytes per connection, so a mixed-up echo shows.
TOKEN_BYTES = 8
#: Round trips verified concurrently (each under its own timeout).
VERIFY_CHUNK = 1000
#: FramebufferUpdateRequest (RFC 6143 section 7.5.3): type 3, incremental 0, a 1x1 region.
FB_UPDATE_REQUEST = struct.pack("!BBHHHH", 3, 0, 0, 0, 1, 1)
#: FramebufferUpdate's message type (RFC 6143 section 7.6.1).
FB_UPDATE = 0

Progress = Callable[[str], None]


def _os_reason(exc: OSError) -> str:
    """An OSError as a short reason: its errno name (ECONNRESET ...) or its text."""
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return str(exc)[:80] or type(exc).__name__


@dataclass
class TcpLoad:
    """Idle TCP connections: what was opened, verified, and why the rest failed."""

    asked: int
    opened: int = 0
    verified: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    held: list[socket.socket] = field(default_factory=list, repr=False)
    open_seconds: float = 0.0
    verify_seconds: float = 0.0

    def close(self) -> None:
        """Close every connection still held."""
        for sock in self.held:
            sock.close()
        self.held.clear()


async def _connect(addr: tuple[str, int], timeout: float) -> socket.socket | str:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
    except TimeoutError:
        sock.close()
        return "connect: no answer (timeout)"
    except OSError as exc:
        sock.close()
        return f"connect: {_os_reason(exc)}"
    return sock


async def _echo(sock: socket.socket, timeout: float) -> str | None:
    """One echo round trip; None when it came back intact, else the reason."""
    loop = asyncio.get_running_loop()
    token = os.urandom(TOKEN_BYTES)
    got = b""
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, token)
            while len(got) < len(token):
                chunk = await loop.sock_recv(sock, len(token) - len(got))
                if not chunk:
                    return "echo: closed by the peer (EOF)"
                got += chunk
    except TimeoutError:
        return "echo: no answer (timeout; the connection hangs)"
    except OSError as exc:
        return f"echo: {_os_reason(exc)}"
    return None if got == token else "echo: bytes differ"


async def open_tcp(addr: tuple[str, int], count: int, *, batch: int, timeout: float,
                   progress: Progress, every: int = 1000) -> TcpLoad:
    """Open ``count`` connections to ``addr``, ``batch`` at a time; then verify each.

    The connections stay open (``load.held``) until :meth:`TcpLoad.close`.
    """
    load = TcpLoad(asked=count)
    loop = asyncio.get_running_loop()
    opened: list[socket.socket] = []
    t0 = loop.time()
    next_report = every
    for start in range(0, count, batch):
        results = await asyncio.gather(
            *(_connect(addr, timeout) for _ in range(min(batch, count - start))))
        for res in results:
            if isinstance(res, str):
                load.errors[res] += 1
            else:
                opened.append(res)
        done = start + len(results)
        if done >= next_report or done == count:
            progress(f"  {done}/{count} connects, {len(opened)} open"
                     + (f", errors {dict(load.errors)}" if load.errors else ""))
            next_report += every
    load.opened = len(opened)
    load.open_seconds = loop.time() - t0
    t1 = loop.time()
    for start in range(0, len(opened), VERIFY_CHUNK):
        chunk = opened[start:start + VERIFY_CHUNK]
        reasons = await asyncio.gather(*(_echo(s, timeout) for s in chunk))
        for sock, reason in zip(chunk, reasons, strict=True):
            if reason is None:
                load.held.append(sock)
            else:
                load.errors[reason] += 1
                sock.close()
    load.verified = len(load.held)
    load.verify_seconds = loop.time() - t1
    return load


@dataclass
class WsLoad:
    """RFB sessions over WebSockets: opened (ServerInit read), verified, errors by reason."""

    asked: int
    opened: int = 0
    verified: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    held: list[ClientConnection] = field(default_factory=list, repr=False)
    open_seconds: float = 0.0
    verify_seconds: float = 0.0

    async def close(self, timeout: float) -> int:
        """Close every session (close frame 1000, bounded); how many did not close cleanly."""
        async def one(ws: ClientConnection) -> bool:
            try:
                async with asyncio.timeout(timeout):
                    await ws.close()
            except (TimeoutError, OSError, WebSocketException):
                ws.transport.abort()
                return False
            return True

        results = await asyncio.gather(*(one(ws) for ws in self.held))
        self.held.clear()
        return sum(1 for ok in results if not ok)


async def rfb_session(url: str, password: str | None,
                      timeout: float) -> ClientConnection | str:
    """One WebSocket (``binary``) to ``url`` and an RFB handshake to ServerInit over it.

    Returns the open connection, or the reason it failed.
    """
    try:
        ws = await connect(url, subprotocols=["binary"],  # type: ignore[list-item]
                           compression=None, open_timeout=timeout, ping_interval=None,
                           close_timeout=timeout, max_size=2**20, proxy=None)
    except InvalidStatus as exc:
        body = (exc.response.body or b"").decode(errors="replace")[:120]
        return f"upgrade refused: HTTP {exc.response.status_code} {body}".rstrip()
    except TimeoutError:
        return "upgrade: no answer (timeout)"
    except OSError as exc:
        return f"upgrade: {_os_reason(exc)}"
    except WebSocketException as exc:
        return f"upgrade: {type(exc).__name__}: {exc}"[:120]

    async def send(data: bytes) -> None:
        await ws.send(data)

    async def recv() -> bytes:
        try:
            message = await ws.recv()
        except WebSocketException:
            return b""
        return message if isinstance(message, bytes) else message.encode()

    try:
        async with asyncio.timeout(timeout):
            res = await run_rfb_handshake(recv, send, hop=url, password=password,
                                          stop_at=Stage.SERVER_INIT)
    except TimeoutError:
        res = None
    except (OSError, WebSocketException) as exc:
        ws.transport.abort()
        return f"rfb: {type(exc).__name__}"
    if res is None or not res.ok:
        reason = ("rfb: no ServerInit (timeout)" if res is None
                  else f"rfb {res.stage}: {res.detail}"[:120])
        if ws.close_code is not None:
            reason += f" (closed {ws.close_code} {ws.close_reason})"
        ws.transport.abort()
        return reason
    return ws


async def _fb_update(ws: ClientConnection, timeout: float) -> str | None:
    """Ask for a 1x1 FramebufferUpdate and read its first message; None when it came."""
    try:
        async with asyncio.timeout(timeout):
            await ws.send(FB_UPDATE_REQUEST)
            message = await ws.recv()
    except TimeoutError:
        return "update: no answer (timeout; the session hangs)"
    except WebSocketException as exc:
        code = ws.close_code
        return f"update: closed {code} {ws.close_reason}" if code else \
            f"update: {type(exc).__name__}"
    except OSError as exc:
        return f"update: {_os_reason(exc)}"
    data = message if isinstance(message, bytes) else message.encode()
    if not data or data[0] != FB_UPDATE:
        return f"update: unexpected message type {data[:1]!r}"
    return None


async def open_rfb(url: str, password: str | None, count: int, *, batch: int, timeout: float,
                   progress: Progress, every: int = 100) -> WsLoad:
    """Open ``count`` RFB sessions, ``batch`` at a time; once all are up, verify each
    with a FramebufferUpdate round trip (through the gateway to the VNC server)."""
    load = WsLoad(asked=count)
    loop = asyncio.get_running_loop()
    opened: list[ClientConnection] = []
    t0 = loop.time()
    next_report = every
    for start in range(0, count, batch):
        results = await asyncio.gather(
            *(rfb_session(url, password, timeout) for _ in range(min(batch, count - start))))
        for res in results:
            if isinstance(res, str):
                load.errors[res] += 1
            else:
                opened.append(res)
        done = start + len(results)
        if done >= next_report or done == count:
            progress(f"  {done}/{count} sessions, {len(opened)} at ServerInit"
                     + (f", errors {dict(load.errors)}" if load.errors else ""))
            next_report += every
    load.opened = len(opened)
    load.open_seconds = loop.time() - t0
    t1 = loop.time()
    for start in range(0, len(opened), VERIFY_CHUNK):
        chunk = opened[start:start + VERIFY_CHUNK]
        reasons = await asyncio.gather(*(_fb_update(ws, timeout) for ws in chunk))
        for ws, reason in zip(chunk, reasons, strict=True):
            if reason is None:
                load.held.append(ws)
            else:
                load.errors[reason] += 1
                with contextlib.suppress(Exception):
                    ws.transport.abort()
    load.verified = len(load.held)
    load.verify_seconds = loop.time() - t1
    return load
