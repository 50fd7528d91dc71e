"""The guard's nft scripts (host isolation, anti-spoofing) and the doctor's words on it,
without a kernel: what is written, and what is refused before nft sees it."""

from __future__ import annotations

import pytest

from sandport.doctor import IsolationFacts, Subject, Walk
from sandport.doctor.walk import _isolation
from sandport.net import antispoof, nft
from sandport.sandbox.qemu import guest_mac

GUARD = nft.HostGuard(gateway_ip="10.201.5.1", agent_port=7411)
FWD = nft.DnatRule(host_ip="127.0.0.1", host_port=15901, guest_ip="10.201.5.2",
                   guest_port=5901, egress="sp-x1-h")


def test_the_host_guard_opens_only_the_agent_port_ping_and_replies() -> None:
    script = nft.render("sp-tb", [], GUARD)
    rules = [line for line in script.splitlines() if line.startswith("add rule")]
    assert rules[0].endswith('ct state established,related accept comment '
                             '"sandport guard: replies to connections the host opened"')
    accepts = [r for r in rules if " accept" in r and "in-sp-tb" in r]
    assert [r.split("in-sp-tb ")[1].split(" accept")[0] for r in accepts[1:]] == [
        'iifname "sp-tb" ip daddr 10.201.5.1 tcp dport 7411',
        'iifname "sp-tb" ip daddr 10.201.5.1 icmp type echo-request']
    # Every other packet from the bridge is counted and dropped; loopback separately.
    assert f'iifname "sp-tb" ip daddr 127.0.0.0/8 counter drop comment ' \
           f'"{nft.localnet_comment("sp-tb")}"' in script
    assert f'iifname "sp-tb" counter drop comment "{nft.host_comment("sp-tb")}"' in script
    assert 'iifname != { "lo", "sp-tb" } ip daddr 10.201.5.1 counter drop' in script
    assert 'oifname "sp-tb" ct status dnat accept' in script  # kernel forwards, nothing else
    assert sorted(nft._chains("sp-tb", [], GUARD)) == sorted(
        [*nft.chain_names("sp-tb"), *nft.guard_chain_names("sp-tb")])


def test_loopback_is_dropped_wherever_route_localnet_goes_on() -> None:
    # Without a guard (forwards alone): the bridge and the attached target's link.
    script = nft.render("sp-tb", [FWD])
    for link in ("sp-tb", "sp-x1-h"):
        assert f'iifname "{link}" ip daddr 127.0.0.0/8 counter drop comment ' \
               f'"{nft.localnet_comment(link)}"' in script
    assert nft._chains("sp-tb", [FWD], None)[-1] == "in-sp-tb"
    # No forward, no guard: no route_localnet, no input chain at all.
    assert "in-sp-tb" not in nft.render("sp-tb", [])
    # The drop comes after the accept of replies: a 127.0.0.1 client's forward works.
    lines = nft.render("sp-tb", [FWD], GUARD).splitlines()
    replies = next(i for i, line in enumerate(lines) if "established,related accept" in line)
    assert all(i > replies for i, line in enumerate(lines) if "127.0.0.0/8 counter drop" in line)


@pytest.mark.parametrize(("field", "value"), [
    ("port", "eth0"), ("port", "sp-x;drop"), ("port", "sp-0123456789abc"),
    ("mac", "52:54:00:AA:BB:CC"), ("mac", "52:54:00:aa:bb"), ("ip", "10.1.2"),
])
def test_a_port_guard_refuses_what_is_not_a_sandbox_port(field: str, value: str) -> None:
    good = {"port": "sp-abc123-v", "mac": "52:54:00:aa:bb:cc", "ip": "10.201.5.2"}
    with pytest.raises(ValueError):
        antispoof.PortGuard(**{**good, field: value})


def test_anti_spoofing_lets_only_the_ports_own_mac_ip_and_arp_through() -> None:
    g = antispoof.PortGuard(port="sp-abc123-v", mac="52:54:00:aa:bb:cc", ip="10.201.5.2")
    script = antispoof.render("sp-tb", [g])
    chain = "port-sp-abc123-v-sp-tb"
    assert f'iifname vmap {{ "sp-abc123-v" : jump {chain} }}' in script
    body = [line.split(f"{chain} ", 1)[1] for line in script.splitlines()
            if line.startswith(f"add rule bridge sandport {chain} ")]
    assert body == [
        'ether saddr != 52:54:00:aa:bb:cc counter drop comment "sandport spoof sp-abc123-v mac"',
        "ether type ip ip saddr 10.201.5.2 accept",
        'ether type ip counter drop comment "sandport spoof sp-abc123-v ip"',
        "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation "
        "{ request, reply } arp saddr ether 52:54:00:aa:bb:cc arp saddr ip 10.201.5.2 "
        'accept comment "sandport allow sp-abc123-v 52:54:00:aa:bb:cc 10.201.5.2"',
        'ether type arp counter drop comment "sandport spoof sp-abc123-v arp"',
        'counter drop comment "sandport spoof sp-abc123-v other"',
    ]
    assert "vmap" not in antispoof.render("sp-tb", [])


def test_a_sandboxs_mac_is_its_ids_for_namespaces_and_vms_alike() -> None:
    assert antispoof.sandbox_mac("abc123") == guest_mac("abc123")
    assert antispoof.sandbox_mac("abc123").startswith("52:54:00:")
    assert antispoof.sandbox_mac("abc123") != antispoof.sandbox_mac("abc124")


def _walk(iso: IsolationFacts) -> list[tuple[str, str, str]]:
    walk = Walk()
    _isolation(walk, Subject(sandbox="abc123", known=True, ip="10.201.5.2", isolation=iso))
    return [(r.check, r.status, r.evidence) for r in walk.rows]


def test_the_doctor_names_the_guard_and_what_it_dropped() -> None:
    ok = IsolationFacts(link="sp-tb", guarded=True, host_drops=3, localnet_drops=2,
                        agent="10.201.5.1:7411", port="sp-abc123-v", port_guarded=True,
                        mac="52:54:00:aa:bb:cc", spoofed=(("mac", 0), ("other", 4)))
    (host, spoof) = _walk(ok)
    assert host[:2] == ("host isolation", "ok") and "3 packet(s) to host services, 2 to " \
        "127.0.0.0/8" in host[2]
    assert spoof[:2] == ("anti-spoofing", "ok")
    spoofing = IsolationFacts(**{**{f: getattr(ok, f) for f in ok.__slots__},
                                 "spoofed": (("mac", 1), ("ip", 2), ("arp", 30))})
    (_, spoof) = _walk(spoofing)
    assert spoof[1] == "warn" and "dropped 33 frame(s) from sp-abc123-v" in spoof[2]
    missing = IsolationFacts(link="sp-tb", guarded=False, agent="10.201.5.1:7411")
    assert _walk(missing) == [("host isolation", "warn", "table ip sandport has no host "
                               "isolation for sp-tb: the sandbox reaches every host service")]
