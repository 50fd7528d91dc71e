"""QEMU's ``-netdev stream`` transport: Ethernet frames on a Unix stream socket.

Each frame is preceded by its length as a 4-byte big-endian number (no FCS, no vnet
header). QEMU connects as the client (``server=off``), so usernet listens first::

    -netdev stream,id=n0,server=off,addr.type=unix,addr.path=<socket>

Frames are batched both ways: every read hands all the complete frames in it to the
stack at once, and the stack's replies go out in one write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path

from sandport.usernet.tap import Handler

log = logging.getLogger(__name__)

MAX_FRAME = 65536 + 14
LENGTH = 4


class StreamTransport(asyncio.Protocol):
    """One QEMU connection: length-prefixed frames in, replies out."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        log.info("usernet: QEMU connected")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        frames: list[bytes] = []
        while len(self._buf) >= LENGTH:
            size = int.from_bytes(self._buf[:LENGTH], "big")
            if size == 0 or size > MAX_FRAME:  # the peer is not speaking this framing
                self.errors["bad_length"] += 1
                if self.transport is not None:
                    self.transport.close()
                return
            if len(self._buf) < LENGTH + size:
                break
            frames.append(bytes(self._buf[LENGTH:LENGTH + size]))
            del self._buf[:LENGTH + size]
        if not frames:
            return
        self.frames_in += len(frames)
        try:
            replies = self._handler(frames)
        except Exception:  # the stack must never die of one batch
            log.exception("usernet: handler failed on a batch of %d frames", len(frames))
            self.errors["handler"] += 1
            return
        self.send(replies)

    def send(self, frames: list[bytes]) -> None:
        """Write frames to QEMU (dropped while no QEMU is connected, as on a cable)."""
        if not frames:
            return
        if self.transport is None or self.transport.is_closing():
            self.errors["tx_no_peer"] += len(frames)
            return
        self.transport.write(b"".join(len(f).to_bytes(LENGTH, "big") + f for f in frames))
        self.frames_out += len(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def listen_stream(path: Path, transport: StreamTransport) -> asyncio.Server:
    """Listen on ``path`` for QEMU's connection, served by ``transport`` (one peer)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # noqa: ASYNC240 - a local socket file, instant
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: transport, str(path))
