"""Sans-I/O parsers and builders for the frames a guest puts on its Ethernet link.

Every packet type is a frozen dataclass with ``parse(data)`` (a classmethod that raises
`MalformedFrame` with a stable ``reason`` for anything it cannot trust) and ``build()``
(which computes lengths and checksums and raises `ValueError` for fields that cannot be
encoded). Layers nest by payload: `EthernetFrame` carries an `ArpPacket` or an `IPv4Packet`,
whose payload is a `UdpDatagram` (carrying a `DhcpMessage`) or an `IcmpEcho`. UDP needs the
IPv4 addresses for its checksum, so its ``parse`` and ``build`` take them.
"""

from sandport.proto.packets.arp import ARP_REPLY, ARP_REQUEST, ArpPacket
from sandport.proto.packets.dhcp import DhcpMessage
from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ethernet import BROADCAST, ETH_ARP, ETH_IPV4, EthernetFrame
from sandport.proto.packets.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IcmpEcho
from sandport.proto.packets.ipv4 import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    IPv4Packet,
    checksum,
    pseudo_header_checksum,
)
from sandport.proto.packets.udp import UdpDatagram

__all__ = [
    "ARP_REPLY",
    "ARP_REQUEST",
    "BROADCAST",
    "ETH_ARP",
    "ETH_IPV4",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "ArpPacket",
    "DhcpMessage",
    "EthernetFrame",
    "IPv4Packet",
    "IcmpEcho",
    "MalformedFrame",
    "UdpDatagram",
    "checksum",
    "pseudo_header_checksum",
]
