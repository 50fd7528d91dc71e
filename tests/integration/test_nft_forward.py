"""Kernel forwards (nftables DNAT) with real namespaces: local and remote clients, reconcile.

Topology built by the test (names sp-*, addresses in a free 10.201.x.0/24 each):

    host 127.0.0.1 / host address H ──┐
                                      ├─ bridge sp-t… (G.1) ── veth ── netns guest G.2: echo :7
    netns "remote" R.2 ── veth ── R.1 ┘
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_test_subnet, require_programs, require_root, test_net_names
from sandport.net import netlink, nft
from sandport.sandbox.procs import NSEXEC

pytestmark = pytest.mark.integration

ECHO_SERVER = r"""
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7)); s.listen(64)
    while True:
        c, peer = s.accept(); log.write(f"tcp {peer[0]}\n")
        def serve(c=c):
            while data := c.recv(65536): c.sendall(data)
            c.close()
        threading.Thread(target=serve, daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 7))
    while True:
        data, peer = u.recvfrom(65535); log.write(f"udp {peer[0]}\n"); u.sendto(data, peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
tcp()
"""


def in_netns(netns: str, tmp: Path, code: str, *args: str, **kw: Any) -> Any:
    return subprocess.run([sys.executable, "-I", "-S", str(NSEXEC), netns, "/tmp", "--",
                           sys.executable, "-I", "-c", code, *args],
                          capture_output=True, text=True, timeout=30, check=False, **kw)


CLIENT = r"""
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
payload = b"x" * 5000 + proto.encode()
if proto == "tcp":
    s = socket.create_connection((host, port), timeout=5); s.sendall(payload); s.shutdown(1)
    got = b""
    while chunk := s.recv(65536): got += chunk
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(payload, (host, port)); got = s.recvfrom(65535)[0]
print("OK" if got == payload else f"BAD {len(got)}")
"""


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[dict[str, Any]]:
    require_root()
    require_programs("nft")
    bridge, guest_net = test_net_names()
    remote_net = free_test_subnet()
    tag = secrets.token_hex(3)
    guest_ns, remote_ns, remote_link = f"sp-{tag}", f"sp-{tag}r", f"sp-{tag}-r"
    gw = ipaddress.IPv4Interface(f"{guest_net.network_address + 1}/24")
    guest_ip = gw.ip + 1
    r_host = ipaddress.IPv4Interface(f"{remote_net.network_address + 1}/24")
    r_remote = ipaddress.IPv4Interface(f"{r_host.ip + 1}/24")
    log = tmp_path / "echo.log"
    server = None
    try:
        netlink.ensure_bridge(bridge, gw)
        netlink.create_sandbox_link(netns_name=guest_ns, host_ifname=f"sp-{tag}-v",
                                    bridge=bridge, address=ipaddress.IPv4Interface(
                                        f"{guest_ip}/24"), gateway=gw.ip)
        # The "remote" host: its own netns on its own link to the host, routed via R.1.
        subprocess.run(["ip", "netns", "add", remote_ns], check=True)
        subprocess.run(["ip", "link", "add", remote_link, "type", "veth", "peer", "name",
                        "eth0", "netns", remote_ns], check=True)
        subprocess.run(["ip", "addr", "add", str(r_host), "dev", remote_link], check=True)
        subprocess.run(["ip", "link", "set", remote_link, "up"], check=True)
        for cmd in (["addr", "add", str(r_remote), "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                    ["route", "add", "default", "via", str(r_host.ip)]):
            subprocess.run(["ip", "-n", remote_ns, *cmd], check=True)
        # Remote clients' packets are forwarded from this link to the bridge (the test's
        # own link; the gateway enables forwarding on its bridge).
        nft.set_sysctl(f"net/ipv4/conf/{remote_link}/forwarding", "1")
        # The guest keeps the host's /tmp (bound onto itself): this interpreter may live
        # under /tmp (a CI clone), and a private /tmp would hide it.
        server = subprocess.Popen([sys.executable, "-I", "-S", str(NSEXEC), guest_ns, "/tmp",
                                   "--", sys.executable, "-I", "-c", ECHO_SERVER, str(log)],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield {"bridge": bridge, "guest_ip": str(guest_ip), "remote_ns": remote_ns,
               "host_addr": str(r_host.ip), "remote_ip": str(r_remote.ip), "log": log,
               "tmp": tmp_path}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        nft.remove(bridge)
        for ns in (guest_ns, remote_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for link in (remote_link, f"sp-{tag}-v", bridge):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


def client(netns: str | None, tmp: Path, host: str, port: int, proto: str) -> str:
    if netns is None:
        r = subprocess.run([sys.executable, "-I", "-c", CLIENT, host, str(port), proto],
                           capture_output=True, text=True, timeout=30, check=False)
    else:
        r = in_netns(netns, tmp, CLIENT, host, str(port), proto)
    return (r.stdout + r.stderr).strip()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_local_and_remote_clients_reach_the_guest(topology: dict[str, Any]) -> None:
    t = topology
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    rules = [nft.DnatRule(host_ip="0.0.0.0", host_port=tport, guest_ip=t["guest_ip"],
                          guest_port=7),
             nft.DnatRule(host_ip="0.0.0.0", host_port=uport, guest_ip=t["guest_ip"],
                          guest_port=7, protocol="udp")]
    nft.apply(t["bridge"], rules)
    for proto, port in (("tcp", tport), ("udp", uport)):
        # On the host: 127.0.0.1 (output hook + route_localnet + masquerade) ...
        assert client(None, t["tmp"], "127.0.0.1", port, proto) == "OK", proto
        # ... and the host's own address (output hook).
        assert client(None, t["tmp"], t["host_addr"], port, proto) == "OK", proto
        # A remote host (prerouting hook), whose address the guest sees unchanged.
        assert client(t["remote_ns"], t["tmp"], t["host_addr"], port, proto) == "OK", proto
    seen = t["log"].read_text().split("\n")
    assert f"tcp {t['remote_ip']}" in seen and f"udp {t['remote_ip']}" in seen


def test_without_the_output_rule_local_clients_fail(topology: dict[str, Any]) -> None:
    """Incident 000 reproduced: DNAT only in prerouting never serves a local client."""
    t = topology
    port = free_port()
    rule = nft.DnatRule(host_ip="0.0.0.0", host_port=port, guest_ip=t["guest_ip"], guest_port=7)
    nft.apply(t["bridge"], [rule])
    assert client(None, t["tmp"], "127.0.0.1", port, "tcp") == "OK"
    subprocess.run(["nft", "flush", "chain", "ip", "sandport", f"out-{t['bridge']}"], check=True)
    assert "refused" in client(None, t["tmp"], "127.0.0.1", port, "tcp").lower()
    assert client(t["remote_ns"], t["tmp"], t["host_addr"], port, "tcp") == "OK"
    nft.apply(t["bridge"], [rule])  # reconcile brings the output rule back
    assert client(None, t["tmp"], "127.0.0.1", port, "tcp") == "OK"


def expected_rules(bridge: str, rules: list[nft.DnatRule]) -> list[tuple[str, str]]:
    out = []
    for r in rules:
        out += [(f"pre-{bridge}", r.comment), (f"out-{bridge}", r.comment)]
    return sorted([*out, (f"post-{bridge}", "sandport: replies to 127.0.0.1")])


def test_reapply_after_kill_9_is_exact_and_leaves_other_gateways_alone(
    topology: dict[str, Any],
) -> None:
    t = topology
    bridge = t["bridge"]
    other = test_net_names()[0]
    rules = [nft.DnatRule(host_ip="0.0.0.0", host_port=20000 + i, guest_ip=t["guest_ip"],
                          guest_port=7) for i in range(3)]
    with pytest.raises(nft.NftError, match=f"bridge {other} does not exist"):
        nft.apply(other, [nft.DnatRule(host_ip="127.0.0.1", host_port=29999,
                                       guest_ip="10.201.99.2", guest_port=1)])
    subprocess.run(["ip", "link", "add", other, "type", "bridge"], check=True)
    try:
        nft.apply(other, [nft.DnatRule(host_ip="127.0.0.1", host_port=29999,
                                       guest_ip="10.201.99.2", guest_port=1)])
        other_before = nft.rules_of(other)
        # A gateway writes its rules and is SIGKILLed: no cleanup runs.
        code = ("import sys, time; from sandport.net import nft; "
                f"nft.apply({bridge!r}, [nft.DnatRule(host_ip='0.0.0.0', host_port=20000 + i, "
                f"guest_ip={t['guest_ip']!r}, guest_port=7) for i in range(5)]); "
                "print('applied', flush=True); time.sleep(60)")
        crashed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert crashed.stdout is not None and crashed.stdout.readline().strip() == "applied"
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.wait()
        assert len(nft.rules_of(bridge)) == 11
        # A stray chain of this gateway (e.g. from an older version) is removed too.
        subprocess.run(["nft", "add", "chain", "ip", "sandport", f"old-{bridge}"], check=True)
        # The restart applies its (smaller) set: exactly that remains, twice over.
        for _ in range(2):
            nft.apply(bridge, rules)
            assert sorted(nft.rules_of(bridge)) == expected_rules(bridge, rules)
        assert sorted(nft.own_chains(bridge)) == sorted(nft.chain_names(bridge))
        assert nft.rules_of(other) == other_before
        nft.remove(bridge)
        assert nft.own_chains(bridge) == [] and nft.rules_of(other) == other_before
    finally:
        nft.remove(other)
        subprocess.run(["ip", "link", "del", other], check=False)
    nft.remove(bridge)
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    # The last gateway out deletes the shared table (unless someone else's gateway runs).
    assert "sandport" not in tables or _someone_else_has_chains()


def _someone_else_has_chains() -> bool:
    """A gateway that is not ours (a user's) may keep the shared table alive."""
    out = subprocess.run(["nft", "-j", "list", "table", "ip", "sandport"], capture_output=True,
                         text=True).stdout
    return '"chain"' in out
