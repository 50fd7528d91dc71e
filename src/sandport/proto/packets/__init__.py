"""Sans-I/O parsers and builders for the frames a guest puts on its Ethernet link.

Every packet type is a frozen dataclass with ``parse(data)`` (a classmethod that raises
`MalformedFrame` with a stable ``reason`` for anything it cannot trust) and ``build()``
(which computes lengths and checksums and raises `ValueError` for fields that cannot be
encoded). Layers nest by payload: `EthernetFrame` carries an `ArpPacket` or an `IPv4Packet`,
whose payload is a `UdpDatagram` (carrying a `DhcpMessage`), a `TcpSegment` or an `IcmpEcho`.
UDP and TCP need the IPv4 addresses for their checksums, so their ``parse`` and ``build`` take
them.
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
from sandport.proto.packets.tcp import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, TcpSegment
from sandport.proto.packets.udp import UdpDatagram

__all__ = [
    "ACK",
    "ARP_REPLY",
    "ARP_REQUEST",
    "BROADCAST",
    "CWR",
    "ECE",
    "ETH_ARP",
    "ETH_IPV4",
    "FIN",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "ArpPacket",
    "DhcpMessage",
    "EthernetFrame",
    "IPv4Packet",
    "IcmpEcho",
    "MalformedFrame",
    "TcpSegment",
    "UdpDatagram",
    "checksum",
    "pseudo_header_checksum",
]
