"""The WebSocket bridge (sandport.bridge.server) with a real websockets client.

The TCP echo service runs in a network namespace of the test's own (a "guest"); the
bridge runs in the test process, on uvloop and on asyncio.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.frames import Opcode
from websockets.uri import parse_uri

from conftest import eventually, fd_count, require_root
from nethelpers import RemoteHost, echo_guest
from sandport.bridge.model import BridgeConfig, BridgeLimits
from sandport.bridge.server import WsBridge
from sandport.bridge.targets import Target, TokenFile
from sandport.bridge.tls import TlsConfig
from tlshelpers import make_ca

pytestmark = pytest.mark.integration

#: The close a client sees when the target ends the session: the reason names the hop.
CLOSED_BY_TARGET = "the target closed the connection (hop: guest service)"

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteHost]:
    """A namespace running a TCP echo server on port 7."""
    require_root()
    with echo_guest(tmp_path_factory.mktemp("echo")) as r:
        yield r


def echo_target(guest: RemoteHost) -> Target:
    return Target(host=guest.ip, port=7)


def bridge_run(run: Callable[..., Any], config: BridgeConfig,
               body: Callable[[WsBridge], Awaitable[Any]], timeout: float = 30) -> Any:
    async def main() -> Any:
        async with WsBridge(config) as bridge:
            return await body(bridge)

    return run(main, timeout)


async def recv_exactly(ws: ClientConnection, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        msg = await ws.recv()
        got += msg if isinstance(msg, bytes) else base64.b64decode(msg)
    return bytes(got)


def url(bridge: WsBridge, path: str = "/") -> str:
    return f"ws://127.0.0.1:{bridge.bound_port}{path}"


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An in-process TCP echo service."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def raw_client(bridge: WsBridge) -> tuple[ClientProtocol, asyncio.StreamReader,
                                                 asyncio.StreamWriter]:
    """A sans-I/O client past the handshake: the test controls every byte it writes."""
    proto = ClientProtocol(parse_uri(url(bridge)), max_size=None)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.bound_port)
    proto.send_request(proto.connect())
    writer.write(b"".join(proto.data_to_send()))
    while proto.state.name != "OPEN":
        data = await reader.read(4096)
        assert data, "the bridge closed during the handshake"
        proto.receive_data(data)
        if proto.handshake_exc is not None:
            raise proto.handshake_exc
    return proto, reader, writer


# -- data ---------------------------------------------------------------------------------


def test_binary_1_mib_messages_and_fragments_round_trip(
    run: Callable[..., Any], guest: RemoteHost
) -> None:
    async def body(bridge: WsBridge) -> None:
        async with connect(url(bridge), subprotocols=["binary"], max_size=None,
                           compression=None) as ws:
            assert ws.subprotocol == "binary"
            for _ in range(3):
                payload = os.urandom(MiB)
                await ws.send(payload)
                assert await recv_exactly(ws, MiB) == payload
            # One message in three fragments of odd sizes.
            payload = os.urandom(300_001)
            await ws.send([payload[:7], payload[7:100_003], payload[100_003:]])
            assert await recv_exactly(ws, len(payload)) == payload
        assert bridge.stats.bytes_to_target == 3 * MiB + 300_001

    bridge_run(run, BridgeConfig(target=echo_target(guest)), body)


def test_writes_split_at_odd_sizes(run: Callable[..., Any], guest: RemoteHost) -> None:
    """Frames cut at every odd boundary by the TCP writes still arrive whole."""

    async def body(bridge: WsBridge) -> None:
        proto, reader, writer = await raw_client(bridge)
        payloads = [os.urandom(n) for n in (1, 125, 126, 65535, 65536, 200_003)]
        for p in payloads:
            proto.send_binary(p)
        wire = b"".join(proto.data_to_send())
        sizes = [1, 2, 3, 5, 7, 11, 13, 4093, 9, 65537]
        pos = i = 0
        while pos < len(wire):  # no size divides the stream evenly
            n = sizes[i % len(sizes)]
            writer.write(wire[pos:pos + n])
            await writer.drain()
            pos, i = pos + n, i + 1
        want = b"".join(payloads)
        got = bytearray()
        while len(got) < len(want):
            data = await reader.read(65536)
            assert data
            proto.receive_data(data)
            for event in proto.events_received():
                if getattr(event, "opcode", None) in (Opcode.BINARY, Opcode.CONT):
                    got += event.data
        assert bytes(got) == want
        writer.close()

    bridge_run(run, BridgeConfig(target=echo_target(guest)), body)


@contextlib.asynccontextmanager
async def client_to_counting_target(received: list[int]) -> AsyncIterator[
        tuple[ClientProtocol, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A bridge to a target that reads to the end, then appends how many bytes it got to
    ``received``; a sans-I/O client past the handshake."""
    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        received.append(total)
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    target = Target(host="127.0.0.1", port=server.sockets[0].getsockname()[1])
    async with server, WsBridge(BridgeConfig(target=target)) as bridge:
        yield await raw_client(bridge)


def test_data_in_the_same_read_as_the_close_frame_reaches_the_target(
    run: Callable[..., Any]
) -> None:
    """Messages, then a close frame, in one TCP write: every byte reaches the target."""
    received: list[int] = []

    async def main() -> None:
        async with client_to_counting_target(received) as (proto, reader, writer):
            for _ in range(8):
                proto.send_binary(b"x" * 100_000)
            proto.send_close(1000)
            writer.write(b"".join(proto.data_to_send()))  # one write: data, then close
            await writer.drain()
            while await reader.read(4096):  # until the bridge closes
                pass
            writer.close()
            await eventually(lambda: bool(received), within=5)
        assert received == [800_000]

    run(main)


def test_data_in_the_same_read_as_a_broken_frame_reaches_the_target(
    run: Callable[..., Any]
) -> None:
    """Messages, then a frame that breaks RFC 6455 (unmasked), in one TCP write: the
    messages reach the target, then the client gets 1002 with the reason."""
    received: list[int] = []

    async def main() -> None:
        async with client_to_counting_target(received) as (proto, reader, writer):
            for _ in range(3):
                proto.send_binary(b"x" * 1000)
            # A client frame must be masked (section 5.1): this one is not.
            writer.write(b"".join(proto.data_to_send()) + b"\x82\x03abc")
            await writer.drain()
            while data := await reader.read(4096):  # until the bridge closes
                proto.receive_data(data)
            writer.close()
            await eventually(lambda: bool(received), within=5)
        assert received == [3000]
        assert proto.close_rcvd is not None, "no close frame"
        assert proto.close_rcvd.code == 1002, proto.close_rcvd
        assert "mask" in proto.close_rcvd.reason, proto.close_rcvd

    run(main)


SOURCE_SERVER = r"""
import hashlib, random, socket, sys
size, chunk = int(sys.argv[1]), 1 << 16
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
rng, sent = random.Random(7), 0
while sent < size:
    data = rng.randbytes(min(chunk, size - sent))
    c.sendall(data)
    sent += len(data)
c.recv(1)  # the client's "done": only then the close, so no ping races with it
c.close()
"""


@pytest.mark.parametrize("zero_copy", [True, False], ids=["spliced", "copied"])
def test_a_large_download_arrives_whole_with_pings_between(
    run: Callable[..., Any], zero_copy: bool
) -> None:
    """64 MiB from a guest that then closes: every byte in order, then 1000 with a reason.

    Spliced: past the first read the guest's bytes never enter Python; the client's
    pings are answered between frames, never inside one.
    """
    size = 64 << 20
    proc = subprocess.Popen([sys.executable, "-c", SOURCE_SERVER, str(size)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        rng = __import__("random").Random(7)
        want = __import__("hashlib").sha256()
        left = size
        while left:
            chunk = rng.randbytes(min(1 << 16, left))
            want.update(chunk)
            left -= len(chunk)

        async def main() -> None:
            config = BridgeConfig(target=Target(host="127.0.0.1", port=port),
                                  zero_copy=zero_copy)
            async with WsBridge(config) as bridge, connect(
                    url(bridge), subprotocols=["binary"], max_size=None,
                    ping_interval=None) as ws:
                got, total, pongs = __import__("hashlib").sha256(), 0, []
                while total < size:
                    data = await ws.recv()
                    assert isinstance(data, bytes)
                    got.update(data)
                    total += len(data)
                    if total < size and total % (8 << 20) < len(data):  # every 8 MiB
                        pongs.append(await ws.ping())  # answered while we keep reading
                assert (total, got.hexdigest()) == (size, want.hexdigest())
                assert len(pongs) >= 4
                await asyncio.wait_for(asyncio.gather(*pongs), 5)  # all arrived
                await ws.send(b"d")
                assert await closes(ws) == (1000, CLOSED_BY_TARGET)
                assert bridge.stats.bytes_to_client == size
                assert bridge.stats.spliced == (1 if zero_copy else 0)

        run(main, 120)
    finally:
        proc.kill()
        proc.wait()


RESET_SERVER = r"""
import socket, struct
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b"x" * 100_000)       # enough for the bridge to switch to splicing
c.recv(1)                       # the client's "go"
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()                       # RST
"""


@pytest.mark.parametrize("zero_copy", [True, False], ids=["spliced", "copied"])
def test_a_target_reset_mid_session_is_a_1011_with_the_reason(
    run: Callable[..., Any], zero_copy: bool
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", RESET_SERVER], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        async def main() -> None:
            config = BridgeConfig(target=Target(host="127.0.0.1", port=port),
                                  zero_copy=zero_copy)
            async with WsBridge(config) as bridge, connect(
                    url(bridge), subprotocols=["binary"]) as ws:
                assert len(await recv_exactly(ws, 100_000)) == 100_000
                await ws.send(b"g")
                code, reason = await closes(ws)
                assert (code, reason) == (1011, "the target connection failed: Connection "
                                                "reset by peer (hop: guest service)"), \
                    (code, reason)

        run(main)
    finally:
        proc.kill()
        proc.wait()


def test_sessions_leave_no_descriptors_behind(run: Callable[..., Any],
                                              guest: RemoteHost) -> None:
    """Spliced sessions dup both sockets and open a pipe: all closed, whoever ends first."""

    async def main() -> None:
        async with WsBridge(BridgeConfig(target=echo_target(guest))) as bridge:
            await one_round(bridge)  # warm: the loop's own descriptors exist now
            await eventually(lambda: bridge.stats.sessions_active == 0, within=5)
            before = fd_count()
            for _ in range(5):
                await one_round(bridge)
            await eventually(lambda: bridge.stats.sessions_active == 0, within=5)
            assert bridge.stats.spliced >= 10
            assert fd_count() == before

    async def one_round(bridge: WsBridge) -> None:
        # The client closes; then the bridge closes (its shutdown closes the last one).
        async with connect(url(bridge), subprotocols=["binary"]) as ws:
            for size in (100, 70_000):
                await ws.send(b"e" * size)
                await recv_exactly(ws, size)
        ws = await connect(url(bridge), subprotocols=["binary"])
        await ws.send(b"e" * 70_000)
        await recv_exactly(ws, 70_000)
        ws.transport.abort()  # the client vanishes without a close frame

    run(main)


def test_base64_subprotocol_round_trip(run: Callable[..., Any], guest: RemoteHost) -> None:
    async def body(bridge: WsBridge) -> None:
        async with connect(url(bridge), subprotocols=["base64"], max_size=None) as ws:
            assert ws.subprotocol == "base64"
            payload = os.urandom(MiB)
            text = base64.b64encode(payload).decode()
            await ws.send(text)
            assert await recv_exactly(ws, MiB) == payload
            # Fragments that cut base64 quads in the middle.
            payload = os.urandom(10_000)
            text = base64.b64encode(payload).decode()
            await ws.send([text[:5], text[5:1003], text[1003:]])
            assert await recv_exactly(ws, len(payload)) == payload
            await ws.send("not base64!")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1003, "base64 subprotocol: the message is not base64")

    bridge_run(run, BridgeConfig(target=echo_target(guest)), body)


def test_no_subprotocol_works_and_text_is_refused_with_a_reason(
    run: Callable[..., Any], guest: RemoteHost
) -> None:
    async def body(bridge: WsBridge) -> None:
        async with connect(url(bridge)) as ws:
            assert ws.subprotocol is None
            await ws.send(b"plain")
            assert await recv_exactly(ws, 5) == b"plain"
            await ws.send("text")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1003
            assert "send binary" in closed.value.rcvd.reason

    bridge_run(run, BridgeConfig(target=echo_target(guest)), body)


BANNER_SERVER = r"""
import socket
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"RFB 003.008\n")  # at once, as an RFB server does
    c.close()
"""


def test_a_target_that_speaks_first_loses_nothing(run: Callable[..., Any]) -> None:
    """The banner a guest sends on connect arrives before the 101: it is kept for after.

    The target is another process (no GIL in common with the bridge), so its banner is
    in the socket by the time the bridge's connect completes.
    """
    proc = subprocess.Popen([sys.executable, "-c", BANNER_SERVER], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        class SlowBridge(WsBridge):
            async def connect_target(self, session: Any, target: Target) -> None:
                await super().connect_target(session, target)
                await asyncio.sleep(0.1)  # the banner arrives before the 101 is sent

        async def main() -> None:
            target = Target(host="127.0.0.1", port=port)
            async with SlowBridge(BridgeConfig(target=target)) as bridge:
                for _ in range(3):
                    async with connect(url(bridge), subprotocols=["binary"]) as ws:
                        assert await ws.recv() == b"RFB 003.008\n"
                        assert await closes(ws) == (1000, CLOSED_BY_TARGET)

        run(main)
    finally:
        proc.kill()
        proc.wait()


def test_unix_socket_target(run: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "app.sock"

    async def main() -> None:
        server = await asyncio.start_unix_server(echo_handler, path)
        async with (server, WsBridge(BridgeConfig(target=Target(path=str(path)))) as bridge,
                    connect(url(bridge), subprotocols=["binary"]) as ws):
            await ws.send(b"over a unix socket")
            assert await recv_exactly(ws, 18) == b"over a unix socket"

    run(main)


# -- refusals before the upgrade -------------------------------------------------------------


async def refused(uri: str, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(uri, open_timeout=10, **kw):
            pass
    r = info.value.response
    return r.status_code, json.loads(r.body or b"{}"), r.headers


def test_tokens_missing_unknown_and_a_token_file_edited_while_running(
    run: Callable[..., Any], guest: RemoteHost, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "a.conf").write_text(f"# sandbox a\nalpha: {guest.ip}:7\nbroken line\n")

    async def body(bridge: WsBridge) -> None:
        status, doc, _ = await refused(url(bridge, "/websockify"))
        assert (status, doc["error"]) == (401, "token_missing")
        status, doc, _ = await refused(url(bridge, "/?token=beta"))
        assert (status, doc["error"]) == (403, "token_unknown")
        async with connect(url(bridge, "/?token=alpha")) as ws:
            await ws.send(b"a")
            assert await recv_exactly(ws, 1) == b"a"
        # Edit while running: beta appears in a new file, alpha goes.
        (tokens / "b.conf").write_text(f"beta: {guest.ip}:7\n")
        (tokens / "a.conf").write_text("# alpha revoked\n")
        async with connect(url(bridge, "/websockify/beta")) as ws:  # token in the path
            await ws.send(b"b")
            assert await recv_exactly(ws, 1) == b"b"
        status, _, _ = await refused(url(bridge, "/?token=alpha"))
        assert status == 403

    plugin = TokenFile(tokens)
    bridge_run(run, BridgeConfig(tokens=plugin), body)
    assert plugin.loads >= 2


def test_host_header_token(run: Callable[..., Any], guest: RemoteHost, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"sandbox-7.example: {guest.ip}:7\n")

    async def body(bridge: WsBridge) -> None:
        # The URL names the sandbox (Host: sandbox-7.example:6080); the socket goes to us.
        async with connect("ws://sandbox-7.example:6080/", host="127.0.0.1",
                           port=bridge.bound_port) as ws:
            await ws.send(b"h")
            assert await recv_exactly(ws, 1) == b"h"
        status, _, _ = await refused(url(bridge, "/?token=sandbox-7.example"))
        assert status == 403  # with --host-token the URL's token does not count

    bridge_run(run, BridgeConfig(tokens=TokenFile(tokens), host_token=True), body)


def test_origin_allow_list(run: Callable[..., Any], guest: RemoteHost) -> None:
    async def body(bridge: WsBridge) -> None:
        status, doc, _ = await refused(url(bridge), origin="https://evil.example")
        assert (status, doc["error"]) == (403, "origin_not_allowed")
        assert "https://evil.example" in doc["message"]
        async with connect(url(bridge), origin="https://app.example") as ws:
            await ws.send(b"o")
            assert await recv_exactly(ws, 1) == b"o"

    bridge_run(run, BridgeConfig(target=echo_target(guest), origins=("https://app.example",)),
               body)


def test_target_refused_unreachable_and_timeout(
    run: Callable[..., Any], guest: RemoteHost
) -> None:
    async def refused_target(bridge: WsBridge) -> None:
        status, doc, _ = await refused(url(bridge))
        assert (status, doc["error"]) == (502, "target_refused")
        assert f"{guest.ip}:9" in doc["message"]

    bridge_run(run, BridgeConfig(target=Target(host=guest.ip, port=9)), refused_target)

    # An address on the guest's link that nobody holds: ARP never answers.
    nobody = str(__import__("ipaddress").ip_address(guest.ip) + 50)

    async def timed_out(bridge: WsBridge) -> None:
        status, doc, _ = await refused(url(bridge))
        assert (status, doc["error"]) == (504, "target_timeout")

    bridge_run(run, BridgeConfig(target=Target(host=nobody, port=7),
                                 limits=BridgeLimits(connect_timeout=0.5)), timed_out)


def test_connection_limits_answer_429_and_503_and_spare_open_sessions(
    run: Callable[..., Any], guest: RemoteHost
) -> None:
    async def per_client(bridge: WsBridge) -> None:
        async with connect(url(bridge)) as first:
            status, doc, headers = await refused(url(bridge))
            assert (status, doc["error"], headers["Retry-After"]) == (
                429, "too_many_sessions_from_client", "5")
            await first.send(b"still here")
            assert await recv_exactly(first, 10) == b"still here"

    bridge_run(run, BridgeConfig(target=echo_target(guest),
                                 limits=BridgeLimits(max_per_client=1)), per_client)

    async def overall(bridge: WsBridge) -> None:
        async with connect(url(bridge)), connect(url(bridge)):
            status, doc, headers = await refused(url(bridge))
            assert (status, doc["error"], headers["Retry-After"]) == (
                503, "too_many_sessions", "5")
        # Both closed: there is room again.
        await asyncio.sleep(0.1)
        async with connect(url(bridge)) as ws:
            await ws.send(b"x")
            assert await recv_exactly(ws, 1) == b"x"

    bridge_run(run, BridgeConfig(target=echo_target(guest),
                                 limits=BridgeLimits(max_connections=2)), overall)


# -- closes after the upgrade ---------------------------------------------------------------


async def closes(ws: ClientConnection) -> tuple[int, str]:
    """Read until the bridge closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        await read_forever(ws)
    frame = closed.value.rcvd
    assert frame is not None, "closed without a close frame (1006)"
    return frame.code, frame.reason


async def read_forever(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


def test_every_close_has_a_code_and_a_reason(run: Callable[..., Any], guest: RemoteHost) -> None:
    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(bye, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = Target(host="127.0.0.1", port=port)
        async with (server, WsBridge(BridgeConfig(target=target)) as bridge,
                    connect(url(bridge)) as ws):
            assert await ws.recv() == b"bye"
            assert await closes(ws) == (1000, CLOSED_BY_TARGET)
        limits = BridgeLimits(idle_timeout=0.3, max_message=1000)
        async with WsBridge(BridgeConfig(target=echo_target(guest), limits=limits)) as bridge:
            async with connect(url(bridge)) as ws:
                assert await closes(ws) == (1000, "idle for 0.3 s")
            async with connect(url(bridge)) as ws:
                await ws.send(b"x" * 2000)  # one frame: refused from its header
                assert await closes(ws) == (1009, "message over 1000 bytes")
            async with connect(url(bridge)) as ws:
                await ws.send([b"x" * 600, b"x" * 600])  # fragments: the message is too big
                assert await closes(ws) == (1009, "message over 1000 bytes")
            assert bridge.stats.closed["idle for 0.3 s"] == 1
        async with WsBridge(BridgeConfig(target=echo_target(guest))) as bridge:
            ws = await connect(url(bridge))
            stopping = asyncio.ensure_future(bridge.stop())
            assert await closes(ws) == (1001, "the bridge is shutting down")
            await stopping

    run(main)


def test_heartbeat_closes_a_client_that_never_answers(run: Callable[..., Any],
                                                      guest: RemoteHost) -> None:
    async def body(bridge: WsBridge) -> None:
        # ping_interval=None and a client that stops reading: no pong ever goes back.
        async with connect(url(bridge), ping_interval=None) as ws:
            ws.transport.pause_reading()  # type: ignore[attr-defined]
            await asyncio.sleep(0.7)
            ws.transport.resume_reading()  # type: ignore[attr-defined]
            assert await closes(ws) == (1011, "keepalive: no pong within 0.2 s")
        # A client that answers pings stays.
        async with connect(url(bridge), ping_interval=None) as ws:
            await asyncio.sleep(0.7)
            await ws.send(b"alive")
            assert await recv_exactly(ws, 5) == b"alive"

    bridge_run(run, BridgeConfig(target=echo_target(guest),
                                 limits=BridgeLimits(heartbeat=0.2)), body)


# -- TLS, web, proxies ----------------------------------------------------------------------


def test_wss_and_ws_on_one_port_and_a_renewed_certificate(
    run: Callable[..., Any], guest: RemoteHost, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path)
    pem = ca.issue(tmp_path / "server.pem", serial=1001)

    async def body(bridge: WsBridge) -> None:
        ctx = ca.client_context()
        async with connect(f"wss://127.0.0.1:{bridge.bound_port}/", ssl=ctx) as ws:
            await ws.send(b"secret")
            assert await recv_exactly(ws, 6) == b"secret"
            first = ws.transport.get_extra_info("ssl_object").getpeercert()
        async with connect(url(bridge)) as ws:  # plain ws on the same port
            await ws.send(b"plain")
            assert await recv_exactly(ws, 5) == b"plain"
        ca.issue(pem, serial=2002)  # renewed in place, as certbot does
        async with connect(f"wss://127.0.0.1:{bridge.bound_port}/", ssl=ctx) as ws:
            second = ws.transport.get_extra_info("ssl_object").getpeercert()
        assert (int(first["serialNumber"], 16), int(second["serialNumber"], 16)) == (1001, 2002)
        # A client that does not trust the CA fails the handshake, not the bridge.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(f"wss://127.0.0.1:{bridge.bound_port}/",
                               ssl=ssl.create_default_context()):
                pass

    bridge_run(run, BridgeConfig(target=echo_target(guest), tls=TlsConfig(cert=pem)), body)


def test_minimum_tls_version(run: Callable[..., Any], guest: RemoteHost,
                             tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    pem = ca.issue(tmp_path / "server.pem")

    async def body(bridge: WsBridge) -> None:
        old = ca.client_context()
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(OSError):  # an alert, or a reset: never a session
            async with connect(f"wss://127.0.0.1:{bridge.bound_port}/", ssl=old):
                pass
        async with connect(f"wss://127.0.0.1:{bridge.bound_port}/",
                           ssl=ca.client_context()) as ws:
            assert ws.transport.get_extra_info("ssl_object").version() == "TLSv1.3"

    bridge_run(run, BridgeConfig(target=echo_target(guest),
                                 tls=TlsConfig(cert=pem, min_version="tlsv1_3")), body)


def test_ssl_only_answers_plain_clients_with_a_reason(
    run: Callable[..., Any], guest: RemoteHost, tmp_path: Path
) -> None:
    pem = make_ca(tmp_path).issue(tmp_path / "server.pem")

    async def body(bridge: WsBridge) -> None:
        status, doc, _ = await refused(url(bridge))
        assert (status, doc["error"]) == (400, "tls_required")

    bridge_run(run, BridgeConfig(target=echo_target(guest),
                                 tls=TlsConfig(cert=pem, ssl_only=True)), body)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_web_dir_is_served_on_the_same_port(run: Callable[..., Any], guest: RemoteHost,
                                            tmp_path: Path) -> None:
    web = tmp_path / "web"
    (web / "app").mkdir(parents=True)
    (web / "index.html").write_text("<h1>desktop</h1>")
    (web / "app" / "ui.js").write_text("export const x = 1;")
    (tmp_path / "secret").write_text("no")

    async def body(bridge: WsBridge) -> None:
        assert await http_get(bridge.bound_port, "/") == (200, b"<h1>desktop</h1>")
        assert await http_get(bridge.bound_port, "/app/ui.js") == (200, b"export const x = 1;")
        status, _ = await http_get(bridge.bound_port, "/../secret")
        assert status == 404
        status, _ = await http_get(bridge.bound_port, "/%2e%2e/secret")
        assert status == 404
        async with connect(url(bridge, "/websockify")) as ws:  # and WebSockets
            await ws.send(b"w")
            assert await recv_exactly(ws, 1) == b"w"

    bridge_run(run, BridgeConfig(target=echo_target(guest), web_dir=web), body)

    async def no_web(bridge: WsBridge) -> None:
        status, body_bytes = await http_get(bridge.bound_port, "/")
        assert status == 426
        assert "WebSocket client" in json.loads(body_bytes)["message"]

    bridge_run(run, BridgeConfig(target=echo_target(guest)), no_web)


def test_real_client_from_trusted_proxies_only(
    run: Callable[..., Any], guest: RemoteHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandport.bridge")
    import ipaddress

    async def body(bridge: WsBridge) -> None:
        xff = {"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}
        async with connect(url(bridge), additional_headers=xff) as ws:
            await ws.send(b"1")
            await recv_exactly(ws, 1)
        # A PROXY v1 header from the trusted peer, then the WebSocket handshake.
        sock = socket.create_connection(("127.0.0.1", bridge.bound_port))
        sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\n")
        async with connect(url(bridge), sock=sock) as ws:
            await ws.send(b"2")
            await recv_exactly(ws, 1)

    bridge_run(run, BridgeConfig(target=echo_target(guest), trusted_proxies=(
        ipaddress.ip_network("127.0.0.0/8"),)), body)
    opened = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    assert any(": 198.51.100.7 -> " in m for m in opened), opened
    assert any(": 203.0.113.9:40000 -> " in m for m in opened), opened

    caplog.clear()

    async def untrusted(bridge: WsBridge) -> None:
        xff = {"X-Forwarded-For": "198.51.100.7"}
        async with connect(url(bridge), additional_headers=xff) as ws:
            await ws.send(b"3")
            await recv_exactly(ws, 1)

    bridge_run(run, BridgeConfig(target=echo_target(guest)), untrusted)
    opened = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    assert opened and all("198.51.100.7" not in m for m in opened), opened


def test_client_certificates_when_asked_for(run: Callable[..., Any], guest: RemoteHost,
                                            tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    pem = ca.issue(tmp_path / "server.pem")
    client_pem = ca.issue(tmp_path / "client.pem", cn="viewer")

    async def body(bridge: WsBridge) -> None:
        without = ca.client_context()
        # No certificate: TLS 1.3 fails it after the client's Finished, so the client sees
        # the connection end before the 101 (or the handshake fail).
        with pytest.raises((OSError, InvalidMessage)):
            await open_and_close(f"wss://127.0.0.1:{bridge.bound_port}/", without)
        with_cert = ca.client_context()
        with_cert.load_cert_chain(client_pem)
        async with connect(f"wss://127.0.0.1:{bridge.bound_port}/", ssl=with_cert) as ws:
            await ws.send(b"cert")
            assert await recv_exactly(ws, 4) == b"cert"

    tls = TlsConfig(cert=pem, verify_client=True, cafile=ca.ca_pem)
    bridge_run(run, BridgeConfig(target=echo_target(guest), tls=tls), body)


def test_tls_to_the_target(run: Callable[..., Any], tmp_path: Path) -> None:
    """--ssl-target: the bridge speaks TLS to a target that only takes TLS."""
    pem = make_ca(tmp_path).issue(tmp_path / "target.pem")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pem)

    async def main() -> None:
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0, ssl=server_ctx)
        target = Target(host="127.0.0.1", port=server.sockets[0].getsockname()[1])
        async with (server, WsBridge(BridgeConfig(target=target, target_tls=True)) as bridge,
                    connect(url(bridge)) as ws):
            await ws.send(b"over tls")
            assert await recv_exactly(ws, 8) == b"over tls"

    run(main)


async def open_and_close(uri: str, ctx: ssl.SSLContext) -> None:
    async with connect(uri, ssl=ctx, open_timeout=10):
        pass
