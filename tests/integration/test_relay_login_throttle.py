"""Failed VNC logins through a proxy-mode forward of a desktop's VNC port are throttled
like those through the bridge, in the same count (issue 18, finding 4).

A real desktop sandbox (Xvnc with a password) behind ``--forward-mode proxy``: Xvnc sees
every relayed client at the gateway's address, so the gateway watches each handshake
(sandport.forward.rfbgate). Three wrong passwords through the bridge and two through the
host port block 127.0.0.1 on both paths; on the port, even the right password is then
refused in RFB itself (no security types, and the reason); a client from 127.0.0.2 is
not; `/metrics` counts the refusal.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from sandport.bridge.throttle import ThrottleConfig
from sandport.control.gateway import Gateway
from sandport.forward.rfbgate import refusal_message
from sandport.forward.tcp import TcpForward
from sandport.probe import probe_rfb_ws, run_rfb_handshake
from sandport.proto.rfb import Stage
from sandport.proto.rfbwatch import RfbWatch, Watch

pytestmark = pytest.mark.integration

WRONG = "wrong!!"


async def _login(port: int, password: str, source: str = "127.0.0.1") -> tuple[bool, str]:
    """An RFB handshake with ``password`` to the host port, from ``source``."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        try:

            async def send(data: bytes) -> None:
                writer.write(data)
                await writer.drain()

            async def recv() -> bytes:
                return await reader.read(65536)

            r = await run_rfb_handshake(recv, send, hop="test", password=password,
                                        stop_at=Stage.SERVER_INIT)
        finally:
            writer.close()
    return r.ok, r.detail


@pytest.mark.parametrize("version", [b"RFB 003.008\n", b"RFB 003.007\n", b"RFB 003.003\n"])
def test_the_refusal_is_an_rfb_failure_with_its_reason(version: bytes) -> None:
    """What a blocked client hears after its version is a failure RfbWatch (and so any
    RFB client) reads as one: no security types (3.7+) or type 0 (3.3), then the text."""
    watch = RfbWatch()
    watch.from_server(b"RFB 003.008\n")
    watch.from_client(version)
    message = refusal_message(version, "too many failed logins from 127.0.0.1")
    assert message.endswith(b"too many failed logins from 127.0.0.1")
    assert watch.from_server(message) is Watch.FAILED


def test_failed_logins_through_a_proxy_forward_block_that_client(
        gateway_factory: Any, loop_thread: Any) -> None:
    gw: Gateway = gateway_factory(forward_mode="proxy",
                                  vnc_logins=ThrottleConfig(failures=5, window=60, block=30))
    info = loop_thread.run(gw.create_sandbox())
    port = info.vnc_port
    url = gw.ws_base + f"/s/{info.id}/ports/vnc/ws?token={info.token}"
    try:
        fwd = gw.forwards.named(info.id, "vnc")
        assert fwd is not None and fwd.mode == "proxy", fwd
        # A good login through the port works (and clears nothing that matters).
        assert asyncio.run(_login(port, info.vnc_password))[0]
        # The handshakes the gate relayed count as the forward's bytes (so far: the
        # readiness probe's and ours, each a full login): each client sent its version
        # (12), the security type (1), the VNC response (16) and ClientInit (1).
        assert isinstance(fwd.relay, TcpForward)
        relay = fwd.relay
        deadline = time.monotonic() + 10
        while relay.stats.active and time.monotonic() < deadline:
            time.sleep(0.05)
        st = relay.stats
        assert st.active == 0 and st.total >= 1 and st.bytes_up == 30 * st.total, st
        assert st.bytes_down > (12 + 2 + 16 + 4 + 24) * st.total, st
        for _ in range(3):
            assert not asyncio.run(probe_rfb_ws(url, password=WRONG)).ok
        for _ in range(2):
            ok, detail = asyncio.run(_login(port, WRONG))
            assert not ok and "Authentication failure" in detail, detail
        # Blocked on the port: the right password is refused in RFB, with the reason.
        ok, detail = asyncio.run(_login(port, info.vnc_password))
        assert not ok, detail
        assert "too many failed logins from 127.0.0.1; try again in" in detail, detail
        # ... and on the bridge: one count for both paths.
        r = asyncio.run(probe_rfb_ws(url, password=info.vnc_password))
        assert not r.ok and "429" in r.detail, r.detail
        # Another client address is not blocked.
        ok, detail = asyncio.run(_login(port, info.vnc_password, source="127.0.0.2"))
        assert ok, detail
        metrics = httpx.get(f"{gw.base_url}/metrics", timeout=10, headers={
            "Authorization": f"Bearer {gw.admin_token}"}).text
        counted = [line for line in metrics.splitlines()
                   if line.startswith(f'sandport_forward_failures_total{{forward="{fwd.id}"')
                   and 'reason="login_blocked"' in line]
        assert [line.rsplit(" ", 1)[1] for line in counted] == ["1"], counted
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))

