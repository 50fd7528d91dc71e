"""TCP through usernet, passt-style: each guest connection is spliced onto a host socket.

No TCP stack of our own: the host kernel does congestion control and retransmission on
the host side. Toward the guest the stack keeps only what splicing needs: the sequence
numbers, the bytes the guest has not acknowledged yet (sent again from the last ACK on
three duplicate ACKs or a timeout), the guest's window and MSS, and FIN and RST both ways.

- **Inbound** (a forward): the host listener accepts, the stack sends the guest a SYN from
  the client's address (loopback clients appear as the gateway address), and once the
  guest answers, bytes flow both ways; the host side reads only while the guest has room.
- **Outbound**: a guest SYN to an allowed target (the gateway address means this host's
  loopback) becomes a non-blocking host connect; the guest gets its SYN-ACK only when the
  host connection is up, or an RST with the reason counted.

Speed: segments of established connections skip the general parsers (`TcpNat.fast`: one
``struct`` unpack of the three headers, the same checks); segments to the guest are packed
straight into a frame with precomputed address sums; within one batch from the guest the
bytes for each host socket go out in one write and each connection sends one ACK; frames
to the guest leave once per event-loop turn. On a TAP with offloads (``vnet=True``) the
checksums are left to the kernel and the host's bytes go to the guest in segments of up
to 64 KiB, which the guest's kernel takes like a packet after GRO.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import secrets
import struct
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import cast

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ethernet import ETH_IPV4, EthernetFrame
from sandport.proto.packets.ipv4 import PROTO_TCP, IPv4Packet, fold_checksum, ones_sum
from sandport.proto.packets.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment
from sandport.proto.packets.vnet import GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HEADER
from sandport.usernet.link import LinkServices

log = logging.getLogger(__name__)

Send = Callable[[list[bytes]], None]
Payload = list[bytes | memoryview] | tuple[()]  # a segment's data, in parts
Allowed = Callable[[IPv4Address, int], tuple[str, int] | None]
GuestKey = tuple[int, IPv4Address, int]  # guest port, peer address, peer port (guest's view)

OUR_WSCALE = 7
RCV_BUFFER = 4 << 20  # what we let the guest send before the host socket drains
OUT_LIMIT = 4 << 20  # host bytes buffered for the guest before the host side pauses
RTO = 0.3  # retransmission timeout toward the guest (a local link: no RTT estimation)
SYN_RETRIES = 5
#: Segments in flight to the guest at most, whatever its window: a TAP queues at most
#: ~1000 frames the guest sends (its ACKs among them) and drops the rest; a longer burst
#: loses the ACKs that would clock the next one, and the connection waits for a timeout.
INFLIGHT_SEGMENTS = 128
MAX_FLOWS = 4096
M32 = 0xFFFFFFFF
#: Ethernet, a 20-byte IPv4 header and a 20-byte TCP header: what `TcpNat.fast` reads and
#: `TcpNat.frame` writes in one go (options, when any, follow).
HEADERS = struct.Struct("!6s6sH BBHHHBBH4s4s HHIIBBHHH")
ETH_LEN, IP_LEN, TCP_LEN = 14, 20, 20
#: The largest payload one IPv4 packet carries behind 20-byte IPv4 and TCP headers; also
#: the most one host read takes, so a read goes to the guest as one segment.
MAX_SUPER_SEGMENT = 0xFFFF - IP_LEN - TCP_LEN
CHUNK_SIZE = 256 << 10  # host reads land in chunks this big (`ChunkPool`)
MIN_READ = 16 << 10  # a chunk with less room left takes no more reads
_DF = 0x4000
_TTL = 64
#: The constant words of our IPv4 header: version/IHL/TOS, DF, TTL/protocol.
_IP_CONST = 0x4500 + _DF + (_TTL << 8 | PROTO_TCP)


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in sequence space (negative when ``a`` is before ``b``)."""
    d = (a - b) & M32
    return d - (1 << 32) if d >= 1 << 31 else d


class ChunkPool:
    """Fixed-size ``bytearray`` chunks that host reads land in, reused once the guest
    acknowledged their bytes: a busy connection neither allocates nor faults in fresh
    pages per read, and nothing is copied between the host socket and the frame."""

    def __init__(self, size: int = CHUNK_SIZE, keep: int = 32) -> None:
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []

    def get(self) -> bytearray:
        """A chunk to fill."""
        return self._free.pop() if self._free else bytearray(self.size)

    def put(self, chunk: bytearray) -> None:
        """A chunk nobody reads any more."""
        if len(self._free) < self.keep:
            self._free.append(chunk)


class SendBuffer:
    """Bytes for the guest from its last ACK on: host reads land in chunks of a
    `ChunkPool` (:meth:`writable`, :meth:`commit`), segments are read out as views
    (:meth:`read`), acknowledged bytes are dropped (:meth:`drop`) and their chunks reused.
    Neither appending nor dropping moves what is buffered."""

    def __init__(self, pool: ChunkPool) -> None:
        self._pool = pool
        #: filled regions, oldest first: (chunk, start, end); a chunk's regions are adjacent
        self._regions: collections.deque[tuple[bytearray, int, int]] = collections.deque()
        self._fill: bytearray | None = None  # the chunk reads go to
        self._fill_at = 0
        self._size = 0
        self._base = 0  # stream offset of the first region's first byte
        self._cursor = (0, 0)  # a region index and its stream offset: where read() starts

    def __len__(self) -> int:
        return self._size

    def writable(self, limit: int) -> memoryview:
        """Room for the next host read (at most ``limit`` bytes)."""
        if self._fill is None or self._pool.size - self._fill_at < MIN_READ:
            self._seal()
            self._fill, self._fill_at = self._pool.get(), 0
        return memoryview(self._fill)[self._fill_at:self._fill_at + limit]

    def commit(self, count: int) -> None:
        """The host read put ``count`` bytes into the last :meth:`writable` view."""
        if count <= 0 or self._fill is None:
            return
        start = self._fill_at
        self._fill_at += count
        last = self._regions[-1] if self._regions else None
        if last is not None and last[0] is self._fill and last[2] == start:
            self._regions[-1] = (self._fill, last[1], self._fill_at)  # one region per chunk
        else:
            self._regions.append((self._fill, start, self._fill_at))
        self._size += count

    def append(self, data: bytes) -> None:
        """Bytes that did not come through :meth:`writable` (copied in)."""
        view = memoryview(data)
        while view:
            room = self.writable(len(view))
            room[:len(room)] = view[:len(room)]
            self.commit(len(room))
            view = view[len(room):]

    def _seal(self) -> None:
        """Reads go to a new chunk; the old one is reused once nothing of it is left."""
        if self._fill is not None and not (self._regions and self._regions[-1][0] is self._fill):
            self._pool.put(self._fill)
        self._fill = None

    def drop(self, count: int) -> None:
        """The guest acknowledged the first ``count`` bytes."""
        count = min(count, self._size)
        self._size -= count
        regions = self._regions
        while count:
            chunk, start, end = regions[0]
            if count < end - start:
                regions[0] = (chunk, start + count, end)
                self._base += count
                if self._cursor[0] == 0:
                    self._cursor = (0, self._base)
                return
            count -= end - start
            self._base += end - start
            regions.popleft()
            index, offset = self._cursor
            self._cursor = (index - 1, offset) if index else (0, self._base)
            if chunk is not self._fill:
                self._pool.put(chunk)
            elif not regions:  # all read out and acknowledged: fill from the start again
                self._fill_at = 0

    def read(self, start: int, size: int) -> list[bytes | memoryview]:
        """``size`` bytes from ``start`` (counted from the last ACK), as views."""
        parts: list[bytes | memoryview] = []
        position = self._base + start
        index, offset = self._cursor
        if offset > position or index >= len(self._regions):
            index, offset = 0, self._base
        regions = self._regions
        while size > 0 and index < len(regions):
            chunk, first, end = regions[index]
            length = end - first
            if position >= offset + length:
                index, offset = index + 1, offset + length
                continue
            skip = position - offset
            take = min(size, length - skip)
            parts.append(memoryview(chunk)[first + skip:first + skip + take])
            size -= take
            position += take
            self._cursor = (index, offset)
        return parts


class State(enum.Enum):
    """Where a spliced connection is."""

    SYN_SENT = "syn-sent"  # inbound: our SYN to the guest is out
    CONNECTING = "connecting"  # outbound: the host connect is in progress
    SYN_ACKED = "syn-acked"  # outbound: our SYN-ACK to the guest is out
    ESTABLISHED = "established"
    CLOSED = "closed"



class _HostSide(asyncio.BufferedProtocol):
    """The host socket of one flow."""

    def __init__(self, flow: TcpFlow) -> None:
        self.flow = flow
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow.host_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.flow.out.writable(MAX_SUPER_SEGMENT)

    def buffer_updated(self, nbytes: int) -> None:
        self.flow.out.commit(nbytes)
        self.flow.from_host(nbytes)

    def eof_received(self) -> bool:
        self.flow.host_eof()
        return True  # keep our write side open: the guest may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.host_lost(exc)

    def pause_writing(self) -> None:
        self.flow.host_write_paused = True

    def resume_writing(self) -> None:
        self.flow.host_write_paused = False
        self.flow.ack()  # a window update: the guest may send again


class TcpFlow:
    """One guest TCP connection spliced onto one host socket."""

    def __init__(self, nat: TcpNat, key: GuestKey, state: State) -> None:
        self.nat, self.key, self.state = nat, key, state
        self.host: _HostSide | None = None
        self.isn = secrets.randbits(32)
        self.snd_una = self.snd_nxt = self.isn  # our sequence toward the guest
        self.out = SendBuffer(nat.pool)  # host bytes from snd_una on: unacknowledged, then unsent
        self.rcv_nxt = 0  # the guest's next sequence number
        self.guest_wnd = 65535
        self.guest_wscale = 0
        self.guest_mss = 536
        self.host_eof_seen = False
        self.fin_sent = False
        self.guest_fin = False
        self.host_write_paused = False
        self.dup_acks = 0
        self.syn_tries = 0
        self._timer: asyncio.TimerHandle | None = None
        self.to_host: list[bytes] = []  # guest bytes of this batch, written at its end
        self.ack_due = False
        peer = key[1].packed
        self.wire = (key[0], peer, key[2])  # the key as the guest's frames carry it
        #: ones' sum of both addresses: the part of every checksum that never changes
        self.addr_sum = ones_sum(peer) + ones_sum(nat.link.config.guest_ip.packed)

    # -- segments to the guest ----------------------------------------------------------

    def _emit(self, seq: int, flags: int, payload: Payload = (), *,
              syn_options: bool = False) -> None:
        window = self._window() >> OUR_WSCALE if not flags & SYN else self._window()
        options = struct.pack("!BBHBBBB", 2, 4, self.nat.mss, 1, 3, 3, OUR_WSCALE) \
            if syn_options else b""
        self.nat.emit(self, seq & M32, self.rcv_nxt & M32 if flags & ACK else 0, flags,
                      min(window, 65535), payload, options)

    def _window(self) -> int:
        buffered = self.host.transport.get_write_buffer_size() \
            if self.host is not None and self.host.transport is not None else 0
        return max(0, RCV_BUFFER - buffered)

    def ack(self) -> None:
        """A bare ACK (with our current window)."""
        self.ack_due = False
        if self.state is State.ESTABLISHED:
            self._emit(self.snd_nxt, ACK)

    def flush(self) -> None:
        """The end of a batch: this batch's guest bytes to the host, then one ACK."""
        if self.to_host:
            parts, self.to_host = self.to_host, []
            host = self.host.transport if self.host is not None else None
            if host is not None and not host.is_closing():
                host.write(parts[0] if len(parts) == 1 else b"".join(parts))
        if self.ack_due:
            self.ack()

    def send_syn(self) -> None:
        """Inbound: our SYN to the guest (again on a timeout)."""
        self.syn_tries += 1
        if self.syn_tries > SYN_RETRIES:
            self.nat.counters["syn_no_answer"] += 1
            self.abort(rst_guest=False)
            return
        self._emit(self.isn, SYN, syn_options=True)
        self._arm(self.send_syn, RTO * self.syn_tries)

    def push(self) -> None:
        """Send what the guest's window allows; a FIN once the host is done."""
        if self.state is not State.ESTABLISHED:
            return
        largest = self.nat.max_segment(self)
        window = min(self.guest_wnd, INFLIGHT_SEGMENTS * largest)
        while not self.fin_sent:  # after our FIN there is nothing new to send
            inflight = seq_diff(self.snd_nxt, self.snd_una)
            unsent = len(self.out) - inflight
            room = window - inflight
            if unsent <= 0 or room <= 0:
                break
            size = min(unsent, room, largest)
            self._emit(self.snd_nxt, ACK | PSH, self.out.read(inflight, size))
            self.snd_nxt = (self.snd_nxt + size) & M32
        if self.host_eof_seen and not self.fin_sent and \
                seq_diff(self.snd_nxt, self.snd_una) == len(self.out):
            self._emit(self.snd_nxt, ACK | FIN)
            self.snd_nxt = (self.snd_nxt + 1) & M32
            self.fin_sent = True
        if seq_diff(self.snd_nxt, self.snd_una) > 0:
            self._arm(self._timeout, RTO)
        elif self.host is not None and self.host.transport is not None and \
                len(self.out) < OUT_LIMIT // 2:
            self.host.transport.resume_reading()

    def _timeout(self) -> None:
        self.nat.counters["timeouts"] += 1
        self._retransmit()

    def _retransmit(self) -> None:
        """Go back to the last ACK and send again (the guest lost or dropped something)."""
        self.nat.counters["retransmits"] += 1
        self.snd_nxt = self.snd_una
        self.fin_sent = False
        self.push()

    def _arm(self, callback: Callable[[], None], delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    # -- segments from the guest --------------------------------------------------------

    def from_guest(self, seg: TcpSegment) -> None:
        """One segment of this connection from the guest."""
        if seg.has(RST):
            self.nat.counters["rst_from_guest"] += 1
            self.abort(rst_guest=False)
            return
        if self.state is State.SYN_SENT:
            if seg.has(SYN) and seg.has(ACK) and seg.ack == (self.isn + 1) & M32:
                self._learn(seg)
                self.rcv_nxt = (seg.seq + 1) & M32
                self.snd_una = self.snd_nxt = (self.isn + 1) & M32
                self.state = State.ESTABLISHED
                self._cancel_timer()
                self.ack()
                if self.host is not None and self.host.transport is not None:
                    self.host.transport.resume_reading()
                self.push()
            return
        if self.state is State.SYN_ACKED:
            if seg.has(SYN):  # our SYN-ACK was lost: send it again
                self._emit(self.isn, SYN | ACK, syn_options=True)
                return
            if not seg.has(ACK) or seg.ack != (self.isn + 1) & M32:
                return
            self.snd_una = self.snd_nxt = (self.isn + 1) & M32
            self.state = State.ESTABLISHED
            self._cancel_timer()
            self.guest_wnd = seg.window << self.guest_wscale
        if self.state is not State.ESTABLISHED:
            return
        if seg.has(ACK):
            self._acked(seg)
        if seg.payload or seg.has(FIN):
            self._data(seg)

    def _learn(self, seg: TcpSegment) -> None:
        self.guest_wscale = min(seg.wscale, 14) if seg.wscale is not None else 0
        self.guest_mss = seg.mss or 536
        self.guest_wnd = seg.window  # a SYN's window is never scaled

    def _acked(self, seg: TcpSegment) -> None:
        self.guest_wnd = seg.window << self.guest_wscale
        advance = seq_diff(seg.ack, self.snd_una)
        if advance > 0 and seq_diff(seg.ack, self.snd_nxt) <= 0:
            data_acked = min(advance, len(self.out))
            self.out.drop(data_acked)
            self.snd_una = seg.ack
            self.dup_acks = 0
            if self.fin_sent and self.snd_una == self.snd_nxt:
                self.nat.counters["fin_acked"] += 1
                if self.guest_fin:
                    self.finish()
                    return
            if self.snd_una == self.snd_nxt:
                self._cancel_timer()
            self.push()
        elif advance == 0 and not seg.payload and seq_diff(self.snd_nxt, self.snd_una) > 0:
            self.dup_acks += 1
            if self.dup_acks == 3:
                self._retransmit()
        else:
            self.push()  # a window update

    def _data(self, seg: TcpSegment) -> None:
        offset = seq_diff(self.rcv_nxt, seg.seq)  # how much of it we already have
        if offset < 0:
            self.nat.counters["out_of_order"] += 1
            self.ack()  # a duplicate ACK: the guest sends from rcv_nxt again
            return
        payload = seg.payload[offset:] if offset else seg.payload
        host = self.host.transport if self.host is not None else None
        if payload and host is not None and not host.is_closing():
            self.to_host.append(payload)
            self.rcv_nxt = (self.rcv_nxt + len(payload)) & M32
            self.nat.counters["bytes_to_host"] += len(payload)
        if not seg.has(FIN) or offset > len(seg.payload) or self.guest_fin:
            self.ack_due = True  # one ACK for the whole batch (TcpNat.flush)
            self.nat.dirty(self)
            return
        self.guest_fin = True
        self.rcv_nxt = (self.rcv_nxt + 1) & M32
        self.flush()  # the bytes before the FIN, and the ACK of it, now
        if host is not None and host.can_write_eof():
            host.write_eof()
        self.ack()
        if self.fin_sent and self.snd_una == self.snd_nxt:
            self.finish()

    # -- the host side ----------------------------------------------------------------

    def host_connected(self, host: _HostSide) -> None:
        """Outbound: the host connection is up: answer the guest's SYN."""
        self.host = host
        if self.state is State.CONNECTING:
            self.state = State.SYN_ACKED
            self._emit(self.isn, SYN | ACK, syn_options=True)
            self._arm(lambda: self.abort(rst_guest=True), 10.0)

    def from_host(self, count: int) -> None:
        """``count`` more bytes from the host are in :attr:`out`."""
        self.nat.counters["bytes_to_guest"] += count
        if len(self.out) >= OUT_LIMIT and self.host is not None and \
                self.host.transport is not None:
            self.host.transport.pause_reading()
        self.push()

    def host_eof(self) -> None:
        self.host_eof_seen = True
        self.push()

    def host_lost(self, exc: Exception | None) -> None:
        if self.state is State.CLOSED:
            return
        if exc is not None:  # reset or error: the guest hears of it
            self.nat.counters["host_reset"] += 1
            self.abort(rst_guest=True)
        elif not self.host_eof_seen:
            self.host_eof()

    # -- the end ----------------------------------------------------------------------

    def finish(self) -> None:
        """Both sides closed: forget the flow."""
        self.flush()
        self.state = State.CLOSED
        self._cancel_timer()
        if self.host is not None and self.host.transport is not None:
            self.host.transport.close()
        self.nat.forget(self)
        self.nat.counters["closed"] += 1

    def abort(self, *, rst_guest: bool) -> None:
        """Reset: the host socket closes at once, the guest gets an RST if asked."""
        if rst_guest and self.state is not State.CLOSED:
            self._emit(self.snd_nxt, RST | ACK)
        self.state = State.CLOSED
        self.to_host.clear()
        self._cancel_timer()
        if self.host is not None and self.host.transport is not None:
            self.host.transport.abort()
        self.nat.forget(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TcpNat:
    """Every spliced TCP connection of one guest link."""

    def __init__(self, link: LinkServices, send: Send, *, allowed: Allowed,
                 vnet: bool = False) -> None:
        self.link, self._send, self._allowed, self.vnet = link, send, allowed, vnet
        self.flows: dict[GuestKey, TcpFlow] = {}
        self._wire: dict[tuple[int, bytes, int], TcpFlow] = {}  # the same, by TcpFlow.wire
        self.servers: list[asyncio.Server] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self.mss = link.config.link_mtu - 40
        self._out: list[bytes] = []  # frames to the guest, sent at the end of this turn
        self._dirty: dict[GuestKey, TcpFlow] = {}  # flows with bytes or an ACK due
        self._flush_due = False
        self._guest_packed = link.config.guest_ip.packed
        self.pool = ChunkPool()  # where host reads land

    def add(self, flow: TcpFlow) -> None:
        """Track a new connection."""
        self.flows[flow.key] = flow
        self._wire[flow.wire] = flow

    def forget(self, flow: TcpFlow) -> None:
        """A connection is over."""
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            del self._wire[flow.wire]
        self._dirty.pop(flow.key, None)

    def max_segment(self, flow: TcpFlow) -> int:
        """The most payload one segment to the guest carries: its MSS, or a 64 KiB
        super segment the guest's kernel takes whole on a TAP with offloads."""
        return MAX_SUPER_SEGMENT if self.vnet else flow.guest_mss

    # -- the batch --------------------------------------------------------------------

    def dirty(self, flow: TcpFlow) -> None:
        """``flow`` has host bytes or an ACK due at the end of the batch."""
        self._dirty[flow.key] = flow
        self._schedule()

    def emit(self, flow: TcpFlow, seq: int, ack: int, flags: int, window: int,
             payload: Payload = (), options: bytes = b"") -> None:
        """Queue one segment of ``flow`` to the guest."""
        guest_port, _, peer_port = flow.key
        frame = self.frame(flow.wire[1], flow.addr_sum, peer_port, guest_port, seq, ack,
                           flags, window, payload, options, gso=flow.guest_mss)
        if frame is not None:
            self._out.append(frame)
            self._schedule()

    def _schedule(self) -> None:
        if self._flush_due:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (a caller without one flushes itself)
            return
        self._flush_due = True

    def flush(self) -> None:
        """Write this turn's guest bytes to the host sockets, then send every ACK and
        segment queued for the guest (one `send` call: the transport batches)."""
        self._flush_due = False
        while self._dirty:
            _, flow = self._dirty.popitem()
            flow.flush()
        if self._out:
            frames, self._out = self._out, []
            self._send(frames)

    def frame(self, peer: bytes, addr_sum: int, sport: int, dport: int, seq: int, ack: int,
              flags: int, window: int, payload: Payload = (), options: bytes = b"",
              gso: int = 0) -> bytes | None:
        """One segment from ``peer`` (packed) to the guest, framed; None while the guest's
        MAC is unknown. ``payload``: its parts, ``gso``: the guest's MSS, for a super
        segment's virtio header."""
        mac = self.link.guest_mac
        if mac is None:
            self.link.dropped["guest_mac_unknown"] += 1
            return None
        size = sum(map(len, payload))
        tcp_len = TCP_LEN + len(options) + size
        total = IP_LEN + tcp_len
        ip_check = fold_checksum(_IP_CONST + total + addr_sum)
        pseudo = addr_sum + PROTO_TCP + tcp_len
        fields = [mac, self.link.config.gateway_mac, ETH_IPV4,
                  0x45, 0, total, 0, _DF, _TTL, PROTO_TCP, ip_check, peer, self._guest_packed,
                  sport, dport, seq, ack, (TCP_LEN + len(options)) << 2, flags, window, 0, 0]
        if self.vnet:  # the field holds the pseudo-header sum; the kernel needs no more
            fields[20] = 0xFFFF - fold_checksum(pseudo)
            headers = HEADERS.pack(*fields) + options
            gso_type = GSO_TCPV4 if gso and size > gso else GSO_NONE
            vnet = VNET_HEADER.pack(NEEDS_CSUM, gso_type, len(headers),
                                    gso if gso_type else 0, ETH_LEN + IP_LEN, 16)
            return b"".join((vnet, headers, *payload))
        data = b"".join(payload)
        headers = HEADERS.pack(*fields) + options
        fields[20] = fold_checksum(pseudo + ones_sum(headers[ETH_LEN + IP_LEN:])
                                   + ones_sum(data))
        return HEADERS.pack(*fields) + options + data

    # -- from the guest -----------------------------------------------------------------

    def fast(self, frame: bytes | memoryview, offloaded: bool) -> bool:
        """An established connection's segment without SYN or RST, taken without the
        general parsers; False: not one (the caller takes the general path, which also
        counts whatever is malformed)."""
        if len(frame) < ETH_LEN + IP_LEN + TCP_LEN:
            return False
        (dst_mac, _, ethertype, ver_ihl, _, total, _, frag, _, proto, _, src, dst,
         sport, dport, seq, ack, offset, flags, window, _, _) = HEADERS.unpack_from(frame)
        if ethertype != ETH_IPV4 or ver_ihl != 0x45 or proto != PROTO_TCP or \
                flags & (SYN | RST) or frag & 0x3FFF or src != self._guest_packed or \
                dst_mac != self.link.config.gateway_mac or \
                not IP_LEN + TCP_LEN <= total <= len(frame) - ETH_LEN:
            return False
        flow = self._wire.get((sport, dst, dport))
        header_len = (offset >> 4) * 4
        if flow is None or flow.state is not State.ESTABLISHED or \
                not TCP_LEN <= header_len <= total - IP_LEN or \
                ones_sum(frame[ETH_LEN:ETH_LEN + IP_LEN]) != 0:
            return False
        end = ETH_LEN + total
        if not offloaded and (ones_sum(frame[ETH_LEN + IP_LEN:end]) + flow.addr_sum
                              + PROTO_TCP + total - IP_LEN) % 0xFFFF:
            return False  # a valid checksum makes the whole sum ones' complement zero
        flow.from_guest(TcpSegment(
            sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=window,
            payload=bytes(frame[ETH_LEN + IP_LEN + header_len:end])))
        return True

    def on_ipv4(self, eth: EthernetFrame, ip: IPv4Packet, offloaded: bool = False
                ) -> list[bytes] | None:
        """A guest TCP segment; None: not TCP."""
        if ip.proto != PROTO_TCP:
            return None
        try:
            seg = TcpSegment.parse(ip.payload, ip.src, ip.dst, verify_checksum=not offloaded)
        except MalformedFrame as exc:
            self.dropped[exc.reason] += 1
            return []
        if ip.src != self.link.config.guest_ip:
            self.dropped["tcp_spoofed_source"] += 1
            return []
        key: GuestKey = (seg.sport, ip.dst, seg.dport)
        flow = self.flows.get(key)
        if flow is not None:
            flow.from_guest(seg)
        elif seg.has(SYN) and not seg.has(ACK):
            self._outbound(key, seg)
        elif not seg.has(RST):
            self.dropped["tcp_no_flow"] += 1  # answer with RST, as a closed port would
            self._rst_for(key, seg)
        return []

    def _outbound(self, key: GuestKey, seg: TcpSegment) -> None:
        target = self._allowed(key[1], key[2])
        if target is None or len(self.flows) >= MAX_FLOWS:
            self.dropped["tcp_egress_denied" if target is None else "tcp_flow_limit"] += 1
            self._rst_for(key, seg)
            return
        flow = TcpFlow(self, key, State.CONNECTING)
        flow._learn(seg)
        flow.rcv_nxt = (seg.seq + 1) & M32
        self.add(flow)
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: _HostSide(flow), target[0], target[1])
            except OSError as exc:
                self.counters[f"connect_{exc.errno}"] += 1
                flow.abort(rst_guest=True)

        task = loop.create_task(connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rst_for(self, key: GuestKey, seg: TcpSegment) -> None:
        guest_port, peer_ip, peer_port = key
        ack = (seg.seq + seg.seq_space) & M32
        rst = TcpSegment(sport=peer_port, dport=guest_port, seq=seg.ack if seg.has(ACK) else 0,
                         ack=ack, flags=RST | ACK, window=0)
        self.to_guest(peer_ip, rst)

    def to_guest(self, peer_ip: IPv4Address, seg: TcpSegment) -> None:
        """Frame a segment from ``peer_ip`` to the guest and send it."""
        frame = self.link.to_guest_frame(
            peer_ip, PROTO_TCP, seg.build(peer_ip, self.link.config.guest_ip))
        if frame is not None:
            self._out.append(frame)
            self._schedule()

    # -- inbound forwards -------------------------------------------------------------

    async def add_forward(self, host_ip: str, host_port: int, guest_port: int) -> int:
        """Listen on ``host_ip:host_port`` (0: a free port) for the guest's
        ``guest_port``; the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: self._accepted(guest_port), host_ip,
                                          host_port)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def _accepted(self, guest_port: int) -> asyncio.BaseProtocol:
        nat = self

        class Accepted(_HostSide):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                t = cast(asyncio.Transport, transport)
                host, port = t.get_extra_info("peername")[:2]
                key: GuestKey = (guest_port, nat.link.guest_view(host), int(port))
                if key in nat.flows or len(nat.flows) >= MAX_FLOWS:
                    nat.dropped["tcp_forward_refused"] += 1
                    t.abort()
                    return
                flow = TcpFlow(nat, key, State.SYN_SENT)
                self.flow = flow
                self.transport = t
                flow.host = self
                nat.add(flow)
                t.pause_reading()  # until the guest has answered
                flow.send_syn()

        return Accepted(cast(TcpFlow, None))

    def close(self) -> None:
        """Reset every connection and stop every listener."""
        for flow in list(self.flows.values()):
            flow.abort(rst_guest=True)
        self.flush()
        for server in self.servers:
            server.close()
        self.servers.clear()
        for task in self._tasks:
            task.cancel()
