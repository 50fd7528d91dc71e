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
from relayhelpers import accept_n, connect, forward_to_listener, read_exactly, send_all
from sandport.forward.tcp import TcpForward

pytestmark = pytest.mark.integration

KiB = 1024
#: Bytes each idle-to-be connection moves each way first: past the copy prelude, so the
#: splice path takes pipes (and must give them back).
BULK = 512 * KiB
#: Pipes the pool may keep open for reuse while connections are idle (at most 2 were out
#: at once here): their descriptors are not any connection's.
SPARE_PIPES = 2


async def _pair(fwd: TcpForward, srv: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client connected through ``fwd``, and the target's socket."""
    client = await connect(fwd.bound_port)
    (target,) = await accept_n(srv, 1)
    return client, target


async def _exchange(client: socket.socket, target: socket.socket, data: bytes) -> None:
    """``data`` up and reversed down at once; both arrive intact."""
    _, _, up, down = await asyncio.gather(
        send_all(client, data, fin=False), send_all(target, data[::-1], fin=False),
        read_exactly(target, len(data)), read_exactly(client, len(data)))
    assert (up, down) == (data, data[::-1])


def test_idle_spliced_connections_hold_two_descriptors(run: Callable[..., Any]) -> None:
    """30 connections each move 512 KiB both ways (splice path), then go idle: the relay
    holds two descriptors per connection (its sockets), no pipes."""
    n = 30

    async def main() -> None:
        async with forward_to_listener(n + 1) as (fwd, srv):
            assert fwd.data_path == "splice"
            warm = await _pair(fwd, srv)  # the loop's own descriptors
            await _exchange(*warm, b"warm")
            base = fd_count()
            pairs = []
            for i in range(n):
                pair = await _pair(fwd, srv)
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
        async with forward_to_listener(n + 1, data_path="copy") as (fwd, srv):
            warm = await _pair(fwd, srv)  # the shared buffer is made
            await _exchange(*warm, b"warm")
            pairs = []
            tracemalloc.start()
            try:
                before = tracemalloc.take_snapshot()
                for i in range(n):
                    pair = await _pair(fwd, srv)
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
