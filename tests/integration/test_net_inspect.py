"""Read-only host checks (sandport.net.inspect) against sockets, rules and links of our own.

Topology built by each test that needs one (names sp-i<tag>…, a /24 in
10.201.200.0-10.201.209.0 derived from the tag):

    host: veth sp-i<tag>-a  N.1/24 ── netns sp-i<tag>: eth0 N.2/24 (N.77 is unused)
          nft table inet sp_inspect_<tag> (output hook, rules only for N.*)

Everything is removed in the fixture's teardown, whatever the test did.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_programs, require_root
from nethelpers import guest_server
from sandport.net import inspect
from sandport.net.inspect import nftrules

pytestmark = pytest.mark.integration

SERVER_PORT = 7070
TCP_SERVER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {SERVER_PORT})); s.listen(16)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _nft(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "nft", *args], capture_output=True, text=True, check=True)


def _subnet(tag: str) -> ipaddress.IPv4Network:
    """A /24 in 10.201.200.0-10.201.209.0, chosen by the tag, that no interface uses."""
    used = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    start = int(tag, 16) % 10
    for i in range(10):
        net = ipaddress.IPv4Network(f"10.201.{200 + (start + i) % 10}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    pytest.fail("no free /24 in 10.201.200.0-10.201.209.0: remove the leftover sp-i* links")


@dataclass(frozen=True, slots=True, kw_only=True)
class Topo:
    tag: str
    netns: str
    veth: str
    bridge: str
    table: str
    net: ipaddress.IPv4Network
    host_ip: str
    ns_ip: str
    unused_ip: str

    def host_rule(self, rule: str) -> None:
        """Add ``rule`` to the output chain of this test's own host table."""
        _nft("add", "rule", "inet", self.table, "out", *rule.split())


@pytest.fixture
def tag() -> str:
    return secrets.token_hex(3)


@pytest.fixture
def nft_table(tag: str) -> Iterator[str]:
    """A table ``inet sp_inspect_<tag>``: output chain ``out`` (policy accept) and a regular
    chain ``idle`` that no hook reaches (its rules never see a packet)."""
    require_root()
    require_programs("nft")
    table = f"sp_inspect_{tag}"
    try:
        _nft("add", "table", "inet", table)
        _nft("add", "chain", "inet", table, "out",
             "{ type filter hook output priority 0; policy accept; }")
        _nft("add", "chain", "inet", table, "idle")
        yield table
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True,
                       check=False)


@pytest.fixture
def topo(tag: str, nft_table: str) -> Iterator[Topo]:
    net = _subnet(tag)
    hosts = list(net.hosts())
    t = Topo(tag=tag, netns=f"sp-i{tag}", veth=f"sp-i{tag}-a", bridge=f"sp-i{tag}-b",
             table=nft_table, net=net, host_ip=str(hosts[0]), ns_ip=str(hosts[1]),
             unused_ip=str(hosts[76]))
    try:
        _ip("netns", "add", t.netns)
        _ip("link", "add", t.veth, "type", "veth", "peer", "name", "eth0", "netns", t.netns)
        _ip("addr", "add", f"{t.host_ip}/24", "dev", t.veth)
        _ip("link", "set", t.veth, "up")
        _ip("-n", t.netns, "addr", "add", f"{t.ns_ip}/24", "dev", "eth0")
        _ip("-n", t.netns, "link", "set", "eth0", "up")
        _ip("-n", t.netns, "link", "set", "lo", "up")
        yield t
    finally:
        _ip("netns", "del", t.netns, check=False)
        _ip("link", "del", t.veth, check=False)
        _ip("link", "del", t.bridge, check=False)


def _our_rules(address: str, table: str) -> list[inspect.NftRuleRef]:
    return [r for r in inspect.rules_dropping(address) if r.table == table]


def _handles(table: str, chain: str) -> dict[str, int]:
    """Rule handles of a chain of ``table`` by the value their first match names."""
    out = subprocess.run(["nft", "-j", "list", "chain", "inet", table, chain],
                         capture_output=True, text=True, check=True).stdout
    handles = {}
    for item in json.loads(out)["nftables"]:
        if "rule" in item:
            right = item["rule"]["expr"][0]["match"]["right"]
            handles[json.dumps(right, sort_keys=True)] = item["rule"]["handle"]
    return handles


# --- sockets ----------------------------------------------------------------------------

def _own_command() -> str:
    argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    return " ".join(a.decode() for a in argv if a)[:200]


def test_listeners_finds_a_listening_socket_and_forgets_it_once_closed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        found = inspect.listeners(port)
        assert inspect.SocketHolder(pid=os.getpid(), command=_own_command(),
                                    address=f"127.0.0.1:{port}") in found
        assert all(h.address == f"127.0.0.1:{port}" for h in found)
    assert [h for h in inspect.listeners(port) if h.pid == os.getpid()] == []
    assert [h for h in inspect.bound(port) if h.pid == os.getpid()] == []


def test_listeners_decodes_ipv6_and_ipv4_mapped_addresses() -> None:
    with socket.socket(socket.AF_INET6) as wild, socket.socket(socket.AF_INET6) as mapped:
        wild.bind(("::", 0))
        wild.listen()
        mapped.bind(("::ffff:127.0.0.1", 0))
        mapped.listen()
        wport, mport = wild.getsockname()[1], mapped.getsockname()[1]
        assert [h.address for h in inspect.listeners(wport) if h.pid == os.getpid()] == [
            f"[::]:{wport}"]
        assert [h.address for h in inspect.listeners(mport) if h.pid == os.getpid()] == [
            f"[::ffff:127.0.0.1]:{mport}"]


def test_bound_finds_a_bound_socket_that_does_not_listen() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port reservation, as a kernel-mode forward makes
        port = s.getsockname()[1]
        mine = [h for h in inspect.bound(port) if h.pid == os.getpid()]
        assert [h.address for h in mine] == [f"127.0.0.1:{port}"]
        assert mine[0].command == _own_command()
        assert [h for h in inspect.listeners(port) if h.pid == os.getpid()] == []


def test_bound_counts_accepted_connections_and_listeners_only_the_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            with conn:
                server.close()
                assert [h for h in inspect.listeners(port) if h.pid == os.getpid()] == []
                assert [h.address for h in inspect.bound(port) if h.pid == os.getpid()] == [
                    f"127.0.0.1:{port}"]
                assert client.getsockname()[1] != port


def test_udp_socket_is_found_as_udp_only() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        expected = inspect.SocketHolder(pid=os.getpid(), command=_own_command(),
                                        address=f"127.0.0.1:{port}")
        assert expected in inspect.listeners(port, "udp")
        assert expected in inspect.bound(port, "udp")
        assert expected not in inspect.listeners(port, "tcp")
        assert expected not in inspect.bound(port, "tcp")
    assert expected not in inspect.listeners(port, "udp")
    with pytest.raises(ValueError, match="protocol"):
        inspect.listeners(port, "sctp")


# --- nftables ---------------------------------------------------------------------------

def test_rules_dropping_by_address_prefix_range_and_set(nft_table: str, tag: str) -> None:
    # The rules live in a chain no hook reaches: they are found but never drop a packet.
    net = f"10.201.{200 + int(tag, 16) % 10}"

    def add(*rule: str) -> None:
        _nft("add", "rule", "inet", nft_table, "idle", *rule)

    add("ip", "daddr", f"{net}.5", "drop")
    add("ip", "saddr", f"{net}.128/25", "counter", "reject")
    add("ip", "daddr", f"{net}.6", "accept")
    add("ip", "daddr", f"{{ {net}.30, {net}.40-{net}.50 }}", "drop")
    add("ip", "daddr", "!=", f"{net}.7", "ip", "daddr", f"{net}.0/24", "drop")  # all but .7
    _nft("add", "set", "inet", nft_table, "blocked", "{ type ipv4_addr; flags interval; }")
    _nft("add", "element", "inet", nft_table, "blocked", f"{{ {net}.60, {net}.64/30 }}")
    add("ip", "daddr", "@blocked", "reject")
    handles = _handles(nft_table, "idle")

    exact = _our_rules(f"{net}.5", nft_table)
    assert [(r.family, r.chain, r.verdict) for r in exact] == [("inet", "idle", "drop")] * 2
    assert exact[0].handle == handles[json.dumps(f"{net}.5")]
    assert exact[0].text == f"ip daddr {net}.5 drop"
    assert exact[1].text == f"ip daddr != {net}.7 ip daddr {net}.0/24 drop"

    prefixed = _our_rules(f"{net}.200", nft_table)
    assert [r.verdict for r in prefixed] == ["reject", "drop"]
    # nft fills in the default of a bare reject after an ip match: icmp port-unreachable.
    assert prefixed[0].text == f"ip saddr {net}.128/25 counter reject with icmp port-unreachable"

    in_set = _our_rules(f"{net}.45", nft_table)
    assert [r.verdict for r in in_set] == ["drop", "drop"]
    assert in_set[0].text == f"ip daddr {{ {net}.30, {net}.40-{net}.50 }} drop"

    named = _our_rules(f"{net}.66", nft_table)
    assert [(r.verdict, r.text) for r in named] == [
        ("drop", exact[1].text), ("reject", "ip daddr @blocked reject with icmp port-unreachable")]
    assert [r.text for r in _our_rules(f"{net}.60", nft_table)][-1] == named[1].text
    assert [r.text for r in _our_rules(f"{net}.68", nft_table)] == [exact[1].text]

    # .6 has an accept rule (not reported) and the /24 rule; the /24 rule spares .7.
    assert [r.text for r in _our_rules(f"{net}.6", nft_table)] == [exact[1].text]
    assert _our_rules(f"{net}.7", nft_table) == []
    assert _our_rules("10.201.199.1", nft_table) == []
    assert inspect.rules_dropping("not an address") == []


def test_rules_dropping_without_nft_is_empty(nft_table: str, tag: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"10.201.{200 + int(tag, 16) % 10}.5"
    _nft("add", "rule", "inet", nft_table, "idle", "ip", "daddr", address, "drop")
    assert len(_our_rules(address, nft_table)) == 1
    monkeypatch.setattr(nftrules.shutil, "which", lambda _name: None)
    assert inspect.rules_dropping(address) == []


def test_rules_dropping_skips_our_own_table(monkeypatch: pytest.MonkeyPatch) -> None:
    def rule(family: str, table: str) -> dict[str, object]:
        match = {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                 "right": "10.201.0.5"}
        return {"rule": {"family": family, "table": table, "chain": "c", "handle": 4,
                         "expr": [{"match": match}, {"drop": None}]}}

    ruleset = [{"metainfo": {}}, rule("ip", "sandport"), rule("inet", "sandport"),
               rule("ip", "other")]
    monkeypatch.setattr(nftrules, "_ruleset", lambda: ruleset)
    assert [(r.family, r.table) for r in inspect.rules_dropping("10.201.0.5")] == [
        ("inet", "sandport"), ("ip", "other")]


# --- ping, connect, neighbours ----------------------------------------------------------

def test_ping_answered_and_unanswered(topo: Topo) -> None:
    ok = inspect.ping(topo.ns_ip)
    assert ok.ok, ok.detail
    assert ok.rtt is not None and 0 < ok.rtt < 1
    assert topo.ns_ip in ok.detail

    start = time.monotonic()
    lost = inspect.ping(topo.unused_ip)
    elapsed = time.monotonic() - start
    assert not lost.ok and lost.rtt is None
    assert lost.detail == "no echo reply in 1 s"
    assert 0.9 < elapsed < 1.5

    assert inspect.neighbour_state(topo.ns_ip) in ("reachable", "stale", "delay")
    assert inspect.neighbour_state(topo.unused_ip) in ("incomplete", "failed", None)
    assert inspect.neighbour_state(str(topo.net.network_address + 99)) is None


def test_ping_reports_icmp_unreachable_and_send_errors(topo: Topo) -> None:
    _nft("add", "table", "inet", "t", netns=topo.netns)  # gone with the namespace
    _nft("add", "chain", "inet", "t", "in",
         "{ type filter hook input priority 0; policy accept; }", netns=topo.netns)
    _nft("add", "rule", "inet", "t", "in", "icmp", "type", "echo-request", "reject", "with",
         "icmp", "type", "host-unreachable", netns=topo.netns)
    refused = inspect.ping(topo.ns_ip)
    assert not refused.ok and refused.rtt is None
    assert refused.detail == f"host unreachable (ICMP type 3 code 1) from {topo.ns_ip}"

    topo.host_rule(f"ip daddr {topo.ns_ip} icmp type echo-request drop")
    dropped = inspect.ping(topo.ns_ip)  # dropped on output: sendto fails at once
    assert not dropped.ok
    assert dropped.detail == os.strerror(1)  # EPERM: "Operation not permitted"

    assert inspect.ping("10.201.300.1").detail.startswith("not an IPv4 address")


def test_connect_outcomes(topo: Topo) -> None:
    with guest_server(topo.netns, TCP_SERVER):
        outcome, detail = inspect.connect_outcome(topo.ns_ip, SERVER_PORT)
        assert outcome == "open", detail
        assert f"{topo.ns_ip}:{SERVER_PORT}" in detail

        outcome, detail = inspect.connect_outcome(topo.ns_ip, SERVER_PORT + 1)
        assert outcome == "refused", detail

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]  # bound, never listening: connects are refused
            assert inspect.connect_outcome("127.0.0.1", closed)[0] == "refused"

        topo.host_rule(f"ip daddr {topo.ns_ip} tcp dport {SERVER_PORT} drop")
        start = time.monotonic()
        outcome, detail = inspect.connect_outcome(topo.ns_ip, SERVER_PORT, timeout=0.5)
        assert outcome == "timeout", detail
        assert 0.4 < time.monotonic() - start < 1.5
        assert [r.verdict for r in _our_rules(topo.ns_ip, topo.table)] == ["drop"]

    outcome, detail = inspect.connect_outcome(topo.unused_ip, SERVER_PORT)
    assert outcome in ("no_route", "timeout"), detail
    assert inspect.connect_outcome("no-such-host.invalid", 80)[0] == "error"
    assert inspect.connect_outcome("127.0.0.1", 70000)[0] == "error"


def test_connect_no_route_when_arp_gets_no_answer(topo: Topo) -> None:
    # Three unanswered ARP requests, 1 s apart: then the kernel fails the connect with
    # EHOSTUNREACH (a shorter timeout sees only "timeout", as in test_connect_outcomes).
    start = time.monotonic()
    outcome, detail = inspect.connect_outcome(topo.unused_ip, SERVER_PORT, timeout=6)
    assert outcome == "no_route", detail
    assert "No route to host" in detail
    assert 2 < time.monotonic() - start < 5.5
    assert inspect.neighbour_state(topo.unused_ip) == "failed"


# --- links ------------------------------------------------------------------------------

def test_link_facts_of_a_veth_and_a_bridge_port(topo: Topo) -> None:
    facts = inspect.link_facts(topo.veth)
    assert facts == inspect.LinkFacts(exists=True, up=True, master=None,
                                      addresses=(f"{topo.host_ip}/24",), isolated=None)
    assert inspect.link_facts(f"sp-i{topo.tag}-z") == inspect.LinkFacts(exists=False)

    _ip("link", "add", topo.bridge, "type", "bridge")
    assert inspect.link_facts(topo.bridge) == inspect.LinkFacts(exists=True, up=False)
    _ip("link", "set", topo.veth, "master", topo.bridge)
    port = inspect.link_facts(topo.veth)
    assert port.master == topo.bridge
    assert port.isolated is False
    subprocess.run(["bridge", "link", "set", "dev", topo.veth, "isolated", "on"], check=True)
    assert inspect.link_facts(topo.veth).isolated is True
    _ip("link", "set", topo.veth, "down")
    assert inspect.link_facts(topo.veth).up is False
