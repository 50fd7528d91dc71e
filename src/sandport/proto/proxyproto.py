"""Sans-I/O PROXY protocol, versions 1 and 2 (HAProxy, "The PROXY protocol", 2020/03/05).

A relay that connects to a service on behalf of a client loses the client's address: the
service sees the relay. The PROXY protocol puts one header in front of the relayed bytes that
carries what ``getpeername()`` / ``getsockname()`` would have returned on a direct connection
(spec section 2). This module builds and parses that header without any I/O:

* `ProxyHeader` is the header: ``bytes(header)`` encodes it, `ProxyHeader.from_bytes` parses
  exactly one complete header.
* `ProxyHeaderParser` parses a header from a byte stream fed in pieces of any size:
  ``receive_data()`` returns ``None`` until the header is complete, then the header; the bytes
  that followed it (the start of the relayed stream) are in ``trailing_data()``.

The two formats (spec sections 2.1 and 2.2)::

    v1 (text, at most 107 bytes with CRLF):
        "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n"
        "PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\\r\\n"
        "PROXY UNKNOWN\\r\\n"                      (anything up to CRLF is ignored)

    v2 (binary): 16-byte fixed header, then ``len`` bytes of addresses and TLVs
        \\x0D\\x0A\\x0D\\x0A\\x00\\x0D\\x0A\\x51\\x55\\x49\\x54\\x0A  signature (12 bytes)
        ver_cmd  u8   0x2_ version, 0x_0 LOCAL / 0x_1 PROXY
        fam      u8   0x00 UNSPEC, 0x11 TCP4, 0x12 UDP4, 0x21 TCP6, 0x22 UDP6, 0x31/0x32 UNIX
        len      u16  bytes that follow (network order)
        addresses     src addr, dst addr, src port, dst port (12 / 36 / 216 bytes)
        TLVs          type u8, length u16, value (section 2.2, "pp2_tlv")

Version detection (end of spec section 2.2): the first byte tells the formats apart (``P``
for v1, ``\\x0D`` for v2); every further byte of the ``PROXY `` prefix or of the v2 signature
and version nibble is checked as soon as it arrives, so a peer that does not speak the
protocol fails at its first wrong byte (`NotProxyProtocol`), not after a timeout.

Receiver rules applied here:

* v1: exactly one space between fields, no heading zeroes in IPv4 octets or ports (section
  2.1), IPv6 in hex-and-colons form, a line without CRLF in its first 107 bytes is
  `ProxyHeaderTooLong`, a lone CR or LF is `MalformedProxyHeader`. ``UNKNOWN`` accepts and
  ignores anything up to CRLF.
* v2: version nibble must be 2, command LOCAL or PROXY, the family/protocol byte one of the
  listed combinations; ``len`` above the parser's cap (`MAX_V2_PAYLOAD` by default) is
  `ProxyHeaderTooLong` as soon as the 16 fixed bytes are in. AF_UNIX (0x31, 0x32) is a
  valid combination this module does not represent: as the spec allows, it falls back to
  UNSPEC mode (family and protocol UNSPEC, no addresses; its 216 address bytes are skipped).
* v2 TLVs (section 2.2): everything after the address block must be well-formed TLVs; they
  are kept in order as ``(type, value)`` pairs. A ``PP2_TYPE_CRC32C`` TLV (section 2.2.3) is
  verified, and computed when encoding.
* LOCAL (section 2.2): parsed like PROXY; the receiver must use the real connection
  endpoints and ignore ``source`` / ``destination``.

Errors caused by wire input are `ProxyProtocolError` subclasses (a `RemoteProtocolError`);
a header built with inconsistent fields raises `ValueError`; using a parser after it
finished or failed raises `LocalProtocolError`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Self

from sandport.proto.errors import InvalidTransition, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_V2_PAYLOAD",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "TRANSITIONS",
    "V1_MAX_LENGTH",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "AddressFamily",
    "InvalidTransition",
    "LocalProtocolError",
    "MalformedProxyHeader",
    "NotProxyProtocol",
    "ParserState",
    "ProxyCommand",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyHeaderTooLong",
    "ProxyProtocolError",
    "TransportProtocol",
    "crc32c",
]

# --------------------------------------------------------------------------------------------
# Caps and wire formats.
# --------------------------------------------------------------------------------------------

#: Longest v1 line including CRLF (spec section 2.1, "worst case": PROXY UNKNOWN + two
#: maximal IPv6 addresses and ports).
V1_MAX_LENGTH: Final = 107
#: What every v1 header starts with: "PROXY" and exactly one space (section 2.1).
V1_PREFIX: Final = b"PROXY "
_V1_CRLF: Final = b"\r\n"

#: Default cap on the v2 ``len`` field (addresses + TLVs). The wire allows 65535; a relay in
#: front of us has no reason to send more than addresses and a few short TLVs.
MAX_V2_PAYLOAD: Final = 4096
_V2_LEN_FIELD_MAX: Final = 0xFFFF

#: The v2 signature (section 2.2): CRLF CRLF NUL CRLF "QUIT" LF.
V2_SIGNATURE: Final = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"

# The v2 fixed header, section 2.2:
#     struct proxy_hdr_v2 {
#         uint8_t sig[12];  /* hex 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A */
#         uint8_t ver_cmd;  /* protocol version and command */
#         uint8_t fam;      /* protocol family and address */
#         uint16_t len;     /* number of following bytes part of the header */
#     };
V2_HEADER: Final = struct.Struct("!12sBBH")
V2_HEADER_LENGTH: Final = V2_HEADER.size  # 16
_V2_VERSION: Final = 0x2

# The v2 address block, section 2.2 ("union proxy_addr"), network byte order:
#     struct {        /* for TCP/UDP over IPv4, len = 12 */
#         uint32_t src_addr;
#         uint32_t dst_addr;
#         uint16_t src_port;
#         uint16_t dst_port;
#     } ipv4_addr;
V2_IPV4_ADDRESSES: Final = struct.Struct("!4s4sHH")  # 12 bytes
#     struct {        /* for TCP/UDP over IPv6, len = 36 */
#          uint8_t  src_addr[16];
#          uint8_t  dst_addr[16];
#          uint16_t src_port;
#          uint16_t dst_port;
#     } ipv6_addr;
V2_IPV6_ADDRESSES: Final = struct.Struct("!16s16sHH")  # 36 bytes
#     struct {        /* for AF_UNIX sockets, len = 216 */
#          uint8_t src_addr[108];
#          uint8_t dst_addr[108];
#     } unix_addr;
V2_UNIX_ADDRESSES_LENGTH: Final = 216

# One TLV, section 2.2:
#     struct pp2_tlv {
#         uint8_t type;
#         uint8_t length_hi;
#         uint8_t length_lo;
#         uint8_t value[0];
#     };
V2_TLV_HEADER: Final = struct.Struct("!BH")  # 3 bytes

# Registered TLV types, section 2.2.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03  # section 2.2.3: CRC32c of the whole header, u32 network order
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30
_CRC32C_VALUE: Final = struct.Struct("!I")

_MAX_PORT: Final = 65535
_AF_UNIX_NIBBLE: Final = 0x3

# v1 field syntax (section 2.1): no heading zeroes, IPv6 as hex groups and colons only.
_V1_IPV4_RE: Final = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6_RE: Final = re.compile(rb"[0-9A-Fa-f:]{2,39}")
_V1_PORT_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyCommand(enum.IntEnum):
    """Low nibble of the v2 ``ver_cmd`` byte (section 2.2); v1 headers are always PROXY."""

    #: The proxy opened the connection itself (a health check): use the real endpoints.
    LOCAL = 0x0
    #: The connection is relayed on behalf of ``source``.
    PROXY = 0x1


class AddressFamily(enum.IntEnum):
    """High nibble of the v2 ``fam`` byte (section 2.2); v1 TCP4 / TCP6 / UNKNOWN."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2


class TransportProtocol(enum.IntEnum):
    """Low nibble of the v2 ``fam`` byte (section 2.2); v1 knows STREAM (TCP) only."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


#: Valid ``fam`` bytes (section 2.2, "the following protocol bytes are expected"); any other
#: value must be rejected. AF_UNIX (0x31, 0x32) is valid but falls back to UNSPEC here.
_V2_FAMILY_BYTES: Final = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_ADDRESS_STRUCTS: Final = {
    AddressFamily.INET: V2_IPV4_ADDRESSES,
    AddressFamily.INET6: V2_IPV6_ADDRESSES,
}
_IP_VERSION: Final = {AddressFamily.INET: 4, AddressFamily.INET6: 6}
_V1_PROTOCOLS: Final = {b"TCP4": AddressFamily.INET, b"TCP6": AddressFamily.INET6}
_V1_NAMES: Final = {family: name.decode() for name, family in _V1_PROTOCOLS.items()}


def _crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed (RFC 4960 appendix B)
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC32c (Castagnoli) of ``data``, as RFC 4960 appendix B defines it.

    Args:
        data: Bytes to checksum.

    Returns:
        The checksum as an unsigned 32-bit integer (``crc32c(b"123456789") == 0xE3069283``).
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


class ProxyProtocolError(RemoteProtocolError):
    """Base for every PROXY protocol error caused by bytes the peer sent."""


class NotProxyProtocol(ProxyProtocolError):
    """The stream starts with neither ``PROXY `` (v1) nor the v2 signature + version 2."""


class MalformedProxyHeader(ProxyProtocolError):
    """The header violates the format of spec section 2.1 (v1) or 2.2 (v2)."""


class ProxyHeaderTooLong(ProxyProtocolError):
    """A v1 line has no CRLF within 107 bytes, or a v2 ``len`` exceeds the parser's cap."""




# --------------------------------------------------------------------------------------------
# The header.
# --------------------------------------------------------------------------------------------


def _check_endpoint(
    what: str, endpoint: tuple[str, int] | None, ip_version: int
) -> tuple[str, int]:
    """Validate one ``(host, port)`` and return it with the address in compressed form."""
    if endpoint is None:
        raise ValueError(f"{what} is required for an INET/INET6 header")
    host, port = endpoint
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} address {host!r} is not an IP address") from None
    if addr.version != ip_version:
        raise ValueError(f"{what} address {host!r} is not IPv{ip_version}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
        raise ValueError(f"{what} port {port!r} is not in 0..{_MAX_PORT}")
    return addr.compressed, port


def _v1_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Format an address for a v1 line: hex groups and colons only for IPv6 (section 2.1)."""
    text = addr.compressed
    # Some Python versions print IPv4-mapped IPv6 addresses with a dotted tail.
    return addr.exploded if "." in text and addr.version == 6 else text


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """One PROXY protocol header (spec sections 2.1 and 2.2).

    Attributes:
        version: 1 (text) or 2 (binary).
        command: PROXY (relayed connection) or LOCAL (v2 only: the proxy's own connection).
        family: UNSPEC (v1 ``UNKNOWN``), INET (``TCP4``) or INET6 (``TCP6``).
        protocol: STREAM, DGRAM (v2 only) or UNSPEC (with family UNSPEC only).
        source: The client's ``(address, port)``; ``None`` for family UNSPEC. Addresses are
            normalized to their compressed form.
        destination: The address the client connected to; ``None`` for family UNSPEC.
        tlvs: v2 type-length-value extensions, in wire order. A ``PP2_TYPE_CRC32C`` value is
            recomputed when encoding (its value here is only a placeholder).

    Raises:
        ValueError: The fields do not describe an encodable header (for example a v1
            header with TLVs, an IPv6 source in an INET header, a port out of range).
    """

    version: int
    command: ProxyCommand = ProxyCommand.PROXY
    family: AddressFamily = AddressFamily.UNSPEC
    protocol: TransportProtocol = TransportProtocol.UNSPEC
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        """Check that the fields are consistent and encodable; normalize addresses."""
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, not {self.version!r}")
        command = ProxyCommand(self.command)
        family = AddressFamily(self.family)
        protocol = TransportProtocol(self.protocol)
        object.__setattr__(self, "command", command)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "protocol", protocol)
        if family is AddressFamily.UNSPEC:
            if protocol is not TransportProtocol.UNSPEC:
                raise ValueError("family UNSPEC needs protocol UNSPEC")
            if self.source is not None or self.destination is not None:
                raise ValueError("family UNSPEC carries no source or destination")
        else:
            if protocol is TransportProtocol.UNSPEC:
                raise ValueError(f"family {family.name} needs protocol STREAM or DGRAM")
            ipv = _IP_VERSION[family]
            object.__setattr__(self, "source", _check_endpoint("source", self.source, ipv))
            object.__setattr__(
                self, "destination", _check_endpoint("destination", self.destination, ipv)
            )
        if self.version == 1:
            if command is not ProxyCommand.PROXY:
                raise ValueError("a v1 header has no LOCAL command")
            if protocol is TransportProtocol.DGRAM:
                raise ValueError("a v1 header describes TCP only, not DGRAM")
            if self.tlvs:
                raise ValueError("a v1 header has no TLVs")
            return
        tlvs = tuple((int(t), bytes(v)) for t, v in self.tlvs)
        for tlv_type, value in tlvs:
            if not 0 <= tlv_type <= 0xFF:
                raise ValueError(f"TLV type {tlv_type} is not in 0..255")
            if len(value) > _V2_LEN_FIELD_MAX:
                raise ValueError(f"TLV value of {len(value)} bytes is longer than 65535")
        object.__setattr__(self, "tlvs", tlvs)
        if self._v2_payload_length() > _V2_LEN_FIELD_MAX:
            raise ValueError("addresses and TLVs exceed the 65535 bytes of the v2 len field")

    @classmethod
    def for_stream(
        cls,
        source: tuple[str, int],
        destination: tuple[str, int],
        *,
        version: int = 2,
        tlvs: tuple[tuple[int, bytes], ...] = (),
    ) -> Self:
        """Build the header a relay sends for a TCP connection (command PROXY).

        Args:
            source: The client's address and port (``getpeername()`` of the client socket).
            destination: The address and port the client connected to (``getsockname()``).
            version: 1 or 2.
            tlvs: v2 TLVs to append.

        Returns:
            A PROXY header whose family (INET / INET6) follows the source address.

        Raises:
            ValueError: An address is invalid or the two are of different families.
        """
        try:
            ipv = ipaddress.ip_address(source[0]).version
        except ValueError:
            raise ValueError(f"source address {source[0]!r} is not an IP address") from None
        family = AddressFamily.INET if ipv == 4 else AddressFamily.INET6
        return cls(
            version=version,
            command=ProxyCommand.PROXY,
            family=family,
            protocol=TransportProtocol.STREAM,
            source=source,
            destination=destination,
            tlvs=tlvs,
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_v2_payload: int = MAX_V2_PAYLOAD) -> ProxyHeader:
        """Parse exactly one complete header.

        Args:
            data: The whole header and nothing after it.
            max_v2_payload: Cap on the v2 ``len`` field.

        Returns:
            The header.

        Raises:
            ProxyProtocolError: ``data`` is not a valid header, is truncated, or has bytes
                after the header (`MalformedProxyHeader` for the last two).
        """
        parser = ProxyHeaderParser(max_v2_payload=max_v2_payload)
        header = parser.receive_data(data)
        if header is None:
            raise MalformedProxyHeader(f"truncated header ({len(data)} bytes)")
        if parser.trailing_data():
            raise MalformedProxyHeader(f"{len(parser.trailing_data())} bytes after the header")
        return header

    def __bytes__(self) -> bytes:
        """Encode the header in its version's wire format (section 2.1 or 2.2)."""
        return self._encode_v1() if self.version == 1 else self._encode_v2()

    def _endpoints(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """Source and destination of an INET/INET6 header (``__post_init__`` ensured both)."""
        if self.source is None or self.destination is None:  # pragma: no cover - see above
            raise ValueError(f"family {self.family.name} header without addresses")
        return self.source, self.destination

    def _encode_v1(self) -> bytes:
        if self.family is AddressFamily.UNSPEC:
            return b"PROXY UNKNOWN\r\n"
        (src, sport), (dst, dport) = self._endpoints()
        src_text = _v1_address(ipaddress.ip_address(src))
        dst_text = _v1_address(ipaddress.ip_address(dst))
        name = _V1_NAMES[self.family]
        return f"PROXY {name} {src_text} {dst_text} {sport} {dport}\r\n".encode("ascii")

    def _addresses_v2(self) -> bytes:
        if self.family is AddressFamily.UNSPEC:
            return b""
        (src, sport), (dst, dport) = self._endpoints()
        return _ADDRESS_STRUCTS[self.family].pack(
            ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, sport, dport
        )

    def _v2_payload_length(self) -> int:
        n = 0 if self.family is AddressFamily.UNSPEC else _ADDRESS_STRUCTS[self.family].size
        return n + sum(V2_TLV_HEADER.size + len(value) for _, value in self.tlvs)

    def _encode_v2(self) -> bytes:
        parts = [self._addresses_v2()]
        crc_at = -1
        offset = V2_HEADER_LENGTH + len(parts[0])
        for tlv_type, value in self.tlvs:
            if tlv_type == PP2_TYPE_CRC32C and len(value) == _CRC32C_VALUE.size and crc_at < 0:
                crc_at = offset + V2_TLV_HEADER.size
                value = bytes(_CRC32C_VALUE.size)  # noqa: PLW2901 - zeroed for the checksum
            parts.append(V2_TLV_HEADER.pack(tlv_type, len(value)))
            parts.append(value)
            offset += V2_TLV_HEADER.size + len(value)
        payload = b"".join(parts)
        fixed = V2_HEADER.pack(
            V2_SIGNATURE,
            (_V2_VERSION << 4) | self.command,
            (self.family << 4) | self.protocol,
            len(payload),
        )
        wire = fixed + payload
        if crc_at >= 0:  # section 2.2.3: checksum over the header with the field zeroed
            crc = _CRC32C_VALUE.pack(crc32c(wire))
            wire = wire[:crc_at] + crc + wire[crc_at + _CRC32C_VALUE.size :]
        return wire


# --------------------------------------------------------------------------------------------
# The parser.
# --------------------------------------------------------------------------------------------


class ParserState(enum.Enum):
    """Where `ProxyHeaderParser` is."""

    #: Nothing received yet: the first byte picks the format.
    DETECT = enum.auto()
    #: Reading a v1 line up to CRLF.
    V1 = enum.auto()
    #: Reading the v2 fixed header, then ``len`` more bytes.
    V2 = enum.auto()
    #: The header is parsed; later bytes are trailing data.
    DONE = enum.auto()
    #: The input was rejected.
    FAILED = enum.auto()


_P = ParserState
#: The only legal transitions of `ProxyHeaderParser`.
TRANSITIONS: Final[dict[ParserState, frozenset[ParserState]]] = {
    _P.DETECT: frozenset({_P.V1, _P.V2, _P.FAILED}),
    _P.V1: frozenset({_P.DONE, _P.FAILED}),
    _P.V2: frozenset({_P.DONE, _P.FAILED}),
    _P.DONE: frozenset(),
    _P.FAILED: frozenset(),
}


def _first_mismatch(got: bytes | bytearray, expected: bytes) -> int:
    """Index of the first byte of ``got`` that differs from ``expected`` (-1: none so far)."""
    n = min(len(got), len(expected))
    if got[:n] == expected[:n]:
        return -1
    return next(i for i in range(n) if got[i] != expected[i])


class ProxyHeaderParser:
    """Parse one PROXY protocol header (v1 or v2) from a stream fed in arbitrary pieces.

    Example:
        >>> parser = ProxyHeaderParser()
        >>> parser.receive_data(b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222") is None
        True
        >>> parser.receive_data(b"\\r\\nHELLO").source
        ('1.2.3.4', 1111)
        >>> parser.trailing_data()
        b'HELLO'

    At most one header's worth of bytes is buffered (107 for v1, 16 + ``max_v2_payload`` for
    v2) plus whatever followed the header in the same ``receive_data`` call.
    """

    def __init__(self, *, max_v2_payload: int = MAX_V2_PAYLOAD) -> None:
        """Create a parser.

        Args:
            max_v2_payload: Largest v2 ``len`` (addresses + TLVs) accepted, at most 65535.

        Raises:
            ValueError: ``max_v2_payload`` is out of range.
        """
        if not 0 <= max_v2_payload <= _V2_LEN_FIELD_MAX:
            raise ValueError(f"max_v2_payload must be in 0..65535, not {max_v2_payload}")
        self.max_v2_payload = max_v2_payload
        self._state = ParserState.DETECT
        self._buffer = bytearray()
        self._header: ProxyHeader | None = None
        self._trailing = b""

    @property
    def state(self) -> ParserState:
        """The parser's state."""
        return self._state

    @property
    def header(self) -> ProxyHeader | None:
        """The parsed header once complete, else ``None``."""
        return self._header

    def trailing_data(self) -> bytes:
        """Bytes received after the header: the start of the relayed stream.

        Raises:
            LocalProtocolError: The header is not complete yet.
        """
        if self._state is not ParserState.DONE:
            raise LocalProtocolError(f"no header yet (state {self._state.name})")
        return self._trailing

    def receive_data(self, data: bytes) -> ProxyHeader | None:
        """Feed bytes from the stream.

        Args:
            data: The next bytes received (any length, including empty).

        Returns:
            ``None`` while the header is incomplete; the header once it is complete.

        Raises:
            NotProxyProtocol: The stream does not start with a PROXY protocol header.
            MalformedProxyHeader: The header violates spec section 2.1 or 2.2.
            ProxyHeaderTooLong: No CRLF within 107 bytes (v1), ``len`` above the cap (v2).
            LocalProtocolError: Called after the header was complete or the parser failed.
        """
        if self._state in (ParserState.DONE, ParserState.FAILED):
            raise LocalProtocolError(f"receive_data() in state {self._state.name}")
        self._buffer += data
        try:
            return self._parse()
        except ProxyProtocolError:
            self._transition(ParserState.FAILED)
            self._buffer.clear()
            raise

    # -- internals ---------------------------------------------------------------------------

    def _transition(self, new: ParserState) -> None:
        if new not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"{self._state.name} -> {new.name}")
        self._state = new

    def _parse(self) -> ProxyHeader | None:
        buf = self._buffer
        if self._state is ParserState.DETECT:
            if not buf:
                return None
            if buf[0] == V1_PREFIX[0]:
                self._transition(ParserState.V1)
            elif buf[0] == V2_SIGNATURE[0]:
                self._transition(ParserState.V2)
            else:
                raise NotProxyProtocol(f"first byte {bytes(buf[:1])!r} starts neither v1 nor v2")
        parsed = self._parse_v1(buf) if self._state is ParserState.V1 else self._parse_v2(buf)
        if parsed is None:
            return None
        header, length = parsed
        self._trailing = bytes(buf[length:])
        self._buffer = bytearray()
        self._header = header
        self._transition(ParserState.DONE)
        return header

    # v1, section 2.1 -----------------------------------------------------------------------

    def _parse_v1(self, buf: bytearray) -> tuple[ProxyHeader, int] | None:
        bad = _first_mismatch(buf, V1_PREFIX)
        if bad >= 0:
            raise NotProxyProtocol(
                f"byte {bad} is {bytes(buf[bad : bad + 1])!r}, not part of {V1_PREFIX!r}"
            )
        end = buf.find(_V1_CRLF, 0, V1_MAX_LENGTH)
        head = bytes(buf[: V1_MAX_LENGTH if end < 0 else end])
        # A lone LF, or a CR followed by anything but LF, can never become a valid line.
        lf = head.find(b"\n")
        if lf >= 0:
            raise MalformedProxyHeader(f"LF without CR at byte {lf} of the v1 line")
        cr = head.find(b"\r")
        # With a CRLF found, any CR before it is stray; without, a CR is stray once the byte
        # after it (inside the 107-byte window) is there and is not LF.
        if cr >= 0 and (end >= 0 or cr + 1 < min(len(buf), V1_MAX_LENGTH)):
            raise MalformedProxyHeader(f"CR not followed by LF at byte {cr} of the v1 line")
        if end < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyHeaderTooLong(f"no CRLF in the first {V1_MAX_LENGTH} bytes (v1)")
            return None
        return _decode_v1_line(head), end + len(_V1_CRLF)

    # v2, section 2.2 -----------------------------------------------------------------------

    def _parse_v2(self, buf: bytearray) -> tuple[ProxyHeader, int] | None:
        bad = _first_mismatch(buf, V2_SIGNATURE)
        if bad >= 0:
            raise NotProxyProtocol(f"byte {bad} of the v2 signature is {buf[bad]:#04x}")
        sig_len = len(V2_SIGNATURE)
        if len(buf) > sig_len:  # ver_cmd
            ver_cmd = buf[sig_len]
            if ver_cmd >> 4 != _V2_VERSION:
                raise NotProxyProtocol(f"v2 signature with version nibble {ver_cmd >> 4}")
            if ver_cmd & 0x0F not in (ProxyCommand.LOCAL, ProxyCommand.PROXY):
                raise MalformedProxyHeader(f"unassigned v2 command {ver_cmd & 0x0F:#x}")
        if len(buf) > sig_len + 1 and buf[sig_len + 1] not in _V2_FAMILY_BYTES:  # fam
            raise MalformedProxyHeader(f"invalid v2 family/protocol byte {buf[sig_len + 1]:#04x}")
        if len(buf) < V2_HEADER_LENGTH:
            return None
        _, ver_cmd, fam, length = V2_HEADER.unpack_from(buf)
        if length > self.max_v2_payload:
            raise ProxyHeaderTooLong(
                f"v2 len {length} is above the cap of {self.max_v2_payload} bytes"
            )
        total = V2_HEADER_LENGTH + length
        if len(buf) < total:
            return None
        wire = bytes(buf[:total])
        return _decode_v2(wire, ver_cmd & 0x0F, fam), total


def _v1_endpoint(family: AddressFamily, host: bytes, port: bytes) -> tuple[str, int]:
    """Validate one v1 address and port (section 2.1) and return them."""
    pattern = _V1_IPV4_RE if family is AddressFamily.INET else _V1_IPV6_RE
    if pattern.fullmatch(host) is None:
        raise MalformedProxyHeader(f"invalid {_V1_NAMES[family]} address {host!r}")
    try:
        addr = ipaddress.ip_address(host.decode("ascii"))
    except ValueError:
        raise MalformedProxyHeader(f"invalid {_V1_NAMES[family]} address {host!r}") from None
    if addr.version != _IP_VERSION[family]:  # pragma: no cover - the patterns exclude it
        raise MalformedProxyHeader(f"address {host!r} does not match {_V1_NAMES[family]}")
    if _V1_PORT_RE.fullmatch(port) is None or int(port) > _MAX_PORT:
        raise MalformedProxyHeader(f"invalid port {port!r}")
    return addr.compressed, int(port)


def _decode_v1_line(line: bytes) -> ProxyHeader:
    """Decode a v1 line without its CRLF (section 2.1)."""
    fields = line.split(b" ")
    proto = fields[1]
    if proto == b"UNKNOWN":  # the receiver must ignore anything up to CRLF
        return ProxyHeader(version=1)
    family = _V1_PROTOCOLS.get(proto)
    if family is None:
        raise MalformedProxyHeader(f"unknown v1 protocol {proto[:16]!r}")
    if len(fields) != 6:
        raise MalformedProxyHeader(
            f"v1 {proto.decode()} line needs 4 fields separated by single spaces"
        )
    _, _, src, dst, sport, dport = fields
    return ProxyHeader(
        version=1,
        family=family,
        protocol=TransportProtocol.STREAM,
        source=_v1_endpoint(family, src, sport),
        destination=_v1_endpoint(family, dst, dport),
    )


def _decode_v2(wire: bytes, command: int, fam: int) -> ProxyHeader:
    """Decode a complete v2 header whose fixed part was checked (section 2.2)."""
    family_nibble, protocol_nibble = fam >> 4, fam & 0x0F
    pos = V2_HEADER_LENGTH
    end = len(wire)
    source = destination = None
    if family_nibble == _AF_UNIX_NIBBLE:
        # Valid but not represented: fall back to UNSPEC mode (section 2.2) and skip it.
        family, protocol = AddressFamily.UNSPEC, TransportProtocol.UNSPEC
        if end - pos < V2_UNIX_ADDRESSES_LENGTH:
            raise MalformedProxyHeader(f"v2 len {end - pos} is too short for AF_UNIX (216)")
        pos += V2_UNIX_ADDRESSES_LENGTH
    else:
        family, protocol = AddressFamily(family_nibble), TransportProtocol(protocol_nibble)
        layout = _ADDRESS_STRUCTS.get(family)
        if layout is not None:
            if end - pos < layout.size:
                raise MalformedProxyHeader(
                    f"v2 len {end - pos} is too short for {family.name} ({layout.size})"
                )
            src, dst, sport, dport = layout.unpack_from(wire, pos)
            pos += layout.size
            source = (ipaddress.ip_address(src).compressed, sport)
            destination = (ipaddress.ip_address(dst).compressed, dport)
    tlvs: list[tuple[int, bytes]] = []
    crc_value: bytes | None = None
    crc_at = -1
    while pos < end:
        if end - pos < V2_TLV_HEADER.size:
            raise MalformedProxyHeader(f"{end - pos} stray byte(s) after the last v2 TLV")
        tlv_type, tlv_len = V2_TLV_HEADER.unpack_from(wire, pos)
        pos += V2_TLV_HEADER.size
        if tlv_len > end - pos:
            raise MalformedProxyHeader(
                f"v2 TLV {tlv_type:#04x} of {tlv_len} bytes overruns the header by"
                f" {tlv_len - (end - pos)}"
            )
        value = wire[pos : pos + tlv_len]
        if tlv_type == PP2_TYPE_CRC32C:
            if tlv_len != _CRC32C_VALUE.size or crc_value is not None:
                raise MalformedProxyHeader("v2 CRC32C TLV must appear once, with 4 bytes")
            crc_value, crc_at = value, pos
        tlvs.append((tlv_type, value))
        pos += tlv_len
    if crc_value is not None:  # section 2.2.3: checksum of the header with the field zeroed
        zeroed = wire[:crc_at] + bytes(_CRC32C_VALUE.size) + wire[crc_at + _CRC32C_VALUE.size :]
        (want,) = _CRC32C_VALUE.unpack(crc_value)
        got = crc32c(zeroed)
        if got != want:
            raise MalformedProxyHeader(
                f"v2 CRC32C mismatch: header says {want:#010x}, got {got:#010x}"
            )
    return ProxyHeader(
        version=2,
        command=ProxyCommand(command),
        family=family,
        protocol=protocol,
        source=source,
        destination=destination,
        tlvs=tuple(tlvs),
    )
