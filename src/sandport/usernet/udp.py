"""UDP through usernet: the DNS forwarder, outbound flows and inbound port forwards.

Every UDP *flow* is one host socket and the guest-side 4-tuple it stands for:

- **outbound** (the guest sends first): ``guest:sport -> dst:dport`` becomes a host
  socket connected to the real target. The gateway address means this host's loopback
  (as in slirp and passt); port 53 on the gateway is the DNS forwarder, whose target is
  the configured upstream. Any other target must be on the egress allow-list: deny by
  default. Replies come back to the guest from ``dst:dport``, as it expects.
- **inbound** (a host client sends first to a forward's listener): the guest sees the
  datagram from the client's real address, or from the gateway address when the client
  is on this host's loopback (the guest cannot answer 127.0.0.1), and its reply goes back
  to that client through the listener.

Flows idle for ``idle_timeout`` seconds are closed. Nothing here parses bytes itself:
:mod:`sandport.proto.packets` does, and refusals are counted in ``dropped``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import cast

from sandport.proto.packets.errors import MalformedFrame
from sandport.proto.packets.ethernet import EthernetFrame
from sandport.proto.packets.ipv4 import PROTO_UDP, IPv4Packet
from sandport.proto.packets.udp import UdpDatagram
from sandport.usernet.egress import Egress, EgressRule
from sandport.usernet.link import LinkServices

log = logging.getLogger(__name__)

DNS_PORT = 53
IDLE_TIMEOUT = 60.0
MAX_FLOWS = 4096
MAX_PENDING = 64  # datagrams queued while a flow's socket opens

Send = Callable[[list[bytes]], None]
GuestKey = tuple[int, IPv4Address, int]  # guest port, peer address, peer port (guest's view)


@dataclass(slots=True)
class _Flow(asyncio.DatagramProtocol):
    nat: UdpNat
    key: GuestKey
    guest_view: tuple[IPv4Address, int]  # where the guest thinks it talks to
    transport: asyncio.DatagramTransport | None = None
    pending: list[bytes] = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)
    client: tuple[str, int] | None = None  # inbound: the host client behind it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not an asyncio.DatagramTransport subclass: no isinstance.
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.pending:
            self.transport.sendto(data)
        self.pending.clear()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.last = time.monotonic()
        self.nat.to_guest(self.key[0], self.guest_view, data)

    def error_received(self, exc: Exception) -> None:
        self.nat.dropped[f"host_{type(exc).__name__}"] += 1


class _Listener(asyncio.DatagramProtocol):
    """An inbound forward's host socket: client datagrams go to the guest's port."""

    def __init__(self, nat: UdpNat, guest_port: int) -> None:
        self.nat, self.guest_port = nat, guest_port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.nat.from_client(self, data, (str(addr[0]), int(addr[1])))


class UdpNat:
    """UDP flows between the guest and host sockets (see the module docstring)."""

    def __init__(self, link: LinkServices, send: Send, *,
                 dns_upstream: tuple[str, int] | None = None,
                 egress: tuple[EgressRule, ...] = (),
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.link, self._send = link, send
        self.dns_upstream, self.idle_timeout = dns_upstream, idle_timeout
        self.egress = Egress(link.config.gateway_ip, egress)
        self.flows: dict[GuestKey, _Flow] = {}
        self.listeners: list[_Listener] = []
        self.dropped: collections.Counter[str] = collections.Counter()
        self.relayed: collections.Counter[str] = collections.Counter()
        self._sweeper: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()  # flows whose socket is opening
        link.ipv4_hook = self.on_ipv4

    # -- from the guest ---------------------------------------------------------------------

    def on_ipv4(self, eth: EthernetFrame, ip: IPv4Packet, offloaded: bool = False
                ) -> list[bytes] | None:
        """A guest UDP datagram the link services did not answer; None: not UDP."""
        if ip.proto != PROTO_UDP:
            return None
        cfg = self.link.config
        try:
            udp = UdpDatagram.parse(ip.payload, ip.src, ip.dst, verify_checksum=not offloaded)
        except MalformedFrame as exc:
            self.dropped[exc.reason] += 1
            return []
        if ip.src != cfg.guest_ip:
            self.dropped["udp_spoofed_source"] += 1
            return []
        key: GuestKey = (udp.sport, ip.dst, udp.dport)
        flow = self.flows.get(key)
        if flow is None:
            target = self._target(ip.dst, udp.dport)
            if target is None:
                self.dropped["udp_egress_denied"] += 1
                return []
            if len(self.flows) >= MAX_FLOWS:
                self.dropped["udp_flow_limit"] += 1
                return []
            flow = self._open(key, (ip.dst, udp.dport), target)
        flow.last = time.monotonic()
        if flow.client is not None:  # a reply to an inbound forward's client
            for listener in self.listeners:
                if listener.guest_port == udp.sport and listener.transport is not None:
                    listener.transport.sendto(udp.payload, flow.client)
                    self.relayed["to_client"] += 1
                    break
        elif flow.transport is not None:
            flow.transport.sendto(udp.payload)
            self.relayed["to_host"] += 1
        elif len(flow.pending) < MAX_PENDING:
            flow.pending.append(udp.payload)
        else:
            self.dropped["udp_pending_full"] += 1
        return []

    def _target(self, ip: IPv4Address, port: int) -> tuple[str, int] | None:
        if ip == self.link.config.gateway_ip and port == DNS_PORT and \
                self.dns_upstream is not None:
            return self.dns_upstream
        return self.egress.target(ip, port)

    def _open(self, key: GuestKey, view: tuple[IPv4Address, int],
              target: tuple[str, int]) -> _Flow:
        flow = _Flow(nat=self, key=key, guest_view=view)
        self.flows[key] = flow
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            try:
                await loop.create_datagram_endpoint(lambda: flow, remote_addr=target)
            except OSError as exc:
                self.dropped[f"udp_connect_{exc.errno}"] += 1
                self.flows.pop(key, None)

        task = loop.create_task(connect(), name=f"usernet udp {target}")
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        self._ensure_sweeper()
        return flow

    # -- to the guest -----------------------------------------------------------------------

    def to_guest(self, guest_port: int, source: tuple[IPv4Address, int], data: bytes) -> None:
        """Send ``data`` to the guest's ``guest_port`` from ``source``."""
        try:
            segment = UdpDatagram(sport=source[1], dport=guest_port,
                                  payload=data).build(source[0], self.link.config.guest_ip)
            frame = self.link.to_guest_frame(source[0], PROTO_UDP, segment)
        except ValueError:
            self.dropped["udp_too_large"] += 1
            return
        if frame is not None:
            self.relayed["to_guest"] += 1
            self._send([frame])

    # -- inbound forwards -------------------------------------------------------------------

    async def add_forward(self, host_ip: str, host_port: int, guest_port: int) -> int:
        """Listen on ``host_ip:host_port`` (0: any free port) for ``guest_port``; the
        bound port."""
        loop = asyncio.get_running_loop()
        listener = _Listener(self, guest_port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: listener, local_addr=(host_ip, host_port))
        self.listeners.append(listener)
        self._ensure_sweeper()
        return int(transport.get_extra_info("sockname")[1])

    def from_client(self, listener: _Listener, data: bytes, client: tuple[str, int]) -> None:
        """A host client's datagram to a forward: on to the guest, from the client."""
        seen, port = self.link.guest_view(client[0]), client[1]
        key: GuestKey = (listener.guest_port, seen, port)
        flow = self.flows.get(key)
        if flow is not None and flow.client not in (None, client):
            self.dropped["udp_client_collision"] += 1  # two loopback clients, one port
            return
        if flow is None:
            if len(self.flows) >= MAX_FLOWS:
                self.dropped["udp_flow_limit"] += 1
                return
            flow = _Flow(nat=self, key=key, guest_view=(seen, port), client=client)
            self.flows[key] = flow
        flow.last = time.monotonic()
        self.to_guest(listener.guest_port, (seen, port), data)

    # -- housekeeping -----------------------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout))
            now = time.monotonic()
            for key, flow in list(self.flows.items()):
                if now - flow.last > self.idle_timeout:
                    self.flows.pop(key, None)
                    if flow.transport is not None:
                        flow.transport.close()

    def close(self) -> None:
        """Close every flow and listener."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in self._opening:
            task.cancel()
        for flow in self.flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self.flows.clear()
        for listener in self.listeners:
            if listener.transport is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    listener.transport.close()
        self.listeners.clear()
