"""Failed VNC logins are counted per client address at the gateway's bridge (issue 18,
finding 4): Xvnc's own blacklist cannot tell clients apart (every session reaches it from
the gateway's address, and sandport relaxes it), so the bridge makes a guessing client
wait with a 429 and Retry-After, counted in /metrics; a good login clears the count."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sandport.bridge.throttle import ThrottleConfig
from sandport.control.gateway import Gateway
from sandport.probe import probe_rfb_ws

pytestmark = pytest.mark.integration


async def _refusal(url: str) -> tuple[int, str, str]:
    """The status, Retry-After and body of an upgrade refused before it happened."""
    try:
        async with connect(url, subprotocols=["binary"], open_timeout=10):  # type: ignore[list-item]
            pass
    except InvalidStatus as exc:
        response = exc.response
        return (response.status_code, response.headers.get("Retry-After", ""),
                response.body.decode() if response.body else "")
    raise AssertionError(f"{url} was upgraded")


def test_a_client_that_keeps_failing_vnc_logins_waits(gateway_factory: Any,
                                                      loop_thread: Any) -> None:
    gw: Gateway = gateway_factory(
        vnc_logins=ThrottleConfig(failures=3, window=60, block=1.5))
    info = loop_thread.run(gw.create_sandbox())
    url = gw.ws_base + f"/s/{info.id}/ports/vnc/ws?token={info.token}"
    try:
        for _ in range(3):
            r = asyncio.run(probe_rfb_ws(url, password="wrong!!"))
            assert not r.ok and "Authentication failure" in r.detail, r.detail
        # The fourth session from this address is refused before the upgrade, even with
        # the right password, saying for how long.
        status, retry, body = asyncio.run(_refusal(url))
        assert status == 429 and "too_many_failed_logins" in body, (status, body)
        assert 1 <= int(retry) <= 2, retry
        metrics = httpx.get(f"{gw.base_url}/metrics", timeout=10, headers={
            "Authorization": f"Bearer {gw.admin_token}"}).text
        assert "sandport_ws_login_blocks_total 1" in metrics, metrics
        # Once the block is over, the right password opens it, and clears the count.
        time.sleep(1.6)
        r = asyncio.run(probe_rfb_ws(url, password=info.vnc_password))
        assert r.ok, r.detail
        for _ in range(2):
            assert not asyncio.run(probe_rfb_ws(url, password="wrong!!")).ok
        assert asyncio.run(probe_rfb_ws(url, password=info.vnc_password)).ok
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))
