"""Unit tests for the usernet link services (sandport.usernet.link): ARP, ping, DHCP.

Every reply is parsed back layer by layer with the strict parsers, so a wrong checksum or
length in a reply fails the test, not only a wrong field.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from sandport.proto.packets import (
    ARP_REPLY,
    BROADCAST,
    ETH_ARP,
    ETH_IPV4,
    ICMP_ECHO_REPLY,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    ArpPacket,
    DhcpMessage,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    UdpDatagram,
)
from sandport.proto.packets.dhcp import DHCPACK, DHCPNAK, DHCPOFFER, FLAG_BROADCAST
from sandport.usernet.link import LinkConfig, LinkServices

pytestmark = pytest.mark.unit

GW_MAC = bytes.fromhex("02000a0000fe")
GUEST_MAC = bytes.fromhex("525400123456")
GW = IPv4Address("10.201.240.1")
GUEST = IPv4Address("10.201.240.2")
ZERO = IPv4Address("0.0.0.0")
ALL = IPv4Address("255.255.255.255")
CONFIG = LinkConfig(
    gateway_ip=GW, gateway_mac=GW_MAC, network=IPv4Network("10.201.240.0/24"),
    guest_ip=GUEST, dns_ip=IPv4Address("10.201.240.53"), mtu=1400, lease_seconds=600,
)  # fmt: skip


@pytest.fixture
def link() -> LinkServices:
    return LinkServices(CONFIG)


def eth(payload: bytes, ethertype: int = ETH_IPV4, dst: bytes = GW_MAC) -> bytes:
    return EthernetFrame(dst=dst, src=GUEST_MAC, ethertype=ethertype, payload=payload).build()


def ip_frame(proto: int, payload: bytes, src: IPv4Address = GUEST, dst: IPv4Address = GW,
             mac: bytes = GW_MAC) -> bytes:  # fmt: skip
    return eth(IPv4Packet(src=src, dst=dst, proto=proto, payload=payload).build(), dst=mac)


def dhcp_frame(kind: int, *, flags: int = 0, ciaddr: IPv4Address = ZERO, dst: IPv4Address = ALL,
               **options: bytes) -> bytes:  # fmt: skip
    opts = {53: bytes((kind,))} | {int(k[1:]): v for k, v in options.items()}
    msg = DhcpMessage(op=1, xid=0xABCD, chaddr=GUEST_MAC, flags=flags, ciaddr=ciaddr,
                      options=opts).build()  # fmt: skip
    src = ciaddr
    udp = UdpDatagram(sport=68, dport=67, payload=msg).build(src, dst)
    return ip_frame(PROTO_UDP, udp, src=src, dst=dst, mac=BROADCAST if dst == ALL else GW_MAC)


def parse_dhcp_reply(frame: bytes) -> tuple[EthernetFrame, IPv4Packet, DhcpMessage]:
    e = EthernetFrame.parse(frame)
    assert e.src == GW_MAC and e.ethertype == ETH_IPV4
    ip = IPv4Packet.parse(e.payload)
    assert ip.src == GW and ip.proto == PROTO_UDP
    udp = UdpDatagram.parse(ip.payload, ip.src, ip.dst)  # verifies the checksum
    assert (udp.sport, udp.dport) == (67, 68)
    assert udp.build(ip.src, ip.dst) == ip.payload  # the checksum field was set, not 0
    return e, ip, DhcpMessage.parse(udp.payload)


# -- ARP -------------------------------------------------------------------------------------


def test_arp_request_for_gateway_is_answered(link: LinkServices) -> None:
    request = ArpPacket(op=1, sha=GUEST_MAC, spa=GUEST, tha=bytes(6), tpa=GW).build()
    [reply] = link.handle(eth(request + bytes(18), ETH_ARP, BROADCAST))
    e = EthernetFrame.parse(reply)
    assert (e.dst, e.src, e.ethertype) == (GUEST_MAC, GW_MAC, ETH_ARP)
    assert ArpPacket.parse(e.payload) == ArpPacket(
        op=ARP_REPLY, sha=GW_MAC, spa=GW, tha=GUEST_MAC, tpa=GUEST
    )
    assert link.handled == {"arp_reply": 1}
    assert link.guest_mac == GUEST_MAC


def test_arp_for_other_addresses_and_replies_are_ignored(link: LinkServices) -> None:
    other = ArpPacket(op=1, sha=GUEST_MAC, spa=GUEST, tha=bytes(6), tpa=GUEST).build()
    reply = ArpPacket(op=2, sha=GUEST_MAC, spa=GUEST, tha=GW_MAC, tpa=GW).build()
    assert link.handle(eth(other, ETH_ARP, BROADCAST)) == []
    assert link.handle(eth(reply, ETH_ARP)) == []
    assert link.dropped == {"arp_not_for_us": 1, "arp_reply_ignored": 1}
    assert not link.handled


# -- ICMP ------------------------------------------------------------------------------------


def test_ping_gateway(link: LinkServices) -> None:
    request = IcmpEcho(type=8, ident=0x4242, seq=3, data=bytes(range(56))).build()
    [reply] = link.handle(ip_frame(PROTO_ICMP, request))
    e = EthernetFrame.parse(reply)
    assert (e.dst, e.src) == (GUEST_MAC, GW_MAC)
    ip = IPv4Packet.parse(e.payload)  # verifies the header checksum
    assert (ip.src, ip.dst, ip.proto) == (GW, GUEST, PROTO_ICMP)
    echo = IcmpEcho.parse(ip.payload)  # verifies the ICMP checksum
    assert echo == IcmpEcho(type=ICMP_ECHO_REPLY, ident=0x4242, seq=3, data=bytes(range(56)))
    assert link.handled == {"icmp_echo_reply": 1}


def test_ping_elsewhere_and_echo_replies_are_not_answered(link: LinkServices) -> None:
    request = IcmpEcho(type=8, ident=1, seq=1).build()
    assert link.handle(ip_frame(PROTO_ICMP, request, dst=IPv4Address("1.1.1.1"))) == []
    assert link.handle(ip_frame(PROTO_ICMP, IcmpEcho(type=0, ident=1, seq=1).build())) == []
    assert link.dropped == {"unhandled_ipv4": 1, "icmp_reply_ignored": 1}


# -- DHCP ------------------------------------------------------------------------------------


def assert_full_config(msg: DhcpMessage, kind: int) -> None:
    assert msg.op == 2 and msg.xid == 0xABCD and msg.chaddr == GUEST_MAC
    assert msg.yiaddr == GUEST and msg.giaddr == ZERO
    assert msg.message_type == kind
    assert msg.server_id == GW
    assert msg.options[51] == (600).to_bytes(4, "big")
    assert msg.options[1] == IPv4Address("255.255.255.0").packed
    assert msg.options[3] == GW.packed
    assert msg.options[6] == IPv4Address("10.201.240.53").packed
    assert msg.options[26] == (1400).to_bytes(2, "big")
    assert msg.options[28] == IPv4Address("10.201.240.255").packed


def test_dhcp_discover_offer_request_ack(link: LinkServices) -> None:
    [offer] = link.handle(dhcp_frame(1, flags=FLAG_BROADCAST, o55=bytes([1, 3, 6, 12, 15, 28])))
    e, ip, msg = parse_dhcp_reply(offer)
    assert (e.dst, ip.dst) == (BROADCAST, ALL)  # the client asked for broadcast
    assert_full_config(msg, DHCPOFFER)
    assert msg.ciaddr == ZERO
    assert link.guest_mac is None  # nothing is bound by an offer

    [ack] = link.handle(
        dhcp_frame(3, flags=FLAG_BROADCAST, o50=GUEST.packed, o54=GW.packed)
    )
    e, ip, msg = parse_dhcp_reply(ack)
    assert (e.dst, ip.dst) == (BROADCAST, ALL)
    assert_full_config(msg, DHCPACK)
    assert link.guest_mac == GUEST_MAC
    assert link.handled == {"dhcp_offer": 1, "dhcp_ack": 1}
    assert not link.dropped


def test_dhcp_unicast_replies_without_broadcast_flag(link: LinkServices) -> None:
    [offer] = link.handle(dhcp_frame(1))
    e, ip, msg = parse_dhcp_reply(offer)
    assert (e.dst, ip.dst, msg.flags) == (GUEST_MAC, GUEST, 0)
    # RENEWING: unicast to the server from ciaddr, no option 50; the ACK goes to ciaddr.
    [ack] = link.handle(dhcp_frame(3, ciaddr=GUEST, dst=GW))
    e, ip, msg = parse_dhcp_reply(ack)
    assert (e.dst, ip.dst, msg.ciaddr) == (GUEST_MAC, GUEST, GUEST)
    assert_full_config(msg, DHCPACK)


def test_dhcp_request_for_other_address_is_naked(link: LinkServices) -> None:
    [nak] = link.handle(dhcp_frame(3, o50=IPv4Address("10.201.240.77").packed))
    e, ip, msg = parse_dhcp_reply(nak)
    assert (e.dst, ip.dst) == (BROADCAST, ALL)  # a NAK is always broadcast
    assert msg.message_type == DHCPNAK and msg.server_id == GW
    assert msg.yiaddr == ZERO and 51 not in msg.options
    assert link.handled == {"dhcp_nak": 1}
    assert link.guest_mac is None


def test_dhcp_request_to_other_server_release_and_inform(link: LinkServices) -> None:
    other = IPv4Address("10.201.240.9").packed
    assert link.handle(dhcp_frame(3, o50=GUEST.packed, o54=other)) == []
    assert link.handle(dhcp_frame(7, ciaddr=GUEST, dst=GW, o54=GW.packed)) == []
    assert link.handle(dhcp_frame(8, ciaddr=GUEST)) == []
    assert link.dropped == {"dhcp_other_server": 1, "dhcp_unsupported_type": 1}
    assert link.handled == {"dhcp_release": 1}


# -- dropped ---------------------------------------------------------------------------------


def test_dropped_counters(link: LinkServices) -> None:
    tcp = ip_frame(PROTO_TCP, bytes(20), dst=IPv4Address("93.184.216.34"))
    udp_dns = ip_frame(PROTO_UDP, UdpDatagram(sport=5353, dport=53, payload=b"q").build(GUEST, GW))
    bad_ip = bytearray(ip_frame(PROTO_ICMP, IcmpEcho(type=8, ident=1, seq=1).build()))
    bad_ip[14 + 10] ^= 0xFF  # header checksum
    frames = [
        tcp, udp_dns, bytes(bad_ip), b"\x00" * 10,
        eth(b"\x60" + bytes(39), ethertype=0x86DD, dst=BROADCAST),  # IPv6
        eth(b"x" * 28, ethertype=ETH_ARP, dst=bytes.fromhex("020000000001")),  # other MAC
        EthernetFrame(dst=GW_MAC, src=BROADCAST, ethertype=ETH_ARP, payload=bytes(28)).build(),
        bytes(70000),
    ]  # fmt: skip
    for frame in frames:
        assert link.handle(frame) == []
    assert link.dropped == {
        "unhandled_ipv4": 2, "ipv4_bad_checksum": 1, "eth_short": 1,
        "unsupported_ethertype": 1, "not_for_us": 1, "bad_source_mac": 1,
        "frame_too_large": 1,
    }  # fmt: skip
    assert not link.handled


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"guest_ip": IPv4Address("10.0.0.2")}, "guest_ip"),
        ({"guest_ip": GW}, "both"),
        ({"gateway_ip": IPv4Address("10.201.240.0")}, "gateway_ip"),
        ({"gateway_mac": BROADCAST}, "unicast"),
        ({"mtu": 67}, "mtu"),
        ({"lease_seconds": 0}, "lease"),
    ],
)
def test_link_config_is_checked(changes: dict[str, object], match: str) -> None:
    fields: dict[str, object] = {
        "gateway_ip": GW, "gateway_mac": GW_MAC,
        "network": IPv4Network("10.201.240.0/24"), "guest_ip": GUEST,
    } | changes  # fmt: skip
    with pytest.raises(ValueError, match=match):
        LinkConfig(**fields)  # type: ignore[arg-type]


def test_dns_and_mtu_defaults() -> None:
    network = IPv4Network("10.201.240.0/24")
    config = LinkConfig(gateway_ip=GW, gateway_mac=GW_MAC, network=network, guest_ip=GUEST)
    [offer] = LinkServices(config).handle(dhcp_frame(1, flags=FLAG_BROADCAST))
    options = parse_dhcp_reply(offer)[2].options
    assert options[6] == GW.packed
    assert options[26] == (1500).to_bytes(2, "big")
