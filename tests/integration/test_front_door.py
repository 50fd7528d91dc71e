"""The gateway's front door checks every WebSocket upgrade, wherever it comes on a connection.

A browser opens a fresh connection for each WebSocket, but nothing forces a client to:
an upgrade may come as the second request of a keep-alive connection, pipelined behind
a GET, or after a chunked POST. Each must meet the same Origin, token and limit checks
as a first request, and a refused one must never reach the guest. Real gateways, real
sandboxes with an echo server on port 7 that logs every connection, raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from nethelpers import ECHO_SERVER, guest_server
from sandport.control.gateway import Gateway

pytestmark = pytest.mark.integration

GET = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


def upgrade(path: str, *, origin: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gw", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: binary"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Conn:
    """A raw client connection that reads whole HTTP responses."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body (by its length)."""
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed mid-head: {self.buf!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            assert self._fill(), "connection closed mid-body"
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed(self) -> bool:
        """True when the peer closes the connection (nothing more arrives)."""
        return not self.buf and not self._fill()

    def close(self) -> None:
        self.sock.close()


def masked_binary(payload: bytes) -> bytes:
    """One client frame (RFC 6455 section 5.2): FIN, binary, masked, payload < 126 bytes."""
    mask = os.urandom(4)
    return bytes([0x82, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


def tcp_connections(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("tcp "))


def refusal(conn: Conn) -> tuple[int, str]:
    status, headers, body = conn.response()
    assert headers["content-type"] == "application/json", headers
    return status, json.loads(body)["error"]


def test_a_later_upgrade_on_a_keep_alive_connection_meets_every_check(
        gateway_factory: Any, loop_thread: Any, tmp_path: Path) -> None:
    gw: Gateway = gateway_factory(origins=("https://app.example",))
    a = loop_thread.run(gw.create_sandbox())
    b = loop_thread.run(gw.create_sandbox())
    path = f"/s/{a.id}/ports/7/ws?token={a.token}"
    log = tmp_path / "echo.log"
    with guest_server(f"sp-{a.id}", ECHO_SERVER, str(log)):
        cases = [
            ("foreign Origin, after a GET", GET + b"",
             upgrade(path, origin="https://evil.example"), (403, "origin_not_allowed")),
            ("another sandbox's token, after a GET", GET,
             upgrade(f"/s/{a.id}/ports/7/ws?token={b.token}"), (403, "invalid_token")),
            ("a path the app would decode to the bridge's", GET,
             upgrade(f"/s/{a.id}/ports/7/w%73?token={b.token}"), (403, "invalid_token")),
            ("not a bridge path at all", GET, upgrade("/api/sandboxes"), (404, "not_found")),
        ]
        for name, first, second, want in cases:
            conn = Conn(gw.http_port)
            conn.send(first)
            assert conn.response()[0] == 200, name  # the app answered; keep-alive
            conn.send(second)
            assert refusal(conn) == want, name
            assert conn.closed(), name
            conn.close()
        # Pipelined in one write, and behind a chunked POST: the answers come in order.
        conn = Conn(gw.http_port)
        conn.send(GET + b"POST /healthz HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked"
                  b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + upgrade(path, origin="https://evil.example"))
        assert conn.response()[0] == 200
        assert conn.response()[0] == 405  # the app's own answer to a POST
        assert refusal(conn) == (403, "origin_not_allowed")
        conn.close()
        assert tcp_connections(log) == 0  # no refused upgrade reached the guest
        # An allowed Origin with the right token opens, as the second request too.
        conn = Conn(gw.http_port)
        conn.send(GET)
        assert conn.response()[0] == 200
        conn.send(upgrade(path, origin="https://app.example"))
        status, headers, _ = conn.response()
        assert (status, headers["sec-websocket-protocol"]) == (101, "binary")
        conn.send(masked_binary(b"hello"))
        while len(conn.buf) < 7:
            assert conn._fill()
        assert conn.buf[:7] == b"\x82\x05hello"  # one binary message back from the guest
        conn.close()
        assert tcp_connections(log) == 1
    routes = gw.bridge_stats.routes  # type: ignore[union-attr]
    assert routes[(a.id, "7")].sessions_total == 1


def test_a_later_upgrade_counts_against_the_per_client_limit(
        gateway_factory: Any, loop_thread: Any, tmp_path: Path) -> None:
    gw: Gateway = gateway_factory(ws_max_per_client=1)
    a = loop_thread.run(gw.create_sandbox())
    path = f"/s/{a.id}/ports/7/ws?token={a.token}"
    log = tmp_path / "echo.log"

    async def over_the_limit() -> tuple[int, str]:
        url = f"ws://127.0.0.1:{gw.http_port}{path}"
        async with connect(url, subprotocols=["binary"]) as ws:  # the one allowed session
            await ws.send(b"x")
            assert await ws.recv() == b"x"
            conn = Conn(gw.http_port)
            conn.send(GET)
            assert conn.response()[0] == 200
            conn.send(upgrade(path))
            got = refusal(conn)
            conn.close()
            return got

    with guest_server(f"sp-{a.id}", ECHO_SERVER, str(log)):
        assert asyncio.run(over_the_limit()) == (429, "too_many_sessions_from_client")
        assert tcp_connections(log) == 1  # only the allowed session reached the guest


def test_requests_that_cannot_be_framed_are_refused_after_the_earlier_answers(
        gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    for bad, status in [
        (b"POST /healthz HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
         400),
        (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + b"X-Pad: " + b"a" * 17000 + b"\r\n\r\n",
         431),
        (b"POST /healthz HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ]:
        conn = Conn(gw.http_port)
        conn.send(GET + bad)
        assert conn.response()[0] == 200
        assert refusal(conn) == (status, "bad_request")
        assert conn.closed()
        conn.close()


def test_a_request_broken_mid_body_is_answered_not_left_hanging(gateway_factory: Any) -> None:
    """Its head already went to the app, which would wait for the rest for ever: the
    front door answers for it, after the answers before it."""
    gw: Gateway = gateway_factory()
    conn = Conn(gw.http_port)
    conn.sock.settimeout(5)  # the bug was a connection that never answered
    conn.send(GET + b"POST /healthz HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\nzz\r\n")  # "zz" is no chunk size
    assert conn.response()[0] == 200
    assert refusal(conn) == (400, "bad_request")
    assert conn.closed()
    conn.close()
