"""Loopback plumbing for tests of the userspace TCP relay (sandport.forward.tcp).

A target listener the test accepts from itself (so it decides when a target reads), and
the few socket moves the relay tests share. A test module uses it with
``from relayhelpers import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from sandport.forward.tcp import TcpForward, TcpForwardSpec

LOOPBACK = "127.0.0.1"


@contextlib.asynccontextmanager
async def forward_to_listener(backlog: int,
                              **spec: Any) -> AsyncIterator[tuple[TcpForward, socket.socket]]:
    """A non-blocking loopback listener (the target) and a started forward to it."""
    with socket.socket() as srv:
        srv.bind((LOOPBACK, 0))
        srv.listen(backlog)
        srv.setblocking(False)
        fwd_spec = TcpForwardSpec(listen_port=0, target_host=LOOPBACK,
                                  target_port=srv.getsockname()[1], **spec)
        async with TcpForward(fwd_spec) as fwd:
            yield fwd, srv


async def connect(port: int) -> socket.socket:
    """A non-blocking client connected to the forward on ``port``."""
    client = socket.socket()
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, (LOOPBACK, port))
    return client


async def accept_n(srv: socket.socket, n: int) -> list[socket.socket]:
    """The next ``n`` connections the relay made to the target, non-blocking."""
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        conn, _ = await loop.sock_accept(srv)
        conn.setblocking(False)
        conns.append(conn)
    return conns


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock`` (EOF before them fails the test)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        assert chunk, "EOF before all bytes"
        got += chunk
    return bytes(got)


async def read_to_eof(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until the peer's FIN."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 256 * 1024):
        got += chunk
    return bytes(got)


async def send_all(sock: socket.socket, data: bytes, *, fin: bool) -> None:
    """Send ``data``; then FIN (``shutdown(SHUT_WR)``) when ``fin``."""
    await asyncio.get_running_loop().sock_sendall(sock, data)
    if fin:
        sock.shutdown(socket.SHUT_WR)
