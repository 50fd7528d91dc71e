"""Client worker of the WebSocket-bridge bench: one process, uvloop, one command per line.

Started by ``bench/ws.py`` (so its CPU time is apart from the bridge's and the bench's own).
Reads one JSON object per line on stdin, runs it, answers one JSON line on stdout::

    {"op": "upload", "target": {"ws": "ws://127.0.0.1:41327/"}, "seconds": 3, ...}
    {"op": "upload", "target": {"tcp": ["127.0.0.1", 39011]}, ...}       (raw TCP)

Operations (every one bounded by ``bound`` seconds; a failure answers ``{"error": ...}``):

    probe      one echo round trip through the target
    upload     64 KiB messages into the service's sink for ``seconds``; the bytes are counted
               where they arrive (the sink), up to the sink's last byte
    download   messages from the service's source for ``seconds``, counted here
    echo       ``size``-byte messages through the echo service with ``window`` in flight:
               send ``window``, then one more per ``size`` bytes of replies (a bridge may
               merge or split replies, so replies are counted in bytes, not in messages)
    idle_open  open ``count`` connections (``concurrency`` handshakes at a time) and keep them
    idle_close close them
    quit       close everything and exit

Two implementations of probe, upload, download and echo (``--client``, fixed per process):

``raw`` (default): a load generator that is not the limit. The opening handshake is
``websockets``' sans-I/O ``ClientProtocol`` (subprotocol ``binary``, no extensions); after
the 101 the connection is a :class:`RawConn` (``asyncio.BufferedProtocol`` on the uvloop
transport). Upload writes one pre-built batch of 16 masked 64 KiB binary frames (one random
mask key for all of them: a load generator's shortcut) with the transport's backpressure;
download reads into a 1 MiB buffer and parses frame headers only (server frames must be
unmasked, binary or continuation; pings are answered; anything else fails the run); echo
sends pre-built masked messages of a random pattern and compares every reply byte with it.
Raw TCP uses the same protocol class, without framing.

``websockets``: the library's asyncio client with ``subprotocols=["binary"]``, no
compression, no size limit, no keepalive pings and no proxy. Raw TCP then uses the loop's
socket methods on a non-blocking socket with TCP_NODELAY, one ``sendall`` per message, like
the WebSocket path's one frame per message.

The idle connections always use ``websockets`` (not throughput-critical). Both connect only
to the given loopback address (no proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.speedups import apply_mask
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI, parse_uri

OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 3.0
WRITE_LIMIT = 1 << 20  # send() waits for the transport to drain below this
SINK_SETTLE = 5.0  # seconds, at most, for the sink to see the upload's last byte
SINK_POLL = 0.02
STABLE_FOR = 0.5  # sink bytes unchanged this long count as settled (bridge kept it open)
IDLE_TARGET_WAIT = 10.0
RECV_BUFFER = 64 << 10
DEFAULT_BOUND = 120.0
WS_OPTIONS: dict[str, Any] = {
    "subprotocols": [Subprotocol("binary")],
    "max_size": None,
    "compression": None,
    "proxy": None,
    "ping_interval": None,
    "open_timeout": OPEN_TIMEOUT,
    "close_timeout": CLOSE_TIMEOUT,
    "write_limit": WRITE_LIMIT,
}


class WsChannel:
    """A WebSocket client connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> int:
        return len(await self.ws.recv())

    async def close(self) -> None:
        # Read (and drop) what is still coming while the closing handshake runs: a full
        # receive queue would stop reading, and the close frame behind the data would only
        # arrive after CLOSE_TIMEOUT.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.ws.close())
            tg.create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.ws.recv()

    def abort(self) -> None:
        """Drop the connection without a closing handshake."""
        self.ws.transport.abort()

    def is_open(self) -> bool:
        """Neither side has closed it (a bridge may close it after the handshake)."""
        return self.ws.state is State.OPEN


class TcpChannel:
    """A plain TCP connection on the running loop's socket methods."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray(RECV_BUFFER)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv(self) -> int:
        n: int = await self.loop.sock_recv_into(self.sock, self.buf)
        return n

    async def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Close the socket."""
        self.sock.close()

    def is_open(self) -> bool:
        """Not closed here (a peer's close shows only on the next read)."""
        return self.sock.fileno() >= 0


async def open_channel(target: dict[str, Any]) -> WsChannel | TcpChannel:
    """Connect to ``{"ws": url}`` or ``{"tcp": [host, port]}``."""
    if "ws" in target:
        return WsChannel(await connect(target["ws"], **WS_OPTIONS))
    host, port = target["tcp"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return TcpChannel(sock)


async def stats(addr: list[Any]) -> dict[str, Any]:
    """The service's counters (straight to the service, not through a bridge)."""
    reader, writer = await asyncio.open_connection(addr[0], addr[1])
    try:
        writer.write(b"S")
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    data: dict[str, Any] = json.loads(line)
    return data


async def wait_sink(addr: list[Any]) -> dict[str, Any]:
    """Poll the sink until its connection is closed and its byte count stands still.

    Bounded by :data:`SINK_SETTLE`; a bridge that keeps the target connection open after
    the client closed counts as settled once the bytes stood still for :data:`STABLE_FOR`.
    """
    deadline = time.monotonic() + SINK_SETTLE
    last = await stats(addr)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(SINK_POLL)
        now = await stats(addr)
        if now["sink_bytes"] != last["sink_bytes"]:
            stable_since = time.monotonic()
        elif now["sink_open"] == 0 or time.monotonic() - stable_since >= STABLE_FOR:
            now["settled"] = True
            return now
        last = now
    last["settled"] = False
    return last


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process: (user + system, user)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_utime


async def _upload_result(stats_addr: list[Any], before: dict[str, Any], sent: int,
                         t0: float, t1: float, cpu0: tuple[float, float],
                         cpu1: tuple[float, float]) -> dict[str, Any]:
    """An upload's figures, its bytes counted where they arrived (the sink)."""
    after = await wait_sink(stats_addr)
    nbytes = after["sink_bytes"] - before["sink_bytes"]
    elapsed = after["sink_last_rx"] - t0 if nbytes > 0 else t1 - t0
    return {
        "bytes": nbytes,
        "bytes_sent": sent,
        "seconds": elapsed,
        "mb_per_s": nbytes / elapsed / 1e6 if elapsed > 0 else None,
        **_busy(cpu0, cpu1, t1 - t0),
        "sink_settled": after["settled"],
    }


def _busy(cpu0: tuple[float, float], cpu1: tuple[float, float],
          elapsed: float) -> dict[str, float | None]:
    """The client's CPU share over ``elapsed`` seconds (1.0: one core), all and user only."""
    if elapsed <= 0:
        return {"client_busy": None, "client_user_busy": None}
    return {"client_busy": (cpu1[0] - cpu0[0]) / elapsed,
            "client_user_busy": (cpu1[1] - cpu0[1]) / elapsed}


async def op_probe(target: dict[str, Any]) -> dict[str, Any]:
    """One echo round trip of 16 bytes."""
    t0 = time.monotonic()
    ch = await open_channel(target)
    try:
        await ch.send(b"E")
        await ch.send(b"p" * 16)
        got = 0
        while got < 16:
            n = await ch.recv()
            if n == 0:
                raise ConnectionError("closed before the echo came back")
            got += n
    finally:
        await ch.close()
    return {"ok": True, "ms": (time.monotonic() - t0) * 1e3}


async def op_upload(target: dict[str, Any], seconds: float, size: int,
                    stats_addr: list[Any]) -> dict[str, Any]:
    """``size``-byte messages into the sink for ``seconds``; bytes counted at the sink."""
    before = await stats(stats_addr)
    payload = b"\x5a" * size
    ch = await open_channel(target)
    sent = 0
    try:
        await ch.send(b"U")
        cpu0, t0 = _cpu(), time.monotonic()
        deadline = t0 + seconds
        while True:
            await ch.send(payload)
            sent += size
            if time.monotonic() >= deadline:
                break
        t1, cpu1 = time.monotonic(), _cpu()
    finally:
        await ch.close()
    return await _upload_result(stats_addr, before, sent, t0, t1, cpu0, cpu1)


async def op_download(target: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Messages from the source for ``seconds``, counted as they arrive here."""
    ch = await open_channel(target)
    got = reads = 0
    try:
        await ch.send(b"D")
        cpu0, t0 = _cpu(), time.monotonic()
        deadline = t0 + seconds
        while True:
            n = await ch.recv()
            if n == 0:
                raise ConnectionError("the source side closed")
            got += n
            reads += 1
            now = time.monotonic()
            if now >= deadline:
                break
        cpu1 = _cpu()
    finally:
        await ch.close()
    elapsed = now - t0
    return {
        "bytes": got,
        "messages": reads,  # WebSocket messages; for raw TCP, reads of up to 64 KiB
        "seconds": elapsed,
        "mb_per_s": got / elapsed / 1e6 if elapsed > 0 else None,
        **_busy(cpu0, cpu1, elapsed),
    }


async def op_echo(target: dict[str, Any], seconds: float, size: int,
                  window: int) -> dict[str, Any]:
    """``size``-byte messages with ``window`` in flight through the echo service."""
    payload = b"\x5a" * size
    ch = await open_channel(target)
    replies = 0
    try:
        await ch.send(b"E")
        for _ in range(window):
            await ch.send(payload)
        cpu0, t0 = _cpu(), time.monotonic()
        deadline = t0 + seconds
        received = 0
        while True:
            n = await ch.recv()
            if n == 0:
                raise ConnectionError("the echo side closed")
            received += n
            new = received // size - replies
            replies += new
            now = time.monotonic()
            if now >= deadline:
                break
            for _ in range(new):
                await ch.send(payload)
        cpu1 = _cpu()
    finally:
        await ch.close()
    elapsed = now - t0
    return {
        "messages": replies,
        "seconds": elapsed,
        "msgs_per_s": replies / elapsed if elapsed > 0 else None,
        **_busy(cpu0, cpu1, elapsed),
    }


# -- the raw client (--client raw, the default) ------------------------------------------------
#
# A load generator, not a WebSocket implementation: the opening handshake is websockets'
# sans-I/O ClientProtocol (request, response validation, subprotocol "binary", no
# extensions); after the 101 the connection is this BufferedProtocol on the raw transport.
# Upload and echo send frames built once, masked once (RFC 6455 5.3: client frames are
# masked; the key is reused for every frame, which a real client must not do). Received
# frames are parsed header by header out of one preallocated buffer; payloads are counted
# (and, for the echo, compared) in place, never copied.

RAW_READ_BUFFER = 1 << 20
RAW_WRITE_LOW = WRITE_LIMIT // 4
UPLOAD_BATCH = 16  # 64 KiB frames per transport.write() (1 MiB; still one frame each)
PUMP_BURST = 64  # writes before the upload pump yields to the loop
ECHO_FRAMES = 251  # distinct pre-built echo messages of random bytes, sent round-robin
MAX_HANDSHAKE_RESPONSE = 16 << 10
MAX_CONTROL = 125
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


class RawError(Exception):
    """The peer broke the protocol, closed, or sent something the bench did not ask for."""


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 5.2, 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + _LEN16.pack(n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + _LEN64.pack(n)
    return head + key + (apply_mask(payload, key) if payload else b"")


class RawConn(asyncio.BufferedProtocol):
    """One connection of the raw client: plain TCP (``ws=False``) or WebSocket after the
    handshake. Counts received payload bytes; ``check`` (if set) sees every payload segment
    (a memoryview into the read buffer, valid only during the call); ``after_read`` (if set)
    runs after each read; ``on_resume`` after the write buffer drained below its low mark.
    """

    def __init__(self, uri: WebSocketURI | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.ws = uri is not None
        self.key = os.urandom(4)
        self.buf = bytearray(RAW_READ_BUFFER)
        self.view = memoryview(self.buf)
        self.transport: asyncio.Transport | None = None
        self.handshake: ClientProtocol | None = None
        self.response = bytearray()
        if uri is not None:
            self.handshake = ClientProtocol(uri, subprotocols=[Subprotocol("binary")],
                                            extensions=None, max_size=None)
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.close_received: asyncio.Future[None] = self.loop.create_future()
        self.waiters: list[asyncio.Future[Any]] = [self.opened]
        self.error: str | None = None
        self.close_sent = False
        self.peer_close: tuple[int | None, str] | None = None
        # receive side
        self.payload = 0  # data payload bytes received
        self.messages = 0  # final data frames (WebSocket) or reads (TCP)
        self.pings = 0
        self.left = 0  # payload bytes of the current frame still to come
        self.opcode = -1  # of the current frame; -1: between frames
        self.fin = True
        self.in_message = False
        self.head = bytearray()  # a frame header split across reads
        self.control = bytearray()
        self.check: Callable[[memoryview], None] | None = None
        self.after_read: Callable[[], None] | None = None
        # send side
        self.paused = False
        self.on_resume: Callable[[], None] | None = None

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport.set_write_buffer_limits(high=WRITE_LIMIT, low=RAW_WRITE_LOW)
        if self.handshake is None:
            self.opened.set_result(None)
            return
        self.handshake.send_request(self.handshake.connect())
        for data in self.handshake.data_to_send():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)
        if self.peer_close is None and not self.close_sent:
            why = f": {exc}" if exc else ""
            self.fail(f"the peer closed the connection{why}")
        else:
            self.fail("connection closed")

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view  # each read is consumed before the next one starts

    def buffer_updated(self, nbytes: int) -> None:
        data = self.view[:nbytes]
        try:
            if self.handshake is not None:
                rest = self._handshake_data(data)
                if not rest:
                    return
                data = rest
            if self.ws:
                self._frames(data)
            else:
                self.payload += nbytes
                self.messages += 1
                if self.check is not None:
                    self.check(data)
        except RawError as exc:
            self.fail(str(exc))
            return
        if self.after_read is not None:
            self.after_read()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.on_resume is not None:
            self.on_resume()

    # -- handshake ------------------------------------------------------------------------------

    def _handshake_data(self, data: memoryview) -> memoryview | None:
        """Collect the HTTP response; once complete, return what came after it."""
        assert self.handshake is not None
        self.response += data
        end = self.response.find(b"\r\n\r\n")
        if end < 0:
            if len(self.response) > MAX_HANDSHAKE_RESPONSE:
                raise RawError("handshake response too long")
            return None
        head, rest = bytes(self.response[:end + 4]), bytes(self.response[end + 4:])
        hs, self.handshake, self.response = self.handshake, None, bytearray()
        hs.receive_data(head)
        if hs.state is not State.OPEN:
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            raise RawError(f"handshake failed: {hs.handshake_exc or status}")
        if not self.opened.done():
            self.opened.set_result(None)
        return memoryview(rest)

    # -- frames ---------------------------------------------------------------------------------

    def _frames(self, data: memoryview) -> None:
        """Walk server frames in ``data``: count data payloads, collect control frames."""
        i, n = 0, len(data)
        while i < n:
            if self.opcode < 0:  # at a frame header
                if self.head:  # complete the header begun in the previous read
                    while i < n:
                        need = self._header_size(self.head) or 2
                        if len(self.head) >= need:
                            break
                        take = min(need - len(self.head), n - i)
                        self.head += data[i:i + take]
                        i += take
                    need = self._header_size(self.head)
                    if not need or len(self.head) < need:
                        return  # all of data went into the header
                    self._start_frame(self.head, 0)
                    self.head.clear()
                else:
                    need = self._header_size(data, i, n)
                    if not need or n - i < need:
                        self.head += data[i:]
                        return
                    self._start_frame(data, i)
                    i += need
                if self.left == 0:
                    self._end_frame()
                continue
            take = self.left if self.left <= n - i else n - i
            if self.opcode <= OP_BINARY:
                self.payload += take
                if self.check is not None:
                    self.check(data[i:i + take])
            else:
                self.control += data[i:i + take]
            i += take
            self.left -= take
            if self.left == 0:
                self._end_frame()

    @staticmethod
    def _header_size(b: bytearray | memoryview, i: int = 0, n: int = -1) -> int:
        """Size of the header starting at ``b[i]`` (0: not even 2 bytes yet)."""
        if n < 0:
            n = len(b)
        if n - i < 2:
            return 0
        ln = b[i + 1] & 0x7F
        return 2 if ln < 126 else 4 if ln == 126 else 10

    def _start_frame(self, b: bytearray | memoryview, i: int) -> None:
        b0, b1 = b[i], b[i + 1]
        if b1 & 0x80:
            raise RawError("the server sent a masked frame (RFC 6455 5.1)")
        if b0 & 0x70:
            raise RawError(f"the server set RSV bits ({b0 & 0x70:#x}) with no extension")
        opcode, ln = b0 & 0x0F, b1 & 0x7F
        if ln == 126:
            ln = _LEN16.unpack_from(b, i + 2)[0]
        elif ln == 127:
            ln = _LEN64.unpack_from(b, i + 2)[0]
        fin = bool(b0 & 0x80)
        if opcode == OP_BINARY:
            if self.in_message:
                raise RawError("binary frame inside a fragmented message")
            self.in_message = not fin
        elif opcode == OP_CONT:
            if not self.in_message:
                raise RawError("continuation frame outside a message")
            self.in_message = not fin
        elif opcode in (OP_CLOSE, OP_PING, OP_PONG):
            if ln > MAX_CONTROL or not fin:
                raise RawError(f"bad control frame (opcode {opcode}, {ln} bytes)")
            self.control.clear()
        elif opcode == OP_TEXT:
            raise RawError("the server sent a text frame (subprotocol binary)")
        else:
            raise RawError(f"the server sent opcode {opcode:#x}")
        self.opcode, self.left, self.fin = opcode, ln, fin

    def _end_frame(self) -> None:
        opcode, self.opcode = self.opcode, -1
        if opcode <= OP_BINARY:
            if self.fin:
                self.messages += 1
        elif opcode == OP_CLOSE:
            body = bytes(self.control)
            code = _LEN16.unpack_from(body)[0] if len(body) >= 2 else None
            self.peer_close = (code, body[2:].decode("utf-8", "replace"))
            if not self.close_received.done():
                self.close_received.set_result(None)
            if not self.close_sent:  # the peer's idea, not a reply: the run fails
                self.send_close(code or 1000)  # answer it (RFC 6455 5.5.1)
                self.fail(f"the peer closed: code {code} {self.peer_close[1]!r}")
        elif opcode == OP_PING:
            self.pings += 1
            self.write(client_frame(OP_PONG, bytes(self.control), self.key))

    # -- sending, closing, failing --------------------------------------------------------------

    def frame(self, payload: bytes) -> bytes:
        """``payload`` as one binary message on this connection (TCP: as is)."""
        return client_frame(OP_BINARY, payload, self.key) if self.ws else payload

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_close(self, code: int = 1000) -> None:
        if self.ws and not self.close_sent:
            self.close_sent = True
            self.write(client_frame(OP_CLOSE, _LEN16.pack(code), self.key))

    def fail(self, why: str) -> None:
        """Record the first failure, wake every waiter with it, drop the connection."""
        if self.error is None:
            self.error = why
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(RawError(self.error))
        self.waiters.clear()
        self.on_resume = self.after_read = self.check = None
        if self.transport is not None:
            self.transport.abort()

    def _failed(self) -> None:
        if self.error is not None:
            raise RawError(self.error)

    async def wait(self, fut: asyncio.Future[Any]) -> Any:
        """``fut``'s result, or the connection's failure (whichever comes first)."""
        if fut.done():
            return fut.result()
        self._failed()
        self.waiters.append(fut)
        try:
            return await fut
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)

    async def sleep(self, seconds: float) -> None:
        """Let the callbacks run for ``seconds``; raise if the connection fails meanwhile."""
        fut: asyncio.Future[None] = self.loop.create_future()
        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        handle = self.loop.call_later(seconds, wake)
        try:
            await self.wait(fut)
        finally:
            handle.cancel()

    async def close(self) -> None:
        """Closing handshake, then close; bounded, never raises for the peer's close.

        Like ``websockets`` (RFC 6455 7.1.1): after the peer's close frame, wait (bounded)
        for the server to close the TCP connection before closing it here.
        """
        self.on_resume = self.after_read = self.check = None
        if self.transport is not None and self.ws and self.error is None:
            self.send_close(1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.wait({self.close_received, self.lost},
                                       return_when=asyncio.FIRST_COMPLETED)
                    await asyncio.shield(self.lost)
        if self.transport is not None:
            self.transport.close()  # flushes what is queued, then closes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.shield(self.lost)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @classmethod
    async def open(cls, target: dict[str, Any]) -> RawConn:
        """Connect to ``{"ws": url}`` (and finish the opening handshake) or ``{"tcp": …}``."""
        loop = asyncio.get_running_loop()
        uri: WebSocketURI | None = None
        if "ws" in target:
            uri = parse_uri(target["ws"])
            if uri.secure:
                raise ValueError("wss:// is not supported by the raw client")
            addr = (uri.host, uri.port)
        else:
            addr = tuple(target["tcp"])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(OPEN_TIMEOUT):
                await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        # From here on the transport owns the socket.
        _t, conn = await loop.create_connection(lambda: cls(uri), sock=sock)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                await conn.wait(conn.opened)
        except BaseException:
            conn.abort()
            raise
        return conn


class EchoPattern:
    """Pre-built echo messages and the check of what comes back.

    ``ECHO_FRAMES`` messages of ``size`` random bytes, sent round-robin; the replies'
    payload, whatever its framing, must be the same byte stream.
    """

    def __init__(self, conn: RawConn, size: int, window: int) -> None:
        self.size = size
        self.count = max(ECHO_FRAMES, window)
        stream = os.urandom(size * self.count)
        self.expect = memoryview(stream + stream)  # any window of len(stream) is contiguous
        self.period = len(stream)
        frames = b"".join(conn.frame(stream[j * size:(j + 1) * size])
                          for j in range(self.count))
        self.frame_len = len(frames) // self.count
        self.ring = memoryview(frames + frames)
        self.next = 0  # next message index, mod count
        self.checked = 0  # reply bytes checked

    def frames(self, n: int) -> memoryview:
        """The next ``n`` (≤ count) messages, as one slice of frames."""
        a = self.next * self.frame_len
        self.next = (self.next + n) % self.count
        return self.ring[a:a + n * self.frame_len]

    def check(self, data: memoryview) -> None:
        i, n = 0, len(data)
        while i < n:
            off = self.checked % self.period
            take = min(n - i, self.period)
            if data[i:i + take] != self.expect[off:off + take]:
                got, want = bytes(data[i:i + take]), bytes(self.expect[off:off + take])
                at = next(k for k in range(take) if got[k] != want[k])
                raise RawError(f"echo reply differs from what was sent at byte "
                               f"{self.checked + at} of the reply stream (message "
                               f"{(self.checked + at) // self.size}, byte "
                               f"{(self.checked + at) % self.size})")
            i += take
            self.checked += take


async def raw_probe(target: dict[str, Any]) -> dict[str, Any]:
    """One echo round trip of 16 bytes, checked."""
    t0 = time.monotonic()
    conn = await RawConn.open(target)
    try:
        pattern = EchoPattern(conn, 16, 1)
        conn.check = pattern.check
        conn.write(conn.frame(b"E"))
        conn.write(pattern.frames(1))
        while conn.payload < 16:
            await conn.sleep(0.001)
        await conn.close()
    finally:
        conn.abort()
    return {"ok": True, "ms": (time.monotonic() - t0) * 1e3}


async def raw_upload(target: dict[str, Any], seconds: float, size: int,
                     stats_addr: list[Any]) -> dict[str, Any]:
    """Like :func:`op_upload`: one pre-built frame, written until the deadline with the
    transport's backpressure (``UPLOAD_BATCH`` frames per write)."""
    before = await stats(stats_addr)
    conn = await RawConn.open(target)
    loop = conn.loop
    sent = 0
    try:
        batch = conn.frame(b"\x5a" * size) * UPLOAD_BATCH
        per_write = size * UPLOAD_BATCH
        conn.write(conn.frame(b"U"))
        done: asyncio.Future[None] = loop.create_future()
        cpu0, t0 = _cpu(), time.monotonic()
        deadline = t0 + seconds

        def finish() -> None:
            conn.on_resume = None
            if not done.done():
                done.set_result(None)

        def pump() -> None:
            nonlocal sent
            t = conn.transport
            for _ in range(PUMP_BURST):
                if done.done() or t is None or conn.paused or conn.error is not None:
                    return  # resume_writing() calls again (a failure wakes the waiter)
                if time.monotonic() >= deadline:
                    finish()
                    return
                t.write(batch)
                sent += per_write
            loop.call_soon(pump)

        conn.on_resume = pump
        handle = loop.call_at(loop.time() + seconds, finish)  # if paused at the deadline
        pump()
        try:
            await conn.wait(done)
        finally:
            handle.cancel()
        t1, cpu1 = time.monotonic(), _cpu()
        await conn.close()
    finally:
        conn.abort()
    return await _upload_result(stats_addr, before, sent, t0, t1, cpu0, cpu1)


async def raw_download(target: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Like :func:`op_download`: payload bytes counted in place, frame headers checked."""
    conn = await RawConn.open(target)
    try:
        conn.write(conn.frame(b"D"))
        cpu0, t0 = _cpu(), time.monotonic()
        got0, msgs0 = conn.payload, conn.messages
        await conn.sleep(seconds)
        now, cpu1 = time.monotonic(), _cpu()
        got, msgs = conn.payload - got0, conn.messages - msgs0
        pings = conn.pings
        await conn.close()
    finally:
        conn.abort()
    elapsed = now - t0
    return {
        "bytes": got,
        "messages": msgs,  # WebSocket messages; for raw TCP, reads of up to 1 MiB
        "seconds": elapsed,
        "mb_per_s": got / elapsed / 1e6 if elapsed > 0 else None,
        **_busy(cpu0, cpu1, elapsed),
        "pings": pings,
    }


async def raw_echo(target: dict[str, Any], seconds: float, size: int,
                   window: int) -> dict[str, Any]:
    """Like :func:`op_echo`, with every reply byte compared with what was sent."""
    conn = await RawConn.open(target)
    try:
        pattern = EchoPattern(conn, size, window)
        replies = 0

        def more() -> None:
            nonlocal replies
            new = conn.payload // size - replies
            if new > window:  # more replies than messages in flight
                conn.fail(f"{new} replies to {window} messages in flight")
            elif new > 0:
                replies += new
                conn.write(pattern.frames(new))

        conn.check = pattern.check
        conn.after_read = more
        conn.write(conn.frame(b"E"))
        conn.write(pattern.frames(window))
        cpu0, t0 = _cpu(), time.monotonic()
        await conn.sleep(seconds)
        now, cpu1 = time.monotonic(), _cpu()
        conn.after_read = None
        done = replies
        checked = pattern.checked
        await conn.close()
    finally:
        conn.abort()
    elapsed = now - t0
    return {
        "messages": done,
        "seconds": elapsed,
        "msgs_per_s": done / elapsed if elapsed > 0 else None,
        **_busy(cpu0, cpu1, elapsed),
        "bytes_checked": checked,
    }


class Worker:
    """The operations, and the idle connections kept between ``idle_open`` and ``idle_close``."""

    def __init__(self) -> None:
        self.idle: list[WsChannel | TcpChannel] = []

    async def op_idle_open(self, target: dict[str, Any], count: int, timeout: float,
                           concurrency: int, stats_addr: list[Any]) -> dict[str, Any]:
        """Open up to ``count`` connections within ``timeout`` seconds and keep them idle."""
        await self.op_idle_close()
        base = await stats(stats_addr)
        failures: dict[str, int] = {}
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                try:
                    self.idle.append(await open_channel(target))
                except Exception as exc:  # counted, reported; the others go on
                    key = type(exc).__name__
                    failures[key] = failures.get(key, 0) + 1

        t0 = time.monotonic()
        timed_out = False
        try:
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
                for _ in range(count):
                    tg.create_task(one())
        except TimeoutError:
            timed_out = True
        opened = len(self.idle)
        open_seconds = time.monotonic() - t0
        # The bridge may connect to the target after the handshake, or fail after it (and
        # close): wait, bounded, until the target sees as many connections as are still
        # open here, or its count stands still for a second.
        deadline = time.monotonic() + IDLE_TARGET_WAIT
        now = await stats(stats_addr)
        changed = time.monotonic()
        while time.monotonic() < deadline:
            alive = sum(1 for c in self.idle if c.is_open())
            if now["open"] - base["open"] >= alive or time.monotonic() - changed >= 1.0:
                break
            await asyncio.sleep(0.05)
            prev, now = now, await stats(stats_addr)
            if now["open"] != prev["open"]:
                changed = time.monotonic()
        return {"opened": opened, "alive": sum(1 for c in self.idle if c.is_open()),
                "target_conns": now["open"] - base["open"], "seconds": open_seconds,
                "timed_out": timed_out, "failures": failures}

    async def op_idle_close(self) -> dict[str, Any]:
        """Close the idle connections (closing handshakes in parallel, bounded)."""
        conns, self.idle = self.idle, []
        if not conns:
            return {"closed": 0}
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 2):
                await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        except TimeoutError:
            pass
        for c in conns:
            c.abort()
        return {"closed": len(conns), "seconds": time.monotonic() - t0}


CLIENTS: dict[str, dict[str, Callable[..., Awaitable[dict[str, Any]]]]] = {
    "raw": {"probe": raw_probe, "upload": raw_upload, "download": raw_download,
            "echo": raw_echo},
    "websockets": {"probe": op_probe, "upload": op_upload, "download": op_download,
                   "echo": op_echo},
}


async def serve(client: str) -> None:
    """Answer commands from stdin until ``quit`` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    ops: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        **CLIENTS[client],
        "idle_open": worker.op_idle_open, "idle_close": worker.op_idle_close,
    }
    print(json.dumps({"ready": True, "client": client}), flush=True)
    try:
        while line := await reader.readline():
            req = json.loads(line)
            op = req.pop("op")
            if op == "quit":
                break
            bound = float(req.pop("bound", DEFAULT_BOUND))
            try:
                async with asyncio.timeout(bound):
                    res = await ops[op](**req)
            except TimeoutError:
                res = {"error": f"{op} did not finish in {bound:g} s"}
            except Exception as exc:  # reported to the bench, which goes on
                res = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(res), flush=True)
    finally:
        await worker.op_idle_close()


def main() -> None:
    """Pick the client, raise the fd limit (1,000 idle connections and more), run under
    uvloop."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--client", choices=sorted(CLIENTS), default="raw",
                    help="implementation of probe, upload, download and echo "
                         "(default: %(default)s); idle connections always use websockets")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.client))


if __name__ == "__main__":
    main()
