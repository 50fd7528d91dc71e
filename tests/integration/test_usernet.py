"""usernet against a real kernel: a namespace whose eth0 is a TAP device served by usernet.

busybox ``udhcpc`` inside the namespace gets its lease (address, router, DNS, MTU) from
usernet's DHCP server, and the namespace's kernel then pings the gateway address, which
only usernet answers (ARP and ICMP echo). No bridge, no veth, no host route: every frame
goes through the stack. Traffic stays inside the test's own namespace.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_programs, require_root
from sandport.usernet.link import LinkConfig, LinkServices
from sandport.usernet.tap import TapTransport, tap_into_netns

pytestmark = pytest.mark.integration

NETWORK = ipaddress.IPv4Network("10.201.240.0/24")
GATEWAY = ipaddress.IPv4Address("10.201.240.1")
GUEST = ipaddress.IPv4Address("10.201.240.15")
GATEWAY_MAC = bytes.fromhex("52540000ff01")

# udhcpc runs this on each event; it applies the lease and records what it was given.
LEASE_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    echo "ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu lease=$lease serverid=$serverid" \\
      > "$LEASE_OUT" ;;
esac
exit 0
"""


@pytest.fixture
def served_netns(loop_thread: Any) -> Iterator[tuple[str, LinkServices, TapTransport]]:
    require_root()
    require_programs("busybox")
    tag = secrets.token_hex(3)
    netns = f"sp-u{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    transport: TapTransport | None = None
    try:
        fd = tap_into_netns(f"sp-u{tag}-t", netns)
        link = LinkServices(LinkConfig(gateway_ip=GATEWAY, gateway_mac=GATEWAY_MAC,
                                       network=NETWORK, guest_ip=GUEST, mtu=65520))
        transport = TapTransport(
            fd, lambda frames: [r for f in frames for r in link.handle(f)])

        async def start() -> None:
            assert transport is not None
            transport.start()

        loop_thread.run(start())
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        yield netns, link, transport
    finally:
        if transport is not None:
            t = transport

            async def stop() -> None:
                t.close()

            loop_thread.run(stop())
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_udhcpc_gets_its_lease_from_usernet_and_pings_the_gateway(
        served_netns: Any, tmp_path: Path) -> None:
    netns, link, transport = served_netns
    script = tmp_path / "lease.sh"
    script.write_text(LEASE_SCRIPT)
    script.chmod(0o755)
    out = tmp_path / "lease.txt"
    r = subprocess.run(["ip", "netns", "exec", netns, "busybox", "udhcpc", "-i", "eth0",
                        "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", str(script),
                        "-O", "mtu"],
                       env={**os.environ, "LEASE_OUT": str(out)}, capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lease = dict(kv.split("=", 1) for kv in out.read_text().split())
    assert lease["ip"] == str(GUEST) and lease["router"] == str(GATEWAY)
    assert lease["mask"] == "24" and lease["dns"] == str(GATEWAY)
    assert lease["mtu"] == "65520" and lease["serverid"] == str(GATEWAY)
    addrs = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert f"inet {GUEST}/24" in addrs
    # The namespace's kernel ARPs for the gateway and pings it: only usernet answers.
    ping = subprocess.run(["ip", "netns", "exec", netns, "busybox", "ping", "-c", "3",
                           "-W", "2", str(GATEWAY)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert ping.returncode == 0 and "3 packets received" in ping.stdout, ping.stdout
    assert link.handled["dhcp_offer"] >= 1 and link.handled["dhcp_ack"] == 1
    assert link.handled["arp_reply"] >= 1 and link.handled["icmp_echo_reply"] == 3
    assert link.guest_mac is not None and transport.frames_in >= 5
    assert not transport.errors
