"""Guest service of the fault soak: a byte service run inside a sandbox's namespace.

Started by ``bench/soakf_lib.py`` (``nsexec <netns> -- python soakf_guest.py --port P``).
A client opens a connection and sends one header line, ``MODE ID\\n``; the service then
behaves as MODE says:

    stream  both ways: it sends :data:`PATTERN` bytes at a steady pace and checks the
            client's bytes against the same pattern; the client's EOF ends it (the service
            shuts its side down after that, so every byte it sent can be counted)
    stall   it never reads again and sends nothing (a guest that stops reading); it only
            watches, through TCP_INFO, when the other side closes or resets
    flood   it sends as fast as the connection takes (for a client that stops reading) and
            reads whatever comes
    probe   it answers ``ok\\n`` and then behaves like ``stream``

For every connection that ends it prints one JSON line on stdout: ``id``, ``mode``,
``sent`` and ``recv`` (bytes), ``end`` (``eof``, ``rst``, ``fin-seen``, ``error: ...``),
``bad`` (bytes that did not match the pattern) and ``t`` (Unix time of the end). It prints
``ready`` once it listens. Bench code, not product.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import sys
import time

PERIOD = 65521  # prime: a shifted copy of the pattern never lines up by chance
PATTERN = bytes((i * 131 + (i >> 8) * 7 + 17) & 0xFF for i in range(PERIOD))
DOUBLE = PATTERN + PATTERN
HEADER_MAX = 128
TCP_INFO_STATE = 0  # first byte of struct tcp_info: tcpi_state
TCP_CLOSE_WAIT = 8  # the peer sent FIN
TCP_CLOSE = 7
FLOOD_CHUNK = 65536


def chunk(offset: int, size: int) -> bytes:
    """``size`` pattern bytes starting at stream offset ``offset`` (size <= PERIOD)."""
    start = offset % PERIOD
    return DOUBLE[start:start + size]


def mismatches(offset: int, data: bytes) -> int:
    """How many bytes of ``data`` (at stream ``offset``) differ from the pattern; 0 or len."""
    pos = 0
    bad = 0
    while pos < len(data):
        n = min(len(data) - pos, PERIOD)
        if data[pos:pos + n] != chunk(offset + pos, n):
            bad += n
        pos += n
    return bad


class Conn:
    """Counters of one connection."""

    def __init__(self) -> None:
        self.id = "?"
        self.mode = "?"
        self.sent = 0
        self.recv = 0
        self.bad = 0
        self.end = ""

    def report(self) -> None:
        print(json.dumps({"id": self.id, "mode": self.mode, "sent": self.sent,
                          "recv": self.recv, "bad": self.bad, "end": self.end,
                          "t": time.time()}), flush=True)


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (TCP_INFO's first byte)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(struct.unpack_from("B", info, TCP_INFO_STATE)[0])


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                chunk_size: int, interval: float) -> None:
    """One connection: header, then the mode's behaviour; one report at the end."""
    conn = Conn()
    try:
        line = await reader.readuntil(b"\n")
        parts = line[:HEADER_MAX].decode(errors="replace").split()
        conn.mode, conn.id = [*parts, "?", "?"][:2]
        if conn.mode == "probe":
            writer.write(b"ok\n")
        if conn.mode in ("stream", "probe"):
            await stream(reader, writer, conn, chunk_size, interval)
        elif conn.mode == "stall":
            await stall(writer, conn)
        elif conn.mode == "flood":
            await flood(reader, writer, conn)
        else:
            conn.end = "error: unknown mode"
    except (ConnectionResetError, BrokenPipeError) as exc:
        conn.end = conn.end or ("rst" if isinstance(exc, ConnectionResetError) else "epipe")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        conn.end = conn.end or "eof"
    except OSError as exc:
        conn.end = conn.end or f"error: {exc}"
    finally:
        conn.report()
        if conn.end == "eof":
            writer.close()
        else:
            writer.transport.abort()


async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn,
                 chunk_size: int, interval: float) -> None:
    """Pattern both ways at ``chunk_size`` per ``interval`` downwards; ends at the client's
    EOF (then FIN back) or at a reset."""
    done = asyncio.Event()

    async def send() -> None:
        while not done.is_set():
            writer.write(chunk(conn.sent, chunk_size))
            conn.sent += chunk_size
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval)

    sender = asyncio.ensure_future(send())
    try:
        while data := await reader.read(65536):
            conn.bad += mismatches(conn.recv, data)
            conn.recv += len(data)
            if sender.done():
                break
        conn.end = "eof"
    finally:
        done.set()
        with contextlib.suppress(Exception):
            await sender
        if sender.done() and not sender.cancelled() and sender.exception() is not None:
            raise sender.exception()  # type: ignore[misc]
    if conn.end == "eof":
        with contextlib.suppress(OSError):
            writer.write_eof()
            await writer.drain()


async def stall(writer: asyncio.StreamWriter, conn: Conn) -> None:
    """Read nothing, send nothing; end when the kernel says the other side closed."""
    sock = writer.get_extra_info("socket")
    while True:
        await asyncio.sleep(0.1)
        state = tcp_state(sock)
        if state == TCP_CLOSE_WAIT:
            conn.end = "fin-seen"
            return
        if state == TCP_CLOSE:
            conn.end = "rst"
            return


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                conn: Conn) -> None:
    """Send as fast as the connection takes; read and drop whatever comes."""
    async def drain_input() -> None:
        while data := await reader.read(65536):
            conn.recv += len(data)
        conn.end = conn.end or "eof"

    reading = asyncio.ensure_future(drain_input())
    try:
        while not reading.done():
            writer.write(chunk(conn.sent, FLOOD_CHUNK))
            conn.sent += FLOOD_CHUNK
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


async def main_async(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, args.chunk, args.interval), "0.0.0.0", args.port,
        backlog=4096, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await asyncio.sleep(args.lifetime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunk", type=int, default=2048, help="bytes per paced send")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between sends")
    ap.add_argument("--lifetime", type=float, default=3600.0,
                    help="exit after this many seconds (a leftover does not run forever)")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
