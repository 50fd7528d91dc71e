"""Integration tests for the userspace UDP relay (sandport.forward.udp), on real loopback sockets.

Every test runs its own event loop, under uvloop and under the default asyncio loop, and every
wait is bounded. Targets and clients are asyncio datagram endpoints on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from conftest import eventually, fd_count
from sandport.forward.tcp import PortInUse as TcpPortInUse
from sandport.forward.udp import (
    MAX_DATAGRAM,
    PortInUse,
    UdpForward,
    UdpForwardSpec,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
PREFIX = b"echo:"
#: Datagrams a client keeps in flight in the three-client test.
WINDOW = 8

# -- helpers ---------------------------------------------------------------------------------


def spec_for(port: int, **kw: Any) -> UdpForwardSpec:
    return UdpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=port, **kw)


class Target(asyncio.DatagramProtocol):
    """UDP target: answers every datagram with ``reply(data)`` and records the senders."""

    def __init__(self, reply: Callable[[bytes], bytes] = lambda d: PREFIX + d) -> None:
        self.reply = reply
        self.senders: list[tuple[str, int]] = []
        self.sizes: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.senders.append(addr)
        self.sizes.append(len(data))
        self.transport.sendto(self.reply(data), addr)


class Client(asyncio.DatagramProtocol):
    """UDP client connected to the relay; queues every datagram it receives."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.errors: list[Exception] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    async def recv(self, within: float = 2.0) -> bytes:
        async with asyncio.timeout(within):
            return await self.inbox.get()

    async def ask(self, data: bytes, within: float = 2.0) -> bytes:
        self.send(data)
        return await self.recv(within)

    def close(self) -> None:
        self.transport.close()


@contextlib.asynccontextmanager
async def target_endpoint(
    reply: Callable[[bytes], bytes] = lambda d: PREFIX + d,
) -> Any:
    loop = asyncio.get_running_loop()
    transport, target = await loop.create_datagram_endpoint(
        lambda: Target(reply), local_addr=(LOOPBACK, 0)
    )
    try:
        yield target, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def client_of(port: int) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(Client, remote_addr=(LOOPBACK, port))
    return client


@contextlib.contextmanager
def dead_udp_port() -> Iterator[int]:
    """A loopback UDP port nobody is bound to: datagrams to it draw ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    yield port



# -- tests -----------------------------------------------------------------------------------


def test_three_clients_get_only_their_own_replies(run: Callable[..., Any]) -> None:
    n_clients, n_datagrams = 3, 50
    rng = random.Random(1)
    sent = {
        c: [b"client %d datagram %02d|" % (c, i) + rng.randbytes(rng.randrange(0, 1400))
            for i in range(n_datagrams)]
        for c in range(n_clients)
    }

    async def one(client: Client, c: int) -> list[bytes]:
        # At most WINDOW datagrams in flight per client: loopback UDP does not lose
        # datagrams, but a socket's receive queue (the target's is shared by all three
        # flows) overflows if 150 arrive in one burst.
        todo = list(sent[c])
        for _ in range(WINDOW):
            client.send(todo.pop(0))
        got = []
        for _ in range(n_datagrams):
            got.append(await client.recv())
            if todo:
                client.send(todo.pop(0))
        return got

    async def main() -> None:
        async with target_endpoint() as (target, port), UdpForward(spec_for(port)) as fwd:
            clients = [await client_of(fwd.bound_port) for _ in range(n_clients)]
            got = await asyncio.gather(*(one(cl, c) for c, cl in enumerate(clients)))
            await asyncio.sleep(0.2)  # anything misrouted or duplicated would show up now
            for c, cl in enumerate(clients):
                extra = []
                while not cl.inbox.empty():
                    extra.append(cl.inbox.get_nowait())
                assert not extra, f"client {c} got {len(extra)} extra datagram(s)"
                # Exactly its own replies, each one whole (no merging, no splitting).
                assert sorted(got[c]) == sorted(PREFIX + d for d in sent[c]), f"client {c}"
                assert not cl.errors
            st = fwd.stats
            assert (st.flows_active, st.flows_total) == (n_clients, n_clients)
            total = n_clients * n_datagrams
            assert (st.datagrams_up, st.datagrams_down) == (total, total)
            size = sum(len(d) for ds in sent.values() for d in ds)
            assert (st.bytes_up, st.bytes_down) == (size, size + total * len(PREFIX))
            assert (st.dropped_limit, st.dropped_buffer, st.target_unreachable) == (0, 0, 0)
            # One relay socket per client: the target saw exactly three senders.
            assert len(set(target.senders)) == n_clients
            for cl in clients:
                cl.close()

    run(main)


def test_burst_from_a_new_client_arrives_whole_and_in_order(run: Callable[..., Any]) -> None:
    """Datagrams sent before the flow's socket exists are held, then sent in order."""
    burst = [b"%02d" % i * (i + 1) for i in range(40)]

    async def main() -> None:
        async with target_endpoint() as (target, port), UdpForward(spec_for(port)) as fwd:
            client = await client_of(fwd.bound_port)
            for data in burst:  # all at once, no yield to the loop in between
                client.send(data)
            got = [await client.recv() for _ in burst]
            assert got == [PREFIX + d for d in burst]
            assert target.sizes == [len(d) for d in burst]
            st = fwd.stats
            assert (st.flows_total, st.datagrams_up, st.dropped_buffer) == (1, 40, 0)
            client.close()

    run(main)


def test_large_datagrams_round_trip(run: Callable[..., Any]) -> None:
    big = random.Random(2).randbytes(60000)
    biggest = random.Random(3).randbytes(MAX_DATAGRAM)

    async def main() -> None:
        async with target_endpoint() as (target, port), UdpForward(spec_for(port)) as fwd:
            client = await client_of(fwd.bound_port)
            assert await client.ask(big) == PREFIX + big
            assert target.sizes == [60000]
            # The largest IPv4 payload, both ways (the mirror reply keeps its size).
            target.reply = lambda d: d[::-1]
            assert await client.ask(biggest) == biggest[::-1]
            assert target.sizes == [60000, MAX_DATAGRAM]
            st = fwd.stats
            assert (st.datagrams_up, st.datagrams_down) == (2, 2)
            assert st.bytes_up == 60000 + MAX_DATAGRAM
            assert st.bytes_down == 60000 + len(PREFIX) + MAX_DATAGRAM
            client.close()

    run(main)


def test_idle_flow_expires_and_comes_back(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with target_endpoint() as (target, port), UdpForward(
            spec_for(port, idle_timeout=0.3)
        ) as fwd:
            client = await client_of(fwd.bound_port)
            assert await client.ask(b"one") == PREFIX + b"one"
            assert fwd.stats.flows_active == 1
            t0 = time.monotonic()
            await eventually(lambda: fwd.stats.flows_active == 0, within=2.0)
            assert 0.25 < time.monotonic() - t0 < 1.0
            assert fwd.stats.expired == 1
            assert fwd.stats.flows_total == 1
            # The same client again: a new flow with a new socket towards the target.
            assert await client.ask(b"two") == PREFIX + b"two"
            st = fwd.stats
            assert (st.flows_active, st.flows_total, st.expired) == (1, 2, 1)
            assert (st.datagrams_up, st.datagrams_down) == (2, 2)
            assert target.senders[0] != target.senders[1]
            client.close()

    run(main)


def test_traffic_keeps_a_flow_alive(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with target_endpoint() as (_, port), UdpForward(
            spec_for(port, idle_timeout=0.3)
        ) as fwd:
            client = await client_of(fwd.bound_port)
            for i in range(8):  # 0.8 s in all, never 0.3 s idle
                assert await client.ask(b"%d" % i) == PREFIX + b"%d" % i
                await asyncio.sleep(0.1)
            st = fwd.stats
            assert (st.flows_active, st.flows_total, st.expired) == (1, 1, 0)
            client.close()

    run(main)


def test_max_flows_drops_new_clients_only(run: Callable[..., Any]) -> None:
    async def main() -> None:
        async with target_endpoint() as (target, port), UdpForward(
            spec_for(port, max_flows=2)
        ) as fwd:
            a, b, c = [await client_of(fwd.bound_port) for _ in range(3)]
            assert await a.ask(b"a1") == PREFIX + b"a1"
            assert await b.ask(b"b1") == PREFIX + b"b1"
            for i in range(5):
                c.send(b"c%d" % i)
            with pytest.raises(TimeoutError):
                await c.recv(within=0.3)
            st = fwd.stats
            assert (st.dropped_limit, st.flows_active, st.flows_total) == (5, 2, 2)
            assert len(target.senders) == 2  # nothing of c reached the target
            # The two admitted flows are unaffected.
            assert await a.ask(b"a2") == PREFIX + b"a2"
            assert await b.ask(b"b2") == PREFIX + b"b2"
            assert fwd.stats.dropped_limit == 5
            for cl in (a, b, c):
                cl.close()

    run(main)


def test_target_not_listening_is_counted(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with dead_udp_port() as dead:
            async with UdpForward(spec_for(dead)) as fwd:
                client = await client_of(fwd.bound_port)
                client.send(b"anyone?")
                await eventually(lambda: fwd.stats.target_unreachable == 1)
                await eventually(lambda: fwd.stats.flows_active == 0)
                assert fwd.stats.flows_total == 1
                assert fwd.stats.datagrams_down == 0
                # The next datagram makes a new flow, which fails the same way.
                client.send(b"still nobody?")
                await eventually(lambda: fwd.stats.target_unreachable == 2)
                await eventually(lambda: fwd.stats.flows_active == 0)
                assert fwd.stats.flows_total == 2
                assert client.inbox.empty()
                client.close()

    run(main)


def test_port_in_use(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind((LOOPBACK, 0))
            port = taken.getsockname()[1]
            spec = UdpForwardSpec(listen_port=port, target_host=LOOPBACK, target_port=9)
            with pytest.raises(PortInUse) as info:
                await UdpForward(spec).start()
        err = info.value
        assert PortInUse is TcpPortInUse  # one error type for both relays
        assert str(err) == f"host port 127.0.0.1:{port} is already in use"
        assert err.errno == errno.EADDRINUSE
        assert (err.host, err.port) == (LOOPBACK, port)

    run(main)


def test_stop_with_active_flows_leaks_nothing(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # libuv keeps one /dev/null fd per loop from its first listener on (its EMFILE
        # trick); open and close one endpoint before counting so it is not taken for a leak.
        warm, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(LOOPBACK, 0)
        )
        warm.close()
        await asyncio.sleep(0.05)
        start = fd_count()
        async with target_endpoint() as (_, port):
            fwd = UdpForward(spec_for(port))
            await fwd.start()
            clients = [await client_of(fwd.bound_port) for _ in range(5)]
            for i, cl in enumerate(clients):
                assert await cl.ask(b"hi %d" % i) == PREFIX + b"hi %d" % i
            # A flow whose socket is still being created when stop() runs.
            late = await client_of(fwd.bound_port)
            late.send(b"late")
            await eventually(lambda: fwd.stats.flows_total == 6)
            listen_port = fwd.bound_port
            t0 = time.monotonic()
            await fwd.stop()
            assert time.monotonic() - t0 < 1.0
            assert fwd.stats.flows_active == 0
            await fwd.stop()  # idempotent
            for cl in [*clients, late]:
                cl.close()
        # The port is free again.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, listen_port))
        await eventually(lambda: fd_count() <= start, within=2.0)
        assert fd_count() == start
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="target_port"):
        UdpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=0)
    with pytest.raises(ValueError, match="listen_port"):
        UdpForwardSpec(listen_port=70000, target_host=LOOPBACK, target_port=1)
    with pytest.raises(ValueError, match="idle_timeout"):
        UdpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=1, idle_timeout=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        UdpForwardSpec(
            listen_port=0, target_host=LOOPBACK, target_port=1, idle_timeout=float("nan")
        )
    with pytest.raises(ValueError, match="max_flows"):
        UdpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=1, max_flows=0)
