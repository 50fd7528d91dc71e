"""Integration tests for the userspace TCP relay (sandport.forward.tcp), on real loopback sockets.

Every test runs its own event loop, under uvloop and under the default asyncio loop (the two
differ in when reading starts after ``connection_made``), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from conftest import eventually, fd_count
from sandport.forward.tcp import (
    COPY_CHUNK,
    IDLE_SWEEP_MAX,
    FailureReason,
    PortInUse,
    TcpForward,
    TcpForwardSpec,
)
from sandport.net.splice import PIPE_SIZE
from sandport.proto.errors import RemoteProtocolError
from sandport.proto.proxyproto import ProxyHeader, ProxyHeaderParser

pytestmark = pytest.mark.integration

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB

# -- helpers ---------------------------------------------------------------------------------


def spec_for(port: int, **kw: Any) -> TcpForwardSpec:
    return TcpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=port, **kw)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def set_linger_reset(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def read_until_eof(reader: asyncio.StreamReader) -> bytes:
    got = bytearray()
    while chunk := await reader.read(64 * KiB):
        got += chunk
    return bytes(got)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class Echo(asyncio.Protocol):
    """Echo target: returns every byte, closes after the client's FIN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close after flushing


class WatchedEcho(Echo):
    """Echo target that resolves ``lost`` when its connection is gone."""

    def __init__(self, lost: asyncio.Future[Exception | None]) -> None:
        self.lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class ProxyEcho(asyncio.Protocol):
    """Target behind a PROXY-protocol sender: parses the header, then echoes the rest."""

    def __init__(self, headers: asyncio.Queue[ProxyHeader]) -> None:
        self.headers = headers
        self.parser = ProxyHeaderParser()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        if self.parser.header is None:
            try:
                header = self.parser.receive_data(data)
            except RemoteProtocolError:
                self.transport.abort()
                raise
            if header is None:
                return
            self.headers.put_nowait(header)
            data = self.parser.trailing_data()
        if data:
            self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class Sink(asyncio.Protocol):
    """Target that records what it got; optional hooks on connect and on FIN."""

    def __init__(
        self,
        done: asyncio.Future[bytes],
        on_made: Callable[[Any], None] | None = None,
        on_eof: Callable[[Any, bytes], None] | None = None,
    ) -> None:
        self.done, self.on_made, self.on_eof = done, on_made, on_eof
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        if self.on_made:
            self.on_made(transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data

    def eof_received(self) -> bool:
        if self.on_eof:
            self.on_eof(self.transport, bytes(self.buf))
        if not self.done.done():
            self.done.set_result(bytes(self.buf))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before FIN"))


@contextlib.contextmanager
def unused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting to it is refused."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        yield s.getsockname()[1]


@contextlib.contextmanager
def stalled_listener() -> Iterator[tuple[socket.socket, int]]:
    """A listener whose accept queue is full: a new SYN is dropped, the connect hangs.

    With ``listen(0)`` Linux queues one connection; a filler takes that slot. Once the test
    accepts, the next SYN retransmission (~1 s) of a waiting connect succeeds.
    """
    with socket.socket() as srv, socket.socket() as filler:
        srv.bind((LOOPBACK, 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        filler.connect((LOOPBACK, port))
        yield srv, port


# -- tests -----------------------------------------------------------------------------------


def test_echo_50_concurrent_clients(run: Callable[..., Any]) -> None:
    n_clients, size = 50, 256 * KiB

    async def client(port: int, i: int) -> None:
        data = payload(i, size)
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(data)
        writer.write_eof()
        got = await reader.read()
        await close_writer(writer)
        assert len(got) == size
        assert got == data, f"client {i}: echoed bytes differ"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        try:
            async with TcpForward(spec_for(target.sockets[0].getsockname()[1])) as fwd:
                await asyncio.gather(*(client(fwd.bound_port, i) for i in range(n_clients)))
                await eventually(lambda: fwd.stats.active == 0)
                st = fwd.stats
                assert st.total == n_clients
                assert st.bytes_up == n_clients * size
                assert st.bytes_down == n_clients * size
                assert st.failed_connects == 0
                assert st.buffered == 0
        finally:
            target.close()

    run(main)


def test_half_close_client_first(run: Callable[..., Any]) -> None:
    """Client sends then SHUT_WR; the target sees FIN, still replies, then closes."""
    request, reply = payload(1, 300 * KiB), payload(2, 700 * KiB)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[bytes] = loop.create_future()

        def answer(transport: Any, got: bytes) -> None:
            transport.write(reply)  # after the client's FIN; then close (eof_received False)

        target = await loop.create_server(lambda: Sink(seen, on_eof=answer), LOOPBACK, 0)
        try:
            async with TcpForward(spec_for(target.sockets[0].getsockname()[1])) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(request)
                writer.write_eof()
                assert await seen == request
                got = await reader.read()  # full reply, then EOF
                assert got == reply
                assert reader.at_eof()
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert (fwd.stats.bytes_up, fwd.stats.bytes_down) == (len(request), len(reply))
        finally:
            target.close()

    run(main)


def test_half_close_target_first(run: Callable[..., Any]) -> None:
    """Target sends a greeting then SHUT_WR; the client still sends and the target gets it."""
    greeting, request = payload(3, 200 * KiB), payload(4, 2 * MiB)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[bytes] = loop.create_future()

        def greet(transport: Any) -> None:
            transport.write(greeting)
            transport.write_eof()

        target = await loop.create_server(lambda: Sink(seen, on_made=greet), LOOPBACK, 0)
        try:
            async with TcpForward(spec_for(target.sockets[0].getsockname()[1])) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                assert await reader.read() == greeting  # greeting, then EOF from the target
                writer.write(request)  # the client → target direction is still open
                await writer.drain()
                writer.write_eof()
                assert await seen == request
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
        finally:
            target.close()

    run(main)


def test_data_and_fin_before_upstream_connects(run: Callable[..., Any]) -> None:
    """Bytes and FIN sent while the upstream handshake is pending arrive intact, in order.

    The target's accept queue is full, so the relay's connect waits for a SYN
    retransmission; meanwhile the client has already sent everything. The target also
    speaks first (like an RFB server), so both sides have data before the pair exists.
    """
    early, banner = payload(5, 100 * KiB), b"RFB 003.008\n"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with stalled_listener() as (srv, port):
            async with TcpForward(spec_for(port, connect_timeout=5)) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(early)
                writer.write_eof()
                await asyncio.sleep(0.3)
                assert fwd.stats.active == 1  # connect still pending
                srv.setblocking(False)
                filler_conn, _ = await loop.sock_accept(srv)
                filler_conn.close()
                conn, _ = await loop.sock_accept(srv)  # the relay's retransmitted SYN
                with conn:
                    await loop.sock_sendall(conn, banner)
                    got = bytearray()
                    while chunk := await loop.sock_recv(conn, 64 * KiB):
                        got += chunk
                    assert bytes(got) == early
                assert await reader.read() == banner
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.failed_connects == 0

    run(main)


def test_backpressure_bounds_relay_buffers(run: Callable[..., Any]) -> None:
    """A target that does not read stalls the client; the relay holds little in user space."""
    total, chunk_size = 64 * MiB, 1 * MiB
    # One pipe (splice) or one buffer (copy) per direction holds the most the relay keeps.
    limit = 2 * max(PIPE_SIZE, COPY_CHUNK)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sent = 0
        digest_sent = hashlib.sha256()

        async def writer_side(port: int) -> None:
            nonlocal sent
            rng = random.Random(7)
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            while sent < total:
                chunk = rng.randbytes(chunk_size)
                digest_sent.update(chunk)
                writer.write(chunk)
                await writer.drain()
                sent += chunk_size
            writer.write_eof()
            await reader.read()  # the target closes after our FIN
            await close_writer(writer)

        with socket.socket() as srv:
            srv.bind((LOOPBACK, 0))
            srv.listen(1)
            srv.setblocking(False)
            async with TcpForward(spec_for(srv.getsockname()[1])) as fwd:
                max_buffered = 0

                def sample() -> None:
                    nonlocal max_buffered
                    max_buffered = max(max_buffered, fwd.stats.buffered)

                client = asyncio.create_task(writer_side(fwd.bound_port))
                # Phase 1: nobody reads at the target (the connection waits in the accept
                # queue). Kernel buffers fill up, then the client must stall.
                stalled_at, stalled_since = -1, time.monotonic()
                deadline = time.monotonic() + 10
                while time.monotonic() - stalled_since < 0.5:
                    assert time.monotonic() < deadline, "client never stalled"
                    sample()
                    if sent != stalled_at:
                        stalled_at, stalled_since = sent, time.monotonic()
                    await asyncio.sleep(0.005)
                assert sent < total, "the client was never slowed down"
                assert max_buffered <= limit, f"relay buffered {max_buffered} B while stalled"
                # Phase 2: the target reads everything; buffers stay bounded while flowing.
                conn, _ = await loop.sock_accept(srv)
                digest_got, n_got = hashlib.sha256(), 0
                with conn:
                    while data := await loop.sock_recv(conn, 256 * KiB):
                        digest_got.update(data)
                        n_got += len(data)
                        sample()
                await client
                assert n_got == total
                assert digest_got.hexdigest() == digest_sent.hexdigest()
                assert max_buffered <= limit, f"relay buffered up to {max_buffered} B"
                assert fwd.stats.bytes_up == total

    run(main, timeout=60)


def test_target_refused_resets_client(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with unused_port() as port:
            async with TcpForward(spec_for(port)) as fwd:
                t0 = time.monotonic()
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                try:
                    got = await reader.read()
                except ConnectionResetError:
                    got = b""
                assert got == b""
                assert time.monotonic() - t0 < 2.0
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.failed_connects == 1
                assert fwd.stats.total == 1

    run(main)


def test_connect_timeout_resets_client(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with stalled_listener() as (_, port):
            async with TcpForward(spec_for(port, connect_timeout=0.3)) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                t0 = time.monotonic()
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
                assert 0.2 < time.monotonic() - t0 < 2.0
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.failed_connects == 1
                assert fwd.stats.failures["timeout"] == 1

    run(main)


def test_target_reset_is_passed_on(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[bytes] = loop.create_future()

        class Resetter(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"bye")
                set_linger_reset(self.transport.get_extra_info("socket"))
                self.transport.abort()
                seen.set_result(data)

        target = await loop.create_server(Resetter, LOOPBACK, 0)
        try:
            async with TcpForward(spec_for(target.sockets[0].getsockname()[1])) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(b"hello")
                assert await seen == b"hello"
                # Linux delivers the RST: the relay must not turn it into a clean EOF.
                with pytest.raises(ConnectionResetError):
                    await read_until_eof(reader)
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.failures["reset"] == 1  # once, though both sides went down
        finally:
            target.close()

    run(main)


def test_client_reset_is_passed_on(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Exception | None] = loop.create_future()

        class Watch(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        target = await loop.create_server(Watch, LOOPBACK, 0)
        try:
            async with TcpForward(spec_for(target.sockets[0].getsockname()[1])) as fwd:
                _, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(b"x")
                await eventually(lambda: fwd.stats.bytes_up == 1)
                set_linger_reset(writer.get_extra_info("socket"))
                writer.transport.abort()
                assert isinstance(await lost, ConnectionResetError)
                await eventually(lambda: fwd.stats.active == 0)
        finally:
            target.close()

    run(main)


def test_port_in_use(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind((LOOPBACK, 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            spec = TcpForwardSpec(listen_port=port, target_host=LOOPBACK, target_port=9)
            with pytest.raises(PortInUse) as info:
                await TcpForward(spec).start()
        err = info.value
        assert str(err) == f"host port 127.0.0.1:{port} is already in use"
        assert isinstance(err, OSError)
        assert err.errno == errno.EADDRINUSE
        assert (err.host, err.port) == (LOOPBACK, port)

    run(main)


def test_no_fd_or_task_leak(run: Callable[..., Any]) -> None:

    async def one(port: int, i: int) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        data = payload(i, 1000)
        writer.write(data)
        writer.write_eof()
        assert await reader.read() == data
        await close_writer(writer)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # libuv keeps one /dev/null fd per loop from its first listen() on (its EMFILE
        # trick); open that before counting so it is not mistaken for a leak.
        warm = await loop.create_server(asyncio.Protocol, LOOPBACK, 0)
        warm.close()
        await warm.wait_closed()
        start = fd_count()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        fwd = TcpForward(spec_for(target.sockets[0].getsockname()[1]))
        await fwd.start()
        for batch in range(10):
            await asyncio.gather(*(one(fwd.bound_port, batch * 20 + i) for i in range(20)))
        with unused_port() as dead:  # a few failed connects must not leak either
            fwd.retarget(LOOPBACK, dead)
            for i in range(5):
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                with contextlib.suppress(ConnectionResetError):
                    await reader.read()
                await close_writer(writer)
                assert fwd.stats.failed_connects == i + 1
        await fwd.stop()
        target.close()
        await target.wait_closed()
        assert fwd.stats.active == 0
        assert fwd.stats.total == 205
        await eventually(lambda: fd_count() <= start, within=2.0)
        assert fd_count() == start
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main)


def test_stop_closes_live_connections(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        with stalled_listener() as (_, stalled_port):
            fwd = TcpForward(spec_for(target.sockets[0].getsockname()[1]))
            await fwd.start()
            clients = []
            for i in range(5):  # established and idle
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(b"ping %d" % i)
                assert await reader.readexactly(6) == b"ping %d" % i
                clients.append((reader, writer))
            fwd.retarget(LOOPBACK, stalled_port)  # one more, stuck in its connect step
            clients.append(await asyncio.open_connection(LOOPBACK, fwd.bound_port))
            await eventually(lambda: fwd.stats.active == 6)
            port = fwd.bound_port
            t0 = time.monotonic()
            await fwd.stop()
            assert time.monotonic() - t0 < 1.0
            assert fwd.stats.active == 0
            for reader, writer in clients:
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
                await close_writer(writer)
            # Stopped: the port no longer accepts.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(LOOPBACK, port)
        target.close()

    run(main)


def test_stop_resets_connections_that_cannot_drain(run: Callable[..., Any]) -> None:
    """A client that never reads cannot block stop(): after the grace period it is reset."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        try:
            fwd = TcpForward(spec_for(target.sockets[0].getsockname()[1]))
            await fwd.start()
            _, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
            writer.transport.pause_reading()  # never read the echo
            blob = payload(9, 32 * MiB)
            writer.write(blob)  # the echo fills the client's socket, then the relay's pipe
            # Stalled: the relay holds bytes and no more reach the client for a while.
            deadline, last, since = time.monotonic() + 10, -1, time.monotonic()
            while not (fwd.stats.buffered > 0 and time.monotonic() - since > 0.3):
                assert time.monotonic() < deadline, "the client side never stalled"
                if fwd.stats.bytes_down != last:
                    last, since = fwd.stats.bytes_down, time.monotonic()
                await asyncio.sleep(0.02)
            t0 = time.monotonic()
            await fwd.stop(grace=0.3)
            assert 0.25 < time.monotonic() - t0 < 2.0
            assert fwd.stats.active == 0
            writer.transport.abort()
        finally:
            target.close()

    run(main)


def test_retarget_applies_to_new_connections(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        def tagged(tag: bytes) -> Callable[[], asyncio.Protocol]:
            class Tag(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    transport.write(tag)  # type: ignore[attr-defined]
                    transport.close()

            return Tag

        a = await loop.create_server(tagged(b"A"), LOOPBACK, 0)
        b = await loop.create_server(tagged(b"B"), LOOPBACK, 0)
        try:
            async with TcpForward(spec_for(a.sockets[0].getsockname()[1])) as fwd:
                for want, server in ((b"A", a), (b"B", b)):
                    fwd.target = (LOOPBACK, server.sockets[0].getsockname()[1])
                    reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                    assert await reader.read() == want
                    await close_writer(writer)
                assert fwd.target == (LOOPBACK, b.sockets[0].getsockname()[1])
        finally:
            a.close()
            b.close()

    run(main)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="target_port"):
        TcpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=0)
    with pytest.raises(ValueError, match="listen_port"):
        TcpForwardSpec(listen_port=70000, target_host=LOOPBACK, target_port=1)
    with pytest.raises(ValueError, match="connect_timeout"):
        TcpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=1, connect_timeout=0)


def test_spec_validation_of_limits() -> None:
    def spec(**kw: Any) -> TcpForwardSpec:
        return TcpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=1, **kw)

    with pytest.raises(ValueError, match="idle_timeout"):
        spec(idle_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        spec(max_connections=0)
    with pytest.raises(ValueError, match="proxy_protocol"):
        spec(proxy_protocol=3)
    assert spec().idle_sweep_interval is None
    assert spec(idle_timeout=0.4).idle_sweep_interval == pytest.approx(0.1)
    assert spec(idle_timeout=60).idle_sweep_interval == IDLE_SWEEP_MAX


def test_idle_timeout_closes_silent_connection(run: Callable[..., Any]) -> None:
    idle = 0.4
    sweep = idle / 4

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Exception | None] = loop.create_future()
        target = await loop.create_server(lambda: WatchedEcho(lost), LOOPBACK, 0)
        try:
            port = target.sockets[0].getsockname()[1]
            async with TcpForward(spec_for(port, idle_timeout=idle)) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                t0 = time.monotonic()  # last byte moved; now stay silent
                assert await reader.read() == b""  # the relay closed us (FIN, not RST)
                waited = time.monotonic() - t0
                assert idle * 0.9 < waited < idle + sweep + 0.5, f"closed after {waited:.3f} s"
                assert await lost is None  # the target side was closed too
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                st = fwd.stats
                assert st.failures["idle"] == 1
                assert st.failed_connects == 0
                assert (st.bytes_up, st.bytes_down) == (4, 4)
        finally:
            target.close()

    run(main)


def test_active_connection_outlives_idle_timeout(run: Callable[..., Any]) -> None:
    idle = 0.4

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        try:
            port = target.sockets[0].getsockname()[1]
            async with TcpForward(spec_for(port, idle_timeout=idle)) as fwd:
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                t0 = time.monotonic()
                i = 0
                while time.monotonic() - t0 < 4 * idle:  # one byte every idle / 4
                    writer.write(b"%d" % (i % 10))
                    assert await reader.readexactly(1) == b"%d" % (i % 10)
                    i += 1
                    await asyncio.sleep(idle / 4)
                assert fwd.stats.active == 1
                assert fwd.stats.failures["idle"] == 0
                writer.write_eof()
                assert await reader.read() == b""
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.failures["idle"] == 0
        finally:
            target.close()

    run(main)


def test_max_connections_resets_the_extra_client(run: Callable[..., Any]) -> None:
    limit = 3

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        try:
            port = target.sockets[0].getsockname()[1]
            async with TcpForward(spec_for(port, max_connections=limit)) as fwd:
                clients = []
                for i in range(limit):
                    reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                    writer.write(b"hi %d" % i)
                    assert await reader.readexactly(4) == b"hi %d" % i
                    clients.append((reader, writer))
                assert fwd.stats.active == limit
                # One more: the kernel completes the handshake, then the relay sends RST.
                # The RST may beat the client's own connect completion (same loop here).
                async def extra_client() -> None:
                    extra_r, extra_w = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                    try:
                        await read_until_eof(extra_r)
                    finally:
                        extra_w.transport.abort()

                with pytest.raises(ConnectionResetError):
                    await extra_client()
                await eventually(lambda: fwd.stats.failures["limit"] == 1)
                st = fwd.stats
                assert (st.active, st.total, st.failed_connects) == (limit, limit + 1, 0)
                # The first ones are untouched.
                for i, (reader, writer) in enumerate(clients):
                    writer.write(b"ok %d" % i)
                    assert await reader.readexactly(4) == b"ok %d" % i
                # A slot that frees up is usable again.
                reader, writer = clients.pop()
                writer.write_eof()
                assert await reader.read() == b""
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == limit - 1)
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(b"again")
                assert await reader.readexactly(5) == b"again"
                clients.append((reader, writer))
                assert fwd.stats.failures["limit"] == 1
                for _, writer in clients:
                    await close_writer(writer)
        finally:
            target.close()

    run(main)


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_protocol_header_carries_the_client(run: Callable[..., Any], version: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        headers: asyncio.Queue[ProxyHeader] = asyncio.Queue()
        target = await loop.create_server(lambda: ProxyEcho(headers), LOOPBACK, 0)
        try:
            port = target.sockets[0].getsockname()[1]
            async with TcpForward(spec_for(port, proxy_protocol=version)) as fwd:
                for i in range(3):
                    reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                    client_port = writer.get_extra_info("sockname")[1]
                    # Sent at once, most likely before the upstream is connected: the header
                    # must still come first.
                    data = payload(i, 100 * KiB)
                    writer.write(data)
                    writer.write_eof()
                    assert await reader.read() == data
                    header = await asyncio.wait_for(headers.get(), 5)
                    assert header == ProxyHeader.for_stream(
                        (LOOPBACK, client_port), (LOOPBACK, fwd.bound_port), version=version
                    )
                    await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.bytes_up == sum(len(payload(i, 100 * KiB)) for i in range(3))
        finally:
            target.close()

    run(main)


def test_failure_reasons_refused(run: Callable[..., Any]) -> None:
    async def main() -> None:
        with unused_port() as port:
            async with TcpForward(spec_for(port)) as fwd:
                for _ in range(2):
                    reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                    with contextlib.suppress(ConnectionResetError):
                        assert await reader.read() == b""
                    await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                st = fwd.stats
                assert st.failures == {
                    FailureReason.REFUSED.value: 2,
                    "unreachable": 0,
                    "timeout": 0,
                    "limit": 0,
                    "idle": 0,
                    "reset": 0,
                    "descriptors": 0,
                }
                assert st.failed_connects == 2
                assert st.total == 2

    run(main)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "refused"),
        (OSError(errno.EHOSTUNREACH, "no route"), "unreachable"),
        (OSError(errno.ENETUNREACH, "network unreachable"), "unreachable"),
        (OSError(errno.ETIMEDOUT, "timed out"), "timeout"),
        (OSError(errno.EADDRNOTAVAIL, "cannot assign"), "unreachable"),
        (socket.gaierror(socket.EAI_NONAME, "unknown name"), "unreachable"),
        # asyncio's "several addresses failed" error has no errno, only text.
        (OSError("Multiple exceptions: [Errno 111] a, [Errno 111] b"), "refused"),
        (OSError("Multiple exceptions: [Errno 111] a, [Errno 113] b"), "unreachable"),
    ],
)
def test_connect_failure_reason_mapping(exc: OSError, reason: str) -> None:
    from sandport.forward.tcp import _connect_failure_reason

    assert _connect_failure_reason(exc) == reason


# -- data paths at the sizes ---------------------------------------------------------


@pytest.fixture(params=["splice", "copy"])
def data_path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def stream_chunks(seed: int, total: int, size: int = MiB) -> Iterator[bytes]:
    """``total`` bytes in ``size`` chunks; each chunk starts with its index (reordering shows)."""
    block = random.Random(seed).randbytes(size)
    for i in range(total // size):
        yield struct.pack("<Q", i) + block[8:]


def send_and_hash(sock: socket.socket, seed: int, total: int) -> str:
    """Send the stream, then FIN; return the sha256 of what was sent."""
    digest = hashlib.sha256()
    for chunk in stream_chunks(seed, total):
        digest.update(chunk)
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def recv_and_hash(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF; return (bytes, sha256)."""
    digest, n = hashlib.sha256(), 0
    buf = bytearray(MiB)
    while k := sock.recv_into(buf):
        digest.update(memoryview(buf)[:k])
        n += k
    return n, digest.hexdigest()


def both_ways(sock: socket.socket, seed: int, total: int) -> tuple[str, tuple[int, str]]:
    """Send ``total`` bytes and read everything the peer sends, at the same time."""
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send_and_hash, sock, seed, total)
        got = recv_and_hash(sock)
        return sent.result(timeout=120), got


def test_256_mib_each_way_sha256(run: Callable[..., Any], data_path: str) -> None:
    """256 MiB up and 256 MiB down at once through one connection; both digests match."""
    total = 256 * MiB

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as srv:
            srv.bind((LOOPBACK, 0))
            srv.listen(1)
            srv.settimeout(30)

            def target() -> tuple[str, tuple[int, str]]:
                conn, _ = srv.accept()
                with conn:
                    conn.settimeout(60)
                    return both_ways(conn, seed=2, total=total)

            def client(port: int) -> tuple[str, tuple[int, str]]:
                with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                    sock.settimeout(60)
                    return both_ways(sock, seed=1, total=total)

            spec = spec_for(srv.getsockname()[1], data_path=data_path)
            async with TcpForward(spec) as fwd:
                t_side = loop.run_in_executor(None, target)
                c_side = loop.run_in_executor(None, client, fwd.bound_port)
                (c_sent, c_got), (t_sent, t_got) = await asyncio.gather(c_side, t_side)
                assert t_got == (total, c_sent), "client → target stream differs"
                assert c_got == (total, t_sent), "target → client stream differs"
                await eventually(lambda: fwd.stats.active == 0)
                st = fwd.stats
                assert (st.bytes_up, st.bytes_down) == (total, total)
                assert st.fallbacks == 0
                assert st.buffered == 0

    run(main, timeout=120)


def test_200_concurrent_connections(run: Callable[..., Any], data_path: str) -> None:
    """200 clients at once, each echoing its own 64 KiB; every byte comes back to its owner."""
    n_clients, size = 200, 64 * KiB

    async def client(port: int, i: int, start: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        await start.wait()  # all 200 are connected before any sends
        data = payload(1000 + i, size)
        writer.write(data)
        writer.write_eof()
        got = await reader.read()
        await close_writer(writer)
        assert got == data, f"client {i}: echoed bytes differ"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0, backlog=512)
        try:
            port = target.sockets[0].getsockname()[1]
            async with TcpForward(spec_for(port, data_path=data_path)) as fwd:
                start = asyncio.Event()
                tasks = [asyncio.create_task(client(fwd.bound_port, i, start))
                         for i in range(n_clients)]
                await eventually(lambda: fwd.stats.active == n_clients, within=10)
                start.set()
                await asyncio.gather(*tasks)
                await eventually(lambda: fwd.stats.active == 0)
                st = fwd.stats
                assert (st.total, st.failed_connects) == (n_clients, 0)
                assert st.bytes_up == st.bytes_down == n_clients * size
        finally:
            target.close()

    run(main, timeout=60)


def test_splice_refused_falls_back_to_copy(
    run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel refuses splice (EINVAL), the connection relays with recv/send."""

    def refuse(*_: Any, **__: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr("os.splice", refuse)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = await loop.create_server(Echo, LOOPBACK, 0)
        try:
            spec = spec_for(target.sockets[0].getsockname()[1], data_path="splice")
            async with TcpForward(spec) as fwd:
                data = payload(11, 3 * MiB)
                reader, writer = await asyncio.open_connection(LOOPBACK, fwd.bound_port)
                writer.write(data)
                writer.write_eof()
                assert await reader.read() == data
                await close_writer(writer)
                await eventually(lambda: fwd.stats.active == 0)
                assert fwd.stats.fallbacks == 2  # both directions
        finally:
            target.close()

    run(main)


def test_data_path_validation() -> None:
    with pytest.raises(ValueError, match="data_path"):
        TcpForwardSpec(listen_port=0, target_host=LOOPBACK, target_port=1, data_path="zero")
