"""The gateway's port: bridge routes, refusals that say why, TLS, metrics.

Real gateways and desktop sandboxes; a websockets client and plain HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from nethelpers import ECHO_SERVER, guest_server
from sandport.bridge.tls import TlsConfig
from sandport.control.gateway import Gateway
from sandport.probe import probe_rfb_ws
from tlshelpers import make_ca

pytestmark = pytest.mark.integration


def ws_url(gw: Gateway, sandbox: str, token: str, port: str = "vnc") -> str:
    scheme = "wss" if gw.config.tls is not None else "ws"
    return f"{scheme}://127.0.0.1:{gw.http_port}/s/{sandbox}/ports/{port}/ws?token={token}"


async def status_of(url: str, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    """The refusal of an upgrade: status, JSON body, headers."""
    try:
        async with connect(url, open_timeout=10, **kw):
            return 101, {}, {}
    except InvalidStatus as exc:
        r = exc.response
        return r.status_code, json.loads(r.body or b"{}"), r.headers


def test_503_while_the_sandbox_boots_then_the_same_url_works(
    gateway_factory: Any, loop_thread: Any
) -> None:
    gw: Gateway = gateway_factory()
    backend = gw._backends["netns"]
    real_start = backend.start

    async def slow_start(spec: Any) -> None:  # the guest boots for a second longer
        await asyncio.sleep(1.0)
        await real_start(spec)

    backend.start = slow_start  # type: ignore[method-assign]
    creating = asyncio.run_coroutine_threadsafe(gw.create_sandbox(), loop_thread.loop)
    deadline = time.monotonic() + 10
    while not gw.sandbox_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    sandbox = gw.sandbox_ids()[0]
    token = gw.info(sandbox).token
    url = ws_url(gw, sandbox, token)
    seen: list[int] = []
    while time.monotonic() < deadline:
        status, doc, headers = asyncio.run(status_of(url, subprotocols=["binary"]))
        seen.append(status)
        if status == 101:
            break
        assert status == 503, (status, doc)
        assert doc["error"] == "not_ready" and headers["Retry-After"] == "2", doc
        time.sleep(0.1)
    info = creating.result(60)
    assert seen[0] == 503 and seen[-1] == 101, seen
    # The URL handed out while it booted works now, unchanged.
    r = asyncio.run(probe_rfb_ws(url, password=info.vnc_password))
    assert r.ok, r.detail
    backend.start = real_start  # type: ignore[method-assign]


def test_guest_refusing_is_a_502_that_names_the_service(gateway_factory: Any,
                                                        loop_thread: Any) -> None:
    gw: Gateway = gateway_factory()
    info = loop_thread.run(gw.create_sandbox())
    # Xvnc dies inside the sandbox: nothing listens on 5901 any more. Only this
    # sandbox's Xvnc: `ip netns pids` lists the processes of its namespace.
    pids = subprocess.run(["ip", "netns", "pids", f"sp-{info.id}"], capture_output=True,
                          text=True, check=True).stdout.split()
    xvnc = [int(p) for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "Xvnc"]
    assert len(xvnc) == 1, pids
    os.kill(xvnc[0], signal.SIGKILL)
    time.sleep(0.2)
    status, doc, _ = asyncio.run(status_of(ws_url(gw, info.id, info.token)))
    assert status in (502, 503), doc  # 503 once the supervisor marks it failed
    if status == 502:
        assert doc["error"] == "target_refused" and "5901" in doc["message"], doc
    else:
        assert doc["error"] == "not_ready", doc


def test_metrics_count_sessions_bytes_and_close_reasons_per_sandbox_port(
    gateway_factory: Any, loop_thread: Any
) -> None:
    gw: Gateway = gateway_factory()
    info = loop_thread.run(gw.create_sandbox())
    r = asyncio.run(probe_rfb_ws(ws_url(gw, info.id, info.token), password=info.vnc_password))
    assert r.ok, r.detail
    asyncio.run(status_of(ws_url(gw, info.id, "wrong")))
    req = urllib.request.Request(f"{gw.base_url}/metrics",
                                 headers={"Authorization": f"Bearer {gw.admin_token}"})
    deadline = time.monotonic() + 5
    while True:  # the probe's session is counted once the bridge has seen it close
        with urllib.request.urlopen(req, timeout=5) as resp:
            text = resp.read().decode()
        if "sandport_ws_closes_total{" in text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    labels = f'sandbox="{info.id}",port="vnc"'
    # Two sessions: the readiness probe and ours.
    assert f"sandport_ws_sessions_total{{{labels}}} 2" in text, text
    assert f"sandport_ws_sessions_active{{{labels}}} 0" in text, text
    to_client = [line for line in text.splitlines()
                 if line.startswith(f'sandport_ws_bytes_total{{{labels},direction="to_client"}}')]
    assert to_client and int(to_client[0].rsplit(" ", 1)[1]) > 24, to_client  # banners+init
    assert f'sandport_ws_closes_total{{{labels},reason="client_closed"}}' in text, text
    assert 'sandport_ws_refusals_total{status="403"} 1' in text, text
    assert f'sandport_sandbox_state{{sandbox="{info.id}",state="ready"}} 1' in text, text
    assert f'sandport_sandbox_ready_seconds{{sandbox="{info.id}"}} ' in text, text
    # Both sessions reached the desktop's ServerInit; the time is measured per route.
    assert f"sandport_ws_rfb_ready_seconds_count{{{labels}}} 2" in text, text
    wrong = asyncio.run(probe_rfb_ws(ws_url(gw, info.id, info.token), password="wrongpw1"))
    assert not wrong.ok and "Authentication failure" in wrong.detail
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with urllib.request.urlopen(req, timeout=5) as resp:
            text = resp.read().decode()
        if f"sandport_ws_rfb_failed_total{{{labels}}} 1" in text:
            break
        time.sleep(0.1)
    assert f"sandport_ws_rfb_failed_total{{{labels}}} 1" in text, text


def test_tls_on_the_gateway_port_https_wss_and_plain_http(
    gateway_factory: Any, loop_thread: Any, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path)
    pem = ca.issue(tmp_path / "gateway.pem")
    gw: Gateway = gateway_factory(tls=TlsConfig(cert=pem))
    assert gw.base_url.startswith("https://")
    info = loop_thread.run(gw.create_sandbox())  # readiness probed over wss
    assert info.desktop_url.startswith("https://")
    ctx = ca.client_context()
    r = asyncio.run(probe_rfb_ws(ws_url(gw, info.id, info.token), password=info.vnc_password,
                                 ssl_context=ctx))
    assert r.ok, r.detail
    with urllib.request.urlopen(f"https://127.0.0.1:{gw.http_port}/healthz", context=ctx,
                                timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ok"
    # The desktop link, over https, sends noVNC to wss (encrypt=1).
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx),
                                         NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(f"https://127.0.0.1:{gw.http_port}/s/{info.id}/?token={info.token}",
                    timeout=5)
    assert redirect.value.code == 302
    assert "encrypt=1" in redirect.value.headers["Location"]
    # Plain http on the same port still answers.
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(probe_rfb_ws_strict(ws_url(gw, info.id, info.token)))


async def probe_rfb_ws_strict(url: str) -> None:
    async with connect(url, ssl=ssl.create_default_context(), open_timeout=5):
        pass


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_destroying_a_sandbox_closes_its_sessions_with_a_reason(
    gateway_factory: Any, loop_thread: Any
) -> None:
    gw: Gateway = gateway_factory()
    info = loop_thread.run(gw.create_sandbox())

    async def watch() -> tuple[int, str]:
        async with connect(ws_url(gw, info.id, info.token), subprotocols=["binary"]) as ws:
            assert (await ws.recv())[:4] == b"RFB "
            destroyed = asyncio.get_running_loop().run_in_executor(
                None, loop_thread.run, gw.destroy_sandbox(info.id))
            with pytest.raises(ConnectionClosed) as closed:
                await read_forever(ws)
            await destroyed
            frame = closed.value.rcvd
            assert frame is not None, "closed without a close frame (1006)"
            return frame.code, frame.reason

    assert asyncio.run(watch()) == (1001, "the sandbox was destroyed")


async def read_forever(ws: Any) -> None:
    while True:
        await ws.recv()


def test_any_tcp_port_of_a_sandbox_by_number(gateway_factory: Any, loop_thread: Any,
                                             tmp_path: Path) -> None:
    """An app's own TCP service (an echo server on port 7) through the bridge."""
    gw: Gateway = gateway_factory()
    info = loop_thread.run(gw.create_sandbox())

    async def echo() -> bool:
        url = ws_url(gw, info.id, info.token, port="7")
        async with connect(url, subprotocols=["binary"], max_size=None) as ws:
            for payload in (os.urandom(1 << 20), os.urandom(1 << 20)):  # 1 MiB messages
                await ws.send(payload)
                assert await received(ws, len(payload)) == payload
            payload = os.urandom(70_001)  # one message in odd-sized fragments
            await ws.send([payload[:3], payload[3:65_539], payload[65_539:]])
            assert await received(ws, len(payload)) == payload
        async with connect(url, subprotocols=["base64"], max_size=None) as ws:
            payload = os.urandom(100_000)
            await ws.send(base64.b64encode(payload).decode())
            assert await received(ws, len(payload)) == payload
        return True

    with guest_server(f"sp-{info.id}", ECHO_SERVER, str(tmp_path / "echo.log")):
        assert asyncio.run(echo())
    assert (info.id, "7") in gw.bridge_stats.routes  # type: ignore[union-attr]


async def received(ws: Any, n: int) -> bytes:
    got = b""
    while len(got) < n:
        msg = await ws.recv()
        got += msg if isinstance(msg, bytes) else base64.b64decode(msg)
    return got


def test_origin_allow_list_on_the_gateway(gateway_factory: Any, loop_thread: Any) -> None:
    """A page on another site cannot open a sandbox's desktop with a leaked URL."""
    gw: Gateway = gateway_factory(origins=("https://desk.example",))
    info = loop_thread.run(gw.create_sandbox())  # the readiness probe sends no Origin
    url = ws_url(gw, info.id, info.token)
    status, doc, _ = asyncio.run(status_of(url, origin="https://evil.example"))
    assert (status, doc["error"]) == (403, "origin_not_allowed"), doc
    status, _, _ = asyncio.run(status_of(url, origin="https://desk.example"))
    assert status == 101


def test_session_limits_on_the_gateway(gateway_factory: Any, loop_thread: Any) -> None:
    gw: Gateway = gateway_factory(ws_max_per_client=1)
    info = loop_thread.run(gw.create_sandbox())
    url = ws_url(gw, info.id, info.token)

    async def two() -> tuple[int, dict[str, Any]]:
        async with connect(url, subprotocols=["binary"]):
            status, doc, _ = await status_of(url)
            return status, doc

    status, doc = asyncio.run(two())
    assert (status, doc["error"]) == (429, "too_many_sessions_from_client"), doc


def test_behind_a_trusted_proxy_every_method_still_reaches_the_app(
    gateway_factory: Any, loop_thread: Any
) -> None:
    """A trusted peer's POST starts with "P" like a PROXY header: it must not be taken for one."""
    import ipaddress
    import socket as socketlib

    gw: Gateway = gateway_factory(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))

    def exchange(*pieces: bytes) -> bytes:
        with socketlib.create_connection(("127.0.0.1", gw.http_port), timeout=10) as s:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(0.05)  # separate segments
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    post = exchange(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405"), post[:100]
    # A PROXY v1 header split across segments, then a request: answered.
    got = exchange(b"PRO", b"XY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n",
                   b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200"), got[:100]


def test_readiness_is_probed_continuously(gateway_factory: Any, loop_thread: Any) -> None:
    """A desktop that stops answering turns degraded, with the reason; back, it is ready."""
    gw: Gateway = gateway_factory(probe_interval=0.3)
    info = loop_thread.run(gw.create_sandbox())
    pids = subprocess.run(["ip", "netns", "pids", f"sp-{info.id}"], capture_output=True,
                          text=True, check=True).stdout.split()
    xvnc = next(int(p) for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "Xvnc")
    live = gw.lookup(info.id)
    assert live is not None
    os.kill(xvnc, signal.SIGSTOP)  # it stops answering; the port still accepts
    try:
        t0 = time.monotonic()
        while live.state.value != "degraded" and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert live.state.value == "degraded", live.state
        assert "tcp 127.0.0.1" in live.reason and "stage" in live.reason, live.reason
        # Within the probe interval plus the probe's own timeout (1 s at this interval).
        assert time.monotonic() - t0 < 0.3 + 1.0 + 1.0
    finally:
        os.kill(xvnc, signal.SIGCONT)
    t0 = time.monotonic()
    while live.state.value != "ready" and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert live.state.value == "ready" and live.reason == ""
    # The monitor's latest probe is exported, and shown by the API.
    req = urllib.request.Request(f"{gw.base_url}/metrics",
                                 headers={"Authorization": f"Bearer {gw.admin_token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    assert f'sandport_sandbox_probe_seconds{{sandbox="{info.id}",ok="true"}} ' in text
    assert gw.info(info.id).last_probe["ok"] is True  # type: ignore[index]


def test_a_killed_desktop_is_restarted_and_ready_again(gateway_factory: Any,
                                                       loop_thread: Any) -> None:
    gw: Gateway = gateway_factory(probe_interval=0.3)
    info = loop_thread.run(gw.create_sandbox())
    live = gw.lookup(info.id)
    assert live is not None
    pids = subprocess.run(["ip", "netns", "pids", f"sp-{info.id}"], capture_output=True,
                          text=True, check=True).stdout.split()
    xvnc = next(int(p) for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "Xvnc")
    os.kill(xvnc, signal.SIGKILL)
    seen: list[tuple[str, str]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        state = (live.state.value, live.reason)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state[0] == "ready" and len(seen) > 1:
            break
        time.sleep(0.02)
    assert seen[-1] == ("ready", ""), seen
    degraded = [r for s, r in seen if s == "degraded"]
    assert degraded and "Xvnc exited" in degraded[0] and "restarting" in degraded[0], seen
    # The same URL and password open the new desktop.
    r = asyncio.run(probe_rfb_ws(ws_url(gw, info.id, info.token), password=info.vnc_password))
    assert r.ok and r.desktop == f"sandport {info.id}", r.detail
