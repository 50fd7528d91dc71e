"""A desktop sandbox end to end with real parts: netns, Xvnc, the relay, vncdotool.

One gateway per module with two desktop sandboxes, A and B.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sandport.control.gateway import Gateway, SandboxInfo
from sandport.probe import probe_rfb_tcp, probe_rfb_ws
from sandport.proto.rfb import Stage
from sandport.sandbox.netns import host_ifname, netns_name
from sandport.sandbox.procs import NSEXEC

pytestmark = pytest.mark.integration


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def desktops(gateway_factory: Any, loop_thread: Any) -> tuple[Gateway, SandboxInfo, SandboxInfo]:
    gw = gateway_factory()
    a = loop_thread.run(gw.create_sandbox())
    b = loop_thread.run(gw.create_sandbox())
    return gw, a, b


def test_sandboxes_become_ready_through_both_paths(desktops: Any, record_property: Any) -> None:
    gw, a, b = desktops
    for info in (a, b):
        assert info.state == "ready"
        assert info.ready_seconds is not None and info.ready_seconds > 0
        line = f"desktop sandbox ready (netns, Xvnc, both paths probed): {info.ready_seconds:.2f} s"
        record_property("measured", line)
        print(line)
    sb = gw.roster[a.id]  # the evidence the gateway kept
    hops = [p.hop for p in sb.probes]
    assert hops[0].startswith("tcp 127.0.0.1:") and hops[1].startswith("websocket ws://")
    assert hops[2] == f"guest agent http://{a.ip}:7412/health"
    assert all(p.ok and p.stage == "server-init" for p in sb.probes[:2])
    assert sb.probes[2].ok and sb.probes[2].detail == "healthy"
    assert sb.probes[0].desktop == f"sandport {a.id}"


class RecordingFactory:
    """A vncdotool factory whose protocol remembers why authentication failed."""

    @staticmethod
    def make() -> Any:
        from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

        failures: list[str] = []

        class Client(VNCDoToolClient):  # type: ignore[misc]
            def vncAuthFailed(self, reason: Any) -> None:
                failures.append(reason.decode() if isinstance(reason, bytes) else str(reason))
                super().vncAuthFailed(reason)

        class Factory(VNCDoToolFactory):  # type: ignore[misc]
            protocol = Client

        return Factory, failures


def capture(info: SandboxInfo, path: Path, password: str | None = None) -> Image.Image:
    from vncdotool import api

    client = api.connect(f"{info.vnc_host}::{info.vnc_port}",
                         password=password or info.vnc_password, timeout=30)
    try:
        client.captureScreen(str(path))
    finally:
        client.disconnect()
    return Image.open(path).convert("RGB")


def test_vncdotool_sees_the_sandbox_colour(desktops: Any, tmp_path: Path) -> None:
    _, a, b = desktops
    for info in (a, b):
        image = capture(info, tmp_path / f"{info.id}.png")
        assert image.size == (1280, 800)
        # Corners are the root window: xmessage sits in the middle, openbox has no panel.
        for xy in ((5, 5), (1274, 794), (5, 794)):
            assert image.getpixel(xy) == rgb(info.colour), (info.id, xy)
    assert a.colour != b.colour or a.id == b.id


def test_wrong_password_fails_with_the_servers_reason(desktops: Any, tmp_path: Path) -> None:
    from vncdotool import api

    _, a, _ = desktops
    factory, failures = RecordingFactory.make()
    client = api.connect(f"{a.vnc_host}::{a.vnc_port}", password="wrong!!", timeout=10,
                         factory_class=factory)
    with pytest.raises(Exception):
        client.captureScreen(str(tmp_path / "never.png"))
    client.disconnect()
    assert failures, "vncdotool saw no authentication failure"
    assert "authentication failure" in failures[0].lower(), failures
    # Our own client reads the same reason through the relay; and the right password
    # still works afterwards (Xvnc's blacklist must not lock out the gateway's address).
    result = asyncio.run(probe_rfb_tcp(a.vnc_host, a.vnc_port, password="wrong!!"))
    assert not result.ok and "Authentication failure" in result.detail
    for _ in range(8):
        asyncio.run(probe_rfb_tcp(a.vnc_host, a.vnc_port, password="nope"))
    ok = asyncio.run(probe_rfb_tcp(a.vnc_host, a.vnc_port, password=a.vnc_password))
    assert ok.ok, ok.detail


def test_three_clients_at_once_all_get_frames(desktops: Any, tmp_path: Path) -> None:
    from vncdotool import api

    _, a, _ = desktops
    clients = [api.connect(f"{a.vnc_host}::{a.vnc_port}", password=a.vnc_password, timeout=30)
               for _ in range(3)]
    errors: list[BaseException] = []

    def grab(i: int, client: Any) -> None:
        try:
            for round_ in range(2):
                client.captureScreen(str(tmp_path / f"c{i}-{round_}.png"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=grab, args=(i, c)) for i, c in enumerate(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in clients:
            c.disconnect()
    assert not errors, errors
    for i in range(3):
        image = Image.open(tmp_path / f"c{i}-1.png").convert("RGB")
        assert image.getpixel((5, 5)) == rgb(a.colour)


def _connect_from(sandbox_id: str, ip: str, port: int) -> subprocess.CompletedProcess[str]:
    """Try a TCP connect from inside a sandbox's namespace (through nsexec)."""
    code = (f"import socket; s = socket.create_connection(({ip!r}, {port}), timeout=2); "
            "print(s.recv(12).decode().strip())")
    return subprocess.run(
        [sys.executable, "-I", "-S", str(NSEXEC), netns_name(sandbox_id), "/tmp", "--",
         sys.executable, "-I", "-c", code],
        capture_output=True, text=True, timeout=20, check=False,
    )


def test_sandboxes_are_isolated_but_both_reachable_from_the_host(desktops: Any) -> None:
    _, a, b = desktops
    # The host reaches both guests directly (the bridge is not isolated from its ports).
    for info in (a, b):
        r = asyncio.run(probe_rfb_tcp(info.ip, 5901, stop_at=Stage.SECURITY_TYPES))
        assert r.ok, r.detail
    # Positive control: from inside A, A's own VNC answers (the check can succeed).
    own = _connect_from(a.id, a.ip, 5901)
    assert own.returncode == 0 and own.stdout.strip() == "RFB 003.008", own.stderr
    # A cannot reach B, and B cannot reach A.
    for src, dst in ((a, b), (b, a)):
        r = _connect_from(src.id, dst.ip, 5901)
        assert r.returncode != 0, f"{src.id} reached {dst.id}: {r.stdout}"
        assert "timed out" in r.stderr or "No route" in r.stderr or "unreachable" in r.stderr


def test_bridge_port_is_isolated_and_on_the_gateway_bridge(desktops: Any) -> None:
    gw, a, _ = desktops
    out = subprocess.run(["bridge", "-d", "link", "show", "dev", host_ifname(a.id)],
                         capture_output=True, text=True, check=True).stdout
    assert f"master {gw.config.net.bridge}" in out and "isolated on" in out


def test_desktop_link_and_websocket_check_tokens_before_the_upgrade(desktops: Any) -> None:
    gw, a, b = desktops
    base = gw.base_url
    with httpx.Client(base_url=base, timeout=10) as http:
        r = http.get(f"/s/{a.id}/")
        assert r.status_code == 401 and r.json()["error"] == "missing_token"
        r = http.get(f"/s/{a.id}/", params={"token": b.token})  # B's token does not open A
        assert r.status_code == 403 and r.json()["error"] == "invalid_token"
        r = http.get("/s/ffffff/", params={"token": a.token})
        assert r.status_code == 404 and r.json()["error"] == "unknown_sandbox"
        r = http.get(f"/s/{a.id}/", params={"token": a.token})
        assert r.status_code == 302
        assert r.headers["location"].startswith("/novnc/vnc.html#")
        assert "password=" + a.vnc_password in r.headers["location"]
        r = http.get(f"/s/{a.id}/", params={"token": "x"}, headers={"accept": "text/html"})
        assert r.status_code == 403 and "not valid" in r.text and "<h1>" in r.text
        assert http.get("/novnc/vnc.html").status_code == 200
        assert http.get("/healthz").json()["sandboxes"] == 2
    ws = base.replace("http://", "ws://")
    cases = [
        (f"{ws}/s/{a.id}/ports/vnc/ws", 401, "missing_token"),
        (f"{ws}/s/{a.id}/ports/vnc/ws?token=nope", 403, "invalid_token"),
        (f"{ws}/s/ffffff/ports/vnc/ws?token={a.token}", 404, "unknown_sandbox"),
        (f"{ws}/s/{a.id}/ports/ssh/ws?token={a.token}", 404, "unknown_port"),
        (f"{ws}/s/{a.id}/ports/70000/ws?token={a.token}", 404, "unknown_port"),
        (f"{ws}/s/{a.id}/ports/22/ws?token={a.token}", 502, "target_refused"),
    ]
    for url, status, error in cases:
        r = asyncio.run(probe_rfb_ws(url, stop_at=Stage.SECURITY_TYPES))
        assert not r.ok and f"HTTP {status}" in r.detail and error in r.detail, (url, r.detail)
    for port_key in ("vnc", "5901"):
        r = asyncio.run(probe_rfb_ws(f"{ws}/s/{a.id}/ports/{port_key}/ws?token={a.token}",
                                     password=a.vnc_password))
        assert r.ok and r.desktop == f"sandport {a.id}", r.detail


def test_guest_processes_run_inside_the_sandbox(desktops: Any, loop_thread: Any) -> None:
    gw, a, _ = desktops
    sb = gw.roster[a.id]
    found = loop_thread.run(sb.backend.inspect(sb.spec))
    assert found.exists and found.link_up
    assert found.services == {"Xvnc": True, "openbox": True, "xmessage": True, "agent": True}
    me = os.stat("/proc/self/ns/net").st_ino
    for pid in found.pids:
        assert os.stat(f"/proc/{pid}/ns/net").st_ino != me
    # The private /tmp: the X socket is in the sandbox's own dir, not the host's /tmp.
    assert (sb.spec.workdir / "tmp" / ".X11-unix" / "X1").exists()


def test_destroy_leaves_nothing(desktops: Any, loop_thread: Any, leftovers: Any) -> None:
    gw, _, _ = desktops
    info = loop_thread.run(gw.create_sandbox())
    sb = gw.roster[info.id]
    pids = loop_thread.run(sb.backend.inspect(sb.spec)).pids
    assert pids
    loop_thread.run(gw.destroy_sandbox(info.id))
    assert leftovers(bridge=None, sandbox_ids=[info.id], state_dir=gw.config.state_dir) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    with socket.socket() as s:
        assert s.connect_ex((info.vnc_host, info.vnc_port)) != 0
