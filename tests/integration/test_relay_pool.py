"""The relay's pipes come from a bounded pool, on demand; idle connections hold nothing.

Real loopback sockets, a real :class:`TcpForward` on each loop kind. What is checked:
descriptors per idle connection (``/proc/self/fd``), the pool's counters (``PIPES.stats``,
``TcpForwardStats.pipes`` and ``fallbacks``), memory an idle copy-path connection holds
(tracemalloc), and that bytes keep their order and integrity while directions move
between splice and copy as the pool runs dry and fills again, half-close included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import eventually
from relayhelpers import accept_n, connect, forward_to_listener, read_to_eof, send_all
from sandport.net.splice import PIPES

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def small_pool() -> Iterator[int]:
    """The process's pool cut to 2 pipes for the test (and put back after)."""
    limit = PIPES.limit
    PIPES.resize(2)
    yield 2
    PIPES.resize(limit)


def test_more_bulk_connections_than_pipes_switch_paths_intact(
        run: Callable[..., Any], small_pool: int) -> None:
    """Four connections move 8 MiB each way at once through a pool of two pipes, with
    stalls that make directions hold their pipe: the others copy (counted), and take a
    pipe when one comes back. Every byte arrives in order; half-close passes through;
    every pipe goes back to the pool."""
    n, size = 4, 8 * MiB

    async def main() -> None:
        async with forward_to_listener(n) as (fwd, srv):
            clients = [await connect(fwd.bound_port) for _ in range(n)]
            targets = await accept_n(srv, n)
            ups = [random.Random(i).randbytes(size) for i in range(n)]
            downs = [random.Random(100 + i).randbytes(size) for i in range(n)]
            # Everyone sends first; nobody reads yet: the relay's pumps stall holding
            # what they read, so the pool runs dry.
            sends = [asyncio.ensure_future(send_all(c, d, fin=True))
                     for c, d in zip(clients, ups, strict=True)]
            sends += [asyncio.ensure_future(send_all(t, d, fin=True))
                      for t, d in zip(targets, downs, strict=True)]
            await eventually(lambda: fwd.stats.pipes == small_pool, within=10)
            await eventually(lambda: fwd.stats.fallbacks > 0, within=10)
            assert PIPES.stats.in_use <= small_pool
            got_up = await asyncio.gather(*(read_to_eof(t) for t in targets))
            got_down = await asyncio.gather(*(read_to_eof(c) for c in clients))
            await asyncio.gather(*sends)
            for i in range(n):
                assert hashlib.sha256(got_up[i]).digest() == \
                    hashlib.sha256(ups[i]).digest(), f"connection {i}: up differs"
                assert hashlib.sha256(got_down[i]).digest() == \
                    hashlib.sha256(downs[i]).digest(), f"connection {i}: down differs"
            for s in clients + targets:
                s.close()
            await eventually(lambda: fwd.stats.active == 0)
            st = fwd.stats
            assert (st.bytes_up, st.bytes_down) == (n * size, n * size)
            assert st.pipes == 0 and PIPES.stats.in_use == 0  # all given back
            assert PIPES.stats.free <= small_pool
            assert st.failures["reset"] == 0

    run(main, timeout=90)


def test_reset_with_bytes_in_a_pipe_never_reuses_that_pipe(
        run: Callable[..., Any], small_pool: int) -> None:
    """A connection reset while its pipe holds bytes closes that pipe; the next connection
    gets a clean one (none of the old bytes)."""

    async def main() -> None:
        async with forward_to_listener(4) as (fwd, srv):
            c = await connect(fwd.bound_port)
            (t,) = await accept_n(srv, 1)
            # The target never reads: the up pump stalls with bytes in its pipe.
            sender = asyncio.ensure_future(
                send_all(c, b"\xee" * (32 * MiB), fin=False))
            await eventually(lambda: fwd.stats.pipes == 1 and fwd.stats.buffered > 0,
                             within=10)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            t.close()  # RST: the relay resets the pair
            await eventually(lambda: fwd.stats.active == 0, within=5)
            c.close()
            assert PIPES.stats.in_use == 0
            # A fresh connection, bulk again: only its own bytes arrive.
            c2 = await connect(fwd.bound_port)
            (t2,) = await accept_n(srv, 1)
            data = random.Random(5).randbytes(8 * MiB)
            _, got = await asyncio.gather(send_all(c2, data, fin=True), read_to_eof(t2))
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            c2.close()
            t2.close()
            await eventually(lambda: fwd.stats.active == 0)

    run(main, timeout=60)
