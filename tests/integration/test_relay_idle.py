"""An idle relayed connection holds its two sockets and nothing else: no pipe, no buffer.

Real loopback sockets and a real :class:`TcpForward` on each loop kind. Only what a user
of the relay can see is used: this process's descriptors (``/proc/self/fd``), Python's
allocations (tracemalloc) and the forward's public counters; so the same test measures the
relay before the pool (six descriptors and, on the copy path, two 256 KiB buffers per
connection).
"""

from __future__ import annotations

import asyncio
import random
import socket
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from conftest import eventually, fd_count
from sandport.forward.tcp import TcpForward, TcpForwardSpec

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
KiB = 1024
#: Bytes each idle-to-be connection moves each way first: past the copy prelude, so the
#: splice path takes pipes (and must give them back).
BULK = 512 * KiB
#: Pipes the pool may keep open for reuse while connections are idle (at most 2 were out
#: at once here): their descriptors are not any connection's.
SPARE_PIPES = 2


def spec_for(port: int, **kw: Any) -> TcpForwardSpec:
    return TcpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=port, **kw)


async def _pair(loop: asyncio.AbstractEventLoop, srv: socket.socket,
                port: int) -> tuple[socket.socket, socket.socket]:
    """A client connected through the forward on ``port``, and the target's socket."""
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, (LOOPBACK, port))
    target, _ = await loop.sock_accept(srv)
    target.setblocking(False)
    return client, target


async def _read_n(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        assert chunk, "EOF before all bytes"
        got += chunk
    return bytes(got)


async def _exchange(client: socket.socket, target: socket.socket, data: bytes) -> None:
    """``data`` up and reversed down at once; both arrive intact."""
    loop = asyncio.get_running_loop()
    _, _, up, down = await asyncio.gather(
        loop.sock_sendall(client, data), loop.sock_sendall(target, data[::-1]),
        _read_n(target, len(data)), _read_n(client, len(data)))
    assert (up, down) == (data, data[::-1])


def test_idle_spliced_connections_hold_two_descriptors(run: Callable[..., Any]) -> None:
    """30 connections each move 512 KiB both ways (splice path), then go idle: the relay
    holds two descriptors per connection (its sockets), no pipes."""
    n = 30

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as srv:
            srv.bind((LOOPBACK, 0))
            srv.listen(n + 1)
            srv.setblocking(False)
            async with TcpForward(spec_for(srv.getsockname()[1])) as fwd:
                assert fwd.data_path == "splice"
                warm = await _pair(loop, srv, fwd.bound_port)  # the loop's own descriptors
                await _exchange(*warm, b"warm")
                base = fd_count()
                pairs = []
                for i in range(n):
                    pair = await _pair(loop, srv, fwd.bound_port)
                    await _exchange(*pair, random.Random(i).randbytes(BULK))
                    pairs.append(pair)
                await eventually(lambda: fwd.stats.buffered == 0)
                # Per connection: this test's client and target sockets, the relay's two.
                grown = fd_count() - base
                assert grown <= 4 * n + 2 * SPARE_PIPES, \
                    f"{grown} descriptors for {n} idle connections ({grown / n:.1f} each)"
                assert fwd.stats.bytes_up == fwd.stats.bytes_down == n * BULK + 4
                for sock in (s for pair in [warm, *pairs] for s in pair):
                    sock.close()
                await eventually(lambda: fwd.stats.active == 0)

    run(main, timeout=60)


def test_idle_copy_connections_hold_no_buffer(run: Callable[..., Any]) -> None:
    """On the copy path, 20 connections that moved data and went idle hold no buffer in
    the relay (the read buffer is shared; only an unsent remainder would be kept)."""
    n = 20

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as srv:
            srv.bind((LOOPBACK, 0))
            srv.listen(n + 1)
            srv.setblocking(False)
            async with TcpForward(spec_for(srv.getsockname()[1], data_path="copy")) as fwd:
                warm = await _pair(loop, srv, fwd.bound_port)  # the shared buffer is made
                await _exchange(*warm, b"warm")
                pairs = []
                tracemalloc.start()
                try:
                    before = tracemalloc.take_snapshot()
                    for i in range(n):
                        pair = await _pair(loop, srv, fwd.bound_port)
                        await _exchange(*pair, b"%d" % i * 1000)
                        pairs.append(pair)
                    after = tracemalloc.take_snapshot()
                finally:
                    tracemalloc.stop()
                grown = sum(stat.size_diff for stat in after.compare_to(before, "filename")
                            if "/sandport/" in str(stat.traceback))
                assert grown < 4 * KiB * n, \
                    f"the relay's code holds {grown} B for {n} idle connections"
                assert fwd.stats.buffered == 0
                for sock in (s for pair in [warm, *pairs] for s in pair):
                    sock.close()
                await eventually(lambda: fwd.stats.active == 0)

    run(main, timeout=60)
