"""A ``-p`` that names a port the sandbox already exposes sets that port's host side.

As docker does: ``-p 18962:5901`` on a desktop makes *the* VNC forward listen on 18962 (one
forward, ``vnc.port`` says 18962, readiness probes through it), not a second forward beside
a random one; ``attach --port 8080 -p 18991:8080`` likewise for the target's primary port.
A second spec for the same guest port, the rest of a range and the UDP half of
``/tcp+udp`` stay extra forwards. Two forwards that want one host port are refused before
anything is made, naming the other spec of the same request (or the other sandbox).
"""

from __future__ import annotations

import ipaddress
import json
import random
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from attachhelpers import HandMade, api_post, hand_made  # noqa: F401 - a fixture
from conftest import require_root, test_net_names
from nethelpers import free_port
from sandport.client import Client
from sandport.control.gateway import Gateway
from uphelpers import SANDPORT, up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SANDPORT, *args, "--state-dir", str(gw.config.state_dir)],
                          capture_output=True, text=True, timeout=120, check=False)


def free_run(length: int) -> int:
    """The first of ``length`` consecutive host ports free for TCP and UDP on 127.0.0.1."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + length):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def to_guest(doc: dict[str, Any], guest_port: int) -> list[tuple[str, str, str]]:
    """``(name, protocol, host)`` of every forward of ``doc`` to ``guest_port``."""
    return [(f["name"], f["protocol"], f["host"]) for f in doc["forwards"]
            if f["guest"].rsplit(":", 1)[1] == str(guest_port)]


def rfb_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(12)


def creations(gw: Gateway) -> int:
    """How many sandboxes the gateway ever started to make (``creating`` events)."""
    events = Client.from_state_dir(gw.config.state_dir).request("GET", "/api/events?after=0")
    return sum(1 for e in events["events"]
               if e["kind"] == "sandbox.state" and e["data"].get("state") == "creating")


def test_up_demo_publish_of_5901_sets_the_vnc_forward(up_factory: Any) -> None:
    port = free_port()
    up = up_factory("--demo", "-p", f"{port}:5901")
    doc = up.wait_ready()
    try:
        assert doc["vnc"]["port"] == port
        assert to_guest(doc, 5901) == [("vnc", "tcp", f"127.0.0.1:{port}")]
        assert doc["readiness"]["probes"][0]["hop"] == f"tcp 127.0.0.1:{port}"
        assert rfb_banner(port) == b"RFB 003.008\n"
    finally:
        code, stderr = up.stop()
    assert code == 0, stderr


def test_up_clashes_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    require_root()
    bridge, subnet = test_net_names()
    state = tmp_path / "state"

    def up(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SANDPORT, "up", "--demo", "--listen", "127.0.0.1:0",
                               "--state-dir", str(state), "--bridge", bridge,
                               "--subnet", str(subnet), *args],
                              capture_output=True, text=True, timeout=60, check=False)

    port, other = free_port(), free_port()
    r = up("--vnc-port", str(port), "-p", f"{port}:8080")
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{port}/tcp is asked for twice: by --vnc-port {port} and by -p " \
           f"{port}:8080" in r.stderr, r.stderr
    assert "sandbox" not in r.stderr and "Traceback" not in r.stderr
    # The default VNC port is named as the default, with the flag that moves it.
    r = up("-p", "15901:8080")
    assert r.returncode == 2 and "(--vnc-port, default 15901) and by -p 15901:8080" in r.stderr
    # --vnc-port and a -p of 5901 that disagree: refused, naming both.
    r = up("--vnc-port", str(port), "-p", f"{other}:5901")
    assert r.returncode == 2
    assert f"--vnc-port {port} and -p {other}:5901 both set the host port of the vnc port " \
           "(guest port 5901)" in r.stderr, r.stderr
    # Nothing was made: no state dir, no bridge.
    assert not state.exists()
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True,
                          check=False).returncode != 0


def test_sandbox_create_publish_sets_the_vnc_port_and_keeps_extras(
        gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    vnc, second, base = free_port(), free_port(), free_run(3)
    r = cli(gw, "sandbox", "create", "-p", f"{vnc}:5901", "-p", f"{second}:5901",
            "-p", f"{base}-{base + 2}:5900-5902/tcp+udp")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    try:
        # The first -p of 5901 sets VNC's host side; the others are extra forwards.
        assert doc["vnc"]["port"] == vnc
        assert to_guest(doc, 5901) == [
            ("vnc", "tcp", f"127.0.0.1:{vnc}"), ("5901/tcp", "tcp", f"127.0.0.1:{second}"),
            ("5901/tcp", "tcp", f"127.0.0.1:{base + 1}"),
            ("5901/udp", "udp", f"127.0.0.1:{base + 1}")]
        assert len(doc["forwards"]) == 8
        assert doc["readiness"]["probes"][0]["hop"] == f"tcp 127.0.0.1:{vnc}"
        for port in (vnc, second, base + 1):
            assert rfb_banner(port) == b"RFB 003.008\n"
    finally:
        assert cli(gw, "sandbox", "rm", doc["id"]).returncode == 0


def test_api_clashes_name_the_real_owner_and_make_nothing(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    port, other = free_port(), free_port()
    made = creations(gw)
    status, doc = api_post(gw, "/api/sandboxes", {"vnc_port": port,
                                                  "publish": [f"{port}:8080"]})
    # A clash inside one request is a bad request (422); a port another sandbox has, 409.
    assert (status, doc["error"]) == (422, "invalid_port_spec"), doc
    assert doc["message"].startswith(f"host port 127.0.0.1:{port}/tcp is asked for twice: "
                                     f"by vnc_port {port} and by -p 127.0.0.1:{port}:8080/tcp")
    status, doc = api_post(gw, "/api/sandboxes", {"vnc_port": port,
                                                  "publish": [f"{other}:5901"]})
    assert status == 422 and doc["message"].startswith(
        f"vnc_port {port} and -p 127.0.0.1:{other}:5901/tcp both set the host port of the "
        "vnc port (guest port 5901)"), doc
    assert creations(gw) == made and gw.sandbox_ids() == []
    # A host port another sandbox's VNC has: that sandbox is named, nothing else is made.
    # (Its -p names a host address too: the VNC forward binds it, readiness probes it.)
    status, first = api_post(gw, "/api/sandboxes", {"publish": [f"127.0.0.2:{port}:5901"]})
    assert status == 201 and first["vnc"] == {"host": "127.0.0.2", "port": port}, first
    assert first["readiness"]["probes"][0]["hop"] == f"tcp 127.0.0.2:{port}"
    status, doc = api_post(gw, "/api/sandboxes", {"publish": [f"127.0.0.2:{port}:5901"]})
    assert status == 409
    assert f"already forwarded by sandbox {first['id']} (vnc)" in doc["message"]
    assert creations(gw) == made + 1 and gw.sandbox_ids() == [first["id"]]
    Client.from_state_dir(gw.config.state_dir).sandbox(first["id"], fetch=False).delete()


def test_attach_port_and_publish_make_one_forward(gateway_factory: Any) -> None:
    """``attach --port 8080 -p P:8080``: the target's http port is forwarded on P, once,
    and readiness probes that forward."""
    gw: Gateway = gateway_factory(attach_subnets=(LOOPBACK,))
    netns = f"sp-p{secrets.token_hex(3)}"
    server = None
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m",
                                   "http.server", "8080", "--bind", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while ":8080" not in subprocess.run(["ip", "netns", "exec", netns, "ss", "-ltn"],
                                            capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "the http server did not listen"
            time.sleep(0.1)
        port = free_port()
        r = cli(gw, "attach", "web", "--netns", netns, "--ip", "127.0.0.1", "--profile",
                "http", "--port", "8080", "-p", f"{port}:8080")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert [(f["name"], f["host"]) for f in doc["forwards"]] == [
            ("http", f"127.0.0.1:{port}")]
        assert doc["readiness"]["probes"][0]["hop"] == f"http 127.0.0.1:{port}/"
        assert cli(gw, "detach", doc["id"]).returncode == 0
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_api_attach_of_a_desktop_publish_sets_its_vnc_port(
        gateway_factory: Any, hand_made: HandMade) -> None:
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    port = free_port()
    status, doc = api_post(gw, "/api/attach", {"ip": hand_made.ip, "name": "by-hand",
                                               "vnc_password": hand_made.password,
                                               "publish": [f"{port}:5901"]})
    assert status == 201, doc
    try:
        assert doc["vnc"]["port"] == port
        assert to_guest(doc, 5901) == [("vnc", "tcp", f"127.0.0.1:{port}")]
        assert doc["readiness"]["probes"][0]["hop"] == f"tcp 127.0.0.1:{port}"
    finally:
        Client.from_state_dir(gw.config.state_dir).sandbox(doc["id"], fetch=False).delete()
