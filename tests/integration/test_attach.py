"""Attaching guests sandport did not create: a namespace with Xvnc made by hand (plain
`ip` commands, no sandport) stands in for a VM or container of another manager.

sandport fronts it (a host forward, the WebSocket bridge, readiness, the doctor), follows
it to a new address when its owner says so (the same URL and host port keep working),
and on detach leaves it exactly as it was, with nothing of sandport behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import free_test_subnet, require_programs, require_root
from sandport.control.gateway import Gateway
from sandport.errors import Conflict, Forbidden, UsageError
from sandport.probe import probe_rfb_ws
from sandport.proto.rfb import obfuscate_password

pytestmark = pytest.mark.integration


@dataclass
class HandMade:
    """A namespace with Xvnc on eth0, made the way another VM manager would."""

    netns: str
    host_link: str
    network: ipaddress.IPv4Network
    ip: str
    password: str
    xvnc: subprocess.Popen[bytes]

    def sh(self, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], check=True,
                              capture_output=True, text=True).stdout


@pytest.fixture
def hand_made(tmp_path: Path) -> Iterator[HandMade]:
    require_root()
    require_programs("Xvnc")
    tag = secrets.token_hex(3)
    netns, host_link = f"sp-x{tag}", f"sp-x{tag}-h"
    network = free_test_subnet()
    host_ip, guest_ip = network.network_address + 1, network.network_address + 2
    password = "hand-pw1"
    (tmp_path / "passwd").write_bytes(obfuscate_password(password))
    xvnc: subprocess.Popen[bytes] | None = None
    try:
        for cmd in (["ip", "netns", "add", netns],
                    ["ip", "link", "add", host_link, "type", "veth", "peer", "name",
                     f"sp-x{tag}-g"],
                    ["ip", "link", "set", f"sp-x{tag}-g", "netns", netns, "name", "eth0"],
                    ["ip", "addr", "add", f"{host_ip}/{network.prefixlen}", "dev", host_link],
                    ["ip", "link", "set", host_link, "up"],
                    ["ip", "-n", netns, "addr", "add", f"{guest_ip}/{network.prefixlen}",
                     "dev", "eth0"],
                    ["ip", "-n", netns, "link", "set", "eth0", "up"],
                    ["ip", "-n", netns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True)
        display = 200 + int(tag, 16) % 600  # its own X display number: no clash
        xvnc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "Xvnc", f":{display}", "-rfbport", "5901",
             "-SecurityTypes", "VncAuth", "-PasswordFile", str(tmp_path / "passwd"),
             "-geometry", "640x480", "-desktop", "by-hand", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        made = HandMade(netns=netns, host_link=host_link, network=network, ip=str(guest_ip),
                        password=password, xvnc=xvnc)
        deadline = time.monotonic() + 15
        while ":5901" not in made.sh("ss", "-ltn") and time.monotonic() < deadline:
            time.sleep(0.1)
        yield made
    finally:
        if xvnc is not None:
            xvnc.kill()
            xvnc.wait(10)
        subprocess.run(["ip", "netns", "del", netns], check=False)
        subprocess.run(["ip", "link", "del", host_link], check=False, capture_output=True)


def capture(port: int, password: str, path: Path) -> Image.Image:
    from vncdotool import api

    client = api.connect(f"127.0.0.1::{port}", password=password, timeout=30)
    try:
        client.captureScreen(str(path))
    finally:
        client.disconnect()
    return Image.open(path)


def on_loop(loop_thread: Any, fn: Any, *args: Any, **kw: Any) -> Any:
    async def call() -> Any:
        return fn(*args, **kw)
    return loop_thread.run(call())


def test_a_hand_made_desktop_attached_moved_and_detached(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade, tmp_path: Path) -> None:
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    info = loop_thread.run(gw.attach(ip=hand_made.ip, name="by-hand",
                                     vnc_password=hand_made.password))
    assert info.state == "ready" and info.ip == hand_made.ip
    doc = info.as_json()
    assert doc["backend"] == "external" and doc["name"] == "by-hand"
    # A real VNC client through the host forward sees the hand-made desktop.
    assert capture(info.vnc_port, hand_made.password, tmp_path / "a.png").size == (640, 480)
    ws = f"ws://127.0.0.1:{gw.http_port}/s/{info.id}/ports/vnc/ws?token={info.token}"
    first = asyncio.run(probe_rfb_ws(ws, password=hand_made.password))
    assert first.ok and "by-hand" in first.detail, first.detail
    report = loop_thread.run(gw.doctor(info.id))
    assert report.healthy, [r for r in report.rows if r.status != "ok"]
    assert any(r.check == "route" and hand_made.host_link in r.evidence for r in report.rows)
    # Its owner re-addresses it and tells sandport: same URL, same host port.
    new_ip = str(hand_made.network.network_address + 3)
    hand_made.sh("ip", "addr", "del", f"{hand_made.ip}/{hand_made.network.prefixlen}", "dev",
                 "eth0")  # first: deleting a primary address takes its secondaries along
    hand_made.sh("ip", "addr", "add", f"{new_ip}/{hand_made.network.prefixlen}", "dev",
                 "eth0")
    moved = loop_thread.run(gw.retarget(info.id, ip=new_ip, reason="migrated"))
    assert moved.state == "ready" and moved.ip == new_ip and moved.vnc_port == info.vnc_port
    assert capture(info.vnc_port, hand_made.password, tmp_path / "b.png").size == (640, 480)
    again = asyncio.run(probe_rfb_ws(ws, password=hand_made.password))
    assert again.ok, again.detail
    events = [e.kind for e in on_loop(loop_thread, gw.event_log, sandbox_id=info.id)]
    assert "sandbox.moved" in events
    # Detach: sandport's forward and files go; the namespace is exactly as it was.
    workdir = gw.config.state_dir / "sandboxes" / info.id
    loop_thread.run(gw.destroy_sandbox(info.id))
    assert hand_made.xvnc.poll() is None  # still running
    assert f"inet {new_ip}/" in hand_made.sh("ip", "-4", "addr", "show", "eth0")
    assert info.id not in gw.sandbox_ids() and not workdir.exists()
    assert not any(f.sandbox == info.id for f in gw.forwards)
    with pytest.raises(OSError):
        capture_connect(info.vnc_port)


def capture_connect(port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_targets_outside_the_allow_list_or_unroutable_are_refused(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    gw: Gateway = gateway_factory()  # no --attach-subnet: attaching is off
    with pytest.raises(Forbidden, match="not in the networks this gateway may attach"):
        loop_thread.run(gw.attach(ip=hand_made.ip))
    req = urllib.request.Request(
        f"{gw.base_url}/api/attach", method="POST", data=json.dumps(
            {"ip": hand_made.ip}).encode(),
        headers={"Authorization": f"Bearer {gw.admin_token}",
                 "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    body = json.loads(refused.value.read())
    assert body["error"] == "forbidden_target" and "--attach-subnet" in body["message"]
    # Allowed, but a network this host has no route to.
    far = free_test_subnet()
    other: Gateway = gateway_factory(attach_subnets=(hand_made.network, far))
    with pytest.raises(UsageError, match=r"through the router|no route"):
        loop_thread.run(other.attach(ip=str(far.network_address + 9)))
    with pytest.raises(UsageError, match="reached through"):
        loop_thread.run(other.attach(ip=hand_made.ip, interface="lo"))
    # Attached once: a second attach of the same address is a conflict.
    info = loop_thread.run(other.attach(ip=hand_made.ip, vnc_password=hand_made.password))
    try:
        with pytest.raises(Conflict, match="already attached"):
            loop_thread.run(other.attach(ip=hand_made.ip))
        with pytest.raises(Forbidden):
            loop_thread.run(other.retarget(info.id, ip="10.202.0.5"))
    finally:
        loop_thread.run(other.destroy_sandbox(info.id))


def test_the_cli_and_the_sdk_attach_mark_gone_and_detach(
        gateway_factory: Any, hand_made: HandMade, tmp_path: Path) -> None:
    import sys

    from sandport.client import Client

    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    secret = tmp_path / "pw.txt"
    secret.write_text(hand_made.password + "\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandport", *args, "--state-dir",
                               str(gw.config.state_dir)], capture_output=True, text=True,
                              timeout=120, check=False)

    r = cli("attach", "by-cli", "--ip", hand_made.ip, "--vnc-password-file", str(secret))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "external" and doc["state"] == "ready" and doc["name"] == "by-cli"
    again = cli("attach", "twice", "--ip", hand_made.ip)
    assert again.returncode == 2 and "already attached" in again.stderr
    sdk = Client.from_state_dir(gw.config.state_dir)
    target = sdk.sandbox(doc["id"]).gone("the VM was stopped")
    assert target.state == "failed" and "the VM was stopped" in target.reason
    bad = cli("retarget", doc["id"])
    assert bad.returncode == 2 and "one of them" in bad.stderr
    assert cli("detach", doc["id"]).returncode == 0
    assert doc["id"] not in gw.sandbox_ids() and hand_made.xvnc.poll() is None
    assert f"inet {hand_made.ip}/" in hand_made.sh("ip", "-4", "addr", "show", "eth0")
