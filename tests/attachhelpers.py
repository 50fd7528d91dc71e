"""A guest made the way another VM manager would (plain `ip` commands and Xvnc, no
sandport), for the tests of ``sandport attach``."""

from __future__ import annotations

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

from conftest import free_test_subnet, require_programs, require_root
from sandport.proto.rfb import obfuscate_password


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




def api_post(gw: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to a gateway's API with its admin token: the status and the JSON
    answer (a refusal's too)."""
    req = urllib.request.Request(
        f"{gw.base_url}{path}", method="POST", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {gw.admin_token}",
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
