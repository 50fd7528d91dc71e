"""UDP datagrams over IPv4 (RFC 768).

Layout::

     0      7 8     15 16    23 24    31
    +--------+--------+--------+--------+
    |   source port   |  dest. port     |
    +--------+--------+--------+--------+
    |     length      |    checksum     |
    +--------+--------+--------+--------+
    |          data octets ...
    +-----------------------------------

``length`` counts header and data; the checksum covers the IPv4 pseudo header, header and
data. Over IPv4 a checksum of 0 means "not computed" (accepted unverified); a computed
checksum that comes out as 0 is sent as 0xFFFF, its ones' complement twin.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ipv4 import PROTO_UDP, pseudo_header_checksum

__all__ = ["UDP_HEADER", "UdpDatagram"]

#: source port, destination port, length, checksum.
UDP_HEADER: Final = struct.Struct("!HHHH")  # 8 bytes
_MAX_PAYLOAD: Final = 0xFFFF - 8 - 20  # what fits one IPv4 packet


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpDatagram:
    """One UDP datagram.

    Attributes:
        sport: Source port.
        dport: Destination port.
        payload: The data octets.
    """

    sport: int
    dport: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes, src: IPv4Address, dst: IPv4Address, *,
              verify_checksum: bool = True) -> Self:
        """Parse a datagram (an IPv4 payload) sent from ``src`` to ``dst``.

        ``verify_checksum=False``: as for `TcpSegment.parse` (a checksum left to the device).

        Raises:
            MalformedFrame: ``udp_short`` (under 8 bytes), ``udp_bad_length`` (length field
                under 8 or beyond the data), ``udp_bad_checksum``.
        """
        if len(data) < UDP_HEADER.size:
            raise MalformedFrame("udp_short", f"{len(data)} bytes")
        sport, dport, length, check = UDP_HEADER.unpack_from(data)
        if not UDP_HEADER.size <= length <= len(data):
            raise MalformedFrame("udp_bad_length", f"length {length}, {len(data)} bytes")
        datagram = data[:length]
        if check and verify_checksum and pseudo_header_checksum(src, dst, PROTO_UDP, datagram) != 0:
            raise MalformedFrame("udp_bad_checksum")
        return cls(sport=sport, dport=dport, payload=bytes(datagram[UDP_HEADER.size :]))

    def build(self, src: IPv4Address, dst: IPv4Address) -> bytes:
        """Encode the datagram with its checksum for the IPv4 ``src`` -> ``dst`` path.

        Raises:
            ValueError: A port is out of range or the payload cannot fit one IPv4 packet.
        """
        if not (0 <= self.sport <= 0xFFFF and 0 <= self.dport <= 0xFFFF):
            raise ValueError("UDP ports must be in 0..65535")
        if len(self.payload) > _MAX_PAYLOAD:
            raise ValueError(f"UDP payload of {len(self.payload)} bytes is too large")
        length = UDP_HEADER.size + len(self.payload)
        unsummed = UDP_HEADER.pack(self.sport, self.dport, length, 0) + self.payload
        check = pseudo_header_checksum(src, dst, PROTO_UDP, unsummed) or 0xFFFF
        return unsummed[:6] + struct.pack("!H", check) + unsummed[8:]
