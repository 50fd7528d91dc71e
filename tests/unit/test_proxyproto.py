"""Unit tests for the sans-I/O PROXY protocol (sandport.proto.proxyproto), HAProxy spec v1 + v2.

Every table case is fed whole, one byte at a time and split in two at every byte boundary;
all feeds must give the same header and trailing data, or the same error. Malformed cases
also name the byte at which the parser must give up (fail fast).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandport.proto.errors import RemoteProtocolError
from sandport.proto.proxyproto import (
    MAX_V2_PAYLOAD,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    TRANSITIONS,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    AddressFamily,
    LocalProtocolError,
    MalformedProxyHeader,
    NotProxyProtocol,
    ParserState,
    ProxyCommand,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyHeaderTooLong,
    ProxyProtocolError,
    TransportProtocol,
    crc32c,
)

pytestmark = pytest.mark.unit

INET, INET6, UNSPEC_FAM = AddressFamily.INET, AddressFamily.INET6, AddressFamily.UNSPEC
STREAM, DGRAM, UNSPEC_PROTO = (
    TransportProtocol.STREAM,
    TransportProtocol.DGRAM,
    TransportProtocol.UNSPEC,
)
LOCAL, PROXY = ProxyCommand.LOCAL, ProxyCommand.PROXY
FFFF6 = ":".join(["ffff"] * 8)


# -- wire builders ---------------------------------------------------------------------------


def v2(ver_cmd: int, fam: int, payload: bytes, length: int | None = None) -> bytes:
    """A v2 header with a given payload (and optionally a lying len field)."""
    n = len(payload) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, n) + payload


def ip4(src: str, dst: str, sport: int, dport: int) -> bytes:
    a, b = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    return a + b + struct.pack("!HH", sport, dport)


def ip6(src: str, dst: str, sport: int, dport: int) -> bytes:
    a, b = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    return a + b + struct.pack("!HH", sport, dport)


def tlv(t: int, value: bytes) -> bytes:
    return struct.pack("!BH", t, len(value)) + value


def with_crc(wire: bytes) -> bytes:
    """Fill the (last 4 bytes) CRC32C TLV value of a v2 header whose CRC is zeroed."""
    return wire[:-4] + struct.pack("!I", crc32c(wire))


# -- feeding helpers -------------------------------------------------------------------------


def splits(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, one byte at a time, and in two pieces at every boundary."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield f"split@{i}", [data[:i], data[i:]]


def feed(chunks: list[bytes], **kw: int) -> tuple[ProxyHeader, bytes]:
    """Feed chunks until the header completes; return it and everything after it."""
    parser = ProxyHeaderParser(**kw)
    header: ProxyHeader | None = None
    rest = b""
    for chunk in chunks:
        if header is None:
            header = parser.receive_data(chunk)
        else:
            rest += chunk
    assert header is not None, "header never completed"
    assert parser.state is ParserState.DONE
    assert parser.header == header
    return header, parser.trailing_data() + rest


# -- valid headers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Valid:
    id: str
    wire: bytes
    header: ProxyHeader
    #: bytes(header) == wire (False where the wire has a non-canonical but valid spelling).
    canonical: bool = True


def hdr(version: int, **kw: object) -> ProxyHeader:
    return ProxyHeader(version=version, **kw)  # type: ignore[arg-type]


_CRC_WIRE = with_crc(
    v2(0x21, 0x11, ip4("10.0.0.1", "10.0.0.2", 1, 2) + tlv(PP2_TYPE_CRC32C, bytes(4)))
)

VALID = [
    Valid(
        "v1-tcp4",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n",
        hdr(
            1, family=INET, protocol=STREAM, source=("1.2.3.4", 1111), destination=("5.6.7.8", 2222)
        ),
    ),
    Valid(
        "v1-tcp4-max",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        hdr(
            1,
            family=INET,
            protocol=STREAM,
            source=("255.255.255.255", 65535),
            destination=("255.255.255.255", 65535),
        ),
    ),
    Valid(
        "v1-tcp4-zeros",
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        hdr(1, family=INET, protocol=STREAM, source=("0.0.0.0", 0), destination=("0.0.0.0", 0)),
    ),
    Valid(
        "v1-tcp6",
        b"PROXY TCP6 2001:db8::1 ::1 40000 443\r\n",
        hdr(
            1,
            family=INET6,
            protocol=STREAM,
            source=("2001:db8::1", 40000),
            destination=("::1", 443),
        ),
    ),
    Valid(
        "v1-tcp6-max-104-bytes",
        f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        hdr(1, family=INET6, protocol=STREAM, source=(FFFF6, 65535), destination=(FFFF6, 65535)),
    ),
    Valid(
        "v1-tcp6-uppercase-exploded",
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::1 1 2\r\n",
        hdr(1, family=INET6, protocol=STREAM, source=("2001:db8::1", 1), destination=("::1", 2)),
        canonical=False,
    ),
    Valid("v1-unknown", b"PROXY UNKNOWN\r\n", hdr(1)),
    Valid(
        "v1-unknown-worst-case-107-bytes",
        f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
        hdr(1),
        canonical=False,
    ),
    Valid(
        "v1-unknown-junk-ignored", b"PROXY UNKNOWN \x00\xff anything\r\n", hdr(1), canonical=False
    ),
    Valid(
        "v2-tcp4",
        v2(0x21, 0x11, ip4("1.2.3.4", "5.6.7.8", 1111, 2222)),
        hdr(
            2, family=INET, protocol=STREAM, source=("1.2.3.4", 1111), destination=("5.6.7.8", 2222)
        ),
    ),
    Valid(
        "v2-udp4",
        v2(0x21, 0x12, ip4("1.2.3.4", "5.6.7.8", 53, 5353)),
        hdr(2, family=INET, protocol=DGRAM, source=("1.2.3.4", 53), destination=("5.6.7.8", 5353)),
    ),
    Valid(
        "v2-tcp6",
        v2(0x21, 0x21, ip6("2001:db8::1", "::1", 40000, 443)),
        hdr(
            2,
            family=INET6,
            protocol=STREAM,
            source=("2001:db8::1", 40000),
            destination=("::1", 443),
        ),
    ),
    Valid(
        "v2-udp6",
        v2(0x21, 0x22, ip6("::", FFFF6, 0, 65535)),
        hdr(2, family=INET6, protocol=DGRAM, source=("::", 0), destination=(FFFF6, 65535)),
    ),
    Valid("v2-local", v2(0x20, 0x00, b""), hdr(2, command=LOCAL)),
    Valid(
        "v2-local-with-tlvs",
        v2(0x20, 0x00, tlv(PP2_TYPE_NOOP, b"") + tlv(PP2_TYPE_UNIQUE_ID, b"id-1")),
        hdr(2, command=LOCAL, tlvs=((PP2_TYPE_NOOP, b""), (PP2_TYPE_UNIQUE_ID, b"id-1"))),
    ),
    Valid(
        "v2-local-with-addresses",
        v2(0x20, 0x11, ip4("127.0.0.1", "127.0.0.1", 1, 2)),
        hdr(
            2,
            command=LOCAL,
            family=INET,
            protocol=STREAM,
            source=("127.0.0.1", 1),
            destination=("127.0.0.1", 2),
        ),
    ),
    Valid("v2-proxy-unspec", v2(0x21, 0x00, b""), hdr(2)),
    Valid(
        "v2-tcp4-tlvs",
        v2(
            0x21,
            0x11,
            ip4("1.2.3.4", "5.6.7.8", 1, 2)
            + tlv(PP2_TYPE_ALPN, b"h2")
            + tlv(PP2_TYPE_AUTHORITY, "bücher.example".encode())
            + tlv(0xE0, bytes(300))
            + tlv(PP2_TYPE_NOOP, b"\0\0"),
        ),
        hdr(
            2,
            family=INET,
            protocol=STREAM,
            source=("1.2.3.4", 1),
            destination=("5.6.7.8", 2),
            tlvs=(
                (PP2_TYPE_ALPN, b"h2"),
                (PP2_TYPE_AUTHORITY, "bücher.example".encode()),
                (0xE0, bytes(300)),
                (PP2_TYPE_NOOP, b"\0\0"),
            ),
        ),
    ),
    Valid(
        "v2-tcp4-crc32c",
        _CRC_WIRE,
        hdr(
            2,
            family=INET,
            protocol=STREAM,
            source=("10.0.0.1", 1),
            destination=("10.0.0.2", 2),
            tlvs=((PP2_TYPE_CRC32C, _CRC_WIRE[-4:]),),
        ),
    ),
    Valid(
        # AF_UNIX is valid but not represented: UNSPEC mode, addresses skipped, TLVs kept.
        "v2-unix-falls-back-to-unspec",
        v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0") + tlv(1, b"x")),
        hdr(2, tlvs=((1, b"x"),)),
        canonical=False,
    ),
]


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_valid_header_every_split(case: Valid) -> None:
    for how, chunks in splits(case.wire):
        header, trailing = feed(chunks)
        assert header == case.header, how
        assert trailing == b"", how
    # With the relayed stream right behind the header, in every split.
    tail = b"SSH-2.0-x\r\n\x00\xff"
    for how, chunks in splits(case.wire + tail):
        header, trailing = feed(chunks)
        assert header == case.header, how
        assert trailing == tail, how


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_round_trip(case: Valid) -> None:
    if case.canonical:
        assert bytes(case.header) == case.wire
    assert ProxyHeader.from_bytes(bytes(case.header)) == case.header
    assert ProxyHeader.from_bytes(case.wire) == case.header


def test_v1_lengths_from_the_spec() -> None:
    """Section 2.1: 56 (TCP4), 104 (TCP6), 15 (UNKNOWN) and 107 (worst case) bytes."""
    by_id = {c.id: c.wire for c in VALID}
    assert len(by_id["v1-tcp4-max"]) == 56
    assert len(by_id["v1-tcp6-max-104-bytes"]) == 104
    assert len(by_id["v1-unknown"]) == 15
    assert len(by_id["v1-unknown-worst-case-107-bytes"]) == V1_MAX_LENGTH


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 4960 / iSCSI check value
    assert crc32c(b"") == 0


def test_crc32c_is_computed_when_encoding() -> None:
    header = ProxyHeader.for_stream(
        ("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=((PP2_TYPE_CRC32C, bytes(4)),)
    )
    assert bytes(header) == _CRC_WIRE
    parsed = ProxyHeader.from_bytes(bytes(header))
    assert parsed.tlvs == ((PP2_TYPE_CRC32C, _CRC_WIRE[-4:]),)
    assert bytes(parsed) == bytes(header)


def test_for_stream_picks_the_family() -> None:
    h4 = ProxyHeader.for_stream(("127.0.0.1", 40000), ("127.0.0.1", 5901), version=1)
    assert bytes(h4) == b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 5901\r\n"
    h6 = ProxyHeader.for_stream(("::1", 1), ("::1", 2))
    assert (h6.family, h6.protocol, h6.command) == (INET6, STREAM, PROXY)
    with pytest.raises(ValueError, match="not an IP address"):
        ProxyHeader.for_stream(("localhost", 1), ("::1", 2))
    with pytest.raises(ValueError, match="IPv6"):
        ProxyHeader.for_stream(("::1", 1), ("127.0.0.1", 2))


def test_v1_ipv4_mapped_address_is_written_without_dots() -> None:
    header = ProxyHeader.for_stream(("::ffff:1.2.3.4", 1), ("::1", 2), version=1)
    line = bytes(header)
    assert b"." not in line
    assert ProxyHeader.from_bytes(line) == header


def test_addresses_are_normalized() -> None:
    a = ProxyHeader.for_stream(("2001:DB8:0:0::1", 1), ("::1", 2))
    assert a.source == ("2001:db8::1", 1)


def test_configurable_v2_cap() -> None:
    wire = v2(0x21, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2))  # len 12
    assert feed([wire], max_v2_payload=12)[0].source == ("1.2.3.4", 1)
    with pytest.raises(ProxyHeaderTooLong):
        ProxyHeaderParser(max_v2_payload=11).receive_data(wire)
    big = ProxyHeader(version=2, tlvs=((0xE1, bytes(60000)),))
    with pytest.raises(ProxyHeaderTooLong):
        ProxyHeader.from_bytes(bytes(big))
    assert ProxyHeader.from_bytes(bytes(big), max_v2_payload=65535) == big
    with pytest.raises(ValueError, match="max_v2_payload"):
        ProxyHeaderParser(max_v2_payload=65536)


# -- malformed input -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    wire: bytes
    error: type[ProxyProtocolError]
    #: Index of the byte whose arrival must raise (fed one byte at a time).
    fail_at: int


def _at_end(wire: bytes) -> int:
    return len(wire) - 1


def bad(id: str, wire: bytes, error: type[ProxyProtocolError], fail_at: int | None = None) -> Bad:
    return Bad(id, wire, error, _at_end(wire) if fail_at is None else fail_at)


_TCP4 = v2(0x21, 0x11, ip4("1.2.3.4", "5.6.7.8", 1, 2))
_WRONG_CRC = _CRC_WIRE[:-1] + bytes([_CRC_WIRE[-1] ^ 1])

BAD = [
    # Neither format: fail at the first wrong byte.
    bad("http", b"GET / HTTP/1.1\r\n", NotProxyProtocol, 0),
    bad("tls", b"\x16\x03\x01\x02\x00", NotProxyProtocol, 0),
    bad("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotProxyProtocol, 0),
    bad("PROXX", b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NotProxyProtocol, 4),
    bad("PROXY-crlf", b"PROXY\r\n", NotProxyProtocol, 5),
    bad("PROXY-tab", b"PROXY\tTCP4", NotProxyProtocol, 5),
    bad("v2-signature-byte-3", b"\r\n\rX" + bytes(20), NotProxyProtocol, 3),
    bad("v2-signature-byte-11", V2_SIGNATURE[:11] + b"\x0b" + bytes(8), NotProxyProtocol, 11),
    bad("v2-version-1", V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), NotProxyProtocol, 12),
    bad("v2-version-3", V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), NotProxyProtocol, 12),
    # v1 line syntax (section 2.1): decided at the CRLF unless a byte is impossible.
    bad("v1-tcp5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    bad("v1-empty-proto", b"PROXY \r\n", MalformedProxyHeader),
    bad("v1-UNKNOWNX", b"PROXY UNKNOWNX\r\n", MalformedProxyHeader),
    bad("v1-double-space", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    bad("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", MalformedProxyHeader),
    bad("v1-missing-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", MalformedProxyHeader),
    bad("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", MalformedProxyHeader),
    bad("v1-octet-zero-prefix", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    bad("v1-octet-256", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    bad("v1-three-octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    bad("v1-tcp4-with-ipv6", b"PROXY TCP4 ::1 ::1 1 2\r\n", MalformedProxyHeader),
    bad("v1-tcp6-with-ipv4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    bad("v1-tcp6-scope", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", MalformedProxyHeader),
    bad("v1-tcp6-dotted", b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", MalformedProxyHeader),
    bad("v1-tcp6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", MalformedProxyHeader),
    bad("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", MalformedProxyHeader),
    bad("v1-port-zero-prefix", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", MalformedProxyHeader),
    bad("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", MalformedProxyHeader),
    bad("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", MalformedProxyHeader),
    bad("v1-port-underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", MalformedProxyHeader),
    bad(
        "v1-port-unicode-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 1 ٢\r\n".encode(), MalformedProxyHeader
    ),
    bad("v1-non-ascii", b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", MalformedProxyHeader),
    # A lone LF or CR ends nothing (section 2.1): fail as soon as it is seen.
    bad("v1-lf-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET", MalformedProxyHeader, 30),
    bad("v1-cr-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET", MalformedProxyHeader, 31),
    bad("v1-cr-inside", b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", MalformedProxyHeader, 19),
    bad("v1-unknown-lone-lf", b"PROXY UNKNOWN x\ny\r\n", MalformedProxyHeader, 15),
    # No CRLF within 107 bytes.
    bad("v1-too-long", b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n", ProxyHeaderTooLong, 106),
    bad(
        "v1-too-long-cr-at-107",
        b"PROXY UNKNOWN ".ljust(106, b"x") + b"\r\n",
        ProxyHeaderTooLong,
        106,
    ),
    bad("v1-tcp4-digits", b"PROXY TCP4 " + b"1" * 150, ProxyHeaderTooLong, 106),
    # v2 fixed header (section 2.2): fail at the offending byte.
    bad("v2-command-2", V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), MalformedProxyHeader, 12),
    bad("v2-command-f", V2_SIGNATURE + b"\x2f\x00\x00\x00", MalformedProxyHeader, 12),
    bad(
        "v2-fam-inet-unspec",
        V2_SIGNATURE + b"\x21\x10\x00\x0c" + bytes(12),
        MalformedProxyHeader,
        13,
    ),
    bad("v2-fam-unspec-stream", V2_SIGNATURE + b"\x21\x01\x00\x00", MalformedProxyHeader, 13),
    bad(
        "v2-fam-inet-proto-3",
        V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),
        MalformedProxyHeader,
        13,
    ),
    bad("v2-fam-4", V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), MalformedProxyHeader, 13),
    bad("v2-len-above-cap", v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD + 1), ProxyHeaderTooLong, 15),
    bad("v2-len-65535", v2(0x21, 0x00, b"", length=0xFFFF), ProxyHeaderTooLong, 15),
    # v2 address block and TLVs: decided once the whole header is in.
    bad("v2-inet-len-11", v2(0x21, 0x11, bytes(11)), MalformedProxyHeader),
    bad("v2-inet6-len-12", v2(0x21, 0x21, bytes(12)), MalformedProxyHeader),
    bad("v2-unix-len-100", v2(0x21, 0x31, bytes(100)), MalformedProxyHeader),
    bad("v2-tlv-stray-bytes", v2(0x21, 0x11, _TCP4[16:] + b"\x01\x00"), MalformedProxyHeader),
    bad("v2-tlv-overrun", v2(0x21, 0x11, _TCP4[16:] + b"\x01\x00\x05abc"), MalformedProxyHeader),
    bad("v2-tlv-overrun-unspec", v2(0x21, 0x00, b"\xe0\xff\xff"), MalformedProxyHeader),
    bad("v2-crc32c-wrong", _WRONG_CRC, MalformedProxyHeader),
    bad("v2-crc32c-3-bytes", v2(0x21, 0x00, tlv(PP2_TYPE_CRC32C, b"abc")), MalformedProxyHeader),
    bad(
        "v2-crc32c-twice",
        v2(0x21, 0x00, tlv(PP2_TYPE_CRC32C, bytes(4)) + tlv(PP2_TYPE_CRC32C, bytes(4))),
        MalformedProxyHeader,
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_malformed_every_split(case: Bad) -> None:
    for how, chunks in splits(case.wire):
        parser = ProxyHeaderParser()
        with pytest.raises(case.error):  # noqa: PT012 - the raise may come from any chunk
            for chunk in chunks:
                assert parser.receive_data(chunk) is None, how
        assert parser.state is ParserState.FAILED, how


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_malformed_fails_fast(case: Bad) -> None:
    parser = ProxyHeaderParser()
    for i in range(case.fail_at):
        assert parser.receive_data(case.wire[i : i + 1]) is None, f"byte {i}"
    with pytest.raises(case.error):
        parser.receive_data(case.wire[case.fail_at : case.fail_at + 1])


def test_from_bytes_rejects_truncated_and_trailing() -> None:
    wire = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    with pytest.raises(MalformedProxyHeader, match="truncated"):
        ProxyHeader.from_bytes(wire[:-1])
    with pytest.raises(MalformedProxyHeader, match="after the header"):
        ProxyHeader.from_bytes(wire + b"x")
    with pytest.raises(MalformedProxyHeader, match="truncated"):
        ProxyHeader.from_bytes(b"")


# -- header construction ---------------------------------------------------------------------

_A4, _B4 = ("1.2.3.4", 1), ("5.6.7.8", 2)
INVALID_HEADERS: list[tuple[str, dict[str, object], str]] = [
    ("version-3", {"version": 3}, "version"),
    ("v1-local", {"version": 1, "command": LOCAL}, "LOCAL"),
    (
        "v1-dgram",
        {"version": 1, "family": INET, "protocol": DGRAM, "source": _A4, "destination": _B4},
        "DGRAM",
    ),
    ("v1-tlvs", {"version": 1, "tlvs": ((1, b"x"),)}, "TLV"),
    ("unspec-stream", {"version": 2, "protocol": STREAM}, "UNSPEC"),
    ("unspec-with-source", {"version": 2, "source": _A4}, "no source"),
    ("inet-unspec", {"version": 2, "family": INET, "source": _A4, "destination": _B4}, "STREAM"),
    (
        "inet-no-source",
        {"version": 2, "family": INET, "protocol": STREAM, "destination": _B4},
        "source",
    ),
    (
        "inet-ipv6-source",
        {
            "version": 2,
            "family": INET,
            "protocol": STREAM,
            "source": ("::1", 1),
            "destination": _B4,
        },
        "IPv4",
    ),
    (
        "inet-hostname",
        {
            "version": 2,
            "family": INET,
            "protocol": STREAM,
            "source": ("a.b", 1),
            "destination": _B4,
        },
        "not an IP",
    ),
    (
        "port-70000",
        {
            "version": 2,
            "family": INET,
            "protocol": STREAM,
            "source": ("1.2.3.4", 70000),
            "destination": _B4,
        },
        "port",
    ),
    (
        "port-negative",
        {
            "version": 2,
            "family": INET,
            "protocol": STREAM,
            "source": _A4,
            "destination": ("5.6.7.8", -1),
        },
        "port",
    ),
    ("tlv-type-256", {"version": 2, "tlvs": ((256, b""),)}, "TLV type"),
    ("tlv-too-long", {"version": 2, "tlvs": ((1, bytes(65536)),)}, "65535"),
    ("payload-too-long", {"version": 2, "tlvs": ((1, bytes(40000)), (2, bytes(40000)))}, "65535"),
]


@pytest.mark.parametrize(
    ("fields", "match"), [c[1:] for c in INVALID_HEADERS], ids=[c[0] for c in INVALID_HEADERS]
)
def test_invalid_header_fields(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProxyHeader(**fields)  # type: ignore[arg-type]


# -- parser state ----------------------------------------------------------------------------


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(ParserState)
    assert TRANSITIONS[ParserState.DONE] == frozenset()
    assert TRANSITIONS[ParserState.FAILED] == frozenset()


def test_parser_states_and_misuse() -> None:
    parser = ProxyHeaderParser()
    assert parser.state is ParserState.DETECT
    assert parser.receive_data(b"") is None
    assert parser.state is ParserState.DETECT
    with pytest.raises(LocalProtocolError):
        parser.trailing_data()
    assert parser.receive_data(b"P") is None
    assert parser.state is ParserState.V1
    assert parser.receive_data(b"ROXY UNKNOWN\r\nrest") == ProxyHeader(version=1)
    assert parser.trailing_data() == b"rest"
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"more")

    v2_parser = ProxyHeaderParser()
    assert v2_parser.receive_data(V2_SIGNATURE[:1]) is None
    assert v2_parser.state is ParserState.V2

    failed = ProxyHeaderParser()
    with pytest.raises(NotProxyProtocol):
        failed.receive_data(b"X")
    assert failed.state is ParserState.FAILED
    with pytest.raises(LocalProtocolError):
        failed.receive_data(b"PROXY")


# -- properties ------------------------------------------------------------------------------

_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)
_tlvs = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != PP2_TYPE_CRC32C), st.binary(max_size=64)),
    max_size=4,
).map(tuple)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    version = draw(st.sampled_from([1, 2]))
    family = draw(st.sampled_from(list(AddressFamily)))
    if family is UNSPEC_FAM:
        protocol, src, dst = UNSPEC_PROTO, None, None
    else:
        addr = _ipv4 if family is INET else _ipv6
        protocol = STREAM if version == 1 else draw(st.sampled_from([STREAM, DGRAM]))
        src, dst = (draw(addr), draw(_port)), (draw(addr), draw(_port))
    command = PROXY if version == 1 else draw(st.sampled_from(list(ProxyCommand)))
    return ProxyHeader(
        version=version,
        command=command,
        family=family,
        protocol=protocol,
        source=src,
        destination=dst,
        tlvs=draw(_tlvs) if version == 2 else (),
    )


@given(headers(), st.binary(max_size=16), st.data())
def test_round_trip_property(header: ProxyHeader, tail: bytes, data: st.DataObject) -> None:
    wire = bytes(header)
    assert ProxyHeader.from_bytes(wire) == header
    cut = data.draw(st.integers(0, len(wire)))
    got, trailing = feed([wire[:cut], wire[cut:] + tail])
    assert got == header
    assert trailing == tail


def _feed_random(chunks: list[bytes]) -> None:
    parser = ProxyHeaderParser()
    try:
        for chunk in chunks:
            if parser.receive_data(chunk) is not None:
                return
    except RemoteProtocolError:
        assert parser.state is ParserState.FAILED


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_fuzz_random_bytes(chunks: list[bytes]) -> None:
    _feed_random(chunks)


@settings(max_examples=500)
@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE]),
    st.binary(max_size=160),
    st.integers(0, 200),
)
def test_fuzz_after_a_valid_prefix(prefix: bytes, rest: bytes, cut: int) -> None:
    data = prefix + rest
    _feed_random([data[:cut], data[cut:]])


@settings(max_examples=300)
@given(headers(), st.data())
def test_fuzz_mutated_headers(header: ProxyHeader, data: st.DataObject) -> None:
    wire = bytearray(bytes(header))
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] = data.draw(st.integers(0, 255))
    _feed_random([bytes(wire)])
