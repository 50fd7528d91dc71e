"""The front door's other half: requests that are not the bridge's go to the HTTP app.

:class:`HttpPassthrough` relays a client connection to the app's Unix socket, byte for
byte in both directions with backpressure, except that every request head on the way is
marked with the real client by :class:`RequestRewriter`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import cast

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # request head (request line and headers) limit
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
_FORWARDED = (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded")


class RequestRewriter:
    """Marks every request head of a passed-through connection with the real client.

    Request heads are found by their framing: a head, then ``Content-Length`` bytes of
    body. Incoming ``X-Forwarded-*``/``Forwarded`` headers are dropped unless the peer is a
    trusted proxy, then ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are added. A chunked
    body or an upgrade ends the parsing: from there the bytes pass unchanged.
    """

    def __init__(self, client_ip: str, scheme: str, *, trusted: bool) -> None:
        self.client_ip = client_ip
        self.scheme = scheme
        self.trusted = trusted
        self._head = b""
        self._body_left = 0
        self._raw = False

    def feed(self, data: bytes) -> bytes:
        """Bytes to send upstream for ``data`` from the client."""
        out: list[bytes] = []
        while data:
            if self._raw:
                out.append(data)
                break
            if self._body_left:
                n = min(len(data), self._body_left)
                out.append(data[:n])
                data, self._body_left = data[n:], self._body_left - n
                continue
            buf = self._head + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:  # the app answers 431; stop parsing
                    self._raw = True
                    out.append(buf)
                    self._head = b""
                else:
                    self._head = buf
                break
            self._head, data = b"", buf[end + 4:]
            out.append(self._rewrite(buf[:end]))
        return b"".join(out)

    def _rewrite(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        kept = [lines[0]]
        forwarded_for = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key in _FORWARDED:  # replaced by ours; a trusted proxy's client list is kept
                if self.trusted and key == b"x-forwarded-for":
                    forwarded_for = value.strip() + b", "
                continue
            if key == b"content-length" and value.strip().isdigit():
                self._body_left = int(value.strip())
            elif key in {b"transfer-encoding", b"upgrade"}:
                self._raw = True
            kept.append(line)
        kept.append(b"X-Forwarded-For: " + forwarded_for + self.client_ip.encode())
        kept.append(b"X-Forwarded-Proto: " + self.scheme.encode())
        return b"\r\n".join(kept) + b"\r\n\r\n"


class _Upstream(asyncio.Protocol):
    """The HTTP app's side of a passed-through connection."""

    def __init__(self, relay: HttpPassthrough) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        self.relay.client.write(data)

    def eof_received(self) -> bool:
        self.relay.client.close()  # after what is buffered
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.client.close()

    def pause_writing(self) -> None:
        self.relay.client.pause_reading()

    def resume_writing(self) -> None:
        self.relay.client.resume_reading()


class HttpPassthrough(asyncio.Protocol):
    """A client connection relayed to the HTTP app's Unix socket."""

    def __init__(self, cid: str, client: asyncio.Transport, app_socket: str,
                 rewriter: RequestRewriter) -> None:
        self.cid = cid
        self.client = client
        self.app_socket = app_socket
        self.rewriter = rewriter
        self.upstream = _Upstream(self)

    async def start(self, first: bytes) -> None:
        """Connect the app, send what the client sent so far, then relay."""
        self.client.pause_reading()
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: self.upstream, self.app_socket)
        except OSError as exc:
            log.error("%s: the HTTP app at %s is unreachable: %s", self.cid, self.app_socket,
                      exc)
            body = json.dumps({"error": "app_unreachable",
                               "message": "the gateway's HTTP app does not answer"}).encode()
            self.client.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
                              b"Connection: close\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.client.close()
            return
        assert self.upstream.transport is not None
        if self.client.is_closing():
            self.upstream.transport.close()
            return
        self.upstream.transport.write(self.rewriter.feed(first))
        self.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        up = self.upstream.transport
        if up is not None:
            up.write(self.rewriter.feed(data))

    def eof_received(self) -> bool:
        up = self.upstream.transport
        if up is not None and up.can_write_eof():
            up.write_eof()
            return True  # keep the client open for the response
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.close()

    def pause_writing(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.resume_reading()
