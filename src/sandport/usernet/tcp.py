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
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import secrets
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import cast

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ethernet import EthernetFrame
from sandport.proto.packets.ipv4 import PROTO_TCP, IPv4Packet
from sandport.proto.packets.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment
from sandport.usernet.link import LinkServices

log = logging.getLogger(__name__)

Send = Callable[[list[bytes]], None]
Allowed = Callable[[IPv4Address, int], tuple[str, int] | None]
GuestKey = tuple[int, IPv4Address, int]  # guest port, peer address, peer port (guest's view)

OUR_WSCALE = 7
RCV_BUFFER = 4 << 20  # what we let the guest send before the host socket drains
OUT_LIMIT = 4 << 20  # host bytes buffered for the guest before the host side pauses
RTO = 0.3  # retransmission timeout toward the guest (a local link: no RTT estimation)
SYN_RETRIES = 5
MAX_FLOWS = 4096
M32 = 0xFFFFFFFF


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in sequence space (negative when ``a`` is before ``b``)."""
    d = (a - b) & M32
    return d - (1 << 32) if d >= 1 << 31 else d


class State(enum.Enum):
    """Where a spliced connection is."""

    SYN_SENT = "syn-sent"  # inbound: our SYN to the guest is out
    CONNECTING = "connecting"  # outbound: the host connect is in progress
    SYN_ACKED = "syn-acked"  # outbound: our SYN-ACK to the guest is out
    ESTABLISHED = "established"
    CLOSED = "closed"


class _HostSide(asyncio.Protocol):
    """The host socket of one flow."""

    def __init__(self, flow: TcpFlow) -> None:
        self.flow = flow
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow.host_connected(self)

    def data_received(self, data: bytes) -> None:
        self.flow.from_host(data)

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
        self.out = bytearray()  # host bytes from snd_una on: unacknowledged, then unsent
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

    # -- segments to the guest ----------------------------------------------------------

    def _emit(self, seq: int, flags: int, payload: bytes = b"", *, syn_options: bool = False
              ) -> None:
        guest_port, peer_ip, peer_port = self.key
        window = self._window() >> OUR_WSCALE if not flags & SYN else min(
            self._window(), 65535)
        seg = TcpSegment(sport=peer_port, dport=guest_port, seq=seq & M32,
                         ack=self.rcv_nxt & M32 if flags & ACK else 0, flags=flags,
                         window=min(window, 65535), payload=payload,
                         mss=self.nat.mss if syn_options else None,
                         wscale=OUR_WSCALE if syn_options else None)
        self.nat.to_guest(peer_ip, seg)

    def _window(self) -> int:
        buffered = self.host.transport.get_write_buffer_size() \
            if self.host is not None and self.host.transport is not None else 0
        return max(0, RCV_BUFFER - buffered)

    def ack(self) -> None:
        """A bare ACK (with our current window)."""
        if self.state is State.ESTABLISHED:
            self._emit(self.snd_nxt, ACK)

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
        while True:
            inflight = seq_diff(self.snd_nxt, self.snd_una) - (1 if self.fin_sent else 0)
            unsent = len(self.out) - inflight
            room = self.guest_wnd - inflight
            if unsent <= 0 or room <= 0:
                break
            size = min(unsent, room, self.guest_mss)
            chunk = bytes(self.out[inflight:inflight + size])
            self._emit(self.snd_nxt, ACK | PSH, chunk)
            self.snd_nxt = (self.snd_nxt + size) & M32
        if self.host_eof_seen and not self.fin_sent and \
                seq_diff(self.snd_nxt, self.snd_una) == len(self.out):
            self._emit(self.snd_nxt, ACK | FIN)
            self.snd_nxt = (self.snd_nxt + 1) & M32
            self.fin_sent = True
        if seq_diff(self.snd_nxt, self.snd_una) > 0:
            self._arm(self._retransmit, RTO)
        elif self.host is not None and self.host.transport is not None and \
                len(self.out) < OUT_LIMIT // 2:
            self.host.transport.resume_reading()

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
            del self.out[:data_acked]
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
        payload = seg.payload[offset:]
        host = self.host.transport if self.host is not None else None
        if payload and host is not None and not host.is_closing():
            host.write(payload)
            self.rcv_nxt = (self.rcv_nxt + len(payload)) & M32
            self.nat.counters["bytes_to_host"] += len(payload)
        if seg.has(FIN) and offset <= len(seg.payload) and not self.guest_fin:
            self.guest_fin = True
            self.rcv_nxt = (self.rcv_nxt + 1) & M32
            if host is not None and host.can_write_eof():
                host.write_eof()
        self.ack()
        if self.guest_fin and self.fin_sent and self.snd_una == self.snd_nxt:
            self.finish()

    # -- the host side ----------------------------------------------------------------

    def host_connected(self, host: _HostSide) -> None:
        """Outbound: the host connection is up: answer the guest's SYN."""
        self.host = host
        if self.state is State.CONNECTING:
            self.state = State.SYN_ACKED
            self._emit(self.isn, SYN | ACK, syn_options=True)
            self._arm(lambda: self.abort(rst_guest=True), 10.0)

    def from_host(self, data: bytes) -> None:
        self.out += data
        self.nat.counters["bytes_to_guest"] += len(data)
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
        self.state = State.CLOSED
        self._cancel_timer()
        if self.host is not None and self.host.transport is not None:
            self.host.transport.close()
        self.nat.flows.pop(self.key, None)
        self.nat.counters["closed"] += 1

    def abort(self, *, rst_guest: bool) -> None:
        """Reset: the host socket closes at once, the guest gets an RST if asked."""
        if rst_guest and self.state is not State.CLOSED:
            self._emit(self.snd_nxt, RST | ACK)
        self.state = State.CLOSED
        self._cancel_timer()
        if self.host is not None and self.host.transport is not None:
            self.host.transport.abort()
        self.nat.flows.pop(self.key, None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TcpNat:
    """Every spliced TCP connection of one guest link."""

    def __init__(self, link: LinkServices, send: Send, *, allowed: Allowed) -> None:
        self.link, self._send, self._allowed = link, send, allowed
        self.flows: dict[GuestKey, TcpFlow] = {}
        self.servers: list[asyncio.Server] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self.mss = link.config.mtu - 40

    def on_ipv4(self, eth: EthernetFrame, ip: IPv4Packet) -> list[bytes] | None:
        """A guest TCP segment; None: not TCP."""
        if ip.proto != PROTO_TCP:
            return None
        try:
            seg = TcpSegment.parse(ip.payload, ip.src, ip.dst)
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
        self.flows[key] = flow
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
            self._send([frame])

    # -- inbound forwards -------------------------------------------------------------

    async def add_forward(self, host_ip: str, host_port: int, guest_port: int) -> int:
        """Listen on ``host_ip:host_port`` (0: a free port) for the guest's
        ``guest_port``; the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: self._accepted(guest_port), host_ip,
                                          host_port)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def _accepted(self, guest_port: int) -> asyncio.Protocol:
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
                nat.flows[key] = flow
                t.pause_reading()  # until the guest has answered
                flow.send_syn()

        return Accepted(cast(TcpFlow, None))

    def close(self) -> None:
        """Reset every connection and stop every listener."""
        for flow in list(self.flows.values()):
            flow.abort(rst_guest=True)
        for server in self.servers:
            server.close()
        self.servers.clear()
        for task in self._tasks:
            task.cancel()
