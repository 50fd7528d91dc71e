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
import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from sandport.probe import run_rfb_handshake, ws_byte_stream
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
C = TypeVar("C")


def _os_reason(exc: OSError) -> str:
    """An OSError as a short reason: its errno name (ECONNRESET ...) or its text."""
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return str(exc)[:80] or type(exc).__name__


@dataclass
class Load(Generic[C]):
    """Connections of one kind: how many were asked for, opened and verified, why the
    rest failed (reason -> count), and the verified ones, still open (``held``)."""

    asked: int
    opened: int = 0
    verified: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    held: list[C] = field(default_factory=list, repr=False)
    open_seconds: float = 0.0
    verify_seconds: float = 0.0

    async def fill(self, open_one: Callable[[], Awaitable[C | str]],
                   verify_one: Callable[[C], Awaitable[str | None]],
                   drop_one: Callable[[C], None], *, batch: int, progress: Progress,
                   every: int, words: str) -> None:
        """Open ``asked`` connections, ``batch`` at a time (each batch concurrently); once
        all are open, verify each (``VERIFY_CHUNK`` at a time) and drop the failed ones.
        ``words``: what the progress line calls them, e.g. "connects, {} open"."""
        loop = asyncio.get_running_loop()
        opened: list[C] = []
        t0 = loop.time()
        next_report = every
        for start in range(0, self.asked, batch):
            results = await asyncio.gather(
                *(open_one() for _ in range(min(batch, self.asked - start))))
            for res in results:
                if isinstance(res, str):
                    self.errors[res] += 1
                else:
                    opened.append(res)
            done = start + len(results)
            if done >= next_report or done == self.asked:
                progress(f"  {done}/{self.asked} {words.format(len(opened))}"
                         + (f", errors {dict(self.errors)}" if self.errors else ""))
                next_report += every
        self.opened = len(opened)
        self.open_seconds = loop.time() - t0
        t1 = loop.time()
        for start in range(0, len(opened), VERIFY_CHUNK):
            chunk = opened[start:start + VERIFY_CHUNK]
            reasons = await asyncio.gather(*(verify_one(c) for c in chunk))
            for conn, reason in zip(chunk, reasons, strict=True):
                if reason is None:
                    self.held.append(conn)
                else:
                    self.errors[reason] += 1
                    drop_one(conn)
        self.verified = len(self.held)
        self.verify_seconds = loop.time() - t1


class TcpLoad(Load[socket.socket]):
    """Idle TCP connections."""

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
    await load.fill(lambda: _connect(addr, timeout), lambda s: _echo(s, timeout),
                    socket.socket.close, batch=batch, progress=progress, every=every,
                    words="connects, {} open")
    return load


class WsLoad(Load[ClientConnection]):
    """RFB sessions over WebSockets (opened: ServerInit read)."""

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

    recv, send = ws_byte_stream(ws)
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
    await load.fill(lambda: rfb_session(url, password, timeout),
                    lambda ws: _fb_update(ws, timeout), lambda ws: ws.transport.abort(),
                    batch=batch, progress=progress, every=every,
                    words="sessions, {} at ServerInit")
    return load
