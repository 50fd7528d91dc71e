"""Unit tests for usernet's TCP fast paths (sandport.usernet.tcp): the send buffer, the
segments packed straight into frames (plain and with virtio-net offload headers), and the
fast parse of an established connection's segments, which must take exactly what the
general parsers would take and leave the rest to them.

Frames are checked with the strict parsers of `sandport.proto.packets` and with frames
built by those parsers' builders, not by the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandport.proto.packets import (
    ACK,
    ETH_IPV4,
    FIN,
    PROTO_TCP,
    PSH,
    RST,
    SYN,
    EthernetFrame,
    IPv4Packet,
    MalformedFrame,
    TcpSegment,
    checksum,
)
from sandport.proto.packets.vnet import (
    GSO_NONE,
    GSO_TCPV4,
    NEEDS_CSUM,
    PLAIN,
    VnetHeader,
)
from sandport.usernet import tcp
from sandport.usernet.link import LinkConfig
from sandport.usernet.stack import Usernet
from sandport.usernet.tcp import ChunkPool, SendBuffer, State, TcpFlow

pytestmark = pytest.mark.unit

GW_MAC = bytes.fromhex("02000a0000fe")
GUEST_MAC = bytes.fromhex("525400123456")
GW = IPv4Address("10.201.241.1")
GUEST = IPv4Address("10.201.241.2")
CONFIG = LinkConfig(gateway_ip=GW, gateway_mac=GW_MAC, network=IPv4Network("10.201.241.0/24"),
                    guest_ip=GUEST, mtu=1500)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True)


# -- the send buffer ---------------------------------------------------------------------


@pytest.mark.parametrize("min_read", [16 << 10, 100], ids=["seal-each-read", "fill-chunks"])
def test_send_buffer_holds_what_a_plain_bytearray_holds(monkeypatch: pytest.MonkeyPatch,
                                                        min_read: int) -> None:
    """Reads into pooled chunks, copies in, acknowledgments and reads anywhere: always
    the same bytes as a bytearray given the same operations."""
    monkeypatch.setattr(tcp, "MIN_READ", min_read)
    for seed in range(20):
        rng = random.Random(seed)
        pool = ChunkPool(size=1000, keep=4)
        ref, buf = bytearray(), SendBuffer(pool)
        for _ in range(2000):
            op = rng.random()
            if op < 0.35:  # a host read into the buffer's own memory
                room = buf.writable(rng.randint(1, 700))
                data = rng.randbytes(rng.randint(0, len(room)))
                room[:len(data)] = data
                buf.commit(len(data))
                ref += data
            elif op < 0.45:
                data = rng.randbytes(rng.randint(0, 3000))
                buf.append(data)
                ref += data
            elif op < 0.7:  # the guest acknowledges
                count = rng.randint(0, len(ref))
                buf.drop(count)
                del ref[:count]
            elif ref:
                start = rng.randint(0, len(ref) - 1)
                size = rng.randint(1, len(ref) - start)
                assert b"".join(buf.read(start, size)) == ref[start:start + size]
            assert len(buf) == len(ref)
        assert len(pool._free) <= 4


def test_acknowledged_chunks_are_reused_not_reallocated() -> None:
    pool = ChunkPool(size=4096, keep=8)
    buf = SendBuffer(pool)
    seen: set[int] = set()
    for _ in range(50):
        room = buf.writable(4096)
        seen.add(id(room.obj))
        room[:] = os.urandom(len(room))
        buf.commit(len(room))
        buf.drop(len(buf))
    assert len(seen) <= 2


# -- segments to the guest ---------------------------------------------------------------


def make_nat(vnet: bool = False) -> tuple[Usernet, list[bytes]]:
    sent: list[bytes] = []
    net = Usernet(CONFIG, sent.extend, vnet=vnet)
    net.link.guest_mac = GUEST_MAC
    return net, sent


def established(net: Usernet, guest_port: int = 40000, peer_port: int = 80) -> TcpFlow:
    flow = TcpFlow(net.tcp, (guest_port, GW, peer_port), State.ESTABLISHED)
    flow.snd_una = flow.snd_nxt = 1000
    flow.rcv_nxt = 5000
    flow.guest_mss, flow.guest_wnd = 1460, 1 << 20
    net.tcp.add(flow)
    return flow


def parse_frame(frame: bytes) -> TcpSegment:
    eth = EthernetFrame.parse(frame)
    assert (eth.dst, eth.src, eth.ethertype) == (GUEST_MAC, GW_MAC, ETH_IPV4)
    ip = IPv4Packet.parse(eth.payload)  # verifies the header checksum
    assert (ip.src, ip.dst, ip.proto, ip.dont_fragment) == (GW, GUEST, PROTO_TCP, True)
    return TcpSegment.parse(ip.payload, ip.src, ip.dst)  # verifies the TCP checksum


@pytest.mark.parametrize("size", [0, 1, 1459, 1460, 4097], ids=lambda n: f"{n}B")
def test_plain_segments_pass_the_strict_parsers(size: int) -> None:
    net, _ = make_nat()
    flow = established(net)
    payload = os.urandom(size)
    parts: list[bytes | memoryview] = [payload[:size // 3], memoryview(payload)[size // 3:]]
    frame = net.tcp.frame(GW.packed, flow.addr_sum, 80, 40000, 1234, 5678, ACK | PSH, 999,
                          parts)
    assert frame is not None
    seg = parse_frame(frame)
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.window) == (
        80, 40000, 1234, 5678, ACK | PSH, 999)
    assert seg.payload == payload


def test_a_syn_ack_carries_mss_and_window_scale() -> None:
    net, sent = make_nat()
    flow = established(net)
    flow.state = State.SYN_ACKED
    flow._emit(flow.isn, SYN | ACK, syn_options=True)
    net.tcp.flush()
    [frame] = sent
    seg = parse_frame(frame)
    assert seg.flags == SYN | ACK and seg.seq == flow.isn
    assert (seg.mss, seg.wscale) == (CONFIG.mtu - 40, tcp.OUR_WSCALE)


def complete_checksum(frame: bytes, header: VnetHeader) -> bytes:
    """What a kernel does with NEEDS_CSUM: sum from csum_start on, the field as the seed."""
    at = header.csum_start + header.csum_offset
    covered = frame[header.csum_start:]
    value = checksum(covered)
    return frame[:at] + struct.pack("!H", value) + frame[at + 2:]


@pytest.mark.parametrize(("size", "gso"), [(100, GSO_NONE), (1460, GSO_NONE),
                                           (60000, GSO_TCPV4)], ids=["small", "mss", "super"])
def test_offloaded_segments_carry_a_virtio_header_the_kernel_can_complete(
        size: int, gso: int) -> None:
    net, _ = make_nat(vnet=True)
    flow = established(net)
    payload = os.urandom(size)
    frame = net.tcp.frame(GW.packed, flow.addr_sum, 80, 40000, 1, 2, ACK, 3, [payload],
                          gso=flow.guest_mss)
    assert frame is not None
    header = VnetHeader.parse(frame)
    assert header.flags == NEEDS_CSUM and header.gso_type == gso
    assert (header.csum_start, header.csum_offset, header.hdr_len) == (34, 16, 54)
    assert header.gso_size == (1460 if gso else 0)
    inner = frame[len(PLAIN):]
    with pytest.raises(MalformedFrame, match="tcp_bad_checksum"):
        parse_frame(inner)  # a partial checksum: only the pseudo-header sum is in
    assert parse_frame(complete_checksum(inner, header)).payload == payload


def test_link_replies_on_an_offload_tap_carry_a_plain_header() -> None:
    net, _ = make_nat(vnet=True)
    from sandport.proto.packets import ETH_ARP, ArpPacket
    request = ArpPacket(op=1, sha=GUEST_MAC, spa=GUEST, tha=bytes(6), tpa=GW).build()
    frame = PLAIN + EthernetFrame(dst=b"\xff" * 6, src=GUEST_MAC, ethertype=ETH_ARP,
                                  payload=request).build()
    [reply] = net.handle([frame])
    assert reply.startswith(PLAIN)
    assert ArpPacket.parse(EthernetFrame.parse(reply[len(PLAIN):]).payload).spa == GW


# -- segments from the guest: the fast path ----------------------------------------------


def guest_frame(seg: TcpSegment, *, src: IPv4Address = GUEST, dst: IPv4Address = GW,
                mac: bytes = GW_MAC, mangle: Callable[[bytearray], None] | None = None
                ) -> bytes:
    """A frame from the guest, built by the strict builders; ``mangle`` edits it after."""
    ip = IPv4Packet(src=src, dst=dst, proto=PROTO_TCP, payload=seg.build(src, dst)).build()
    frame = bytearray(EthernetFrame(dst=mac, src=GUEST_MAC, ethertype=ETH_IPV4,
                                    payload=ip).build())
    if mangle is not None:
        mangle(frame)
    return bytes(frame)


def ack_seg(**kw: Any) -> TcpSegment:
    fields: dict[str, Any] = {"sport": 40000, "dport": 80, "seq": 5000, "ack": 1100,
                              "flags": ACK, "window": 512}
    return TcpSegment(**fields | kw)


def flip(offset: int) -> Callable[[bytearray], None]:
    def mangle(frame: bytearray) -> None:
        frame[offset] ^= 0x01
    return mangle


def set_ip_flags(value: int) -> Callable[[bytearray], None]:
    def mangle(frame: bytearray) -> None:
        frame[20:22] = value.to_bytes(2, "big")
        frame[24:26] = b"\0\0"
        frame[24:26] = checksum(bytes(frame[14:34])).to_bytes(2, "big")
    return mangle


def run(fn: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return fn()
    return asyncio.run(main())


def test_the_fast_path_takes_an_established_connections_ack() -> None:
    def check() -> None:
        net, _ = make_nat()
        flow = established(net)
        flow.out.append(os.urandom(300))
        flow.snd_nxt = 1300  # 300 bytes in flight
        assert net.tcp.fast(guest_frame(ack_seg()), offloaded=False)
        assert flow.snd_una == 1100 and len(flow.out) == 200
        assert flow.guest_wnd == 512  # no window scale was agreed
        flow._cancel_timer()
    run(check)


def set_byte(offset: int, value: int) -> Callable[[bytearray], None]:
    def mangle(frame: bytearray) -> None:
        frame[offset] = value
    return mangle


FAST_CASES = [
    ("valid", guest_frame(ack_seg()), False, True),
    ("bad IPv4 checksum", guest_frame(ack_seg(), mangle=flip(24)), False, False),
    ("bad TCP checksum", guest_frame(ack_seg(), mangle=flip(51)), False, False),
    ("bad TCP checksum, offloaded", guest_frame(ack_seg(), mangle=flip(51)), True, True),
    ("SYN", guest_frame(ack_seg(flags=SYN | ACK)), False, False),
    ("RST", guest_frame(ack_seg(flags=RST | ACK)), False, False),
    ("other MAC", guest_frame(ack_seg(), mac=bytes.fromhex("020000000001")), False, False),
    ("spoofed source", guest_frame(ack_seg(), src=IPv4Address("10.201.241.9")), False, False),
    ("fragment", guest_frame(ack_seg(), mangle=set_ip_flags(0x2000)), False, False),
    ("truncated", guest_frame(ack_seg())[:-1], False, False),
    ("unknown connection", guest_frame(ack_seg(dport=81)), False, False),
    ("data offset past the packet", guest_frame(ack_seg(), mangle=set_byte(46, 0xF0)), True,
     False),
]


@pytest.mark.parametrize(("why", "frame", "offloaded", "taken"),
                         [pytest.param(*case, id=case[0]) for case in FAST_CASES])
def test_the_fast_path_takes_only_what_the_general_path_would(
        why: str, frame: bytes, offloaded: bool, taken: bool) -> None:
    def check() -> None:
        net, _ = make_nat()
        established(net)
        assert net.tcp.fast(frame, offloaded) is taken, why
        if not taken:  # the general path sees it and decides (and counts) as before
            net.handle([frame])
    run(check)


def test_data_from_the_guest_goes_to_the_host_in_one_write_and_one_ack() -> None:
    """Five segments in one batch: the host socket gets the 500 bytes, the guest one ACK."""
    async def main() -> tuple[bytes, list[TcpSegment]]:
        net, sent = make_nat()
        flow = established(net)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            await asyncio.get_running_loop().create_connection(
                lambda: tcp._HostSide(flow), sock=ours)
            payload = os.urandom(500)
            net.handle([guest_frame(ack_seg(seq=5000 + 100 * i, flags=ACK | PSH, ack=1000,
                                            payload=payload[100 * i:100 * i + 100]))
                        for i in range(5)])
            theirs.settimeout(5)
            got = b""
            while len(got) < 500:
                got += await asyncio.to_thread(theirs.recv, 1000)
            assert got == payload and flow.rcv_nxt == 5500
            flow.abort(rst_guest=False)
        return got, [parse_frame(f) for f in sent]
    _, acks = asyncio.run(main())
    assert [(a.flags, a.ack) for a in acks] == [(ACK, 5500)]


def test_the_last_fin_is_acknowledged_though_the_connection_is_gone() -> None:
    """Our FIN was sent and acknowledged; the guest's FIN ends the connection, and its ACK
    still goes out (it is not left for the end of the batch, when the flow is gone)."""
    def check() -> list[TcpSegment]:
        net, sent = make_nat()
        flow = established(net)
        flow.fin_sent, flow.snd_nxt, flow.snd_una = True, 1001, 1001
        assert net.tcp.fast(guest_frame(ack_seg(flags=ACK | FIN, ack=1001)), offloaded=False)
        assert flow.state is State.CLOSED and not net.tcp.flows
        net.tcp.flush()
        return [parse_frame(f) for f in sent]
    [ack] = run(check)
    assert (ack.flags, ack.ack) == (ACK, 5001)


# -- nothing a guest sends breaks the stack ----------------------------------------------


def mutated_tcp_frames() -> st.SearchStrategy[bytes]:
    base = guest_frame(ack_seg(payload=b"hello", flags=ACK | PSH))

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        frame = bytearray(base)
        for _ in range(draw(st.integers(1, 6))):
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(frame)))
        return bytes(frame[:cut])

    return build()


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "offload"])
@given(frames=st.lists(st.one_of(mutated_tcp_frames(), st.binary(max_size=120)), max_size=8),
       header=st.binary(min_size=0, max_size=12))
@FUZZ
def test_usernet_handle_survives_any_batch(vnet: bool, frames: list[bytes],
                                           header: bytes) -> None:
    def check() -> None:
        net, _ = make_nat(vnet=vnet)
        flow = established(net)
        batch = [header[:10] + f if vnet else f for f in frames]
        net.handle(batch)
        flow._cancel_timer()
        net.close()
    run(check)


def test_a_stack_on_a_transport_takes_its_mtu_unless_told() -> None:
    from sandport.usernet.stream import StreamTransport

    unset = LinkConfig(gateway_ip=GW, gateway_mac=GW_MAC, network=CONFIG.network,
                       guest_ip=GUEST)
    stream = StreamTransport()
    net = Usernet.on(stream, unset)
    assert net.link.config.mtu == 1500 and net.tcp.mss == 1460 and not net.vnet
    assert stream.handler == net.handle
    told = Usernet.on(StreamTransport(), dataclasses.replace(unset, mtu=9000))
    assert told.link.config.mtu == 9000 and told.tcp.mss == 8960
    assert unset.link_mtu == 1500  # a link without a transport: Ethernet's
    lonely = StreamTransport()
    lonely.deliver([b"frame"])  # no stack yet: counted, dropped
    assert lonely.errors["no_handler"] == 1
