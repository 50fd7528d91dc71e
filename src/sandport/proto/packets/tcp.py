"""TCP segments over IPv4 (RFC 9293, options from RFC 7323 and RFC 2018).

Header layout (RFC 9293 section 3.1)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |          Source Port          |       Destination Port        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                        Sequence Number                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Acknowledgment Number                      |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Data |       |C|E|U|A|P|R|S|F|                               |
    | Offset| Rsrvd |W|C|R|C|S|S|Y|I|            Window             |
    |       |       |R|E|G|K|H|T|N|N|                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |           Checksum            |         Urgent Pointer        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                    Options                    |    Padding    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                             data                              |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The data offset counts 32-bit words of header (5..15); the checksum covers the IPv4
pseudo header, header and data, and unlike UDP's it is mandatory (0 is an ordinary value).
Receiver rules here: the checksum must verify; options are EOL (kind 0, ends the list),
NOP (kind 1) or kind, length (>= 2, within the header), value. MSS (2, length 4), window
scale (3, length 3; shifts above 14 are clamped to 14 per RFC 7323 section 2.3) and
SACK-permitted (4, length 2) are interpreted; every other option (timestamps, SACK blocks
...) is skipped. SYN with FIN or RST is refused. The reserved bits are ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Self

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ipv4 import (
    IPV4_HEADER,
    IPV4_MAX_LENGTH,
    PROTO_TCP,
    pseudo_header_checksum,
)

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "TCP_HEADER",
    "URG",
    "TcpSegment",
]

FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80

#: source port, destination port, sequence number, acknowledgment number, data offset
#: (high nibble; the low nibble is reserved), flags, window, checksum, urgent pointer.
TCP_HEADER: Final = struct.Struct("!HHIIBBHHH")  # 20 bytes
_MAX_OFFSET: Final = 15  # words: a 60-byte header
_OPT_EOL: Final = 0
_OPT_NOP: Final = 1
_OPT_MSS: Final = 2
_OPT_WSCALE: Final = 3
_OPT_SACK_PERMITTED: Final = 4
_MAX_WSCALE: Final = 14  # RFC 7323 section 2.3
_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpSegment:
    """One TCP segment.

    Attributes:
        sport: Source port.
        dport: Destination port.
        seq: Sequence number.
        ack: Acknowledgment number (meaningful when `ACK` is set).
        flags: The flag byte, an OR of `FIN`, `SYN`, `RST`, `PSH`, `ACK`, `URG`, `ECE`, `CWR`.
        window: The (unscaled) receive window field.
        payload: The data octets.
        mss: The maximum segment size option, if present.
        wscale: The window scale option's shift count (0..14), if present.
        sack_permitted: Whether the SACK-permitted option is present.
        urgent: The urgent pointer.
    """

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    urgent: int = 0

    @classmethod
    def parse(cls, data: bytes, src: IPv4Address, dst: IPv4Address, *,
              verify_checksum: bool = True) -> Self:
        """Parse a segment (a whole IPv4 payload) sent from ``src`` to ``dst``.

        ``verify_checksum=False`` is for segments whose checksum a local kernel left to the
        device (`sandport.proto.packets.vnet.NEEDS_CSUM`): no wire could have corrupted
        them, and the field holds only the pseudo-header sum.

        Raises:
            MalformedFrame: ``tcp_short`` (under 20 bytes), ``tcp_bad_offset`` (data offset
                under 5 or beyond the data), ``tcp_bad_checksum``, ``tcp_bad_option`` (an
                option without its length byte, with a length under 2 or past the header,
                or an MSS / window scale / SACK-permitted option of the wrong length),
                ``tcp_bad_flags`` (SYN with FIN or RST).
        """
        if len(data) < TCP_HEADER.size:
            raise MalformedFrame("tcp_short", f"{len(data)} bytes")
        sport, dport, seq, ack, off, flags, window, _, urgent = TCP_HEADER.unpack_from(data)
        header_length = (off >> 4) * 4
        if not TCP_HEADER.size <= header_length <= len(data):
            raise MalformedFrame("tcp_bad_offset", f"offset {off >> 4}, {len(data)} bytes")
        if verify_checksum and pseudo_header_checksum(src, dst, PROTO_TCP, data) != 0:
            raise MalformedFrame("tcp_bad_checksum")
        mss, wscale, sack_permitted = _parse_options(data[TCP_HEADER.size : header_length])
        if flags & SYN and flags & (FIN | RST):
            raise MalformedFrame("tcp_bad_flags", f"flags {flags:#04x}")
        return cls(
            sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=window,
            payload=bytes(data[header_length:]), mss=mss, wscale=wscale,
            sack_permitted=sack_permitted, urgent=urgent,
        )  # fmt: skip

    def build(self, src: IPv4Address, dst: IPv4Address) -> bytes:
        """Encode the segment with its options and checksum for the IPv4 ``src`` -> ``dst`` path.

        Options are written as MSS, NOP + window scale, SACK-permitted (each only when set),
        zero-padded to a multiple of 4 bytes.

        Raises:
            ValueError: A field is out of range (ports, window, urgent pointer and MSS
                0..65535; seq and ack 0..2**32-1; flags 0..255; wscale 0..14) or the
                segment cannot fit one IPv4 packet.
        """
        for name, value, top in (
            ("sport", self.sport, _U16), ("dport", self.dport, _U16), ("seq", self.seq, _U32),
            ("ack", self.ack, _U32), ("flags", self.flags, 0xFF), ("window", self.window, _U16),
            ("urgent", self.urgent, _U16),
        ):  # fmt: skip
            if not 0 <= value <= top:
                raise ValueError(f"TCP {name} {value} is not in 0..{top}")
        options = b""
        if self.mss is not None:
            if not 0 <= self.mss <= _U16:
                raise ValueError(f"TCP MSS {self.mss} is not in 0..{_U16}")
            options += struct.pack("!BBH", _OPT_MSS, 4, self.mss)
        if self.wscale is not None:
            if not 0 <= self.wscale <= _MAX_WSCALE:
                raise ValueError(f"TCP window scale {self.wscale} is not in 0..{_MAX_WSCALE}")
            options += bytes([_OPT_NOP, _OPT_WSCALE, 3, self.wscale])
        if self.sack_permitted:
            options += bytes([_OPT_SACK_PERMITTED, 2])
        options += bytes(-len(options) % 4)
        header_length = TCP_HEADER.size + len(options)
        total = IPV4_HEADER.size + header_length + len(self.payload)
        if total > IPV4_MAX_LENGTH:
            raise ValueError(f"TCP segment in an IPv4 packet of {total} bytes is too large")
        header = TCP_HEADER.pack(
            self.sport, self.dport, self.seq, self.ack, (header_length // 4) << 4, self.flags,
            self.window, 0, self.urgent,
        )  # fmt: skip
        unsummed = header + options + self.payload
        check = pseudo_header_checksum(src, dst, PROTO_TCP, unsummed)
        return unsummed[:16] + struct.pack("!H", check) + unsummed[18:]

    def has(self, flag: int) -> bool:
        """Return whether every bit of ``flag`` (one flag or an OR of several) is set."""
        return self.flags & flag == flag

    @property
    def seq_space(self) -> int:
        """The sequence numbers the segment occupies: its data, plus one each for SYN and FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


def _parse_options(options: bytes) -> tuple[int | None, int | None, bool]:
    """Return (MSS, window scale, SACK-permitted) from the option bytes of a header.

    Raises:
        MalformedFrame: ``tcp_bad_option``.
    """
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == _OPT_EOL:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options):
            raise MalformedFrame("tcp_bad_option", f"kind {kind} without a length")
        length = options[i + 1]
        if length < 2 or i + length > len(options):
            raise MalformedFrame("tcp_bad_option", f"kind {kind} length {length}")
        value = options[i + 2 : i + length]
        if kind == _OPT_MSS:
            if length != 4:
                raise MalformedFrame("tcp_bad_option", f"MSS length {length}")
            mss = int.from_bytes(value, "big")
        elif kind == _OPT_WSCALE:
            if length != 3:
                raise MalformedFrame("tcp_bad_option", f"window scale length {length}")
            wscale = min(value[0], _MAX_WSCALE)
        elif kind == _OPT_SACK_PERMITTED:
            if length != 2:
                raise MalformedFrame("tcp_bad_option", f"SACK-permitted length {length}")
            sack_permitted = True
        i += length
    return mss, wscale, sack_permitted
