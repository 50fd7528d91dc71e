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

from conftest import require_programs, require_root, test_net_names
from nethelpers import ECHO_SERVER, client, free_port, guest_server, remote_host
from sandport.net import netlink, nft

pytestmark = pytest.mark.integration

@pytest.fixture
def topology(tmp_path: Path) -> Iterator[dict[str, Any]]:
    require_root()
    require_programs("nft")
    bridge, guest_net = test_net_names()
    guest_ns, guest_link = f"sp-{secrets.token_hex(3)}", ""
    gw = ipaddress.IPv4Interface(f"{guest_net.network_address + 1}/24")
    guest_ip = gw.ip + 1
    log = tmp_path / "echo.log"
    try:
        netlink.ensure_bridge(bridge, gw)
        guest_link = f"{guest_ns}-v"
        netlink.create_sandbox_link(netns_name=guest_ns, host_ifname=guest_link,
                                    bridge=bridge, address=ipaddress.IPv4Interface(
                                        f"{guest_ip}/24"), gateway=gw.ip)
        with remote_host() as remote, guest_server(guest_ns, ECHO_SERVER, str(log)):
            yield {"bridge": bridge, "guest_ip": str(guest_ip), "remote_ns": remote.netns,
                   "remote_link": remote.link, "host_addr": remote.host_ip,
                   "remote_ip": remote.ip, "log": log, "tmp": tmp_path}
    finally:
        nft.remove(bridge)
        subprocess.run(["ip", "netns", "del", guest_ns], capture_output=True, check=False)
        for link in (guest_link, bridge):
            if link:
                subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


def test_local_and_remote_clients_reach_the_guest(topology: dict[str, Any]) -> None:
    t = topology
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    rules = [nft.DnatRule(host_ip="0.0.0.0", host_port=tport, guest_ip=t["guest_ip"],
                          guest_port=7),
             nft.DnatRule(host_ip="0.0.0.0", host_port=uport, guest_ip=t["guest_ip"],
                          guest_port=7, protocol="udp")]
    # Remote clients arrive on the test's link: apply() turns forwarding on for exactly it.
    assert nft.ingress_interfaces(rules, {"lo": ["127.0.0.1"], t["remote_link"]: [
        t["host_addr"]]}) == [t["remote_link"]]
    nft.apply(t["bridge"], rules, ingress=[t["remote_link"]])
    assert Path(f"/proc/sys/net/ipv4/conf/{t['remote_link']}/forwarding").read_text() == "1\n"
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
    nft.apply(t["bridge"], [rule], ingress=[t["remote_link"]])
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
        # route_localnet is on for the rules: 127.0.0.0/8 from the bridge is dropped.
        assert sorted(nft.own_chains(bridge)) == sorted([*nft.chain_names(bridge),
                                                         f"in-{bridge}"])
        assert nft.guard_rules(bridge) == [
            (f"in-{bridge}", "sandport guard: replies to connections the host opened"),
            (f"in-{bridge}", nft.localnet_comment(bridge))]
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
