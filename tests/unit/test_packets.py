"""Unit tests for the guest-link frame parsers and builders (sandport.proto.packets).

Round trips for every type, checksums against independent vectors (RFC 1071's example, a
textbook IPv4 header, a busybox-udhcpc-style DHCP DISCOVER assembled here with plain
``struct``), one malformed-input table naming the `MalformedFrame.reason` each parser must
give, and hypothesis fuzzing: parsers raise nothing but `MalformedFrame`, and
`LinkServices.handle` raises nothing at all.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandport.proto.errors import RemoteProtocolError
from sandport.proto.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST,
    ETH_ARP,
    ETH_IPV4,
    ICMP_ECHO_REQUEST,
    PROTO_ICMP,
    PROTO_UDP,
    ArpPacket,
    DhcpMessage,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    MalformedFrame,
    UdpDatagram,
    checksum,
    pseudo_header_checksum,
)
from sandport.proto.packets.dhcp import DHCPDISCOVER, DHCPREQUEST, FLAG_BROADCAST
from sandport.usernet.link import LinkConfig, LinkServices

pytestmark = pytest.mark.unit

MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("02000a0000fe")
A = IPv4Address("10.201.240.2")
B = IPv4Address("10.201.240.1")
ZERO = IPv4Address("0.0.0.0")
ALL = IPv4Address("255.255.255.255")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True)


# -- independent wire builders (plain struct, no sandport code) -------------------------------


def ref_checksum(data: bytes) -> int:
    """RFC 1071 section 4.1's loop, transcribed; used only to cross-check `checksum`."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udhcpc_discover(xid: int = 0x3903F326) -> tuple[bytes, bytes, bytes]:
    """A DISCOVER as busybox udhcpc 1.36 sends it: frame, IPv4 header, UDP segment.

    Options in udhcpc's order: 53 DISCOVER, 61 client id, 57 max size 576, 60 vendor class,
    12 hostname, 55 parameter list (subnet, router, dns, hostname, domain, broadcast, ntp);
    the BOOTP part is zero-padded to udhcpc's 548-byte struct; broadcast flag clear.
    """
    opts = (
        bytes([53, 1, 1]) + bytes([61, 7, 1]) + MAC + bytes([57, 2, 0x02, 0x40])
        + bytes([60, 12]) + b"udhcp 1.36.1" + bytes([12, 5]) + b"guest"
        + bytes([55, 7, 1, 3, 6, 12, 15, 28, 42]) + bytes([255])
    )  # fmt: skip
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0,
        bytes(4), bytes(4), bytes(4), bytes(4), MAC + bytes(10), b"", b"",
    )  # fmt: skip
    bootp = fixed + b"\x63\x82\x53\x63" + opts
    bootp += bytes(548 - len(bootp))
    length = 8 + len(bootp)
    udp = struct.pack("!HHHH", 68, 67, length, 0) + bootp
    pseudo = bytes(4) + b"\xff" * 4 + struct.pack("!BBH", 0, 17, length)
    udp = udp[:6] + struct.pack("!H", ref_checksum(pseudo + udp)) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", ref_checksum(ip)) + ip[12:]
    return BROADCAST + MAC + b"\x08\x00" + ip + udp, ip, udp


def ip_header(**kw: int) -> bytes:
    """A 20-byte IPv4 header A -> B with a valid checksum unless ``check`` is given."""
    f = {"ver_ihl": 0x45, "total": 28, "frag": 0, "proto": 17} | kw
    hdr = struct.pack(
        "!BBHHHBBH4s4s", f["ver_ihl"], 0, f["total"], 1, f["frag"], 64, f["proto"], 0,
        A.packed, B.packed,
    )  # fmt: skip
    check = f.get("check", ref_checksum(hdr))
    return hdr[:10] + struct.pack("!H", check) + hdr[12:]


# -- checksums -------------------------------------------------------------------------------


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2; the checksum is its complement.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"") == 0xFFFF
    assert checksum(b"\x01") == 0xFEFF  # odd length: padded with a zero byte


def test_textbook_ipv4_header_checksum() -> None:
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(header) == 0xB861
    packet = IPv4Packet.parse(header[:10] + b"\xb8\x61" + header[12:] + bytes(0x73 - 20))
    assert (packet.src, packet.dst, packet.proto) == (
        IPv4Address("192.168.0.1"), IPv4Address("192.168.0.199"), PROTO_UDP,
    )  # fmt: skip
    assert packet.dont_fragment
    assert len(packet.payload) == 0x73 - 20


@given(st.binary(max_size=200))
@FUZZ
def test_checksum_matches_rfc1071_loop(data: bytes) -> None:
    assert checksum(data) == ref_checksum(data)


def test_udhcpc_discover_vector() -> None:
    frame, ip, udp = udhcpc_discover()
    # Fixed vectors, computed once with the reference loop: the builder above must not drift.
    assert ip[10:12] == b"\x78\xae"
    assert udp[6:8] == b"\xf0\x13"
    eth = EthernetFrame.parse(frame)
    assert (eth.dst, eth.src, eth.ethertype) == (BROADCAST, MAC, ETH_IPV4)
    packet = IPv4Packet.parse(eth.payload)
    assert (packet.src, packet.dst, packet.proto, packet.ttl) == (ZERO, ALL, PROTO_UDP, 64)
    datagram = UdpDatagram.parse(packet.payload, packet.src, packet.dst)
    assert (datagram.sport, datagram.dport) == (68, 67)
    msg = DhcpMessage.parse(datagram.payload)
    assert msg.xid == 0x3903F326 and msg.chaddr == MAC and not msg.broadcast
    assert msg.message_type == DHCPDISCOVER
    assert msg.parameter_list == (1, 3, 6, 12, 15, 28, 42)
    assert msg.options[60] == b"udhcp 1.36.1" and msg.options[12] == b"guest"
    assert msg.requested_ip is None and msg.server_id is None
    # Our builders reproduce the same checksums for the same content.
    assert packet.build() == ip + udp
    assert datagram.build(ZERO, ALL) == udp


# -- round trips -----------------------------------------------------------------------------


def test_ethernet_round_trip() -> None:
    frame = EthernetFrame(dst=BROADCAST, src=MAC, ethertype=ETH_ARP, payload=b"xyz")
    wire = frame.build()
    assert wire == BROADCAST + MAC + b"\x08\x06xyz"
    assert EthernetFrame.parse(wire) == frame


def test_arp_round_trip_and_padding() -> None:
    arp = ArpPacket(op=ARP_REQUEST, sha=MAC, spa=A, tha=bytes(6), tpa=B)
    wire = arp.build()
    assert len(wire) == 28 and wire[:8] == bytes.fromhex("0001080006040001")
    assert ArpPacket.parse(wire) == arp
    assert ArpPacket.parse(wire + bytes(18)) == arp  # Ethernet minimum-frame padding
    reply = ArpPacket(op=ARP_REPLY, sha=GW_MAC, spa=B, tha=MAC, tpa=A)
    assert ArpPacket.parse(reply.build()) == reply


def test_ipv4_round_trip_padding_and_options() -> None:
    packet = IPv4Packet(src=A, dst=B, proto=PROTO_ICMP, payload=b"hello", ttl=7, ident=99)
    wire = packet.build()
    assert checksum(wire[:20]) == 0 and len(wire) == 25
    assert IPv4Packet.parse(wire) == packet
    assert IPv4Packet.parse(wire + bytes(20)) == packet  # bytes past Total Length ignored
    # IHL 6: one option word (NOP NOP NOP EOL) is skipped.
    hdr = ip_header(ver_ihl=0x46, total=24 + 5, check=0)[:20] + b"\x01\x01\x01\x00"
    hdr = hdr[:10] + struct.pack("!H", ref_checksum(hdr)) + hdr[12:]
    assert IPv4Packet.parse(hdr + b"hello").payload == b"hello"


def test_udp_round_trip_and_zero_checksum() -> None:
    datagram = UdpDatagram(sport=68, dport=67, payload=b"\x01\x02\x03")
    wire = datagram.build(A, B)
    assert pseudo_header_checksum(A, B, PROTO_UDP, wire) == 0
    assert UdpDatagram.parse(wire, A, B) == datagram
    unchecked = wire[:6] + b"\x00\x00" + wire[8:]  # 0 = "no checksum" over IPv4 (RFC 768)
    assert UdpDatagram.parse(unchecked, A, B) == datagram
    assert UdpDatagram.parse(wire + b"pad", A, B) == datagram
    with pytest.raises(MalformedFrame) as exc:
        UdpDatagram.parse(wire, A, ALL)  # the pseudo header binds the addresses
    assert exc.value.reason == "udp_bad_checksum"


def test_icmp_round_trip() -> None:
    echo = IcmpEcho(type=ICMP_ECHO_REQUEST, ident=0x1234, seq=7, data=b"ping" * 10)
    wire = echo.build()
    assert checksum(wire) == 0
    assert IcmpEcho.parse(wire) == echo
    # Linux ping, ident 0x1234 seq 1, no data: 08 00 e5 ca 12 34 00 01.
    assert IcmpEcho(type=8, ident=0x1234, seq=1).build() == bytes.fromhex("0800e5ca12340001")


def test_dhcp_round_trip_long_and_repeated_options() -> None:
    msg = DhcpMessage(
        op=2, xid=1, chaddr=MAC, flags=FLAG_BROADCAST, yiaddr=A, ciaddr=ZERO,
        options={53: b"\x02", 54: B.packed, 77: b"x" * 300, 80: b""},
    )  # fmt: skip
    wire = msg.build()
    assert len(wire) >= 300
    assert DhcpMessage.parse(wire) == msg  # option 77 split in 255 + 45 and rejoined
    assert wire.count(b"\x4d\xff") == 1 and b"\x4d\x2d" in wire
    # pads, missing end option: tolerated.
    req = DhcpMessage(op=1, xid=2, chaddr=MAC, options={53: b"\x03", 50: A.packed})
    body = req.build().rstrip(b"\x00")[:-1]  # strip padding and the end option
    parsed = DhcpMessage.parse(body[:240] + b"\x00\x00" + body[240:])
    assert parsed.message_type == DHCPREQUEST and parsed.requested_ip == A


# -- malformed input -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    parser: Callable[[bytes], Any]
    wire: bytes
    reason: str


def _udp(wire: bytes) -> UdpDatagram:
    return UdpDatagram.parse(wire, A, B)


_ARP = ArpPacket(op=1, sha=MAC, spa=A, tha=bytes(6), tpa=B).build()
_ICMP = IcmpEcho(type=8, ident=1, seq=1, data=b"abc").build()
_UDP = UdpDatagram(sport=1, dport=2, payload=b"abcd").build(A, B)
_DHCP = DhcpMessage(op=1, xid=5, chaddr=MAC, options={53: b"\x01"}).build()


def _icmp_fixed(wire: bytes) -> bytes:
    """Recompute the ICMP checksum after editing a field."""
    wire = wire[:2] + b"\x00\x00" + wire[4:]
    return wire[:2] + struct.pack("!H", ref_checksum(wire)) + wire[4:]


BAD = [
    Bad("eth-empty", EthernetFrame.parse, b"", "eth_short"),
    Bad("eth-13", EthernetFrame.parse, bytes(13), "eth_short"),
    Bad("arp-short", ArpPacket.parse, _ARP[:27], "arp_short"),
    Bad("arp-htype", ArpPacket.parse, b"\x00\x06" + _ARP[2:], "arp_unsupported"),
    Bad("arp-ptype", ArpPacket.parse, _ARP[:2] + b"\x86\xdd" + _ARP[4:], "arp_unsupported"),
    Bad("arp-hlen", ArpPacket.parse, _ARP[:4] + b"\x08" + _ARP[5:], "arp_unsupported"),
    Bad("arp-op", ArpPacket.parse, _ARP[:6] + b"\x00\x03" + _ARP[8:], "arp_bad_op"),
    Bad("ipv4-short", IPv4Packet.parse, ip_header()[:19], "ipv4_short"),
    Bad("ipv4-version6", IPv4Packet.parse, ip_header(ver_ihl=0x65) + bytes(8), "ipv4_bad_version"),
    Bad("ipv4-ihl4", IPv4Packet.parse, ip_header(ver_ihl=0x44) + bytes(8), "ipv4_bad_ihl"),
    Bad("ipv4-ihl-past-data", IPv4Packet.parse, ip_header(ver_ihl=0x4F, total=28) + bytes(8),
        "ipv4_bad_length"),
    Bad("ipv4-ihl-past-total", IPv4Packet.parse, ip_header(ver_ihl=0x4F, total=60) + bytes(8),
        "ipv4_truncated"),
    Bad("ipv4-total-under-header", IPv4Packet.parse, ip_header(total=19) + bytes(8),
        "ipv4_bad_length"),
    Bad("ipv4-truncated", IPv4Packet.parse, ip_header(total=28) + bytes(7), "ipv4_truncated"),
    Bad("ipv4-checksum", IPv4Packet.parse, ip_header(check=0x1234) + bytes(8),
        "ipv4_bad_checksum"),
    Bad("ipv4-more-fragments", IPv4Packet.parse, ip_header(frag=0x2000) + bytes(8),
        "ipv4_fragment"),
    Bad("ipv4-last-fragment", IPv4Packet.parse, ip_header(frag=0x0001) + bytes(8),
        "ipv4_fragment"),
    Bad("udp-short", _udp, _UDP[:7], "udp_short"),
    Bad("udp-length-7", _udp, _UDP[:4] + b"\x00\x07" + b"\x00\x00" + _UDP[8:], "udp_bad_length"),
    Bad("udp-length-past-data", _udp, _UDP[:4] + b"\x00\x40" + _UDP[6:], "udp_bad_length"),
    Bad("udp-checksum", _udp, _UDP[:-1] + b"\x00", "udp_bad_checksum"),
    Bad("icmp-short", IcmpEcho.parse, _ICMP[:7], "icmp_short"),
    Bad("icmp-checksum", IcmpEcho.parse, _ICMP[:-1] + b"\x00", "icmp_bad_checksum"),
    Bad("icmp-unreachable", IcmpEcho.parse, _icmp_fixed(b"\x03" + _ICMP[1:]), "icmp_not_echo"),
    Bad("icmp-code", IcmpEcho.parse, _icmp_fixed(b"\x08\x01" + _ICMP[2:]), "icmp_bad_code"),
    Bad("dhcp-short", DhcpMessage.parse, _DHCP[:239], "dhcp_short"),
    Bad("dhcp-op", DhcpMessage.parse, b"\x03" + _DHCP[1:], "dhcp_bad_op"),
    Bad("dhcp-htype", DhcpMessage.parse, _DHCP[:1] + b"\x06" + _DHCP[2:],
        "dhcp_unsupported_hardware"),
    Bad("dhcp-hlen", DhcpMessage.parse, _DHCP[:2] + b"\x10" + _DHCP[3:],
        "dhcp_unsupported_hardware"),
    Bad("dhcp-magic", DhcpMessage.parse, _DHCP[:236] + b"\x63\x82\x53\x64" + _DHCP[240:],
        "dhcp_bad_magic"),
    Bad("dhcp-no-length-byte", DhcpMessage.parse, _DHCP[:240] + b"\x35", "dhcp_option_overrun"),
    Bad("dhcp-value-overrun", DhcpMessage.parse, _DHCP[:240] + b"\x35\x05\x01",
        "dhcp_option_overrun"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_malformed(case: Bad) -> None:
    with pytest.raises(MalformedFrame) as exc:
        case.parser(case.wire)
    assert exc.value.reason == case.reason
    assert isinstance(exc.value, RemoteProtocolError) and isinstance(exc.value, ValueError)


def test_builders_refuse_unencodable_fields() -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        EthernetFrame(dst=b"\x00", src=MAC, ethertype=1, payload=b"").build()
    with pytest.raises(ValueError, match="exceeds"):
        IPv4Packet(src=A, dst=B, proto=17, payload=bytes(65516)).build()
    with pytest.raises(ValueError, match="cannot carry"):
        DhcpMessage(op=1, xid=1, chaddr=MAC, options={255: b""}).build()


# -- fuzzing ---------------------------------------------------------------------------------

PARSERS: list[Callable[[bytes], Any]] = [
    EthernetFrame.parse, ArpPacket.parse, IPv4Packet.parse, _udp, IcmpEcho.parse,
    DhcpMessage.parse,
]  # fmt: skip
DISCOVER_FRAME = udhcpc_discover()[0]
CONFIG = LinkConfig(
    gateway_ip=B, gateway_mac=GW_MAC, network=IPv4Network("10.201.240.0/24"), guest_ip=A
)


def _frames() -> list[bytes]:
    """Valid frames of every kind the link services answer, to mutate."""
    request = DhcpMessage(
        op=1, xid=9, chaddr=MAC, flags=FLAG_BROADCAST,
        options={53: b"\x03", 50: A.packed, 54: B.packed},
    ).build()  # fmt: skip

    def ip_frame(dst: IPv4Address, proto: int, payload: bytes) -> bytes:
        packet = IPv4Packet(src=A, dst=dst, proto=proto, payload=payload).build()
        return EthernetFrame(dst=GW_MAC, src=MAC, ethertype=ETH_IPV4, payload=packet).build()

    dhcp = UdpDatagram(sport=68, dport=67, payload=request).build(A, B)
    arp = EthernetFrame(dst=BROADCAST, src=MAC, ethertype=ETH_ARP, payload=_ARP).build()
    return [DISCOVER_FRAME, arp, ip_frame(B, PROTO_ICMP, _ICMP), ip_frame(B, PROTO_UDP, dhcp)]


VALID_WIRES = [*_frames(), _ARP, _ICMP, _UDP, _DHCP, ip_header() + bytes(8)]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid wire with a few bytes overwritten, then maybe truncated or extended."""
    wire = bytearray(draw(st.sampled_from(VALID_WIRES)))
    for _ in range(draw(st.integers(0, 4))):
        wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(wire)))
    return bytes(wire[: draw(st.sampled_from([len(wire), cut]))]) + draw(st.binary(max_size=8))


def _parse_all(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(MalformedFrame):
            parse(data)


@given(st.binary(max_size=600))
@FUZZ
def test_fuzz_parsers_random_bytes(data: bytes) -> None:
    _parse_all(data)


@given(mutated())
@FUZZ
def test_fuzz_parsers_mutated(data: bytes) -> None:
    _parse_all(data)
    for offset in (14, 34, 42):  # also as the IPv4, UDP and DHCP layers of a frame
        _parse_all(data[offset:])


@given(st.one_of(mutated(), st.binary(max_size=400)))
@FUZZ
def test_fuzz_link_services_never_raise(frame: bytes) -> None:
    services = LinkServices(CONFIG)
    replies = services.handle(frame)
    for reply in replies:  # whatever it answers must itself parse
        EthernetFrame.parse(reply)
    # Every frame is accounted for exactly once: answered/seen, or dropped with a reason.
    assert services.dropped.total() + services.handled.total() == 1


# -- TCP -------------------------------------------------------------------------------------

from sandport.proto.packets import (  # noqa: E402
    ACK,
    CWR,
    ECE,
    FIN,
    PROTO_TCP,
    PSH,
    RST,
    SYN,
    URG,
    TcpSegment,
)


def tcp_wire(
    options: bytes = b"",
    *,
    flags: int = ACK,
    payload: bytes = b"",
    offset: int | None = None,
    check: int | None = None,
    src: IPv4Address = A,
    dst: IPv4Address = B,
) -> bytes:
    """A TCP segment 40000 -> 80 assembled with plain struct, checksummed by the RFC 1071 loop.

    ``options`` go in as given (the caller pads them); ``offset`` overrides the data offset
    nibble and ``check`` the checksum.
    """
    words = (20 + len(options)) // 4 if offset is None else offset
    hdr = struct.pack(
        "!HHIIBBHHH", 40000, 80, 0x12345678, 0x9ABCDEF0, words << 4, flags, 64240, 0, 0
    )
    seg = hdr + options + payload
    if check is None:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(seg))
        check = ref_checksum(pseudo + seg)
    return seg[:16] + struct.pack("!H", check) + seg[18:]


def _tcp(wire: bytes) -> TcpSegment:
    return TcpSegment.parse(wire, A, B)


def test_tcp_flag_values() -> None:
    # RFC 9293 section 3.1 / RFC 3168: the flag byte, low bit first.
    assert (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR) == (1, 2, 4, 8, 16, 32, 64, 128)


def test_tcp_syn_vector() -> None:
    # MSS 1460, NOP, window scale 7, SACK-permitted, two bytes of EOL padding: 12 bytes.
    opts = bytes([2, 4, 0x05, 0xB4, 1, 3, 3, 7, 4, 2, 0, 0])
    wire = tcp_wire(opts, flags=SYN)
    # Fixed vector, computed once with the reference loop: the helper above must not drift.
    assert wire[12] == 0x80 and wire[16:18] == b"\x00\xa1"
    syn = TcpSegment(
        sport=40000, dport=80, seq=0x12345678, ack=0x9ABCDEF0, flags=SYN, window=64240,
        mss=1460, wscale=7, sack_permitted=True,
    )  # fmt: skip
    assert syn.build(A, B) == wire
    assert _tcp(wire) == syn
    assert syn.has(SYN) and not syn.has(ACK) and not syn.has(SYN | ACK)
    assert syn.seq_space == 1


def test_tcp_linux_syn_options_and_unknown_options() -> None:
    # Linux's SYN: MSS, SACK-permitted, timestamps (kind 8, ignored), NOP, window scale.
    opts = bytes([2, 4, 0x05, 0xB4, 4, 2, 8, 10]) + bytes(range(8)) + bytes([1, 3, 3, 7])
    seg = _tcp(tcp_wire(opts, flags=SYN))
    assert (seg.mss, seg.wscale, seg.sack_permitted) == (1460, 7, True)
    # A SACK block (kind 5), an unknown kind and options after EOL are skipped.
    opts = bytes([5, 10]) + bytes(8) + bytes([254, 4, 0xFF, 0xFF]) + bytes([0, 2, 1, 0, 0, 0])
    seg = _tcp(tcp_wire(opts, payload=b"data"))
    assert (seg.mss, seg.wscale, seg.sack_permitted, seg.payload) == (None, None, False, b"data")
    # A shift above 14 is clamped (RFC 7323 section 2.3).
    assert _tcp(tcp_wire(bytes([3, 3, 20, 1]), flags=SYN)).wscale == 14


def test_tcp_round_trips() -> None:
    plain = TcpSegment(
        sport=80, dport=40000, seq=0xFFFFFFFF, ack=1, flags=ACK | PSH | FIN, window=0,
        payload=b"hello", urgent=3,
    )  # fmt: skip
    wire = plain.build(B, A)
    assert len(wire) == 25 and wire[12] == 0x50
    assert pseudo_header_checksum(B, A, PROTO_TCP, wire) == 0
    assert TcpSegment.parse(wire, B, A) == plain
    assert plain.has(ACK | FIN) and plain.seq_space == 5 + 1
    with pytest.raises(MalformedFrame) as exc:
        TcpSegment.parse(wire, B, ALL)  # the pseudo header binds the addresses
    assert exc.value.reason == "tcp_bad_checksum"
    for opts in (
        {"mss": 0}, {"wscale": 0}, {"sack_permitted": True}, {"mss": 65535, "wscale": 14},
        {"mss": 536, "sack_permitted": True}, {"wscale": 2, "sack_permitted": True},
    ):  # fmt: skip
        seg = TcpSegment(
            sport=1, dport=2, seq=3, ack=0, flags=SYN | ECE | CWR, window=1024,
            payload=b"x" * 7, **opts,  # type: ignore[arg-type]
        )  # fmt: skip
        wire = seg.build(A, B)
        assert (len(wire) - 7) % 4 == 0 and pseudo_header_checksum(A, B, PROTO_TCP, wire) == 0
        assert _tcp(wire) == seg, opts
        assert seg.seq_space == 8
    assert TcpSegment(sport=1, dport=2, seq=0, ack=0, flags=RST | URG, window=0).seq_space == 0


def test_tcp_builder_refuses_unencodable_fields() -> None:
    base: dict[str, Any] = {"sport": 1, "dport": 2, "seq": 0, "ack": 0, "flags": ACK, "window": 1}
    for field, value in (
        ("sport", -1), ("sport", 65536), ("dport", 65536), ("seq", 2**32), ("seq", -1),
        ("ack", 2**32), ("window", 65536), ("window", -1), ("flags", 256), ("urgent", 65536),
        ("mss", 65536), ("mss", -1), ("wscale", 15), ("wscale", -1),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="not in"):
            TcpSegment(**(base | {field: value})).build(A, B)
    with pytest.raises(ValueError, match="too large"):
        TcpSegment(**base, payload=bytes(65536 - 40)).build(A, B)
    assert len(TcpSegment(**base, payload=bytes(65535 - 40)).build(A, B)) == 65535 - 20


_TCP = tcp_wire(bytes([2, 4, 0x05, 0xB4]), flags=SYN)

TCP_BAD = [
    Bad("tcp-empty", _tcp, b"", "tcp_short"),
    Bad("tcp-19", _tcp, tcp_wire()[:19], "tcp_short"),
    Bad("tcp-offset-0", _tcp, tcp_wire(offset=0), "tcp_bad_offset"),
    Bad("tcp-offset-4", _tcp, tcp_wire(offset=4), "tcp_bad_offset"),
    Bad("tcp-offset-past-data", _tcp, tcp_wire(bytes(4), offset=15), "tcp_bad_offset"),
    Bad("tcp-checksum", _tcp, _TCP[:-1] + b"\x00", "tcp_bad_checksum"),
    Bad("tcp-checksum-field", _tcp, tcp_wire(check=0), "tcp_bad_checksum"),
    Bad("tcp-option-no-length", _tcp, tcp_wire(bytes([1, 1, 1, 2])), "tcp_bad_option"),
    Bad("tcp-option-length-0", _tcp, tcp_wire(bytes([254, 0, 0, 0])), "tcp_bad_option"),
    Bad("tcp-option-length-1", _tcp, tcp_wire(bytes([8, 1, 0, 0])), "tcp_bad_option"),
    Bad("tcp-option-past-header", _tcp, tcp_wire(bytes([8, 10, 0, 0]), payload=bytes(8)),
        "tcp_bad_option"),
    Bad("tcp-mss-length-3", _tcp, tcp_wire(bytes([2, 3, 5, 1]), flags=SYN), "tcp_bad_option"),
    Bad("tcp-mss-length-6", _tcp, tcp_wire(bytes([2, 6, 5, 0xB4, 0, 0]) + bytes(2)),
        "tcp_bad_option"),
    Bad("tcp-wscale-length-4", _tcp, tcp_wire(bytes([3, 4, 7, 0])), "tcp_bad_option"),
    Bad("tcp-wscale-length-2", _tcp, tcp_wire(bytes([3, 2, 1, 0])), "tcp_bad_option"),
    Bad("tcp-sackok-length-3", _tcp, tcp_wire(bytes([4, 3, 0, 0])), "tcp_bad_option"),
    Bad("tcp-syn-fin", _tcp, tcp_wire(flags=SYN | FIN), "tcp_bad_flags"),
    Bad("tcp-syn-rst", _tcp, tcp_wire(flags=SYN | RST | ACK), "tcp_bad_flags"),
]  # fmt: skip


@pytest.mark.parametrize("case", TCP_BAD, ids=[c.id for c in TCP_BAD])
def test_tcp_malformed(case: Bad) -> None:
    with pytest.raises(MalformedFrame) as exc:
        case.parser(case.wire)
    assert exc.value.reason == case.reason
    assert isinstance(exc.value, RemoteProtocolError) and isinstance(exc.value, ValueError)


TCP_WIRES = [
    _TCP,
    tcp_wire(payload=b"GET / HTTP/1.1\r\n"),
    tcp_wire(bytes([2, 4, 0x05, 0xB4, 4, 2, 8, 10]) + bytes(8) + bytes([1, 3, 3, 7]), flags=SYN),
    tcp_wire(bytes([5, 10]) + bytes(8) + bytes([1, 1]), payload=b"x" * 30),
    TcpSegment(sport=1, dport=2, seq=3, ack=4, flags=ACK, window=5, wscale=3, sack_permitted=True)
    .build(A, B),
]  # fmt: skip


def _tcp_refix(wire: bytes) -> bytes:
    """Recompute the TCP checksum (A -> B) of a possibly mutated segment of at least 18 bytes."""
    zeroed = wire[:16] + b"\x00\x00" + wire[18:]
    pseudo = A.packed + B.packed + struct.pack("!BBH", 0, 6, len(zeroed))
    return zeroed[:16] + struct.pack("!H", ref_checksum(pseudo + zeroed)) + zeroed[18:]


@st.composite
def tcp_mutated(draw: st.DrawFn, refix: bool) -> bytes:
    """A valid segment with a few bytes overwritten, maybe truncated or extended, and with
    the checksum recomputed when ``refix`` so the option and flag checks get exercised."""
    wire = bytearray(draw(st.sampled_from(TCP_WIRES)))
    for _ in range(draw(st.integers(0, 4))):
        wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(wire)))
    data = bytes(wire[: draw(st.sampled_from([len(wire), cut]))]) + draw(st.binary(max_size=8))
    return _tcp_refix(data) if refix and len(data) >= 18 else data


def _tcp_parse_round_trip(data: bytes) -> None:
    """Parse raises only `MalformedFrame`; whatever parses builds and parses back equal."""
    try:
        seg = _tcp(data)
    except MalformedFrame:
        return
    assert _tcp(seg.build(A, B)) == seg


@given(st.binary(max_size=200))
@FUZZ
def test_fuzz_tcp_random_bytes(data: bytes) -> None:
    _tcp_parse_round_trip(data)
    if len(data) >= 18:
        _tcp_parse_round_trip(_tcp_refix(data))


@given(st.one_of(tcp_mutated(refix=False), tcp_mutated(refix=True)))
@FUZZ
def test_fuzz_tcp_mutated(data: bytes) -> None:
    _tcp_parse_round_trip(data)


# -- the virtio-net header of a TAP with offloads ---------------------------------------------

from sandport.proto.packets.vnet import (  # noqa: E402 - this part's own imports
    GSO_TCPV4,
    NEEDS_CSUM,
    PLAIN,
    VnetHeader,
)


def test_vnet_header_layout_is_virtio_legacy_little_endian() -> None:
    # struct virtio_net_hdr (virtio 1.x section 5.1.6): u8 flags, u8 gso_type, then
    # le16 hdr_len, gso_size, csum_start, csum_offset.
    header = VnetHeader(NEEDS_CSUM, GSO_TCPV4, 54, 1460, 34, 16)
    wire = struct.pack("<BBHHHH", 1, 1, 54, 1460, 34, 16)
    assert header.build() == wire and bytes(10) == PLAIN
    assert VnetHeader.parse(wire + bytes(60)) == header
    assert VnetHeader.parse(PLAIN) == VnetHeader()
    with pytest.raises(ValueError, match="out of range"):
        VnetHeader(gso_size=1 << 16).build()


VNET_BAD = [
    Bad("vnet-short", VnetHeader.parse, bytes(9), "vnet_short"),
    Bad("vnet-csum-past-frame", VnetHeader.parse,
        struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 16) + bytes(51), "vnet_bad_csum"),
]  # fmt: skip


@pytest.mark.parametrize("case", VNET_BAD, ids=[c.id for c in VNET_BAD])
def test_vnet_malformed(case: Bad) -> None:
    with pytest.raises(MalformedFrame) as exc:
        case.parser(case.wire)
    assert exc.value.reason == case.reason


@given(st.binary(max_size=80))
@FUZZ
def test_fuzz_vnet_header(data: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        header = VnetHeader.parse(data)
        assert header.build() == data[:10]
