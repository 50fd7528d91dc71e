"""Ethernet II frames (IEEE 802.3 clause 3.2.6 "Length/Type" as a type; RFC 894 for IPv4).

Layout (the frame check sequence is not present: TAP devices and QEMU sockets hand over
frames without it)::

     0                   6                  12      14
    +-------------------+-------------------+-------+-----------------------------+
    | destination (6)   | source (6)        | type  | payload (46..1500 on a wire)|
    +-------------------+-------------------+-------+-----------------------------+

A type below 0x0600 would be an IEEE 802.3 length; such frames (and VLAN tags, 0x8100)
parse fine here and are left to the caller to refuse by ``ethertype``. No minimum length is
enforced on either side: virtual links do not need the 60-byte padding, and receivers must
ignore it when present (every payload parser here honours its own length field).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame

__all__ = [
    "BROADCAST",
    "ETH_ARP",
    "ETH_HEADER",
    "ETH_IPV4",
    "ETH_IPV6",
    "EthernetFrame",
    "is_multicast",
]

#: destination MAC, source MAC, EtherType (network byte order).
ETH_HEADER: Final = struct.Struct("!6s6sH")  # 14 bytes
ETH_IPV4: Final = 0x0800
ETH_ARP: Final = 0x0806
ETH_IPV6: Final = 0x86DD
#: The all-ones broadcast address.
BROADCAST: Final = b"\xff" * 6
_MAC_LENGTH: Final = 6


def is_multicast(mac: bytes) -> bool:
    """Whether ``mac`` is a group address (the I/G bit, lowest bit of the first octet).

    Broadcast is the group address with every bit set, so it counts as multicast too.
    """
    return bool(mac[0] & 0x01)


@dataclass(frozen=True, slots=True, kw_only=True)
class EthernetFrame:
    """One Ethernet II frame.

    Attributes:
        dst: Destination MAC, 6 bytes.
        src: Source MAC, 6 bytes.
        ethertype: What the payload is (`ETH_IPV4`, `ETH_ARP` ...).
        payload: Everything after the 14-byte header, padding included.
    """

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse a frame (without FCS).

        Raises:
            MalformedFrame: ``eth_short`` if there are fewer than 14 bytes.
        """
        if len(data) < ETH_HEADER.size:
            raise MalformedFrame("eth_short", f"{len(data)} bytes")
        dst, src, ethertype = ETH_HEADER.unpack_from(data)
        return cls(dst=dst, src=src, ethertype=ethertype, payload=bytes(data[ETH_HEADER.size :]))

    def build(self) -> bytes:
        """Encode the frame.

        Raises:
            ValueError: A MAC is not 6 bytes or the type does not fit 16 bits.
        """
        if len(self.dst) != _MAC_LENGTH or len(self.src) != _MAC_LENGTH:
            raise ValueError("MAC addresses must be 6 bytes")
        if not 0 <= self.ethertype <= 0xFFFF:
            raise ValueError(f"ethertype {self.ethertype} out of range")
        return ETH_HEADER.pack(self.dst, self.src, self.ethertype) + self.payload
