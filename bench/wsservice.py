"""Target service of the WebSocket-bridge bench: sink, source, echo and stats on one TCP port.

Started by ``bench/ws.py`` on 127.0.0.1 (ephemeral port, announced as ``ready <port>`` on
stdout). Every bridge under test forwards to this one port; the first byte a client sends
picks what the connection does:

    U  sink: count every further byte (upload), keep the time of the last one
    D  source: send 256 KiB chunks as fast as the peer takes them (download)
    E  echo: send every further byte back
    S  stats: write one JSON line (sink totals, open connections) and close
    G  ("GET /"): the service speaks WebSocket itself (RFC 6455 server side, no bridge); the
       first message's first byte picks U, D or E as above. This is the ``ws-direct``
       calibration: the bench's WebSocket client with nothing in between, i.e. its ceiling.

A connection that sends nothing stays open and idle (the idle-connection test). One process,
uvloop, a :class:`asyncio.BufferedProtocol` reading into one shared buffer (no allocation per
read for the sink), so the service costs far less CPU than any bridge in front of it. In
WebSocket mode the source sends pre-built frames and the sink only walks frame headers (it
never unmasks); only the echo unmasks (``websockets.speedups.apply_mask``).

``sink_last_rx`` is ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process
of the machine), so the client can end its upload measurement at the last byte that arrived.

Bench code, not product: the WebSocket server side trusts its one client (the bench's own)
beyond the caps on the handshake size and on one echoed message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import re
import resource
import signal
import struct
import time
from typing import cast

import uvloop
from websockets.speedups import apply_mask

READ_BUFFER = 1 << 20
WS_FRAME_PAYLOAD = 64 << 10
SOURCE_CHUNK = b"\xa5" * (256 << 10)
# RFC 6455 5.2: FIN + opcode 2 (binary), 127 = 64-bit extended payload length, no mask.
_WS_BINARY_64 = struct.Struct("!BBQ")
WS_SOURCE_CHUNK = (_WS_BINARY_64.pack(0x82, 127, WS_FRAME_PAYLOAD)
                   + b"\xa5" * WS_FRAME_PAYLOAD) * 4
WS_CLOSE = b"\x88\x02\x03\xe8"  # close frame, status 1000
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE = 16 << 10
MAX_ECHO_MESSAGE = 1 << 20
WRITE_HIGH_WATER = 1 << 20
BACKLOG = 4096
MODE_SINK, MODE_SOURCE, MODE_ECHO, MODE_STATS, MODE_WS = (ord(c) for c in "UDESG")
OP_CONT, OP_BINARY, OP_CLOSE = 0x0, 0x2, 0x8
_KEY = re.compile(rb"^sec-websocket-key:\s*(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


class Counters:
    """What the stats mode reports."""

    def __init__(self) -> None:
        self.sink_bytes = 0
        self.sink_open = 0
        self.sink_last_rx = 0.0
        self.source_bytes = 0
        self.open = 0
        self.accepted = 0

    def as_json(self) -> bytes:
        """One JSON line."""
        return (json.dumps(self.__dict__) + "\n").encode()


def ws_header(length: int) -> bytes:
    """Header of an unmasked binary frame of ``length`` bytes (RFC 6455 5.2)."""
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return struct.pack("!BBH", 0x82, 126, length)
    return _WS_BINARY_64.pack(0x82, 127, length)


class WsFrames:
    """Incremental parser of the client's (masked) frames: header bytes, then payload.

    Payloads are collected (and unmasked) only while ``collect`` is set; otherwise they are
    counted and skipped, so the sink costs one header parse per frame.
    """

    def __init__(self) -> None:
        self.hdr = bytearray()
        self.left = -1  # payload bytes still to come; -1: in a header
        self.opcode = 0
        self.mask = b""
        self.collect = True
        self.payload = bytearray()

    def _header_length(self) -> int:
        if len(self.hdr) < 2:
            return 2
        b1 = self.hdr[1]
        ext = {126: 2, 127: 8}.get(b1 & 0x7F, 0)
        return 2 + ext + (4 if b1 & 0x80 else 0)

    def feed(self, data: memoryview) -> tuple[int, list[tuple[int, bytes]]]:
        """Consume ``data``: (payload bytes skipped uncollected, finished collected frames)."""
        skipped, frames = 0, []
        i, n = 0, len(data)
        while i < n:
            if self.left < 0:
                need = self._header_length()
                take = min(need - len(self.hdr), n - i)
                self.hdr += data[i:i + take]
                i += take
                if len(self.hdr) < need or need != self._header_length():
                    continue
                self._start_payload()
                if self.left > 0:
                    continue
            else:
                take = min(self.left, n - i)
                if self.collect or self.opcode == OP_CLOSE:
                    if len(self.payload) + take > MAX_ECHO_MESSAGE:
                        raise ValueError("message too long for the echo")
                    self.payload += data[i:i + take]
                else:
                    skipped += take
                i += take
                self.left -= take
                if self.left > 0:
                    continue
            if self.collect or self.opcode == OP_CLOSE:
                body = bytes(self.payload)
                frames.append((self.opcode, apply_mask(body, self.mask) if self.mask else body))
            self.payload.clear()
            self.left = -1
        return skipped, frames

    def _start_payload(self) -> None:
        b0, b1 = self.hdr[0], self.hdr[1]
        self.opcode = b0 & 0x0F
        length, pos = b1 & 0x7F, 2
        if length == 126:
            length, pos = struct.unpack_from("!H", self.hdr, 2)[0], 4
        elif length == 127:
            length, pos = struct.unpack_from("!Q", self.hdr, 2)[0], 10
        self.mask = bytes(self.hdr[pos:pos + 4]) if b1 & 0x80 else b""
        self.left = length
        self.hdr.clear()
        if self.opcode == OP_CLOSE:
            self.payload.clear()


class Conn(asyncio.BufferedProtocol):
    """One accepted connection; its mode comes from its first byte (or first message)."""

    def __init__(self, counters: Counters, buf: memoryview) -> None:
        self.c = counters
        self.buf = buf
        self.mode: int | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.ws: WsFrames | None = None  # set once the WebSocket handshake is done
        self.request = bytearray()  # the WebSocket handshake request, until complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.c.open += 1
        self.c.accepted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.c.open -= 1
        if self.mode == MODE_SINK:
            self.c.sink_open -= 1
        self.mode = None
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf  # shared: each read is consumed before the next one starts

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buf[:nbytes]
        if self.ws is not None:
            self._ws_frames(data)
            return
        if self.mode is None:
            self.mode, data = data[0], data[1:]
            if self.mode == MODE_WS:
                self.request += b"G"
            else:
                self._start_mode()
        if self.transport is None or not data:
            return
        if self.mode == MODE_WS:
            self._ws_handshake(data)
        elif self.mode == MODE_SINK:
            self.c.sink_bytes += len(data)
            self.c.sink_last_rx = time.monotonic()
        elif self.mode == MODE_ECHO:
            self.transport.write(bytes(data))
        # source and stats ignore what they receive

    # -- plain modes ------------------------------------------------------------------------

    def _start_mode(self) -> None:
        assert self.transport is not None
        if self.mode == MODE_SINK:
            self.c.sink_open += 1
        elif self.mode == MODE_SOURCE:
            self._fill()
        elif self.mode == MODE_STATS:
            self.transport.write(self.c.as_json())
            self.transport.close()
        elif self.mode != MODE_ECHO:
            self.transport.abort()

    def _fill(self) -> None:
        # write() calls pause_writing() synchronously once the buffer passes the high water
        # mark, and a transport that failed is closing: the loop is bounded either way.
        t = self.transport
        chunk = WS_SOURCE_CHUNK if self.ws is not None else SOURCE_CHUNK
        while t is not None and not t.is_closing() and not self.paused \
                and self.mode == MODE_SOURCE:
            t.write(chunk)
            self.c.source_bytes += len(chunk)

    def pause_writing(self) -> None:
        self.paused = True
        if self.mode == MODE_ECHO and self.transport is not None:
            self.transport.pause_reading()  # the echo peer is not reading: stop taking more

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == MODE_ECHO and self.transport is not None:
            self.transport.resume_reading()
        elif self.mode == MODE_SOURCE:
            self._fill()

    def eof_received(self) -> bool:
        return False  # close our side too

    # -- WebSocket mode (ws-direct) ---------------------------------------------------------

    def _ws_handshake(self, data: memoryview) -> None:
        assert self.transport is not None
        self.request += data
        end = self.request.find(b"\r\n\r\n")
        if end < 0:
            if len(self.request) > MAX_HANDSHAKE:
                self.transport.abort()
            return
        rest = bytes(self.request[end + 4:])
        self._ws_accept(bytes(self.request[:end + 2]))
        if rest and self.ws is not None:
            self._ws_frames(memoryview(rest))

    def _ws_accept(self, request: bytes) -> None:
        """RFC 6455 4.2.2: 101 with Sec-WebSocket-Accept; the subprotocol is "binary"."""
        assert self.transport is not None
        m = _KEY.search(request)
        if m is None:
            self.transport.abort()
            return
        digest = hashlib.sha1(m.group(1) + WS_GUID, usedforsecurity=False).digest()
        accept = base64.b64encode(digest)
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                             + b"\r\nSec-WebSocket-Protocol: binary\r\n\r\n")
        self.ws = WsFrames()
        self.mode = None  # the first message picks it
        self.request = bytearray()

    def _ws_frames(self, data: memoryview) -> None:
        assert self.transport is not None
        assert self.ws is not None
        try:
            skipped, frames = self.ws.feed(data)
        except ValueError:
            self.transport.abort()
            return
        if skipped:
            self.c.sink_bytes += skipped
            self.c.sink_last_rx = time.monotonic()
        for opcode, payload in frames:
            if self.transport is None or self.transport.is_closing():
                return
            if opcode == OP_CLOSE:
                self.transport.write(WS_CLOSE)
                self.transport.close()
            elif opcode not in (OP_BINARY, OP_CONT):
                continue  # ping/pong/text: the bench's client sends none
            elif self.mode is None and payload:
                self.mode = payload[0]
                self.ws.collect = self.mode == MODE_ECHO
                self._start_mode()
                if self.mode == MODE_SINK:
                    # Frames after the first message in the same read were collected (the
                    # mode was not known yet): count them below, and the part of the frame
                    # in progress here; from now on the parser only skips and counts.
                    sunk = len(payload) - 1
                    if self.ws.left >= 0 and self.ws.opcode in (OP_BINARY, OP_CONT):
                        sunk += len(self.ws.payload)
                        self.ws.payload.clear()
                    if sunk:
                        self.c.sink_bytes += sunk
                        self.c.sink_last_rx = time.monotonic()
            elif self.mode == MODE_SINK:
                self.c.sink_bytes += len(payload)
                self.c.sink_last_rx = time.monotonic()
            elif self.mode == MODE_ECHO:
                self.transport.write(ws_header(len(payload)) + payload)


async def serve(host: str, port: int, lifetime: float) -> None:
    """Serve until SIGTERM/SIGINT or ``lifetime`` seconds (a leftover does not run forever)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters = Counters()
    buf = memoryview(bytearray(READ_BUFFER))
    server = await loop.create_server(lambda: Conn(counters, buf), host, port,
                                      backlog=BACKLOG, reuse_address=True)
    async with server:
        bound = server.sockets[0].getsockname()[1]
        print(f"ready {bound}", flush=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(lifetime):
                await stop.wait()
    print(counters.as_json().decode(), end="", flush=True)


def main() -> None:
    """Parse arguments, raise the fd limit (1,000 idle connections), serve under uvloop."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: ephemeral (default)")
    ap.add_argument("--lifetime", type=float, default=3600.0,
                    help="exit after this many seconds (default: %(default)s)")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.host, args.port, args.lifetime))


if __name__ == "__main__":
    main()
