"""IPv4 packets (RFC 791) and the Internet checksum (RFC 1071).

Header layout (RFC 791 section 3.1)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |Version|  IHL  |Type of Service|          Total Length         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Identification        |Flags|      Fragment Offset    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Time to Live |    Protocol   |         Header Checksum       |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                       Source Address                          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Destination Address                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Options (IHL > 5)          |    Padding    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Receiver rules here: version 4, 5 <= IHL, header and Total Length within the bytes given;
bytes beyond Total Length (Ethernet padding) are dropped; the header checksum must verify;
options are skipped, not interpreted. Fragments (MF set or an offset) are refused: a guest
stack that knows the link MTU from DHCP never needs to fragment, and reassembly is a buffer
an attacker could fill.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame

__all__ = [
    "IPV4_HEADER",
    "IPV4_MAX_LENGTH",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "IPv4Packet",
    "checksum",
    "fold_checksum",
    "ones_sum",
    "pseudo_header_checksum",
]

#: ver_ihl, tos, total length, identification, flags+fragment offset, ttl, protocol,
#: header checksum, source, destination: the 20 bytes without options.
IPV4_HEADER: Final = struct.Struct("!BBHHHBBH4s4s")
IPV4_MAX_LENGTH: Final = 0xFFFF
PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
_FLAG_DF: Final = 0x4000
_FLAG_MF: Final = 0x2000
_OFFSET_MASK: Final = 0x1FFF
#: The pseudo header TCP and UDP checksums cover (RFC 768, RFC 793 section 3.1).
_PSEUDO_HEADER: Final = struct.Struct("!4s4sBBH")


def checksum(data: bytes) -> int:
    """Return the Internet checksum of ``data`` (RFC 1071).

    The data is summed as big-endian 16-bit words in ones' complement arithmetic (an odd
    final byte is padded with a zero byte), carries are folded back in, and the sum is
    complemented. Over a header whose checksum field is filled in correctly the result is 0,
    which is how receivers verify. RFC 1071's example, ``00 01 f2 03 f4 f5 f6 f7``, sums to
    ``0xddf2`` and so has the checksum ``0x220d``.

    Args:
        data: The bytes to checksum (checksum field zeroed when computing one).

    Returns:
        The 16-bit checksum to store in network byte order.
    """
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # The folded ones' complement sum of 16-bit words equals the data read as one big
    # number modulo 0xFFFF (2**16 == 1 mod 0xFFFF), with 0xFFFF, not 0, for data that is
    # not all zeros: one pass in C instead of a Python loop over every word.
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and data.strip(b"\x00"):
        total = 0xFFFF
    return ~total & 0xFFFF


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The ones' complement sum of ``data`` as 16-bit big-endian words, modulo 0xFFFF
    (0 stands for both zeros; sums of several parts add up before `fold`).

    ``data`` must start at an even offset of whatever it is part of; an odd final byte is
    padded with a zero byte.
    """
    value = int.from_bytes(data, "big")
    return (value << 8 if len(data) % 2 else value) % 0xFFFF


def fold_checksum(total: int) -> int:
    """The checksum to store for a sum of `ones_sum` parts (never 0: in ones' complement
    0xFFFF is the same zero, and UDP reserves 0 for "no checksum")."""
    return 0xFFFF - total % 0xFFFF


def pseudo_header_checksum(src: IPv4Address, dst: IPv4Address, proto: int, segment: bytes) -> int:
    """Return the checksum of a TCP/UDP ``segment`` including the IPv4 pseudo header.

    The pseudo header (RFC 768) is source, destination, a zero byte, the protocol and the
    segment length; it ties the segment to its addresses. With the segment's checksum field
    zeroed the result is the value to store; with it filled in, 0 means "valid".
    """
    pseudo = _PSEUDO_HEADER.pack(src.packed, dst.packed, 0, proto, len(segment))
    return checksum(pseudo + segment)


@dataclass(frozen=True, slots=True, kw_only=True)
class IPv4Packet:
    """One unfragmented IPv4 packet.

    Attributes:
        src: Source address.
        dst: Destination address.
        proto: Payload protocol (`PROTO_ICMP`, `PROTO_TCP`, `PROTO_UDP` ...).
        payload: The bytes after the header, up to Total Length.
        ttl: Time to live.
        ident: Identification (only meaningful for fragments; echoed for diagnostics).
        tos: Type of service / DSCP+ECN byte.
        dont_fragment: The DF flag.
    """

    src: IPv4Address
    dst: IPv4Address
    proto: int
    payload: bytes
    ttl: int = 64
    ident: int = 0
    tos: int = 0
    dont_fragment: bool = True

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse a packet (an Ethernet payload; trailing padding is ignored).

        Raises:
            MalformedFrame: ``ipv4_short`` (under 20 bytes), ``ipv4_bad_version``,
                ``ipv4_bad_ihl`` (IHL < 5), ``ipv4_bad_length`` (Total Length shorter than
                the header), ``ipv4_truncated`` (header or Total Length beyond the data),
                ``ipv4_bad_checksum``, ``ipv4_fragment``.
        """
        if len(data) < IPV4_HEADER.size:
            raise MalformedFrame("ipv4_short", f"{len(data)} bytes")
        ver_ihl, tos, total, ident, frag, ttl, proto, _, src, dst = IPV4_HEADER.unpack_from(data)
        if ver_ihl >> 4 != 4:
            raise MalformedFrame("ipv4_bad_version", f"version {ver_ihl >> 4}")
        header_length = (ver_ihl & 0x0F) * 4
        if header_length < IPV4_HEADER.size:
            raise MalformedFrame("ipv4_bad_ihl", f"IHL {ver_ihl & 0x0F}")
        if total < header_length:
            raise MalformedFrame("ipv4_bad_length", f"total length {total} < {header_length}")
        if total > len(data):
            raise MalformedFrame("ipv4_truncated", f"total length {total} > {len(data)} bytes")
        if checksum(data[:header_length]) != 0:
            raise MalformedFrame("ipv4_bad_checksum")
        if frag & (_FLAG_MF | _OFFSET_MASK):
            raise MalformedFrame("ipv4_fragment", f"flags/offset {frag:#06x}")
        return cls(
            src=IPv4Address(src), dst=IPv4Address(dst), proto=proto,
            payload=bytes(data[header_length:total]), ttl=ttl, ident=ident, tos=tos,
            dont_fragment=bool(frag & _FLAG_DF),
        )  # fmt: skip

    def build(self) -> bytes:
        """Encode the packet with a 20-byte header and a computed header checksum.

        Raises:
            ValueError: The packet would exceed 65535 bytes or a field does not fit.
        """
        total = IPV4_HEADER.size + len(self.payload)
        if total > IPV4_MAX_LENGTH:
            raise ValueError(f"IPv4 packet of {total} bytes exceeds {IPV4_MAX_LENGTH}")
        frag = _FLAG_DF if self.dont_fragment else 0
        fields = (self.src.packed, self.dst.packed)
        header = IPV4_HEADER.pack(
            0x45, self.tos, total, self.ident, frag, self.ttl, self.proto, 0, *fields
        )
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return header + self.payload
