"""The gateway's port out of file descriptors: API and bridge clients are refused at once.

A real gateway (`sandport up`) runs with ``RLIMIT_NOFILE`` :data:`GATEWAY_NOFILE`; the test
opens more idle connections to its port (the front door: the HTTP API and the WebSocket
bridge share it) than it has descriptors for. A further HTTP API client and a further
WebSocket client must then be closed or reset within :data:`ANSWER_WITHIN` seconds: there is
no descriptor to answer with, but neither may wait in the accept queue (what the front door
did before it used the process's spare descriptor: it spun on the listener, warning, while
clients waited until the idle ones timed out). Once the idle clients are gone the gateway
serves again, and `/metrics` counts the refusals by reason.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sandport.cli.common import LOG_FILE
from sandport.client import Client
from uphelpers import up_factory  # noqa: F401

pytestmark = pytest.mark.integration

#: The gateway's descriptor limit (soft and hard): enough to start, soon exhausted.
GATEWAY_NOFILE = 160
#: Idle connections the test opens (more than the gateway can hold).
IDLE = 260
#: A refused client must hear its reset or close within this many seconds...
ANSWER_WITHIN = 2.0
#: ...and one that hears nothing for this long hangs (the gateway closes idle clients that
#: sent nothing after 10 s; this stays well under it).
HANG = 5.0

API_REQUEST = b"GET /api/sandboxes HTTP/1.1\r\nHost: gw\r\n\r\n"
WS_REQUEST = (b"GET /s/3fa9c1/vnc HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n")


def _one_client(port: int, request: bytes) -> tuple[str, float]:
    """("refused" | "answered" | "hang", seconds until it knew)."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as sock:
            sock.sendall(request)
            data = sock.recv(4096)
    except TimeoutError:
        return "hang", time.monotonic() - t0
    except OSError:  # reset (even before connect() returned)
        return "refused", time.monotonic() - t0
    return ("answered" if data else "refused"), time.monotonic() - t0


def _reset_count(socks: list[socket.socket]) -> int:
    """How many of the idle clients the gateway reset or closed (non-blocking look)."""
    gone = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            gone += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            gone += 1
    return gone


def test_out_of_descriptors_api_and_bridge_clients_are_refused_at_once(
        up_factory: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = up_factory(state_dir=state)
    up.wait_http()
    api = Client.from_state_dir(state)
    port = urlsplit(api.url).port
    assert port is not None
    assert api.request("GET", "/api/sandboxes") == {"sandboxes": []}
    resource.prlimit(up.proc.pid, resource.RLIMIT_NOFILE, (GATEWAY_NOFILE, GATEWAY_NOFILE))

    idle: list[socket.socket] = []
    try:
        reset_at_connect = 0
        for _ in range(IDLE):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=HANG))
            except ConnectionResetError:
                reset_at_connect += 1
        time.sleep(0.3)
        outcomes = {what: _one_client(port, request)
                    for what, request in (("api", API_REQUEST), ("ws", WS_REQUEST))}
        for what, (kind, took) in outcomes.items():
            assert kind == "refused", f"{what} client over the limit: {kind} after {took:.1f} s"
            assert took < ANSWER_WITHIN, f"{what} client refused only after {took:.1f} s"
        refused_idle = reset_at_connect + _reset_count(idle)
        assert refused_idle > 0, "the gateway held every idle client: the limit was not hit"
    finally:
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.close()

    # Descriptors are free again: the gateway serves, and counted every refusal.
    deadline = time.monotonic() + 10
    while True:
        try:
            text = api.call("GET", "/metrics")[0].decode()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    counted = [line for line in text.splitlines()
               if line.startswith('sandport_accept_refusals_total{reason="descriptors"}')]
    assert len(counted) == 1, text[-2000:]
    assert int(counted[0].rsplit(" ", 1)[1]) >= refused_idle + 2, (counted, refused_idle)
    assert api.request("GET", "/api/sandboxes") == {"sandboxes": []}
    code, _ = up.stop()
    assert code == 0
    # One line per burst, not one per client.
    log = (state / LOG_FILE).read_text()
    assert 1 <= log.count(f"out of file descriptors (limit {GATEWAY_NOFILE}") <= 3, log[-3000:]
