"""ARP for IPv4 over Ethernet (RFC 826), the only combination a guest link carries.

Packet layout for hardware type 1 (Ethernet) and protocol type 0x0800 (IPv4)::

     0       2       4   5   6       8           14      18          24      28
    +-------+-------+---+---+-------+-----------+-------+-----------+-------+
    | htype | ptype |hln|pln| oper  | sha (6)   | spa(4)| tha (6)   | tpa(4)|
    +-------+-------+---+---+-------+-----------+-------+-----------+-------+

A request asks "who has ``tpa``? tell ``spa`` at ``sha``"; the reply swaps roles and fills
in ``sha`` with the answer. RFC 5227 probes carry ``spa`` 0.0.0.0; gratuitous ARP has
``spa == tpa``. Bytes after the 28 (Ethernet minimum-frame padding) are ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame

__all__ = ["ARP_PACKET", "ARP_REPLY", "ARP_REQUEST", "ArpPacket"]

#: htype, ptype, hlen, plen, oper, sha, spa, tha, tpa.
ARP_PACKET: Final = struct.Struct("!HHBBH6s4s6s4s")  # 28 bytes
ARP_REQUEST: Final = 1
ARP_REPLY: Final = 2
_HTYPE_ETHERNET: Final = 1
_PTYPE_IPV4: Final = 0x0800


@dataclass(frozen=True, slots=True, kw_only=True)
class ArpPacket:
    """One Ethernet/IPv4 ARP packet.

    Attributes:
        op: `ARP_REQUEST` or `ARP_REPLY`.
        sha: Sender hardware (MAC) address.
        spa: Sender protocol (IPv4) address.
        tha: Target MAC (zeros in a request).
        tpa: Target IPv4 address.
    """

    op: int
    sha: bytes
    spa: IPv4Address
    tha: bytes
    tpa: IPv4Address

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse an ARP packet (an Ethernet payload).

        Raises:
            MalformedFrame: ``arp_short`` (under 28 bytes), ``arp_unsupported`` (not
                Ethernet/IPv4 or wrong address lengths), ``arp_bad_op`` (not 1 or 2).
        """
        if len(data) < ARP_PACKET.size:
            raise MalformedFrame("arp_short", f"{len(data)} bytes")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_PACKET.unpack_from(data)
        if (htype, ptype, hlen, plen) != (_HTYPE_ETHERNET, _PTYPE_IPV4, 6, 4):
            raise MalformedFrame("arp_unsupported", f"htype {htype} ptype {ptype:#x}")
        if op not in (ARP_REQUEST, ARP_REPLY):
            raise MalformedFrame("arp_bad_op", f"op {op}")
        return cls(op=op, sha=sha, spa=IPv4Address(spa), tha=tha, tpa=IPv4Address(tpa))

    def build(self) -> bytes:
        """Encode the packet (28 bytes, no padding).

        Raises:
            ValueError: A MAC is not 6 bytes or ``op`` does not fit 16 bits.
        """
        if len(self.sha) != 6 or len(self.tha) != 6:
            raise ValueError("ARP hardware addresses must be 6 bytes")
        if not 0 <= self.op <= 0xFFFF:
            raise ValueError(f"ARP op {self.op} out of range")
        return ARP_PACKET.pack(
            _HTYPE_ETHERNET, _PTYPE_IPV4, 6, 4, self.op,
            self.sha, self.spa.packed, self.tha, self.tpa.packed,
        )  # fmt: skip
