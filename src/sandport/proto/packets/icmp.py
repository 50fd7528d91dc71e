"""ICMP echo request and reply (RFC 792, "Echo or Echo Reply Message").

Layout::

     0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     Type      |     Code      |          Checksum             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |           Identifier          |        Sequence Number        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     Data ...
    +-+-+-+-+-

Type 8 is a request, 0 the reply; the code is 0. The checksum covers the whole ICMP
message (no pseudo header). A reply carries the request's identifier, sequence number and
data unchanged (RFC 1122 section 3.2.2.6).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ipv4 import checksum

__all__ = ["ICMP_ECHO_REPLY", "ICMP_ECHO_REQUEST", "ICMP_HEADER", "IcmpEcho"]

#: type, code, checksum, identifier, sequence number.
ICMP_HEADER: Final = struct.Struct("!BBHHH")  # 8 bytes
ICMP_ECHO_REPLY: Final = 0
ICMP_ECHO_REQUEST: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class IcmpEcho:
    """One ICMP echo request or reply.

    Attributes:
        type: `ICMP_ECHO_REQUEST` (8) or `ICMP_ECHO_REPLY` (0).
        ident: Identifier (ping uses it to match replies to its process or socket).
        seq: Sequence number.
        data: Arbitrary data, echoed back.
    """

    type: int
    ident: int
    seq: int
    data: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse an echo message (an IPv4 payload).

        Raises:
            MalformedFrame: ``icmp_short`` (under 8 bytes), ``icmp_bad_checksum``,
                ``icmp_not_echo`` (another ICMP type), ``icmp_bad_code`` (code not 0).
        """
        if len(data) < ICMP_HEADER.size:
            raise MalformedFrame("icmp_short", f"{len(data)} bytes")
        if checksum(data) != 0:
            raise MalformedFrame("icmp_bad_checksum")
        icmp_type, code, _, ident, seq = ICMP_HEADER.unpack_from(data)
        if icmp_type not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            raise MalformedFrame("icmp_not_echo", f"type {icmp_type}")
        if code != 0:
            raise MalformedFrame("icmp_bad_code", f"code {code}")
        return cls(type=icmp_type, ident=ident, seq=seq, data=bytes(data[ICMP_HEADER.size :]))

    def build(self) -> bytes:
        """Encode the message with its checksum.

        Raises:
            ValueError: A field does not fit its width.
        """
        if not (0 <= self.type <= 0xFF and 0 <= self.ident <= 0xFFFF and 0 <= self.seq <= 0xFFFF):
            raise ValueError("ICMP type, identifier or sequence out of range")
        unsummed = ICMP_HEADER.pack(self.type, 0, 0, self.ident, self.seq) + self.data
        return unsummed[:2] + struct.pack("!H", checksum(unsummed)) + unsummed[4:]
