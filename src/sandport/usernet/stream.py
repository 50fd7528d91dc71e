"""QEMU's ``-netdev stream`` and ``-netdev dgram`` transports: Ethernet frames on Unix
sockets (the dgram one: :class:`DgramTransport`, one frame per datagram).

Each frame is preceded by its length as a 4-byte big-endian number (no FCS, no vnet
header). QEMU connects as the client (``server=off``), so usernet listens first::

    -netdev stream,id=n0,server=off,addr.type=unix,addr.path=<socket>

Frames are batched both ways: every read hands all the complete frames in it to the
stack at once, and the stack's replies go out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from sandport.usernet.transport import MAX_FRAME, FrameTransport, Handler

log = logging.getLogger(__name__)

LENGTH = 4


class StreamTransport(FrameTransport, asyncio.Protocol):
    """One QEMU connection: length-prefixed frames in, replies out."""

    def __init__(self, handler: Handler | None = None) -> None:
        super().__init__(handler)
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
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
        self.deliver(frames)

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


class DgramTransport(FrameTransport, asyncio.DatagramProtocol):
    """QEMU's ``-netdev dgram`` over Unix datagram sockets: one frame per datagram.

    usernet binds ``ours`` and sends to QEMU's socket ``theirs``::

        -netdev dgram,id=n0,local.type=unix,local.path=<theirs>,
                remote.type=unix,remote.path=<ours>
    """

    def __init__(self, theirs: Path, handler: Handler | None = None) -> None:
        super().__init__(handler)
        self.theirs = str(theirs)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not data or len(data) > MAX_FRAME:
            self.errors["bad_length"] += 1
            return
        self.deliver([data])

    def error_received(self, exc: Exception) -> None:
        self.errors[f"tx_{type(exc).__name__}"] += 1  # QEMU not (yet) there: a lost frame

    def send(self, frames: list[bytes]) -> None:
        """One datagram per frame to QEMU's socket."""
        if self.transport is None:
            self.errors["tx_no_socket"] += len(frames)
            return
        for frame in frames:
            self.transport.sendto(frame, self.theirs)
            self.frames_out += 1


async def bind_dgram(ours: Path, transport: DgramTransport) -> None:
    """Bind ``ours`` (QEMU's ``remote.path``) for ``transport``."""
    with contextlib.suppress(FileNotFoundError):
        ours.unlink()  # noqa: ASYNC240 - a local socket file, instant
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # uvloop takes no path here
    try:
        sock.bind(str(ours))
        sock.setblocking(False)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: transport, sock=sock)
    except BaseException:
        sock.close()
        raise
